"""BiSeNet v1 (Yu et al. 2018, "BiSeNet: Bilateral Segmentation Network") with a ResNet-18 context path.

Layout of ycszen/TorchSeg (``bisenet.R18``), the implementation behind the MTP paper's BiSeNet
figures (Table 3, Section 4.4, footnote 3); all channel counts scale with ``width``:

* ``backbone`` (context path): ResNet-18 at output stride 32, plus the classification head
  ``fc`` used by MTP's classification task (Eq. 1/7).
* ``decoder.spatial_path``: three conv-BN-ReLU with stride 2 (7x7 3 -> 64, 3x3 64 -> 64,
  3x3 64 -> 64) and a 1x1 conv-BN-ReLU 64 -> 128: (N, 3, H, W) -> (N, 128, H/8, W/8).
* ``decoder.global_context``: global average pool of ``layer4`` -> 1x1 conv-BN-ReLU 512 -> 128.
* ``decoder.arms[0]`` / ``arms[1]``: attention refinement modules (BiSeNet Sec. 3.2) on the
  ``layer4`` (stride 32, 512 ch) / ``layer3`` (stride 16, 256 ch) outputs: 3x3 conv-BN-ReLU
  cin -> 128, then ``x * sigmoid(BN(conv1x1(avgpool(x))))``.
* ``decoder.refines[i]``: 3x3 conv-BN-ReLU 128 -> 128 after each upsampling step:
  ``r0 = refine0(up(arm0(c5) + gc, stride 16))``, ``r1 = refine1(up(arm1(c4) + r0, stride 8))``.
* ``decoder.ffm``: feature fusion module (Sec. 3.3): ``f = conv1x1-BN-ReLU(cat(sp, r1))`` (256 ch),
  ``f + f * sigmoid(conv1x1(ReLU(conv1x1(avgpool(f)))))``.
* ``decoder.head``: 3x3 conv-BN-ReLU 256 -> 64, 1x1 conv -> K, upsampled x8.
* ``aux_heads[0]`` / ``[1]`` (training only): 3x3 conv-BN-ReLU 128 -> 256 and 1x1 conv -> K on
  ``r0`` (stride 16) and ``r1`` (stride 8); loss weight 1 each (BiSeNet Eq. 2 with alpha = 1,
  TorchSeg sums the three losses).

Parameters at 19 classes (Cityscapes, the paper's Table 3) without ``backbone.fc`` and the
auxiliary heads: 12,894,163 (paper: 12.89M).

Pruned by default (uncoupled units): the first conv of every backbone BasicBlock (the stem feeds
``layer1``'s identity shortcut, so it is residual-coupled), the four spatial-path convs,
``refines[1]`` and the head's 3x3 conv. The ARM convs are coupled with their
attention conv and with what is added to them (``global_context`` for ``arms[0]``,
``refines[0]`` for ``arms[1]``), and the FFM's 1x1 conv with its attention's second conv (the
products ``x * attention``): these groups are pruned with ``prune.prune_coupled: true``. The
FFM attention's first conv has no BatchNorm (no γ to rank): never pruned. Never pruned either:
``decoder.head.cls``, ``backbone.fc`` and the auxiliary heads.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import ConvBNReLU, ch, upsample
from .resnet import ResNet

__all__ = ["SpatialPath", "AttentionRefinement", "FeatureFusion", "BiSeNetHead", "BiSeNetDecoder", "BiSeNet",
           "build_bisenet"]


class SpatialPath(nn.Sequential):
    """(N, 3, H, W) -> (N, cout, H/8, W/8): 7x7/2, 3x3/2, 3x3/2 conv-BN-ReLU (``inner`` ch), 1x1 to ``cout``."""

    def __init__(self, cin: int, inner: int, cout: int):
        super().__init__(ConvBNReLU(cin, inner, 7, 2), ConvBNReLU(inner, inner, 3, 2), ConvBNReLU(inner, inner, 3, 2),
                         ConvBNReLU(inner, cout, 1))


class AttentionRefinement(nn.Module):
    """ARM: (N, cin, h, w) -> (N, cout, h, w); ``conv`` then channel attention
    ``x * sigmoid(BN(conv1x1(avgpool(x))))`` (``attention`` = [pool, conv, BN, Sigmoid])."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout, 3)
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), *ConvBNReLU(cout, cout, 1, relu=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x * self.attention(x)


class FeatureFusion(nn.Module):
    """FFM: (N, c1, h, w), (N, c2, h, w) -> (N, cout, h, w); ``f = conv(cat)``, ``f + f * attention(f)``
    with ``attention`` = [pool, 1x1 conv cout -> cout/reduction, ReLU, 1x1 conv -> cout, Sigmoid] (no BN)."""

    def __init__(self, cin: int, cout: int, reduction: int = 1):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout, 1)
        mid = max(1, cout // reduction)
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cout, mid, 1, bias=False), nn.ReLU(inplace=True),
                                       nn.Conv2d(mid, cout, 1, bias=False), nn.Sigmoid())

    def forward(self, sp: torch.Tensor, cp: torch.Tensor) -> torch.Tensor:
        f = self.conv(torch.cat([sp, cp], dim=1))
        return f + f * self.attention(f)


