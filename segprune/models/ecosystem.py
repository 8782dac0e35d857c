"""Segmentation models from the ecosystem: torchvision's segmentation builders and
segmentation_models_pytorch (smp), wrapped so that segprune can prune them.

Config (``segprune run``)::

    model: {name: torchvision.lraspp_mobilenet_v3_large}          # any torchvision.models.segmentation builder
    model: {name: torchvision.deeplabv3_resnet50, aux_loss: true}  # + the FCN auxiliary head for training
    model: {name: smp.FPN, encoder_name: efficientnet-b0}         # any smp architecture + encoder

API (a network you built yourself)::

    from segprune.models.ecosystem import adapt
    a = adapt(torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                        num_classes=5))
    res = segprune.api.prune_model(**a, method="fpgm", keep_ratio=0.5, input_size=(512, 512))
    res.model.library_model()     # the torchvision module again (pruned), forward -> {"out": ...}

:class:`EcosystemSegModel` re-arranges the library's modules (it shares them, nothing is copied):

* ``backbone`` (:class:`ClsBackbone`): ``backbone.body`` is torchvision's backbone
  (``IntermediateLayerGetter``, returns a dict of features) or smp's ``encoder`` (returns a list);
  ``backbone.fc`` an optional classification head on the globally pooled deepest feature (MTP's
  classification task, like the zoo's ``backbone.fc``): torchvision ResNet -> ``Linear(C, K_cls)``
  (ImageNet ``fc``), torchvision MobileNetV3 -> its ImageNet ``classifier`` (Linear-Hardswish-
  Dropout-Linear), smp encoders (ResNet, EfficientNet, timm ``tu-*``, ...) -> ``Linear(C, K_cls)``.
  ``backbone(x)`` gives class logits (N, K_cls), as a zoo ResNet does.
* torchvision: ``classifier`` (and ``aux_classifier`` if built with ``aux_loss``); smp: ``decoder``
  and ``segmentation_head``.
* ``forward(x)``: images (N, C, H, W) -> logits (N, K, H, W) (a tensor, not torchvision's dict;
  the auxiliary head is not run); ``forward_aux(x)`` -> ``(main, [aux])`` when there is an
  auxiliary head (trained with weight 0.5, as torchvision's reference scripts do);
  ``forward_cls(x) = backbone(x)``.
* ``parts``: ``backbone.`` (encoder) and ``classifier.`` / ``decoder.`` + ``segmentation_head.``;
  ``never_prune``: the final classifier conv(s) (torchvision DeepLabV3/FCN ``classifier.4``,
  LRASPP ``classifier.low_classifier`` / ``high_classifier``, smp ``segmentation_head.0``), the
  auxiliary head's convs and ``backbone.fc``.

Pretrained weights come only from a local file (``model.pretrained``, :func:`load_ecosystem_pretrained`);
every model is built with ``weights=None, weights_backbone=None`` / ``encoder_weights=None``, so
nothing is downloaded. torchvision, smp and timm are imported only inside these functions.

Networks without BatchNorm (smp ``Segformer``'s MiT encoder uses LayerNorm) build and run, but
have no prunable unit in that part; ``segprune.pruning.groups.parts_without_units`` says so.
"""
from __future__ import annotations

import importlib.util
import inspect
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # imported lazily at run time (load_ecosystem_pretrained)
    from .pretrained import PretrainedReport

__all__ = ["TORCHVISION_PREFIX", "SMP_PREFIX", "ECOSYSTEM_DEFAULTS", "is_ecosystem_name", "name_problems",
           "config_problems", "build_ecosystem_model", "adapt", "EcosystemSegModel", "ClsBackbone",
           "load_ecosystem_pretrained"]

TORCHVISION_PREFIX = "torchvision."
SMP_PREFIX = "smp."

#: ``model:`` keys used only by ecosystem models, with their defaults (left out of the stage
#: fingerprints at these values, so the fingerprints of existing configs do not change)
ECOSYSTEM_DEFAULTS: dict[str, Any] = {"encoder_name": None, "aux_loss": False}

