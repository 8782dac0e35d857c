"""CAP, Context-Aware Pruning (He, Wu, Liang, Lam, "CAP: Context-Aware Pruning for Semantic
Segmentation", WACV 2021, pp. 959-968).

CAP is Network Slimming (ℓ1 sparsity on the BatchNorm scaling factors γ, then global |γ|
thresholds) whose per-channel ℓ1 pressure is *guided* by a Context-aware Guiding Module (CAGM,
the paper's "Context-aware Guided Sparsification", CAGS): from a layer's post-BN feature map a
C×C channel-affinity matrix is formed and reduced to a C-vector of contextual importance; a channel
that contributes little to the context of the layer is pushed to zero faster, a contextually
important one more slowly. The guidance acts on the sparsity update only: the forward pass and
the segmentation gradient are unchanged.

The public description (abstract, method names CAGM/CAGS) does not give the affinity, its reduction
or how the vector scales the ℓ1 term; our choices (all documented in docs/methods_cap_acosp.md):

* affinity, per sample n, of the post-BN map Y_n reshaped to F_n (C, HW):
  ``S_n = F_n F_nᵀ / HW`` (the uncentred second moment, ≈ the channel correlation matrix since BN
  outputs have unit variance) and ``A_n = softmax_row(S_n)`` (row i: how channel i distributes
  its affinity; the channel-attention map of DANet, Fu et al. CVPR 2019, which CAP cites);
* reduction: ``a = mean_n mean_i A_n[i, :]`` (attention a channel *receives*, sums to 1) and the
  contextual importance ``r = C · a`` (mean 1);
* averaging: ``R ← ema · R + (1 − ema) · r_t`` over iterations, ``R`` = r_1 at the first one;
* guidance: ``g = min(1 / R, guide_max)``: a channel of average importance (R_c = 1) keeps
  Network Slimming's strength α, a more important one less, a less important one more (at most
  ``guide_max`` · α); channel c gets ℓ1 strength ``w_c · g_c``, w_c the shared schedule's weight
  (``methods.sparsity``: α for ``l1_schedule: constant``; α plus the growing term on the channels
  planned for removal for ``growing``): sub-gradient ``w_c g_c sign(γ_c)`` or proximal threshold
  ``lr · w_c · g_c`` on a momentum-free γ group.

Placement: a guiding module sits on every BatchNorm of every prunable unit (``guide: all``), or
only on the decoder units (``guide: decoder``: the five ASPP branches, the ASPP projection and
the head's 3×3 convolution — the DeepLabv3 counterpart of PSPNet's pyramid-pooling branches,
where the paper puts one module per branch); unguided units get the plain ℓ1 term (g = 1).
"""
from __future__ import annotations

import torch
from torch import nn

from ..checkpoint import CheckpointError
from ..engine import distributed as ddp
from ..engine.train import LoopState
from ..pruning.groups import PruneUnit
from .base import register_method
from .slimming import Slimming
from .sparsity import SPARSITY_CONFIG_KEYS

__all__ = ["CAP", "ContextGuide", "channel_affinity", "context_importance", "guidance_from_importance"]


def channel_affinity(y: torch.Tensor) -> torch.Tensor:
    """Row-softmax channel affinity of a post-BN feature map.

    Args:
        y: feature map (N, C, H, W) (any float dtype; computed in that dtype).

    Returns:
        A (N, C, C) with ``A[n, i, j] = softmax_j(S[n, i, j])``, ``S[n] = F_n F_nᵀ / (H·W)``,
        ``F_n = y[n].reshape(C, H·W)``. Every row sums to 1.

    Raises:
        ValueError: ``y`` is not 4-D.
    """
    if y.dim() != 4:
        raise ValueError(f"channel_affinity expects a (N, C, H, W) feature map, got shape {tuple(y.shape)}")
    n, c, h, w = y.shape
    f = y.reshape(n, c, h * w)
    s = torch.bmm(f, f.transpose(1, 2)) / float(h * w)
    return torch.softmax(s, dim=2)


