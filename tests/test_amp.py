"""Mixed precision (``train.amp``): bf16 autocast on the CPU through every method, fp16 refused without CUDA."""
import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import TINY
from segprune.api import prune_model
from segprune.config import ConfigError, DEFAULTS, merge
from segprune.engine.amp import Amp, amp_mode
from segprune.engine.log import StageLog
from segprune.engine.train import train_segmentation
from segprune.methods.base import method_class, method_names
from segprune.models import build_model
from segprune.pipeline import Pipeline, stage_fingerprints

S = 32


def _model():
    torch.manual_seed(0)
    return build_model({**TINY["model"], "multi_grid": None, "aspp_rates": None}, 5, 4)


def _loader(x, y):
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))


def _seg_batches(n=3):
    g = torch.Generator().manual_seed(1)
    return _loader(torch.randn(4 * n, 3, S, S, generator=g), torch.randint(0, 5, (4 * n, S, S), generator=g))


def _cls_batches(n=3):
    g = torch.Generator().manual_seed(2)
    return _loader(torch.randn(4 * n, 3, 16, 16, generator=g), torch.randint(0, 4, (4 * n,), generator=g))


def test_bf16_autocast_is_active_and_parameters_stay_float32():
    model = _model()
    seen = []
    h = model.backbone.conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    cfg = {"epochs": 1, "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "max_iters_per_epoch": 2}
    with amp_mode("bf16"):
        st = train_segmentation(model, _seg_batches(), cfg, 255, StageLog("t", None, quiet=True))
    h.remove()
    assert seen and all(d == torch.bfloat16 for d in seen)   # convolutions ran in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())   # weights and γ stay fp32
    assert all(b.dtype in (torch.float32, torch.int64) for b in model.buffers())   # BN statistics too
    assert torch.isfinite(torch.tensor(st["loss"]))
    seen.clear()
    model.backbone.conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    train_segmentation(model, _seg_batches(), cfg, 255, StageLog("t", None, quiet=True))   # outside: fp32
    assert seen and all(d == torch.float32 for d in seen)


@pytest.mark.parametrize("method", method_names())
def test_every_method_runs_under_bf16(method):
    """A few steps of every method's training and the fine-tuning under bf16: finite losses; the
    per-layer methods keep the same widths as in float32 (k = round(p * C) per unit by construction)."""
    kw = dict(keep_ratio=0.5, input_size=(S, S), seg_loader=_seg_batches(), cls_loader=_cls_batches(),
              method_cfg={"epochs": 1, "max_iters_per_epoch": 2, "calib_batches": 1, "samples_per_batch": 8},
              finetune={"cls": {"epochs": 1, "max_iters_per_epoch": 1}, "seg": {"epochs": 1, "max_iters_per_epoch": 2}},
              seed=0)
    res = prune_model(_model(), method, amp="bf16", **kw)
    for phase in ("cls", "seg"):
        assert torch.isfinite(torch.tensor(res.report["finetune"][phase]["loss"]))
    out = res.model.eval()(torch.zeros(1, 3, S, S))
    assert out.shape == (1, 5, S, S) and torch.isfinite(out).all()
    if method_class(method).per_layer:
        ref = prune_model(_model(), method, amp="off", **kw)
        assert {n: u["kept"] for n, u in res.widths["units"].items()} == \
            {n: u["kept"] for n, u in ref.widths["units"].items()}


def test_fp16_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Amp(torch.device("cpu"), "fp16")
    with pytest.raises(ValueError, match="fp16 only for a model on a CUDA device"):
        prune_model(_model(), "fpgm", keep_ratio=0.5, input_size=(S, S), amp="fp16")
    cfg = merge(DEFAULTS, copy.deepcopy(TINY))
    cfg["train"]["amp"], cfg["device"] = "fp16", "cpu"
    with pytest.raises(ConfigError, match="train.amp='fp16' needs a CUDA device"):
        Pipeline(cfg, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_amp_enters_the_fingerprints_only_when_on():
    cfg = merge(DEFAULTS, copy.deepcopy(TINY))
    off = stage_fingerprints(cfg)
    legacy = copy.deepcopy(cfg)
    del legacy["train"]["amp"]  # a config written before the key existed
    assert stage_fingerprints(legacy) == off
    cfg["train"]["amp"] = "bf16"
    on = stage_fingerprints(cfg)
    assert all(on[s] != off[s] for s in on)  # every stage trains (or evaluates a model trained) under it
