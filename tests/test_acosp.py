"""ACoSP (Auto-Compressing Subset Pruning): k, temperature schedule, soft/hard masks, folding, pruning."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import TensorDataset

import segprune.methods.acosp as acosp_mod
from conftest import TINY as _PIPELINE_TINY  # the shared tiny synthetic setting
from segprune.cli import main
from segprune.engine.log import StageLog
from segprune.engine.train import make_loader
from segprune.methods import build_method
from segprune.methods.acosp import (ACoSP, acosp_k, acosp_temperature, hard_topk_mask, soft_topk_mask)
from segprune.methods.base import check_options
from segprune.models import build_model
from segprune.pruning import build_graph, discover_units, prune_channels
from segprune.pruning.groups import PruneUnit


class Toy(nn.Module):
    """conv1(3->12)-bn1-relu -> conv2(12->10)-bn2-relu -> conv3(10->3): units conv1, conv2."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 10, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(10)
        self.conv3 = nn.Conv2d(10, 3, 1)
        self.parts = {"backbone": "conv1", "decoder": "conv"}
        self.never_prune = ("conv3",)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.conv3(F.relu(self.bn2(self.conv2(x))))


UNITS = [PruneUnit("conv1", "backbone", ["conv1"], ["bn1"], 12), PruneUnit("conv2", "decoder", ["conv2"], ["bn2"], 10)]
_CFG = {"name": "acosp", "epochs": 4, "lr_seg": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "max_iters_per_epoch": 2}


def _loader(n=4, k=3, size=8, bs=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, k, (n, size, size), generator=g))
    return make_loader(ds, bs, True, 0)


def test_k_is_ceil_of_keep_ratio_with_min_keep_capped_at_c():
    assert acosp_k(16, 0.5, 8) == 8
    assert acosp_k(10, 0.25, 1) == 3          # ceil(2.5)
    assert acosp_k(10, 0.3, 1) == 3           # 0.3 * 10 = 3.0000000000000004 in floating point
    assert acosp_k(20, 0.1, 8) == 8           # min_keep
    assert acosp_k(4, 0.5, 8) == 4            # capped at C
    assert acosp_k(100, 0.5, 8) == 50
    assert acosp_k(7, 0.01, 1) == 1


def test_temperature_schedule():
    assert acosp_temperature(0, 10, 1.0, 1e-3) == pytest.approx(1.0)
    assert acosp_temperature(5, 10, 1.0, 1e-3) == pytest.approx(math.sqrt(1e-3))   # geometric middle
    assert acosp_temperature(2.5, 10, 2.0, 0.02) == pytest.approx(2.0 * 0.01 ** 0.25)
    assert acosp_temperature(10, 10, 1.0, 1e-3) == pytest.approx(1e-3)
    assert acosp_temperature(37, 10, 1.0, 1e-3) == pytest.approx(1e-3)
    ts = [acosp_temperature(e, 10) for e in range(11)]
    assert all(a > b for a, b in zip(ts, ts[1:]))                                    # strictly decreasing


def test_soft_and_hard_masks():
    torch.manual_seed(0)
    w = torch.randn(10, requires_grad=True)
    for k in (1, 3, 7, 9):
        m = soft_topk_mask(w, k, 1.0)
        assert int((m > 0.5).sum()) == k                    # exactly k standardised logits lie above x0
        hard = hard_topk_mask(w, k)
        assert int(hard.sum()) == k and set(hard.nonzero().flatten().tolist()) == set(torch.topk(w, k).indices.tolist())
        torch.testing.assert_close(soft_topk_mask(w, k, 1e-4).round(), hard)   # τ -> 0: the soft mask becomes hard
    # hand value: w standardised = w itself, x0 = quantile(w, 1 - k/C)
    v = torch.tensor([-1.0, 0.0, 1.0]) / torch.tensor([-1.0, 0.0, 1.0]).std()
    m = soft_topk_mask(v, 2, 0.5)
    x0 = torch.quantile(v, 1 - 2 / 3)
    torch.testing.assert_close(m, torch.sigmoid((v - x0) / 0.5))
    # scale invariance (standardisation) and gradient to the logits
    torch.testing.assert_close(soft_topk_mask(3 * w + 1, 4, 0.3), soft_topk_mask(w, 4, 0.3))
    soft_topk_mask(w, 4, 0.5).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert torch.equal(soft_topk_mask(w.detach(), 10, 0.5), torch.ones(10))          # k = C: no masking
    assert hard_topk_mask(torch.tensor([1.0, 2.0, 2.0, 0.0]), 2).tolist() == [0.0, 1.0, 1.0, 0.0]
    assert hard_topk_mask(torch.tensor([1.0, 1.0, 1.0]), 2).tolist() == [1.0, 1.0, 0.0]   # ties: lower index
    with pytest.raises(ValueError):
        soft_topk_mask(w, 0, 1.0)


