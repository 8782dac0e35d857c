"""Baseline criteria (Uniform, Network Slimming, ThiNet, FPGM) on hand-checkable toy cases."""
import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from segprune.engine.log import StageLog
from segprune.methods import METHODS, build_method, per_layer_select
from segprune.methods.fpgm import FPGM, fpgm_scores
from segprune.methods.slimming import Slimming
from segprune.methods.thinet import (channel_contributions, consumer_slices, thinet_greedy,
                                     thinet_objective)
from segprune.methods.uniform import Uniform, filter_l1_norms, reinitialize_
from segprune.models import build_model
from segprune.pruning import build_graph, discover_units, prune_channels
from segprune.pruning.groups import PruneUnit


class Toy(nn.Module):
    """conv1(3->4)-bn1-relu -> conv2(4->4)-bn2-relu -> conv3(4->K, never pruned): units conv1, conv2."""

    def __init__(self, k: int = 3, k2: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, k2, padding=k2 // 2, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, k, 1)
        self.parts = {"backbone": "conv1", "decoder": "conv"}
        self.never_prune = ("conv3",)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.conv3(F.relu(self.bn2(self.conv2(x))))


def _toy_units(m):
    return discover_units(m, build_graph(m, (8, 8)))


def _loader(n=4, k=3, size=8, bs=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, k, (n, size, size), generator=g))
    return DataLoader(ds, batch_size=bs, shuffle=False)


def test_toy_units():
    units = _toy_units(Toy())
    assert [(u.name, u.bns, u.part) for u in units] == [("conv1", ["bn1"], "backbone"), ("conv2", ["bn2"], "decoder")]


# ---- per-layer selection ---------------------------------------------------------------------
def test_per_layer_select_keeps_round_p_c_and_min_channels():
    torch.manual_seed(0)
    scores = {"a": torch.randn(16), "b": torch.randn(8), "c": torch.randn(5), "d": torch.randn(3), "e": torch.randn(1)}
    kept = per_layer_select(scores, 0.75, 1)
    assert {n: k.numel() for n, k in kept.items()} == {"a": 12, "b": 6, "c": 4, "d": 2, "e": 1}
    for n, k in kept.items():  # the kept ones are the top-scoring ones, sorted
        assert torch.equal(k, torch.sort(torch.topk(scores[n], k.numel()).indices).values)
    kept = per_layer_select(scores, 0.25, 3)
    assert {n: k.numel() for n, k in kept.items()} == {"a": 4, "b": 3, "c": 3, "d": 3, "e": 1}
    s = {"x": torch.tensor([0.5, 3.0, 1.0, 2.0, 0.1, 2.5])}
    assert per_layer_select(s, 0.5)["x"].tolist() == [1, 3, 5]
    with pytest.raises(ValueError):
        per_layer_select(s, 1.0)
    with pytest.raises(ValueError):
        per_layer_select(s, 0.5, 0)


# ---- Uniform ------------------------------------------------------------------------------------
def test_uniform_keeps_largest_l1_filters_in_every_unit():
    m = Toy()
    with torch.no_grad():
        m.conv1.weight.zero_()
        for i, n in enumerate([3.0, 1.0, 4.0, 2.0]):          # ℓ1 norms, mixed signs
            m.conv1.weight[i, 0, 0, 0] = n / 2
            m.conv1.weight[i, 1, 1, 1] = -n / 2
        m.conv2.weight.copy_(torch.tensor([0.2, 0.9, 0.1, 0.5]).view(4, 1, 1, 1).expand(4, 4, 3, 3)
                             * torch.sign(torch.randn(4, 4, 3, 3)))
    units = [PruneUnit("conv1", "backbone", ["conv1"], ["bn1"], 4), PruneUnit("conv2", "decoder", ["conv2"], ["bn2"], 4)]
    meth = build_method({"name": "uniform"})
    assert isinstance(meth, Uniform) and meth.per_layer and meth.from_scratch is False
    sc = meth.scores(m, units)
    torch.testing.assert_close(sc["conv1"], torch.tensor([3.0, 1.0, 4.0, 2.0]))
    torch.testing.assert_close(sc["conv2"], torch.tensor([0.2, 0.9, 0.1, 0.5]) * 36)
    kept = meth.select(m, units, 0.5, "uni", 1)
    assert kept["conv1"].tolist() == [0, 2] and kept["conv2"].tolist() == [1, 3]
    torch.testing.assert_close(filter_l1_norms(m.conv1), sc["conv1"])
    with pytest.raises(ValueError):
        Uniform({"name": "uniform", "from_scratch": "yes"})


