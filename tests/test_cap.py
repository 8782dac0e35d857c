"""CAP (Context-Aware Pruning): guiding module, guided ℓ1 step, end-to-end pruning, pipeline."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from conftest import TINY as _PIPELINE_TINY  # the shared tiny synthetic setting
from segprune.cli import main
from segprune.engine.log import StageLog
from segprune.engine.train import make_loader
from segprune.methods import build_method
from segprune.methods.base import check_options
from segprune.methods.cap import (CAP, ContextGuide, channel_affinity, context_importance,
                                  guidance_from_importance)
from segprune.models import build_model
from segprune.pruning import build_graph, discover_units, prune_channels
from segprune.pruning.groups import PruneUnit


class Toy(nn.Module):
    """conv1(3->4)-bn1-relu -> conv2(4->4)-bn2-relu -> conv3(4->3): units conv1 (backbone), conv2 (decoder)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 3, 1)
        self.parts = {"backbone": "conv1", "decoder": "conv"}
        self.never_prune = ("conv3",)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.conv3(F.relu(self.bn2(self.conv2(x))))


UNITS = [PruneUnit("conv1", "backbone", ["conv1"], ["bn1"], 4), PruneUnit("conv2", "decoder", ["conv2"], ["bn2"], 4)]
_CFG = {"name": "cap", "epochs": 1, "lr_seg": 0.1, "momentum": 0.0, "weight_decay": 0.0, "max_iters_per_epoch": 1}


def _loader(n=4, k=3, size=8, bs=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, k, (n, size, size), generator=g))
    return make_loader(ds, bs, False, 0)


def _manual_guidance(y: torch.Tensor, guide_max: float) -> torch.Tensor:
    """Documented CAGM with explicit loops, float64: S = F Fᵀ/HW, row softmax, column mean, C·mean, min(1/r, max)."""
    y = y.double()
    n, c, h, w = y.shape
    recv = torch.zeros(c, dtype=torch.float64)
    for b in range(n):
        f = y[b].reshape(c, h * w)
        for i in range(c):
            s = [float((f[i] * f[j]).sum()) / (h * w) for j in range(c)]
            e = torch.exp(torch.tensor(s, dtype=torch.float64))
            recv += e / e.sum()
    r = c * recv / (n * c)
    return (1.0 / r).clamp(max=guide_max)


def test_affinity_importance_guidance_match_a_hand_computation():
    y = torch.tensor([[[[1.0, 2.0], [0.0, -1.0]], [[1.0, 2.0], [0.0, -1.0]], [[-1.0, 0.0], [1.0, 0.0]]]])  # (1,3,2,2)
    # S = F Fᵀ / 4: channels 0 and 1 identical (S=1.5), channel 2 (S22=0.5, S02=-0.25)
    S = torch.tensor([[1.5, 1.5, -0.25], [1.5, 1.5, -0.25], [-0.25, -0.25, 0.5]])
    A = torch.softmax(S, dim=1)
    torch.testing.assert_close(channel_affinity(y)[0], A)
    r = 3 * A.mean(0)
    torch.testing.assert_close(context_importance(y), r)
    assert r[2] < r[0] == r[1] and abs(float(r.sum()) - 3.0) < 1e-6  # the odd channel receives the least attention
    g = guidance_from_importance(r)
    torch.testing.assert_close(g, 1 / r)
    assert int(torch.argmax(g)) == 2 and g[2] > 1 > g[0] and float(g.mean()) >= 1.0   # Jensen: mean(1/r) >= 1
    # the clip: a tiny importance would give a huge multiplier
    torch.testing.assert_close(guidance_from_importance(torch.tensor([1.0, 2.0, 1e-6]), 4.0), torch.tensor([1.0, 0.5, 4.0]))
    torch.manual_seed(1)
    yr = torch.randn(3, 5, 3, 4)
    torch.testing.assert_close(guidance_from_importance(context_importance(yr.double()), 2.5), _manual_guidance(yr, 2.5))
    with pytest.raises(ValueError):
        channel_affinity(torch.randn(3, 4))


