"""Mixed precision (``train.amp``): bf16 autocast on the CPU through every method, fp16 refused without CUDA."""
import copy
import math

import pytest
import torch

from conftest import TINY, random_cls_batches, random_seg_batches
from segprune.api import prune_model
from segprune.config import ConfigError, DEFAULTS, merge
from segprune.engine.amp import Amp, amp_mode
from segprune.engine.log import StageLog
from segprune.engine.train import train_segmentation
from segprune.methods import build_method
from segprune.methods.base import method_class, method_names
from segprune.models import build_model
from segprune.pipeline import Pipeline, stage_fingerprints

S = 32


def _model():
    torch.manual_seed(0)
    return build_model({**TINY["model"], "multi_grid": None, "aspp_rates": None}, 5, 4)


def _seg_batches(n=3):
    return random_seg_batches(n, S)


def _cls_batches(n=3):
    return random_cls_batches(n)


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


# ---- MTP and ACoSP under autocast -------------------------------------------------------------------
MTP_CFG = {"lam": 1.0, "alpha1": 1e-2, "alpha2": 1e-2, "mu0": 0.5, "rho": 1.5, "mu_max": 4.0, "lr_seg": 0.05,
           "lr_cls": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "l1_mode": "proximal", "keep_copy": "w3"}


def _mtp(mode, **over):
    from segprune.methods.mtp import MTP
    from segprune.pruning import build_graph, discover_units
    model = _model()
    units = discover_units(model, build_graph(model, (S, S)))
    with amp_mode(mode):  # MTP's steps take the mode current when it is built (as in MultiTaskPruning.train)
        return model, MTP(model, units, {**MTP_CFG, **over})


def _mtp_steps(mtp, n=3):
    seg, cls = list(_seg_batches(n)), list(_cls_batches(n))
    losses = []
    for (x1, y1), (x2, y2) in zip(cls, seg):
        losses += [mtp.step_w1(x1, y1, 0.05), mtp.step_w23(x2, y2, 0.05, 255)]
        mtp.steps += 1
        mtp.update_multipliers()
    return losses


def test_mtp_steps_run_in_bf16_autocast_with_float32_state():
    """Both MTP steps (W1, Eq. 7; W2/W3, Eqs. 8-9) run their convolutions in bf16; weights, γ, E, μ and
    the BatchNorm statistics stay float32; the losses are finite, and the segmentation losses close to
    the float32 run's (the classification copy of this width-0.125 net on 16x16 images normalises
    2x2 maps: its loss moves by up to ~30 % between bf16 and float32, so only finiteness is asserted)."""
    model, mtp = _mtp("bf16")
    seen = {"w1": [], "seg": []}
    mtp.w1.conv1.register_forward_hook(lambda m, i, o: seen["w1"].append(o.dtype))
    model.backbone.conv1.register_forward_hook(lambda m, i, o: seen["seg"].append(o.dtype))
    losses = _mtp_steps(mtp)
    assert seen["w1"] and seen["seg"] and all(d == torch.bfloat16 for d in seen["w1"] + seen["seg"])
    for mod in (model, mtp.w1):
        assert all(p.dtype == torch.float32 for p in mod.parameters())
        assert all(b.dtype in (torch.float32, torch.int64) for b in mod.buffers())
    assert all(e.dtype == torch.float32 for e in mtp.E) and isinstance(mtp.mu, float)
    assert all(math.isfinite(v) for v in losses)
    _, ref = _mtp("off")
    ref_losses = _mtp_steps(ref)
    assert losses != ref_losses  # the computation really changed precision ...
    assert losses[1::2] == pytest.approx(ref_losses[1::2], rel=0.02)  # l_seg: the same training (measured ≤ 1 %)


def test_mtp_gradient_edits_act_on_unscaled_gradients(monkeypatch):
    """fp16's loss scaling, emulated on the CPU: bf16 autocast with a CPU GradScaler at scale 2^12.
    Scaling by a power of two is exact, so if the ℓ1 sub-gradient (and every other gradient edit)
    acts on *unscaled* gradients the run equals the unscaled bf16 run; an edit made on the scaled
    gradient would act with 1/4096 of its strength. The loss scale really was applied (and kept)."""
    import segprune.engine.amp as amp_mod
    over = {"l1_mode": "subgradient", "alpha1": 0.05, "alpha2": 0.05}
    _, plain = _mtp("bf16", **over)
    _mtp_steps(plain)
    real_init = amp_mod.Amp.__init__

    def with_scaler(self, device, mode=None):
        real_init(self, device, mode)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1000)
    monkeypatch.setattr(amp_mod.Amp, "__init__", with_scaler)
    _, scaled = _mtp("bf16", **over)
    _mtp_steps(scaled)
    assert scaled.amp1.scaler.get_scale() == scaled.amp23.scaler.get_scale() == 2.0 ** 12  # used, no overflow
    for a, b in zip(list(plain.w1.parameters()) + list(plain.model.parameters()) + plain.E,
                    list(scaled.w1.parameters()) + list(scaled.model.parameters()) + scaled.E):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert plain.mu == scaled.mu


def test_acosp_mask_training_runs_in_bf16_autocast():
    """ACoSP's network and masks run in bf16 autocast; the mask logits, weights and BatchNorm
    statistics stay float32; the loss is finite and the hard masks keep k channels per unit, as in
    float32."""
    from segprune.pruning import build_graph, discover_units
    cfg = {"name": "acosp", "epochs": 2, "lr_seg": 0.05, "momentum": 0.9, "weight_decay": 1e-4,
           "max_iters_per_epoch": 2, "options": {"keep_ratio": 0.5}}
    out = {}
    for mode in ("off", "bf16"):
        model = _model()
        units = discover_units(model, build_graph(model, (S, S)))
        seen = []
        model.backbone.conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        method = build_method(cfg, (S, S))
        with amp_mode(mode):
            st = method.train(model, units, _seg_batches(), None, 255, StageLog("t", None, quiet=True))
        assert seen and all(d == (torch.bfloat16 if mode == "bf16" else torch.float32) for d in seen)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(w.dtype == torch.float32 for w in method.logits.values())
        assert math.isfinite(st["loss"])
        out[mode] = (st, method.select(model, units, 0.5))
    assert out["bf16"][0]["kept"] == out["off"][0]["kept"]
    assert {n: k.numel() for n, k in out["bf16"][1].items()} == {n: k.numel() for n, k in out["off"][1].items()}
    assert out["bf16"][0]["loss"] != out["off"][0]["loss"]


def test_bare_off_in_yaml_and_set_means_off(tmp_path):
    # YAML 1.1 reads a bare `off` as false: in a config file and in `--set train.amp=off`
    from segprune.config import load_config
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  amp: off\n")
    assert load_config(p)["train"]["amp"] == "off"
    assert load_config(None, ["train.amp=bf16", "train.amp=off"])["train"]["amp"] == "off"
    with pytest.raises(ConfigError, match="train.amp"):
        load_config(None, ["train.amp=on"])  # `on` is true in YAML 1.1: still an error, not bf16
