"""Command line: ``segprune demo | run | evaluate | sweep | compare | benchmark | export``."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _print_summary(m: dict, out: Path, wall: float) -> None:
    b, p, r = m["baseline"], m["pruned"], m["ratios"]
    print()
    print(f"{'':10s} {'mIoU%':>7s} {'pixacc%':>8s} {'params(M)':>10s} {'GFLOPs':>8s} {'latency ms':>11s}")
    for key, d in (("baseline", b), ("pruned", p)):
        print(f"{key:10s} {100 * d['miou']:7.2f} {100 * d['pixel_acc']:8.2f} {d['params'] / 1e6:10.3f} "
              f"{d['flops'] / 1e9:8.3f} {d['latency_ms']:11.2f}")
    print(f"{'ratio':10s} {100 * m['delta_miou']:+7.2f} {'':8s} {r['params']:9.2f}x {r['flops']:7.2f}x {r['latency_ms']:10.2f}x")
    print(f"\nFLOPs: one multiply-add = 2 FLOPs. Latency: CPU batch 1, median of {b['latency']['runs']} "
          f"({b['latency']['threads']} threads). Wall time {wall:.0f} s.")
    print(f"run folder: {out}  (report.md, metrics.json, stages/)")


def _run_pipeline(cfg: dict, out: Path, quiet: bool, t0: float) -> int:
    """Run the pipeline; under ``torchrun`` (WORLD_SIZE, RANK set) as one rank of a process group
    (``engine.distributed``: init from the environment, rank 0 writes and prints, teardown at the end)."""
    from .engine import distributed as ddp
    from .pipeline import Pipeline
    dist_cfg = dict(cfg["distributed"])
    if dist_cfg.get("device") is None and cfg.get("device", "auto") != "auto":  # the top-level key decides
        dist_cfg["device"] = "cpu" if cfg["device"] == "cpu" else "cuda"
    with ddp.launch(dist_cfg):
        m = Pipeline(cfg, out, quiet=quiet).run()
        if ddp.is_main():
            _print_summary(m, out, time.perf_counter() - t0)
    return 0


def cmd_demo(args) -> int:
    from .config import demo_config
    t0 = time.perf_counter()
    cfg = demo_config()
    return _run_pipeline(cfg, Path(args.out), args.quiet, t0)


def cmd_run(args) -> int:
    from .config import load_config
    t0 = time.perf_counter()
    cfg = load_config(args.config, args.set)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    return _run_pipeline(cfg, out, args.quiet, t0)


#: ``segprune evaluate``: largest |ΔmIoU| (absolute, mIoU as a fraction in [0, 1]) accepted when the evaluation
#: runs on another device type, GPU model or dtype than the recorded one. Float32 logits then differ by rounding
#: only (another summation order; ``evaluate`` turns TF32 off on a GPU), which flips the argmax of just the
#: pixels whose two best logits are that close; on a split of realistic size that moves mIoU by far less than
#: 1e-3 = 0.1 point, the resolution at which mIoU is reported, while a wrong weight, width or protocol moves it
#: by more. A very small split (a few thousand pixels of a rare class) can exceed it. Not calibrated on a GPU
#: (none was available to this project). On the same device type, GPU model and dtype the match must be exact.
MIOU_TOLERANCE = 1e-3

#: what ``metrics.json`` files without ``eval_device`` (written before the key existed) were evaluated on
_LEGACY_EVAL_DEVICE = {"type": "cpu", "name": None, "dtype": "float32", "index": None}


def _same_numerics(a: dict, b: dict) -> bool:
    """True if two ``describe_device`` records compute bitwise alike: same type and dtype, and for a GPU the
    same model (its kernels). CPUs are taken as alike (what ``evaluate`` always assumed)."""
    return (a.get("type") == b.get("type") and a.get("dtype") == b.get("dtype")
            and (a.get("type") == "cpu" or a.get("name") == b.get("name")))


def _where(d: dict) -> str:
    return f"{d.get('type')}{' (' + d['name'] + ')' if d.get('name') else ''}, {d.get('dtype')}"


def reproduction_verdict(miou: float, recorded: float, evaluated_on: dict, recorded_on: dict) -> tuple[bool, str]:
    """(ok, text) of ``segprune evaluate``: exact equality when both evaluations ran on the same device
    type, GPU model and dtype (:func:`_same_numerics`); otherwise ``|miou - recorded| <= MIOU_TOLERANCE``,
    said so in the text."""
    d = miou - recorded
    if _same_numerics(evaluated_on, recorded_on):
        return (True, "reproduced exactly") if d == 0 else (False, f"DIFFERS by {d:.2e} (same device and dtype: "
                                                                  "an exact match is expected)")
    why = f"evaluated on {_where(evaluated_on)}, recorded on {_where(recorded_on)}"
    if abs(d) <= MIOU_TOLERANCE:
        return True, (f"reproduced within the tolerance |ΔmIoU| <= {MIOU_TOLERANCE:g} (Δ = {d:+.2e}); {why}: "
                      "floating-point results differ across devices, so the match is not exact")
    return False, f"DIFFERS by {d:.2e}, more than the tolerance {MIOU_TOLERANCE:g} across devices ({why})"


def cmd_evaluate(args) -> int:
    """Rebuild the pruned model from the run folder alone and re-measure its mIoU (on ``--device``)."""
    from .checkpoint import load_json
    from .config import ConfigError, read_run_config
    from .data import build_seg_dataset
    from .engine.device import describe_device, resolve_device, strict_fp32
    from .engine.evaluate import evaluate_segmentation
    from .engine.train import make_loader
    from .pipeline import load_run_model
    dev = resolve_device(args.device) if args.device is not None else None  # before reading anything
    run = Path(args.run_dir)
    cfg = read_run_config(run)
    dev = dev or resolve_device(cfg.get("device", "auto"))
    stages = sorted((run / "stages").glob("*_finetune_seg"))
    if not stages or not (stages[0] / "done.json").exists():
        raise ConfigError(f"{run}: the run has not finished fine-tuning (no stages/*_finetune_seg/done.json)")
    model, arch = load_run_model(stages[0])
    model.to(dev)
    dseg = cfg["data"]["seg"]
    split = cfg["eval"]["split"] or dseg["eval_split"]
    ds = build_seg_dataset(dseg, split, False, int(cfg["seed"]))
    if cfg["threads"]:
        import torch
        torch.set_num_threads(int(cfg["threads"]))
    with strict_fp32(dev):  # a GPU evaluates in full float32 (no TF32), as the CPU does
        m = evaluate_segmentation(model, make_loader(ds, dseg["eval_batch_size"], False, 0), arch["num_classes"],
                                  int(dseg["ignore_index"]), getattr(ds, "CLASSES", None), protocol=cfg["eval"])
    here = describe_device(dev)
    metrics = load_json(run / "metrics.json") if (run / "metrics.json").exists() else None
    rec = metrics["pruned"]["miou"] if metrics is not None else None
    print(f"pruned model rebuilt from {stages[0]} (arch.json + model.safetensors)")
    print(f"evaluated on {dev} ({here['name']}), {here['dtype']}")
    print(f"mIoU on {split}: {m['miou']:.6f}  pixel acc {m['pixel_acc']:.6f}")
    if rec is not None:
        rec_on = metrics.get("eval_device") or _LEGACY_EVAL_DEVICE
        ok, text = reproduction_verdict(m["miou"], rec, here, rec_on)
        print(f"recorded mIoU: {rec:.6f} ({_where(rec_on)})  -> {text}")
        return 0 if ok else 1
    return 0


def cmd_sweep(args) -> int:
    """Run a grid of runs sharing the baseline; resumable, several workers cooperate."""
    import os
    from .config import ConfigError
    from .engine.distributed import launched
    from .sweep import run_sweep, spawn_workers
    if launched() and int(os.environ["WORLD_SIZE"]) > 1:
        raise ConfigError("segprune sweep runs one process per run (--jobs); launch `segprune run` under torchrun "
                          "for data-parallel training of one run")
    if args.jobs > 1 and not args.dry_run:
        return spawn_workers(args.sweep, args.out, args.jobs, args.threads, args.quiet)
    st = run_sweep(args.sweep, args.out, threads=args.threads, quiet=args.quiet, dry_run=args.dry_run)
    return 0 if args.dry_run or not st["pending"] or st["running"] else 1


def cmd_compare(args) -> int:
    """Table 2 / Figure 5 / Figure 6 analogs from finished run folders (or sweep folders)."""
    from .compare import compare
    compare(args.runs, args.out, n_images=args.images, plots=not args.no_plots, eval_cls=args.eval_cls)
    return 0


def cmd_export(args) -> int:
    """Export a run's pruned (or --baseline) model to ONNX and check it against PyTorch on eval images."""
    from .config import ConfigError
    from .deploy import export_run, sidecar_path
    from .engine.device import resolve_device
    if args.images < 1:
        raise ConfigError(f"--images {args.images}: must be >= 1")
    dev = resolve_device(args.device) if args.device is not None else None  # before anything is read or written
    rec = export_run(args.run_dir, args.onnx, opset=args.opset, images=args.images, baseline=args.baseline, device=dev)
    h, w = rec["input_size"]
    c = rec["check"]
    print(f"exported the {rec['model']} model of {args.run_dir} ({rec['stage']}) to {args.onnx}: ONNX opset {rec['opset']}, "
          f"input '{rec['input']}' float32 (N, 3, {h}, {w}) with dynamic N, output '{rec['output']}' (N, {rec['num_classes']}, {h}, {w}); "
          f"{rec['bytes'] / 1e6:.2f} MB; TorchScript exporter (dynamo=False)")
    ort_where = "CUDA" if c["ort_provider"] == "CUDAExecutionProvider" else "CPU"
    print(f"check on {c['images']} {c['split']} images ({c['pixels']} pixels), ONNX Runtime {ort_where} vs PyTorch "
          f"on {c['torch_device']}: "
          f"max |logit diff| {c['max_abs_diff']:.3e}, argmax agreement {100 * c['agreement']:.4f} % "
          f"-> {'OK' if c['ok'] else 'FAILED'} (limits {c['atol']:g}, {100 * c['min_agreement']:g} %)")
    print(f"record: {sidecar_path(args.onnx)}")
    return 0 if c["ok"] else 1