#: pip package names of the optional libraries
_PACKAGES = {"torchvision": "torchvision", "segmentation_models_pytorch": "segmentation-models-pytorch"}

#: auxiliary-loss weight of torchvision's reference training scripts (``loss = out + 0.5 * aux``)
TV_AUX_WEIGHT = 0.5


def is_ecosystem_name(name) -> bool:
    """True for ``torchvision.<builder>`` / ``smp.<Arch>`` model names (not checked further)."""
    return isinstance(name, str) and name.startswith((TORCHVISION_PREFIX, SMP_PREFIX))


def _require(module: str, name: str):
    """Import optional package ``module`` or raise an ImportError naming it and ``model.name``."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"model.name={name!r} needs the optional package {_PACKAGES[module]} "
                          f"(pip install {_PACKAGES[module]}), which is not installed")
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - e.g. a torchvision built for another torch
        raise ImportError(f"model.name={name!r} needs the optional package {_PACKAGES[module]}, which is installed "
                          f"but cannot be imported ({type(exc).__name__}: {exc}); install a version matching "
                          f"torch {torch.__version__}") from None


def _tv_builders() -> list[str]:
    import torchvision
    return list(torchvision.models.list_models(module=torchvision.models.segmentation))


def _smp_arch(smp, arch: str):
    mapping = getattr(smp, "MODEL_ARCHITECTURES_MAPPING", {})
    cls = mapping.get(arch.lower())
    if cls is None:
        from segmentation_models_pytorch.base import SegmentationModel
        obj = getattr(smp, arch, None)
        cls = obj if inspect.isclass(obj) and issubclass(obj, SegmentationModel) else None
    return cls


def _smp_archs(smp) -> list[str]:
    mapping = getattr(smp, "MODEL_ARCHITECTURES_MAPPING", {})
    return sorted(c.__name__ for c in mapping.values())


def name_problems(name: str) -> list[str]:
    """Problems of an ecosystem ``model.name`` (empty list: it can be built). Imports the package.

    Covers: missing optional package (named), unknown torchvision builder / smp architecture
    (the known ones are listed).
    """
    try:
        if name.startswith(TORCHVISION_PREFIX):
            _require("torchvision", name)
            builder = name[len(TORCHVISION_PREFIX):]
            known = _tv_builders()
            if builder not in known:
                return [f"model.name={name!r}: torchvision has no segmentation builder {builder!r}; known: "
                        + ", ".join(f"torchvision.{b}" for b in known)]
        elif name.startswith(SMP_PREFIX):
            smp = _require("segmentation_models_pytorch", name)
            if _smp_arch(smp, name[len(SMP_PREFIX):]) is None:
                return [f"model.name={name!r}: segmentation_models_pytorch has no architecture "
                        f"{name[len(SMP_PREFIX):]!r}; known: " + ", ".join(f"smp.{a}" for a in _smp_archs(smp))]
        else:
            return [f"model.name={name!r}: not a torchvision.* or smp.* name"]
    except ImportError as exc:
        return [str(exc)]
    return []


def config_problems(m: dict) -> list[str]:
    """Problems of the ``model:`` section ``m`` concerning the ecosystem keys (``encoder_name``,
    ``aux_loss``) and the zoo-only keys, one string per key. Does not import any package."""
    name = m.get("name")
    bad = []
    enc, aux = m.get("encoder_name"), m.get("aux_loss", False)
    eco = is_ecosystem_name(name)
    smp = eco and name.startswith(SMP_PREFIX)
    if smp and not (isinstance(enc, str) and enc):
        bad.append(f"model.encoder_name={enc!r}: {name} needs an encoder name, e.g. resnet34 or efficientnet-b0 "
                   "(segmentation_models_pytorch.encoders.get_encoder_names())")
    elif not smp and enc is not None:
        bad.append(f"model.encoder_name={enc!r}: used only by smp.* models; remove it")
    if not isinstance(aux, bool):
        bad.append(f"model.aux_loss={aux!r}: must be true or false")
    elif aux and not (eco and name.startswith(TORCHVISION_PREFIX)):
        bad.append("model.aux_loss=True: used only by torchvision.* models (their FCN auxiliary head); remove it")
    if eco:
        from . import MODEL_DEFAULTS
        for key in ("width", "output_stride", "multi_grid", "aspp_channels", "aspp_rates"):
            if key in m and m[key] != MODEL_DEFAULTS[key]:
                bad.append(f"model.{key}={m[key]!r}: not used by {name} (a zoo key; the library builds its own "
                           f"architecture); remove it")
    return bad


# ---- the wrapper ----------------------------------------------------------------------------------
def _deepest(features) -> torch.Tensor:
    """The deepest feature map of a backbone's output: a tensor, the last value of a dict, or the
    last element of a list/tuple."""
    if isinstance(features, dict):
        features = list(features.values())
    if isinstance(features, (list, tuple)):
        features = features[-1]
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"the backbone returned {type(features).__name__}, not features (N, C, h, w)")
    return features


class ClsBackbone(nn.Module):
    """A library backbone/encoder ``body`` plus an optional classification head ``fc``.

    ``forward(x)``: (N, C, H, W) -> class logits (N, K_cls): ``fc`` on the global average pool of
    the deepest feature. ``forward_features(x)``: what ``body`` returns (dict or list of feature maps).

    Raises:
        RuntimeError: ``forward`` without a head (built without ``cls_classes``).
    """

    def __init__(self, body: nn.Module, fc: nn.Module | None = None):
        super().__init__()
        self.body = body
        self.fc = fc

    def forward_features(self, x: torch.Tensor):
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc is None:
            raise RuntimeError("this backbone has no classification head (build it with cls_classes)")
        feat = _deepest(self.body(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(feat, 1), 1))


class EcosystemSegModel(nn.Module):
    """A torchvision or smp segmentation network with segprune's model interface (module docstring).

    Build it with :func:`adapt` (an existing instance) or :func:`build_ecosystem_model` (by name).

    Attributes:
        family: ``"torchvision"`` or ``"smp"``.
        kind: the library class name (``DeepLabV3``, ``FCN``, ``LRASPP``, ``Unet``, ``FPN``, ...).
        parts, never_prune: see the module docstring.
        aux_weights, aux_modules: only with an auxiliary head (``segprune.models.common``).
    """

    def __init__(self, net: nn.Module, cls_classes: int | None = None, in_channels: int = 3):
        super().__init__()
        module = type(net).__module__
        self.__dict__["_lib"] = net  # not registered: its modules are registered below, once
        self.kind = type(net).__name__
        self.input_channels = int(in_channels)
        tv_ok = module.startswith("torchvision") and all(hasattr(net, a) for a in ("backbone", "classifier"))
        smp_ok = module.startswith("segmentation_models_pytorch") and all(
            hasattr(net, a) for a in ("encoder", "decoder", "segmentation_head"))
        if tv_ok:
            self.family = "torchvision"
            body = net.backbone
            self.classifier = net.classifier
            aux = getattr(net, "aux_classifier", None)
            if aux is not None:
                self.aux_classifier = aux
            self.parts = {"backbone": "backbone.", "decoder": "classifier."}
            if self.kind == "LRASPP":
                never = ["classifier.low_classifier", "classifier.high_classifier"]
            else:
                never = [f"classifier.{_last_conv(self.classifier)}"]
            if aux is not None:
                never += [f"aux_classifier.{i}" for i, m in enumerate(aux) if isinstance(m, nn.Conv2d)]
                self.aux_weights = (TV_AUX_WEIGHT,)
                self.aux_modules = ("aux_classifier",)
        elif smp_ok:
            self.family = "smp"
            body = net.encoder
            self.decoder = net.decoder
            self.segmentation_head = net.segmentation_head
            if getattr(net, "classification_head", None) is not None:
                self.smp_classification_head = net.classification_head
            self.parts = {"backbone": "backbone.", "decoder": ["decoder.", "segmentation_head."]}
            never = [f"segmentation_head.{_last_conv(self.segmentation_head)}"]
        else:
            raise TypeError(f"{type(net).__name__} ({module}) is neither a torchvision segmentation model (with "
                            f".backbone and .classifier) nor a segmentation_models_pytorch model (with .encoder, "
                            f".decoder and .segmentation_head)")
        fc = None
        if cls_classes is not None:
            fc = self._cls_head(body, int(cls_classes), in_channels)
            never.append("backbone.fc")
        self.backbone = ClsBackbone(body, fc)
        self.never_prune = tuple(never)

    # -- construction helpers --
    def _cls_head(self, body: nn.Module, k: int, in_channels: int) -> nn.Module:
        """ImageNet-style head on the deepest feature: MobileNetV3's classifier for torchvision
        MobileNetV3 backbones (so ``classifier.*`` of an ImageNet checkpoint fits), else Linear."""
        if self.family == "smp" and getattr(body, "out_channels", None):
            c = int(list(body.out_channels)[-1])
        else:
            was = body.training
            body.eval()
            with torch.no_grad():
                c = int(_deepest(body(torch.zeros(1, in_channels, 64, 64))).shape[1])
            body.train(was)
        mobilenet = self.family == "torchvision" and not hasattr(body, "layer4")
        if mobilenet:  # torchvision.models.mobilenet_v3_large's classifier (last_channel 1280)
            return nn.Sequential(nn.Linear(c, 1280), nn.Hardswish(inplace=True), nn.Dropout(p=0.2, inplace=True),
                                 nn.Linear(1280, k))
        return nn.Linear(c, k)

    def library_model(self) -> nn.Module:
        """The torchvision / smp module this wraps (sharing every layer, so pruned with it)."""
        return self.__dict__["_lib"]

    # -- forwards --
    def _tv(self, x: torch.Tensor, aux: bool):
        feats = self.backbone.forward_features(x)
        size = x.shape[-2:]
        if self.kind == "LRASPP":
            out = self.classifier(feats)
        elif "out" in feats:
            out = self.classifier(feats["out"])
        else:  # another torchvision model: its own forward, dict output
            res = self.library_model()(x)
            return res["out"], ([res["aux"]] if aux and "aux" in res else [])
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        auxs = []
        if aux and hasattr(self, "aux_classifier"):
            a = self.aux_classifier(feats["aux"])
            auxs.append(F.interpolate(a, size=size, mode="bilinear", align_corners=False))
        return out, auxs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> logits (N, K, H, W). smp checks that H and W are multiples of its encoder's
        output stride (ValueError/RuntimeError from smp otherwise)."""
        if self.family == "torchvision":
            return self._tv(x, aux=False)[0]
        out = self.library_model()(x)
        return out[0] if isinstance(out, (tuple, list)) else out

    def forward_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(N, C, H, W) -> (main logits, [auxiliary logits]), each (N, K, H, W); the list is empty
        without an auxiliary head (the loss then is plain cross-entropy: no ``aux_weights``)."""
        if self.family == "torchvision":
            return self._tv(x, aux=True)
        return self.forward(x), []

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> class logits (N, K_cls) through ``backbone`` and ``backbone.fc``."""
        return self.backbone(x)


