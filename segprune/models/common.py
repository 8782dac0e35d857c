"""Building blocks shared by the segmentation models: channel widths, conv-BN-ReLU, resizing,
and the auxiliary-head interface.

Auxiliary-head interface (PSPNet, BiSeNet; DeepLabV3 has none):

* ``forward_aux(x)``: images (N, 3, H, W) -> ``(main, [aux_1, ...])``, every tensor logits
  (N, K, H, W); the auxiliary heads run in train and eval mode alike.
* ``aux_weights``: one loss weight per auxiliary output; the segmentation loss is
  ``CE(main) + sum_i aux_weights[i] * CE(aux_i)`` (``segprune.engine.train.seg_loss``).
* ``aux_modules``: names of the training-only submodules; they are not part of the deployed
  network and the paper's parameter counts leave them out (``count_params(model, aux=False)``
  in ``benchmarks/model_zoo.py``).

The pruning graph tracer (``segprune.pruning.build_graph``) runs ``forward_aux`` when a model
has it, so the auxiliary heads are on the dependency graph and follow the channels they read.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ch", "ConvBNReLU", "upsample"]


def ch(channels: int, width: float, minimum: int = 4) -> int:
    """Channels of a layer at width multiplier ``width``: ``max(minimum, round(channels * width))``."""
    return max(minimum, int(round(channels * width)))


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) -> BN -> ReLU (``relu=False``: no ReLU); names ``0`` (conv), ``1`` (BN), ``2``.

    Shapes: (N, cin, H, W) -> (N, cout, H', W') with H' = floor((H + 2p - d(k-1) - 1) / stride) + 1,
    p = d * (k // 2).
    """

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, dilation: int = 1, relu: bool = True):
        layers = [nn.Conv2d(cin, cout, k, stride, padding=dilation * (k // 2), dilation=dilation, bias=False),
                  nn.BatchNorm2d(cout)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of (N, C, h, w) to (N, C, *size)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
