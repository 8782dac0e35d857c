"""Percentile thresholds on channel scores: independent per part ("Ind") or unified ("Uni").

MTP paper, Sec. 3 and Table 4: to keep a fraction p of channels, "Ind" sets a threshold τ1 so
that (1 - p) of all backbone channels score below it and, independently, τ2 for the decoder;
"Uni" uses one global threshold over all prunable channels (Network Slimming's original rule).
"""
from __future__ import annotations


import torch

__all__ = ["select_channels", "check_keep_ratio", "round_kept", "rounded_count"]


def check_keep_ratio(keep_ratio) -> float:
    """Return ``keep_ratio`` as float; raise ValueError unless it lies in the open interval (0, 1)."""
    try:
        value = float(keep_ratio)
    except (TypeError, ValueError):
        raise ValueError(f"prune.keep_ratio={keep_ratio!r} is not a number in (0, 1)") from None
    if not 0.0 < value < 1.0:
        raise ValueError(f"prune.keep_ratio={keep_ratio!r} must lie in (0, 1), e.g. 0.5 for 0.5x")
    return value


def select_channels(scores: dict[str, torch.Tensor], parts: dict[str, str], keep_ratio: float,
                    mode: str = "ind", min_channels: int = 1) -> dict[str, torch.Tensor]:
    """Choose which channels each unit keeps.

    Args:
        scores: unit name -> importance (C,) (larger = more important).
        parts: unit name -> part name (``"backbone"``, ``"decoder"``, ...).
        keep_ratio: fraction p in (0, 1) of channels to keep.
        mode: ``"ind"`` (one threshold per part) or ``"uni"`` (one global threshold).
        min_channels: every unit keeps at least ``min(min_channels, C)`` channels (its best ones),
            so no layer is ever emptied; this can keep slightly more than ``p`` of a part.

    Returns:
        unit name -> sorted LongTensor of kept channel indices, on the CPU (scores on another device
        are copied once; selection and physical pruning run on the CPU).

    The ``round((1 - p) * N)`` lowest-scoring channels of each pool (a part for "ind", all
    units for "uni") are pruned; ties are broken by unit order, then channel index.

    Raises:
        ValueError: keep_ratio outside (0, 1), unknown mode, min_channels < 1.
    """
    p = check_keep_ratio(keep_ratio)
    if mode not in ("ind", "uni"):
        raise ValueError(f"prune.threshold_mode={mode!r} must be 'ind' or 'uni'")
    if int(min_channels) < 1:
        raise ValueError(f"prune.min_channels={min_channels!r} must be >= 1")
    scores = {n: s.detach().flatten().cpu() for n, s in scores.items()}
    pools: dict[str, list[str]] = {}
    for name in scores:
        pools.setdefault(parts[name] if mode == "ind" else "all", []).append(name)
    keep_mask = {}
    for names in pools.values():
        flat = torch.cat([scores[n].double() for n in names])
        n_prune = int(round((1.0 - p) * flat.numel()))
        keep = torch.ones(flat.numel(), dtype=torch.bool, device="cpu")
        keep[torch.argsort(flat, stable=True)[:n_prune]] = False  # the pool's lowest scores
        for n, m in zip(names, torch.split(keep, [scores[n].numel() for n in names])):
            keep_mask[n] = m
    kept = {}
    for name in scores:
        mask = keep_mask[name]
        need = min(int(min_channels), mask.numel())
        if int(mask.sum()) < need:
            top = torch.argsort(scores[name], descending=True, stable=True)[:need]
            mask = mask.clone()
            mask[top] = True
        kept[name] = torch.nonzero(mask).flatten()
    return kept


def pruned_fraction(kept: dict[str, torch.Tensor], scores: dict[str, torch.Tensor]) -> float:
    """Fraction of channels removed over all units (for reports)."""
    total = sum(s.numel() for s in scores.values())
    return 1.0 - sum(k.numel() for k in kept.values()) / max(1, total)




def rounded_count(kept: int, channels: int, multiple: int) -> int:
    """Kept-channel count after rounding ``kept`` to the nearest multiple of ``multiple``.

    Halves round up; the result is at least ``multiple`` (a layer never rounds down to zero) and at
    most ``channels`` (a layer narrower than ``multiple``, or whose width is not a multiple of it,
    may end at ``channels``). ``multiple == 1`` returns ``kept`` unchanged.

    Raises:
        ValueError: ``multiple < 1`` or ``kept`` outside 1..channels.
    """
    m, k, c = int(multiple), int(kept), int(channels)
    if m < 1:
        raise ValueError(f"prune.round_to={multiple!r} must be an integer >= 1")
    if not 1 <= k <= c:
        raise ValueError(f"kept={kept!r} must lie in 1..{c}")
    if m == 1:
        return k
    return min(c, max(m, m * ((2 * k + m) // (2 * m))))


def round_kept(kept: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], multiple: int) -> dict[str, torch.Tensor]:
    """Round every unit's kept-channel count to a multiple of ``multiple`` (``prune.round_to``).

    Hardware kernels (GEMM tiles, SIMD lanes, tensor cores) often run a layer whose width is a
    multiple of 8 or 16 as fast as, or faster than, a narrower odd width; rounding the widths that a
    criterion chose trades a little of its FLOPs reduction for latency (docs/results/latency.md).

    Args:
        kept: unit name -> sorted LongTensor of kept indices (from any selection rule).
        scores: unit name -> (C,) importance (larger = more important), the same scores the rule
            ranked by; used to decide which channels to add back or drop.
    Returns:
        unit name -> sorted LongTensor on the CPU (a unit whose count does not change: its ``kept``
        tensor itself); a unit whose count changes from k to k' = :func:`rounded_count`
        keeps its k chosen channels plus the best-scoring dropped ones (k' > k) or loses its
        lowest-scoring kept ones (k' < k), ties broken by channel index. ``multiple == 1``
        returns ``kept`` itself.
    Raises:
        ValueError: ``multiple < 1``, or a unit of ``kept`` has no scores.
    """
    if int(multiple) == 1:
        return kept
    out = {}
    for name, idx in kept.items():
        if name not in scores:
            raise ValueError(f"round_kept: no scores for unit {name!r}")
        s = scores[name].detach().flatten().double().cpu()
        c = s.numel()
        k = idx.numel()
        k2 = rounded_count(k, c, multiple)
        if k2 == k:
            out[name] = idx
            continue
        idx = idx.cpu()
        mask = torch.zeros(c, dtype=torch.bool, device="cpu")
        mask[idx] = True
        if k2 > k:
            cand = torch.nonzero(~mask).flatten()
            best = cand[torch.argsort(s[cand], descending=True, stable=True)[:k2 - k]]
            mask[best] = True
        else:
            cand = torch.nonzero(mask).flatten()
            worst = cand[torch.argsort(s[cand], stable=True)[:k - k2]]
            mask[worst] = False
        out[name] = torch.nonzero(mask).flatten()
    return out
