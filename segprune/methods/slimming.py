"""Network Slimming (Liu et al., "Learning Efficient Convolutional Networks through Network
Slimming", ICCV 2017).

Sparsity training minimises Eq. 1,  L = Σ_(x,y) l(f(x, W), y) + λ Σ_(γ∈Γ) |γ|,  where Γ are the
BatchNorm scaling factors. Here l is the segmentation cross-entropy only (no classification
task — that is what distinguishes MTP), Γ are the γ of every prunable unit's BatchNorm(s) and
λ is the config key ``alpha``. The ℓ1 step and its schedule are the shared machinery of
``segprune.methods.sparsity``: ``l1_mode`` proximal (ISTA on a momentum-free γ group, default) or
subgradient (the paper's practice); ``l1_schedule`` constant (the paper's λ) or growing (ours: the
channels that the budget would remove are driven to exactly zero before removal).

Channels are then ranked by |γ| and pruned with a global percentile threshold (the paper's
rule; ``threshold_mode: uni``) or one threshold per part (``ind``).

Config keys (``method:`` section): epochs, lr_seg, momentum, weight_decay,
max_iters_per_epoch (optional), alpha, l1_mode, l1_schedule, l1_eps, l1_ramp. The learning rate
follows the poly(0.9) schedule.
"""
from __future__ import annotations

import torch
from torch import nn

from ..engine.train import iters_per_epoch, poly_lr, train_segmentation
from ..pruning.groups import PruneUnit, unit_gammas
from .base import MethodConfig, PruningMethod, register_method
from .sparsity import (L1_MODES, L1_SCHEDULES, SPARSITY_CONFIG_KEYS, GammaGroup, PenalisedGamma, StateBundle,
                       bn_params, gamma_quantiles, l1_from_config, lr_sum, make_sgd_with_gammas)

__all__ = ["Slimming", "unit_gamma_params"]


def unit_gamma_params(model: nn.Module, units: list[PruneUnit]) -> list[torch.Tensor]:
    """The γ parameters (each (C,)) of all BatchNorms of ``units``, without duplicates."""
    return [p for _, _, p in bn_params(model, units)]


