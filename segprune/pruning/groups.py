"""Prunable channel units discovered with Torch-Pruning's dependency graph (DepGraph).

A *unit* is one group of coupled channels: the output channels of one convolution (and its
BatchNorm) together with every layer that consumes them. Removing channel ``i`` of a unit
removes it from all of these layers at once. Which groups are units:

* *plain*: one convolution produces the channels (followed by a BatchNorm).
* *depthwise chain* (inverted-residual blocks of MobileNetV2/V3, EfficientNet, MnasNet): the
  expansion convolution + BN, the depthwise convolution (``groups == in_channels ==
  out_channels``, whose output channels *are* its input channels) + BN and, optionally, a
  squeeze-excitation gate (a convolution whose output multiplies the channels). One unit; its
  root is the expansion convolution (the first non-depthwise producer in module order), the
  depthwise and gate convolutions are listed in ``extra["depthwise"]`` / ``extra["gates"]``.
* *merge* (a sum of parallel branches, smp FPN's ``MergeBlock``): several convolutions produce the
  channels, each feeds one tree of additions (or a ``torch.stack(...).sum(0)``) through layers that
  touch channel c only (normalisation, activation, upsampling) and that nothing else reads, and only
  the final sum is read further. Removing channel c from every branch removes it from the sum and
  nothing else: one prunable unit (``extra["kind"] == "merge"``, not coupled), its ``convs`` / ``bns``
  the branches' in module order, the first naming the unit.
* *residual-coupled*: several convolutions produce the channels and their outputs are joined by
  an addition (e.g. every block output of a ResNet stage, tied by the residual additions, or the
  residual stream of a MobileNet stage). By default only uncoupled units are pruned, which for a
  post-activation ResNet are the convolutions inside each residual block (MTP paper, App. 6.1)
  and for DeepLabv3 the ASPP branches, the ASPP projection and the head's 3x3 convolution;
  ``include_coupled`` (config ``prune.prune_coupled``) adds them.

How coupling is decided: a group is residual-coupled if it holds more than one producing
(non-depthwise) convolution and, when it holds a depthwise convolution, an element-wise
addition/subtraction of two traced tensors (DepGraph's ``_ElementWiseOp`` with ``Add``/``Sub``
grad_fn and two inputs). A group without any depthwise convolution keeps the rule the zoo was
built with (more than one producing convolution = coupled; this also covers gated fusions such
as BiSeNet's attention modules) unless it is a merge of parallel branches (above): a residual
stream is never one, since the summand on its skip path is also read by the residual branch, nor
is an FPN top-down pathway (each level is read by its own branch and by the next addition). The
zoo's units do not change (none of its groups is a merge).

Normalisation layers: a unit's scaling factors γ are the affine weights of its BatchNorms and of
its GroupNorms (smp's FPN decoder, ``Conv3x3GNReLU``). A GroupNorm with G groups normalises each
group of C/G consecutive channels together, so its channels are pruned *by position*: position j
of every group goes or stays together and every group keeps the same number of channels (what
Torch-Pruning does for GroupNorm); ``extra["channel_groups"]`` = G (the least common multiple if
several GroupNorms share the unit), applied by ``segprune.pruning.physical.prune_channels``. Unlike
BatchNorm, removing a GroupNorm channel changes the statistics of the others in its group: the
pruned network is not the zeroed one (fine-tuning recovers).

Groups whose channels reach a grouped convolution that is not depthwise (1 < groups, not
``groups == in_channels == out_channels``: ResNeXt, channel-multiplier depthwise) are skipped:
removing arbitrary channels there would break the group structure. Groups with no BatchNorm or
affine GroupNorm (no scaling factor γ; e.g. LayerNorm networks such as SegFormer/MiT) are skipped
too; :func:`skipped_groups` and :func:`parts_without_units` say which and why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

__all__ = ["PruneUnit", "build_graph", "discover_units", "skipped_groups", "parts_without_units", "unit_gammas",
           "in_part", "has_cls_forward", "is_depthwise"]


@dataclass
class PruneUnit:
    """One prunable group of channels.

    Attributes:
        name: module name of the root convolution (its output channels are the unit's channels).
        part: ``"backbone"`` or ``"decoder"`` (from the model's ``parts`` prefixes), else ``"other"``.
        convs: convolutions whose output channels belong to the unit, root first (1 for a plain
            unit; a depthwise chain adds its depthwise and gate convolutions; a coupled unit all the
            convolutions joined by the additions).
        bns: normalisation layers of those channels (BatchNorm, or GroupNorm with affine weights);
            their γ are the scaling factors (a depthwise chain has two BatchNorms: after the
            expansion and after the depthwise convolution).
        channels: number of channels C of the unit.
        coupled: True for residual-coupled groups.
        extra: ``{"kind": "plain" | "depthwise" | "merge" | "coupled", "depthwise": [conv names],
            "gates": [conv names]}`` (the last two only for depthwise chains), plus
            ``"channel_groups": G`` when a GroupNorm normalises the channels (module docstring).
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


def is_depthwise(conv: nn.Module) -> bool:
    """True for a depthwise convolution: ``groups == in_channels == out_channels > 1`` (its output
    channel c is computed from its input channel c alone, so the two are one channel)."""
    return (isinstance(conv, nn.Conv2d) and conv.groups > 1
            and conv.groups == conv.in_channels == conv.out_channels)


def _joined_by_add(group) -> bool:
    """True if the group holds an element-wise addition/subtraction of two traced tensors (or a
    stack summed over its first dimension, :func:`_is_join`)."""
    return any(_is_join(dep.target) for dep, _ in group)


def _op_name(node) -> str:
    """Lower-case name of the autograd function a DepGraph ``_ElementWiseOp`` node was traced from
    (``"addbackward0"``, ``"stackbackward0"``, ...); ``""`` for other nodes."""
    mod = node.module
    return str(getattr(mod, "_grad_fn", "")).lower() if isinstance(mod, tp.ops._ElementWiseOp) else ""


def _is_join(node) -> bool:
    """True for a node that sums tensors channel by channel: an addition/subtraction of two or more
    traced tensors, or a ``torch.stack`` whose single consumer reduces the stacked dimension
    (``torch.stack(xs).sum(0)`` / ``.mean(0)``: smp's ``MergeBlock("add")``)."""
    op = _op_name(node)
    if op.startswith(("add", "sub")):
        return len(node.inputs) >= 2
    if op.startswith("stack"):
        return len(node.outputs) == 1 and _op_name(node.outputs[0]).startswith(("sum", "mean"))
    return False


def _passes_through(node) -> bool:
    """True for a node that maps channel c to channel c alone and reads one tensor: a normalisation
    layer, or a one-input element-wise op (activation, interpolation, dropout, a scalar add/mul)."""
    if isinstance(node.module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
        return len(node.inputs) == 1
    op = _op_name(node)
    return bool(op) and len(node.inputs) == 1 and not op.startswith(("sum", "mean", "stack", "cat"))


def _is_branch_merge(graph: tp.DependencyGraph, group, producers: list[nn.Module]) -> bool:
    """True if the group's channels are a *sum of parallel branches*: every producing convolution
    feeds, through layers that touch channel c only (normalisation, activation, upsampling) and that
    nothing else reads, one tree of additions (or a stack summed over its first dimension), and only
    that tree's final sum is read by other layers. smp FPN's ``MergeBlock`` (the four segmentation
    branches summed) is one; a residual stream is not, because the summand on its skip path is also
    read by the residual branch (a node with two consumers), and neither is an FPN top-down pathway
    (each pyramid level is read by its segmentation branch as well as by the next addition).

    Removing channel c from every branch removes it from the sum and from nothing else, so such a
    group is one layer-width decision like a plain unit, not a stream tied through many blocks.
    """
    joins = [dep.target for dep, _ in group if _is_join(dep.target)]
    if not joins or len(producers) < 2:
        return False
    join_ids = {id(n) for n in joins}
    prod_ids = {id(graph.module2node[m]) for m in producers if m in graph.module2node}
    if len(prod_ids) != len(producers):
        return False
    reached: set[int] = set()
    for j in joins:
        for n in j.inputs:
            while True:  # back from the summand to its producer, through single-consumer channel-wise layers
                if len(n.outputs) != 1:
                    return False  # the summand is read elsewhere too: a skip connection
                if id(n) in prod_ids:
                    reached.add(id(n))
                    break
                if id(n) in join_ids:
                    break
                if not _passes_through(n):
                    return False
                n = n.inputs[0]
    if reached != prod_ids:
        return False

    def feeds_join(j) -> bool:
        n = j
        while len(n.outputs) == 1:
            n = n.outputs[0]
            if id(n) in join_ids:
                return True
            if not (_passes_through(n) or _op_name(n).startswith(("sum", "mean"))):
                return False
        return False

    return sum(not feeds_join(j) for j in joins) == 1  # one tree, one final sum


def _classify(model: nn.Module, graph: tp.DependencyGraph, group, names: dict, never: set, order: dict):
    """(PruneUnit or None, reason): what :func:`discover_units` makes of one DepGraph group.

    A layer is *aligned* with the group's root when channel c of the root is its channel c and it
    has exactly the root's C channels; a depthwise convolution reading a concatenation (smp
    DeepLabV3+'s separable convolutions) holds only a slice of its channels in the group and is
    not aligned: it is listed in ``extra["depthwise"]`` but not in ``convs``, whose filters the
    methods read (C rows each).
    """
    root_mod = group[0].dep.target.module
    c_root = root_mod.out_channels
    convs, aligned, bns, grouped, gn_groups = [], set(), [], [], []
    for item in group.items:
        dep = item.dep
        mod = dep.target.module
        if isinstance(mod, nn.Conv2d) and mod.groups > 1 and not is_depthwise(mod):
            grouped.append(names[mod])
        if not graph.is_out_channel_pruning_fn(dep.handler):
            continue
        width = mod.out_channels if isinstance(mod, nn.Conv2d) else getattr(mod, "num_features", None)
        if isinstance(mod, nn.GroupNorm):
            width = mod.num_channels
        if width == c_root and sorted(zip(item.root_idxs, item.idxs)) == [(i, i) for i in range(c_root)]:
            aligned.add(mod)
        if isinstance(mod, nn.Conv2d):
            convs.append(names[mod])
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            bns.append(names[mod])
        elif isinstance(mod, nn.GroupNorm):
            gn_groups.append(mod.num_groups)
            if mod.affine:
                bns.append(names[mod])
    if not convs:
        return None, "no convolution produces the channels"
    first = convs[0]
    if any(c in never for c in convs):
        return None, f"never_prune ({', '.join(c for c in convs if c in never)})"
    if grouped:
        return None, f"reaches a grouped (non-depthwise) convolution ({', '.join(dict.fromkeys(grouped))})"
    if not bns:
        return None, "no BatchNorm (no scaling factor γ; e.g. LayerNorm or no normalisation)"
    mods = dict(model.named_modules())
    ch_groups = math.lcm(*gn_groups) if gn_groups else 1
    if mods[first].out_channels % ch_groups:
        return None, f"{mods[first].out_channels} channels do not split into the GroupNorm's {ch_groups} groups"
    dw = [c for c in convs if is_depthwise(mods[c])]
    producers = [c for c in convs if c not in dw]
    extra: dict = {}
    if not dw:  # the zoo's rule: several producing convolutions = coupled, unless they are summed branches
        root = first
        merge = (len(convs) > 1 and all(mods[c] in aligned for c in convs)
                 and _is_branch_merge(graph, group, [mods[c] for c in convs]))
        coupled = len(convs) > 1 and not merge
        extra["kind"] = "merge" if merge else ("coupled" if coupled else "plain")
        if merge:  # the branches in module order, the first one names the unit (tracing order varies)
            convs = sorted(convs, key=lambda c: order[c])
            bns = sorted(bns, key=lambda b: order[b])
            root = convs[0]
    else:
        producers.sort(key=lambda c: order[c])
        root = next((c for c in producers if mods[c] in aligned), None)
        if root is None:
            return None, f"depthwise convolution(s) {', '.join(dw)} read channels no convolution produces"
        coupled = len(producers) > 1 and _joined_by_add(group)
        if coupled:
            extra["kind"] = "coupled"
        else:
            extra.update(kind="depthwise", depthwise=sorted(dw, key=lambda c: order[c]),
                         gates=[c for c in producers if c != root])
        convs = [root] + [c for c in convs if c != root and mods[c] in aligned]
        bns = [b for b in bns if mods[b] in aligned]
        if not bns:
            return None, "no BatchNorm on these channels alone (only on a concatenation holding them)"
    if ch_groups > 1:
        extra["channel_groups"] = ch_groups
    unit = PruneUnit(root, "", convs, bns, mods[root].out_channels, coupled, extra)
    if not coupled:
        return unit, ""
    if _joined_by_add(group):
        return unit, "residual-coupled (outputs joined by an addition; prune.prune_coupled / include_coupled)"
    return unit, ("coupled (several convolutions produce these channels, joined without an addition, e.g. an "
                  "attention gate; prune.prune_coupled / include_coupled)")


def _all_groups(graph: tp.DependencyGraph, ignored: list):
    """Torch-Pruning's ``get_all_groups(root_module_types=[nn.Conv2d])``, except that a depthwise
    convolution is never a root: its channels are those of the convolution(s) feeding it, so a
    depthwise convolution reading a concatenation of two producers would otherwise merge their
    two separate groups into one."""
    ignored = list(ignored) + list(graph.IGNORED_LAYERS_IN_TRACING)
    ignored_ids = {id(m) for m in ignored}
    visited: set[int] = set()
    for m in list(graph.module2node.keys()):
        if id(m) in ignored_ids or not isinstance(m, nn.Conv2d) or is_depthwise(m) or id(m) in visited:
            continue
        pruner = graph.get_pruner_of_module(m)
        if pruner is None or pruner.get_out_channels(m) is None:
            continue
        group = graph.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
        prunable = True
        for dep, _ in group:
            if graph.is_out_channel_pruning_fn(dep.handler):
                visited.add(id(dep.target.module))
                if id(dep.target.module) in ignored_ids:
                    prunable = False
        if prunable:
            yield group


def _groups(model: nn.Module, graph: tp.DependencyGraph):
    names = {m: n for n, m in model.named_modules()}
    never = set(getattr(model, "never_prune", ()))
    ignored = [m for n, m in model.named_modules() if n in never]
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    for group in _all_groups(graph, ignored):
        root = names[group[0].dep.target.module]
        unit, reason = _classify(model, graph, group, names, never, order)
        yield root, unit, reason


def discover_units(model: nn.Module, graph: tp.DependencyGraph, include_coupled: bool = False) -> list[PruneUnit]:
    """List the prunable units of ``model`` in module order (of their root convolutions).

    ``model.parts`` maps a part name (``"backbone"``, ``"decoder"``, ...) to a module-name prefix
    (or a list of prefixes); a unit whose root convolution matches none is in part ``"other"``.
    Layers named in ``model.never_prune`` (and any group that would change their output
    channels) are skipped, as are groups with no BatchNorm (no scaling factor γ to rank by),
    groups reaching a grouped non-depthwise convolution and, unless ``include_coupled``,
    residual-coupled groups (module docstring; :func:`skipped_groups` lists them with reasons).
    """
    parts = getattr(model, "parts", {})
    units: list[PruneUnit] = []
    for _, unit, _reason in _groups(model, graph):
        if unit is None or (unit.coupled and not include_coupled):
            continue
        unit.part = _part_of(unit.name, parts)
        units.append(unit)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    units.sort(key=lambda u: order[u.name])
    return units


def skipped_groups(model: nn.Module, graph: tp.DependencyGraph, include_coupled: bool = False) -> list[dict]:
    """The DepGraph groups (rooted at a ``Conv2d``) that :func:`discover_units` does not make a unit.

    Returns:
        [{"name": root conv, "part": part name or "other", "reason": why}] in module order.
    """
    parts = getattr(model, "parts", {})
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    out = []
    for root, unit, reason in _groups(model, graph):
        if unit is not None and (include_coupled or not unit.coupled):
            continue
        name = unit.name if unit is not None else root
        out.append({"name": name, "part": _part_of(name, parts), "reason": reason})
    out.sort(key=lambda d: order.get(d["name"], -1))
    return out


def parts_without_units(model: nn.Module, graph: tp.DependencyGraph, units: list[PruneUnit],
                        include_coupled: bool = False) -> dict[str, str]:
    """Part name -> plain-text reason, for each part of ``model.parts`` with no prunable unit.

    The reason counts the part's skipped groups by cause (e.g. "no prunable unit: 52 conv groups
    skipped: 52 no BatchNorm (...)"), or says the part has no ``Conv2d`` at all (Linear/attention
    layers are not pruned). Empty when every part has a unit.
    """
    parts = getattr(model, "parts", {}) or {}
    have = {u.part for u in units}
    missing = [p for p in parts if p not in have]
    if not missing:
        return {}
    skipped = skipped_groups(model, graph, include_coupled)
    out = {}
    for part in missing:
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and in_part(n, parts[part])]
        if not convs:
            out[part] = ("no prunable unit: no Conv2d layer (segprune prunes the output channels of Conv2d "
                         "layers followed by a BatchNorm; Linear/attention layers are not pruned)")
            continue
        counts: dict[str, int] = {}
        for d in skipped:
            if d["part"] == part:
                key = d["reason"].split(" (")[0] if d["reason"].startswith(("never_prune", "reaches")) else d["reason"]
                counts[key] = counts.get(key, 0) + 1
        n = sum(counts.values())
        detail = "; ".join(f"{c} {r}" for r, c in sorted(counts.items(), key=lambda kv: -kv[1]))
        out[part] = (f"no prunable unit: {len(convs)} Conv2d layers, {n} channel groups rooted here, all skipped: "
                     f"{detail or 'their channels belong to groups rooted in other parts'}")
    return out


def unit_gammas(model: nn.Module, units: list[PruneUnit], source: dict[str, nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """Scaling-factor score per unit: mean over the unit's normalisation layers of |γ|, shape (C,)
    (Torch-Pruning's ``group_reduction="mean"``; a depthwise chain averages the BatchNorm after the
    expansion and the one after the depthwise convolution).

    ``source`` optionally maps a BN name to the module to read γ from instead of ``model``
    (MTP reads backbone γ from the classification copy W1, Algorithm 1 line 9).
    """
    mods = dict(model.named_modules())
    out = {}
    for u in units:
        gam = [((source or {}).get(b) or mods[b]).weight.detach().abs().float() for b in u.bns]
        out[u.name] = torch.stack(gam).mean(0)
    return out
