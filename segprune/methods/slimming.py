"""Network Slimming (Liu et al., "Learning Efficient Convolutional Networks through Network
Slimming", ICCV 2017).

Sparsity training minimises Eq. 1,  L = Σ_(x,y) l(f(x, W), y) + λ Σ_(γ∈Γ) |γ|,  where Γ are the
BatchNorm scaling factors. Here l is the segmentation cross-entropy only (no classification
task — that is what distinguishes MTP), Γ are the γ of every prunable unit's BatchNorm(s) and
λ is the config key ``alpha`` (default 1e-3). The ℓ1 term is applied either as a proximal
soft-threshold after each SGD step (``l1_mode: proximal``, default, exact zeros) or as the
sub-gradient λ·sign(γ) added to the gradient (``l1_mode: subgradient``, the paper's practice),
through MTP's helpers ``l1_prox_`` / ``l1_subgradient_``.

Channels are then ranked by |γ| and pruned with a global percentile threshold (the paper's
rule; ``threshold_mode: uni``) or one threshold per part (``ind``).

Config keys (``method:`` section): epochs, lr_seg, momentum, weight_decay,
max_iters_per_epoch (optional), alpha, l1_mode. The learning rate follows the poly(0.9) schedule.
"""
from __future__ import annotations

import torch
from torch import nn

from ..engine.train import train_segmentation
from ..pruning.groups import PruneUnit, unit_gammas
from .base import PruningMethod, register_method
from .mtp import l1_prox_, l1_subgradient_

__all__ = ["Slimming", "unit_gamma_params"]


def unit_gamma_params(model: nn.Module, units: list[PruneUnit]) -> list[torch.Tensor]:
    """The γ parameters (each (C,)) of all BatchNorms of ``units``, without duplicates."""
    mods = dict(model.named_modules())
    seen, out = set(), []
    for u in units:
        for b in u.bns:
            if b not in seen:
                seen.add(b)
                out.append(mods[b].weight)
    return out


@register_method
class Slimming(PruningMethod):
    """Network Slimming: ℓ1 sparsity training on BN γ, then global |γ| thresholds."""

    name = "slimming"
    per_layer = False
    config_keys = ("alpha", "l1_mode", "epochs", "lr_seg", "momentum", "weight_decay", "max_iters_per_epoch")

    def __init__(self, cfg, input_size: tuple[int, int] | None = None):
        super().__init__(cfg, input_size)
        self.alpha = float(self.cfg["alpha"])
        self.l1_mode = self.cfg["l1_mode"]
        if self.alpha < 0:
            raise ValueError(f"method.alpha={self.alpha!r} must be >= 0")
        if self.l1_mode not in ("proximal", "subgradient"):
            raise ValueError(f"method.l1_mode={self.l1_mode!r} must be 'proximal' or 'subgradient'")

    def l1_hooks(self, gammas: list[torch.Tensor]):
        """(step_hook, post_step) for ``train_segmentation`` implementing the ℓ1 term of Eq. 1."""
        if self.l1_mode == "subgradient":
            return (lambda it: l1_subgradient_(gammas, self.alpha)), None
        return None, (lambda lr: l1_prox_(gammas, lr * self.alpha))

    def train(self, model: nn.Module, units: list[PruneUnit], seg_loader, cls_loader, ignore_index: int, log,
              ckpt=None) -> dict:
        """Segmentation training with the ℓ1 penalty on the units' γ (Eq. 1), in place.

        ``cls_loader`` is unused. Returns the statistics of ``train_segmentation`` plus
        ``gamma_zero``, the fraction of penalised γ with |γ| < 1e-3.
        """
        gammas = unit_gamma_params(model, units)
        step_hook, post_step = self.l1_hooks(gammas)
        tcfg = self.seg_training_config()
        st = train_segmentation(model, seg_loader, tcfg, ignore_index, log, step_hook=step_hook, post_step=post_step,
                                ckpt=ckpt)
        n = sum(g.numel() for g in gammas)
        zero = sum(int((g.detach().abs() < 1e-3).sum()) for g in gammas) / max(1, n)
        log.write(f"slimming: alpha {self.alpha:g} ({self.l1_mode}), zero-γ fraction {zero:.3f}")
        return {**st, "gamma_zero": zero}

    def scores(self, model: nn.Module, units: list[PruneUnit], calib_loader=None) -> dict[str, torch.Tensor]:
        """Unit name -> |γ| (C,), averaged over the unit's BatchNorms (``unit_gammas``)."""
        return unit_gammas(model, units)
