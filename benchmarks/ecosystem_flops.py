"""FLOPs ratio (pruned / unpruned) of torchvision and segmentation_models_pytorch models pruned at keep ratio 0.5
with segprune.api.prune_model (issue 17's table), randomly initialised (no download), CPU:

    python benchmarks/ecosystem_flops.py [MODEL ...] [--size 256] [--methods fpgm slimming] [--coupled] [--layers N]
        [--gamma spread|ones] [--json out.json]

MODEL is ``torchvision.<builder>`` or ``smp.<Arch>:<encoder>``; default: the six models of issue 17.
FPGM needs no data; Slimming first trains ``--slimming-iters`` steps (ℓ1 on γ, ``alpha`` 1e-3) on random
images/labels. Its ratios show which channels *can* go, not which a trained network would keep.

``--gamma spread`` (default) draws every BatchNorm/GroupNorm γ from U(0.5, 1.5) (seeded) before pruning, as a
trained network's γ are spread; FPGM does not read γ. With ``--gamma ones`` (γ = 1, a fresh network) every
score ties, Slimming's per-part threshold then removes channels in unit order (the tie-break) and its growing
ℓ1 schedule drives exactly those to zero: the ratio says where the ties fall, not what the network allows.
Needs torchvision / smp / timm.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segprune.api import prune_model  # noqa: E402
from segprune.models.ecosystem import build_ecosystem_model  # noqa: E402

DEFAULT = ["torchvision.deeplabv3_resnet50", "torchvision.deeplabv3_mobilenet_v3_large",
           "torchvision.lraspp_mobilenet_v3_large", "smp.Unet:resnet34", "smp.DeepLabV3Plus:resnet50",
           "smp.FPN:efficientnet-b0"]


def spread_gammas(model: torch.nn.Module, seed: int = 0) -> None:
    """Set every BatchNorm / affine GroupNorm weight γ to U(0.5, 1.5) draws (in place, seeded)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm)) and mod.weight is not None:
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)


def layer_flops(model: torch.nn.Module, size: int) -> dict[str, int]:
    """Conv/Linear module name -> FLOPs of one (1, 3, size, size) forward (torch.utils.flop_counter;
    1 multiply-add = 2 FLOPs), plus ``"total"``."""
    from torch.utils.flop_counter import FlopCounterMode
    leaves = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    counter = FlopCounterMode(display=False)
    was = model.training
    model.eval()
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, size, size))
    model.train(was)
    out = {"total": int(counter.get_total_flops())}
    for key, ops in counter.get_flop_counts().items():
        name = key.split(".", 1)[1] if "." in key else ""  # keys are "<RootClass>.<module name>"
        if name in leaves:
            out[name] = int(sum(ops.values()))
    return out


def measure(spec: str, method: str, size: int, iters: int, coupled: bool = False, seed: int = 0,
            gamma: str = "spread", layers: int = 0) -> dict:
    name, _, enc = spec.partition(":")
    torch.manual_seed(seed)
    model = build_ecosystem_model(name, 5, {"encoder_name": enc or None})
    if gamma == "spread":
        spread_gammas(model, seed)
    kw = {}
    if method == "slimming":
        g = torch.Generator().manual_seed(seed)
        kw["seg_loader"] = [(torch.randn(2, 3, size, size, generator=g), torch.randint(0, 5, (2, size, size), generator=g))
                            for _ in range(iters)]
        kw["method_cfg"] = {"epochs": 1, "lr_seg": 0.01, "alpha": 1e-3}
    before = layer_flops(model, size) if layers else None
    t = time.perf_counter()
    res = prune_model(model, method, keep_ratio=0.5, parts=model.parts, never_prune=list(model.never_prune),
                      input_size=(size, size), num_classes=5, include_coupled=coupled, **kw)
    r = res.report
    units = r["units"]
    top = None
    if layers:  # where the pruned network's FLOPs sit, next to the same layer before pruning
        after = layer_flops(res.model, size)
        top = [{"layer": n, "gflops_before": round(before.get(n, 0) / 1e9, 4), "gflops_after": round(f / 1e9, 4),
                "share_of_pruned": round(f / after["total"], 4)}
               for n, f in sorted(after.items(), key=lambda kv: -kv[1]) if n != "total"][:layers]
    return {"model": spec, "method": method, "include_coupled": coupled, "input_size": size, "gamma": gamma,
            "top_layers": top,
            "flops_ratio": round(r["flops"]["ratio"], 4), "params_ratio": round(r["params"]["ratio"], 4),
            "gflops_before": round(r["flops"]["before"] / 1e9, 3), "units": len(units),
            "channels": sum(u["channels"] for u in units.values()), "output_shape": r["output_shape"],
            "parts_without_units": r.get("parts_without_units", {}), "wall_s": round(time.perf_counter() - t, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=DEFAULT)
    ap.add_argument("--size", type=int, default=256, help="square input side (pixels) for tracing and FLOPs")
    ap.add_argument("--methods", nargs="+", default=["fpgm", "slimming"])
    ap.add_argument("--slimming-iters", type=int, default=2)
    ap.add_argument("--coupled", action="store_true", help="also prune residual-coupled groups (include_coupled)")
    ap.add_argument("--gamma", choices=("spread", "ones"), default="spread",
                    help="γ before pruning: U(0.5, 1.5) draws (default) or 1 (a fresh network: Slimming's scores tie)")
    ap.add_argument("--layers", type=int, default=0, metavar="N",
                    help="also print the N conv/linear layers holding most of the pruned network's FLOPs")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    out = []
    print(f"input {a.size}x{a.size}, keep ratio 0.5, include_coupled={a.coupled}, gamma={a.gamma}, "
          f"threads {torch.get_num_threads()}")
    print("| model | method | FLOPs ratio | params ratio | GFLOPs before | units (channels) |")
    print("|---|---|---|---|---|---|")
    for spec in a.models:
        for method in a.methods:
            row = measure(spec, method, a.size, a.slimming_iters, a.coupled, gamma=a.gamma, layers=a.layers)
            out.append(row)
            print(f"| {spec} | {method} | {row['flops_ratio']:.3f}x | {row['params_ratio']:.3f}x | "
                  f"{row['gflops_before']:.2f} | {row['units']} ({row['channels']}) |", flush=True)
            for t in row["top_layers"] or []:
                print(f"|   {t['layer']} | | {t['gflops_before']:.4f} -> {t['gflops_after']:.4f} GFLOPs | "
                      f"{100 * t['share_of_pruned']:.1f}% of pruned | | |", flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