def context_importance(y: torch.Tensor) -> torch.Tensor:
    """Contextual importance r (C,) of the channels of ``y`` (N, C, H, W): ``r = C · mean_{n,i} A[n, i, :]``.

    ``r_j`` is C times the mean attention channel j receives from all channels (mean 1 over j).
    """
    a = channel_affinity(y).mean(dim=(0, 1))
    return a * a.numel()


def guidance_from_importance(r: torch.Tensor, guide_max: float = 4.0) -> torch.Tensor:
    """Per-channel ℓ1 multiplier g (C,) from importance r (C,) (r > 0, mean 1).

    ``g = min(1 / r, guide_max)``: g = 1 for a channel of average importance, the least important
    channel gets the largest multiplier. Not renormalised: by Jensen ``mean(1 / r) >= 1``, with
    equality only for uniform r, so guidance never weakens the average ℓ1 pressure below α.
    """
    return (1.0 / r.clamp_min(1e-12)).clamp(max=float(guide_max))


class ContextGuide(LoopState):
    """Context-aware guiding modules on a set of BatchNorm layers (forward hooks, no effect on outputs).

    Each hook computes, under ``torch.no_grad``, the importance ``r_t`` (C,) of its BN's output
    (N, C, H, W) of the current forward pass (several calls within one step are averaged). After the
    backward pass, :meth:`step` folds ``r_t`` into the running average ``R`` (EMA, first value
    taken as is); :meth:`guidance` returns ``g`` (C,) for one BN from ``R``.

    Args:
        model: the network holding the BatchNorms.
        bn_names: module names of the guided BatchNorms.
        ema: EMA factor in [0, 1) (0 = use the current batch only).
        guide_max: upper clip of g (>= 1).
    """

    def __init__(self, model: nn.Module, bn_names: list[str], ema: float = 0.9, guide_max: float = 4.0):
        mods = dict(model.named_modules())
        self.ema, self.guide_max = float(ema), float(guide_max)
        self.running: dict[str, torch.Tensor] = {}
        self._batch: dict[str, list[torch.Tensor]] = {}
        self._handles = []
        self._names = list(bn_names)
        self._mods = {name: mods[name] for name in bn_names}
        for name in bn_names:
            self._handles.append(mods[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, inputs, output):
            with torch.no_grad():  # read the output before an in-place ReLU overwrites it
                self._batch.setdefault(name, []).append(context_importance(output.detach().float()))
            return None  # the forward output is left untouched
        return hook

    def step(self) -> None:
        """Fold the importances of the last forward pass into the running averages; reset."""
        for name, rs in self._batch.items():
            # several processes: the mean over ranks of the per-rank means over samples, i.e. the
            # global batch's importance (equal shards); a single process: r itself
            r = ddp.mean_over_ranks(torch.stack(rs).mean(0))
            old = self.running.get(name)
            self.running[name] = r if old is None else self.ema * old + (1.0 - self.ema) * r
        self._batch = {}

    def guidance(self, name: str) -> torch.Tensor | None:
        """g (C,) of BN ``name`` from its running importance, or None before its first step."""
        r = self.running.get(name)
        return None if r is None else guidance_from_importance(r, self.guide_max)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The running importances (BN name -> (C,)), for in-stage checkpoints (``engine.resume``)."""
        return dict(self.running)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Restore :meth:`state_tensors`, each on the device of its BatchNorm's γ (checkpoints are read
        onto the CPU). Raises CheckpointError (naming ``source``) for an unknown BN."""
        hooked = set(self._names)
        for name in tensors:
            if name not in hooked:
                raise CheckpointError(f"{source}: CAP importance for {name!r}, which has no guiding module here")
        self.running = {k: v.to(self._mods[k].weight.device, copy=True) for k, v in tensors.items()}

    def remove(self) -> None:
        """Remove the hooks (the running averages stay readable)."""
        for h in self._handles:
            h.remove()
        self._handles = []


@register_method
class CAP(Slimming):
    """Context-Aware Pruning: context-guided ℓ1 sparsity on BN γ, then global/Ind |γ| thresholds.

    Config keys (``method:``): alpha (α), l1_mode (``proximal``/``subgradient``), l1_schedule,
    l1_eps, l1_ramp (``methods.sparsity``), epochs, lr_seg, momentum, weight_decay, max_iters_per_epoch. Options (``method.options``):
    ``guide`` (``"all"`` | ``"decoder"``), ``ema`` (EMA factor of the importance, [0, 1)),
    ``guide_max`` (clip of the per-channel multiplier, >= 1).

    Raises:
        ValueError: (at construction) negative alpha, unknown l1_mode, or a bad option.
    """

    name = "cap"
    per_layer = False
    OPTIONS = {"guide": "all", "ema": 0.9, "guide_max": 4.0}
    config_keys = ("alpha", *SPARSITY_CONFIG_KEYS, "epochs", "lr_seg", "momentum", "weight_decay",
                   "max_iters_per_epoch")

    def __init__(self, cfg, input_size: tuple[int, int] | None = None):
        super().__init__(cfg, input_size)
        bad = self.validate_options(self.options)
        if bad:
            raise ValueError("; ".join(bad))

    @classmethod
    def validate_options(cls, options: dict) -> list[str]:
        bad = []
        if options.get("guide") not in ("all", "decoder"):
            bad.append(f"guide={options.get('guide')!r} must be 'all' or 'decoder'")
        ema = options.get("ema")
        if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0.0 <= ema < 1.0:
            bad.append(f"ema={ema!r} must be a number in [0, 1)")
        gm = options.get("guide_max")
        if isinstance(gm, bool) or not isinstance(gm, (int, float)) or not gm >= 1.0:
            bad.append(f"guide_max={gm!r} must be a number >= 1")
        return bad

    def guided_bns(self, units: list[PruneUnit]) -> list[str]:
        """BatchNorm names that get a guiding module (every BN of the selected units, no duplicates)."""
        sel = units if self.options["guide"] == "all" else [u for u in units if u.part == "decoder"]
        return list(dict.fromkeys(b for u in sel for b in u.bns))

    def attach(self, model: nn.Module, units: list[PruneUnit]) -> ContextGuide:
        """Put the guiding modules on ``model`` (forward hooks); call ``.remove()`` when done."""
        return ContextGuide(model, self.guided_bns(units), float(self.options["ema"]), float(self.options["guide_max"]))

    def train(self, model: nn.Module, units: list[PruneUnit], seg_loader, cls_loader, ignore_index: int, log,
              ckpt=None, budget=None) -> dict:
        """Segmentation training with the context-guided ℓ1 term on the units' γ, in place.

        Args:
            model: segmentation network, images (N, 3, H, W) -> logits (N, K, H, W).
            units: prunable units; the γ of all their BatchNorms are penalised.
            seg_loader: (images, labels (N, H, W)) batches. ``cls_loader`` is unused.
            ckpt: optional ``engine.resume.StageCheckpoint``; the importance averages and the ℓ1
                schedule are saved with it.
            budget: ``segprune.algorithm.Budget`` for the growing schedule (None: the constant α).

        Returns:
            as ``Slimming.train``, plus ``guided_bns`` (number of guiding modules). The final
            guidance vectors are kept in ``self.last_guidance`` (BN name -> g (C,)).

        Raises:
            NonFiniteLossError: NaN/inf loss (from ``train_segmentation``).
        """
        guide = self.attach(model, units)
        try:
            st = self.l1_train(model, units, seg_loader, ignore_index, log, ckpt, budget,
                               multiplier=guide.guidance, state=guide, before=lambda it: guide.step())
        finally:
            guide.remove()
        self.last_guidance = {b: guide.guidance(b) for b in guide.running}
        log.write(f"cap: {len(self.guided_bns(units))} guiding modules ({self.options['guide']}), "
                  f"ema {self.options['ema']:g}")
        return {**st, "guided_bns": len(self.guided_bns(units))}
