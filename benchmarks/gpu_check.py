"""Smoke check of every method through every stage on one device: the script to run first on a GPU machine.

For every registered method (``segprune.methods.base.method_names()``) on a tiny synthetic config (a
width-0.125 DeepLabv3-R18 at 32x32, a few iterations per stage) on ``--device``:

* ``pipeline``: the whole pipeline (pretrain_cls -> train_seg -> sparsity -> prune -> finetune_cls ->
  finetune_seg -> evaluate); the two baseline stages are trained once (row ``baseline``) and adopted by
  every method (``Pipeline(share=...)``). Passes if every stage finished, the metrics are finite and the
  pruned network is smaller than the baseline.
* ``resume``: the same run interrupted (an exception at the in-stage fault point after the first
  checkpointed sparsity iteration; for a method without sparsity training, a stop after the sparsity
  stage) and completed by a fresh ``Pipeline`` on the same folder up to the prune stage. Passes if the
  widths equal those of the uninterrupted run and the pruned weights are bitwise equal (CPU) or within
  ``RESUME_RTOL`` (CUDA, where kernels are not bitwise deterministic).

and for the first method's run: ``segprune export`` to ONNX (ONNX Runtime vs PyTorch check on
``--device``) and ``segprune benchmark --device``. ``--torchrun N`` adds a check that runs the first
method's config under ``python -m torch.distributed.run --nproc_per_node=N -m segprune.cli run``: every
training stage trained by N processes with bitwise identical replicas (done.json), the baseline weights
within ``RESUME_RTOL`` of the 1-process run (N processes add in another order, so float32 agrees to
rounding only; docs/distributed.md), and the widths compared with the 1-process run's (reported, not
required: rounding can flip a channel whose score sits at the threshold).

Prints a pass/fail table (method x check, seconds, seconds per training step where the check trains:
the trained stages' wall time over their iterations from done.json, which includes each stage's own
evaluation and checkpoint saves, so at this tiny scale it bounds the step time from above; peak memory) and writes it to ``--out``/gpu_check.json and gpu_check.md; exit status 0 only if every
check passed (1: a check failed; 2: bad arguments, e.g. ``--device cuda`` without CUDA, said before
anything is written). Peak memory: ``torch.cuda.max_memory_allocated`` per check on CUDA; on the CPU the
process's maximum resident set size so far (``resource.getrusage``; monotone, so a later row is at least
the earlier one); not measured for the ``torchrun`` check (separate processes).

    python benchmarks/gpu_check.py --device cpu --out runs/gpu_check
    python benchmarks/gpu_check.py --device cuda --out runs/gpu_check_cuda --torchrun 2   # needs 2 GPUs
    python benchmarks/gpu_check.py --device cuda --amp fp16 --out runs/gpu_check_fp16     # train.amp of every run
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import yaml

#: the tiny synthetic config (that of tests/conftest.py TINY, with fewer images and iterations):
#: every training stage runs ``ITERS`` iterations (``max_iters_per_epoch``), one epoch each.
ITERS = 2
TINY = {
    "seed": 3,
    "threads": 1,
    "checkpoint_every": 1,  # an in-stage checkpoint after every iteration: the resume check interrupts after one
    "model": {"name": "deeplabv3_resnet18", "width": 0.125, "aspp_channels": 16, "output_stride": 16},
    "data": {
        "seg": {"name": "synthetic", "input_size": [32, 32], "crop_size": [32, 32], "image_size": [32, 32],
                "num_train": 8, "num_eval": 4, "batch_size": 4, "eval_batch_size": 4},
        "cls": {"name": "synthetic", "input_size": [16, 16], "image_size": [16, 16], "num_train": 16, "num_eval": 8,
                "batch_size": 8, "eval_batch_size": 8},
    },
    "train": {"pretrain_cls": {"epochs": 1, "lr": 0.05, "max_iters_per_epoch": ITERS},
              "seg": {"epochs": 1, "lr": 0.02, "max_iters_per_epoch": ITERS}},
    "method": {"epochs": 1, "max_iters_per_epoch": ITERS},
    "prune": {"keep_ratio": 0.5, "threshold_mode": "ind", "min_channels": 1},
    "finetune": {"cls": {"epochs": 1, "lr": 0.01, "max_iters_per_epoch": ITERS},
                 "seg": {"epochs": 1, "lr": 0.01, "max_iters_per_epoch": ITERS}},
    "eval": {"latency_runs": 2, "latency_warmup": 1},
}
#: MTP's own keys (those of the tests' TINY config), added for MTP only
MTP_KEYS = {"alpha1": 0.05, "alpha2": 0.05, "mu0": 0.1, "rho": 1.2, "mu_max": 5.0, "update_every": 1}
#: relative tolerance (max |a - b| / max |b| over a tensor) for comparisons across runs on CUDA
RESUME_RTOL = 1e-3
#: the training stages whose done.json gives a per-step time
TRAIN_STAGES = ("pretrain_cls", "train_seg", "sparsity", "finetune_cls", "finetune_seg")
MARKER = ".gpu_check"  # marks a runs/ folder this script made (and may delete on the next run)


class Interrupted(Exception):
    """Raised at the in-stage fault point to simulate a killed process."""


def _config(method: str, device: str, threads: int, amp: str = "off") -> dict:
    raw = copy.deepcopy(TINY)
    raw["device"], raw["threads"] = device, threads
    raw["train"]["amp"] = amp
    raw["method"]["name"] = method
    if method == "mtp":
        raw["method"].update(MTP_KEYS)
    return raw


def _load(raw: dict, folder: Path, name: str) -> dict:
    from segprune.config import load_config
    p = folder / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(p)


class Meter:
    """Wall time and peak memory of one check."""

    def __init__(self, device: torch.device, children: bool = False):
        self.device, self.children = device, children

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.t0
        if self.children:  # (getrusage of children would report this process's size, inherited at fork)
            self.peak_mb, self.peak_kind = None, "not measured (separate processes)"
        elif self.device.type == "cuda":
            self.peak_mb, self.peak_kind = torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda_max_allocated"
        else:
            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
            self.peak_mb, self.peak_kind = (kb / 1024 if sys.platform != "darwin" else kb / 2**20), "cpu_max_rss_process"
        return False


def _stage_info(run: Path) -> dict[str, dict]:
    from segprune.checkpoint import load_json
    out = {}
    for d in sorted((run / "stages").glob("*_*")):
        if (d / "done.json").is_file():
            out[d.name.split("_", 1)[1]] = load_json(d / "done.json")
    return out


def _step_time(info: dict[str, dict], stages=TRAIN_STAGES) -> float | None:
    """Seconds per training iteration over the stages of ``info`` trained in this run (not adopted)."""
    total_s, total_it = 0.0, 0
    for st in stages:
        d = info.get(st)
        if d is None or "shared_from" in d:
            continue
        its = next((d[k] for k in ("iters", "iterations", "steps", "total_iters") if isinstance(d.get(k), int)), None)
        if its:
            total_s, total_it = total_s + float(d["wall_s"]), total_it + its
    return total_s / total_it if total_it else None


def _widths(run: Path) -> dict:
    from segprune.checkpoint import load_json
    arch = next((run / "stages").glob("*_prune")) / "arch.json"
    return {n: u["kept"] for n, u in load_json(arch)["widths"]["units"].items()}


def _state(run: Path, stage: str = "prune") -> dict[str, torch.Tensor]:
    from segprune.pipeline import load_run_model
    model, _ = load_run_model(next((run / "stages").glob(f"*_{stage}")))
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}


def _state_diff(sa: dict, sb: dict, exact: bool, what: str) -> str | None:
    """Why two state dicts differ: bitwise (``exact``) or by more than ``RESUME_RTOL`` relative to each
    tensor's largest entry; None if they agree."""
    if set(sa) != set(sb):
        return f"{what}: state_dict keys differ"
    for k in sb:
        if exact and not torch.equal(sa[k], sb[k]):
            return f"{what} differ (bitwise) at {k}"
        if not exact and sb[k].numel():
            rel = float((sa[k] - sb[k]).abs().max()) / max(float(sb[k].abs().max()), 1e-12)
            if not rel <= RESUME_RTOL:
                return f"{what} differ at {k}: max relative difference {rel:.2e} > {RESUME_RTOL:g}"
    return None


