"""SIRFP (segprune/methods/sirfp.py) on hand-checkable toy cases, a toy DeepLab and the pipeline."""
import copy
import itertools
import json
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from test_baselines import Toy  # conv1-bn1 -> conv2-bn2 -> conv3 toy net
from conftest import TINY as _PIPELINE_TINY  # the shared tiny synthetic setting
from segprune.cli import main
from segprune.engine.log import StageLog
from segprune.methods import build_method
from segprune.methods.base import METHODS, check_options
from segprune.methods.sirfp import (EMA, SIRFP, RedundancyTracker, greedy_clique_removal, kept_redundancy,
                                    redundancy_matrix, sirfp_scores, sobel_edge_std)
from segprune.models import build_model
from segprune.pruning import build_graph, discover_units, prune_channels, select_channels
from segprune.pruning.groups import PruneUnit


# ---- helpers ------------------------------------------------------------------------------------
def manual_redundancy(feat):
    """R by explicit loops: ℓ1-normalise every (n, c) map, dot products, mean over n (plain Python)."""
    n, c = feat.shape[:2]
    maps = [[[float(v) for v in feat[i, ch].detach().flatten()] for ch in range(c)] for i in range(n)]
    out = [[0.0] * c for _ in range(c)]
    for i in range(n):
        normed = []
        for ch in range(c):
            l1 = sum(abs(v) for v in maps[i][ch]) + 1e-5
            normed.append([v / l1 for v in maps[i][ch]])
        for a in range(c):
            for b in range(c):
                out[a][b] += sum(x * y for x, y in zip(normed[a], normed[b])) / n
    return torch.tensor(out, dtype=torch.float64)


def _loader(n=4, k=3, size=8, bs=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, k, (n, size, size), generator=g))
    return DataLoader(ds, batch_size=bs, shuffle=False, generator=torch.Generator().manual_seed(seed))


def _toy_units(m):
    return discover_units(m, build_graph(m, (8, 8)))


def _probe(c):
    """A module whose 'bn' is the identity, so the tracker sees exactly the input maps."""
    return nn.Sequential(OrderedDict(bn=nn.Identity())), [PruneUnit("conv", "backbone", ["conv"], ["bn"], c)]


# ---- redundancy matrix, EMA, edge term ----------------------------------------------------------
def test_redundancy_matrix_hand_values():
    f = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]],       # flat:    F̂ = [.25, .25, .25, .25]
                       [[2.0, 0.0], [0.0, 2.0]],       # diagonal: F̂ = [.5, 0, 0, .5]
                       [[1.0, -1.0], [0.0, 0.0]]]])    # signed:  F̂ = [.5, -.5, 0, 0]
    r = redundancy_matrix(f)
    want = torch.tensor([[0.25, 0.25, 0.0], [0.25, 0.5, 0.25], [0.0, 0.25, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(r, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(redundancy_matrix(f, scale_by_hw=True), 4 * want, atol=4e-5, rtol=0)
    # the spatial layout matters: a shifted copy of a map is NOT redundant with it (pooling would say it is)
    g = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]]])
    assert abs(float(redundancy_matrix(g)[0, 1])) < 1e-9
    with pytest.raises(ValueError, match="N, C, H, W"):
        redundancy_matrix(torch.ones(2, 3, 4))


def test_redundancy_ema_over_two_updates_matches_manual_computation():
    torch.manual_seed(0)
    x1, x2 = torch.randn(3, 4, 3, 5), torch.randn(2, 4, 3, 5) + 0.5
    m1, m2 = manual_redundancy(x1), manual_redundancy(x2)
    torch.testing.assert_close(redundancy_matrix(x1), m1, atol=1e-6, rtol=0)
    for r in (0.0, 0.5, 0.9):
        net, units = _probe(4)
        with RedundancyTracker(net, units, ema=r) as tr:
            net(x1)
            net(x2)
        assert not net.bn._forward_hooks                         # hooks removed on exit
        got, edge = tr.unit_stats(units)["conv"]
        # S_2 = r(1-r) M1 + (1-r) M2, bias-corrected by 1 - r²: (r M1 + M2) / (1 + r)
        torch.testing.assert_close(got, (r * m1 + m2) / (1 + r), atol=1e-6, rtol=0)
        assert edge is None and tr.updates == 2
    e = EMA(0.5)
    e.update(torch.tensor([2.0]))
    assert float(e.value) == 2.0                                 # bias correction: first value kept
    e.update(torch.tensor([5.0]))
    assert float(e.value) == pytest.approx((0.5 * 2 + 5) / 1.5)
    with pytest.raises(ValueError):
        EMA(1.0)


