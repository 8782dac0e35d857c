"""DeepLabv3 (Chen et al. 2017, "Rethinking atrous convolution") on a ResNet backbone.

Module names follow torchvision's ``deeplabv3_resnet*``: ``backbone`` (a ResNet with
``fc`` kept as the classification head used by MTP's classification task) and
``classifier`` = [ASPP, 3x3 conv, BN, ReLU, 1x1 conv to classes]. In the MTP paper's
notation ``backbone`` holds W1/W3 (network N1) and ``classifier`` holds W2 (the decoder of N2).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import ResNet

__all__ = ["ASPP", "DeepLabHead", "DeepLabV3", "ASPP_RATES"]

#: ASPP atrous rates per output stride (DeepLabv3, Sec. 3.3).
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


def _cbr(cin: int, cout: int, k: int = 1, dilation: int = 1) -> list[nn.Module]:
    pad = 0 if k == 1 else dilation
    return [nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ASPPPooling(nn.Sequential):
    """Image-level branch: global average pool -> 1x1 conv -> BN -> ReLU -> upsample to (H, W)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), *_cbr(cin, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        for mod in self:
            x = mod(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling: (N, cin, H, W) -> (N, cout, H, W).

    Branches ``convs[0]`` (1x1), ``convs[1..3]`` (3x3 at ``rates``), ``convs[4]`` (image pooling);
    their concatenation is fused by ``project`` (1x1 conv, BN, ReLU, dropout 0.5).
    """

    def __init__(self, cin: int, rates: Sequence[int], cout: int = 256):
        super().__init__()
        branches = [nn.Sequential(*_cbr(cin, cout))]
        branches += [nn.Sequential(*_cbr(cin, cout, 3, r)) for r in rates]
        branches.append(ASPPPooling(cin, cout))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(*_cbr(len(branches) * cout, cout), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    """ASPP -> 3x3 conv -> BN -> ReLU -> 1x1 conv: (N, cin, h, w) -> logits (N, num_classes, h, w).

    ``head_conv=False`` drops the 3x3 conv/BN/ReLU (ASPP -> 1x1 conv), the layout of
    chenxi116/DeepLabv3.pytorch that the MTP paper used (its footnote 1): 589,824 + 512 fewer
    parameters at 256 channels, which is the difference between torchvision's DeepLabv3-R101
    (58.63M without ``fc``) and the paper's 58.04M.
    """

    def __init__(self, cin: int, num_classes: int, rates: Sequence[int], channels: int = 256, head_conv: bool = True):
        mid = [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
               nn.ReLU(inplace=True)] if head_conv else []
        super().__init__(ASPP(cin, rates, channels), *mid, nn.Conv2d(channels, num_classes, 1))


class DeepLabV3(nn.Module):
    """DeepLabv3 segmentation network with a classification head on the same backbone.

    ``forward(x)``: images (N, 3, H, W) -> logits (N, num_classes, H, W), bilinearly upsampled
    from stride ``output_stride``. ``forward_cls(x)``: (N, 3, h, w) -> (N, cls_classes) through
    ``backbone`` and ``backbone.fc`` (the classification task of MTP, Eq. 1/7).

    Attributes used by the pruning layers:
        parts: ``{"backbone": "backbone.", "decoder": "classifier."}`` module-name prefixes
            (N1/W1 and the decoder W2 of the MTP paper).
        never_prune: output layers whose output channels must never be removed.

    ``head_conv``: see :class:`DeepLabHead` (False = the MTP paper's 58.04M layout).

    Raises:
        ValueError: ``num_classes < 1``.
    """

    def __init__(self, backbone: ResNet, num_classes: int, aspp_channels: int = 256,
                 rates: Sequence[int] | None = None, head_conv: bool = True):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r} must be >= 1")
        self.backbone = backbone
        rates = tuple(rates) if rates is not None else ASPP_RATES.get(backbone.output_stride, (6, 12, 18))
        self.classifier = DeepLabHead(backbone.out_channels, num_classes, rates, aspp_channels, head_conv)
        self.num_classes = num_classes
        self.parts = {"backbone": "backbone.", "decoder": "classifier."}
        self.never_prune = (f"classifier.{len(self.classifier) - 1}", "backbone.fc")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.classifier(self.backbone.forward_features(x))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)
