"""Stage fingerprints, stage sharing between runs, and the resumable sweep runner."""
import copy
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from segprune.config import ConfigError, DEFAULTS, merge
from segprune.pipeline import Pipeline, stage_fingerprints
from segprune.sweep import _locked_by_other, _release, _try_lock, load_sweep, run_sweep, sweep_status

from conftest import TINY


def _cfg(**over):
    cfg = merge(DEFAULTS, copy.deepcopy(TINY))
    for k, v in over.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return cfg


def _first_diff(a, b):
    return next((s for s in a if a[s] != b[s]), None)


def test_fingerprints_change_exactly_where_the_config_starts_to_matter():
    base = stage_fingerprints(_cfg(**{"train.seed": 0}))
    assert _first_diff(base, stage_fingerprints(_cfg(**{"train.seed": 0, "seed": 7}))) == "sparsity"
    assert _first_diff(base, stage_fingerprints(_cfg(**{"train.seed": 1}))) == "pretrain_cls"
    # MTP's growing ℓ1 schedule trains for the budget: the threshold mode changes its sparsity stage ...
    assert _first_diff(base, stage_fingerprints(_cfg(**{"train.seed": 0, "prune.threshold_mode": "uni"}))) == "sparsity"
    # ... the paper's constant α does not (the budget only enters at the prune stage)
    const = stage_fingerprints(_cfg(**{"train.seed": 0, "method.l1_schedule": "constant"}))
    assert _first_diff(const, stage_fingerprints(_cfg(**{"train.seed": 0, "method.l1_schedule": "constant",
                                                         "prune.threshold_mode": "uni"}))) == "prune"
    assert _first_diff(base, stage_fingerprints(_cfg(**{"train.seed": 0, "finetune.cls.epochs": 0}))) == "finetune_cls"
    assert _first_diff(base, stage_fingerprints(_cfg(**{"train.seed": 0, "train.seg.epochs": 5}))) == "train_seg"
    assert _first_diff(base, stage_fingerprints(_cfg(**{"train.seed": 0, "method.alpha1": 0.5}))) == "sparsity"
    # options of another method, worker count and the data scan do not change anything
    assert _first_diff(base, stage_fingerprints(_cfg(**{"train.seed": 0, "method.alpha": 0.5}))) is None
    assert _first_diff(base, stage_fingerprints(_cfg(**{"train.seed": 0, "threads": 2, "data.seg.validate": False}))) is None
    # train.seed null means "the top-level seed"
    assert stage_fingerprints(_cfg(seed=0))["train_seg"] == base["train_seg"]


def _sweep_file(tmp_path, runs, grid=None):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    sw = {"base": "tiny.yaml", "set": {"train.seed": 0}, "runs": runs}
    if grid:
        sw["grid"] = grid
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(sw))
    return p


def test_sweep_file_errors_list_every_bad_run(tmp_path):
    p = _sweep_file(tmp_path, [{"prune.keep_ratio": 1.5}, {"method.nmae": "mtp"}, {"name": "a"}, {"name": "a"}])
    with pytest.raises(ConfigError) as e:
        load_sweep(p)
    msg = str(e.value)
    assert "keep_ratio" in msg and "method.nmae" in msg and "duplicate" in msg and str(p) in msg


def test_grid_and_runs_are_expanded_with_readable_names(tmp_path):
    p = _sweep_file(tmp_path, [{"method.name": "mtp", "seed": 2}],
                    grid={"method.name": ["mtp", "fpgm"], "prune.keep_ratio": [0.5, 0.75]})
    _, runs = load_sweep(p)
    names = [r.name for r in runs]
    assert names == ["mtp_k0.5", "mtp_k0.75", "fpgm_k0.5", "fpgm_k0.75", "mtp_s2"]
    assert runs[3].cfg["method"]["name"] == "fpgm" and runs[3].cfg["prune"]["keep_ratio"] == 0.75
    assert all(r.cfg["train"]["seed"] == 0 for r in runs)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    p = _sweep_file(tmp, [{"method.name": "mtp", "seed": 3},
                          {"method.name": "mtp", "seed": 3, "prune.threshold_mode": "uni"},
                          {"method.name": "fpgm", "seed": 3}])
    out = tmp / "out"
    lines = []
    st = run_sweep(p, out, quiet=True, log=lines.append)
    return p, out, st, lines