def _last_conv(seq: nn.Module) -> str:
    """Name (inside ``seq``) of the last Conv2d of ``seq``."""
    names = [n for n, m in seq.named_modules() if isinstance(m, nn.Conv2d)]
    if not names:
        raise ValueError(f"{type(seq).__name__} has no Conv2d classifier")
    return names[-1]


def adapt(model: nn.Module, cls_classes: int | None = None, in_channels: int = 3) -> dict:
    """Wrap a torchvision (``torchvision.models.segmentation``) or smp model for ``segprune.api``.

    Args:
        model: e.g. ``lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5)``
            or ``smp.Unet("resnet34", encoder_weights=None, classes=5)``. Its layers are shared
            with the wrapper (not copied).
        cls_classes: if given, a classification head ``backbone.fc`` with that many classes is
            added (MTP's classification task; e.g. 1000 for ImageNet); else none.
        in_channels: image channels C.

    Returns:
        ``{"model": EcosystemSegModel, "parts": ..., "never_prune": [...]}``: keyword arguments
        of ``segprune.api.prune_model`` (``prune_model(**adapt(net), method="fpgm", keep_ratio=0.5,
        input_size=(H, W))``). With a head, MTP finds it as ``backbone.fc`` (no ``cls_head`` needed).
        ``load_pruned(adapt(fresh_net, cls_classes)["model"], folder)`` restores a saved pruning.

    Raises:
        TypeError: not a torchvision segmentation or smp model.
    """
    wrapped = EcosystemSegModel(model, cls_classes, in_channels)
    return {"model": wrapped, "parts": dict(wrapped.parts), "never_prune": list(wrapped.never_prune)}


