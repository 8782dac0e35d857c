"""Is the pruned network really faster? Latency ratio (pruned / baseline) next to the FLOPs ratio, per run folder.

    python benchmarks/latency.py runs/camvid_r18_mtp [RUN_DIR ...] --out docs/results/latency.md \
        --commit SHA --command "python benchmarks/latency.py runs/camvid_r18_mtp --out docs/results/latency.md ..."

For each run folder, the baseline (stages/*_train_seg) and pruned (stages/*_finetune_seg) models are timed by
``segprune.deploy.benchmark`` in PyTorch eager and ONNX Runtime (CPU, same thread count, warm-up then median and
p10/p90 of ``--runs`` runs, zero input at the run's input size, batch sizes ``--batch``). The goal checked is

    latency ratio <= FLOPs ratio + 0.05          (ratios of medians, pruned / baseline; FLOPs per image)

for eager and ORT separately. Writes the Markdown table to ``--out`` and every raw measurement to the same path
with suffix ``.json``. ``--reuse`` renders from each run folder's ``benchmark.json`` (``segprune benchmark``)
instead of measuring. Take measurements on an otherwise idle machine: other load changes latency ratios.

Library models without a run folder (``--model``, repeatable; needs torchvision / smp)::

    python benchmarks/latency.py --model torchvision.deeplabv3_mobilenet_v3_large --model smp.FPN:efficientnet-b0 \
        --size 256 256 --batch 1 --threads 1 --out ... --commit SHA --command "..."

builds ``torchvision.<builder>`` / ``smp.<Arch>:<encoder>`` (random initialisation, 11 classes: latency does not
depend on the weights), prunes it with ``--method`` (default FPGM) at ``--keep`` (default 0.5) through
``segprune.api.prune_model`` and times the two networks the same way (``segprune.deploy.benchmark_models``).
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segprune.checkpoint import atomic_write_bytes, load_json, save_json  # noqa: E402
from segprune.deploy import benchmark, benchmark_models, load_benchmark  # noqa: E402

#: Allowed excess of the latency ratio over the FLOPs ratio.
SLACK = 0.05


#: method and keep ratio of the ``--model`` rows (set by ``main``)
_MODEL_METHODS: dict[str, tuple[str, str]] = {}


def model_pair(spec: str, size: tuple[int, int], method: str = "fpgm", keep: float = 0.5, seed: int = 0) -> dict:
    """``{"baseline", "pruned"}`` for ``torchvision.<builder>`` / ``smp.<Arch>:<encoder>``: the library model
    (random initialisation, 11 classes) and a copy pruned by ``method`` at ``keep`` (traced at ``size``).

    Raises:
        ImportError: torchvision / smp missing (named). ValueError: an unknown name or method.
    """
    import copy

    import torch

    from segprune.api import prune_model
    from segprune.models.ecosystem import build_ecosystem_model
    name, _, enc = spec.partition(":")
    torch.manual_seed(seed)
    base = build_ecosystem_model(name, 11, {"encoder_name": enc or None}).eval()
    res = prune_model(copy.deepcopy(base), method, keep_ratio=keep, parts=base.parts,
                      never_prune=list(base.never_prune), input_size=size, num_classes=11)
    return {"baseline": base, "pruned": res.model.eval()}


def _method(run: Path) -> tuple[str, str]:
    if str(run) in _MODEL_METHODS:
        return _MODEL_METHODS[str(run)]
    try:
        m = load_json(run / "metrics.json")
        return str(m["method"]), str(m["keep_ratio"])
    except Exception:  # no metrics yet: the config says what was asked for
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
        return str(cfg.get("method", {}).get("name", "mtp")), str(cfg.get("prune", {}).get("keep_ratio", "?"))


def goal(lat_ratio: float | None, flops_ratio: float) -> str | None:
    """``"yes"`` if ``lat_ratio <= flops_ratio + SLACK``, ``"no"`` if not, ``None`` if not measured."""
    if lat_ratio is None:
        return None
    return "yes" if lat_ratio <= flops_ratio + SLACK else "no"


def rows(run: Path, res: dict) -> list[dict]:
    """One row per batch size: medians (ms), ratios and the goal for eager and ORT."""
    if "ratios" not in res:
        raise SystemExit(f"{run}: no baseline stage finished, no ratio to report")
    method, keep = _method(run)
    out = []
    for b, r in res["ratios"].items():
        row = {"run": str(run), "method": method, "keep_ratio": keep, "batch": int(b), "flops_ratio": r["flops"],
               "input_size": res["input_size"]}
        for be in ("eager", "ort"):
            lb = res["models"]["baseline"]["latency"][b].get(be)
            lp = res["models"]["pruned"]["latency"][b].get(be)
            row[be] = None if lb is None else {
                "baseline_ms": lb["median_ms"], "pruned_ms": lp["median_ms"], "ratio": r[be],
                "baseline_spread_ms": [lb["p10_ms"], lb["p90_ms"]], "pruned_spread_ms": [lp["p10_ms"], lp["p90_ms"]],
                "goal": goal(r[be], r["flops"])}
        out.append(row)
    return out


def render(results: list[tuple[Path, dict]], command: str, commit: str, raw_name: str) -> str:
    """The Markdown page: conditions, one row per (run, batch), how many goal checks pass."""
    first = results[0][1]
    all_rows = [row for run, res in results for row in rows(run, res)]
    checks = [row[be]["goal"] for row in all_rows for be in ("eager", "ort") if row[be]]
    threads = sorted({res["threads"] for _, res in results})
    lines = [
        "# Latency vs FLOPs: is the pruned network really faster?", "",
        f"Command: `{command}` at commit `{commit}`, {datetime.date.today().isoformat()}.", "",
        f"CPU: {first['cpu']}; {', '.join(map(str, threads))} thread(s) for both PyTorch eager (torch "
        f"{first['torch_version']}) and ONNX Runtime {first['onnxruntime_version'] or '(not measured)'} "
        f"(intra-op {', '.join(map(str, threads))}, inter-op 1, all graph optimisations, ONNX opset {first['opset']}, "
        f"TorchScript exporter). {first['warmup']} warm-up runs, median of {first['runs']} timed runs of a zero input; "
        "spread p10–p90 in brackets (ms per batch).",
        "Ratios are pruned / baseline of the medians. FLOPs per image by torch.utils.flop_counter (conv/matmul only, "
        "one multiply-add = 2 FLOPs). Goal: latency ratio ≤ FLOPs ratio + 0.05.", "",
        "| run | method | keep | input | batch | FLOPs ratio | eager ms baseline → pruned | eager ratio | eager goal | "
        "ORT ms baseline → pruned | ORT ratio | ORT goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in all_rows:
        cells = []
        for be in ("eager", "ort"):
            d = row[be]
            if d is None:
                cells += ["–", "–", "–"]
                continue
            (b0, b1), (p0, p1) = d["baseline_spread_ms"], d["pruned_spread_ms"]
            cells += [f"{d['baseline_ms']:.2f} [{b0:.2f}–{b1:.2f}] → {d['pruned_ms']:.2f} [{p0:.2f}–{p1:.2f}]",
                      f"{d['ratio']:.3f}", f"**{d['goal']}**"]
        h, w = row["input_size"]
        lines.append(f"| `{row['run']}` | {row['method']} | {row['keep_ratio']} | {h}x{w} | {row['batch']} | "
                     f"{row['flops_ratio']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", f"Goal met in {checks.count('yes')} of {len(checks)} (run, batch, backend) cases.",
              f"Raw measurements: `{raw_name}`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dirs", nargs="*", help="finished run folders (baseline and pruned stages)")
    ap.add_argument("--model", action="append", default=[],
                    help="torchvision.<builder> or smp.<Arch>:<encoder>, pruned here (repeatable)")
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=[256, 256], help="input of --model")
    ap.add_argument("--method", default="fpgm", help="pruning method of --model (one-shot: fpgm, uniform)")
    ap.add_argument("--keep", type=float, default=0.5, help="keep ratio of --model")
    ap.add_argument("--out", required=True, help="Markdown output (raw results go to the same path with .json)")
    ap.add_argument("--commit", required=True)
    ap.add_argument("--command", required=True)
    ap.add_argument("--batch", type=int, action="append", help="batch size, repeatable (default 1 and 8)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, help="default: each run's eval.threads / threads, else torch's")
    ap.add_argument("--no-onnx", action="store_true", help="eager only")
    ap.add_argument("--reuse", action="store_true", help="render each run's existing benchmark.json, measure nothing")
    a = ap.parse_args(argv)
    if a.runs < 20 and not a.reuse:
        print(f"note: --runs {a.runs} < 20: fine for a smoke test, not for reported numbers", file=sys.stderr)
    if not a.run_dirs and not a.model:
        ap.error("give run folders and/or --model")
    if a.reuse and a.model:
        ap.error("--reuse reads run folders only")
    results = []
    for spec in a.model:
        size = (a.size[0], a.size[1])
        res = benchmark_models(model_pair(spec, size, a.method, a.keep), size, source=spec, kind="models",
                               batches=a.batch or [1, 8], runs=a.runs, warmup=a.warmup, threads=a.threads,
                               onnx=not a.no_onnx)
        _MODEL_METHODS[spec] = (a.method, str(a.keep))
        results.append((Path(spec), res))
        print(f"{spec}: measured", file=sys.stderr)
    for d in a.run_dirs:
        run = Path(d)
        if a.reuse:
            res = load_benchmark(run / "benchmark.json")
        else:
            res = benchmark(run, batches=a.batch or [1, 8], runs=a.runs, warmup=a.warmup, threads=a.threads,
                            onnx=not a.no_onnx)
        results.append((run, res))
        print(f"{run}: measured" if not a.reuse else f"{run}: read {run / 'benchmark.json'}", file=sys.stderr)
    out = Path(a.out)
    raw = out.with_suffix(".json")
    text = render(results, a.command, a.commit, raw.name)
    save_json(raw, {"command": a.command, "commit": a.commit, "slack": SLACK,
                    "runs": [{"run": str(r), "rows": rows(r, res), "benchmark": res} for r, res in results]})
    atomic_write_bytes(out, text.encode())
    print(text)
    print(f"written: {out}, {raw}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
