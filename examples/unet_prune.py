"""Prune your own segmentation network with segprune: a small U-Net that is not in the model zoo.

Runs end to end on tiny synthetic data in well under a minute on one CPU core::

    python examples/unet_prune.py            # or: python examples/unet_prune.py --out /tmp/unet

1. builds :class:`UNet` (an encoder with BatchNorm, a decoder that concatenates encoder features,
   a classification head ``enc_fc`` on the deepest encoder feature), and synthetic segmentation and
   classification sets (``segprune.data``'s procedural shapes, one visual vocabulary);
2. trains it briefly: the encoder + ``enc_fc`` on classification (Eq. 1 of the MTP paper), then the
   whole network on segmentation (Eq. 2);
3. prunes a copy with MTP (multi-task: classification + segmentation) and another with Network
   Slimming (segmentation only), both at 0.5x channels, each followed by fine-tuning;
4. prints the reports and saves / re-loads each pruned network without pickle
   (safetensors + JSON), checking that the outputs are bitwise identical.

The walk-through is docs/own_model.md. The model classes are also imported by tests/test_api.py.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvBlock", "Encoder", "Decoder", "UNet", "main"]


class ConvBlock(nn.Sequential):
    """Two (3x3 conv, BatchNorm, ReLU): (N, cin, H, W) -> (N, cout, H, W)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """Three ConvBlocks with 2x2 max-pooling between them.

    ``forward``: (N, C_in, H, W) -> [s1 (N, w, H, W), s2 (N, 2w, H/2, W/2), s3 (N, 4w, H/4, W/4)]
    (H and W divisible by 4); the list ends with the deepest feature, which is what segprune's
    default classification forward pools and feeds to the ``cls_head``.
    """

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.blocks = nn.ModuleList([ConvBlock(in_channels, width), ConvBlock(width, 2 * width),
                                     ConvBlock(2 * width, 4 * width)])
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(self.pool(x) if i else x)
            feats.append(x)
        return feats


class Decoder(nn.Module):
    """U-Net decoder with skip concatenations.

    ``up2`` (2x2 transposed conv, no BatchNorm) upsamples s3 to s2's size; ``block2`` reads
    cat([up2(s3), s2]) (4w channels); its output is bilinearly upsampled to s1's size and
    ``block1`` reads cat([that, s1]) (3w channels). Output (N, w, H, W).
    """

    def __init__(self, width: int):
        super().__init__()
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.block2 = ConvBlock(4 * width, 2 * width)
        self.block1 = ConvBlock(3 * width, width)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        s1, s2, s3 = feats
        x = self.block2(torch.cat([self.up2(s3), s2], dim=1))
        x = F.interpolate(x, size=s1.shape[-2:], mode="bilinear", align_corners=False)
        return self.block1(torch.cat([x, s1], dim=1))


class UNet(nn.Module):
    """A small U-Net: images (N, in_channels, H, W) -> logits (N, num_classes, H, W); H, W divisible by 4.

    Modules: ``enc`` (:class:`Encoder`), ``dec`` (:class:`Decoder`), ``head`` (1x1 conv to the
    classes), ``enc_fc`` (Linear 4w -> cls_classes: classification head on the pooled deepest
    encoder feature, used only by MTP's classification task and its fine-tuning).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 5, cls_classes: int = 4, width: int = 8):
        super().__init__()
        self.enc = Encoder(in_channels, width)
        self.dec = Decoder(width)
        self.head = nn.Conv2d(width, num_classes, 1)
        self.enc_fc = nn.Linear(4 * width, cls_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dec(self.enc(x)))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, in_channels, h, w) -> class logits (N, cls_classes): enc, global average pool, enc_fc.

        The same computation as segprune's default classification forward for ``cls_head="enc_fc"``
        with ``parts["backbone"] = "enc."``; ``cls_forward=UNet.classify`` would say it explicitly.
        """
        return self.enc_fc(torch.flatten(F.adaptive_avg_pool2d(self.enc(x)[-1], 1), 1))


