"""Model registry: ``build_model(cfg)`` turns the ``model:`` section of a config into a network.

Besides the zoo, ``torchvision.<builder>`` (any ``torchvision.models.segmentation`` builder) and
``smp.<Arch>`` with ``encoder_name`` (segmentation_models_pytorch) are built by
:mod:`segprune.models.ecosystem` (optional packages, imported only for those names).

Register a new architecture with :func:`register_model`; every segmentation model must expose
``forward(x) -> (N, K, H, W)`` logits, ``forward_cls(x) -> (N, K_cls)``, ``parts`` (module-name
prefixes of ``backbone`` and ``decoder``) and ``never_prune`` (layer names never pruned). Models
with training-only auxiliary heads also expose ``forward_aux``, ``aux_weights`` and
``aux_modules`` (see :mod:`segprune.models.common`). The zoo is documented in docs/models.md.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .bisenet import BiSeNet, build_bisenet
from .deeplabv3 import DeepLabV3
from .pretrained import load_pretrained
from .pspnet import PSPNet, build_pspnet
from .resnet import ResNet

__all__ = ["register_model", "build_model", "list_models", "model_name_problems", "MODEL_DEFAULTS", "load_pretrained"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

#: Keys accepted in the ``model:`` config section, with their defaults.
MODEL_DEFAULTS: dict[str, Any] = {
    "name": "deeplabv3_resnet18",
    "width": 1.0,
    "output_stride": 16,
    "multi_grid": None,
    "aspp_channels": 256,
    "aspp_rates": None,
    # path of a torchvision-format ResNet or DeepLabv3 state dict (.pth/.pt or .safetensors), or null
    "pretrained": None,
    # ecosystem models only (segprune.models.ecosystem): smp encoder, torchvision auxiliary head
    "encoder_name": None,
    "aux_loss": False,
}


def register_model(name: str):
    """Decorator registering a builder ``fn(num_classes, cls_classes, **model_cfg) -> nn.Module``.

    ``model_cfg`` holds every key of :data:`MODEL_DEFAULTS` but ``name`` and ``pretrained``.
    """
    def deco(fn):
        _REGISTRY[name] = fn
        return fn
    return deco


def list_models() -> list[str]:
    """The zoo's registered names (``torchvision.*`` / ``smp.*`` names are dynamic, not listed)."""
    return sorted(_REGISTRY)


def model_name_problems(name) -> list[str]:
    """Why ``model.name`` cannot be built (empty list: it can): not registered, or an ecosystem name
    whose optional package is missing (named) or whose builder / architecture does not exist."""
    from .ecosystem import is_ecosystem_name, name_problems
    if is_ecosystem_name(name):
        return name_problems(name)
    if name in _REGISTRY:
        return []
    return [f"model.name={name!r}: must be a registered model ({', '.join(list_models())}), "
            f"torchvision.<segmentation builder> or smp.<Arch> (with model.encoder_name)"]


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


def _no_aspp(name: str, multi_grid, aspp_channels, aspp_rates) -> None:
    """Refuse DeepLab-only keys set to a non-default value for a model that has no ASPP."""
    bad = [f"{k}={v!r}" for k, v, default in (("multi_grid", multi_grid, None), ("aspp_channels", aspp_channels, 256),
                                              ("aspp_rates", aspp_rates, None)) if v != default]
    if bad:
        raise ValueError(f"model.{', model.'.join(bad)}: not used by {name} (DeepLabv3 keys); remove them")


@register_model("pspnet_resnet50")
def _pspnet_resnet50(num_classes: int, cls_classes: int, width: float = 1.0, output_stride: int = 16,
                     multi_grid=None, aspp_channels: int = 256, aspp_rates=None, deep_stem: bool = False) -> PSPNet:
    """PSPNet-R50 (``segprune.models.pspnet``). The paper's network has output stride 8: set
    ``model.output_stride: 8`` (the config default 16 gives a cheaper variant). ``deep_stem``
    (Python only, not a config key): semseg's 3-conv stem, the paper's exact parameter count."""
    _no_aspp("pspnet_resnet50", multi_grid, aspp_channels, aspp_rates)
    return build_pspnet(50, num_classes, cls_classes, width, output_stride, deep_stem)


@register_model("bisenet_resnet18")
def _bisenet_resnet18(num_classes: int, cls_classes: int, width: float = 1.0, output_stride: int = 16,
                      multi_grid=None, aspp_channels: int = 256, aspp_rates=None) -> BiSeNet:
    """BiSeNet-R18 (``segprune.models.bisenet``). Its strides are fixed by the architecture (spatial
    path 8, context path 32): ``model.output_stride`` must stay at its default (16)."""
    _no_aspp("bisenet_resnet18", multi_grid, aspp_channels, aspp_rates)
    if output_stride != 16:
        raise ValueError(f"model.output_stride={output_stride!r}: not used by bisenet_resnet18 (its strides are fixed: "
                         "spatial path 8, context path 32); leave it at the default 16")
    return build_bisenet(num_classes, cls_classes, width)


def build_model(cfg: dict, num_classes: int, cls_classes: int, load_pretrained_weights: bool = True) -> nn.Module:
    """Build the model named ``cfg["name"]``; load ``cfg["pretrained"]`` into it if set.

    Args:
        cfg: the ``model:`` section (keys of :data:`MODEL_DEFAULTS`).
        num_classes: segmentation classes K (output channels of the final classifier).
        cls_classes: classes of the classification head (``backbone.fc``).
        load_pretrained_weights: False skips ``cfg["pretrained"]`` (rebuilding a saved run, whose
            own weights are loaded afterwards).
    Raises:
        KeyError: unknown model name (the message lists the registered names).
        ValueError: a key the model does not use set to a non-default value; a ``pretrained`` file
            that does not fit (see :func:`segprune.models.pretrained.load_pretrained`,
            :func:`segprune.models.ecosystem.load_ecosystem_pretrained`).
        ImportError: a ``torchvision.*`` / ``smp.*`` name without its optional package (named).
        FileNotFoundError: ``pretrained`` names a missing file.
    """
    cfg = {**MODEL_DEFAULTS, **cfg}
    name = cfg.pop("name")
    from .ecosystem import ECOSYSTEM_DEFAULTS, build_ecosystem_model, config_problems, is_ecosystem_name
    if is_ecosystem_name(name):
        return build_ecosystem_model(name, num_classes, cfg, cls_classes, load_pretrained_weights)
    bad = config_problems({"name": name, **cfg})
    if bad:
        raise ValueError("; ".join(bad))
    for k in ECOSYSTEM_DEFAULTS:
        cfg.pop(k)
    pretrained = cfg.pop("pretrained")
    if name not in _REGISTRY:
        raise KeyError(f"model.name={name!r} is not registered; known: {', '.join(list_models())}, "
                       f"torchvision.<segmentation builder>, smp.<Arch>")
    model = _REGISTRY[name](num_classes=num_classes, cls_classes=cls_classes, **cfg)
    if pretrained and load_pretrained_weights:
        report = load_pretrained(model, pretrained)
        if report["skipped"]:
            import warnings
            warnings.warn(report.summary(), stacklevel=2)
    return model
