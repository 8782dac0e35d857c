"""Prunable channel units discovered with Torch-Pruning's dependency graph (DepGraph).

A *unit* is one group of coupled channels: the output channels of one convolution (and its
BatchNorm) together with every layer that consumes them. Removing channel ``i`` of a unit
removes it from all of these layers at once. A unit whose group contains more than one
convolution producing those channels is *residual-coupled* (e.g. every block output of a ResNet
stage, tied by the residual additions); by default only uncoupled units are pruned, which for a
post-activation ResNet are the convolutions inside each residual block (MTP paper, App. 6.1)
and for DeepLabv3 the ASPP branches, the ASPP projection and the head's 3x3 convolution.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

__all__ = ["PruneUnit", "build_graph", "discover_units", "unit_gammas", "in_part", "has_cls_forward"]


@dataclass
class PruneUnit:
    """One prunable group of channels.

    Attributes:
        name: module name of the root convolution (its output channels are the unit's channels).
        part: ``"backbone"`` or ``"decoder"`` (from the model's ``parts`` prefixes), else ``"other"``.
        convs: convolutions whose output channels belong to the unit (1 unless coupled).
        bns: BatchNorm layers normalising those channels; their γ are the scaling factors.
        channels: number of channels C of the unit.
        coupled: True for residual-coupled groups.
    """

    name: str
    part: str
    convs: list[str]
    bns: list[str]
    channels: int
    coupled: bool = False
    extra: dict = field(default_factory=dict)


def has_cls_forward(model: nn.Module) -> bool:
    """True if ``model`` has a classification forward to trace: ``forward_cls`` plus either a
    zoo-style head ``backbone.fc`` or a ``cls_head`` attribute (the name(s) of the head modules,
    set e.g. by ``segprune.api`` on a user's network)."""
    if not hasattr(model, "forward_cls"):
        return False
    return getattr(getattr(model, "backbone", None), "fc", None) is not None or bool(getattr(model, "cls_head", None))


def _forward_both(model: nn.Module, x: torch.Tensor):
    """Everything the tracer must see: the segmentation logits, the training-only auxiliary heads'
    logits (``forward_aux``, PSPNet/BiSeNet: a head left off the trace would keep its input channels
    when the features it reads are pruned) and the classification logits (``forward_cls``)."""
    if callable(getattr(model, "forward_aux", None)):
        main, aux = model.forward_aux(x)
        outs = [main, *aux]
    else:
        outs = [model(x)]
    if has_cls_forward(model):
        outs.append(model.forward_cls(x))
    return tuple(outs)


def build_graph(model: nn.Module, input_size: tuple[int, int] = (64, 64)) -> tp.DependencyGraph:
    """Trace ``model`` (segmentation and, if present, classification forward) into a DepGraph.

    The model is traced in eval mode on a zero image (1, C, H, W), C = ``model.input_channels``
    if the model has that attribute, else 3; its mode is restored. A model with auxiliary heads is
    traced through ``forward_aux`` (main and auxiliary logits). Tracing the classification
    forward too (:func:`has_cls_forward`) makes the head's input features part of the groups, so
    pruning the last backbone layer also shrinks the head.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # DepGraph traces through autograd
            p = next(model.parameters(), None)  # a model moved to a GPU is traced there
            x = torch.zeros(1, int(getattr(model, "input_channels", 3)), *input_size,
                            device=p.device if p is not None else None)
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=x, forward_fn=_forward_both, verbose=False)
    finally:
        model.train(was_training)
    return graph


def in_part(name: str, prefix) -> bool:
    """True if module/parameter ``name`` starts with ``prefix`` (a str, or a list/tuple of str: any of them)."""
    return name.startswith(tuple(prefix) if isinstance(prefix, (list, tuple)) else prefix)


def _part_of(name: str, parts: dict) -> str:
    for part, prefix in parts.items():
        if in_part(name, prefix):
            return part
    return "other"


def discover_units(model: nn.Module, graph: tp.DependencyGraph, include_coupled: bool = False) -> list[PruneUnit]:
    """List the prunable units of ``model`` in module order.

    ``model.parts`` maps a part name (``"backbone"``, ``"decoder"``, ...) to a module-name prefix
    (or a list of prefixes); a unit whose root convolution matches none is in part ``"other"``.
    Layers named in ``model.never_prune`` (and any group that would change their output
    channels) are skipped, as are groups with no BatchNorm (no scaling factor γ to rank by).
    """
    names = {m: n for n, m in model.named_modules()}
    never = set(getattr(model, "never_prune", ()))
    ignored = [m for n, m in model.named_modules() if n in never]
    parts = getattr(model, "parts", {})
    units: list[PruneUnit] = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d]):
        convs, bns = [], []
        for dep, _ in group:
            mod = dep.target.module
            if not graph.is_out_channel_pruning_fn(dep.handler):
                continue
            if isinstance(mod, nn.Conv2d):
                convs.append(names[mod])
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                bns.append(names[mod])
        if not convs or not bns or any(c in never for c in convs):
            continue
        coupled = len(convs) > 1
        if coupled and not include_coupled:
            continue
        root = convs[0]
        root_mod = dict(model.named_modules())[root]
        units.append(PruneUnit(root, _part_of(root, parts), convs, bns, root_mod.out_channels, coupled))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    units.sort(key=lambda u: order[u.name])
    return units


def unit_gammas(model: nn.Module, units: list[PruneUnit], source: dict[str, nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """Scaling-factor score per unit: mean over the unit's BatchNorms of |γ|, shape (C,).

    ``source`` optionally maps a BN name to the module to read γ from instead of ``model``
    (MTP reads backbone γ from the classification copy W1, Algorithm 1 line 9).
    """
    mods = dict(model.named_modules())
    out = {}
    for u in units:
        gam = [((source or {}).get(b) or mods[b]).weight.detach().abs().float() for b in u.bns]
        out[u.name] = torch.stack(gam).mean(0)
    return out