class BiSeNetHead(nn.Module):
    """(N, cin, h, w) -> logits (N, K, h, w): ``conv`` (3x3 conv-BN-ReLU cin -> mid), ``cls`` (1x1 conv, bias)."""

    def __init__(self, cin: int, mid: int, num_classes: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid, 3)
        self.cls = nn.Conv2d(mid, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.conv(x))


class BiSeNetDecoder(nn.Module):
    """Everything but the context-path ResNet (W2 in the MTP paper's notation).

    ``forward(x, c3, c4, c5)``: image (N, 3, H, W) and ResNet ``layer2``/``layer3``/``layer4``
    outputs (strides 8, 16, 32) -> (logits (N, K, H/8, W/8), [r0 (N, C, H/16, W/16), r1 (N, C, H/8, W/8)]),
    the refined context features the auxiliary heads read.
    """

    def __init__(self, c4: int, c5: int, num_classes: int, width: float = 1.0):
        super().__init__()
        cc = ch(128, width)
        sp = ch(128, width)
        self.spatial_path = SpatialPath(3, ch(64, width), sp)
        self.global_context = nn.Sequential(nn.AdaptiveAvgPool2d(1), *ConvBNReLU(c5, cc, 1))
        self.arms = nn.ModuleList([AttentionRefinement(c5, cc), AttentionRefinement(c4, cc)])
        self.refines = nn.ModuleList([ConvBNReLU(cc, cc, 3), ConvBNReLU(cc, cc, 3)])
        self.ffm = FeatureFusion(sp + cc, 2 * cc)
        self.head = BiSeNetHead(2 * cc, ch(64, width), num_classes)
        self.context_channels = cc

    def forward(self, x: torch.Tensor, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor):
        sp = self.spatial_path(x)
        fm = self.arms[0](c5) + upsample(self.global_context(c5), c5.shape[-2:])
        r0 = self.refines[0](upsample(fm, c4.shape[-2:]))
        fm = self.arms[1](c4) + r0
        r1 = self.refines[1](upsample(fm, c3.shape[-2:]))
        cp = r1 if r1.shape[-2:] == sp.shape[-2:] else upsample(r1, sp.shape[-2:])
        return self.head(self.ffm(sp, cp)), [r0, r1]


class BiSeNet(nn.Module):
    """BiSeNet v1 with a classification head on the context-path backbone.

    ``forward(x)``: (N, 3, H, W) -> logits (N, K, H, W). ``forward_aux(x)`` -> ``(main, [aux0, aux1])``,
    all (N, K, H, W). ``forward_cls(x)``: (N, 3, h, w) -> (N, cls_classes) through ``backbone`` and
    ``backbone.fc``. Attributes ``parts`` (``backbone.`` / ``decoder.``), ``never_prune``,
    ``aux_weights`` (``(1.0, 1.0)``), ``aux_modules`` (``("aux_heads",)``).

    Raises:
        ValueError: ``num_classes < 1``.
    """

    def __init__(self, backbone: ResNet, num_classes: int, width: float = 1.0, aux_weights=(1.0, 1.0)):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r} must be >= 1")
        self.backbone = backbone
        c4 = backbone.layer3[-1].bn2.num_features
        c5 = backbone.out_channels
        self.decoder = BiSeNetDecoder(c4, c5, num_classes, width)
        cc = self.decoder.context_channels
        self.aux_heads = nn.ModuleList([BiSeNetHead(cc, ch(256, width), num_classes) for _ in range(2)])
        self.num_classes = num_classes
        self.parts = {"backbone": "backbone.", "decoder": "decoder."}
        self.never_prune = ("decoder.head.cls", "backbone.fc", "aux_heads.0.conv.0", "aux_heads.0.cls",
                            "aux_heads.1.conv.0", "aux_heads.1.cls")
        self.aux_weights = tuple(float(w) for w in aux_weights)
        self.aux_modules = ("aux_heads",)

    def _run(self, x: torch.Tensor):
        _, c3, c4, c5 = self.backbone.stage_features(x)
        return self.decoder(x, c3, c4, c5)

    def forward_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(N, 3, H, W) -> (main logits, [aux logits on r0, aux logits on r1]), each (N, K, H, W)."""
        out, feats = self._run(x)
        size = x.shape[-2:]
        return upsample(out, size), [upsample(h(f), size) for h, f in zip(self.aux_heads, feats)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample(self._run(x)[0], x.shape[-2:])

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def build_bisenet(num_classes: int, cls_classes: int, width: float = 1.0, depth: int = 18) -> BiSeNet:
    """BiSeNet on a ResNet-``depth`` (18 or 34: the context path reads BasicBlock stages) context path."""
    if depth not in (18, 34):
        raise ValueError(f"BiSeNet here supports ResNet-18/34 context paths, not ResNet-{depth}")
    blocks = {18: 2, 34: 3}[depth]
    backbone = ResNet(depth, output_stride=32, multi_grid=(1,) * blocks, width=width, num_classes=cls_classes)
    return BiSeNet(backbone, num_classes, width)