def test_reinitialize_resets_conv_and_bn():
    m = Toy()
    with torch.no_grad():
        m.bn1.weight.fill_(0.3)
        m.bn1.bias.fill_(2.0)
        m.bn1.running_mean.fill_(5.0)
        m.conv1.weight.fill_(7.0)
        m.conv3.bias.fill_(1.0)
    reinitialize_(m)
    assert torch.all(m.bn1.weight == 1) and torch.all(m.bn1.bias == 0) and torch.all(m.bn1.running_mean == 0)
    assert not torch.any(m.conv1.weight == 7.0) and torch.all(m.conv3.bias == 0)
    std = math.sqrt(2.0 / (4 * 9))                              # kaiming fan_out for conv1 (4 out, 3x3)
    assert 0.3 * std < float(m.conv1.weight.detach().std()) < 3 * std


# ---- Network Slimming ---------------------------------------------------------------------------
_SL = {"name": "slimming", "epochs": 1, "lr_seg": 0.1, "momentum": 0.0, "weight_decay": 0.0, "max_iters_per_epoch": 1}


def _slim_after_one_step(**over):
    torch.manual_seed(0)
    m = Toy()
    with torch.no_grad():
        m.bn1.weight.copy_(torch.tensor([0.5, -0.02, 0.3, 0.01]))
    units = _toy_units(m)
    meth = build_method({**_SL, **over})
    meth.train(m, units, _loader(), None, 255, StageLog("t", quiet=True))
    return m, units, meth


def test_slimming_proximal_step_soft_thresholds_gamma():
    m0, _, _ = _slim_after_one_step(alpha=0.0)                 # plain SGD step: γ0 = γ - lr ∇γ
    g0 = m0.bn1.weight.detach()
    m, units, meth = _slim_after_one_step(alpha=0.3)           # threshold lr·α = 0.03
    expect = torch.sign(g0) * torch.clamp(g0.abs() - 0.03, min=0)
    torch.testing.assert_close(m.bn1.weight.detach(), expect)
    assert float(m.bn1.weight.detach().abs().sum()) < float(g0.abs().sum())
    assert int((m.bn1.weight == 0).sum()) >= 2                 # the two small γ hit exactly 0
    mb, _, _ = _slim_after_one_step(alpha=100.0)               # huge α: every penalised γ is exactly 0
    assert torch.all(mb.bn1.weight == 0) and torch.all(mb.bn2.weight == 0)
    assert not torch.all(mb.conv3.bias == 0)                   # layers outside the units are not penalised
    # scores are |γ|
    sc = meth.scores(m, units)
    torch.testing.assert_close(sc["conv1"], m.bn1.weight.detach().abs())
    torch.testing.assert_close(sc["conv2"], m.bn2.weight.detach().abs())


def test_slimming_subgradient_step():
    m0, _, _ = _slim_after_one_step(alpha=0.0, l1_mode="subgradient")
    m, _, _ = _slim_after_one_step(alpha=0.3, l1_mode="subgradient")
    gamma_init = torch.tensor([0.5, -0.02, 0.3, 0.01])
    torch.testing.assert_close(m.bn1.weight.detach(), m0.bn1.weight.detach() - 0.1 * 0.3 * torch.sign(gamma_init))
    with pytest.raises(ValueError):
        Slimming({"name": "slimming", "l1_mode": "lasso"})


def test_slimming_uses_global_thresholds():
    m = Toy()
    with torch.no_grad():
        m.bn1.weight.copy_(torch.tensor([1.0, 2.0, 3.0, -4.0]))
        m.bn2.weight.copy_(torch.tensor([0.1, -0.2, 0.3, 5.0]))
    units = _toy_units(m)
    meth = build_method({"name": "slimming"})
    assert not meth.per_layer
    kept = meth.select(m, units, 0.5, "uni", 1)                # prune the 4 smallest |γ| overall
    assert kept["conv1"].tolist() == [1, 2, 3] and kept["conv2"].tolist() == [3]
    kept = meth.select(m, units, 0.5, "ind", 1)                # one threshold per part (one unit each here)
    assert kept["conv1"].tolist() == [2, 3] and kept["conv2"].tolist() == [2, 3]