def cmd_benchmark(args) -> int:
    """Eager vs ONNX Runtime CPU latency, params and FLOPs of a run's models (or a config's unpruned model)."""
    from .config import ConfigError
    from .deploy import benchmark, render_benchmark, write_benchmark
    from .engine.device import resolve_device
    if args.runs < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1) or min(args.batch or [1]) < 1:
        raise ConfigError("--runs and --batch must be >= 1, --warmup >= 0, --threads >= 1")
    dev = resolve_device(args.device) if args.device is not None else None  # before anything is read or written
    try:
        res = benchmark(args.target, batches=args.batch or [1, 8], runs=args.runs, warmup=args.warmup,
                        threads=args.threads, onnx=args.onnx, opset=args.opset, device=dev, cuda_graph=args.cuda_graph)
    except ValueError as exc:  # e.g. --cuda-graph on the CPU: said before anything is written
        raise ConfigError(str(exc)) from exc
    out = Path(args.out) if args.out else (Path(args.target) if res["kind"] == "run" else Path("runs") / f"benchmark_{Path(args.target).stem}")
    print(render_benchmark(res))
    js, md = write_benchmark(res, out)
    print(f"written: {js}, {md}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="segprune", description="Channel pruning for semantic segmentation networks (MTP and baselines).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="Algorithm 1 end to end on the embedded synthetic default (about 2 minutes on 2 cores)")
    d.add_argument("--out", default="runs/demo", help="run folder (default runs/demo); re-running resumes")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(fn=cmd_demo)
    r = sub.add_parser("run", help="run the pipeline of a YAML config (resumable stage by stage)")
    r.add_argument("config")
    r.add_argument("--out", help="run folder (default runs/<config name>)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. prune.keep_ratio=0.75")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(fn=cmd_run)
    e = sub.add_parser("evaluate", help="rebuild the pruned model of a run folder and reproduce its mIoU")
    e.add_argument("run_dir")
    e.add_argument("--device", metavar="DEV", help="auto | cpu | cuda | cuda:N (default: the run's device key, auto); "
                   f"on another device or dtype than the recorded evaluation the mIoU must match within {MIOU_TOLERANCE:g}")
    e.set_defaults(fn=cmd_evaluate)
    w = sub.add_parser("sweep", help="run a grid (methods x keep ratios x seeds) sharing the trained baseline; resumable")
    w.add_argument("sweep", help="sweep YAML: base, set, grid, runs (see segprune/sweep.py)")
    w.add_argument("--out", help="sweep folder (default runs/<sweep name>)")
    w.add_argument("--jobs", type=int, default=1, help="worker processes (each takes unfinished runs through lock files)")
    w.add_argument("--threads", type=int, help="torch threads per worker (default: the config's)")
    w.add_argument("--dry-run", action="store_true", help="list runs, their state and the estimated remaining time")
    w.add_argument("--quiet", action="store_true")
    w.set_defaults(fn=cmd_sweep)
    c = sub.add_parser("compare", help="table (Markdown + CSV), Pareto / per-layer width plots and a qualitative grid from run folders")
    c.add_argument("runs", nargs="+", help="run folders, or sweep folders holding run folders")
    c.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    c.add_argument("--images", type=int, default=4, help="eval images in the qualitative grid (0: none)")
    c.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib)")
    c.add_argument("--eval-cls", action="store_true", help="evaluate backbone top-1 where a run folder does not record it")
    c.set_defaults(fn=cmd_compare)
    x = sub.add_parser("export", help="export a run's pruned model to ONNX (dynamic batch) and check it against PyTorch")
    x.add_argument("run_dir")
    x.add_argument("--onnx", required=True, metavar="FILE", help="output .onnx file (a FILE.json record is written beside it)")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset, 11..20 (default 17)")
    x.add_argument("--images", type=int, default=8, help="eval images for the ONNX Runtime vs PyTorch check (default 8)")
    x.add_argument("--baseline", action="store_true", help="export the unpruned baseline (stages/02_train_seg) instead")
    x.add_argument("--device", metavar="DEV", help="auto | cpu | cuda | cuda:N: where PyTorch (and, with onnxruntime-gpu, "
                   "ONNX Runtime) run the check (default: the run's device key, auto); the export itself traces on the CPU")
    x.set_defaults(fn=cmd_export)
    b = sub.add_parser("benchmark", help="eager vs ONNX Runtime CPU latency, params, FLOPs of a run folder (baseline, pruned) or a config")
    b.add_argument("target", help="run folder, or config YAML (a freshly built unpruned model)")
    b.add_argument("--batch", type=int, action="append", help="batch size, repeatable (default: 1 and 8)")
    b.add_argument("--runs", type=int, default=20, help="timed runs per measurement (default 20)")
    b.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs (default 5)")
    b.add_argument("--threads", type=int, help="torch and ORT intra-op threads (default: the config's eval.threads / threads, else torch's)")
    b.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True, help="also time ONNX Runtime (default on)")
    b.add_argument("--opset", type=int, default=17, help="ONNX opset of the timed export (default 17)")
    b.add_argument("--out", help="folder for benchmark.json/.md (default: the run folder; runs/benchmark_<config name> for a config)")
    b.add_argument("--device", metavar="DEV", help="auto | cpu | cuda | cuda:N (default: the config's device key, auto); "
                   "cuda: eager latency from CUDA events after warm-up, ORT's CUDA provider where installed")
    b.add_argument("--cuda-graph", action="store_true", help="CUDA only: also time each model as a CUDA-graph replay "
                   "(no per-kernel launch cost; what small batches on a fast GPU are bound by)")
    b.set_defaults(fn=cmd_benchmark)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data.errors import DataError
    from .engine.train import NonFiniteLossError
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError, NonFiniteLossError) as exc:
        print(f"segprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("segprune: interrupted; finished stages are kept, re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
