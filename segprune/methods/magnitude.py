"""Magnitude control: the trained baseline pruned by |γ| with no sparsity training.

Issue 15's control for every γ method (MTP, Network Slimming, CAP): rank the channels of each
prunable unit by the BatchNorm scaling factors |γ| of the *trained baseline* (mean over the unit's
BatchNorms, ``segprune.pruning.unit_gammas``), keep them with the same percentile thresholds as
Network Slimming (one per part, ``threshold_mode: ind``, or one over all units, ``uni``), remove
the others, then fine-tune exactly as every other method (Algorithm 1, line 11). It is Network
Slimming (Liu et al., ICCV 2017) with zero sparsity-training epochs: whatever a sparsity method
gains over it is what its sparsity training contributed. It has no ``method:`` keys.
"""
from __future__ import annotations

import torch
from torch import nn

from ..pruning.groups import PruneUnit, unit_gammas
from .base import PruningMethod, register_method

__all__ = ["Magnitude"]


@register_method
class Magnitude(PruningMethod):
    """|γ| of the trained baseline, Ind/Uni percentile thresholds, no sparsity training."""

    name = "magnitude"
    per_layer = False  # Ind/Uni thresholds like Network Slimming
    config_keys = ()

    def scores(self, model: nn.Module, units: list[PruneUnit], calib_loader=None) -> dict[str, torch.Tensor]:
        """Unit name -> |γ| (C,), averaged over the unit's BatchNorms (``unit_gammas``); no data needed."""
        return unit_gammas(model, units)