def _compare(a: Path, b: Path, exact: bool) -> str | None:
    """Why the pruned models of runs ``a`` and ``b`` differ (None if they agree)."""
    wa, wb = _widths(a), _widths(b)
    if wa != wb:
        diff = [n for n in wb if wa.get(n) != wb[n]]
        return f"widths differ at {len(diff)} units, e.g. {diff[0]}: {wa.get(diff[0])} vs {wb[diff[0]]}"
    return _state_diff(_state(a), _state(b), exact, "pruned weights")


def _patch_fault_point(fn):
    """Replace the in-stage fault point (``engine.resume.fault_point``, where ``SEGPRUNE_KILL_AT`` SIGKILLs a
    real run) in the modules that call it; returns an undo function."""
    import importlib
    mods = []
    for name in ("segprune.engine.train", "segprune.methods.mtp"):
        mod = importlib.import_module(name)
        if hasattr(mod, "fault_point"):
            mods.append((mod, mod.fault_point))
            mod.fault_point = fn
    if not mods:
        raise RuntimeError("no fault_point hook found in segprune.engine.train / segprune.methods.mtp")

    def undo():
        for mod, old in mods:
            mod.fault_point = old
    return undo


@contextlib.contextmanager
def _output_to(path: Path):
    """The printed output of a ``segprune.cli`` command goes to ``path`` (kept beside its results)."""
    with open(path, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


# ---------------------------------------------------------------------------------------------------------
def check_baseline(ctx) -> dict:
    from segprune.pipeline import Pipeline
    cfg = _load(_config(ctx.methods[0], ctx.spec, ctx.threads, ctx.amp), ctx.cfg_dir, "baseline")
    Pipeline(cfg, ctx.base, quiet=True).run(stop_after="train_seg")
    info = _stage_info(ctx.base)
    missing = [s for s in ("pretrain_cls", "train_seg") if s not in info]
    if missing:
        raise AssertionError(f"stages not finished: {missing}")
    return {"step_s": _step_time(info), "note": f"pretrain_cls top-1 {info['pretrain_cls'].get('top1', float('nan')):.3f}"}


def check_pipeline(ctx, method: str) -> dict:
    from segprune.pipeline import STAGES, Pipeline
    run = ctx.runs / method
    cfg = _load(_config(method, ctx.spec, ctx.threads, ctx.amp), ctx.cfg_dir, method)
    m = Pipeline(cfg, run, quiet=True, share=[ctx.base]).run()
    info = _stage_info(run)
    missing = [s for s in STAGES if s != "evaluate" and s not in info]
    if missing:
        raise AssertionError(f"stages not finished: {missing}")
    if not all(s in info and "shared_from" in info[s] for s in ("pretrain_cls", "train_seg")):
        raise AssertionError("the baseline stages were not adopted from the shared baseline run")
    for key in ("miou", "pixel_acc"):
        for side in ("baseline", "pruned"):
            v = m[side][key]
            if not (isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 1.0):
                raise AssertionError(f"metrics {side}.{key} = {v!r}: not a finite fraction")
    if not m["pruned"]["params"] < m["baseline"]["params"]:
        raise AssertionError(f"pruned params {m['pruned']['params']} not below baseline {m['baseline']['params']}")
    ctx.finished[method] = run
    return {"step_s": _step_time(info), "note": f"params x{m['ratios']['params']:.2f}, mIoU {m['pruned']['miou']:.3f}"}


def check_resume(ctx, method: str) -> dict:
    from segprune.pipeline import Pipeline
    if method not in ctx.finished:
        raise AssertionError("no finished pipeline run of this method to compare with (pipeline check failed)")
    run = ctx.runs / f"{method}_resume"
    cfg = _load(_config(method, ctx.spec, ctx.threads, ctx.amp), ctx.cfg_dir, method)
    fired = []

    def fault(stage, it):
        if stage == "sparsity" and it == 1:
            fired.append(it)
            raise Interrupted
    undo = _patch_fault_point(fault)
    try:
        Pipeline(cfg, run, quiet=True, share=[ctx.base]).run(stop_after="sparsity")
    except Interrupted:
        pass
    finally:
        undo()
    how = "mid-stage (sparsity iteration 1)" if fired else "after the sparsity stage (no sparsity training)"
    if fired and (not list((run / "stages").glob("*_sparsity/partial.safetensors"))):
        raise AssertionError("interrupted mid-stage but no in-stage checkpoint (partial.safetensors) was written")
    Pipeline(cfg, run, quiet=True, share=[ctx.base]).run(stop_after="prune")
    why = _compare(run, ctx.finished[method], exact=ctx.device.type == "cpu")
    if why:
        raise AssertionError(f"resumed {how} vs uninterrupted: {why}")
    info = _stage_info(run)
    return {"step_s": _step_time(info, ("sparsity",)),
            "note": f"interrupted {how}; same widths, weights {'bitwise' if ctx.device.type == 'cpu' else 'within tolerance'}"}


def check_export(ctx, method: str) -> dict:
    from segprune.cli import main as cli
    run = ctx.finished.get(method)
    if run is None:
        raise AssertionError("no finished pipeline run of this method (pipeline check failed)")
    onnx = ctx.out / "export" / f"{method}.onnx"
    onnx.parent.mkdir(parents=True, exist_ok=True)
    with _output_to(ctx.out / "export" / "export.log"):
        rc = cli(["export", str(run), "--onnx", str(onnx), "--images", "2", "--device", ctx.spec])
    if rc != 0 or not onnx.is_file():
        raise AssertionError(f"segprune export exited {rc}")
    rec = json.loads(Path(str(onnx) + ".json").read_text()) if Path(str(onnx) + ".json").is_file() else {}
    c = rec.get("check", {})
    return {"step_s": None, "note": f"ORT vs torch max|diff| {c.get('max_abs_diff', float('nan')):.1e}"}


def check_benchmark(ctx, method: str) -> dict:
    from segprune.cli import main as cli
    run = ctx.finished.get(method)
    if run is None:
        raise AssertionError("no finished pipeline run of this method (pipeline check failed)")
    out = ctx.out / "benchmark"
    out.mkdir(parents=True, exist_ok=True)
    with _output_to(out / "benchmark.log"):
        rc = cli(["benchmark", str(run), "--device", ctx.spec, "--batch", "1", "--runs", "3", "--warmup", "1",
                  "--out", str(out)])
    if rc != 0 or not (out / "benchmark.json").is_file():
        raise AssertionError(f"segprune benchmark exited {rc}")
    res = json.loads((out / "benchmark.json").read_text())
    ms = res["models"]["pruned"]["latency"]["1"]["eager"]["median_ms"]
    return {"step_s": None, "note": f"pruned eager batch 1: {ms:.2f} ms"}


def check_torchrun(ctx, method: str, nproc: int) -> dict:
    ref = ctx.finished.get(method)
    if ref is None:
        raise AssertionError("no finished 1-process run of this method (pipeline check failed)")
    run = ctx.runs / f"{method}_torchrun{nproc}"
    cfg_file = ctx.cfg_dir / f"{method}.yaml"  # the file the 1-process run loaded
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT", "SEGPRUNE_KILL_AT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "segprune.cli", "run", str(cfg_file), "--out", str(run), "--quiet"]
    log = ctx.out / f"torchrun_{method}.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=ctx.torchrun_timeout).returncode
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise AssertionError(f"torchrun exited {rc} (log {log}): {' | '.join(tail)}")
    info = _stage_info(run)
    bad = [st for st in TRAIN_STAGES if info.get(st, {}).get("world_size") != nproc
           or info.get(st, {}).get("replicas_identical") is not True]
    if bad:
        raise AssertionError(f"stages {bad}: not trained by {nproc} processes with identical replicas (done.json)")
    # 2 processes add the same numbers in another order: the baseline agrees to rounding (float32), see
    # docs/distributed.md; later stages amplify it and may flip a channel whose score sits at the threshold
    why = _state_diff(_state(run, "train_seg"), _state(ref, "train_seg"), exact=False, what="baseline (train_seg) weights")
    if why:
        raise AssertionError(f"{nproc} processes vs 1 process: {why}")
    wa, wb = _widths(run), _widths(ref)
    same = sum(wa.get(n) == k for n, k in wb.items())
    return {"step_s": _step_time(info),
            "note": f"replicas identical; baseline within {RESUME_RTOL:g} of 1 process; widths equal at {same}/{len(wb)} units"}


