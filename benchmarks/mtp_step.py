"""Benchmark: cost of one MTP sparsity iteration vs one plain classification + one plain segmentation step.

One MTP iteration (Algorithm 1, lines 3-6) = W1 step on a classification batch (Eq. 7) +
shared W2/W3 step on a segmentation batch (Eqs. 8-9) + multiplier update (Eq. 10). The reference
is one ordinary SGD step of each task at the same batch sizes and input sizes. Target ratio <= 1.15.

    python benchmarks/mtp_step.py                      # demo scale (width 0.25, 64x64 / 32x32)
    python benchmarks/mtp_step.py --width 0.5 --seg-size 240 320 --cls-size 64 64 --seg-batch 8 --cls-batch 64
    python benchmarks/mtp_step.py --device cuda --amp bf16 --model deeplabv3_resnet101 --width 1 \
        --output-stride 16 --seg-size 513 513 --seg-batch 16 --cls-size 224 224 --cls-batch 64

On CUDA every timed round ends with ``torch.cuda.synchronize()``, and the peak memory of the timed
part (``torch.cuda.max_memory_allocated``, GiB) is reported. ``--amp`` runs both the plain steps and
MTP's steps under autocast (MTP through ``train.amp``: ``segprune.engine.amp``; the plain steps
without a loss scale, which only the timing needs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from segprune.engine.amp import Amp, amp_mode
from segprune.methods.mtp import MTP
from segprune.models import build_model
from segprune.pruning import build_graph, discover_units


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deeplabv3_resnet18")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--output-stride", type=int, default=8)
    ap.add_argument("--seg-size", type=int, nargs=2, default=[64, 64])
    ap.add_argument("--cls-size", type=int, nargs=2, default=[32, 32])
    ap.add_argument("--seg-batch", type=int, default=16)
    ap.add_argument("--cls-batch", type=int, default=64)
    ap.add_argument("--classes", type=int, default=11)
    ap.add_argument("--cls-classes", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
    ap.add_argument("--steps", type=int, default=3, help="iterations per timed round")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    ap.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"), help="mixed precision (train.amp)")
    ap.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last memory format")
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {a.device}: CUDA is not available on this machine")
        torch.backends.cudnn.benchmark = True
    model = build_model({"name": a.model, "width": a.width, "output_stride": a.output_stride}, a.classes, a.cls_classes)
    units = discover_units(model, build_graph(model, (64, 64)))
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    model.to(dev, memory_format=fmt)
    cfg = dict(lam=1.0, alpha1=1e-3, alpha2=1e-3, mu0=0.1, rho=1.05, mu_max=20.0, lr_seg=0.01, lr_cls=0.01,
               momentum=0.9, weight_decay=1e-4, l1_mode="proximal", keep_copy="w3")
    with amp_mode(a.amp):  # MTP's W1 and W2/W3 steps build their autocast/GradScaler from train.amp
        mtp = MTP(model, units, cfg)
    mtp.w1.to(memory_format=fmt)
    xs = torch.randn(a.seg_batch, 3, *a.seg_size, device=dev).contiguous(memory_format=fmt)
    ys = torch.randint(0, a.classes, (a.seg_batch, *a.seg_size), device=dev)
    xc = torch.randn(a.cls_batch, 3, *a.cls_size, device=dev).contiguous(memory_format=fmt)
    yc = torch.randint(0, a.cls_classes, (a.cls_batch,), device=dev)
    cast = Amp(dev, a.amp).autocast  # the plain steps' autocast: the training loops' own (its scaler unused)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def plain():
        # the same two optimisers and networks, ordinary SGD steps without any MTP term
        with cast():
            loss = F.cross_entropy(mtp.w1(xc), yc)
        mtp.opt1.zero_grad(set_to_none=True)
        loss.backward()
        mtp.opt1.step()
        with cast():
            loss = F.cross_entropy(model(xs), ys, ignore_index=255)
        mtp.opt23.zero_grad(set_to_none=True)
        loss.backward()
        mtp.opt23.step()

    def mtp_iter():
        mtp.step_w1(xc, yc, 0.01)
        mtp.step_w23(xs, ys, 0.01, 255)
        mtp.update_multipliers()

    times = {"plain": [], "mtp": []}
    for _ in range(2):  # warm-up (on CUDA also cuDNN's algorithm search)
        plain(), mtp_iter()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(a.repeats):  # interleaved so that machine load affects both alike
        for name, fn in (("plain", plain), ("mtp", mtp_iter)):
            sync()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) / a.steps * 1000)
    med = {k: statistics.median(v) for k, v in times.items()}
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    res = {"setting": vars(a), "plain_ms": med["plain"], "mtp_ms": med["mtp"], "ratio": med["mtp"] / med["plain"],
           "target": 1.15, "peak_gib": peak, "torch": torch.__version__,
           "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    print(f"plain cls+seg step: {med['plain']:.1f} ms   MTP iteration: {med['mtp']:.1f} ms   "
          f"ratio {res['ratio']:.3f} (target <= 1.15)" + (f"   peak {peak:.2f} GiB" if peak is not None else ""))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
