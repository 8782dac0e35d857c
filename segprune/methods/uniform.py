"""Uniform width: every prunable unit keeps the same fraction p of its channels.

This is the "Uniform 0.75x" baseline of the MTP paper (Table 2): the network is narrowed
uniformly, layer by layer, with no learned sparsity. The paper does not say which channels are
kept when the uniform net is derived from the trained baseline; we rank them by the ℓ1 norm of
each output filter of the unit's convolution, Σ|W[c, :, :, :]| (Li et al. 2017, "Pruning
Filters for Efficient ConvNets", Sec. 3.1), and keep the ``round(p * C)`` largest in every unit.
For a residual-coupled unit (``prune_coupled``) the norms of all its producing convolutions are
summed; for an ordinary unit this is just the root convolution.

With ``from_scratch: true`` the pipeline is expected to call :func:`reinitialize_` on the
narrowed network and train it from scratch (the classic "uniform width" control); the choice of
channels is then irrelevant. There is no sparsity-training stage (``train`` is a no-op).
"""
from __future__ import annotations

import torch
from torch import nn

from ..pruning.groups import PruneUnit
from .base import PruningMethod, register_method

__all__ = ["Uniform", "filter_l1_norms", "reinitialize_"]


def filter_l1_norms(conv: nn.Conv2d) -> torch.Tensor:
    """ℓ1 norm of each output filter of ``conv``: weight (O, I/g, kh, kw) -> (O,)."""
    return conv.weight.detach().abs().flatten(1).sum(1).float()


def reinitialize_(model: nn.Module) -> nn.Module:
    """Re-initialise every conv and BatchNorm of ``model`` in place; returns ``model``.

    Conv weights: Kaiming normal (fan_out, ReLU), biases zero. BatchNorm: γ = 1, β = 0 and
    running statistics reset. Other layers (e.g. a Linear classification head) are untouched.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            if m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    return model


@register_method
class Uniform(PruningMethod):
    """Uniform width, channels ranked by filter ℓ1 norm (cfg: ``from_scratch`` bool, default False)."""

    name = "uniform"
    config_keys = ("from_scratch",)
    per_layer = True

    def __init__(self, cfg, input_size: tuple[int, int] | None = None):
        super().__init__(cfg, input_size)
        fs = self.cfg["from_scratch"]
        if not isinstance(fs, bool):
            raise ValueError(f"method.from_scratch={fs!r} must be true or false")
        self.from_scratch = fs

    def after_prune(self, model: nn.Module, log=None) -> None:
        """With ``from_scratch``, re-initialise the pruned net: fine-tuning then trains it from scratch."""
        if self.from_scratch:
            reinitialize_(model)
            if log is not None:
                log.write("uniform from_scratch: pruned network re-initialised")

    def scores(self, model: nn.Module, units: list[PruneUnit], calib_loader=None) -> dict[str, torch.Tensor]:
        """Unit name -> Σ over the unit's convs of the filter ℓ1 norms, (C,)."""
        mods = dict(model.named_modules())
        return {u.name: torch.stack([filter_l1_norms(mods[c]) for c in u.convs]).sum(0) for u in units}
