"""FLOPs-target search: the keep ratio whose pruning meets a FLOPs budget, by bisection.

Used by the Algorithm-1 core (``segprune.algorithm.choose_widths`` / ``fix_training_widths``) for
``prune.target_flops_ratio`` (CLI) and ``target_flops_ratio=`` (``segprune.api.prune_model``);
docs/methods_flops_target.md. FLOPs count one multiply-add as 2 FLOPs (``torch.utils.flop_counter``).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..engine.profile import count_flops
from .groups import build_graph
from .physical import prune_channels

__all__ = ["pruned_flops", "search_keep_ratio", "search_training_keep_ratio"]


def pruned_flops(model: nn.Module, units: list, kept: dict[str, torch.Tensor], input_size: tuple[int, int]) -> int:
    """FLOPs (2 per multiply-add, :func:`count_flops`) at ``input_size`` of ``model`` pruned to ``kept``.

    Exact: a deep copy is traced, pruned physically with ``prune_channels`` and counted; ``model``
    itself is not changed.
    """
    clone = copy.deepcopy(model)
    prune_channels(clone, units, kept, build_graph(clone, tuple(input_size)), compensate="off")  # FLOPs only
    return int(count_flops(clone, tuple(input_size), in_channels=int(getattr(model, "input_channels", 3)))["flops"])


def search_keep_ratio(model: nn.Module, units: list, select, target: float, tolerance: float,
                      input_size: tuple[int, int], max_probes: int = 14, log=None,
                      flops_unpruned: int | None = None) -> dict:
    """Find the keep ratio p whose selection prunes ``model`` to ``target`` x its FLOPs, by bisection.

    Args:
        model: the unpruned network (not changed).
        units: its prunable units.
        select: ``select(p) -> {unit name: kept indices}``, the method's selection rule on scores
            computed once (MTP: ``select_channels``; a ``PruningMethod``: ``select_from_scores``).
            The kept sets must grow with p (true of every rule here), so FLOPs(p) is non-decreasing.
        target: wanted FLOPs(pruned) / FLOPs(unpruned), in (0, 1).
        tolerance: absolute tolerance on that ratio (> 0); the search stops at the first probe
            within it.
        input_size: (H, W) at which FLOPs are counted.
        max_probes: at most this many keep ratios are tried (interval [0, 1] halved each time).
        log: optional ``log(str)``.
        flops_unpruned: FLOPs of ``model`` if already counted.

    Returns:
        {"kept", "target_flops_ratio", "flops_tolerance", "keep_ratio_found", "flops_ratio_achieved",
        "flops_target_met" (|achieved - target| <= tolerance), "flops_unpruned", "flops_pruned",
        "flops_probes" ([[p, ratio], ...] in probe order)}. When no probe lands within the tolerance
        (the channel counts are discrete, or min_channels bounds the ratio from below), the probe
        closest to the target is returned (ties: the one with fewer FLOPs) and ``flops_target_met``
        is False.

    Raises:
        ValueError: target outside (0, 1), tolerance <= 0 or max_probes < 1.
    """
    target, tolerance = float(target), float(tolerance)
    if not 0.0 < target < 1.0:
        raise ValueError(f"prune.target_flops_ratio={target!r} must lie in (0, 1)")
    if not tolerance > 0.0:
        raise ValueError(f"prune.flops_tolerance={tolerance!r} must be > 0")
    if int(max_probes) < 1:
        raise ValueError(f"max_probes={max_probes!r} must be >= 1")
    size = tuple(input_size)
    f0 = int(flops_unpruned) if flops_unpruned is not None else int(
        count_flops(model, size, in_channels=int(getattr(model, "input_channels", 3)))["flops"])
    order = {u.name: i for i, u in enumerate(units)}
    cache: dict[tuple, int] = {}  # FLOPs depend only on how many channels each unit keeps
    lo, hi = 0.0, 1.0
    probes, best = [], None
    for _ in range(int(max_probes)):
        p = (lo + hi) / 2.0
        kept = select(p)
        key = tuple(sorted((order.get(n, n), int(k.numel())) for n, k in kept.items()))
        if key not in cache:
            cache[key] = pruned_flops(model, units, kept, size)
        flops = cache[key]
        r = flops / f0
        probes.append([p, r])
        if log is not None:
            log(f"  probe {len(probes)}: keep ratio {p:.6f} -> FLOPs ratio {r:.4f}")
        cand = (abs(r - target), flops, p, r, kept)
        if best is None or cand[:2] < best[:2]:
            best = cand
        if abs(r - target) <= tolerance:
            break
        if r > target:
            hi = p
        else:
            lo = p
    _, flops, p, r, kept = best
    met = abs(r - target) <= tolerance
    if log is not None:
        if met:
            log(f"FLOPs target {target:g} met: keep ratio {p:.6f} gives FLOPs ratio {r:.4f} "
                f"(|diff| {abs(r - target):.4f} <= tolerance {tolerance:g}) after {len(probes)} probes")
        else:
            why = ("the smallest widths allowed by prune.min_channels give more FLOPs" if r > target and p < 0.01
                   else "the discrete channel counts allow no closer ratio")
            log(f"FLOPs target {target:g} NOT met within tolerance {tolerance:g}: {why}; using the closest "
                f"achieved ratio {r:.4f} (keep ratio {p:.6f}) after {len(probes)} probes")
    return {"kept": kept, "target_flops_ratio": target, "flops_tolerance": tolerance, "keep_ratio_found": p,
            "flops_ratio_achieved": r, "flops_target_met": met, "flops_unpruned": f0, "flops_pruned": flops,
            "flops_probes": probes}


def search_training_keep_ratio(model: nn.Module, units: list, method, target: float, tolerance: float,
                               input_size: tuple[int, int], min_channels: int = 1, log=None,
                               flops_unpruned: int | None = None) -> dict:
    """FLOPs target for a method whose widths are fixed *before* training (ACoSP's k per unit).

    Such a method cannot bisect its selection after training: the learned masks only make sense
    for the k they were trained with. The widths depend on the keep ratio alone, not on which
    channels are kept, so the same bisection as :func:`search_keep_ratio` runs on the untrained
    network, each probe keeping the first ``method.fixed_widths(units, p, min_channels)[name]``
    channels of every unit. The keep ratio found is then set as the method's training keep ratio
    (``method.set_training_keep_ratio``).

    Args:
        method: a ``PruningMethod`` with ``widths_fixed_in_training`` (its ``fixed_widths`` must
            be non-decreasing in p).
        min_channels: ``prune.min_channels``, the floor of every unit's width.
        Other arguments and the return value: as :func:`search_keep_ratio`, without ``"kept"``;
        ``keep_ratio_found`` is the keep ratio the method now trains with.

    Raises:
        ValueError: as :func:`search_keep_ratio`.
    """
    def select(p):
        return {n: torch.arange(int(k)) for n, k in method.fixed_widths(units, p, min_channels).items()}
    res = search_keep_ratio(model, units, select, target, tolerance, input_size, log=log, flops_unpruned=flops_unpruned)
    res.pop("kept")
    method.set_training_keep_ratio(res["keep_ratio_found"])
    return res
