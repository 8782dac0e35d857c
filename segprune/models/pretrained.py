"""Load torchvision-format checkpoints from a local file (config key ``model.pretrained``).

Two layouts are recognised by their keys:

* **backbone** (torchvision ``resnet18/34/50/101`` state dict: ``conv1.weight``, ``layer1.0...``,
  ``fc.*``): loaded into ``model.backbone`` by name. ``fc`` is loaded when its shape matches the
  model's classification head (same class count), else skipped and reported.
* **whole model** (torchvision ``deeplabv3_resnet*`` state dict: ``backbone.*``, ``classifier.*``,
  optional ``aux_classifier.*``; or a state dict of a segprune model): loaded into the model by
  name. ``backbone.fc`` is optional (torchvision's segmentation backbones have none: the model's
  head keeps its initialisation). ``aux_classifier.*`` is ignored when the model has no such
  module (torchvision DeepLabv3's FCN auxiliary head), loaded otherwise.

Output layers (``model.never_prune``: the final classifier convs, ``backbone.fc``) whose shape
differs only in the class count (dim 0) are skipped and reported, so that e.g. a 21-class VOC
checkpoint initialises an 11-class CamVid model except for its last layer.

Files: ``.safetensors`` (read with ``safetensors.torch.load_file``) or anything else with
``torch.load(path, map_location="cpu", weights_only=True)``; a ``{"state_dict": ...}`` or
``{"model": ...}`` wrapper and a DataParallel ``module.`` prefix are unwrapped.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["read_state_dict", "load_pretrained", "PretrainedReport"]

_SHOW = 5  # mismatching keys named in an error message


class PretrainedReport(dict):
    """What :func:`load_pretrained` did: ``layout`` ("backbone" | "model"), ``loaded`` (number of
    tensors), ``skipped`` ({key: reason}), ``ignored`` (keys of the file not used on purpose)."""

    def summary(self) -> str:
        parts = [f"{self['path']}: {self['layout']} layout, {self['loaded']} tensors loaded"]
        if self["skipped"]:
            parts.append("skipped " + "; ".join(f"{k} ({r})" for k, r in self["skipped"].items()))
        if self["ignored"]:
            parts.append(f"ignored {len(self['ignored'])} keys ({self['ignored'][0]}, ...)")
        return ", ".join(parts)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, name -> tensor, on the CPU.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be read as a state dict (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained={str(path)!r}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader error becomes one message naming the file
        raise ValueError(f"model.pretrained={str(path)!r}: cannot read a state dict: {type(exc).__name__}: {exc}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"model.pretrained={str(path)!r}: not a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _class_count_only(a: torch.Size, b: torch.Size) -> bool:
    return len(a) == len(b) and len(a) >= 1 and tuple(a[1:]) == tuple(b[1:]) and a[0] != b[0]


def load_pretrained(model: nn.Module, path: str | Path) -> PretrainedReport:
    """Load the checkpoint at ``path`` into ``model`` (in place); see the module docstring.

    Returns:
        a :class:`PretrainedReport`.
    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file, or a file of another architecture: keys missing from the file,
            keys the model does not have, or shape mismatches; the message names the file and the
            first mismatching keys with both shapes.
    """
    sd = read_state_dict(path)
    path = str(path)
    whole = any(k.startswith(("backbone.", "classifier.")) for k in sd)
    target_mod = model if whole else getattr(model, "backbone", None)
    if target_mod is None:
        raise ValueError(f"model.pretrained={path!r}: a backbone checkpoint needs a model with a .backbone")
    prefix = "" if whole else "backbone."
    target = target_mod.state_dict()
    never = tuple(getattr(model, "never_prune", ()))
    output_layers = tuple(n[len(prefix):] + "." for n in never if n.startswith(prefix))
    optional = ("backbone.fc.",) if whole else ("fc.",)
    ignored = []
    if whole and not hasattr(model, "aux_classifier"):
        ignored = sorted(k for k in sd if k.startswith("aux_classifier."))
        sd = {k: v for k, v in sd.items() if not k.startswith("aux_classifier.")}

    skipped: dict[str, str] = {}
    missing = [k for k in target if k not in sd and not k.startswith(optional)]
    unexpected = [k for k in sd if k not in target and not k.startswith(optional)]
    ignored += sorted(k for k in sd if k not in target and k.startswith(optional))  # e.g. fc of a model without one
    mismatched = []
    load = {}
    for k, v in sd.items():
        if k not in target:
            continue
        if v.shape == target[k].shape:
            load[k] = v
        elif k.startswith(output_layers) and _class_count_only(v.shape, target[k].shape):
            skipped[k] = f"{v.shape[0]} classes in the file, {target[k].shape[0]} in the model"
        else:
            mismatched.append(k)
    for k in target:
        if k.startswith(optional) and k not in sd and k not in skipped:
            skipped[k] = "not in the file (keeps its initialisation)"
    if missing or unexpected or mismatched:
        what = []
        if mismatched:
            what.append("shape mismatch: " + ", ".join(
                f"{prefix}{k} file {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}" for k in mismatched[:_SHOW]))
        if missing:
            what.append(f"{len(missing)} keys missing from the file: " + ", ".join(
                f"{prefix}{k} {tuple(target[k].shape)}" for k in missing[:_SHOW]))
        if unexpected:
            what.append(f"{len(unexpected)} keys the model does not have: " + ", ".join(
                f"{k} {tuple(sd[k].shape)}" for k in unexpected[:_SHOW]))
        layout = "whole-model (backbone.*/classifier.*)" if whole else "backbone (torchvision ResNet)"
        raise ValueError(f"model.pretrained={path!r} does not fit this model ({type(model).__name__}, read as a "
                         f"{layout} checkpoint; another architecture?): " + "; ".join(what))
    # strict=False only because of the skipped output layers / optional fc checked above
    target_mod.load_state_dict(load, strict=False)
    return PretrainedReport(path=path, layout="model" if whole else "backbone", loaded=len(load),
                            skipped=skipped, ignored=ignored)