def build_ecosystem_model(name: str, num_classes: int, cfg: dict | None = None, cls_classes: int | None = None,
                          load_pretrained_weights: bool = True) -> EcosystemSegModel:
    """Build ``torchvision.<builder>`` or ``smp.<Arch>`` by name (the CLI's model registry).

    Args:
        name: e.g. ``torchvision.lraspp_mobilenet_v3_large``, ``smp.FPN``.
        num_classes: segmentation classes K.
        cfg: the rest of the ``model:`` section: ``encoder_name`` (smp, required), ``aux_loss``
            (torchvision DeepLabV3/FCN), ``pretrained`` (a local file, :func:`load_ecosystem_pretrained`).
        cls_classes: classes of the classification head ``backbone.fc`` (None: no head).
        load_pretrained_weights: False skips ``cfg["pretrained"]``.

    Raises:
        ImportError: the optional package is not installed (named in the message).
        ValueError: unknown builder / architecture / encoder, or a key the model does not use
            (:func:`config_problems`); a ``pretrained`` file that does not fit.
        FileNotFoundError: ``pretrained`` names a missing file.
    """
    cfg = dict(cfg or {})
    bad = config_problems({"name": name, **cfg}) + name_problems(name)
    if bad:
        if any("needs the optional package" in b for b in bad):
            raise ImportError("; ".join(bad))
        raise ValueError("; ".join(bad))
    in_ch = int(cfg.get("in_channels", 3))
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision
        builder = name[len(TORCHVISION_PREFIX):]
        fn = torchvision.models.get_model_builder(builder)
        kw: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": int(num_classes)}
        if "aux_loss" in inspect.signature(fn).parameters:
            kw["aux_loss"] = bool(cfg.get("aux_loss", False))
        elif cfg.get("aux_loss"):
            raise ValueError(f"model.aux_loss=True: {name} has no auxiliary head")
        net = fn(**kw)
    else:
        import segmentation_models_pytorch as smp
        arch = _smp_arch(smp, name[len(SMP_PREFIX):])
        enc = cfg["encoder_name"]
        try:
            net = arch(encoder_name=enc, encoder_weights=None, in_channels=in_ch, classes=int(num_classes))
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ValueError(f"model.encoder_name={enc!r}: {name} cannot be built with it: "
                             f"{type(exc).__name__}: {exc}") from None
    model = EcosystemSegModel(net, cls_classes, in_ch)
    pretrained = cfg.get("pretrained")
    if pretrained and load_pretrained_weights:
        report = load_ecosystem_pretrained(model, pretrained)
        if report["skipped"]:
            import warnings
            warnings.warn(report.summary(), stacklevel=2)
    return model


