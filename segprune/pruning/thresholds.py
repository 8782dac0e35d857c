"""Percentile thresholds on channel scores: independent per part ("Ind") or unified ("Uni").

MTP paper, Sec. 3 and Table 4: to keep a fraction p of channels, "Ind" sets a threshold τ1 so
that (1 - p) of all backbone channels score below it and, independently, τ2 for the decoder;
"Uni" uses one global threshold over all prunable channels (Network Slimming's original rule).
"""
from __future__ import annotations


import torch

__all__ = ["select_channels", "check_keep_ratio"]


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
        unit name -> sorted LongTensor of kept channel indices.

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
    pools: dict[str, list[str]] = {}
    for name in scores:
        pools.setdefault(parts[name] if mode == "ind" else "all", []).append(name)
    keep_mask = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    for names in pools.values():
        flat = torch.cat([scores[n].flatten().double() for n in names])
        owner = torch.cat([torch.full((scores[n].numel(),), i) for i, n in enumerate(names)])
        local = torch.cat([torch.arange(scores[n].numel()) for n in names])
        n_prune = int(round((1.0 - p) * flat.numel()))
        order = torch.argsort(flat, stable=True)[:n_prune]
        for j in order.tolist():
            keep_mask[names[owner[j]]][local[j]] = False
    kept = {}
    for name, mask in keep_mask.items():
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


