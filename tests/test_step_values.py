"""Training losses stay on the device and are read every READ_EVERY steps (engine.train.StepValues)."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import segprune.engine.train as train_mod
from segprune.engine.log import StageLog
from segprune.engine.train import READ_EVERY, NonFiniteLossError, StepValues, train_segmentation


def test_sums_are_bitwise_those_of_reading_every_step():
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(23, generator=g) * 3  # float32 0-d tensors, as a loop's losses
    counts = torch.randint(0, 50, (23,), generator=g)
    acc = StepValues({"loss": "t"})
    ref = {"loss": 0.0, "correct": 0.0, "seen": 0.0}
    for i in range(23):
        acc.add(i, {"loss": losses[i], "correct": counts[i], "seen": 8.0})
        ref["loss"] += losses[i].item()
        ref["correct"] += float(counts[i])
        ref["seen"] += 8.0
    assert acc.flush() == ref  # exact float equality, same keys in the same order
    assert list(acc.sums) == ["loss", "correct", "seen"]


def test_a_nan_is_named_at_its_step_and_read_every_n_steps(monkeypatch):
    """A NaN loss at step 3 of a 12-step loop without checkpoints: the error names step 3 and is raised
    at the first read, after READ_EVERY steps (the loop did not read the loss at every step)."""
    real, calls = train_mod.seg_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 4 else loss  # step index 3
    monkeypatch.setattr(train_mod, "seg_loss", poisoned)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 3, 1))
    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randn(24, 3, 8, 8, generator=g), torch.randint(0, 3, (24, 8, 8), generator=g))
    loader = DataLoader(ds, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    cfg = {"epochs": 1, "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, "max_iters_per_epoch": 12}
    with pytest.raises(NonFiniteLossError, match=r"stage train_seg: loss became nan at step 3"):
        train_segmentation(net, loader, cfg, 255, StageLog("train_seg", None, quiet=True))
    assert READ_EVERY == 10 and len(calls) == READ_EVERY