def test_sobel_edge_std_hand_values():
    step = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(4, 1)            # vertical step edge, 4x4
    f = torch.stack([step, torch.full((4, 4), 3.0), step.T * 2]).unsqueeze(0)   # (1, 3, 4, 4)
    # |G_x| = 4 in the two columns next to the step, 0 elsewhere -> mean 2, std 2; constant -> 0;
    # the transposed step scaled by 2 -> std 4
    torch.testing.assert_close(sobel_edge_std(f), torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64))
    assert float(sobel_edge_std(torch.randn(2, 5, 1, 1)).abs().max()) == 0.0   # 1x1 maps: no edges
    net, units = _probe(3)
    with RedundancyTracker(net, units, ema=0.9, edge_parts=("backbone",)) as tr:
        net(f)
        net(f)
    torch.testing.assert_close(tr.unit_stats(units)["conv"][1], torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64))


# ---- greedy MEWCP --------------------------------------------------------------------------------
def _random_matrices(count, seed):
    g = torch.Generator().manual_seed(seed)
    for t in range(count):
        c = 4 + t % 5                                                  # C = 4..8
        if t % 2:
            a = torch.rand(c, c, generator=g, dtype=torch.float64)      # symmetric, non-negative
            yield (a + a.T) / 2
        else:                                                          # R of random correlated maps
            noise = torch.randn(4, c, 6, 6, generator=g)
            f = noise + torch.randn(4, 1, 6, 6, generator=g) * 2 * torch.rand(1, c, 1, 1, generator=g)
            yield redundancy_matrix(f).abs()


def test_greedy_follows_its_definition_step_by_step():
    for w in _random_matrices(10, 1):
        for self_term in (True, False):
            order, value = greedy_clique_removal(w, self_term)
            kept = list(range(w.shape[0]))
            for j, v in zip(order.tolist(), value.tolist()):
                s = {i: sum(float(w[i, k]) for k in kept if self_term or k != i) for i in kept}
                assert s[j] >= max(s.values()) - 1e-12                 # an argmax (up to rounding)
                assert v == pytest.approx(s[j])
                # removing j lowers Φ by exactly s_j
                rest = [k for k in kept if k != j]
                assert kept_redundancy(w, kept, self_term) - kept_redundancy(w, rest, self_term) == pytest.approx(s[j])
                kept.remove(j)
            assert bool((value[1:] <= value[:-1]).all())               # non-increasing


def test_greedy_against_brute_force_maximum_weight_clique():
    """Kept set of the greedy vs the best kept subset of the same size (exhaustive, C ≤ 8)."""
    n_cases = n_opt = 0
    max_rel = 0.0
    for w in _random_matrices(60, 7):
        c = w.shape[0]
        order, _ = greedy_clique_removal(w)
        for k in range(1, c):
            kept = sorted(order[c - k:].tolist())
            phi = kept_redundancy(w, kept)
            vals = {sub: kept_redundancy(w, sub) for sub in itertools.combinations(range(c), k)}
            best = min(vals.values())
            assert phi >= best - 1e-12
            n_cases += 1
            if phi <= best + 1e-12:
                n_opt += 1
                winners = [s for s, v in vals.items() if v <= best + 1e-12]
                assert tuple(kept) in winners                       # the greedy IS a brute-force optimum
            else:
                max_rel = max(max_rel, (phi - best) / best)
            if k == c - 1:                                          # one removal: greedy is provably optimal
                assert phi == pytest.approx(best)
    # measured on these 60 matrices (300 cases); docs/methods_sirfp.md reports 5000-case statistics
    print(f"greedy optimal in {n_opt}/{n_cases} cases, max relative gap {max_rel:.3f}")
    assert n_cases == 300
    assert n_opt / n_cases >= 0.85
    assert max_rel < 2.0