def _train(monkeypatch, opts, epochs=4, n_it=2):
    """Train the toy; returns (model, method, pre-fold copy, hard masks, recorded (epoch, τ) calls)."""
    calls, captured = [], {}
    real_temp, real_fold = acosp_mod.acosp_temperature, acosp_mod.fold_masks_

    def temp(e, end, ts, te):
        calls.append((e, end, real_temp(e, end, ts, te)))
        return calls[-1][2]

    def fold(model, units, masks):
        captured["model"], captured["masks"] = copy.deepcopy(model), {k: v.clone() for k, v in masks.items()}
        return real_fold(model, units, masks)

    monkeypatch.setattr(acosp_mod, "acosp_temperature", temp)
    monkeypatch.setattr(acosp_mod, "fold_masks_", fold)
    torch.manual_seed(0)
    m = Toy()
    meth = build_method({**_CFG, "epochs": epochs, "max_iters_per_epoch": n_it, "options": opts})
    st = meth.train(m, UNITS, _loader(n=8, bs=2), None, 255, StageLog("t", quiet=True))
    return m, meth, st, captured, calls


def test_training_anneals_then_hardens_and_keeps_exactly_k(monkeypatch):
    opts = {"keep_ratio": 0.5, "min_keep": 4, "tau_start": 2.0, "tau_end": 0.02, "end_epoch_frac": 0.5}
    m, meth, st, cap, calls = _train(monkeypatch, opts)
    # 4 epochs x 2 iterations, e_end = 2: soft at fractional epochs 0, 0.5, 1, 1.5, hard from iteration 4 on
    assert [c[0] for c in calls] == [0.0, 0.5, 1.0, 1.5] and all(c[1] == 2.0 for c in calls)
    torch.testing.assert_close(torch.tensor([c[2] for c in calls]),
                               torch.tensor([2.0 * 0.01 ** (e / 2.0) for e in (0.0, 0.5, 1.0, 1.5)]))
    assert st["hard_from_iter"] == 4 and st["iters"] == 8
    k = {"conv1": acosp_k(12, 0.5, 4), "conv2": acosp_k(10, 0.5, 4)}
    assert k == {"conv1": 6, "conv2": 5}
    for u, bn in (("conv1", m.bn1), ("conv2", m.bn2)):
        mask = cap["masks"][u]
        assert int(mask.sum()) == k[u] and torch.equal(mask, hard_topk_mask(meth.logits[u], k[u]))
        alive = (bn.weight.detach() != 0) | (bn.bias.detach() != 0)
        assert torch.equal(alive, mask.bool())                       # folded: the other channels are exactly 0
    assert not any(mod._forward_hooks for mod in m.modules())      # hooks removed
    # select keeps exactly the hard-mask channels, with the logits and, after a resume, from the model alone
    kept = meth.select(m, UNITS, 0.5, "ind", 1)
    fresh = build_method({**_CFG, "options": opts}).select(m, UNITS, 0.5, "ind", 1)
    for u in ("conv1", "conv2"):
        assert kept[u].tolist() == cap["masks"][u].nonzero().flatten().tolist() == fresh[u].tolist()
    # min_keep applies at selection too
    assert build_method({**_CFG, "options": {**opts, "min_keep": 8}}).select(m, UNITS, 0.5, "ind", 1)["conv2"].numel() == 8
    # another keep ratio: warned, count follows acosp_k, extra channels ranked by logits
    with pytest.warns(UserWarning, match="differs from the training keep ratio"):
        more = meth.select(m, UNITS, 0.75, "ind", 1)
    assert more["conv1"].numel() == 9 and set(kept["conv1"].tolist()) <= set(more["conv1"].tolist())


def test_logits_learn_while_soft_and_freeze_once_hard(monkeypatch):
    _, meth_soft, _, _, _ = _train(monkeypatch, {"keep_ratio": 0.5, "min_keep": 1, "end_epoch_frac": 1.0, "lr_logits": 1.0})
    torch.manual_seed(0)
    Toy()
    init = torch.randn(12)                                    # the logits' initial draw (after the model's)
    assert not torch.allclose(meth_soft.logits["conv1"], init)
    _, meth_hard, st, _, calls = _train(monkeypatch, {"keep_ratio": 0.5, "min_keep": 1, "end_epoch_frac": 0.01, "lr_logits": 1.0})
    assert st["hard_from_iter"] == 1 and len(calls) == 1     # only iteration 0 is soft
    # hard masks carry no gradient to the logits: only the first (soft) step moved them
    torch.manual_seed(0)
    Toy()
    init = torch.randn(12)
    moved = (meth_hard.logits["conv1"] - init).abs()
    assert float(moved.max()) > 0
    _, meth_once, _, _, _ = _train(monkeypatch, {"keep_ratio": 0.5, "min_keep": 1, "end_epoch_frac": 0.01, "lr_logits": 1.0},
                                   epochs=1, n_it=1)
    torch.testing.assert_close(meth_hard.logits["conv1"], meth_once.logits["conv1"])


