"""Kill-anywhere resume: SIGKILL in the middle of sparsity training and of fine-tuning, then resume;
the result is bitwise the one of an uninterrupted run. Also: a non-finite loss stops cleanly."""
import copy
import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import TINY

CFG = copy.deepcopy(TINY)
CFG["checkpoint_every"] = 2
CFG["method"]["epochs"] = 2          # 4 iterations per epoch: 8 sparsity iterations
CFG["finetune"]["seg"]["epochs"] = 2


def _run(cfg_path, out, kill_at=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SEGPRUNE_KILL_AT", None)
    if kill_at:
        env["SEGPRUNE_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "segprune.cli", "run", str(cfg_path), "--out", str(out), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    straight = tmp / "straight"
    assert _run(cfg, straight).returncode == 0
    killed = tmp / "killed"
    states = []
    # sparsity: killed at 5, resumed from the checkpoint at 4 = the end of epoch 1 (the next epoch's data
    # order must come out as in the uninterrupted run); fine-tuning: mid-epoch (checkpoint at 2)
    for kill in ("sparsity:5", "finetune_seg:3"):
        r = _run(cfg, killed, kill)
        assert r.returncode == -9, r.stderr[-2000:]
        states.append({p.relative_to(killed).as_posix() for p in killed.rglob("*") if p.is_file()})
    r = _run(cfg, killed)
    assert r.returncode == 0, r.stderr[-2000:]
    return straight, killed, states


def test_kill_leaves_an_in_stage_checkpoint_and_no_done_marker(runs):
    _, _, (after_first, after_second) = runs
    assert "stages/03_sparsity/partial.safetensors" in after_first
    assert "stages/03_sparsity/done.json" not in after_first
    assert "stages/02_train_seg/done.json" in after_first
    assert "stages/03_sparsity/done.json" in after_second
    assert "stages/03_sparsity/partial.safetensors" not in after_second  # removed once the stage is done
    assert "stages/06_finetune_seg/partial.safetensors" in after_second
    assert "stages/06_finetune_seg/done.json" not in after_second


def test_resumed_run_equals_uninterrupted_run(runs):
    straight, killed, _ = runs
    for f in ("stages/03_sparsity/scores.safetensors", "stages/03_sparsity/model.safetensors",
              "stages/04_prune/arch.json", "stages/06_finetune_seg/model.safetensors"):
        assert (straight / f).read_bytes() == (killed / f).read_bytes(), f
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert a["layer_widths"] == b["layer_widths"]
    for k in ("miou", "pixel_acc", "params", "flops", "cls_top1"):
        assert a["pruned"][k] == b["pruned"][k], k
    log = (killed / "logs" / "sparsity.log").read_text()
    assert "resumed from" in log and "at iteration 4" in log


def test_non_finite_loss_stops_with_the_step_and_keeps_finished_stages(tmp_path):
    cfg = copy.deepcopy(CFG)
    cfg["train"]["seg"]["lr"] = 1.0e12
    p = tmp_path / "nan.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = _run(p, tmp_path / "out")
    assert r.returncode == 2
    assert "stage train_seg: loss became" in r.stderr and "at step" in r.stderr
    assert (tmp_path / "out" / "stages/01_pretrain_cls/done.json").is_file()
    assert not (tmp_path / "out" / "stages/02_train_seg/done.json").exists()
