"""Building blocks shared by the segmentation models: channel widths, conv-BN-ReLU, resizing,
and the hook that lets Torch-Pruning's dependency graph see the training-only auxiliary heads.

Auxiliary-head interface (PSPNet, BiSeNet; DeepLabV3 has none):

* ``forward_aux(x)``: images (N, 3, H, W) -> ``(main, [aux_1, ...])``, every tensor logits
  (N, K, H, W); the auxiliary heads run in train and eval mode alike.
* ``aux_weights``: one loss weight per auxiliary output; the segmentation loss is
  ``CE(main) + sum_i aux_weights[i] * CE(aux_i)`` (``segprune.engine.train.seg_loss``).
* ``aux_modules``: names of the training-only submodules; they are not part of the deployed
  network and the paper's parameter counts leave them out (``count_params(model, aux=False)``
  in ``benchmarks/model_zoo.py``).

Torch-Pruning traces ``model(x)`` (``segprune.pruning.build_graph``: eval mode, autograd on). A
head that is not on that trace would keep its input channels when the features it reads are
pruned, and ``forward_aux`` would then fail. So in eval mode *with autograd enabled* — which in
segprune only the graph tracer does; evaluation, FLOP counting, latency and ONNX export run under
``no_grad``/``inference_mode`` — ``forward`` also runs the auxiliary heads and ties their outputs
to the main logits with :func:`tie_aux`, an identity on the main logits (bit-identical values, no
gradient to the auxiliary outputs) whose only effect is to put the heads on the autograd graph.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ch", "ConvBNReLU", "upsample", "tie_aux", "tracing_aux"]


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


class _TieAux(torch.autograd.Function):
    """y = main; the auxiliary inputs only appear on the autograd graph (no gradient flows to them)."""

    @staticmethod
    def forward(ctx, main, *aux):  # noqa: D401 - autograd API
        ctx.n_aux = len(aux)
        return main.clone()

    @staticmethod
    def backward(ctx, grad):
        return (grad,) + (None,) * ctx.n_aux


def tie_aux(main: torch.Tensor, aux: Sequence[torch.Tensor]) -> torch.Tensor:
    """Return a copy of ``main`` (N, K, H, W) whose autograd node also has the ``aux`` logits
    (each (N, K, H, W)) as inputs, so that a dependency-graph tracer walking back from the model's
    output reaches the auxiliary heads. Values are those of ``main`` exactly."""
    return _TieAux.apply(main, *aux)


def tracing_aux(model: nn.Module) -> bool:
    """True when ``forward`` should run and tie the auxiliary heads: eval mode with autograd on
    (how ``segprune.pruning.build_graph`` traces a model; see the module docstring)."""
    return not model.training and torch.is_grad_enabled()
