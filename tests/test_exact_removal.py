"""Exact removal (issue 15): a removed channel with γ = 0 still outputs the constant act(β); its
contribution is folded into the consumers (``segprune.pruning.fold_removed_constants``).

Each test compares with the unpruned network in eval mode and also checks that removal *without*
the fold differs, so that it can fail."""
import copy

import pytest
import torch
from torch import nn

from segprune.models import build_model
from segprune.pruning import (build_graph, discover_units, fold_removed_constants, prune_channels, removed_gamma_share,
                              select_channels)


def _zero_gamma(model, units, kept, beta_lo=0.1, seed=2):
    """γ = 0 and β in [beta_lo, beta_lo + 0.5) (> 0: ReLU passes it) on every removed channel."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    for u in units:
        drop = torch.ones(u.channels, dtype=torch.bool)
        drop[kept[u.name]] = False
        for b in u.bns:
            mods[b].weight.data[drop] = 0
            mods[b].bias.data[drop] = torch.rand(int(drop.sum()), generator=g) * 0.5 + beta_lo


def _select(units, seed=3, p=0.5):
    g = torch.Generator().manual_seed(seed)
    scores = {u.name: torch.rand(u.channels, generator=g) for u in units}
    return select_channels(scores, {u.name: u.part for u in units}, p, "ind", 1)


def _trained_stats(m, size):
    """Non-trivial BatchNorm running statistics (a few training-mode forwards), then eval mode."""
    m.train()
    with torch.no_grad():
        for _ in range(2):
            m(torch.randn(4, 3, *size))
    return m.eval()


def test_zoo_removal_is_exact_where_consumers_read_no_padding():
    """DeepLabv3-R50: Bottleneck conv2 (consumer conv3 1x1, no bias: folded into bn3's running mean),
    the ASPP branches (consumer: the 1x1 projection, through a concatenation and, for the pooling
    branch, a bilinear upsampling) and the head's 3x3 conv (consumer: the 1x1 classifier, with bias)."""
    torch.manual_seed(0)
    m = _trained_stats(build_model({"name": "deeplabv3_resnet50", "width": 0.125, "aspp_channels": 16}, 5, 4), (64, 64))
    graph = build_graph(m, (32, 32))
    units = [u for u in discover_units(m, graph) if u.name.endswith("conv2") or u.name.startswith("classifier.0.convs")
             or u.name == "classifier.1"]
    assert len(units) == 16 + 5 + 1
    kept = _select(units)
    _zero_gamma(m, units, kept)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        ref, ref_cls = m(x), m.forward_cls(x)
        rec = {}
        p = prune_channels(copy.deepcopy(m), units, kept, compensate="exact", record=rec)
        out, out_cls = p(x), p.forward_cls(x)
        plain = prune_channels(copy.deepcopy(m), units, kept, compensate="off")
        out_off = plain(x)
    n_removed = sum(u.channels - kept[u.name].numel() for u in units)
    assert rec["channels"] == n_removed and rec["exact"] == n_removed and rec["skipped"] == {} and rec["interior"] == 0
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_cls, ref_cls, atol=1e-5, rtol=1e-4)
    assert (out_off - ref).abs().max() > 1e-2  # without the fold the constant is lost (the test can fail)


