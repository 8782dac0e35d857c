"""Latency of a zoo model and its pruned copy on a GPU: eager PyTorch vs CUDA-graph replay.

On a fast GPU a small batch is bound by kernel launches, not arithmetic, so a pruned network with 0.42x
the FLOPs can be no faster in eager mode (docs/results/gpu.md, section 4). This script prunes a freshly
built zoo model with a data-free criterion (FPGM by default: weights alone decide, so random weights give
the widths a real run would roughly have; latency depends on widths, not on the values), then times both
with ``segprune.deploy.benchmark_models``: eager (CUDA events) and, with ``--cuda-graph``, one CUDA-graph
replay per forward pass. Writes the benchmark JSON/Markdown to ``--out``.

    python benchmarks/gpu_latency.py --device cuda --cuda-graph --round-to 1 8 --out runs/gpu_latency
    python benchmarks/gpu_latency.py --device cpu --model deeplabv3_resnet18 --size 64 64 --batch 1 --runs 3  # CPU smoke
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from segprune.api import prune_model
from segprune.deploy import benchmark_models, render_benchmark, write_benchmark
from segprune.engine.device import resolve_device
from segprune.models import build_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deeplabv3_resnet101")
    ap.add_argument("--output-stride", type=int, default=16)
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--size", type=int, nargs=2, default=[513, 513], help="input H W (default 513 513)")
    ap.add_argument("--method", default="fpgm", help="a data-free criterion: fpgm or uniform (default fpgm)")
    ap.add_argument("--keep", type=float, default=0.5, help="keep ratio (default 0.5)")
    ap.add_argument("--round-to", type=int, nargs="+", default=[1], help="prune.round_to values, one pruned model each")
    ap.add_argument("--batch", type=int, action="append", help="batch size, repeatable (default 1 and 8)")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cuda-graph", action="store_true")
    ap.add_argument("--out", default="runs/gpu_latency")
    a = ap.parse_args(argv)
    dev = resolve_device(a.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    base = build_model({"name": a.model, "output_stride": a.output_stride}, a.classes, 1000)
    out = Path(a.out)
    summary = {}
    for r in a.round_to:
        res = prune_model(base, a.method, keep_ratio=a.keep, input_size=tuple(a.size), round_to=r)
        bench = benchmark_models({"baseline": base, "pruned": res.model}, a.size, batches=a.batch or [1, 8],
                                 runs=a.runs, warmup=a.warmup, onnx=False, device=dev, cuda_graph=a.cuda_graph,
                                 source=f"{a.model} {a.method} keep {a.keep} round_to {r}")
        print(render_benchmark(bench))
        write_benchmark(bench, out / f"round{r}")
        summary[f"round_to_{r}"] = bench["ratios"]
        base.cpu()  # benchmark_models moved it; prune_model traces on the CPU
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
