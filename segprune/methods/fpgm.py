"""FPGM: Filter Pruning via Geometric Median (He et al., CVPR 2019).

Filters close to the geometric median of their layer carry information that the other filters
already represent, so they are pruned first. The geometric median x* = argmin_x Σ_j ||x − F_j||_2
is approximated inside the set of filters (the paper's Eqs. 5-6): filter F_i is scored by
g(F_i) = Σ_j ||F_i − F_j||_2 and the filters with the smallest g are pruned. Each layer loses the
same fraction of filters (``per_layer``).

Implemented one-shot: the filters of the trained baseline are scored once and pruned
physically, followed by the pipeline's fine-tuning. The paper's soft filter pruning schedule
(zeroing the selected filters every epoch while training continues) is NOT implemented.

Filters are the root convolution's output filters W[i] (I·kh·kw values, raw weights). For a
residual-coupled unit the filters of all its producing convolutions are concatenated.
Note: torch_pruning's ``FPGMImportance`` differs (it measures distances between |W|^p and also
adds the consumers' input-channel slices), so its numbers do not match this criterion.
"""
from __future__ import annotations

import torch
from torch import nn

from ..pruning.groups import PruneUnit
from .base import PruningMethod, register_method

__all__ = ["FPGM", "fpgm_scores"]


def fpgm_scores(filters: torch.Tensor) -> torch.Tensor:
    """Summed Euclidean distance of each filter to all others.

    Args:
        filters: (C, D) flattened filters (or any (C, ...) tensor, flattened from dim 1).

    Returns:
        (C,) float64: score_i = Σ_j ||F_i − F_j||_2 (small = near the geometric median = redundant).
    """
    f = filters.detach().flatten(1).double()
    return torch.cdist(f.unsqueeze(0), f.unsqueeze(0), p=2).squeeze(0).sum(1)


@register_method
class FPGM(PruningMethod):
    """FPGM criterion, one-shot, same ratio in every layer."""

    name = "fpgm"
    config_keys = ()
    per_layer = True

    def scores(self, model: nn.Module, units: list[PruneUnit], calib_loader=None) -> dict[str, torch.Tensor]:
        """Unit name -> (C,) Σ_j ||F_i − F_j||_2 over the unit's conv filters."""
        mods = dict(model.named_modules())
        out = {}
        for u in units:
            filt = torch.cat([mods[c].weight.detach().flatten(1) for c in u.convs], dim=1)
            out[u.name] = fpgm_scores(filt).float()
        return out