def test_duplicated_channel_is_removed_first():
    # 5 channels: one patch at 4 disjoint places; channel 4 duplicates channel 1
    patch = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])   # one "blob", ℓ1 = 16

    def blob(cy, cx):
        m = torch.zeros(12, 12)
        m[cy:cy + 3, cx:cx + 3] = patch
        return m

    maps = torch.stack([blob(0, 0), blob(0, 8), blob(8, 0), blob(8, 8), blob(0, 8)]).unsqueeze(0).double()
    r = redundancy_matrix(maps, eps=0.0)                 # float64, ε = 0: every entry exact
    a = float(r[0, 0])
    assert a == 36 / 256                                 # Σ F̂² of one blob = (1+4+1+4+16+4+1+4+1) / 16²
    assert float(r[0, 2]) == 0.0 and float(r[1, 4]) == a  # disjoint supports: 0; twins: the self term
    order, value = greedy_clique_removal(r)
    assert order[0].item() == 1                          # one of the duplicated pair (tie -> lower index)
    assert value[0].item() == pytest.approx(2 * a)       # self + its twin
    assert order.tolist() == [1, 0, 2, 3, 4]             # then all equal (a): lowest index first
    assert value[1:].tolist() == [a] * 4
    sc = sirfp_scores(r)
    assert int(torch.argmin(sc)) == 1
    kept = select_channels({"u": sc}, {"u": "backbone"}, 0.8, "ind", 1)["u"]
    assert kept.tolist() == [0, 2, 3, 4]                 # exactly one of the twins goes