# ---- ThiNet -------------------------------------------------------------------------------------
def test_channel_contributions_sum_to_the_consumer_output():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 6, 3, stride=2, padding=2, dilation=2, bias=True)
    x = torch.randn(2, 5, 9, 9)
    y = conv(x) - conv.bias.view(1, -1, 1, 1)
    S = 7
    xh = channel_contributions(x, conv, torch.arange(5), S, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)                       # redraw the same samples
    L = y.shape[-2] * y.shape[-1]
    loc = torch.randint(0, L, (2, S), generator=g)
    och = torch.randint(0, 6, (2, S), generator=g)
    want = torch.stack([y[n].flatten(1)[och[n], loc[n]] for n in range(2)]).flatten()
    torch.testing.assert_close(xh.sum(1), want.detach(), rtol=1e-5, atol=1e-5)   # Eq. 3: ŷ = Σ_c x̂_c
    # a slice of input channels gives the matching columns, in the slice's order
    xs = channel_contributions(x, conv, torch.tensor([4, 1]), S, torch.Generator().manual_seed(3))
    torch.testing.assert_close(xs, xh[:, [4, 1]])


def test_thinet_greedy_matches_brute_force():
    torch.manual_seed(1)
    xh = torch.randn(30, 6) + 0.3 * torch.randn(1, 6)
    order = thinet_greedy(xh.T.double() @ xh.double(), 6).tolist()
    removed = []
    for j in order:                                            # each step = brute-force argmin of Eq. 5
        cand = [c for c in range(6) if c not in removed]
        objs = [thinet_objective(xh, removed + [c]) for c in cand]
        assert cand[min(range(len(cand)), key=objs.__getitem__)] == j
        removed.append(j)
    # uncorrelated contributions (orthogonal columns): greedy is the optimal subset of every size
    q, _ = torch.linalg.qr(torch.randn(30, 6, dtype=torch.float64))
    xo = q * torch.tensor([3.0, 0.5, 2.0, 0.1, 1.0, 4.0], dtype=torch.float64)
    for size in range(1, 6):
        greedy = thinet_greedy(xo.T @ xo, size).tolist()
        best = min(itertools.combinations(range(6), size), key=lambda t: thinet_objective(xo, t))
        assert sorted(greedy) == sorted(best)
        assert thinet_objective(xo, greedy) == pytest.approx(thinet_objective(xo, best))


def _thinet_toy():
    torch.manual_seed(0)
    m = Toy(k2=3)
    with torch.no_grad():
        m.bn1.bias.fill_(3.0)                                  # post-ReLU activations > 0
        m.conv1.weight.mul_(0.1)
        w = torch.randn(4, 4, 3, 3) * 0.5
        w[:, 1] = 0.0                                          # channel 1 of conv1 is unused by conv2
        w[:, 3] *= 20.0                                        # channel 3 dominates conv2's output
        m.conv2.weight.copy_(w)
    m.eval()
    return m


def test_thinet_removes_the_useless_channel_first_and_keeps_the_dominant_one():
    m = _thinet_toy()
    units = _toy_units(m)
    meth = build_method({"name": "thinet", "calib_batches": 2, "samples_per_batch": 16}, input_size=(8, 8))
    assert meth.per_layer
    sl = consumer_slices(m, units, input_size=(8, 8))
    assert [(c, i.tolist()) for c, i in sl["conv1"]] == [("conv2", [0, 1, 2, 3])]
    sc = meth.scores(m, units, _loader())
    assert sorted(sc["conv1"].tolist()) == [0.0, 1.0, 2.0, 3.0]
    assert sc["conv1"][1] == 0 and sc["conv1"][3] == 3         # removed first / removed last
    kept = meth.select(m, units, 0.75, "ind", 1, calib_loader=_loader())
    assert kept["conv1"].tolist() == [0, 2, 3]
    kept = meth.select(m, units, 0.25, "ind", 1, calib_loader=_loader())
    assert kept["conv1"].tolist() == [3]
    # select() agrees with the complete removal order returned by scores()
    for p in (0.25, 0.5, 0.75):
        assert torch.equal(meth.select(m, units, p, "ind", 1, _loader())["conv2"],
                           per_layer_select(sc, p, 1)["conv2"])
    assert m.training is False and not m.conv2._forward_pre_hooks  # mode restored, hooks removed
    with pytest.raises(ValueError):
        meth.scores(m, units, None)