class _TwoConv(nn.Module):
    """conv 3x3 (padding 1) -> BN -> ReLU -> conv 3x3 (padding 1, no bias) -> BN: (N, 3, H, W) -> (N, 6, H, W)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def _toy(cls, size=(16, 16)):
    torch.manual_seed(0)
    m = _trained_stats(cls(), size)
    units = [u for u in discover_units(m, build_graph(m, size)) if u.name == "conv1"]
    kept = {"conv1": torch.tensor([0, 2, 5, 7])}
    _zero_gamma(m, units, kept)
    return m, units, kept


def test_padded_consumer_is_exact_inside_and_folded_only_with_interior():
    """A zero-padded 3x3 consumer: the fold is exact on pixels whose 3x3 window lies inside the map,
    not on the one-pixel border; ``compensate="exact"`` skips it and says why."""
    m, units, kept = _toy(_TwoConv)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = m(x)
        outs, recs = {}, {}
        for mode in ("interior", "exact", "off"):
            recs[mode] = {}
            outs[mode] = prune_channels(copy.deepcopy(m), units, kept, input_size=(16, 16), compensate=mode,
                                        record=recs[mode])(x)
    inner = (..., slice(1, -1), slice(1, -1))
    torch.testing.assert_close(outs["interior"][inner], ref[inner], atol=1e-5, rtol=1e-4)
    assert (outs["interior"] - ref).abs().max() > 1e-3  # the border ring differs
    assert recs["interior"]["interior"] == 4 and recs["interior"]["exact"] == 0
    assert (outs["exact"][inner] - ref[inner]).abs().max() > 1e-2
    assert list(recs["exact"]["skipped"]) == ["zero-padded k×k conv (borders would differ; compensate='interior' folds it)"]
    assert recs["exact"]["skipped_where"][0].startswith("conv2:")
    torch.testing.assert_close(outs["exact"], outs["off"], atol=0, rtol=0)  # skipped = not folded at all


class _PoolLinear(nn.Module):
    """conv 1x1 -> BN -> ReLU -> global average pool -> Linear: (N, 3, H, W) -> (N, 4)."""

    def __init__(self, bias=True):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4, bias=bias)

    def forward(self, x):
        return self.fc(torch.relu(self.bn1(self.conv1(x))).mean((2, 3)))


def test_linear_consumer_gets_the_constant_in_its_bias():
    m, units, kept = _toy(_PoolLinear)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = m(x)
        rec = {}
        out = prune_channels(copy.deepcopy(m), units, kept, input_size=(16, 16), record=rec)(x)
        off = prune_channels(copy.deepcopy(m), units, kept, input_size=(16, 16), compensate="off")(x)
    assert rec["exact"] == 4 and rec["skipped"] == {}
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert (off - ref).abs().max() > 1e-3


def test_consumer_without_bias_or_batchnorm_is_skipped():
    m, units, kept = _toy(lambda: _PoolLinear(bias=False))
    rec = {}
    prune_channels(m, units, kept, input_size=(16, 16), record=rec)
    assert rec["exact"] == 0 and rec["skipped"] == {"no bias and no BatchNorm reading it alone": 4}


class _Gated(nn.Module):
    """The channels are multiplied by an image-dependent gate before the 1x1 consumer: not constant there."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn1(self.conv1(x))) * torch.sigmoid(x[:, :1]))


def test_non_constant_consumer_input_is_not_folded():
    m, units, kept = _toy(_Gated)
    bias = m.conv2.bias.detach().clone()
    rec = {}
    p = prune_channels(m, units, kept, input_size=(16, 16), record=rec)
    assert rec["skipped"] == {"input channel not constant": 4} and rec["exact"] == 0
    assert torch.equal(p.conv2.bias, bias)


def test_negative_beta_needs_no_fold_and_nonzero_gamma_changes_nothing():
    """ReLU(β) = 0 for β < 0: removal is already exact (``zero_constant``). With no removed γ exactly 0
    the compensation does nothing at all: the pruned weights are bitwise those of a plain removal."""
    m, units, kept = _toy(_TwoConv)
    mods = dict(m.named_modules())
    mods["bn1"].bias.data[[1, 3, 4, 6]] = -0.3
    rec = {}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = m(x)
        torch.testing.assert_close(prune_channels(copy.deepcopy(m), units, kept, input_size=(16, 16), record=rec)(x),
                                   ref, atol=1e-5, rtol=1e-4)
    assert rec["zero_constant"] == 4 and rec["exact"] == rec["interior"] == 0
    torch.manual_seed(1)
    z = build_model({"name": "deeplabv3_resnet18", "width": 0.125, "aspp_channels": 16}, 5, 4).eval()
    zu = discover_units(z, build_graph(z, (32, 32)), True)
    zk = _select(zu)
    rec = {}
    a = prune_channels(copy.deepcopy(z), zu, zk, record=rec).state_dict()
    b = prune_channels(copy.deepcopy(z), zu, zk, compensate="off").state_dict()
    assert rec["channels"] == 0 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_mode_is_refused():
    m, units, kept = _toy(_TwoConv)
    with pytest.raises(ValueError, match="compensate='always'"):
        fold_removed_constants(m, units, kept, mode="always")


def test_removed_gamma_share_closed_form():
    """Share of Σ|γ| removed, per part and in total, against a hand computation."""
    m, units, kept = _toy(_TwoConv)
    mods = dict(m.named_modules())
    mods["bn1"].weight.data = torch.tensor([1.0, -2.0, 1.0, 0.5, 0.5, 1.0, 0.0, 2.0])
    share = removed_gamma_share(m, units, kept)  # removed: channels 1, 3, 4, 6 -> 2 + 0.5 + 0.5 + 0 of 8
    assert share == {"total": pytest.approx(3.0 / 8.0), "parts": {"other": pytest.approx(3.0 / 8.0)}}
    assert removed_gamma_share(m, units, {"conv1": torch.arange(8)})["total"] == 0.0