def test_sweep_runs_everything_and_shares_stages(swept):
    p, out, st, lines = swept
    assert sorted(st["finished"]) == ["fpgm_s3", "mtp_s3", "mtp_uni_s3"] and not st["pending"]
    def done(run, stage):
        return json.loads((out / run / "stages" / stage / "done.json").read_text())
    # the first run computed the baseline, the others adopted it (hard links, same bytes)
    assert "shared_from" not in done("mtp_s3", "02_train_seg")
    for run in ("mtp_uni_s3", "fpgm_s3"):
        assert done(run, "01_pretrain_cls")["shared_from"].endswith("mtp_s3")
        assert done(run, "02_train_seg")["shared_from"].endswith("mtp_s3")
        a = (out / "mtp_s3" / "stages/02_train_seg/model.safetensors").read_bytes()
        assert (out / run / "stages/02_train_seg/model.safetensors").read_bytes() == a
    # MTP's growing ℓ1 schedule trains for the budget, threshold mode included: Uni runs its own sparsity
    # stage (budget-independent training is shared across prune settings: tests/test_round_to.py, fpgm)
    assert "shared_from" not in done("mtp_uni_s3", "03_sparsity")
    assert done("mtp_uni_s3", "03_sparsity")["fingerprint"] != done("mtp_s3", "03_sparsity")["fingerprint"]
    assert "shared_from" not in done("mtp_uni_s3", "04_prune")
    assert "shared_from" not in done("fpgm_s3", "03_sparsity")
    m_ind = json.loads((out / "mtp_s3" / "metrics.json").read_text())
    m_uni = json.loads((out / "mtp_uni_s3" / "metrics.json").read_text())
    assert m_ind["baseline"]["miou"] == m_uni["baseline"]["miou"]
    assert m_uni["threshold_mode"] == "uni"
    assert any("estimated remaining work" in line for line in lines)


def test_two_worker_processes_end_to_end(swept, tmp_path, capfd):
    """`segprune sweep --jobs 2`: two worker processes share the grid through the lock files; every
    run is started by exactly one worker and ends with the metrics of the one-process sweep."""
    from segprune.cli import main
    p, out, _, _ = swept
    out2 = tmp_path / "jobs2"
    assert main(["sweep", str(p), "--out", str(out2), "--jobs", "2", "--threads", "1", "--quiet"]) == 0
    printed = capfd.readouterr()
    text = printed.out + printed.err
    for run in ("mtp_s3", "mtp_uni_s3", "fpgm_s3"):
        assert text.count(f"starting {run};") == 1, text
        a = json.loads((out / run / "metrics.json").read_text())
        b = json.loads((out2 / run / "metrics.json").read_text())
        assert b["pruned"]["miou"] == a["pruned"]["miou"] and b["layer_widths"] == a["layer_widths"]
    assert not list((out2 / ".locks").glob("*.lock")) or all(not _locked_by_other(q) for q in (out2 / ".locks").glob("*.lock"))


def test_sweep_skips_finished_runs(swept):
    p, out, _, _ = swept
    before = {r: (out / r / "metrics.json").stat().st_mtime_ns for r in ("mtp_s3", "mtp_uni_s3", "fpgm_s3")}
    lines = []
    st = run_sweep(p, out, quiet=True, log=lines.append)
    assert not any("starting" in line for line in lines)
    assert {r: (out / r / "metrics.json").stat().st_mtime_ns for r in before} == before
    assert len(st["finished"]) == 3


def test_killed_run_resumes_with_the_same_result(swept, tmp_path):
    """A worker killed mid-run (stale lock, half-finished run folder) is taken over and resumed."""
    p, out, _, _ = swept
    _, runs = load_sweep(p)
    fresh = tmp_path / "fresh"
    (fresh / ".locks").mkdir(parents=True)
    # a killed worker: its lock names a dead process, its run stopped after the sparsity stage
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (fresh / ".locks" / "mtp_s3.lock").write_text(str(dead.pid))
    Pipeline(copy.deepcopy(runs[0].cfg), fresh / "mtp_s3", quiet=True).run(stop_after="sparsity")
    sparsity_done = (fresh / "mtp_s3" / "stages/03_sparsity/done.json").read_bytes()
    assert sweep_status(fresh, runs[:1])["pending"] == ["mtp_s3"]
    st = run_sweep(_only_first(p, tmp_path), fresh, quiet=True, log=lambda s: None)
    assert st["finished"] == ["mtp_s3"] and not (fresh / ".locks" / "mtp_s3.lock").exists()
    assert (fresh / "mtp_s3" / "stages/03_sparsity/done.json").read_bytes() == sparsity_done  # not redone
    resumed = json.loads((fresh / "mtp_s3" / "metrics.json").read_text())
    straight = json.loads((out / "mtp_s3" / "metrics.json").read_text())
    assert resumed["pruned"]["miou"] == straight["pruned"]["miou"]
    assert resumed["layer_widths"] == straight["layer_widths"]


