"""prune.target_flops_ratio: bisection on the keep ratio to a FLOPs budget, for MTP and every PruningMethod.

Tiny models only (width 0.125 DeepLabv3-R18 at 32x32); run with OMP_NUM_THREADS=1.
"""
import copy
import csv
import io
import json
import warnings

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from conftest import TINY as _PIPELINE_TINY  # the shared tiny synthetic setting
from segprune.cli import main
from segprune.compare import collect_runs, render_table, write_csv
from segprune.config import DEFAULTS, ConfigError, load_config, merge
from segprune.engine.profile import count_flops
from segprune.methods import build_method
from segprune.models import build_model
from segprune.pipeline import Pipeline, stage_fingerprints
from segprune.pruning.search import search_keep_ratio
from segprune.pruning import build_graph, discover_units, prune_channels, select_channels

# a copy of the shared tiny setting (tests/conftest.py)
TINY = copy.deepcopy(_PIPELINE_TINY)
SIZE = (32, 32)
TOL = 0.01


def _toy():
    torch.manual_seed(0)
    m = build_model({"name": "deeplabv3_resnet18", "width": 0.125, "output_stride": 16, "multi_grid": None,
                     "aspp_channels": 16, "aspp_rates": None}, 5, 4)
    units = discover_units(m, build_graph(m, SIZE))
    return m, units


def _independent_ratio(model, units, kept):
    """FLOPs ratio counted from scratch: a fresh copy pruned physically, then count_flops."""
    clone = copy.deepcopy(model)
    prune_channels(clone, units, kept, build_graph(clone, SIZE))
    return count_flops(clone, SIZE)["flops"] / count_flops(model, SIZE)["flops"]


def _calib():
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(4, 3, *SIZE, generator=g), torch.randint(0, 5, (4, *SIZE), generator=g)),
                      batch_size=2)


# ---- the search ------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [0.5, 0.7])
def test_bisection_mtp_scores_within_tolerance(target):
    m, units = _toy()
    scores = {u.name: torch.rand(u.channels, generator=torch.Generator().manual_seed(i)) for i, u in enumerate(units)}
    parts = {u.name: u.part for u in units}
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = search_keep_ratio(m, units, lambda p: select_channels(scores, parts, p, "ind", 1), target, TOL, SIZE)
    assert res["flops_target_met"] and abs(res["flops_ratio_achieved"] - target) <= TOL
    assert 1 <= len(res["flops_probes"]) <= 14 and 0 < res["keep_ratio_found"] < 1
    assert res["flops_ratio_achieved"] == _independent_ratio(m, units, res["kept"])  # the recorded ratio is exact
    assert res["flops_pruned"] / res["flops_unpruned"] == res["flops_ratio_achieved"]
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # the model is not pruned in place
    assert [u.name for u in discover_units(m, build_graph(m, SIZE))] == [u.name for u in units]