# ---- FPGM ---------------------------------------------------------------------------------------
def test_fpgm_prunes_the_geometric_median_first():
    r3 = math.sqrt(3.0)
    pts = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-0.5, r3 / 2], [-0.5, -r3 / 2]]) + 5.0  # a, m, b, c
    # m is the geometric median of {a, m, b, c} (Fermat point of the equilateral triangle)
    cost = lambda z: float((pts - z).norm(dim=1).sum())
    assert all(cost(pts[1]) < cost(pts[1] + 1e-2 * d) for d in torch.randn(20, 2))
    m = Toy()
    with torch.no_grad():
        m.conv1.weight.zero_()
        m.conv1.weight[:, :2, 1, 1] = pts
    units = [PruneUnit("conv1", "backbone", ["conv1"], ["bn1"], 4)]
    meth = build_method({"name": "fpgm"})
    assert isinstance(meth, FPGM) and meth.per_layer
    sc = meth.scores(m, units)["conv1"]
    torch.testing.assert_close(sc, torch.tensor([1 + 2 * r3, 3.0, 1 + 2 * r3, 1 + 2 * r3]))
    assert meth.select(m, units, 0.75, "ind", 1)["conv1"].tolist() == [0, 2, 3]
    # the ℓ1-norm criterion would have pruned c (index 3) instead
    assert int(torch.argmin(filter_l1_norms(m.conv1))) == 3
    torch.testing.assert_close(fpgm_scores(pts), sc.double())


# ---- registry and an end-to-end prune on a toy DeepLabv3 ---------------------------------------
def test_build_method_unknown_name():
    from segprune.config import METHOD_NAMES
    with pytest.raises(ValueError, match="known: .*thinet, uniform"):
        build_method({"name": "mtp2"})
    assert {"fpgm", "slimming", "thinet", "uniform"} <= set(METHODS)
    assert set(METHODS) <= set(METHOD_NAMES)  # every registered method can be named in a config
    with pytest.raises(ValueError):
        build_method({})


def test_all_methods_prune_a_toy_deeplab():
    torch.manual_seed(0)
    base = build_model({"name": "deeplabv3_resnet18", "width": 0.125, "aspp_channels": 16}, 3, 4)
    graph = build_graph(base, (32, 32))
    units = discover_units(base, graph)
    sl = dict(consumer_slices(base, units, graph))
    assert [(c, i.tolist()) for c, i in sl["classifier.0.convs.1.0"]] == [("classifier.0.project.0", list(range(16, 32)))]
    calib = _loader(n=2, k=3, size=32, bs=2)
    x = torch.randn(1, 3, 32, 32)
    for name in ("uniform", "slimming", "thinet", "fpgm"):
        m = copy.deepcopy(base)
        meth = build_method({"name": name, "samples_per_batch": 8}, input_size=(32, 32))
        kept = meth.select(m, units, 0.5, "ind", 1, calib_loader=calib)
        assert set(kept) == {u.name for u in units}
        if meth.per_layer:
            assert all(kept[u.name].numel() == round(0.5 * u.channels) for u in units)
        prune_channels(m, units, kept, input_size=(32, 32))
        assert m.classifier[1].in_channels == kept["classifier.0.project.0"].numel()
        assert m.eval()(x).shape == (1, 3, 32, 32)


def test_uniform_after_prune_reinitialises_only_from_scratch():
    import torch
    from segprune.methods.uniform import Uniform
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with torch.no_grad():
        net[1].weight.fill_(0.3)
    Uniform({"name": "uniform", "from_scratch": False}).after_prune(net)
    assert torch.all(net[1].weight == 0.3)
    Uniform({"name": "uniform", "from_scratch": True}).after_prune(net)
    assert torch.all(net[1].weight == 1.0)
