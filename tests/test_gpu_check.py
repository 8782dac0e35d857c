"""benchmarks/gpu_check.py, the first command to run on a GPU machine, run here on the CPU.

The script is run once (a subprocess, as a user runs it) for every registered method; the table it
writes must say pass for every method and check (pipeline, resume after an interruption, export,
benchmark) and carry step times and peak memory. ``--device cuda`` on a machine without CUDA must
stop before writing anything, naming CUDA. ``_compare`` (the resume check's verdict) must see a
difference when there is one, so that the resume rows can fail.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segprune.methods.base import method_names

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.pop("SEGPRUNE_KILL_AT", None)
    p = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, env=env, timeout=900)
    return out, p


def test_every_method_passes_every_check(checked):
    out, p = checked
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "ALL PASSED" in p.stdout
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["ok"] and res["failed"] == 0 and res["device"]["type"] == "cpu"
    rows = {(r["method"], r["check"]): r for r in res["rows"]}
    methods = list(method_names())
    assert res["methods"] == methods
    want = {("-", "baseline"), (methods[0], "export"), (methods[0], "benchmark")}
    want |= {(m, c) for m in methods for c in ("pipeline", "resume")}
    assert set(rows) == want
    for key, r in rows.items():
        assert r["status"] == "pass", (key, r["note"])
        assert r["seconds"] > 0 and r["peak_mem_mb"] > 0 and r["peak_mem_kind"] == "cpu_max_rss_process", key
    for m in methods:  # training checks carry a step time; the resume check interrupted mid-stage where there is training
        assert rows[(m, "pipeline")]["step_s"] > 0
        if rows[(m, "resume")]["step_s"] is not None:
            assert "mid-stage" in rows[(m, "resume")]["note"]
    assert sum("mid-stage" in rows[(m, "resume")]["note"] for m in methods) >= 4  # mtp, slimming, cap, sirfp, acosp
    md = (out / "gpu_check.md").read_text()
    assert md.count("| pass |") == len(rows) and "ALL PASSED" in md
    assert (out / "export" / f"{methods[0]}.onnx").is_file() and (out / "benchmark" / "benchmark.json").is_file()


def test_compare_sees_a_difference(checked, tmp_path):
    """The resume verdict is not vacuous: other widths, or one changed weight, are reported."""
    out, _ = checked
    gc = _module()
    runs = out / "runs"
    assert gc._compare(runs / "mtp_resume", runs / "mtp", exact=True) is None
    other = tmp_path / "other"
    shutil.copytree(runs / "mtp", other)
    arch_file = next((other / "stages").glob("*_prune")) / "arch.json"
    arch = json.loads(arch_file.read_text())
    unit = next(iter(arch["widths"]["units"].values()))
    unit["kept"] -= 1
    arch_file.write_text(json.dumps(arch))
    assert "widths differ at 1 units" in gc._compare(other, runs / "mtp", exact=True)
    a = gc._state(runs / "mtp")
    b = {k: v.clone() for k, v in a.items()}
    k = next(k for k, v in b.items() if v.is_floating_point() and v.numel() > 1 and "weight" in k)
    b[k].view(-1)[0] += 1e-6 * max(1.0, float(b[k].abs().max()))
    assert "bitwise" in gc._state_diff(b, a, exact=True, what="w")
    assert gc._state_diff(b, a, exact=False, what="w") is None  # within RESUME_RTOL
    b[k].view(-1)[0] += 1.0 * max(1.0, float(b[k].abs().max()))
    assert "relative difference" in gc._state_diff(b, a, exact=False, what="w")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_fails_before_writing(tmp_path, capsys):
    gc = _module()
    out = tmp_path / "out"
    assert gc.main(["--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "device='cuda'" in err
    assert not out.exists()
    assert gc.main(["--device", "cpu", "--out", str(out), "--methods", "mtp,nosuch"]) == 2
    assert "nosuch" in capsys.readouterr().err and not out.exists()


def test_a_failing_check_is_a_fail_row(tmp_path):
    """An exception in a check becomes a FAIL row with the message, and its traceback goes to errors.log."""
    gc = _module()
    ctx = gc.Ctx()
    ctx.device, ctx.out, ctx.quiet = torch.device("cpu"), tmp_path, True

    def broken(ctx):
        raise AssertionError("widths differ at 3 units")
    rows = []
    gc._row(rows, "mtp", "resume", ctx, broken)
    assert rows[0]["status"] == "FAIL" and "widths differ at 3 units" in rows[0]["note"]
    assert "AssertionError" in (tmp_path / "errors.log").read_text()