@pytest.mark.parametrize("name", ["fpgm", "uniform"])
@pytest.mark.parametrize("target", [0.45, 0.65])
def test_bisection_per_layer_method_scores_once(name, target, monkeypatch):
    m, units = _toy()
    meth = build_method({"name": name})
    calls = []
    orig = type(meth).scores
    monkeypatch.setattr(type(meth), "scores", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    scores = meth.scores(m, units)
    res = search_keep_ratio(m, units, lambda p: meth.select_from_scores(scores, units, p, "ind", 1), target, TOL, SIZE)
    assert len(calls) == 1
    assert res["flops_target_met"] and abs(res["flops_ratio_achieved"] - target) <= TOL
    assert res["flops_ratio_achieved"] == _independent_ratio(m, units, res["kept"])
    # per-layer rule: every unit keeps round(p * C) channels (min_channels 1)
    p = res["keep_ratio_found"]
    assert all(res["kept"][u.name].numel() == max(1, round(p * u.channels)) for u in units)


def test_unreachable_target_reports_closest():
    m, units = _toy()
    scores = {u.name: torch.rand(u.channels, generator=torch.Generator().manual_seed(i)) for i, u in enumerate(units)}
    parts = {u.name: u.part for u in units}
    lines = []
    res = search_keep_ratio(m, units, lambda p: select_channels(scores, parts, p, "ind", 1), 0.05, TOL, SIZE,
                            log=lines.append)  # unpruned stem / coupled convs keep far more than 5 %
    assert not res["flops_target_met"] and res["flops_ratio_achieved"] > 0.05 + TOL
    assert len(res["flops_probes"]) == 14
    assert res["flops_ratio_achieved"] == min(r for _, r in res["flops_probes"])  # the closest probe
    assert any("NOT met" in s and "closest" in s for s in lines)
    lines.clear()  # a tolerance finer than one channel step: the closest achievable ratio, said so
    res = search_keep_ratio(m, units, lambda p: select_channels(scores, parts, p, "ind", 1), 0.6, 1e-9, SIZE,
                            log=lines.append)
    assert not res["flops_target_met"] and len(res["flops_probes"]) == 14
    assert abs(res["flops_ratio_achieved"] - 0.6) == min(abs(r - 0.6) for _, r in res["flops_probes"]) < TOL
    assert any("discrete channel counts" in s for s in lines)
    with pytest.raises(ValueError):
        search_keep_ratio(m, units, lambda p: None, 1.0, TOL, SIZE)
    with pytest.raises(ValueError):
        search_keep_ratio(m, units, lambda p: None, 0.5, 0.0, SIZE)


# ---- select == scores + select_from_scores for every PruningMethod ----------------------------
@pytest.mark.parametrize("name", ["uniform", "slimming", "fpgm", "thinet", "cap", "sirfp"])
@pytest.mark.parametrize("keep", [0.3, 0.6])
def test_select_unchanged_and_equal_to_select_from_scores(name, keep):
    m, units = _toy()
    with torch.no_grad():  # distinct γ so that slimming / CAP do not tie everywhere
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.1, 1.0)
    meth = build_method({"name": name, "epochs": 0, "calib_batches": 1, "samples_per_batch": 8})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = meth.select(m, units, keep, "ind", 1, calib_loader=_calib())
        b = meth.select_from_scores(meth.scores(m, units, calib_loader=_calib()), units, keep, "ind", 1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- config -----------------------------------------------------------------------------------
def test_config_defaults_and_bad_values():
    cfg = load_config(None)
    assert cfg["prune"]["target_flops_ratio"] is None and cfg["prune"]["flops_tolerance"] == 0.01
    assert load_config(None, ["prune.target_flops_ratio=0.5"])["prune"]["target_flops_ratio"] == 0.5
    for bad in ("1.0", "0", "-0.2", "1.5", "abc", "true"):
        with pytest.raises(ConfigError, match=r"prune\.target_flops_ratio"):
            load_config(None, [f"prune.target_flops_ratio={bad}"])
    for bad in ("0", "-0.01", "abc", "null"):
        with pytest.raises(ConfigError, match=r"prune\.flops_tolerance"):
            load_config(None, ["prune.target_flops_ratio=0.5", f"prune.flops_tolerance={bad}"])
    with pytest.raises(ConfigError) as exc:  # both listed at once
        load_config(None, ["prune.target_flops_ratio=2", "prune.flops_tolerance=0"])
    assert "prune.target_flops_ratio" in str(exc.value) and "prune.flops_tolerance" in str(exc.value)
    # ACoSP finds its training keep ratio from the target: a keep ratio given as well is a contradiction
    load_config(None, ["method.name=acosp", "prune.target_flops_ratio=0.5"])
    with pytest.raises(ConfigError, match=r"method\.options\.keep_ratio"):
        load_config(None, ["method.name=acosp", "prune.target_flops_ratio=0.5", "method.options={keep_ratio: 0.5}"])
    load_config(None, ["method.name=acosp", "method.options={keep_ratio: 0.5}"])  # without a target: fine


def test_fingerprints():
    cfg = load_config(None)
    old = copy.deepcopy(cfg)  # a config from before the keys existed: same fingerprints (stages still shared)
    for k in ("target_flops_ratio", "flops_tolerance"):
        del old["prune"][k]
    assert stage_fingerprints(old) == stage_fingerprints(cfg)
    tol = copy.deepcopy(cfg)
    tol["prune"]["flops_tolerance"] = 0.05  # no target: the tolerance changes nothing
    assert stage_fingerprints(tol) == stage_fingerprints(cfg)
    t1, t2, t3 = (copy.deepcopy(cfg) for _ in range(3))
    t1["prune"]["target_flops_ratio"] = 0.5
    t2["prune"]["target_flops_ratio"] = 0.6
    t3["prune"]["target_flops_ratio"] = 0.5
    t3["prune"]["flops_tolerance"] = 0.02
    fps = [stage_fingerprints(c) for c in (cfg, t1, t2, t3)]
    for a in range(4):
        for b in range(a + 1, 4):
            # MTP's growing ℓ1 schedule trains for the budget: the target enters the sparsity stage too
            assert fps[a]["sparsity"] != fps[b]["sparsity"] and fps[a]["prune"] != fps[b]["prune"]
            assert fps[a]["evaluate"] != fps[b]["evaluate"]
    for c in (cfg, t1, t2, t3):  # the papers' constant α does not depend on the budget: one sparsity stage
        c["method"]["l1_schedule"] = "constant"
    fps = [stage_fingerprints(c) for c in (cfg, t1, t2, t3)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert fps[a]["sparsity"] == fps[b]["sparsity"] and fps[a]["prune"] != fps[b]["prune"]


def test_fingerprints_acosp_target_enters_its_sparsity_stage():
    """ACoSP trains for the widths the target gives, so the target changes its sparsity stage; so do the
    γ methods with the growing ℓ1 schedule (they train for the budget); not so for the others."""
    fp = {}
    for meth in ("acosp", "slimming", "slimming_constant", "fpgm"):
        for t in (None, 0.5, 0.6):
            sets = [f"method.name={meth.split('_')[0]}"] + (["method.l1_schedule=constant"] if "constant" in meth else [])
            cfg = load_config(None, sets + ([f"prune.target_flops_ratio={t}"] if t else []))
            fp[meth, t] = stage_fingerprints(cfg)["sparsity"]
    assert len({fp["acosp", t] for t in (None, 0.5, 0.6)}) == 3
    assert len({fp["slimming", t] for t in (None, 0.5, 0.6)}) == 3
    assert len({fp["slimming_constant", t] for t in (None, 0.5, 0.6)}) == 1
    assert len({fp["fpgm", t] for t in (None, 0.5, 0.6)}) == 1


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_acosp_training_keep_ratio_search(target):
    """The searched keep ratio's ACoSP widths (acosp_k per unit) prune to the target within tolerance."""
    from segprune.methods.acosp import acosp_k
    from segprune.pruning.search import search_training_keep_ratio
    m, units = _toy()
    meth = build_method({"name": "acosp", "options": {"min_keep": 2}})
    res = search_training_keep_ratio(m, units, meth, target, TOL, SIZE, min_channels=1)
    assert res["flops_target_met"] and abs(res["flops_ratio_achieved"] - target) <= TOL and "kept" not in res
    p = res["keep_ratio_found"]
    assert meth.keep_ratio == p  # the method now trains for the keep ratio found
    widths = meth.fixed_widths(units, p, 1)
    assert widths == {u.name: acosp_k(u.channels, p, 2) for u in units}
    kept = {n: torch.arange(k) for n, k in widths.items()}
    assert abs(_independent_ratio(m, units, kept) - target) <= TOL
    # a lower p would give fewer FLOPs: the widths grow with p
    lower = meth.fixed_widths(units, p / 2, 1)
    assert all(lower[n] <= widths[n] for n in widths) and sum(lower.values()) < sum(widths.values())


def test_acosp_pipeline_meets_target_with_the_trained_widths(tmp_path):
    """Through the pipeline: the widths are fixed before sparsity training, the masks are trained for
    them, and the prune stage keeps as many channels per unit as the hard masks did."""
    from segprune.methods.acosp import acosp_k
    cfg = copy.deepcopy(TINY)
    cfg["method"].update({"name": "acosp", "options": {"min_keep": 1, "end_epoch_frac": 0.5}})
    cfg["prune"].update({"target_flops_ratio": 0.5, "min_channels": 1})
    p = tmp_path / "acosp.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["run", str(p), "--out", str(out), "--quiet"]) == 0
    sp = json.loads((out / "stages/03_sparsity/done.json").read_text())
    pr = json.loads((out / "stages/04_prune/done.json").read_text())
    p_found = sp["flops_search"]["keep_ratio_found"]
    assert pr["keep_ratio_found"] == p_found and pr["target_flops_ratio"] == 0.5
    assert pr["flops_target_met"] and abs(pr["flops_ratio_achieved"] - 0.5) <= TOL
    units = json.loads((out / "stages/04_prune/arch.json").read_text())["widths"]["units"]
    assert all(u["kept"] == acosp_k(u["channels"], p_found, 1) for u in units.values())
    assert sp["kept"] == sum(u["kept"] for u in units.values())  # the hard masks kept those counts
    assert "widths fixed before sparsity training" in (out / "logs/prune.log").read_text()
    assert "searching its training keep ratio" in (out / "logs/sparsity.log").read_text()


# ---- through the pipeline ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def target_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flops")
    cfg = copy.deepcopy(TINY)
    cfg["prune"]["target_flops_ratio"] = 0.6
    p = tmp / "tiny.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp / "out"
    assert main(["run", str(p), "--out", str(out), "--quiet"]) == 0
    return p, out


def test_pipeline_meets_target_and_records_it(target_run):
    _, out = target_run
    m = json.loads((out / "metrics.json").read_text())
    done = json.loads((out / "stages" / "04_prune" / "done.json").read_text())
    log = (out / "logs" / "prune.log").read_text()
    assert m["target_flops_ratio"] == 0.6 == done["target_flops_ratio"]
    assert m["flops_tolerance"] == TOL
    assert m["keep_ratio_found"] == done["keep_ratio_found"] == m["keep_ratio"] and m["keep_ratio_config"] == 0.5
    assert m["flops_ratio_achieved"] == done["flops_ratio_achieved"] == m["ratios"]["flops"]
    assert done["flops_pruned"] == m["pruned"]["flops"] and done["flops_unpruned"] == m["baseline"]["flops"]
    assert "keep ratio 0.5 is ignored" in log
    # this toy reaches 0.6 within the tolerance (the unreachable case: test_unreachable_target_reports_closest)
    assert m["flops_target_met"] is True and done["flops_target_met"] is True
    assert abs(m["ratios"]["flops"] - 0.6) <= TOL and "FLOPs target 0.6 met" in log
    assert min(abs(r - 0.6) for _, r in done["flops_probes"]) == pytest.approx(abs(done["flops_probes"][-1][1] - 0.6))
    assert len(done["flops_probes"]) <= 14
    assert "FLOPs target 0.6x" in (out / "report.md").read_text()


def test_pipeline_baseline_method_scores_once_and_shares_stages(target_run, tmp_path, monkeypatch):
    """FPGM with the same target: pre-training and baseline adopted from the MTP run, scores computed once."""
    src, first = target_run
    cfg = load_config(src, ["method.name=fpgm", "method.epochs=0"])
    from segprune.methods.fpgm import FPGM
    calls = {"scores": 0, "select": 0}
    orig = FPGM.scores

    def counting(self, *a, **k):
        calls["scores"] += 1
        return orig(self, *a, **k)
    monkeypatch.setattr(FPGM, "scores", counting)
    monkeypatch.setattr(FPGM, "select", lambda *a, **k: calls.__setitem__("select", 1))
    out = tmp_path / "fpgm"
    Pipeline(cfg, out, quiet=True, share=[first]).run(stop_after="prune")
    assert json.loads((out / "stages" / "02_train_seg" / "done.json").read_text()).get("shared_from") == str(first)
    assert calls == {"scores": 1, "select": 0}
    done = json.loads((out / "stages" / "04_prune" / "done.json").read_text())
    assert done["flops_target_met"] and abs(done["flops_ratio_achieved"] - 0.6) <= TOL


def test_old_run_folder_without_the_keys_still_resumes(target_run, tmp_path):
    """A run folder whose config.yaml predates the two keys is not refused as 'another config'."""
    cfg = merge(DEFAULTS, yaml.safe_load(yaml.safe_dump(TINY)))
    out = tmp_path / "old"
    out.mkdir()
    old = copy.deepcopy(cfg)
    del old["prune"]["target_flops_ratio"], old["prune"]["flops_tolerance"]
    (out / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    Pipeline(cfg, out, quiet=True)  # no ConfigError
    changed = copy.deepcopy(cfg)
    changed["prune"]["target_flops_ratio"] = 0.5
    with pytest.raises(ConfigError, match="target_flops_ratio"):
        Pipeline(changed, out, quiet=True)


def test_compare_shows_target_column(target_run, tmp_path):
    _, out = target_run
    # a channel-ratio run next to it (fabricated from the same metrics: only the target differs)
    chan = tmp_path / "chan"
    (chan / "stages" / "02_train_seg").mkdir(parents=True)
    (chan / "stages" / "02_train_seg" / "done.json").write_text((out / "stages" / "02_train_seg" / "done.json").read_text())
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["prune"]["target_flops_ratio"] = None
    (chan / "config.yaml").write_text(yaml.safe_dump(cfg))
    m = json.loads((out / "metrics.json").read_text())
    m.update(keep_ratio=0.5, target_flops_ratio=None, keep_ratio_found=None, flops_target_met=None)
    (chan / "metrics.json").write_text(json.dumps(m))
    runs = collect_runs([out, chan])
    assert {r.target_label for r in runs} == {"FLOPs 0.60×", "channels 0.5×"}
    md = render_table(runs)
    assert "| method | keep | threshold | target |" in md
    flops_row = next(line for line in md.splitlines() if "| FLOPs 0.60× |" in line)
    assert flops_row.startswith("| mtp | ") and f"{runs[0].keep:.3f}×" in flops_row
    assert any(line.startswith("| mtp | 0.5× | ind | channels 0.5× |") for line in md.splitlines())
    rows = {r["run"]: r for r in csv.DictReader(io.StringIO(write_csv(runs)))}
    assert rows["out"]["target"] == "flops 0.6" and float(rows["out"]["target_flops_ratio"]) == 0.6
    assert rows["chan"]["target"] == "channels 0.5" and rows["chan"]["target_flops_ratio"] == ""
