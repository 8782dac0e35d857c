"""Model registry: ``build_model(cfg)`` turns the ``model:`` section of a config into a network.

Register a new architecture with :func:`register_model`; every segmentation model must expose
``forward(x) -> (N, K, H, W)`` logits, ``forward_cls(x) -> (N, K_cls)``, ``parts`` (module-name
prefixes of ``backbone`` and ``decoder``) and ``never_prune`` (layer names never pruned).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .deeplabv3 import DeepLabV3
from .resnet import ResNet

__all__ = ["register_model", "build_model", "list_models", "MODEL_DEFAULTS"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

#: Keys accepted in the ``model:`` config section, with their defaults.
MODEL_DEFAULTS: dict[str, Any] = {
    "name": "deeplabv3_resnet18",
    "width": 1.0,
    "output_stride": 16,
    "multi_grid": None,
    "aspp_channels": 256,
    "aspp_rates": None,
}


def register_model(name: str):
    """Decorator registering a builder ``fn(num_classes, cls_classes, **model_cfg) -> nn.Module``."""
    def deco(fn):
        _REGISTRY[name] = fn
        return fn
    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _deeplab(depth: int):
    def build(num_classes: int, cls_classes: int, width: float = 1.0, output_stride: int = 16,
              multi_grid=None, aspp_channels: int = 256, aspp_rates=None) -> DeepLabV3:
        blocks = {18: 2, 34: 3, 50: 3, 101: 3}[depth]
        grid = tuple(multi_grid) if multi_grid is not None else (1,) * blocks
        backbone = ResNet(depth, output_stride=output_stride, multi_grid=grid, width=width, num_classes=cls_classes)
        ch = max(8, int(round(aspp_channels * width))) if aspp_channels == 256 else int(aspp_channels)
        return DeepLabV3(backbone, num_classes, ch, aspp_rates)
    return build


for _d in (18, 34, 50, 101):
    register_model(f"deeplabv3_resnet{_d}")(_deeplab(_d))


def build_model(cfg: dict, num_classes: int, cls_classes: int) -> nn.Module:
    """Build the model named ``cfg["name"]``.

    Args:
        cfg: the ``model:`` section (keys of :data:`MODEL_DEFAULTS`).
        num_classes: segmentation classes K (output channels of the final classifier).
        cls_classes: classes of the classification head (``backbone.fc``).
    Raises:
        KeyError: unknown model name (the message lists the registered names).
    """
    cfg = {**MODEL_DEFAULTS, **cfg}
    name = cfg.pop("name")
    if name not in _REGISTRY:
        raise KeyError(f"model.name={name!r} is not registered; known: {', '.join(list_models())}")
    return _REGISTRY[name](num_classes=num_classes, cls_classes=cls_classes, **cfg)
