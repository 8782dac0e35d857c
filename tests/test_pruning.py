import copy

import pytest
import torch

from segprune.models import build_model
from segprune.pruning import (apply_widths, build_graph, check_keep_ratio, discover_units, prune_channels,
                              select_channels, unit_gammas, widths_spec)


def _model(depth=18):
    torch.manual_seed(0)
    return build_model({"name": f"deeplabv3_resnet{depth}", "width": 0.125, "aspp_channels": 16}, 5, 4).eval()


def _units(m, coupled=False):
    return discover_units(m, build_graph(m, (32, 32)), coupled)


def test_default_units_are_inside_blocks_and_aspp():
    m = _model()
    names = [u.name for u in _units(m)]
    # BasicBlock: only conv1 of each block (conv2 feeds the residual add); ASPP branches, project, head conv
    assert "backbone.layer1.0.conv1" in names and "backbone.layer1.0.conv2" not in names
    assert "backbone.conv1" not in names and "classifier.4" not in names
    assert {"classifier.0.convs.0.0", "classifier.0.convs.4.1", "classifier.0.project.0", "classifier.1"} <= set(names)
    assert sum(n.startswith("backbone.") for n in names) == 8
    bott = [u.name for u in _units(_model(50))]
    assert "backbone.layer1.0.conv2" in bott and "backbone.layer1.0.conv3" not in bott


def test_coupled_option_adds_residual_groups():
    m = _model()
    coupled = [u for u in _units(m, True) if u.coupled]
    assert {u.name for u in coupled} == {"backbone.conv1", "backbone.layer2.0.downsample.0",
                                         "backbone.layer3.0.downsample.0", "backbone.layer4.0.downsample.0"}
    assert all(len(u.bns) > 1 for u in coupled)


@pytest.mark.parametrize("mode", ["ind", "uni"])
def test_threshold_counts(mode):
    m = _model()
    units = _units(m)
    g = torch.Generator().manual_seed(1)
    # decoder scores much larger than backbone scores: Uni prunes the backbone first, Ind prunes each part by p
    scores = {u.name: torch.rand(u.channels, generator=g) + (10.0 if u.part == "decoder" else 0.0) for u in units}
    parts = {u.name: u.part for u in units}
    kept = select_channels(scores, parts, 0.5, mode, min_channels=1)
    tot = {p: sum(u.channels for u in units if u.part == p) for p in ("backbone", "decoder")}
    got = {p: sum(kept[u.name].numel() for u in units if u.part == p) for p in ("backbone", "decoder")}
    if mode == "ind":
        assert got == {p: tot[p] - round(0.5 * tot[p]) for p in tot}
    else:
        n_prune = round(0.5 * (tot["backbone"] + tot["decoder"]))
        assert got["decoder"] == tot["decoder"]  # all pruning lands on the low-scoring backbone
        # one global threshold: the n_prune lowest scores of all units go (scores are distinct), except that
        # min_channels=1 gives a unit whose channels all fell below it back its best one
        thr = torch.sort(torch.cat([scores[u.name] for u in units])).values[n_prune - 1]
        assert got["backbone"] == sum(max(1, int((scores[u.name] > thr).sum())) for u in units if u.part == "backbone")
        assert got["backbone"] >= tot["backbone"] - n_prune
    # the kept channels are the highest-scoring ones of each pool
    for u in units:
        if kept[u.name].numel() < u.channels:
            dropped = torch.ones(u.channels, dtype=torch.bool)
            dropped[kept[u.name]] = False
            assert scores[u.name][kept[u.name]].min() >= scores[u.name][dropped].max()


def test_min_channels_never_empties_a_layer():
    m = _model()
    units = _units(m)
    scores = {u.name: torch.full((u.channels,), 1.0) for u in units}
    scores[units[0].name] = torch.zeros(units[0].channels)  # this unit would be wiped out
    kept = select_channels(scores, {u.name: u.part for u in units}, 0.1, "uni", min_channels=3)
    assert kept[units[0].name].numel() == 3
    assert all(k.numel() >= 3 for k in kept.values())


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.2, "half"])
def test_keep_ratio_outside_open_interval(bad):
    with pytest.raises(ValueError, match="keep_ratio"):
        check_keep_ratio(bad)


@pytest.mark.parametrize("coupled", [False, True])
def test_physical_pruning_equals_zeroed_channels(coupled):
    """Channels whose BN γ and β are both 0 output ReLU(0) = 0: removing them changes nothing."""
    m = _model()
    units = _units(m, coupled)
    g = torch.Generator().manual_seed(2)
    scores = {u.name: torch.rand(u.channels, generator=g) for u in units}
    kept = select_channels(scores, {u.name: u.part for u in units}, 0.5, "ind", 1)
    mods = dict(m.named_modules())
    for u in units:
        drop = torch.ones(u.channels, dtype=torch.bool)
        drop[kept[u.name]] = False
        for b in u.bns:
            mods[b].weight.data[drop] = 0
            mods[b].bias.data[drop] = 0
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        ref, ref_cls = m(x), m.forward_cls(x)
        p = prune_channels(copy.deepcopy(m), units, kept)
        out, out_cls = p(x), p.forward_cls(x)
    n0, n1 = sum(q.numel() for q in m.parameters()), sum(q.numel() for q in p.parameters())
    assert n1 < 0.75 * n0
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_cls, ref_cls, atol=1e-5, rtol=1e-4)
    # and pruning the *unzeroed* channels does change the output (the test can fail)
    m2 = _model()
    with torch.no_grad():
        assert (prune_channels(copy.deepcopy(m2), units, kept)(x) - m2(x)).abs().max() > 1e-3


def test_rebuild_from_widths_spec():
    m = _model()
    units = _units(m)
    scores = unit_gammas(m, units)
    scores = {k: v + torch.linspace(0, 1, v.numel()) for k, v in scores.items()}
    kept = select_channels(scores, {u.name: u.part for u in units}, 0.25, "ind", 1)
    p = prune_channels(copy.deepcopy(m), units, kept)
    spec = widths_spec(units, kept, False)
    fresh = apply_widths(_model(), spec)
    fresh.load_state_dict(p.state_dict())  # shapes must match exactly
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), p(x))
    other = build_model({"name": "deeplabv3_resnet18", "width": 0.25, "aspp_channels": 16}, 5, 4)
    with pytest.raises(ValueError, match="arch.json.*channels"):
        apply_widths(other, spec)
