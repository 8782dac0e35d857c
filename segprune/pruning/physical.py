"""Physical channel removal with Torch-Pruning (DepGraph): the result is a smaller dense network.

``prune_channels`` removes, for every unit, the channels not in its keep set from the root
convolution, its BatchNorm and every coupled consumer (next convolution's input channels,
concatenations, residual adds). ``widths_spec`` records the result as plain JSON and
``apply_widths`` re-creates exactly that architecture from a freshly built model, so a pruned
model is rebuilt from ``arch.json`` + safetensors weights without unpickling anything.
"""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from .groups import PruneUnit, build_graph, discover_units

__all__ = ["prune_channels", "fit_channel_groups", "widths_spec", "apply_widths", "layer_widths"]


def fit_channel_groups(keep: torch.Tensor, channels: int, groups: int) -> torch.Tensor:
    """Make a kept set prunable under a GroupNorm with ``groups`` groups (C/G channels each).

    Position j of the groups (channels j, C/G + j, 2C/G + j, ...) is kept in every group or in none.
    The positions kept are the k = max(1, round(|keep| / G)) that ``keep`` holds in the most
    groups (ties: lower position), so the count stays as close to ``|keep|`` as a multiple of G
    allows. A kept set that already fits is returned unchanged.

    Args:
        keep: (k,) LongTensor of kept channel indices in 0..C-1.
    Returns:
        sorted LongTensor (G * k,) of channel indices.
    """
    per = channels // groups
    votes = torch.zeros(per, dtype=torch.long)
    votes.index_add_(0, keep.long() % per, torch.ones(keep.numel(), dtype=torch.long))
    k = max(1, int(round(keep.numel() / groups)))
    pos = torch.sort(torch.argsort(-votes, stable=True)[:k]).values
    out = (torch.arange(groups).unsqueeze(1) * per + pos.unsqueeze(0)).flatten()
    out = torch.sort(out).values
    return keep if torch.equal(out, torch.sort(keep.long()).values) else out


def prune_channels(model: nn.Module, units: list[PruneUnit], kept: dict[str, torch.Tensor],
                   graph: tp.DependencyGraph | None = None, input_size: tuple[int, int] = (64, 64)) -> nn.Module:
    """Remove, in place, every channel of each unit that is not listed in ``kept[unit.name]``.

    A unit normalised by a GroupNorm (``unit.extra["channel_groups"]`` = G) loses whole positions of
    its groups (:func:`fit_channel_groups`); its entry of ``kept`` is replaced, in place, by the
    indices actually kept, so a :func:`widths_spec` written afterwards records the real widths.

    Raises:
        ValueError: a unit would lose all its channels, or a kept index is out of range.
    """
    graph = graph or build_graph(model, input_size)
    mods = dict(model.named_modules())
    for u in units:
        keep = kept.get(u.name)
        if keep is None:
            continue
        keep_set = set(int(i) for i in keep.tolist())
        if not keep_set:
            raise ValueError(f"unit {u.name} would keep no channel; refusing to empty a layer")
        if max(keep_set) >= u.channels or min(keep_set) < 0:
            raise ValueError(f"unit {u.name}: kept index out of range 0..{u.channels - 1}")
        groups = int(u.extra.get("channel_groups", 1))
        if groups > 1:
            fitted = fit_channel_groups(torch.as_tensor(sorted(keep_set)), u.channels, groups)
            kept[u.name] = fitted
            keep_set = set(int(i) for i in fitted.tolist())
        drop = [i for i in range(mods[u.name].out_channels) if i not in keep_set]
        if not drop:
            continue
        group = graph.get_pruning_group(mods[u.name], tp.prune_conv_out_channels, idxs=drop)
        if not graph.check_pruning_group(group):
            raise ValueError(f"unit {u.name}: Torch-Pruning refused the group (would empty a layer)")
        group.prune()
    return model


def layer_widths(model: nn.Module) -> dict[str, list[int]]:
    """Conv layer name -> [in_channels, out_channels] (for reports and Figure-5-style plots)."""
    return {n: [m.in_channels, m.out_channels] for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def widths_spec(units: list[PruneUnit], kept: dict[str, torch.Tensor], include_coupled: bool) -> dict:
    """JSON-able description of a pruning: per unit, original and kept channel counts."""
    return {
        "include_coupled": bool(include_coupled),
        "units": {u.name: {"part": u.part, "channels": u.channels,
                           "kept": int(kept[u.name].numel()) if u.name in kept else u.channels}
                  for u in units},
    }


def apply_widths(model: nn.Module, spec: dict, input_size: tuple[int, int] = (64, 64), source: str = "arch.json") -> nn.Module:
    """Shrink a freshly built, unpruned ``model`` to the widths recorded in ``spec``.

    Each unit keeps its first ``kept`` channels; the weights are meant to be loaded afterwards.

    Raises:
        ValueError: the spec names a unit the model does not have, or channel counts disagree
            (the spec was written for another architecture); the message names ``source``.
    """
    graph = build_graph(model, input_size)
    units = {u.name: u for u in discover_units(model, graph, spec.get("include_coupled", False))}
    recorded = spec.get("units")
    if not isinstance(recorded, dict):
        raise ValueError(f"{source}: key 'units' missing or not a mapping")
    kept = {}
    for name, rec in recorded.items():
        if name not in units:
            raise ValueError(f"{source}: unit {name!r} does not exist in this model (another architecture?)")
        if int(rec.get("channels", -1)) != units[name].channels:
            raise ValueError(f"{source}: unit {name!r} has {units[name].channels} channels in this model "
                             f"but {rec.get('channels')} in the file (another architecture or width?)")
        k = int(rec.get("kept", -1))
        if not 1 <= k <= units[name].channels:
            raise ValueError(f"{source}: unit {name!r} kept={rec.get('kept')!r} outside 1..{units[name].channels}")
        kept[name] = torch.arange(k)
    return prune_channels(model, list(units.values()), kept, graph)
