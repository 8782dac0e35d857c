"""Per-stage logging: a text log file per stage plus tqdm progress bars on stderr."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm import tqdm

__all__ = ["StageLog"]


class StageLog:
    """Append-only log ``<run>/logs/<stage>.log``; ``write`` also echoes to stdout unless quiet."""

    def __init__(self, stage: str, log_dir: Path | None = None, quiet: bool = False, bars: bool = True):
        self.stage = stage
        self.quiet = quiet
        self.bars = bars and not quiet and sys.stderr.isatty()
        self.path = None
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.path = Path(log_dir) / f"{stage}.log"
        self.t0 = time.perf_counter()

    def write(self, msg: str) -> None:
        line = f"[{self.stage} {time.perf_counter() - self.t0:7.1f}s] {msg}"
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(line + "\n")
        if not self.quiet:
            print(line, flush=True)

    def progress(self, total: int, desc: str, initial: int = 0):
        return tqdm(total=total, desc=desc, leave=False, disable=not self.bars, dynamic_ncols=True, initial=initial)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0
