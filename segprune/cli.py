"""Command line: ``segprune demo | run | evaluate``."""
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


def cmd_demo(args) -> int:
    from .config import demo_config
    from .pipeline import Pipeline
    t0 = time.perf_counter()
    cfg = demo_config()
    out = Path(args.out)
    m = Pipeline(cfg, out, quiet=args.quiet).run()
    _print_summary(m, out, time.perf_counter() - t0)
    return 0


def cmd_run(args) -> int:
    from .config import load_config
    from .pipeline import Pipeline
    t0 = time.perf_counter()
    cfg = load_config(args.config, args.set)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    m = Pipeline(cfg, out, quiet=args.quiet).run()
    _print_summary(m, out, time.perf_counter() - t0)
    return 0


def cmd_evaluate(args) -> int:
    """Rebuild the pruned model from the run folder alone and re-measure its mIoU."""
    import yaml
    from .checkpoint import load_json
    from .config import ConfigError, merge, DEFAULTS
    from .data import build_seg_dataset
    from .engine.evaluate import evaluate_segmentation
    from .engine.train import make_loader
    from .pipeline import load_run_model
    run = Path(args.run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run} is not a segprune run folder (no config.yaml)")
    cfg = merge(DEFAULTS, yaml.safe_load((run / "config.yaml").read_text()))
    stages = sorted((run / "stages").glob("*_finetune_seg"))
    if not stages or not (stages[0] / "done.json").exists():
        raise ConfigError(f"{run}: the run has not finished fine-tuning (no stages/*_finetune_seg/done.json)")
    model, arch = load_run_model(stages[0])
    dseg = cfg["data"]["seg"]
    split = cfg["eval"]["split"] or dseg["eval_split"]
    ds = build_seg_dataset(dseg, split, False, int(cfg["seed"]))
    if cfg["threads"]:
        import torch
        torch.set_num_threads(int(cfg["threads"]))
    m = evaluate_segmentation(model, make_loader(ds, dseg["eval_batch_size"], False, 0), arch["num_classes"],
                              int(dseg["ignore_index"]), getattr(ds, "CLASSES", None))
    rec = load_json(run / "metrics.json")["pruned"]["miou"] if (run / "metrics.json").exists() else None
    print(f"pruned model rebuilt from {stages[0]} (arch.json + model.safetensors)")
    print(f"mIoU on {split}: {m['miou']:.6f}  pixel acc {m['pixel_acc']:.6f}")
    if rec is not None:
        same = m["miou"] == rec
        print(f"recorded mIoU: {rec:.6f}  -> {'reproduced exactly' if same else 'DIFFERS by %.2e' % (m['miou'] - rec)}")
        return 0 if same else 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="segprune", description="Channel pruning for semantic segmentation networks (MTP and baselines).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="Algorithm 1 end to end on the embedded synthetic default (a few minutes on 2 cores)")
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
    e.set_defaults(fn=cmd_evaluate)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data.errors import DataError
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"segprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("segprune: interrupted; finished stages are kept, re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