@register_method
class Slimming(PruningMethod):
    """Network Slimming: ℓ1 sparsity training on BN γ, then global |γ| thresholds."""

    name = "slimming"
    per_layer = False
    config_keys = ("alpha", *SPARSITY_CONFIG_KEYS, "epochs", "lr_seg", "momentum", "weight_decay",
                   "max_iters_per_epoch")

    def __init__(self, cfg, input_size: tuple[int, int] | None = None):
        super().__init__(cfg, input_size)
        self.alpha = float(self.cfg["alpha"])
        self.l1_mode = self.cfg["l1_mode"]
        if self.alpha < 0:
            raise ValueError(f"method.alpha={self.alpha!r} must be >= 0")
        if self.l1_mode not in L1_MODES:
            raise ValueError(f"method.l1_mode={self.l1_mode!r} must be 'proximal' or 'subgradient'")
        if self.cfg["l1_schedule"] not in L1_SCHEDULES:
            raise ValueError(f"method.l1_schedule={self.cfg['l1_schedule']!r} must be 'constant' or 'growing'")

    @classmethod
    def trains_for_budget(cls, cfg) -> bool:
        """The growing ℓ1 schedule trains for the budget (``methods.sparsity``)."""
        return MethodConfig(cfg, cls.name, tuple(cls.config_keys))["l1_schedule"] == "growing"

    def train(self, model: nn.Module, units: list[PruneUnit], seg_loader, cls_loader, ignore_index: int, log,
              ckpt=None, budget=None) -> dict:
        """Segmentation training with the ℓ1 penalty on the units' γ (Eq. 1), in place.

        Args:
            model, units, seg_loader, ignore_index, log, ckpt: as ``PruningMethod.train``;
                ``cls_loader`` is unused.
            budget: ``segprune.algorithm.Budget`` for the growing schedule (None: the constant α).

        Returns:
            the statistics of ``train_segmentation`` plus ``gamma_zero`` (fraction of penalised γ
            with |γ| < 1e-3), ``gamma_quantiles`` (10/50/90 % of the scores) and ``l1``
            (``L1Sparsity.summary``: schedule, λ, the channels planned for removal and how many are
            below ε).

        Raises:
            NonFiniteLossError: NaN/inf loss (from ``train_segmentation``).
        """
        return self.l1_train(model, units, seg_loader, ignore_index, log, ckpt, budget)

    def l1_train(self, model: nn.Module, units: list[PruneUnit], seg_loader, ignore_index: int, log, ckpt, budget,
                 multiplier=None, state=None, before=None) -> dict:
        """The sparsity training shared by Slimming and CAP: segmentation loss + ℓ1 on the units' γ
        (``methods.sparsity``), the penalty of channel c multiplied by ``multiplier(bn)[c]`` (CAP's
        guidance; None = 1). ``state``: a further ``LoopState`` checkpointed with the run (CAP's
        importances); ``before(it)``: called after each backward pass, before the ℓ1 terms."""
        tcfg = self.seg_training_config()
        total = iters_per_epoch(seg_loader, tcfg["max_iters_per_epoch"]) * int(tcfg["epochs"])
        gam = bn_params(model, units)
        lr_total = lr_sum(lambda t, n: poly_lr(tcfg["lr"], t, n, tcfg["power"]), total)
        group = GammaGroup("seg", lr_total, [PenalisedGamma(p, b, u, self.alpha, "seg") for b, u, p in gam])
        l1 = l1_from_config(self, [group], total, units, budget, lambda: self.scores(model, units), model,
                            log.write, multiplier)
        opt = make_sgd_with_gammas(model.parameters(), [p for _, _, p in gam], tcfg["lr"], tcfg["momentum"],
                                   tcfg["weight_decay"], self.l1_mode)

        def step_hook(it: int) -> None:   # after backward, before the optimizer step
            if before is not None:
                before(it)
            l1.update(it)
            l1.add_subgradients("seg")

        st = train_segmentation(model, seg_loader, tcfg, ignore_index, log, step_hook=step_hook,
                                post_step=lambda lr: l1.prox("seg", lr), ckpt=ckpt, opt=opt,
                                extra=l1 if state is None else StateBundle(guide=state, l1=l1))
        gammas = [p for _, _, p in gam]
        n = sum(g.numel() for g in gammas)
        zero = sum(int((g.detach().abs() < 1e-3).sum()) for g in gammas) / max(1, n)
        summary = l1.summary()
        self.log_l1(log, summary, zero)
        return {**st, "gamma_zero": zero, "gamma_quantiles": gamma_quantiles(self.scores(model, units)), "l1": summary}

    def log_l1(self, log, summary: dict, zero: float) -> None:
        """One log line: α, ℓ1 step and schedule, zero-γ fraction and, growing, the planned removal."""
        g = summary["groups"]["seg"]
        extra = ""
        if summary["l1_schedule"] == "growing":
            extra = (f", keep ratio {summary['keep_ratio']:.4f}: {g['planned_removed']} γ planned for removal, "
                     f"{100 * (g['removed_below_eps'] or 0):.1f}% below eps {g['eps']:.3g} (max {g['removed_max_gamma']:.3g}), "
                     f"lambda {g['lambda']:.4g}")
        log.write(f"{self.name}: alpha {self.alpha:g} ({self.l1_mode}, {summary['l1_schedule']}), "
                  f"zero-γ fraction {zero:.3f}{extra}")

    def scores(self, model: nn.Module, units: list[PruneUnit], calib_loader=None) -> dict[str, torch.Tensor]:
        """Unit name -> |γ| (C,), averaged over the unit's BatchNorms (``unit_gammas``)."""
        return unit_gammas(model, units)
