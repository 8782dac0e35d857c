"""Parameters and FLOPs of the model zoo at the MTP paper's input sizes, beside the paper's figures.

    python benchmarks/model_zoo.py            # prints a Markdown table (a few seconds, CPU)

Models are built on the ``meta`` device (shapes only, no memory, no arithmetic) and costed with
``segprune.engine.profile.count_flops`` (``torch.utils.flop_counter``: one multiply-add = 2 FLOPs,
MACs = FLOPs / 2; convolutions and matrix products only, the segmentation forward in eval mode,
auxiliary heads not run). Parameters: the deployed network, i.e. without the classification head
``backbone.fc`` (MTP's classification task only) and without the training-only auxiliary heads.

Paper figures: Table 2 (PASCAL VOC, 21 classes, 513x513), Table 3 (Cityscapes, 19 classes, footnote
"2048x1024") and Table 4 (VOC, "1080x720") of Chen et al., "Multi-Task Pruning for Semantic
Segmentation Networks". Results and their reading: docs/models.md.
"""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segprune.engine.profile import count_flops  # noqa: E402
from segprune.models import build_model  # noqa: E402
from segprune.models.deeplabv3 import DeepLabV3  # noqa: E402
from segprune.models.resnet import ResNet  # noqa: E402


def deployed_params(model: torch.nn.Module) -> int:
    """Parameters without ``backbone.fc`` and the modules named in ``model.aux_modules``."""
    skip = ("backbone.fc.",) + tuple(f"{a}." for a in getattr(model, "aux_modules", ()))
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(skip))


def _dl_paper(k: int) -> DeepLabV3:
    return DeepLabV3(ResNet(101, 16, (1, 1, 1), num_classes=1000), k, head_conv=False)


def _zoo(name: str, k: int, **kw):
    return lambda: build_model({"name": name, **kw}, k, 1000)


#: (label, classes, builder, (H, W), paper params M, paper "FLOPs" G, source)
ROWS = [
    ("`deeplabv3_resnet101` OS16", 21, _zoo("deeplabv3_resnet101", 21), (513, 513), 58.04, 71.52, "Table 2"),
    ("DeepLabv3-R101 OS16, paper head (`head_conv=False`)", 21, lambda: _dl_paper(21), (513, 513), 58.04, 71.52,
     "Table 2"),
    ("`deeplabv3_resnet101` OS16", 19, _zoo("deeplabv3_resnet101", 19), (1024, 2048), 58.04, 201.88,
     "Table 3 (as footnoted)"),
    ("DeepLabv3-R101 OS16, paper head", 19, lambda: _dl_paper(19), (1024, 2048), 58.04, 201.88, "Table 3 (as footnoted)"),
    ("DeepLabv3-R101 OS16, paper head", 19, lambda: _dl_paper(19), (720, 1080), 58.04, 201.88, "Table 3 at Table 4's size"),
    ("DeepLabv3-R101 OS16, paper head", 21, lambda: _dl_paper(21), (720, 1080), 58.039, 201.86, "Table 4"),
    ("`pspnet_resnet50` OS8 (7x7 stem)", 21, _zoo("pspnet_resnet50", 21, output_stride=8), (513, 513), 46.71, 190.43,
     "Table 2"),
    ("PSPNet-R50 OS8, semseg deep stem (`deep_stem=True`)", 21,
     _zoo("pspnet_resnet50", 21, output_stride=8, deep_stem=True), (513, 513), 46.71, 190.43, "Table 2"),
    ("`bisenet_resnet18`", 19, _zoo("bisenet_resnet18", 19), (1024, 2048), 12.89, 104.27, "Table 3"),
]


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    print(f"`python benchmarks/model_zoo.py` at commit {_commit()}, torch {torch.__version__}, "
          f"Python {platform.python_version()}; models on the meta device.\n")
    print("| model | classes | input H×W | params (M) | paper params (M) | GFLOPs (2/MAC) | GMACs | paper \"FLOPs\" (G) "
          "| GMACs / paper | source |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for label, k, make, size, p_params, p_flops, src in ROWS:
        with torch.device("meta"):
            model = make()
        fl = count_flops(model, size)
        params = deployed_params(model) / 1e6
        print(f"| {label} | {k} | {size[0]}×{size[1]} | {params:.3f} | {p_params} | {fl['flops'] / 1e9:.2f} | "
              f"{fl['macs'] / 1e9:.2f} | {p_flops} | {fl['macs'] / 1e9 / p_flops:.3f} | {src} |")


if __name__ == "__main__":
    main()