def test_scores_follow_removal_order_and_add_the_edge_term():
    torch.manual_seed(3)
    r = redundancy_matrix(torch.randn(2, 7, 5, 5) + torch.randn(2, 1, 5, 5))
    order, value = greedy_clique_removal(r)
    sc = sirfp_scores(r)
    assert bool((sc[order][1:] >= sc[order][:-1]).all())            # removed first = lowest score
    torch.testing.assert_close(sc[order], -value)
    e = torch.rand(7, dtype=torch.float64)
    torch.testing.assert_close(sirfp_scores(r, e, 0.3), sc + 0.3 * e)
    torch.testing.assert_close(sirfp_scores(r, e, 0.0), sc)
    with pytest.raises(ValueError):
        greedy_clique_removal(torch.ones(3, 4))
    with pytest.raises(ValueError):
        greedy_clique_removal(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


# ---- the method class ---------------------------------------------------------------------------
def test_options_and_registration():
    assert METHODS["sirfp"] is SIRFP and not SIRFP.per_layer
    meth = build_method({"name": "sirfp"})
    assert meth.options == {"ema": 0.999, "edge_weight": 0.0, "self_redundancy": True, "scale_by_hw": False}
    assert check_options("sirfp", {"ema": 0.9, "edge_weight": 0.2}) == []
    bad = check_options("sirfp", {"ema": 1.0, "edge_weight": -1, "self_redundancy": "yes", "emma": 0.5})
    assert len(bad) == 4 and any("emma" in b for b in bad) and any("ema=1.0" in b for b in bad)
    assert check_options("sirfp", {"ema": True}) != []
    with pytest.raises(ValueError, match="edge_weight"):
        build_method({"name": "sirfp", "options": {"edge_weight": -0.1}})


def test_train_accumulates_the_ema_of_the_training_forwards():
    torch.manual_seed(0)
    m = Toy()
    units = _toy_units(m)
    seen = {"bn1": [], "bn2": []}
    for name in seen:   # our own hooks record the BatchNorm outputs the training loop produces
        getattr(m, name).register_forward_hook(lambda mod, i, o, n=name: seen[n].append(o.detach().clone()))
    meth = build_method({"name": "sirfp", "epochs": 1, "lr_seg": 0.01, "max_iters_per_epoch": 3,
                         "options": {"ema": 0.8, "edge_weight": 0.5}})
    before = copy.deepcopy(m.state_dict())
    info = meth.train(m, units, _loader(n=8, bs=2), None, 255, StageLog("t", quiet=True))
    assert info["sirfp_updates"] == 3 and len(seen["bn1"]) == 3
    assert not torch.equal(before["conv1.weight"], m.conv1.weight)         # it did train
    assert len(m.bn1._forward_hooks) == 1 and len(m.bn2._forward_hooks) == 1  # only ours remain
    ms = [manual_redundancy(o) for o in seen["bn1"]]
    want = (0.8 ** 2 * ms[0] + 0.8 * ms[1] + ms[2]) / (1 + 0.8 + 0.8 ** 2)
    stats = meth.unit_stats(m, units)
    assert meth.last_source == "train"
    torch.testing.assert_close(stats["conv1"][0], want, atol=1e-6, rtol=0)
    assert stats["conv1"][1] is not None and stats["conv2"][1] is None      # edge term: backbone only
    sc = meth.scores(m, units)                                               # no calibration loader needed
    torch.testing.assert_close(sc["conv1"], sirfp_scores(want, stats["conv1"][1], 0.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(sc["conv2"], sirfp_scores(stats["conv2"][0]))
    kept = meth.select(m, units, 0.5, "ind", 1)
    assert all(k.numel() == 2 for k in kept.values())
    kept = meth.select(m, units, 0.25, "ind", 2)                              # min_channels per layer
    assert all(k.numel() == 2 for k in kept.values())


def test_epochs_zero_uses_calibration_batches_without_training():
    torch.manual_seed(0)
    m = Toy()
    m.train()
    units = _toy_units(m)
    meth = build_method({"name": "sirfp", "epochs": 0, "calib_batches": 2})
    before = copy.deepcopy(m.state_dict())
    assert meth.train(m, units, _loader(), None, 255, StageLog("t", quiet=True)) == {"sirfp_updates": 0}
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # nothing trained
    calib = _loader(n=6, bs=2, seed=4)
    sc = meth.scores(m, units, calib)
    assert meth.last_source == "calibration" and m.training and not m.bn1._forward_hooks
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # eval mode: BN stats untouched
    # = the EMA (r = 0.999, bias-corrected) of the first two calibration batches' BN outputs in eval mode
    m.eval()
    xs = [b[0] for b in list(calib)[:2]]
    ms = [manual_redundancy(m.bn2(m.conv2(F.relu(m.bn1(m.conv1(x)))))) for x in xs]
    m.train()
    want = (0.999 * ms[0] + ms[1]) / 1.999
    torch.testing.assert_close(sc["conv2"], sirfp_scores(want), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="calibration loader"):
        meth.scores(m, units, None)
    # epochs > 0 but train() never saw this model (a resumed run): warn, then calibrate
    meth2 = build_method({"name": "sirfp", "epochs": 1, "calib_batches": 2})
    with pytest.warns(RuntimeWarning, match="resumed"):
        sc2 = meth2.scores(m, units, calib)
    torch.testing.assert_close(sc2["conv2"], sc["conv2"])


def test_sirfp_prunes_a_toy_deeplab():
    torch.manual_seed(0)
    base = build_model({"name": "deeplabv3_resnet18", "width": 0.125, "aspp_channels": 16}, 3, 4)
    units = discover_units(base, build_graph(base, (32, 32)))
    calib = _loader(n=4, k=3, size=32, bs=2)
    x = torch.randn(1, 3, 32, 32)
    n_part = {p: sum(u.channels for u in units if u.part == p) for p in ("backbone", "decoder")}
    for opts in ({}, {"edge_weight": 0.2, "scale_by_hw": True, "self_redundancy": False}):
        m = copy.deepcopy(base)
        meth = build_method({"name": "sirfp", "epochs": 0, "options": opts})
        kept = meth.select(m, units, 0.5, "ind", 1, calib_loader=calib)
        assert set(kept) == {u.name for u in units}
        for p, n in n_part.items():   # Ind: each part loses round(0.5 N) channels (+ min_channels re-adds)
            k = sum(kept[u.name].numel() for u in units if u.part == p)
            assert n - round(0.5 * n) <= k <= n - round(0.5 * n) + sum(1 for u in units if u.part == p)
        prune_channels(m, units, kept, input_size=(32, 32))
        assert m.classifier[1].in_channels == kept["classifier.0.project.0"].numel()
        assert m.eval()(x).shape == (1, 3, 32, 32)


# ---- through the pipeline ------------------------------------------------------------------------
TINY = copy.deepcopy(_PIPELINE_TINY)


def test_sirfp_through_the_pipeline(tmp_path):
    cfg = json.loads(json.dumps(TINY))
    cfg["method"]["name"] = "sirfp"
    cfg["method"]["options"] = {"edge_weight": 0.2}
    cfg["train"]["seg"]["epochs"] = 1
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "sirfp"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "sirfp"
    assert m["pruned"]["params"] < 0.8 * m["baseline"]["params"]
    for part, (k, n) in m["kept_per_part"].items():   # Ind: half of each part (min_channels 1 may add a few)
        assert n - round(0.5 * n) <= k <= n - round(0.5 * n) + 8
    done = json.loads((out / "stages/03_sparsity/done.json").read_text())
    assert done["sirfp_updates"] == 4                 # 16 images / batch 4, 1 epoch: one EMA update per step
    assert "sirfp: redundancy EMA" in (out / "logs/sparsity.log").read_text()
    units = json.loads((out / "stages/04_prune/arch.json").read_text())["widths"]["units"]
    assert any(u["kept"] != round(0.5 * u["channels"]) for u in units.values())  # not a per-layer ratio