@pytest.mark.parametrize("train_mode", [False, True])
def test_fold_gives_the_masked_model_output(monkeypatch, train_mode):
    opts = {"keep_ratio": 0.5, "min_keep": 2, "end_epoch_frac": 0.5}
    m, _, _, cap, _ = _train(monkeypatch, opts)
    masked = cap["model"]                     # the trained model before folding ...
    handles = []
    for u in UNITS:                           # ... with the hard masks applied by hooks
        for b in u.bns:
            mk = cap["masks"][u.name].view(1, -1, 1, 1)
            handles.append(dict(masked.named_modules())[b].register_forward_hook(lambda mod, i, o, mk=mk: o * mk))
    x = torch.randn(2, 3, 8, 8)
    m.train(train_mode)
    masked.train(train_mode)
    assert torch.equal(m(x), masked(x))
    for h in handles:
        h.remove()
    assert not torch.equal(m(x), masked(x))   # the fold did change the raw weights


def test_options_are_checked():
    assert check_options("acosp", {"keep_ratio": 0.25, "min_keep": 1, "tau_start": 2, "tau_end": 0.1,
                                   "end_epoch_frac": 1, "lr_logits": 0.1}) == []
    bad = check_options("acosp", {"keep_ratio": 1.0, "min_keep": 0, "tau_start": 1.0, "tau_end": 2.0,
                                  "end_epoch_frac": 0.0, "lr_logits": -1, "sparsity": 0.5})
    assert len(bad) == 6
    assert len(check_options("acosp", {"min_keep": True, "tau_start": 0})) == 2
    with pytest.raises(ValueError):
        ACoSP({"name": "acosp", "options": {"keep_ratio": 0}})
    meth = build_method({"name": "acosp"})
    assert meth.per_layer and meth.keep_ratio == 0.5 and meth.min_keep == 8 and meth.logits is None
    with pytest.raises(ValueError):
        meth.select(Toy(), UNITS, 1.0)


@pytest.mark.parametrize("coupled", [False, True])
def test_acosp_prunes_a_toy_deeplab_losslessly(coupled):
    torch.manual_seed(0)
    base = build_model({"name": "deeplabv3_resnet18", "width": 0.125, "aspp_channels": 16}, 3, 4)
    graph = build_graph(base, (32, 32))
    units = discover_units(base, graph, include_coupled=coupled)
    assert any(len(u.bns) > 1 for u in units) == coupled     # residual groups: one shared mask on several BNs
    meth = build_method({**_CFG, "epochs": 1, "max_iters_per_epoch": 2,
                         "options": {"keep_ratio": 0.5, "min_keep": 1, "end_epoch_frac": 0.5}})
    meth.train(base, units, _loader(n=4, k=3, size=32, bs=2), None, 255, StageLog("t", quiet=True))
    kept = meth.select(base, units, 0.5, "ind", 1)
    assert all(kept[u.name].numel() == math.ceil(0.5 * u.channels) for u in units)
    x = torch.randn(2, 3, 32, 32)
    before = base.eval()(x)
    prune_channels(base, units, kept, graph)
    assert base.classifier[1].in_channels == kept["classifier.0.project.0"].numel()
    torch.testing.assert_close(base.eval()(x), before, rtol=1e-4, atol=1e-5)   # masked channels were already zero


TINY = copy.deepcopy(_PIPELINE_TINY)
TINY["train"]["seg"]["epochs"] = 1


def test_acosp_through_the_pipeline(tmp_path):
    cfg = json.loads(json.dumps(TINY))
    cfg["method"].update({"name": "acosp", "options": {"keep_ratio": 0.5, "min_keep": 1, "end_epoch_frac": 0.5}})
    p = tmp_path / "acosp.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "acosp"
    assert main(["run", str(p), "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "acosp"
    assert m["pruned"]["params"] < 0.8 * m["baseline"]["params"]
    units = json.loads((out / "stages/04_prune/arch.json").read_text())["widths"]["units"]
    assert all(u["kept"] == acosp_k(u["channels"], 0.5, 1) for u in units.values())
    done = json.loads((out / "stages/03_sparsity/done.json").read_text())
    assert done["hard_from_iter"] == 2 and done["iters"] == 4
