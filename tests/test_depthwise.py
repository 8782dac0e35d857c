"""Depthwise / inverted-residual units (segprune.pruning.groups) on hand-built MobileNetV2/V3-style
networks: no torchvision needed, so these run on every torch the project supports."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from segprune.api import prune_model
from segprune.methods.thinet import consumer_slices
from segprune.pruning import build_graph, discover_units, prune_channels, unit_gammas
from segprune.pruning.groups import is_depthwise, parts_without_units, skipped_groups

K, K_CLS, S = 3, 4, 32


class SE(nn.Module):
    """Squeeze-excitation: x * gate(fc2(act(fc1(avgpool(x))))), as torchvision's SqueezeExcitation."""

    def __init__(self, c: int, gate):
        super().__init__()
        self.fc1 = nn.Conv2d(c, max(4, c // 4), 1)
        self.fc2 = nn.Conv2d(max(4, c // 4), c, 1)
        self.gate = gate

    def forward(self, x):
        return x * self.gate(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class InvertedResidual(nn.Module):
    """[expand 1x1 + BN + act] (if t > 1), depthwise 3x3 + BN + act, [SE], project 1x1 + BN, [+ x]."""

    def __init__(self, cin: int, cout: int, t: int, stride: int, v3: bool, se: bool):
        super().__init__()
        hidden = cin * t
        act = nn.Hardswish if v3 else nn.ReLU6
        layers = []
        if t != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), act()]
        if se:
            layers.append(SE(hidden, nn.Hardsigmoid() if v3 else nn.Sigmoid()))
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class MobileSeg(nn.Module):
    """enc: stem (16) -> IR t=1 16->16 (residual) -> IR t=4 16->24 s2 -> IR t=4 24->24 (residual);
    dec: 3x3 conv 24->16 + BN + ReLU; head: 1x1 -> K; enc_fc: ImageNet-style classifier."""

    def __init__(self, v3: bool = True, se: bool = True):
        super().__init__()
        act = nn.Hardswish if v3 else nn.ReLU6
        self.enc = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), act()),
            InvertedResidual(16, 16, 1, 1, v3, se),
            InvertedResidual(16, 24, 4, 2, v3, se),
            InvertedResidual(24, 24, 4, 1, v3, se))
        self.dec = nn.Sequential(nn.Conv2d(24, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Conv2d(16, K, 1)
        self.enc_fc = nn.Linear(24, K_CLS)

    def forward(self, x):
        y = self.head(self.dec(self.enc(x)))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


PARTS = {"backbone": "enc.", "decoder": "dec."}


def _net(v3=True, se=True, seed=0):
    torch.manual_seed(seed)
    m = MobileSeg(v3, se)
    for mod in m.modules():  # non-trivial BN statistics and affine parameters
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.2, 1.5)
            mod.bias.data.uniform_(-0.3, 0.3)
    m.parts, m.never_prune = PARTS, ("head",)
    return m


def _units(m, include_coupled=False):
    return discover_units(m, build_graph(m, (S, S)), include_coupled)


@pytest.mark.parametrize("v3,se", [(False, False), (True, True)])
def test_inverted_residual_expansions_are_depthwise_units(v3, se):
    m = _net(v3, se)
    units = {u.name: u for u in _units(m)}
    chains = {n: u for n, u in units.items() if u.extra["kind"] == "depthwise"}
    # the expansion convolutions are the roots; the depthwise conv (and SE gate) ride along
    assert set(chains) == {"enc.2.block.0", "enc.3.block.0"}
    for name, u in chains.items():
        blk = name[:-1]
        assert u.convs[0] == name and not u.coupled and u.channels == m.get_submodule(name).out_channels
        assert u.extra["depthwise"] == [blk + "3"] and is_depthwise(m.get_submodule(blk + "3"))
        assert sorted(u.bns) == [blk + "1", blk + "4"]
        assert u.extra["gates"] == ([blk + "6.fc2"] if se else [])
        assert sorted(u.convs) == sorted([name, blk + "3"] + ([blk + "6.fc2"] if se else []))
        assert u.part == "backbone"
    assert units["dec.0"].extra["kind"] == "plain" and units["dec.0"].part == "decoder"
    # residual streams stay coupled: stem + the t=1 block's depthwise + its projection (joined by the add),
    # and the projections of blocks 2 and 3 (block 3 adds its input, the output of block 2)
    proj = "7" if se else "6"
    assert not {"enc.0.0", "enc.1.block.0", f"enc.2.block.{proj}", f"enc.3.block.{proj}"} & set(units)
    coupled = {u.name: u for u in _units(m, include_coupled=True) if u.coupled}
    assert len(coupled) == 2 and "enc.0.0" in coupled
    assert {f"enc.2.block.{proj}", f"enc.3.block.{proj}"} == set(next(u for n, u in coupled.items()
                                                                     if n != "enc.0.0").convs)
    stem = coupled["enc.0.0"]
    assert stem.extra["kind"] == "coupled" and "enc.1.block.0" in stem.convs           # the t=1 block's depthwise
    assert ("enc.1.block.4" if se else "enc.1.block.3") in stem.convs                 # and its projection
    # skipped_groups says why
    reasons = {d["name"]: d["reason"] for d in skipped_groups(m, build_graph(m, (S, S)))}
    assert reasons["enc.0.0"].startswith("residual-coupled")


def test_chain_score_is_the_mean_abs_gamma_of_its_batchnorms():
    m = _net()
    u = next(u for u in _units(m) if u.name == "enc.2.block.0")
    g1, g2 = m.enc[2].block[1].weight.detach(), m.enc[2].block[4].weight.detach()
    with torch.no_grad():
        m.enc[2].block[4].weight[0] = -3.0
        g2 = m.enc[2].block[4].weight.detach()
    assert torch.allclose(unit_gammas(m, [u])[u.name], (g1.abs() + g2.abs()) / 2)


def _zeroed(m, units, kept):
    """Copy of m with γ = β = 0 on every dropped channel of every BN of the units."""
    z = copy.deepcopy(m)
    mods = dict(z.named_modules())
    with torch.no_grad():
        for u in units:
            drop = torch.tensor([i for i in range(u.channels) if i not in set(kept[u.name].tolist())])
            for b in u.bns:
                mods[b].weight[drop] = 0.0
                mods[b].bias[drop] = 0.0
    return z


@pytest.mark.parametrize("v3,se", [(False, False), (True, True), (True, False)])
def test_physical_pruning_equals_zeroing_the_channels(v3, se):
    """With γ = β = 0 a dropped channel is 0 after its BN (ReLU6/hardswish(0) = 0), stays 0 through the
    depthwise conv (no bias) and its BN, contributes nothing to the SE squeeze nor to the projection:
    removing it physically gives the same outputs."""
    m = _net(v3, se).eval()
    units = _units(m)
    g = torch.Generator().manual_seed(3)
    kept = {u.name: torch.sort(torch.randperm(u.channels, generator=g)[: u.channels // 2]).values for u in units}
    z = _zeroed(m, units, kept)
    p = copy.deepcopy(z)
    prune_channels(p, units, kept, build_graph(p, (S, S)))
    x = torch.randn(2, 3, S, S, generator=g)
    with torch.no_grad():
        ref, out = z(x), p(x)
    assert out.shape == ref.shape == (2, K, S, S)
    assert torch.allclose(out, ref, atol=1e-5)
    # the chain shrank consistently: expansion, BN, depthwise (groups too), BN, SE, projection input
    for name in ("enc.2.block.0", "enc.3.block.0"):
        blk = p.get_submodule(name[:-2])
        k = kept[name].numel()
        assert blk[0].out_channels == blk[1].num_features == k
        assert blk[3].in_channels == blk[3].out_channels == blk[3].groups == blk[4].num_features == k
        assert blk[-2].in_channels == k
        if se:
            assert blk[6].fc1.in_channels == blk[6].fc2.out_channels == k
    # not pruned: the residual stream and the classifier
    assert p.enc[0][0].out_channels == 16 and p.head.out_channels == K


def _loaders():
    g = torch.Generator().manual_seed(0)
    seg = TensorDataset(torch.randn(8, 3, S, S, generator=g), torch.randint(0, K, (8, S, S), generator=g))
    cls = TensorDataset(torch.randn(8, 3, S, S, generator=g), torch.randint(0, K_CLS, (8,), generator=g))
    return (DataLoader(seg, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1)),
            DataLoader(cls, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("method", ["uniform", "fpgm", "slimming", "thinet", "cap", "sirfp", "acosp", "mtp"])
def test_every_method_ranks_and_prunes_depthwise_units(method):
    m = _net()
    del m.parts, m.never_prune
    seg, cls = _loaders()
    cfg = {"epochs": 1, "max_iters_per_epoch": 2, "calib_batches": 1, "samples_per_batch": 8}
    res = prune_model(m, method, keep_ratio=0.5, parts=PARTS, never_prune=["head"], seg_loader=seg, cls_loader=cls,
                      cls_head="enc_fc", input_size=(S, S), num_classes=K, method_cfg=cfg, min_channels=2)
    units = res.report["units"]
    for name, c in (("enc.2.block.0", 64), ("enc.3.block.0", 96)):
        assert units[name]["channels"] == c and units[name]["kept"] < c, (name, units[name])
        blk = res.model.get_submodule(name[:-2])
        assert blk[3].groups == blk[3].out_channels == units[name]["kept"]
    assert res.report["flops"]["ratio"] < 0.8
    with torch.no_grad():
        assert res.model.eval()(torch.randn(2, 3, S, S)).shape == (2, K, S, S)


def test_thinet_reconstructs_the_projection_not_the_depthwise_conv():
    m = _net()
    units = [u for u in _units(m) if u.name == "enc.2.block.0"]
    consumers = dict(consumer_slices(m, units, input_size=(S, S))["enc.2.block.0"])
    assert set(consumers) == {"enc.2.block.6.fc1", "enc.2.block.7"}   # SE squeeze + projection, no depthwise
    assert torch.equal(consumers["enc.2.block.7"], torch.arange(64))


class Grouped(nn.Module):
    """conv a -> BN -> grouped conv g (groups=2, not depthwise) -> BN -> conv c -> BN -> conv ln ->
    GroupNorm without affine weights (no γ, like a LayerNorm) -> head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bna = nn.BatchNorm2d(8)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bng = nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 8, 1, bias=False)
        self.bnc = nn.BatchNorm2d(8)
        self.ln = nn.Conv2d(8, 8, 1)
        self.gn = nn.GroupNorm(1, 8, affine=False)
        self.head = nn.Conv2d(8, K, 1)

    def forward(self, x):
        x = F.relu(self.bng(self.g(F.relu(self.bna(self.a(x))))))
        return self.head(self.gn(self.ln(F.relu(self.bnc(self.c(x))))))


def test_grouped_convolutions_and_parts_without_batchnorm_are_explained():
    m = Grouped()
    m.parts, m.never_prune = {"backbone": ["a", "bna", "g", "bng", "c", "bnc"], "decoder": ["ln", "gn"]}, ("head",)
    graph = build_graph(m, (S, S))
    units = discover_units(m, graph)
    # the channels of `a` (read by) and of `g` (produced by the grouped conv) cannot lose arbitrary channels
    assert [u.name for u in units] == ["c"]
    reasons = {d["name"]: d["reason"] for d in skipped_groups(m, graph)}
    assert reasons["a"] == "reaches a grouped (non-depthwise) convolution (g)"
    assert reasons["g"] == "reaches a grouped (non-depthwise) convolution (g)"
    assert reasons["ln"].startswith("no BatchNorm")
    missing = parts_without_units(m, graph, units)
    assert list(missing) == ["decoder"] and "1 no BatchNorm" in missing["decoder"], missing
    prune_channels(m, units, {"c": torch.tensor([0, 2, 5])}, graph)
    assert m(torch.zeros(1, 3, S, S)).shape == (1, K, S, S) and m.ln.in_channels == 3


class GNNet(nn.Module):
    """conv 3->16 + GroupNorm(4 groups) + ReLU -> conv 16->8 + BN + ReLU -> head (smp FPN's Conv3x3GNReLU)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(4, 16)
        self.b = nn.Conv2d(16, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, K, 1)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.b(F.relu(self.gn(self.a(x)))))))


def test_groupnorm_units_lose_the_same_positions_in_every_group(tmp_path):
    from segprune.api import load_pruned, save_pruned
    from segprune.pruning import apply_widths
    from segprune.pruning.physical import fit_channel_groups
    # the repair alone: positions kept in most groups win, the count stays a multiple of G
    assert fit_channel_groups(torch.tensor([0, 1, 4, 5, 9, 13, 14]), 16, 4).tolist() == [0, 1, 4, 5, 8, 9, 12, 13]
    assert fit_channel_groups(torch.tensor([2, 6, 10, 14]), 16, 4).tolist() == [2, 6, 10, 14]   # fits: unchanged
    assert fit_channel_groups(torch.tensor([3]), 16, 4).tolist() == [3, 7, 11, 15]               # at least 1 position
    torch.manual_seed(0)
    m = GNNet()
    m.parts, m.never_prune = {"backbone": ["a", "gn"], "decoder": ["b", "bn"]}, ("head",)
    graph = build_graph(m, (S, S))
    units = {u.name: u for u in discover_units(m, graph)}
    assert units["a"].bns == ["gn"] and units["a"].extra["channel_groups"] == 4
    assert "channel_groups" not in units["b"].extra
    with torch.no_grad():
        m.gn.weight.copy_(torch.arange(16, dtype=torch.float32) % 4 + 1)  # positions 2 and 3 score highest
    assert torch.equal(unit_gammas(m, [units["a"]])["a"], m.gn.weight.detach().abs())
    res = prune_model(m, "slimming", keep_ratio=0.5, seg_loader=[(torch.randn(2, 3, S, S), torch.randint(0, K, (2, S, S)))],
                      input_size=(S, S), num_classes=K, method_cfg={"epochs": 1, "lr_seg": 1e-4})
    p = res.model
    assert p.a.out_channels == p.gn.num_channels == p.b.in_channels == 8 and p.gn.num_groups == 4
    assert res.report["units"]["a"]["kept"] == 8
    assert torch.allclose(p.gn.weight.detach().abs(), torch.tensor([3.0, 4.0] * 4), atol=1e-2)  # positions 2, 3 of each group
    assert p(torch.randn(2, 3, S, S)).shape == (2, K, S, S)
    # widths that are not a multiple of the groups are refitted; save / load gives the same network
    q = GNNet()
    q.parts, q.never_prune = m.parts, m.never_prune
    kept = {"a": torch.tensor([0, 5, 6]), "b": torch.tensor([1, 2, 3])}
    prune_channels(q, list(discover_units(q, build_graph(q, (S, S)))), kept)
    assert kept["a"].numel() == 4 and q.gn.num_channels == 4 and q.b.out_channels == 3
    folder = save_pruned(res, tmp_path / "gn")
    fresh = GNNet()
    load_pruned(fresh, folder)
    x = torch.randn(1, 3, S, S)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), p.eval()(x))
    assert apply_widths  # imported: apply_widths is what load_pruned runs


class ConcatSeparable(nn.Module):
    """Two producers (a: 8 channels, b: 4) concatenated, then a separable conv: depthwise over the 12
    concatenated channels + pointwise 12 -> 8 + BN (smp DeepLabV3+'s decoder block)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.pw = nn.Conv2d(12, 8, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, K, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        return self.head(F.relu(self.bn(self.pw(self.dw(y)))))


def test_a_depthwise_conv_over_a_concatenation_keeps_its_producers_apart():
    torch.manual_seed(0)
    m = ConcatSeparable().eval()
    m.parts, m.never_prune = {"backbone": ["a.", "b."], "decoder": ["dw", "pw", "bn"]}, ("head",)
    units = {u.name: u for u in _units(m)}
    assert set(units) == {"a.0", "b.0", "pw"}
    for name, c in (("a.0", 8), ("b.0", 4)):
        u = units[name]
        assert u.channels == c and u.convs == [name] and u.bns == [name[:-1] + "1"]   # not the 12-channel dw
        assert u.extra == {"kind": "depthwise", "depthwise": ["dw"], "gates": []}
    for method in ("fpgm", "uniform"):   # the filters read are the producer's (C rows), not the dw's 12
        from segprune.methods.base import build_method
        scores = build_method({"name": method}).scores(m, list(units.values()))
        assert scores["a.0"].shape == (8,) and scores["b.0"].shape == (4,)
    kept = {"a.0": torch.tensor([1, 4, 6]), "b.0": torch.tensor([0, 3]), "pw": torch.tensor([0, 1, 2, 5])}
    z = _zeroed(m, list(units.values()), kept)
    p = copy.deepcopy(z)
    prune_channels(p, list(units.values()), kept, build_graph(p, (S, S)))
    assert p.dw.in_channels == p.dw.out_channels == p.dw.groups == p.pw.in_channels == 5
    x = torch.randn(2, 3, S, S)
    with torch.no_grad():
        assert torch.allclose(p(x), z(x), atol=1e-5)


class BranchMerge(nn.Module):
    """A stem, then three parallel conv + BN + ReLU branches on it at 1, 1/2 and 1/4 resolution (the
    coarser ones upsampled back) whose outputs are summed, then a head: smp FPN's segmentation
    branches + ``MergeBlock("add")``. ``stack=True`` sums them as smp 0.6 does
    (``torch.stack(xs).sum(0)``), else with ``+``. ``residual=True`` adds the stem's output itself too (an
    identity skip path: that summand is also read by the branches), which must keep the group coupled."""

    def __init__(self, stack: bool = True, residual: bool = False):
        super().__init__()
        self.stack, self.residual = stack, residual
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.branches = nn.ModuleList(nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12),
                                                    nn.ReLU()) for _ in range(3))
        self.head = nn.Conv2d(12, K, 1)

    def forward(self, x):
        s = self.stem(x)
        outs = []
        for i, b in enumerate(self.branches):
            y = b(F.avg_pool2d(s, 2 ** i) if i else s)
            outs.append(F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False) if i else y)
        if self.residual:  # s + branches: the stem output also feeds the branches
            outs.append(s)
        merged = torch.stack(outs).sum(0) if self.stack else outs[0] + outs[1] + outs[2] + sum(outs[3:], 0)
        return self.head(merged)


def _merge_net(stack=True, residual=False, seed=0):
    torch.manual_seed(seed)
    m = BranchMerge(stack, residual)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.2, 1.5)
            mod.bias.data.uniform_(-0.3, 0.3)
    m.parts, m.never_prune = {"backbone": ["stem"], "decoder": ["branches"]}, ("head",)
    return m.eval()


@pytest.mark.parametrize("stack", [True, False])
def test_summed_parallel_branches_are_one_merge_unit(stack):
    """The branches' convolutions are one unit (kind "merge", not coupled): pruned by default, and
    removing channel c from every branch equals setting γ = β = 0 on it in every branch's BN."""
    m = _merge_net(stack)
    units = {u.name: u for u in _units(m)}
    u = units["branches.0.0"]
    assert u.extra["kind"] == "merge" and not u.coupled and u.part == "decoder"
    assert u.convs == ["branches.0.0", "branches.1.0", "branches.2.0"]
    assert u.bns == ["branches.0.1", "branches.1.1", "branches.2.1"] and u.channels == 12
    assert units["stem.0"].extra["kind"] == "plain"
    kept = {"branches.0.0": torch.tensor([0, 3, 4, 7, 10]), "stem.0": torch.tensor([1, 2, 5, 6])}
    z = _zeroed(m, list(units.values()), kept)
    p = copy.deepcopy(z)
    prune_channels(p, list(units.values()), kept, build_graph(p, (S, S)))
    assert [b[0].out_channels for b in p.branches] == [5, 5, 5] and p.head.in_channels == 5
    assert p.stem[0].out_channels == 4 and all(b[0].in_channels == 4 for b in p.branches)  # a plain unit
    x = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = z(x), p(x)
    assert out.shape == ref.shape == (2, K, S, S)
    assert torch.allclose(out, ref, atol=1e-5)
    # ... and the unit differs from the unpruned network (the test can fail: zeroing changed something)
    with torch.no_grad():
        assert not torch.allclose(m(x), out, atol=1e-3)
    # every method can rank it; FLOPs fall with it
    res = prune_model(_merge_net(stack), "fpgm", keep_ratio=0.5, input_size=(S, S), num_classes=K)
    assert res.report["units"]["branches.0.0"]["kept"] == 6 and res.report["flops"]["ratio"] < 0.5


@pytest.mark.parametrize("stack", [True, False])
def test_a_sum_with_a_skip_path_stays_residual_coupled(stack):
    """Adding the stem's output itself (also read by the branches) is a skip connection: stem and
    branches form one residual-coupled group, pruned only with include_coupled."""
    m = _merge_net(stack, residual=True)
    assert _units(m) == []
    skipped = skipped_groups(m, build_graph(m, (S, S)))
    assert len(skipped) == 1 and skipped[0]["reason"].startswith("residual-coupled")
    (u,) = _units(m, include_coupled=True)
    assert u.coupled and u.extra["kind"] == "coupled"
    assert set(u.convs) == {"stem.0", "branches.0.0", "branches.1.0", "branches.2.0"}
