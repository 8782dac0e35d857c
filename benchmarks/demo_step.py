"""Time one training step of the demo's model, and optionally where it goes (docs/results/demo.md).

A step = forward + cross-entropy at the input resolution + backward + SGD (momentum 0.9) on random
images (N, 3, S, S) and labels (N, S, S); the median over ``--steps`` steps after 3 warm-up steps, in ms.
Each ``--width`` is timed in turn, ``--repeats`` times, so that a busy machine shows up as spread.

    python benchmarks/demo_step.py --width 0.25 0.125 --threads 2             # idle machine: step times
    python benchmarks/demo_step.py --width 0.25 --profile                     # torch profiler, top ops

The model is ``segprune.config.demo_config()``'s (DeepLabv3-R18, OS 8) at the given width; ``--batch``
and ``--size`` default to the demo's 16 and 64.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(width: float, num_classes: int = 5, cls_classes: int = 4) -> torch.nn.Module:
    from segprune.config import demo_config
    from segprune.models import build_model
    cfg = demo_config()["model"]
    return build_model({**cfg, "width": width}, num_classes, cls_classes).train()


def step_fn(model: torch.nn.Module, batch: int, size: int, num_classes: int = 5):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, num_classes, (batch, size, size))

    def step() -> None:
        out = model(x)
        out = out["out"] if isinstance(out, dict) else out
        loss = torch.nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def median_ms(step, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        ts.append(1000 * (time.perf_counter() - t))
    return statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=float, nargs="+", default=[0.125])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--profile", action="store_true", help="print the 15 ops with the most self CPU time")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"batch {a.batch}, {a.size}x{a.size}, {torch.get_num_threads()} threads, median of {a.steps} steps (ms)")
    for rep in range(a.repeats):
        for w in a.width:
            print(f"repeat {rep} width {w:g}: {median_ms(step_fn(build(w), a.batch, a.size), a.steps):.1f} ms", flush=True)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        step = step_fn(build(a.width[0]), a.batch, a.size)
        median_ms(step, 2)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
            for _ in range(10):
                step()
        print(p.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=15,
                                                               max_name_column_width=32, max_shapes_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
