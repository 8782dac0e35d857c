"""Sweep runner: a grid of runs (methods x keep ratios x seeds x ...) from one base config.

A sweep file (YAML)::

    base: configs/camvid_deeplabv3_r18_mtp.yaml   # relative to the sweep file, else the CWD
    set: {train.seed: 0}                          # overrides applied to every run (optional)
    grid:                                         # Cartesian product (optional)
      method.name: [uniform, slimming, thinet, fpgm, mtp]
      prune.keep_ratio: [0.5, 0.75]
    runs:                                         # extra runs, each a dict of overrides (optional)
      - {method.name: mtp, seed: 1}
      - {name: mtp_seg_only, method.name: mtp, finetune.cls.epochs: 0}

Every run gets its own folder ``<out>/<name>`` (an ordinary run folder, see
:mod:`segprune.pipeline`). Runs share finished stages whose fingerprints agree
(:func:`segprune.pipeline.stage_fingerprints`): with a fixed ``train.seed`` all runs share one
classification pre-training and one trained baseline, and runs that differ only after a stage
(threshold mode, fine-tuning schedule) share everything before it. Finished runs are skipped;
a killed run resumes at its last finished stage. Several worker processes (``--jobs``, or the
same command started again in another shell) cooperate through lock files in ``<out>/.locks``
(``flock``, released by the kernel when a worker dies; POSIX only).
"""
from __future__ import annotations

import copy
import itertools
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import yaml

from .checkpoint import atomic_write_bytes, load_json
from .config import ConfigError, load_config, read_yaml_mapping

__all__ = ["SweepRun", "load_sweep", "run_sweep", "sweep_status"]

_SHORT = {"method.name": "", "prune.keep_ratio": "k", "seed": "s", "prune.threshold_mode": "",
          "finetune.cls.epochs": "ftcls", "method.from_scratch": "scratch"}


class SweepRun:
    """One point of the grid: ``name``, the override dict and the resolved config."""

    def __init__(self, name: str, overrides: dict, cfg: dict):
        self.name, self.overrides, self.cfg = name, overrides, cfg

    def __repr__(self) -> str:
        return f"SweepRun({self.name!r}, {self.overrides})"


def _run_name(over: dict) -> str:
    parts = []
    for k, v in over.items():
        short = _SHORT.get(k, k.split(".")[-1])
        val = str(v).lower() if isinstance(v, bool) else str(v)
        parts.append(f"{short}{val}" if short in ("k", "s") or not short else f"{short}-{val}")
    name = "_".join(parts) or "base"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def _as_set(over: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in over.items()]