# ---------------------------------------------------------------------------------------------------------
class Ctx:
    pass


def _row(results: list, method: str, check: str, ctx, fn, *args, children: bool = False) -> None:
    rec = {"method": method, "check": check}
    meter = Meter(ctx.device, children=children)
    try:
        with meter:
            got = fn(ctx, *args)
        rec.update(status="pass", **got)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a table row
        rec.update(status="FAIL", step_s=None, note=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        with open(ctx.out / "errors.log", "a") as f:
            f.write(f"=== {method} / {check}\n{traceback.format_exc()}\n")
    rec.update(seconds=round(meter.seconds, 2), peak_mem_mb=None if meter.peak_mb is None else round(meter.peak_mb, 1),
               peak_mem_kind=meter.peak_kind)
    if rec["step_s"] is not None:
        rec["step_s"] = round(rec["step_s"], 4)
    results.append(rec)
    if not ctx.quiet:
        print(_fmt_row(rec), flush=True)


_HEAD = f"{'method':10s} {'check':10s} {'status':6s} {'time s':>8s} {'step s':>8s} {'peak MB':>9s}  note"


def _fmt_row(r: dict) -> str:
    step = "-" if r["step_s"] is None else f"{r['step_s']:.4f}"
    peak = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"
    return f"{r['method']:10s} {r['check']:10s} {r['status']:6s} {r['seconds']:8.2f} {step:>8s} {peak:>9s}  {r['note']}"


def _markdown(res: dict) -> str:
    lines = [f"# gpu_check on {res['device']['type']} ({res['device']['name']})", "",
             f"torch {res['torch_version']}, {res['iters']} iterations per training stage, threads {res['threads']}; "
             f"peak memory: {res['peak_mem_note']}. Total {res['total_s']:.1f} s. "
             f"**{'ALL PASSED' if res['ok'] else 'FAILED'}** ({res['failed']} failed of {len(res['rows'])}).", "",
             "| method | check | status | time (s) | step (s) | peak memory (MB) | note |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        step = "-" if r["step_s"] is None else f"{r['step_s']:.4f}"
        peak = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"
        lines.append(f"| {r['method']} | {r['check']} | {r['status']} | {r['seconds']:.2f} | {step} | {peak} | "
                     f"{r['note'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N (default cpu)")
    ap.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json/.md and the run folders "
                    "(its runs/ subfolder is replaced on every call; default runs/gpu_check)")
    ap.add_argument("--methods", help="comma-separated subset of the registered methods (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--torchrun", type=int, default=0, metavar="N",
                    help="also run the first method under torchrun with N processes and compare with 1 process "
                         "(N GPUs with --device cuda; gloo processes on the CPU)")
    ap.add_argument("--torchrun-timeout", type=int, default=900, help="seconds (default 900)")
    ap.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"),
                    help="train.amp of every run (fp16 needs CUDA; default off)")
    ap.add_argument("--quiet", action="store_true", help="print only the final table")
    a = ap.parse_args(argv)

    from segprune.config import ConfigError
    from segprune.engine.device import describe_device, resolve_device
    from segprune.methods.base import method_names
    try:  # every argument error before anything is written
        device = resolve_device(a.device)
        known = method_names()
        methods = list(known) if not a.methods else [m.strip() for m in a.methods.split(",") if m.strip()]
        bad = [m for m in methods if m not in known]
        if bad or not methods:
            raise ConfigError(f"--methods: unknown {bad or '(empty)'} (registered: {', '.join(known)})")
        if a.amp == "fp16" and device.type != "cuda":
            raise ConfigError(f"--amp fp16 needs a CUDA device (got --device {a.device}); use --amp bf16 on the CPU")
        if a.threads < 1 or a.torchrun < 0 or a.torchrun == 1:
            raise ConfigError("--threads must be >= 1 and --torchrun 0 (off) or >= 2")
        if a.torchrun and device.type == "cuda" and torch.cuda.device_count() < a.torchrun:
            raise ConfigError(f"--torchrun {a.torchrun} --device {a.device}: needs {a.torchrun} CUDA devices, "
                              f"{torch.cuda.device_count()} visible")
        out = Path(a.out)
        runs = out / "runs"
        if runs.exists() and not (runs / MARKER).is_file():
            raise ConfigError(f"{runs} exists and was not made by gpu_check.py; choose another --out")
    except ConfigError as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2

    if runs.exists():
        shutil.rmtree(runs)  # a fresh check every time (finished stages would otherwise be loaded, not run)
    for stale in ("errors.log", "export", "benchmark"):
        p = out / stale
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    runs.mkdir(parents=True)
    (runs / MARKER).write_text("made by benchmarks/gpu_check.py; replaced on its next run\n")
    ctx = Ctx()
    ctx.spec, ctx.device, ctx.threads, ctx.quiet, ctx.methods = a.device, device, a.threads, a.quiet, methods
    ctx.amp = a.amp
    ctx.out, ctx.runs, ctx.cfg_dir, ctx.base = out, runs, runs / "configs", runs / "_baseline"
    ctx.cfg_dir.mkdir()
    ctx.finished, ctx.torchrun_timeout = {}, a.torchrun_timeout
    torch.set_num_threads(a.threads)

    t0 = time.perf_counter()
    rows: list[dict] = []
    if not a.quiet:
        print(f"gpu_check on {device} ({describe_device(device)['name']}), methods: {', '.join(methods)}")
        print(_HEAD)
    _row(rows, "-", "baseline", ctx, check_baseline)
    for m in methods:
        _row(rows, m, "pipeline", ctx, check_pipeline, m)
        _row(rows, m, "resume", ctx, check_resume, m)
    _row(rows, methods[0], "export", ctx, check_export, methods[0])
    _row(rows, methods[0], "benchmark", ctx, check_benchmark, methods[0])
    if a.torchrun:
        _row(rows, methods[0], f"torchrun{a.torchrun}", ctx, check_torchrun, methods[0], a.torchrun, children=True)
    failed = sum(r["status"] != "pass" for r in rows)
    res = {"format": "segprune-gpu-check/1", "device": describe_device(device), "device_spec": a.device, "amp": a.amp,
           "torch_version": torch.__version__, "iters": ITERS, "threads": a.threads, "methods": methods,
           "peak_mem_note": ("torch.cuda.max_memory_allocated per check" if device.type == "cuda" else
                             "max resident set size of this process so far (getrusage; monotone)") +
                             "; not measured for torchrun (separate processes)",
           "total_s": round(time.perf_counter() - t0, 2), "ok": failed == 0, "failed": failed, "rows": rows}
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "gpu_check.md").write_text(_markdown(res))
    if a.quiet:
        print(_HEAD)
        for r in rows:
            print(_fmt_row(r))
    errors = out / "errors.log"
    verdict = "ALL PASSED" if failed == 0 else f"{failed} of {len(rows)} checks FAILED (tracebacks: {errors})"
    print(f"\n{verdict} in {res['total_s']:.1f} s; written: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