def _only_first(p, tmp_path):
    sw = yaml.safe_load(p.read_text())
    sw["runs"] = sw["runs"][:1]
    sw["base"] = str(p.parent / sw["base"])
    q = tmp_path / "one.yaml"
    q.write_text(yaml.safe_dump(sw))
    return q


def test_live_lock_is_respected(swept, tmp_path):
    p, out, _, _ = swept
    q = _only_first(p, tmp_path)
    (tmp_path / "o" / ".locks").mkdir(parents=True)
    other = _holder(tmp_path / "o" / ".locks" / "mtp_s3.lock")  # a live worker
    try:
        st = run_sweep(q, tmp_path / "o", quiet=True, log=lambda s: None)
    finally:
        other.kill()
    assert st["running"] == ["mtp_s3"] and not (tmp_path / "o" / "mtp_s3").exists()


def _holder(lock):
    """A live process holding ``lock`` the way a sweep worker does (flock via _try_lock)."""
    code = ("import sys, time; from pathlib import Path; from segprune.sweep import _try_lock; "
            "assert _try_lock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_is_freed_when_its_worker_dies(tmp_path):
    lock = tmp_path / ".locks" / "run.lock"
    holder = _holder(lock)
    try:
        assert _locked_by_other(lock) and not _try_lock(lock)
    finally:
        holder.kill()
        holder.wait()
    assert lock.exists() and not _locked_by_other(lock)  # SIGKILL left the file, the kernel dropped the lock
    assert _try_lock(lock) and lock.read_text() == str(os.getpid())
    _release(lock)
    assert not lock.exists()


@pytest.mark.parametrize("content", ["garbage", "", "PID"])
def test_stale_lock_file_content_does_not_matter(tmp_path, content):
    """Garbage, an empty file, or a pid that is alive (pid reuse: here our own) but holds no lock."""
    lock = tmp_path / "run.lock"
    lock.write_text(str(os.getpid()) if content == "PID" else content)
    assert not _locked_by_other(lock)
    assert _try_lock(lock)
    _release(lock)


def test_racing_workers_take_a_stale_lock_once(tmp_path):
    """Eight processes race for one stale lock at the same instant: exactly one wins."""
    lock = tmp_path / "run.lock"
    lock.write_text("999999999")  # a killed worker's file
    go = time.time() + 5  # after every process has imported torch
    code = ("import sys, time; from pathlib import Path; from segprune.sweep import _try_lock; "
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); ok = _try_lock(Path(sys.argv[1])); "
            "print(int(ok), flush=True); time.sleep(60)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(lock), str(go)], stdout=subprocess.PIPE, text=True)
             for _ in range(8)]
    wins = [int(p.stdout.readline().strip() or 0) for p in procs]
    for p in procs:
        p.kill()
        p.wait()
    assert sum(wins) == 1, wins


def test_compare_plots_from_real_run_folders(swept, tmp_path):
    """Table, Pareto, Figure-5 and Figure-6 analogs from the sweep's run folders."""
    from segprune.compare import compare
    _, out, _, _ = swept
    lines = []
    res = compare([out], tmp_path / "cmp", n_images=2, log=lines.append)
    assert res["runs"] == 3 and res["settings"] == 3
    for f in ("pareto.png", "widths.png", "qualitative.png"):
        data = (tmp_path / "cmp" / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert any("eval images [0, 7]" in line for line in lines)  # first and last of the 8 eval images
    md = (tmp_path / "cmp" / "table.md").read_text()
    assert "| mtp | 0.5× | uni |" in md and "| fpgm | 0.5× | - |" in md


def test_a_failing_run_does_not_stop_the_sweep(tmp_path):
    p = _sweep_file(tmp_path, [{"name": "boom", "method.name": "fpgm", "train.seg.lr": 1.0e12},
                               {"name": "ok", "method.name": "fpgm"}])
    out = tmp_path / "out"
    lines = []
    st = run_sweep(p, out, quiet=True, log=lines.append)
    assert list(st["failed"]) == ["boom"] and st["failed"]["boom"].startswith("NonFiniteLossError")
    assert "ok" in st["finished"] and "boom" in st["pending"]          # retried by the next start
    assert "NonFiniteLossError" in (out / ".failures" / "boom.txt").read_text()
    assert any("boom FAILED" in ln for ln in lines) and "FAILED in this worker: boom" in lines[-1]
    assert (out / "boom" / "stages" / "01_pretrain_cls" / "done.json").is_file()  # finished stages kept
    assert not (out / ".locks" / "boom.lock").exists() or not _locked_by_other(out / ".locks" / "boom.lock")