def load_sweep(path: str | Path) -> tuple[dict, list[SweepRun]]:
    """Read a sweep file; return (the sweep dict, its runs with resolved, validated configs).

    Raises:
        ConfigError: missing/invalid sweep file, unknown sweep keys, an empty grid, duplicate run
            names, or any run whose config is invalid (every such run is listed).
    """
    p = Path(path)
    sw = read_yaml_mapping(p, "sweep file")
    unknown = sorted(set(sw) - {"base", "set", "grid", "runs", "out"})
    if unknown:
        raise ConfigError(f"sweep file {p}: unknown keys {unknown} (allowed: base, set, grid, runs, out)")
    base = sw.get("base")
    if base is not None:
        cand = p.parent / base
        base = cand if cand.is_file() else Path(base)
    common = sw.get("set") or {}
    grid = sw.get("grid") or {}
    extra = sw.get("runs") or []
    if not isinstance(common, dict) or not isinstance(grid, dict) or not isinstance(extra, list):
        raise ConfigError(f"sweep file {p}: 'set' and 'grid' must be mappings, 'runs' a list of mappings")
    for k, vals in grid.items():
        if not isinstance(vals, list) or not vals:
            raise ConfigError(f"sweep file {p}: grid.{k} must be a non-empty list, got {vals!r}")
    points: list[dict] = []
    if grid:
        keys = list(grid)
        points += [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    for i, r in enumerate(extra):
        if not isinstance(r, dict):
            raise ConfigError(f"sweep file {p}: runs[{i}] must be a mapping of overrides, got {r!r}")
        points.append(dict(r))
    if not points:
        raise ConfigError(f"sweep file {p}: no runs (give 'grid' and/or 'runs')")
    runs, problems, seen = [], [], {}
    for over in points:
        over = dict(over)
        name = str(over.pop("name", None) or _run_name(over))
        try:
            cfg = load_config(base, _as_set(common) + _as_set(over))
        except ConfigError as exc:
            problems.append(f"run {name}: {exc}")
            continue
        if name in seen:
            problems.append(f"run {name}: duplicate name (overrides {over} and {seen[name]})")
            continue
        seen[name] = over
        runs.append(SweepRun(name, over, cfg))
    if problems:
        raise ConfigError(f"sweep file {p}:\n  " + "\n  ".join(problems))
    return sw, runs


# ---------------------------------------------------------------------------- locking
#: lock path -> open file descriptor holding its ``flock`` (this process's runs).
_HELD: dict[str, int] = {}


def _try_lock(lock: Path) -> bool:
    """Take the run lock ``lock``: an exclusive ``flock`` on the file, held until :func:`_release`.

    The kernel drops an ``flock`` when its process dies, so a killed worker's run is free at once
    (no stale-lock guessing from pids, no takeover race between two workers); the file holds the
    owner's pid for people only. After locking, the path must still be the locked file: a
    finishing worker unlinks it, and a lock taken on the unlinked file would not exclude anyone.
    """
    import fcntl
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live worker
            os.close(fd)
            return False
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # unlinked (or replaced) between our open and our flock: try the new file
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        _HELD[str(lock)] = fd
        return True
    return False


def _release(lock: Path) -> None:
    """Unlink and unlock a lock taken by :func:`_try_lock` (unlink first: see there)."""
    fd = _HELD.pop(str(lock), None)
    if fd is None:
        return
    lock.unlink(missing_ok=True)
    os.close(fd)


def _locked_by_other(lock: Path) -> bool:
    """True if another process holds the ``flock`` of ``lock`` (a worker is running that run)."""
    import fcntl
    if str(lock) in _HELD:
        return False
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops our shared probe lock
    return False


# ---------------------------------------------------------------------------- state / ETA
def _stage_done(run_dir: Path, stage: str) -> dict | None:
    from .pipeline import stage_dir
    f = stage_dir(run_dir, stage) / "done.json"
    try:
        return load_json(f) if f.is_file() else None
    except Exception:
        return None


def _done_fingerprints(out: Path, runs: list[SweepRun]) -> dict[str, dict]:
    """fingerprint -> done.json of a finished stage anywhere in the sweep."""
    from .pipeline import STAGES
    found = {}
    for r in runs:
        for stage in STAGES:
            info = _stage_done(out / r.name, stage)
            if info and info.get("fingerprint"):
                found[info["fingerprint"]] = info
    return found


def _is_finished(out: Path, run: SweepRun) -> bool:
    return (out / run.name / "metrics.json").is_file() and _stage_done(out / run.name, "evaluate") is not None


def _estimate(out: Path, runs: list[SweepRun], pending: list[SweepRun]) -> float | None:
    """Seconds of work left: per pending stage, the mean wall time of that stage for the same
    method in finished stages (any method as fallback); stages already done anywhere cost 0."""
    from .pipeline import STAGES, stage_fingerprints
    times: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        for stage in STAGES:
            info = _stage_done(out / r.name, stage)
            if info and "wall_s" in info and "shared_from" not in info:
                times.setdefault((stage, r.cfg["method"]["name"]), []).append(float(info["wall_s"]))
                times.setdefault((stage, "*"), []).append(float(info["wall_s"]))
    done = _done_fingerprints(out, runs)
    total, unknown, counted = 0.0, False, set()
    for r in pending:
        for stage, fp in stage_fingerprints(r.cfg).items():
            if fp in done or fp in counted:
                continue
            counted.add(fp)
            t = times.get((stage, r.cfg["method"]["name"])) or times.get((stage, "*"))
            if t is None:
                unknown = True
                continue
            total += sum(t) / len(t)
    return None if unknown and total == 0 else total


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "unknown (no finished stage to time yet)"
    h, m = divmod(int(s) // 60, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{int(s) % 60:02d}s"


def sweep_status(out: str | Path, runs: list[SweepRun]) -> dict:
    """{"finished": [...], "running": [...], "pending": [...], "eta_s": float|None} for a sweep folder."""
    out = Path(out)
    fin = [r.name for r in runs if _is_finished(out, r)]
    running = [r.name for r in runs if r.name not in fin and _locked_by_other(out / ".locks" / f"{r.name}.lock")]
    pending = [r for r in runs if r.name not in fin]
    return {"finished": fin, "running": running, "pending": [r.name for r in pending],
            "eta_s": _estimate(out, runs, pending)}


# ---------------------------------------------------------------------------- runner
def _waits_on_other(out: Path, run: SweepRun, runs: list[SweepRun]) -> bool:
    """True if a stage this run needs is being computed right now by another worker's run."""
    from .pipeline import stage_fingerprints
    mine = stage_fingerprints(run.cfg)
    done = _done_fingerprints(out, runs)
    for other in runs:
        if other is run or not _locked_by_other(out / ".locks" / f"{other.name}.lock"):
            continue
        theirs = stage_fingerprints(other.cfg)
        for stage, fp in mine.items():
            if stage == "evaluate":
                break
            if theirs.get(stage) == fp and fp not in done:
                return True
    return False


def run_sweep(path: str | Path, out: str | Path | None = None, threads: int | None = None,
              quiet: bool = False, dry_run: bool = False, log=print) -> dict:
    """Run every unfinished run of a sweep in this process; return :func:`sweep_status` at the end,
    plus ``failed`` (run name -> error) for the runs that raised in this process.

    Safe to start several times at once on the same ``out`` (each process takes runs through
    lock files) and to kill at any time (runs resume stage by stage on the next call). A run that
    raises (bad data, a non-finite loss, ...) is logged, its traceback written to
    ``<out>/.failures/<run>.txt``, and the sweep goes on with the other runs; it stays pending and
    is retried by the next start. Ctrl-C (KeyboardInterrupt) still stops the sweep.

    Raises:
        ConfigError: invalid sweep file (see :func:`load_sweep`).
    """
    from .pipeline import Pipeline
    sw, runs = load_sweep(path)
    out = Path(out or sw.get("out") or Path("runs") / Path(path).stem)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "sweep.yaml", yaml.safe_dump({"source": str(path), **sw}, sort_keys=False).encode())
    if dry_run:
        st = sweep_status(out, runs)
        for r in runs:
            flag = "finished" if r.name in st["finished"] else "running" if r.name in st["running"] else "pending"
            log(f"  {r.name:40s} {flag:9s} {r.overrides}")
        log(f"{len(st['finished'])}/{len(runs)} finished, estimated remaining work {_fmt_s(st['eta_s'])}")
        return st
    attempted: set[str] = set()
    failed: dict[str, str] = {}
    while True:
        todo = [r for r in runs if r.name not in attempted and not _is_finished(out, r)]
        if not todo:
            break
        pick = None
        for r in todo:
            if _locked_by_other(out / ".locks" / f"{r.name}.lock") or _waits_on_other(out, r, runs):
                continue
            pick = r
            break
        if pick is None:  # everything left is running elsewhere or waits on a running stage
            if all(_locked_by_other(out / ".locks" / f"{r.name}.lock") for r in todo):
                break
            time.sleep(5)
            continue
        lock = out / ".locks" / f"{pick.name}.lock"
        if not _try_lock(lock):
            continue
        try:
            st = sweep_status(out, runs)
            log(f"[sweep] {len(st['finished'])}/{len(runs)} finished, {len(st['running'])} running elsewhere; "
                f"starting {pick.name}; estimated remaining work {_fmt_s(st['eta_s'])}")
            t0 = time.perf_counter()
            pipe = Pipeline(copy.deepcopy(pick.cfg), out / pick.name, quiet=quiet,
                            share=[out / r.name for r in runs if r is not pick])
            if threads:  # a runtime choice, not part of the run's config (so any worker may resume it)
                torch.set_num_threads(int(threads))
            pipe.run()
            log(f"[sweep] {pick.name} finished in {_fmt_s(time.perf_counter() - t0)}")
        except Exception as exc:  # one bad run (data error, NaN loss, a bug) must not stop the grid
            failed[pick.name] = f"{type(exc).__name__}: {exc}"
            note = out / ".failures" / f"{pick.name}.txt"
            atomic_write_bytes(note, traceback.format_exc().encode())
            log(f"[sweep] {pick.name} FAILED ({type(exc).__name__}: {str(exc)[:300]}); traceback in {note}; "
                "its finished stages are kept, the next sweep start retries it; going on with the other runs")
        finally:
            attempted.add(pick.name)
            _release(lock)
    st = sweep_status(out, runs)
    st["failed"] = failed
    log(f"[sweep] {len(st['finished'])}/{len(runs)} finished" + (f"; still running elsewhere: {st['running']}" if st["running"] else "")
        + (f"; FAILED in this worker: {', '.join(failed)}" if failed else ""))
    return st


def spawn_workers(path: str, out: str | None, jobs: int, threads: int | None, quiet: bool) -> int:
    """Start ``jobs`` worker processes of ``segprune sweep`` on the same sweep and wait for them."""
    procs = []
    for i in range(jobs):
        cmd = [sys.executable, "-m", "segprune.cli", "sweep", str(path), "--jobs", "1"]
        if out:
            cmd += ["--out", str(out)]
        if threads:
            cmd += ["--threads", str(threads)]
        if quiet:
            cmd += ["--quiet"]
        procs.append(subprocess.Popen(cmd))
        time.sleep(2)  # let the first worker take its lock before the next one looks
    return max(p.wait() for p in procs)