def test_guide_leaves_forward_and_segmentation_gradient_bitwise_unchanged():
    torch.manual_seed(0)
    a = Toy()
    b = copy.deepcopy(a)
    guide = ContextGuide(a, ["bn1", "bn2"])
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    oa, ob = a(x), b(x)
    assert torch.equal(oa, ob)
    F.cross_entropy(oa, y).backward()
    F.cross_entropy(ob, y).backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa.grad, pb.grad), n
    guide.step()
    assert set(guide.running) == {"bn1", "bn2"}
    guide.remove()
    assert not a.bn1._forward_hooks and not a.bn2._forward_hooks


def test_guide_ema_over_iterations():
    torch.manual_seed(0)
    m = Toy()
    guide = ContextGuide(m, ["bn1"], ema=0.75)
    outs = []
    m.bn1.register_forward_hook(lambda mod, i, o: outs.append(o.detach().clone()))
    x1, x2 = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    m(x1)
    guide.step()
    r1 = context_importance(outs[0])
    torch.testing.assert_close(guide.running["bn1"], r1)                      # first step: taken as is
    m(x2)
    guide.step()
    r2 = context_importance(outs[1])
    torch.testing.assert_close(guide.running["bn1"], 0.75 * r1 + 0.25 * r2)   # then R ← ema R + (1-ema) r
    torch.testing.assert_close(guide.guidance("bn1"), guidance_from_importance(0.75 * r1 + 0.25 * r2, 4.0))
    assert guide.guidance("bn2") is None


def _one_step(alpha, guide="all", l1_mode="subgradient"):
    torch.manual_seed(0)
    m = Toy()
    with torch.no_grad():
        m.bn1.weight.copy_(torch.tensor([0.5, -0.4, 0.3, 0.8]))
    g0 = {"bn1": m.bn1.weight.detach().clone(), "bn2": m.bn2.weight.detach().clone()}
    feats = {}
    for name in ("bn1", "bn2"):   # the post-BN maps of the (single) forward pass
        getattr(m, name).register_forward_hook(lambda mod, i, o, name=name: feats.setdefault(name, o.detach().clone()))
    meth = build_method({**_CFG, "alpha": alpha, "l1_mode": l1_mode, "options": {"guide": guide}})
    meth.train(m, UNITS, _loader(), None, 255, StageLog("t", quiet=True))
    return m, g0, feats, meth


