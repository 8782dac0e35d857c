"""``train.channels_last``: NHWC memory format in the training loops (engine/layout.py)."""
import copy

import pytest
import torch

from conftest import TINY, random_cls_batches, random_seg_batches
from segprune.api import prune_model
from segprune.config import ConfigError, DEFAULTS, merge, validate
from segprune.engine.layout import channels_last_mode
from segprune.engine.log import StageLog
from segprune.engine.train import train_segmentation
from segprune.models import build_model
from segprune.pipeline import stage_fingerprints

S = 32
CL = torch.channels_last


def _model():
    """The tiny DeepLabv3 with its dropout off: a dropout mask is drawn in the memory order of the
    activation, so under channels_last the same random numbers drop other elements (a run as likely,
    not the same run; docs/distributed.md). Without dropout the two formats must agree to rounding."""
    torch.manual_seed(0)
    m = build_model({**TINY["model"], "multi_grid": None, "aspp_rates": None}, 5, 4)
    drops = [d for d in m.modules() if isinstance(d, torch.nn.Dropout)]
    assert drops  # the test would not notice the caveat if the model had none
    for d in drops:
        d.p = 0.0
    return m


def _seg_batches(n=3):
    return random_seg_batches(n, S)


def _cls_batches(n=3):
    return random_cls_batches(n)


CFG = {"epochs": 1, "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "max_iters_per_epoch": 3}


def test_loop_trains_in_channels_last_and_restores_the_format():
    """Inside the loop the convolutions get NHWC inputs and weights; after it every weight is
    contiguous again; the loss is the float32 one within 1e-4 relative and the weights within 1e-4
    of the largest entry (other kernels, other rounding; measured: 2.4e-8 and 3.5e-7)."""
    ref, model = _model(), _model()
    train_segmentation(ref, _seg_batches(), CFG, 255, StageLog("t", None, quiet=True))
    seen = []
    h = model.backbone.conv1.register_forward_hook(lambda m, i, o: seen.append(
        (i[0].is_contiguous(memory_format=CL), m.weight.is_contiguous(memory_format=CL), m.weight.is_contiguous())))
    with channels_last_mode(True):
        st = train_segmentation(model, _seg_batches(), CFG, 255, StageLog("t", None, quiet=True))
    h.remove()
    assert seen and all(inp and w and not plain for inp, w, plain in seen)  # NHWC inside (C > 1: not both)
    assert all(p.is_contiguous() for p in model.parameters())  # back to the default format
    st_ref = train_segmentation(_model(), _seg_batches(), CFG, 255, StageLog("t", None, quiet=True))
    assert st["loss"] == pytest.approx(st_ref["loss"], rel=1e-4)
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        if a.is_floating_point():
            assert (a - b).abs().max() <= 1e-4 * max(1.0, float(a.abs().max())), k


def test_mtp_widths_and_losses_match_in_float64():
    """MTP through prune_model (sparsity training with both steps, pruning, fine-tuning) in float64:
    channels_last gives the same widths, and losses within 1e-9 relative (measured 1.5e-13; float64
    rounding differences lie far below the γ gaps that decide the widths)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        kw = dict(keep_ratio=0.5, input_size=(S, S), seed=0,
                  method_cfg={"epochs": 1, "max_iters_per_epoch": 2},
                  finetune={"cls": {"epochs": 1, "max_iters_per_epoch": 1}, "seg": {"epochs": 1, "max_iters_per_epoch": 2}})
        res = {}
        for on in (False, True):
            with channels_last_mode(on):
                res[on] = prune_model(_model(), "mtp", seg_loader=_seg_batches(), cls_loader=_cls_batches(), **kw)
    finally:
        torch.set_default_dtype(prev)
    assert res[True].widths == res[False].widths
    for phase in ("cls", "seg"):
        assert res[True].report["finetune"][phase]["loss"] == pytest.approx(
            res[False].report["finetune"][phase]["loss"], rel=1e-9)


def test_channels_last_key_is_validated_and_fingerprinted():
    cfg = merge(DEFAULTS, copy.deepcopy(TINY))
    assert cfg["train"]["channels_last"] is False
    off = stage_fingerprints(cfg)
    legacy = copy.deepcopy(cfg)
    del legacy["train"]["channels_last"]  # a config written before the key existed
    assert stage_fingerprints(legacy) == off
    on = copy.deepcopy(cfg)
    on["train"]["channels_last"] = True
    assert all(stage_fingerprints(on)[s] != off[s] for s in off)
    bad = copy.deepcopy(cfg)
    bad["train"]["channels_last"] = "yes"
    with pytest.raises(ConfigError, match=r"train\.channels_last='yes': must be true or false"):
        validate(bad)
    with pytest.raises(ValueError, match="train.channels_last"):
        with channels_last_mode("yes"):
            pass
