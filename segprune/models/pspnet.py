"""PSPNet (Zhao et al. 2017, "Pyramid Scene Parsing Network") on a dilated ResNet-50.

Layout of hszhao/semseg, the implementation behind the MTP paper's PSPNet-R50 figures (Table 2,
Section 4.5, footnote 2):

* ``backbone``: ResNet-50, output stride 8 (``layer3`` dilation 2, ``layer4`` dilation 4, every
  3x3 conv of a stage dilated: ``first_block_dilation="stage"``), plus the classification head
  ``fc`` used by MTP's classification task (Eq. 1/7).
* ``classifier`` = [PPM, 3x3 conv (4096 -> 512), BN, ReLU, Dropout2d(0.1), 1x1 conv -> K]. The
  pyramid pooling module (Sec. 3.3 of the PSPNet paper) pools the layer4 features to 1x1, 2x2,
  3x3 and 6x6 bins, reduces each to 2048/4 = 512 channels (1x1 conv, BN, ReLU), upsamples them
  back and concatenates them with its input.
* ``aux_classifier`` (training only) = torchvision's FCNHead on ``layer3``: [3x3 conv (1024 ->
  256), BN, ReLU, Dropout(0.1), 1x1 conv -> K], loss weight 0.4 (PSPNet paper Sec. 3.4 / semseg
  ``aux_weight``).

Parameters at 21 classes (PASCAL VOC, the paper's Table 2), without ``backbone.fc`` and the
auxiliary head: 46,592,597 with the 7x7 stem (torchvision ResNet-50, loadable from torchvision
weights), 46,716,373 with semseg's deep stem (``deep_stem=True``); the paper prints 46.71M.

Pruned (``segprune.pruning.discover_units``): in the backbone the first two convs of every
bottleneck and the stem convs (``layer1.0`` has a projection shortcut, so the stem output is not
added to a residual), in the decoder the
four PPM branch convs (``classifier.0.stages.{0..3}.1``) and the 3x3 bottleneck conv
(``classifier.1``). Never pruned: ``classifier.5``, ``backbone.fc`` and the training-only
auxiliary head (``aux_classifier.0``, ``aux_classifier.4``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .common import ConvBNReLU, ch, upsample
from .resnet import ResNet

__all__ = ["PPM", "PSPHead", "FCNHead", "PSPNet", "PPM_BINS", "PSP_AUX_WEIGHT"]

#: pyramid bin sizes of the PSPNet paper (Sec. 3.3)
PPM_BINS = (1, 2, 3, 6)
#: weight of the auxiliary loss on layer3 (PSPNet paper Sec. 3.4, semseg ``aux_weight``)
PSP_AUX_WEIGHT = 0.4


class PPM(nn.Module):
    """Pyramid pooling module: (N, cin, h, w) -> (N, cin + len(bins) * reduction, h, w).

    ``stages[i]`` = [AdaptiveAvgPool2d(bins[i]), 1x1 conv cin -> reduction, BN, ReLU]; each branch
    is bilinearly upsampled to (h, w) and concatenated after the input.
    """

    def __init__(self, cin: int, reduction: int, bins: Sequence[int] = PPM_BINS):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(b), *ConvBNReLU(cin, reduction)) for b in bins)
        self.out_channels = cin + len(bins) * reduction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return torch.cat([x] + [upsample(s(x), size) for s in self.stages], dim=1)


class PSPHead(nn.Sequential):
    """[PPM, 3x3 conv, BN, ReLU, Dropout2d(0.1), 1x1 conv]: (N, cin, h, w) -> logits (N, K, h, w)."""

    def __init__(self, cin: int, num_classes: int, channels: int = 512, bins: Sequence[int] = PPM_BINS):
        ppm = PPM(cin, cin // len(bins), bins)
        super().__init__(ppm, nn.Conv2d(ppm.out_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                         nn.ReLU(inplace=True), nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))


class FCNHead(nn.Sequential):
    """torchvision's FCNHead: [3x3 conv cin -> cin/4, BN, ReLU, Dropout(0.1), 1x1 conv -> K]."""

    def __init__(self, cin: int, num_classes: int):
        mid = max(1, cin // 4)
        super().__init__(nn.Conv2d(cin, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                         nn.Dropout(0.1), nn.Conv2d(mid, num_classes, 1))


class PSPNet(nn.Module):
    """PSPNet segmentation network with a classification head on the same backbone.

    ``forward(x)``: images (N, 3, H, W) -> logits (N, K, H, W) (bilinear upsampling from stride
    ``backbone.output_stride``). ``forward_aux(x)`` -> ``(main, [aux])``, both (N, K, H, W), aux
    from ``aux_classifier`` on ``layer3``. ``forward_cls(x)``: (N, 3, h, w) -> (N, cls_classes)
    through ``backbone`` and ``backbone.fc`` (MTP's classification task, Eq. 1/7).

    Attributes: ``parts`` (``backbone.`` / ``classifier.``), ``never_prune``, ``aux_weights``
    (``(0.4,)``), ``aux_modules`` (``("aux_classifier",)``); see ``segprune.models.common``.

    Raises:
        ValueError: ``num_classes < 1``; a backbone that is not a bottleneck ResNet (the auxiliary
            head reads ``layer3``'s 4 x 256 x width channels).
    """

    def __init__(self, backbone: ResNet, num_classes: int, channels: int = 512, bins: Sequence[int] = PPM_BINS,
                 aux_weight: float = PSP_AUX_WEIGHT):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r} must be >= 1")
        self.backbone = backbone
        c3 = backbone.layer3[-1].bn3.num_features if hasattr(backbone.layer3[-1], "bn3") else None
        if c3 is None:
            raise ValueError("PSPNet needs a bottleneck ResNet (50/101) backbone")
        self.classifier = PSPHead(backbone.out_channels, num_classes, channels, bins)
        self.aux_classifier = FCNHead(c3, num_classes)
        self.num_classes = num_classes
        self.parts = {"backbone": "backbone.", "decoder": "classifier."}
        self.never_prune = ("classifier.5", "backbone.fc", "aux_classifier.0", "aux_classifier.4")
        self.aux_weights = (float(aux_weight),)
        self.aux_modules = ("aux_classifier",)

    def forward_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(N, 3, H, W) -> (main logits, [layer3 auxiliary logits]), each (N, K, H, W)."""
        _, _, c3, c4 = self.backbone.stage_features(x)
        size = x.shape[-2:]
        return upsample(self.classifier(c4), size), [upsample(self.aux_classifier(c3), size)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample(self.classifier(self.backbone.forward_features(x)), x.shape[-2:])

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def build_pspnet(depth: int, num_classes: int, cls_classes: int, width: float = 1.0, output_stride: int = 8,
                 deep_stem: bool = False, channels: int = 512) -> PSPNet:
    """PSPNet on a dilated ResNet-``depth`` (50 or 101) at width multiplier ``width``.

    ``channels``: the 3x3 bottleneck conv after the PPM (512 in the paper), scaled by ``width``.
    Raises ValueError for a depth without bottleneck blocks or an output stride other than 8/16.
    """
    if depth not in (50, 101):
        raise ValueError(f"PSPNet needs ResNet-50 or -101, not ResNet-{depth}")
    backbone = ResNet(depth, output_stride=output_stride, multi_grid=(1, 1, 1), width=width, num_classes=cls_classes,
                      first_block_dilation="stage", deep_stem=deep_stem)
    return PSPNet(backbone, num_classes, ch(channels, width))