def test_guided_subgradient_matches_manual_cagm():
    m0, g0, feats, _ = _one_step(0.0)                 # plain SGD step: γ - lr ∇γ l_seg
    m, _, feats2, meth = _one_step(0.5)
    for name in ("bn1", "bn2"):
        torch.testing.assert_close(feats[name], feats2[name])
        g = _manual_guidance(feats[name], 4.0).float()
        torch.testing.assert_close(meth.last_guidance[name], g, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(g, torch.ones(4), atol=1e-3)  # the guidance really is non-uniform here
        want = getattr(m0, name).weight.detach() - 0.1 * 0.5 * g * torch.sign(g0[name])
        torch.testing.assert_close(getattr(m, name).weight.detach(), want, rtol=1e-5, atol=1e-6)
    # guide: decoder -> the backbone unit gets the plain ℓ1 sub-gradient (g = 1)
    md, _, _, meth_d = _one_step(0.5, guide="decoder")
    torch.testing.assert_close(md.bn1.weight.detach(), m0.bn1.weight.detach() - 0.05 * torch.sign(g0["bn1"]))
    torch.testing.assert_close(md.bn2.weight.detach(), m.bn2.weight.detach())
    assert set(meth_d.last_guidance) == {"bn2"}


def test_guided_proximal_thresholds_per_channel():
    m0, g0, feats, _ = _one_step(0.0, l1_mode="proximal")
    m, _, _, _ = _one_step(0.5, l1_mode="proximal")
    g = _manual_guidance(feats["bn1"], 4.0).float()
    p = m0.bn1.weight.detach()
    torch.testing.assert_close(m.bn1.weight.detach(), torch.sign(p) * torch.clamp(p.abs() - 0.1 * 0.5 * g, min=0),
                               rtol=1e-5, atol=1e-6)


def test_cap_drives_the_least_contextual_channel_down_fastest():
    torch.manual_seed(0)
    base = Toy()
    with torch.no_grad():  # channels 0, 2, 3 of conv1 are near-copies (strong mutual affinity); channel 1 is not
        w = torch.randn(3, 3, 3)
        for c in (0, 2, 3):
            base.conv1.weight[c] = w + 0.05 * torch.randn(3, 3, 3)
        base.conv1.weight[1] = torch.randn(3, 3, 3)
    res = {}
    for name in ("cap", "slimming"):
        m = copy.deepcopy(base)
        meth = build_method({"name": name, "epochs": 3, "lr_seg": 0.05, "momentum": 0.0, "weight_decay": 0.0, "alpha": 1.0})
        meth.train(m, UNITS, _loader(n=8, bs=4), None, 255, StageLog("t", quiet=True))
        res[name] = (m.bn1.weight.detach().clone(), getattr(meth, "last_guidance", None))
    gam, guid = res["cap"]
    assert int(torch.argmax(guid["bn1"])) == 1                 # the guidance marks channel 1 as least important
    assert int(torch.argmin(gam)) == 1                         # ... and its γ went down fastest
    others = gam[[0, 2, 3]]
    assert float(others.min() - gam[1]) > 0.03
    # unguided Network Slimming on the same model and data barely separates them
    slim = res["slimming"][0]
    assert float(slim.max() - slim.min()) < 0.01


def test_options_are_checked():
    assert check_options("cap", {"guide": "decoder", "ema": 0.5, "guide_max": 2}) == []
    bad = check_options("cap", {"guide": "aspp", "ema": 1.0, "guide_max": 0.5, "tau": 1})
    assert len(bad) == 4 and any("tau" in b for b in bad)
    with pytest.raises(ValueError):
        CAP({"name": "cap", "options": {"ema": -0.1}})
    with pytest.raises(ValueError):
        CAP({"name": "cap", "l1_mode": "lasso"})
    meth = build_method({"name": "cap"})
    assert isinstance(meth, CAP) and not meth.per_layer and meth.options["guide"] == "all"


def test_cap_prunes_a_toy_deeplab():
    torch.manual_seed(0)
    base = build_model({"name": "deeplabv3_resnet18", "width": 0.125, "aspp_channels": 16}, 3, 4)
    graph = build_graph(base, (32, 32))
    units = discover_units(base, graph)
    meth = build_method({**_CFG, "alpha": 0.5, "lr_seg": 0.05, "max_iters_per_epoch": 2})
    meth.train(base, units, _loader(n=4, k=3, size=32, bs=2), None, 255, StageLog("t", quiet=True))
    n_bns = len({b for u in units for b in u.bns})
    assert len(meth.last_guidance) == n_bns                    # one guiding module per prunable BN
    assert not any(m._forward_hooks for m in base.modules())   # hooks removed after training
    kept = meth.select(base, units, 0.5, "ind", 1)
    assert set(kept) == {u.name for u in units}
    for part in ("backbone", "decoder"):                       # Ind: half of each part's channels
        tot = sum(u.channels for u in units if u.part == part)
        assert sum(kept[u.name].numel() for u in units if u.part == part) in (tot // 2, (tot + 1) // 2)
    prune_channels(base, units, kept, graph)
    assert base.classifier[1].in_channels == kept["classifier.0.project.0"].numel()
    assert base.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)


TINY = copy.deepcopy(_PIPELINE_TINY)
TINY["train"]["seg"]["epochs"] = 1


def test_cap_through_the_pipeline(tmp_path):
    cfg = json.loads(json.dumps(TINY))
    cfg["method"].update({"name": "cap", "alpha": 0.01, "options": {"guide": "decoder", "ema": 0.5}})
    p = tmp_path / "cap.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "cap"
    assert main(["run", str(p), "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "cap"
    assert m["pruned"]["params"] < 0.8 * m["baseline"]["params"]
    for part, (kept, tot) in m["kept_per_part"].items():     # Ind thresholds: half of each part
        assert kept in (tot // 2, (tot + 1) // 2), part
    assert "guiding modules (decoder)" in (out / "logs" / "sparsity.log").read_text()
    bad = json.loads(json.dumps(cfg))
    bad["method"]["options"] = {"guide": "everywhere"}
    p.write_text(yaml.safe_dump(bad))
    assert main(["run", str(p), "--out", str(tmp_path / "bad"), "--quiet"]) != 0