# ---- local pretrained weights ---------------------------------------------------------------------
_HEAD_KEYS = ("fc.", "classifier.", "_fc.", "head.fc.", "head.")


def _layouts(model: EcosystemSegModel, sd: dict) -> dict[str, dict[str, str]]:
    """Layout name -> {file key: model key} for each way the file could be read."""
    target = model.state_dict()
    lib_prefix = {"torchvision": {"backbone.": "backbone.body."},
                  "smp": {"encoder.": "backbone.body."}}[model.family]

    def lib(k: str) -> str:
        for a, b in lib_prefix.items():
            if k.startswith(a):
                return b + k[len(a):]
        return k

    def backbone(k: str) -> str:
        if model.family == "torchvision" and k.startswith("features."):  # MobileNetV3: features.N -> body.N
            return "backbone.body." + k[len("features."):]
        for h in _HEAD_KEYS:
            if k.startswith(h) and not ("backbone.body." + k) in target:
                return "backbone.fc." + k[len(h):]
        return "backbone.body." + k

    return {"segprune": {k: k for k in sd}, "model": {k: lib(k) for k in sd}, "backbone": {k: backbone(k) for k in sd}}


def load_ecosystem_pretrained(model: EcosystemSegModel, path) -> "PretrainedReport":
    """Load a local checkpoint into an :class:`EcosystemSegModel` (in place). Three layouts, the one
    whose keys match the model best is used:

    * ``segprune``: a state dict of the wrapper itself (``backbone.body.*``, ...);
    * ``model``: a state dict of the library model (torchvision ``backbone.*``/``classifier.*``/
      ``aux_classifier.*``, e.g. the COCO DeepLabV3 weights; smp ``encoder.*``/``decoder.*``/
      ``segmentation_head.*``);
    * ``backbone``: an ImageNet classification checkpoint of the backbone (torchvision ResNet
      ``conv1.*``..``fc.*``, MobileNetV3 ``features.*``/``classifier.*``, the encoder's own keys for
      smp, e.g. ``_conv_stem.*``/``_fc.*`` of EfficientNet): loaded into ``backbone.body`` and its
      head into ``backbone.fc``; the decoder keeps its initialisation.

    Output layers (``never_prune``, ``backbone.fc``) whose shape differs only in the class count are
    skipped and reported; the auxiliary head's keys are ignored when the model has none, the
    classification head's when it has no ``backbone.fc``.

    Returns:
        ``segprune.models.pretrained.PretrainedReport`` (layout, loaded, skipped, ignored).
    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file, or one that does not fit (missing keys, shapes; the message
            names the file and the first offending keys).
    """
    from .pretrained import PretrainedReport, _class_count_only, read_state_dict
    sd = read_state_dict(path)
    path = str(path)
    target = model.state_dict()
    layouts = _layouts(model, sd)
    layout = max(layouts, key=lambda n: sum(1 for k in layouts[n].values() if k in target))
    mapping = layouts[layout]
    outputs = tuple(n + "." for n in model.never_prune)
    has_fc = model.backbone.fc is not None
    ignored, skipped, mismatched, unexpected, load = [], {}, [], [], {}
    for k, v in sd.items():
        t = mapping[k]
        if t not in target:
            if (t.startswith("aux_classifier.") and not hasattr(model, "aux_classifier")) or \
                    (t.startswith("backbone.fc.") and not has_fc) or k.endswith("num_batches_tracked"):
                ignored.append(k)
            else:
                unexpected.append(k)
            continue
        if v.shape == target[t].shape:
            load[t] = v
        elif t.startswith(outputs) and _class_count_only(v.shape, target[t].shape):
            skipped[t] = f"{v.shape[0]} classes in the file, {target[t].shape[0]} in the model"
        else:
            mismatched.append((k, t))
    required = ("backbone.body.",) if layout == "backbone" else ("",)
    missing = [t for t in target if t.startswith(required) and t not in load and t not in skipped
               and not t.startswith("backbone.fc.") and not t.endswith("num_batches_tracked")]
    for t in target:
        if t.startswith("backbone.fc.") and t not in load and t not in skipped:
            skipped[t] = "not in the file (keeps its initialisation)"
    if missing or unexpected or mismatched:
        what = []
        if mismatched:
            what.append("shape mismatch: " + ", ".join(f"{k} file {tuple(sd[k].shape)} vs model {t} "
                                                       f"{tuple(target[t].shape)}" for k, t in mismatched[:5]))
        if missing:
            what.append(f"{len(missing)} keys missing from the file: " + ", ".join(missing[:5]))
        if unexpected:
            what.append(f"{len(unexpected)} keys the model does not have: " + ", ".join(unexpected[:5]))
        raise ValueError(f"model.pretrained={path!r} does not fit {model.family} {model.kind} (read as a {layout} "
                         f"checkpoint; another architecture or encoder?): " + "; ".join(what))
    model.load_state_dict(load, strict=False)
    return PretrainedReport(path=path, layout=layout, loaded=len(load), skipped=skipped, ignored=ignored)