# ---------------------------------------------------------------------------------------------
def _loaders(size: int, kinds: int, n_seg: int, n_cls: int, seed: int = 0):
    """Synthetic loaders (segprune.data's procedural shapes): segmentation train (x (8, 3, S, S),
    y (8, S, S)), classification train (x (16, 3, S/2, S/2), y (16,)) and segmentation eval."""
    from segprune.data import build_cls_dataset, build_seg_dataset
    from segprune.engine.train import make_loader

    seg = {"name": "synthetic", "image_size": [size, size], "input_size": [size, size], "crop_size": [size, size],
           "num_train": n_seg, "num_eval": max(8, n_seg // 4), "num_kinds": kinds}
    cls = {"name": "synthetic", "image_size": [size // 2, size // 2], "num_train": n_cls, "num_kinds": kinds}
    return (make_loader(build_seg_dataset(seg, "train", True, seed), 8, True, seed),
            make_loader(build_cls_dataset(cls, "train", True, seed), 16, True, seed),
            make_loader(build_seg_dataset(seg, "val", False, seed), 8, False, 0))


def fit(model: nn.Module, forward, loader, epochs: int, lr: float = 0.01, ignore_index: int = 255) -> None:
    """The user's own training loop (Adam, cross-entropy): ``forward(x)`` gives (N, K) or (N, K, H, W) logits."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(forward(x), y, ignore_index=ignore_index)
            opt.zero_grad()
            loss.backward()
            opt.step()


def main(argv: list[str] | None = None) -> int:
    """Train, prune (MTP and Slimming at 0.5x), fine-tune, report, save and reload. Returns 0."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="folder for the pruned checkpoints (default: a temporary folder)")
    ap.add_argument("--size", type=int, default=48, help="image side in pixels (multiple of 4)")
    ap.add_argument("--width", type=int, default=8, help="channels of the first encoder block")
    ap.add_argument("--epochs", type=int, default=12, help="baseline segmentation epochs")
    args = ap.parse_args(argv)

    from segprune.api import load_pruned, prune_model, save_pruned
    from segprune.engine.evaluate import evaluate_segmentation

    t0 = time.time()
    torch.manual_seed(0)
    kinds = 2
    seg_loader, cls_loader, seg_eval = _loaders(args.size, kinds, n_seg=96, n_cls=128)
    num_classes = kinds + 1                     # the kinds + background
    model = UNet(3, num_classes, cls_classes=kinds, width=args.width)

    # --- 1./2. the user's own training: encoder + enc_fc on classification, then segmentation --------
    fit(model, model.classify, cls_loader, epochs=2)
    fit(model, model, seg_loader, epochs=args.epochs)
    base_miou = evaluate_segmentation(model, seg_eval, num_classes)["miou"]
    print(f"baseline U-Net: mIoU {100 * base_miou:.2f}%")

    # --- 3. prune: what segprune needs to know about the network ------------------------------------
    common = dict(keep_ratio=0.5, parts={"backbone": "enc.", "decoder": "dec."}, never_prune=["head"],
                  seg_loader=seg_loader, num_classes=num_classes, input_size=(args.size, args.size),
                  cls_head="enc_fc", cls_loader=cls_loader,   # classification task (MTP) and fine-tuning (both)
                  threshold_mode="ind", min_channels=2, quiet=True,
                  finetune={"cls": {"epochs": 1, "lr": 0.01}, "seg": {"epochs": 4, "lr": 0.05}}, seed=0)
    results = {
        # MTP: classification task through enc -> global average pool -> enc_fc (the default cls forward)
        "mtp": prune_model(model, "mtp",
                           method_cfg={"epochs": 3, "lr_seg": 0.05, "lr_cls": 0.02, "alpha1": 0.02, "alpha2": 0.02,
                                       "mu0": 0.1, "rho": 1.2, "mu_max": 5.0, "update_every": 2}, **common),
        # Network Slimming: sparsity training on segmentation only (the classification data is used only
        # by the fine-tuning, as in the pipeline; without cls_head/cls_loader that step is skipped)
        "slimming": prune_model(model, "slimming", method_cfg={"epochs": 3, "lr_seg": 0.05, "alpha": 0.02},
                                **common),
    }

    # --- 4. report, save and reload without pickle ---------------------------------------------------
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="unet_prune_"))
    x = next(iter(seg_eval))[0]
    for name, res in results.items():
        miou = evaluate_segmentation(res.model, seg_eval, num_classes)["miou"]
        print()
        print(res.summary())
        print(f"mIoU after fine-tuning: {100 * miou:.2f}% (baseline {100 * base_miou:.2f}%)")
        if name == "mtp":  # conv widths [in, out] before -> after: the concatenation consumers follow their producers
            before, after = res.report["layer_widths"]["before"], res.report["layer_widths"]["after"]
            print("  conv widths [in, out]: " + ", ".join(f"{k} {before[k]}->{after[k]}" for k in before))
        folder = out / name
        save_pruned(res, folder)
        fresh = UNet(3, num_classes, cls_classes=kinds, width=args.width)      # a new, unpruned instance
        loaded = load_pruned(fresh, folder)
        with torch.no_grad():
            same = torch.equal(loaded.eval()(x), res.model.eval()(x))
        print(f"saved to {folder} (model.safetensors + arch.json); reloaded outputs identical: {same}")
        if not same:
            return 1
    print(f"\ntotal wall time {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
