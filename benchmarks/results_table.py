"""Render a finished run folder as a Markdown results section (baseline vs pruned, ratios, stage times).

    python benchmarks/results_table.py runs/camvid_r18_mtp --command "segprune run ..." --commit abc1234

Every figure printed comes from the run folder's metrics.json / config.yaml / done.json files.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def render(run: Path, command: str, commit: str) -> str:
    m = json.loads((run / "metrics.json").read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    b, p, r = m["baseline"], m["pruned"], m["ratios"]
    lat = b["latency"]
    out = [f"Command: `{command}` at commit `{commit}`.", "",
           f"Model `{cfg['model']['name']}` width {cfg['model']['width']}, output stride {cfg['model']['output_stride']}; "
           f"{m['num_classes']} classes; evaluated on split `{m['eval_split']}` with input {m['input_size'][0]}x{m['input_size'][1]} "
           "(logits upsampled to the label resolution for mIoU). FLOPs: one multiply-add = 2 FLOPs (torch.utils.flop_counter; "
           f"conv/matmul only); MACs = FLOPs/2. Latency: CPU, batch 1, {lat['warmup']} warm-up, median of {lat['runs']} runs, "
           f"{lat['threads']} threads (p10-p90 in brackets).", "",
           "| model | mIoU (%) | ΔmIoU | pixel acc (%) | params (M) | GFLOPs | GMACs | latency (ms) | cls top-1 (%) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for key, d in (("baseline", b), ("pruned", p)):
        rr = lambda k: "" if key == "baseline" else f" ({r[k]:.2f}x)"  # noqa: E731
        delta = "" if key == "baseline" else f"{100 * m['delta_miou']:+.2f}"
        name = "baseline" if key == "baseline" else f"{m['method'].upper()} {m['keep_ratio']}x ({m['threshold_mode']})"
        out.append(f"| {name} | {100 * d['miou']:.2f} | {delta} | {100 * d['pixel_acc']:.2f} | {d['params'] / 1e6:.3f}{rr('params')} | "
                   f"{d['flops'] / 1e9:.2f}{rr('flops')} | {d['macs'] / 1e9:.2f}{rr('macs')} | "
                   f"{d['latency_ms']:.1f} [{d['latency']['p10_ms']:.1f}-{d['latency']['p90_ms']:.1f}]{rr('latency_ms')} | {100 * d['cls_top1']:.2f} |")
    mb = p.get("miou_before_finetune")
    out += ["", f"Pruned network before fine-tuning: mIoU {100 * mb:.2f} %." if mb is not None else "",
            "Kept channels per part (prunable units only): " + ", ".join(f"{k} {a}/{n}" for k, (a, n) in m["kept_per_part"].items()) + ".",
            "", "Per-class IoU (%):", "", "| class | baseline | pruned |", "|---|---|---|"]
    for c, v in b["per_class_iou"].items():
        f = lambda x: "n/a" if x is None else f"{100 * x:.2f}"  # noqa: E731
        out.append(f"| {c} | {f(v)} | {f(p['per_class_iou'].get(c))} |")
    out += ["", "Wall time per stage (s, this machine):", "", "| stage | s |", "|---|---|"]
    out += [f"| {k} | {v:.0f} |" for k, v in m["stage_wall_s"].items()]
    out.append(f"| total | {sum(m['stage_wall_s'].values()):.0f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--command", required=True)
    ap.add_argument("--commit", required=True)
    a = ap.parse_args()
    print(render(Path(a.run_dir), a.command, a.commit))
