"""ResNet backbones (post-activation, He et al. 2016) with dilation and a width multiplier.

Module names follow torchvision's ``ResNet`` (``conv1``, ``bn1``, ``layer1`` .. ``layer4``,
``fc``) so that a torchvision-format state dict loads by name into ``model.backbone``.
The blocks are the post-activation ("v1") blocks used by the MTP paper's implementation
(conv-BN-ReLU, residual add, then ReLU): MTP prunes only the convolutions inside a block
whose output is not added to the residual stream (MTP paper, Appendix 6.1).

Dilation of the first block of a dilated stage (``first_block_dilation``):

* ``"previous"`` (default): its strided 3x3 convolution keeps the previous stage's dilation,
  the other blocks use the stage's dilation. This is torchvision's ``replace_stride_with_dilation``
  and the DeepLabv3 implementation the MTP paper used (chenxi116/DeepLabv3.pytorch,
  ``dilation=max(1, dilation/2)`` for the first block), so torchvision weights run as trained.
* ``"stage"``: every 3x3 convolution of the stage uses the stage's dilation (hszhao/semseg's
  PSPNet, which sets ``dilation=2`` on all ``layer3.*.conv2`` and ``4`` on all ``layer4.*.conv2``).

``deep_stem=True`` replaces the 7x7 stem by semseg's "deep base" (3x3 convs 3->64 (stride 2)
->64->128, named ``conv1/bn1``, ``conv2/bn2``, ``conv3/bn3``; ``layer1`` then takes 128 channels).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet", "RESNET_LAYERS"]

RESNET_LAYERS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                 50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; input (N, inplanes, H, W) -> (N, planes, H/stride, W/stride)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1, prev_dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=prev_dilation, dilation=prev_dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4); input (N, inplanes, H, W) -> (N, 4*planes, H/s, W/s)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1, prev_dilation: int = 1):
        super().__init__()
        del dilation  # the only 3x3 conv is the (possibly strided) first one: it runs at prev_dilation
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, prev_dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet feature extractor plus a classification head (global average pool + ``fc``).

    Args:
        depth: 18, 34, 50 or 101.
        output_stride: 32 (classification), 16 or 8. 16 replaces the stride of ``layer4`` by
            dilation 2; 8 replaces ``layer3`` by dilation 2 and ``layer4`` by dilation 4
            (DeepLabv3, Chen et al. 2017, Sec. 3.1).
        multi_grid: per-block dilation multipliers of ``layer4`` (DeepLabv3 "Multi-grid"); the
            first block's strided 3x3 conv runs at (previous or stage) dilation x ``multi_grid[0]``.
        width: channel multiplier for CPU-scale variants (64 -> round(64 * width)).
        num_classes: size of the ``fc`` classification head (0 = no head).
        first_block_dilation: ``"previous"`` (torchvision, DeepLabv3) or ``"stage"`` (semseg PSPNet),
            see the module docstring.
        deep_stem: semseg's three-3x3-conv stem instead of the 7x7 one (module docstring).

    ``forward_features(x)``: (N, 3, H, W) -> (N, C_out, H/os, W/os); ``stage_features(x)``: the
    outputs of ``layer1`` .. ``layer4``; ``forward(x)``: -> logits (N, num_classes).

    Raises:
        ValueError: unknown depth or output stride, non-positive width, wrong multi_grid length,
            unknown ``first_block_dilation``.
    """

    def __init__(self, depth: int = 18, output_stride: int = 16, multi_grid: Sequence[int] = (1, 1, 1),
                 width: float = 1.0, num_classes: int = 1000, in_channels: int = 3,
                 first_block_dilation: str = "previous", deep_stem: bool = False):
        super().__init__()
        if first_block_dilation not in ("previous", "stage"):
            raise ValueError(f"first_block_dilation={first_block_dilation!r} must be 'previous' or 'stage'")
        self.first_block_dilation, self.deep_stem = first_block_dilation, bool(deep_stem)
        if depth not in RESNET_LAYERS:
            raise ValueError(f"model.depth={depth!r} is not one of {sorted(RESNET_LAYERS)}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"model.output_stride={output_stride!r} must be 8, 16 or 32")
        if not width > 0:
            raise ValueError(f"model.width={width!r} must be > 0")
        kind, layers = RESNET_LAYERS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        if len(multi_grid) != layers[3]:
            raise ValueError(f"model.multi_grid={list(multi_grid)} needs {layers[3]} entries for ResNet-{depth}")
        self.depth, self.output_stride, self.width = depth, output_stride, width
        dilate = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}[output_stride]
        planes = [max(4, int(round(c * width))) for c in (64, 128, 256, 512)]
        self.inplanes, self.dilation = planes[0], 1
        if deep_stem:
            self.conv1 = _conv3x3(in_channels, planes[0], 2)
            self.bn1 = nn.BatchNorm2d(planes[0])
            self.conv2 = _conv3x3(planes[0], planes[0])
            self.bn2 = nn.BatchNorm2d(planes[0])
            self.conv3 = _conv3x3(planes[0], 2 * planes[0])
            self.bn3 = nn.BatchNorm2d(2 * planes[0])
            self.inplanes = 2 * planes[0]
        else:
            self.conv1 = nn.Conv2d(in_channels, planes[0], 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, planes[0], layers[0])
        self.layer2 = self._make_layer(block, planes[1], layers[1], 2, dilate[0])
        self.layer3 = self._make_layer(block, planes[2], layers[2], 2, dilate[1])
        self.layer4 = self._make_layer(block, planes[3], layers[3], 2, dilate[2], tuple(multi_grid))
        self.out_channels = planes[3] * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.out_channels, num_classes) if num_classes else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False,
                    multi_grid: tuple[int, ...] | None = None) -> nn.Sequential:
        prev_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        grid = multi_grid or (1,) * blocks
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        # the first block's strided 3x3 conv: previous stage's dilation (torchvision) or this stage's (semseg)
        prev_dilation = (self.dilation if self.first_block_dilation == "stage" else prev_dilation) * grid[0]
        mods = [block(self.inplanes, planes, stride, downsample, self.dilation * grid[0], prev_dilation)]
        self.inplanes = planes * block.expansion
        for i in range(1, blocks):
            d = self.dilation * grid[i]
            mods.append(block(self.inplanes, planes, dilation=d, prev_dilation=d))
        return nn.Sequential(*mods)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if self.deep_stem:
            x = self.relu(self.bn3(self.conv3(self.relu(self.bn2(self.conv2(x))))))
        return self.maxpool(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> layer4 features (N, out_channels, H/os, W/os)."""
        return self.layer4(self.layer3(self.layer2(self.layer1(self._stem(x)))))

    def stage_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, H, W) -> [layer1, layer2, layer3, layer4] outputs, e.g. for ResNet-50 at output
        stride 8: (N, 256, H/4, W/4), (N, 512, H/8, W/8), (N, 1024, H/8, W/8), (N, 2048, H/8, W/8)."""
        feats = [self._stem(x)]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            feats.append(layer(feats[-1]))
        return feats[1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> classification logits (N, num_classes)."""
        if self.fc is None:
            raise RuntimeError("this ResNet was built with num_classes=0 and has no classification head")
        return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))


def resnet(depth: int = 18, **kwargs) -> ResNet:
    """Build a :class:`ResNet` of the given depth (see the class for the keyword arguments)."""
    return ResNet(depth=depth, **kwargs)
