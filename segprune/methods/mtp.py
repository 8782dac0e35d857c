"""MTP: Multi-Task Pruning (Chen et al., "Multi-Task Pruning for Semantic Segmentation Networks").

Sparsity training of Algorithm 1, lines 1-7, by the inexact augmented Lagrangian method of
Eqs. 5-10. Notation of the paper:

* ``W1``: a copy of the backbone (plus its classification head ``fc``) trained on the
  classification task; ``W3``: the backbone used by the segmentation network; ``W2``: the decoder.
* Eq. 5:  min l_cls(W1) + λ l_seg(W3, W2) + α1 ||γ1||_1 + α2 ||γ2||_1   s.t.  W1 = W3.
* Eq. 6:  L = ... + <E, W1 - W3> + μ/2 ||W1 - W3||².
* Eq. 7 (W1):  l_cls(W1) + <E, W1 - W3> + μ/2 ||W1 - W3||² + α1 ||γ1||_1.
* Eq. 8 (W2):  λ l_seg(W3, W2) + α2 ||γ2||_1.
* Eq. 9 (W3):  λ l_seg(W3, W2) + <E, W1 - W3> + μ/2 ||W1 - W3||².  The printed Eq. 9 omits the
  <E, ·> term and ends in a dangling "+"; we read it as the augmented Lagrangian (Eq. 6)
  restricted to the terms that depend on W3, which is the only consistent reading: without
  <E, W1 - W3> in the W3 step the multiplier E would act on W1 alone and the fixed point
  would not satisfy W1 = W3.
* Eq. 10:  E ← E + μ (W1 - W3),  μ ← ρ μ  (ρ > 1), capped at ``mu_max`` as in the inexact ALM
  of Lin et al. (2010), applied every ``update_every`` iterations; ``rho: auto`` (default, ours)
  picks ρ so that μ reaches μ_max at half of the planned iterations (:func:`auto_rho`).

Choices where the paper is silent (see docs/methods.md):

* The constraint W1 = W3 covers *all* backbone parameters (conv weights, BN γ and β), not
  only γ: Eq. 5 is written over the parameter sets, and only a full coupling transfers the
  classification knowledge into the segmentation backbone. BN running statistics are buffers,
  not parameters: each copy keeps its own (classification vs segmentation image statistics).
  ``fc`` exists only in W1 and is not constrained.
* ℓ1 step and schedule: the shared machinery of ``segprune.methods.sparsity`` (``l1_mode``
  proximal = ISTA on momentum-free γ groups, default; ``l1_schedule`` growing = the channels the
  budget removes are driven to zero, default, ours; constant = the paper's α1, α2). ℓ1 acts only on
  the γ of prunable units (backbone units via W1, decoder units via W2; with the growing schedule
  also W3's γ of the channels planned for removal, see :class:`MTP`).
* Coupling step (ours): each copy takes its data step (momentum SGD on l_cls resp. λ l_seg alone),
  then the proximal step of <E, W1 - W3> + μ/2 ||W1 - W3||² with the other copy fixed
  (:meth:`MTP.couple_`), so that the momentum buffer never holds the coupling force and the step
  is stable for every lr·μ; the ℓ1 threshold of a coupled γ is lr·w/(1 + lr μ) (exact prox of
  quadratic + ℓ1). Same fixed points as Eqs. 7 and 9.
* W2 and W3 share one segmentation forward/backward: the gradient of λ l_seg w.r.t. both is
  computed once and both take their SGD step together (a Jacobi step between W2 and W3,
  Gauss-Seidel w.r.t. W1), followed by W3's coupling step.
* Scores for pruning: backbone γ1 from W1, decoder γ2 from W2 (Algorithm 1, line 9).
  The pruned network keeps W3 (``keep_copy="w3"``, default): its decoder W2 was trained with
  W3 and its BN statistics are those of segmentation images. W1's γ decide which channels are
  removed from W3; :meth:`MTP.agreement` reports how far W1 ≈ W3 holds (relative gap, Spearman
  correlation of γ1 with γ3).
  ``keep_copy="w1"`` copies W1's parameters into the segmentation backbone instead.
  Either way the classification head ``fc`` of W1 is copied into the model, for the
  classification fine-tuning of Algorithm 1 line 11.

Which module is W1 (:func:`cls_branch`): for the zoo models, ``model.backbone`` (a ResNet whose
``forward`` gives class logits and whose head is ``fc``). A model that sets ``cls_head`` (module
name, or tuple of names, of its classification head) and ``forward_cls(x)`` instead — what
``segprune.api.prune_model`` attaches to any user module — has the whole model copied as W1; only
the parameters under ``parts["backbone"]`` are coupled (W1 = W3), the head is W1's alone, and the
decoder part of the copy is never used.

Several processes (``torchrun``, ``engine.distributed``): each rank takes its slice of every
global classification and segmentation batch; the gradients of the W1 step (Eq. 7) and of the
W2/W3 step (Eqs. 8-9) are summed over ranks during ``backward`` (one ``DistributedDataParallel``
over W1, one over the segmentation network), before the ℓ1 sub-gradient, the coupling and the
proximal steps act, so every rank takes the same step; E and μ (Eq. 10, computed from W1 - W3) are
then identical on all ranks by construction, and :func:`run_mtp` records per-rank digests of E, μ,
W1 and the model (``MTP.rank_digests``) to prove it.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import distributed as ddp
from ..engine.amp import Amp, current_amp
from ..engine.layout import training_layout
from ..engine.log import StageLog
from ..engine.resume import (LoaderCursor, ResumableCycle, StageCheckpoint, fault_point, load_module_tensors,
                             load_optimizer_tensors, module_tensors, optimizer_tensors, restore_rng, rng_state)
from ..checkpoint import CheckpointError
from ..engine.train import (StepValues, check_finite, iters_per_epoch, linear_lr, poly_lr, seg_denominator, seg_loss,
                            set_lr)
from ..pruning.groups import PruneUnit, in_part, unit_gammas
from .base import MethodConfig, PruningMethod, register_method
from .sparsity import (SPARSITY_CONFIG_KEYS, GammaGroup, L1Sparsity, PenalisedGamma,
                       add_l1_subgradient_, gamma_quantiles, lr_sum, sgd_param_groups, soft_threshold_)

__all__ = ["MTP", "MultiTaskPruning", "run_mtp", "l1_prox_", "l1_subgradient_", "MTP_CONFIG_KEYS", "cls_branch",
           "auto_rho", "spearman"]

#: the ``method:`` keys MTP reads
MTP_CONFIG_KEYS = ("epochs", "lr_seg", "lr_cls", "momentum", "weight_decay", "lam", "alpha1", "alpha2", "mu0", "rho",
                   "mu_max", "update_every", *SPARSITY_CONFIG_KEYS, "keep_copy", "max_iters_per_epoch", "cls_weight")


def l1_prox_(gammas: list[torch.Tensor], threshold: float) -> None:
    """Soft-threshold in place: γ ← sign(γ) · max(|γ| - threshold, 0) (proximal map of threshold·||γ||_1;
    ``methods.sparsity.soft_threshold_``)."""
    soft_threshold_(gammas, threshold)


def l1_subgradient_(gammas: list[torch.Tensor], alpha: float) -> None:
    """Add the ℓ1 sub-gradient α·sign(γ) to ``γ.grad`` (Network Slimming, Liu et al. 2017, Eq. 1;
    ``methods.sparsity.add_l1_subgradient_``)."""
    add_l1_subgradient_(gammas, alpha)


#: the stage labels of MTP's NaN/inf loss errors (``engine.train.NonFiniteLossError``)
W1_STAGE, W23_STAGE = "sparsity (W1, Eq. 7)", "sparsity (W2/W3, Eqs. 8-9)"

#: ``rho: auto``: μ reaches μ_max after this fraction of the planned iterations and is held there ([ours])
MU_REACH = 0.5


def auto_rho(mu0: float, mu_max: float, steps: int, update_every: int) -> float:
    """ρ of Eq. 10 such that μ = μ0·ρ^K reaches ``mu_max`` at the K-th multiplier update, K = steps //
    update_every ([ours]: the paper gives no value of ρ; a fixed ρ either stops short of μ_max or
    reaches it at an arbitrary point, depending on the number of iterations). ``rho: auto`` uses
    steps = :data:`MU_REACH` × the planned iterations, so that the second half of the training runs
    at μ_max. 1.0 when K = 0 or μ_max = μ0 (μ stays μ0)."""
    k = int(steps) // max(1, int(update_every))
    if k <= 0 or float(mu_max) <= float(mu0):
        return 1.0
    return (float(mu_max) / float(mu0)) ** (1.0 / k)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two vectors (n,) (ties get their average rank); nan if n < 2 or
    one of them is constant."""
    def ranks(x):
        x = x.detach().flatten().double().cpu()
        order = torch.argsort(x, stable=True)
        r = torch.empty_like(x)
        r[order] = torch.arange(x.numel(), dtype=torch.float64, device="cpu")
        _, inv, counts = torch.unique(x, return_inverse=True, return_counts=True)
        sums = torch.zeros(counts.numel(), dtype=torch.float64, device="cpu").index_add_(0, inv, r)
        return (sums / counts)[inv]
    if a.numel() < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def _under(name: str, heads) -> bool:
    """True if parameter/module ``name`` is one of the modules ``heads`` or inside one."""
    return any(name == h or name.startswith(h + ".") for h in heads)


def cls_branch(model: nn.Module) -> tuple[nn.Module, str, tuple[str, ...]]:
    """The module MTP copies as the classification network W1 (N1 of the paper, Eq. 1/7).

    Returns:
        ``(branch, rel, heads)``: ``branch`` is a submodule of ``model`` (or ``model`` itself),
        ``rel`` the prefix of its names inside ``model`` (``""`` for the model itself) and
        ``heads`` the names, relative to ``branch``, of the classification head modules (their
        parameters belong to W1 only and are not coupled to W3).

        * zoo models: ``(model.backbone, model.parts["backbone"], ("fc",))``; the copy's
          ``forward`` gives the class logits;
        * models with a ``cls_head`` attribute (a module name or a tuple of names, e.g. set by
          ``segprune.api``): ``(model, "", cls_head)``; the copy's ``forward_cls`` gives the logits.

    Raises:
        ValueError: neither ``model.cls_head`` nor ``model.backbone.fc`` exists.
    """
    heads = getattr(model, "cls_head", None)
    if heads:
        return model, "", (heads,) if isinstance(heads, str) else tuple(heads)
    if getattr(getattr(model, "backbone", None), "fc", None) is None:
        raise ValueError("MTP needs a classification head: model.backbone.fc is missing (for another network, "
                         "name the head and the classification data: segprune.api.prune_model(..., cls_head=, "
                         "cls_loader=))")
    return model.backbone, model.parts["backbone"], ("fc",)


class MTP:
    """State and update rules of MTP sparsity training for one segmentation model.

    Args:
        model: segmentation model with ``backbone`` (a module with ``fc``) and ``forward_cls``,
            or with ``cls_head`` + ``forward_cls`` (see :func:`cls_branch`); its parameters under
            ``parts["backbone"]`` are W3 and the rest (but the classification head) are W2.
        units: prunable units (``segprune.pruning.discover_units``); ℓ1 acts on their γ.
        cfg: the ``method:`` config section (lam, alpha1, alpha2, mu0, rho, mu_max, lr_seg,
            lr_cls, momentum, weight_decay, l1_mode, keep_copy; l1_schedule, l1_eps, l1_ramp,
            missing ones = the constant schedule; cls_weight, missing = 1: the weight of l_cls in
            the W1 step, 0 switches the classification loss off, an ablation of ours).
        total_steps: planned iterations T (for ``rho: auto`` and the ℓ1 schedule); None = unknown.
        budget, select, input_size, log: for the growing ℓ1 schedule (``methods.sparsity``): the
            pruning budget, ``select(scores, p, mode, min_channels)`` (the method's
            ``select_from_scores``), the FLOPs input size and a ``log(str)``. Without ``budget``
            or ``select`` the schedule is the paper's constant α.

    ℓ1 (``methods.sparsity``): α1 on γ1 (W1's backbone units, stepped by ``opt1`` with lr_cls), α2 on
    γ2 (the decoder units, ``opt23`` with lr_seg); in proximal mode these γ sit in momentum-free,
    decay-free parameter groups and are soft-thresholded after each step. With the growing schedule
    the channels planned for removal (R, ranked by the MTP scores γ1/γ2) get the growing term on γ1
    and γ2 *and on W3's copy γ3 of the backbone units* (no α on γ3: Eq. 9 has none), so that the
    network that is pruned (W3 + W2) loses exactly the channels MTP ranked lowest, at zero γ.

    Raises:
        ValueError: ``rho <= 1``, ``rho: auto`` without ``total_steps``, or a model without a
            classification head (:func:`cls_branch`).
    """

    def __init__(self, model: nn.Module, units: list[PruneUnit], cfg: dict, total_steps: int | None = None,
                 budget=None, select=None, input_size=None, log=None):
        if cfg["rho"] == "auto":
            if total_steps is None:
                raise ValueError("method.rho='auto' needs the planned number of iterations (total_steps)")
            self.rho = auto_rho(cfg["mu0"], cfg["mu_max"], int(total_steps * MU_REACH), cfg.get("update_every", 1))
        else:
            if float(cfg["rho"]) <= 1:
                raise ValueError(f"method.rho={cfg['rho']!r} must be > 1 (MTP paper, Eq. 10)")
            self.rho = float(cfg["rho"])
        branch, rel, heads = cls_branch(model)
        self.model, self.cfg = model, cfg
        #: weight of l_cls in the W1 step (``method.cls_weight``; 1 = Eq. 7; 0 = an ablation: no
        #: classification gradient, W1 then moves only by the coupling, ℓ1 and weight decay) [ours]
        self.cls_weight = float(cfg.get("cls_weight", 1.0))
        self.rel, self.heads = rel, heads
        self.w1 = copy.deepcopy(branch)
        #: class logits (N, K_cls) of W1 for images (N, C, h, w)
        self.forward_w1 = self.w1.forward_cls if branch is model else self.w1
        p1 = dict(self.w1.named_parameters())
        p3 = dict(branch.named_parameters())
        backbone = model.parts["backbone"]
        self.shared = [n for n in p1 if not _under(n, heads) and in_part(rel + n, backbone)]
        self.p1 = [p1[n] for n in self.shared]
        self.p3 = [p3[n] for n in self.shared]
        self.E = [torch.zeros_like(p) for p in self.p1]
        self.mu = float(cfg["mu0"])
        self.steps = 0
        w1_mods, mods = dict(self.w1.named_modules()), dict(model.named_modules())
        bb = [(b, u.name) for u in units if u.part == "backbone" for b in dict.fromkeys(u.bns)]
        dec = [(b, u.name) for u in units if u.part != "backbone" for b in dict.fromkeys(u.bns)]
        self.gamma1 = [w1_mods[b[len(rel):]].weight for b, _ in bb]
        self.gamma2 = [mods[b].weight for b, _ in dec]
        self.gamma3 = [mods[b].weight for b, _ in bb]   # W3's copy of γ1 (no ℓ1 in Eq. 9)
        self.units = units
        self.rank_digests: list | None = None  # several processes: per-rank digests (see run_mtp)
        mode, schedule = cfg.get("l1_mode", "proximal"), cfg.get("l1_schedule", "constant") or "constant"
        growing = schedule == "growing" and budget is not None and select is not None
        a1, a2, T = float(cfg["alpha1"]), float(cfg["alpha2"]), int(total_steps or 0)
        g1 = GammaGroup("w1", lr_sum(lambda t, n: linear_lr(float(cfg["lr_cls"]), t, n), T),
                        [PenalisedGamma(p, b, un, a1, "w1", coupled=True) for p, (b, un) in zip(self.gamma1, bb)])
        g23 = GammaGroup("seg", lr_sum(lambda t, n: poly_lr(float(cfg["lr_seg"]), t, n), T),
                         [PenalisedGamma(p, b, un, a2, "seg") for p, (b, un) in zip(self.gamma2, dec)]
                         + ([PenalisedGamma(p, b, un, 0.0, "seg", coupled=True) for p, (b, un) in zip(self.gamma3, bb)]
                            if growing else []))
        #: the ℓ1 term and its schedule (``methods.sparsity``), on γ1 / γ2 (and γ3 when growing)
        self.l1 = L1Sparsity([g1, g23], mode, schedule, T, budget=budget, units=units, scores=self.current_scores,
                             select=select, eps=float(cfg.get("l1_eps", 1e-3)), ramp=float(cfg.get("l1_ramp", 0.25)),
                             flops=(model, tuple(input_size or (64, 64))), log=log)
        seg_params = [p for n, p in model.named_parameters() if not _under(n, [rel + h for h in heads])]
        shared = set(self.shared)
        w1_params = [p for n, p in p1.items() if n in shared or _under(n, heads)]
        mom, wd = float(cfg["momentum"]), float(cfg["weight_decay"])
        self.opt1 = torch.optim.SGD(sgd_param_groups(w1_params, [m.param for m in g1.members], mom, wd, mode),
                                    lr=cfg["lr_cls"], momentum=mom, weight_decay=wd)
        self.opt23 = torch.optim.SGD(sgd_param_groups(seg_params, [m.param for m in g23.members], mom, wd, mode),
                                     lr=cfg["lr_seg"], momentum=mom, weight_decay=wd)
        dev = next(model.parameters()).device
        #: ``train.amp`` of the W1 step and of the W2/W3 step (``engine.amp``; fp16: one loss scale each)
        self.amp1, self.amp23 = Amp(dev), Amp(dev)

    # ---- Eq. 7 -----------------------------------------------------------------------
    def coupling_grad(self) -> list[torch.Tensor]:
        """∂/∂W1 of <E, W1 - W3> + μ/2 ||W1 - W3||²  =  E + μ (W1 - W3) (one tensor per shared parameter);
        ∂/∂W3 is minus this. The steps apply these terms in proximal form (:meth:`couple_`), whose
        fixed point is the same."""
        with torch.no_grad():
            diff = torch._foreach_sub([p.detach() for p in self.p1], [p.detach() for p in self.p3])
            torch._foreach_mul_(diff, self.mu)
            torch._foreach_add_(diff, self.E)
        return diff

    def step_w1(self, x: torch.Tensor, y: torch.Tensor, lr: float, run=ddp.direct, read: bool = True):
        """One SGD step of Eq. 7 on a classification batch x (N, 3, h, w), y (N,). Returns l_cls: a float
        (checked for NaN/inf before the step: :class:`NonFiniteLossError`), or with ``read=False`` a 0-d
        tensor on the device, this rank's share, unchecked (:func:`run_mtp` reads them every
        ``engine.train.READ_EVERY`` steps with ``engine.train.StepValues``).

        ``run``: how the forward is called (``engine.distributed.data_parallel`` over W1 in a
        multi-process run: ``backward`` then sums the gradients over ranks). Under ``train.amp`` the
        forward runs in autocast and, with fp16, the loss is scaled and the gradients are unscaled
        before the ℓ1 sub-gradient; a step that fp16 skips (inf/NaN gradient) skips the coupling and
        ℓ1 steps too, so the iteration leaves W1 unchanged."""
        self.w1.train()
        denom = ddp.global_count(y.numel())  # None in a single process
        with self.amp1.autocast():
            logits = run(self.forward_w1, x)
        if logits.dtype in (torch.float16, torch.bfloat16):  # mixed precision: the loss in float32
            logits = logits.float()
        if denom is None:
            loss = F.cross_entropy(logits, y)
        else:  # this rank's share of the global mean
            loss = ddp.share(F.cross_entropy(logits, y, reduction="sum"), denom)
        value = self._read(loss, read and denom is None, W1_STAGE)  # single process: checked before the step
        if self.cls_weight != 1.0:  # the ablation switch; the value reported stays l_cls
            loss = loss * self.cls_weight
        self.opt1.zero_grad(set_to_none=True)
        self.amp1.backward(loss, self.opt1)  # several processes: l_cls's gradients summed over ranks (DDP)
        if denom is not None:
            value = self._read(loss, read, W1_STAGE)
        self.l1.add_subgradients("w1")       # subgradient mode: α1 (+ growing term) · sign(γ1)
        set_lr(self.opt1, lr)
        if self.amp1.step(self.opt1, report=True):  # l_cls only: the momentum buffer never holds the coupling
            self.couple_(self.p1, self.p3, lr, +1.0)
            self.l1.prox("w1", lr, coupled_lr=lr / (1.0 + lr * self.mu))  # proximal mode: soft-threshold γ1
        return value

    def _read(self, loss: torch.Tensor, read: bool, stage: str):
        """``loss`` as a float summed over ranks and checked for NaN/inf (``read``; one host sync), else
        detached and left on the device."""
        if not read:
            return loss.detach()
        value = ddp.sum_values(loss.detach())[0]
        check_finite(value, stage, self.steps)
        return value

    def couple_(self, mine: list[torch.Tensor], other: list[torch.Tensor], lr: float, sign: float) -> None:
        """Proximal (implicit) step of the coupling terms of Eq. 6, <E, W1 - W3> + μ/2 ||W1 - W3||²,
        on one copy with the other fixed, in place:

            W ← argmin_V  1/(2 lr) ||V - W||² + μ/2 ||V - W_other||² + sign·<E, V>
              = (W + lr μ W_other - sign·lr E) / (1 + lr μ)

        (sign +1: W1 of Eq. 7; -1: W3 of Eq. 9). Unlike a gradient step, it is stable for every
        lr·μ and it is not filtered through the momentum buffer, which only holds the data gradient
        (measured in docs/methods.md: with momentum 0.9 the gradient form leaves ||W1 - W3|| / ||W3||
        8x larger on a toy). Tensors: the shared backbone parameters, any shape, same device as E."""
        with torch.no_grad():
            c = lr * self.mu
            torch._foreach_mul_(mine, 1.0 / (1.0 + c))
            torch._foreach_add_(mine, [o.detach() for o in other], alpha=c / (1.0 + c))
            torch._foreach_add_(mine, self.E, alpha=-sign * lr / (1.0 + c))

    # ---- Eqs. 8 and 9 (one shared segmentation forward/backward) --------------------------
    def step_w23(self, x: torch.Tensor, y: torch.Tensor, lr: float, ignore_index: int, run=ddp.direct,
                 read: bool = True):
        """One SGD step of Eq. 8 (W2) and Eq. 9 (W3) on a segmentation batch x (N,3,H,W), y (N,H,W).
        Returns l_seg. ``run``, ``read`` and mixed precision as in :meth:`step_w1` (here over the
        segmentation network)."""
        self.model.train()
        denom = seg_denominator(y, ignore_index)  # None in a single process
        with self.amp23.autocast():  # + weighted auxiliary-head losses, if the model has them
            seg = run(seg_loss, self.model, x, y, ignore_index, denom)
        value = self._read(seg, read and denom is None, W23_STAGE)  # single process: checked before the step
        loss = float(self.cfg["lam"]) * seg
        self.opt23.zero_grad(set_to_none=True)
        self.amp23.backward(loss, self.opt23)  # several processes: λ l_seg's gradients summed over ranks (DDP)
        if denom is not None:
            value = self._read(seg, read, W23_STAGE)
        self.l1.add_subgradients("seg")      # γ2 (α2 + growing term), γ3 (growing term only)
        set_lr(self.opt23, lr)
        if self.amp23.step(self.opt23, report=True):  # λ l_seg only
            self.couple_(self.p3, self.p1, lr, -1.0)
            self.l1.prox("seg", lr, coupled_lr=lr / (1.0 + lr * self.mu))
        return value

    # ---- Eq. 10 --------------------------------------------------------------------------
    def update_multipliers(self) -> None:
        """E ← E + μ (W1 - W3);  μ ← min(ρ μ, μ_max)   (MTP paper, Eq. 10)."""
        with torch.no_grad():
            diff = torch._foreach_sub([p.detach() for p in self.p1], [p.detach() for p in self.p3])
            torch._foreach_add_(self.E, diff, alpha=self.mu)
        self.mu = min(self.mu * self.rho, float(self.cfg["mu_max"]))

    def gap(self) -> float:
        """||W1 - W3||_2 over all shared backbone parameters."""
        with torch.no_grad():
            return math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(self.p1, self.p3)))

    def agreement(self) -> dict:
        """How far the constraint W1 = W3 (Eq. 5) is met: ``gap_rel`` = ||W1 - W3|| / ||W3|| over the
        shared backbone parameters, and ``spearman_gamma13``, the Spearman rank correlation of the
        backbone units' |γ1| (W1) with |γ3| (W3), channel by channel (mean over a unit's BNs)."""
        with torch.no_grad():
            d = torch._foreach_sub([p.detach() for p in self.p1], [p.detach() for p in self.p3])
            num = torch.stack([x.pow(2).sum() for x in d]).sum() if d else torch.zeros(())
            den = torch.stack([p.detach().pow(2).sum() for p in self.p3]).sum() if self.p3 else torch.zeros(())
            bb = [u for u in self.units if u.part == "backbone"]
            g1 = unit_gammas(self.model, bb, self.score_sources())
            g3 = unit_gammas(self.model, bb)
            rho = spearman(torch.cat([g1[u.name] for u in bb]), torch.cat([g3[u.name] for u in bb])) if bb else float("nan")
            gap, norm = math.sqrt(float(num)), math.sqrt(float(den))
        return {"gap_rel": gap / norm if norm > 0 else float("nan"), "spearman_gamma13": rho}

    def current_scores(self) -> dict[str, torch.Tensor]:
        """The MTP scores now (Algorithm 1, line 9): |γ1| of W1 for backbone units, |γ2| for the others."""
        return unit_gammas(self.model, self.units, self.score_sources())

    def sparsity(self, tol: float = 1e-3) -> dict:
        """Fraction of |γ| below ``tol`` for γ1 (W1 backbone units) and γ2 (decoder units)."""
        def frac(gs):
            n = sum(g.numel() for g in gs)
            return sum(int((g.detach().abs() < tol).sum()) for g in gs) / max(1, n)
        return {"gamma1_zero": frac(self.gamma1), "gamma2_zero": frac(self.gamma2)}

    def score_sources(self) -> dict[str, nn.Module]:
        """BN name (in the model) -> BN module to read γ from: W1 for backbone (Algorithm 1, line 9)."""
        w1_mods = dict(self.w1.named_modules())
        return {b: w1_mods[b[len(self.rel):]] for u in self.units if u.part == "backbone" for b in u.bns}

    def finalize(self) -> None:
        """Write the kept copy into the model: W1's head (``fc``) always, W1's shared params if keep_copy="w1"."""
        with torch.no_grad():
            for h in self.heads:
                self.model.get_submodule(self.rel + h).load_state_dict(self.w1.get_submodule(h).state_dict())
            if self.cfg["keep_copy"] == "w1":
                for a, b in zip(self.p3, self.p1):
                    a.copy_(b)


def run_mtp(model: nn.Module, units: list[PruneUnit], cls_loader, seg_loader, cfg: dict, ignore_index: int,
            log: StageLog, ckpt: StageCheckpoint | None = None, budget=None, select=None,
            input_size: tuple[int, int] | None = None) -> MTP:
    """Alternate Eqs. 7, 8+9 and 10 for ``cfg["epochs"]`` epochs of the segmentation loader.

    One iteration = one classification batch (W1 step) + one segmentation batch (W2/W3 step);
    the classification loader is cycled. Learning rates follow the paper's schedules: linear
    decay for the classification task, poly(0.9) for segmentation (App. 6.1). ``ckpt``: periodic
    in-stage checkpoint of W1, W2/W3, E, μ, the ℓ1 schedule, both optimisers and both data
    positions, restored if present (``engine.resume``). ``budget``/``select``/``input_size``: for
    the growing ℓ1 schedule (:class:`MTP`).
    """
    n_it = iters_per_epoch(seg_loader, cfg.get("max_iters_per_epoch"))
    total = n_it * int(cfg["epochs"])
    mtp = MTP(model, units, cfg, total_steps=total, budget=budget, select=select, input_size=input_size,
              log=log.write)
    cls_iter = ResumableCycle(cls_loader)
    seg = LoaderCursor(seg_loader)
    start_epoch, skip, lc, ls = 0, 0, 0.0, 0.0
    like = next(model.parameters())
    dev = like.device
    saved = ckpt.load(("mu", "steps", "epoch", "batch", "lc", "ls", "cls.epoch", "cls.batch"),
                      ("seg.gen", "rng.torch", "cls.gen")) if ckpt is not None else None
    if saved is not None:
        t, meta = saved
        src = str(ckpt.path)
        load_module_tensors("model", model, t, src)
        load_module_tensors("w1", mtp.w1, t, src)
        load_optimizer_tensors("opt1", mtp.opt1, t, src)
        load_optimizer_tensors("opt23", mtp.opt23, t, src)
        mtp.E = [t[f"E.{i}"].to(p.device).clone() for i, p in enumerate(mtp.p1)]
        mtp.l1.load_state_tensors({k[3:]: v for k, v in t.items() if k.startswith("l1.")}, src)
        mtp.mu, mtp.steps = float(meta["mu"]), int(meta["steps"])
        start_epoch, skip, lc, ls = int(meta["epoch"]), int(meta["batch"]), float(meta["lc"]), float(meta["ls"])
        seg.restore(t["seg.gen"])
        restore_rng(t, dev)  # dropout draws from the global generator (and the GPU's on a GPU)
        cls_iter.load("cls", t, meta)
        log.write(f"resumed from {src} at iteration {mtp.steps} (epoch {start_epoch + 1}, batch {skip})")
    # train.channels_last (engine/layout.py); several processes: global-batch BatchNorm statistics and dropout
    # masks, W1's and the segmentation network's gradients summed over ranks by one DistributedDataParallel each
    with training_layout(model, mtp.w1) as fmt, ddp.replicated(model, mtp.w1), ddp.data_parallel(mtp.w1) as run1, \
            ddp.data_parallel(model) as run23:
        for epoch in range(start_epoch, int(cfg["epochs"])):
            if epoch != start_epoch:
                skip, lc, ls = 0, 0.0, 0.0
            # the losses stay on the device, read every READ_EVERY steps and before every checkpoint
            acc = StepValues({"lc": W1_STAGE, "ls": W23_STAGE}, {"lc": lc, "ls": ls})
            bar = log.progress(n_it, f"{log.stage} ep {epoch + 1}/{cfg['epochs']}", initial=skip)
            for i, (x2, y2) in enumerate(seg.batches(epoch, skip), start=skip):
                if i >= n_it:
                    break
                x1, y1 = next(cls_iter)
                x1, y1, x2, y2 = ddp.to_device(x1, y1, x2, y2, like=like)  # CPU model: the same tensors
                x1, x2 = fmt(x1), fmt(x2)  # train.channels_last: NHWC images (else the same tensors)
                mtp.l1.update(mtp.steps)         # ℓ1 schedule: channels planned for removal, λ
                acc.add(mtp.steps, {
                    "lc": mtp.step_w1(x1, y1, linear_lr(cfg["lr_cls"], mtp.steps, total), run=run1, read=False),
                    "ls": mtp.step_w23(x2, y2, poly_lr(cfg["lr_seg"], mtp.steps, total), ignore_index, run=run23,
                                       read=False)})
                mtp.steps += 1
                if mtp.steps % int(cfg["update_every"]) == 0:
                    mtp.update_multipliers()
                bar.update(1)
                if ckpt is not None and ckpt.due(mtp.steps):
                    lc, ls = (acc.flush()[k] for k in ("lc", "ls"))  # losses checked before anything is saved
                    ct, cm = cls_iter.state("cls")
                    ckpt.save({**module_tensors("model", model), **module_tensors("w1", mtp.w1),
                               **optimizer_tensors("opt1", mtp.opt1), **optimizer_tensors("opt23", mtp.opt23),
                               **{f"E.{i}": e for i, e in enumerate(mtp.E)}, "seg.gen": seg.epoch_state,
                               **{f"l1.{k}": v for k, v in mtp.l1.state_tensors().items()},
                               **rng_state(dev), **ct},
                              {"mu": mtp.mu, "steps": mtp.steps, "epoch": epoch, "batch": i + 1, "lc": lc, "ls": ls, **cm})
                fault_point(log.stage, mtp.steps)
            bar.close()
            lc, ls = (acc.flush()[k] for k in ("lc", "ls"))
            sp, ag = mtp.sparsity(), mtp.agreement()
            lam = " ".join(f"lambda_{n} {v:.3g}" for n, v in mtp.l1.lam.items()) if mtp.l1.schedule == "growing" else ""
            log.write(f"epoch {epoch + 1}: l_cls {lc / max(1, n_it):.4f} l_seg {ls / max(1, n_it):.4f} "
                      f"mu {mtp.mu:.4g} ||W1-W3|| {mtp.gap():.4f} ||W1-W3||/||W3|| {ag['gap_rel']:.4g} "
                      f"spearman(γ1,γ3) {ag['spearman_gamma13']:.4f} zero-γ1 {sp['gamma1_zero']:.3f} "
                      f"zero-γ2 {sp['gamma2_zero']:.3f}" + (f" {lam}" if lam else ""))
    if ddp.active():  # E and μ (and the replicas) must agree bitwise on every rank
        mtp.rank_digests = ddp.gather_object({
            "rank": ddp.rank(), "mu": mtp.mu, "E": ddp.state_digest(mtp.E), "W1": ddp.state_digest(mtp.w1.state_dict().values()),
            "model": ddp.state_digest(model.state_dict().values())})
        same = all({k: v for k, v in d.items() if k != "rank"} == {k: v for k, v in mtp.rank_digests[0].items() if k != "rank"}
                   for d in mtp.rank_digests)
        log.write(f"E and mu {'identical' if same else 'DIFFER'} on the {ddp.world()} ranks (digest of E "
                  f"{mtp.rank_digests[0]['E']}, mu {mtp.mu:.6g})")
    mtp.finalize()
    return mtp


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@register_method
class MultiTaskPruning(PruningMethod):
    """MTP as a :class:`~segprune.methods.base.PruningMethod` (``method.name: mtp``).

    :meth:`train` runs the sparsity training of Eqs. 5-10 (:func:`run_mtp`); :meth:`scores` returns
    the scaling factors the paper ranks by (Algorithm 1, line 9): |γ1| of the classification copy
    W1 for backbone units and |γ2| of the decoder W2 for the others (mean over a unit's
    BatchNorms), thresholded per part ("ind") or globally ("uni") by :meth:`select_from_scores`.
    The network that is pruned is W2 + W3 (``keep_copy="w3"``) or W2 + W1's backbone
    (``keep_copy="w1"``), see :class:`MTP`.

    Config keys (``method:``): :data:`MTP_CONFIG_KEYS`. Needs a classification task
    (:attr:`needs_classification`): a network with a classification head and a classification loader.
    """

    name = "mtp"
    per_layer = False
    needs_classification = True
    config_keys = MTP_CONFIG_KEYS
    FINGERPRINT_DEFAULTS = {"cls_weight": 1.0}  # runs made before the key existed keep their fingerprints
    legacy_state_file = "scores.safetensors"  # run folders written before MTP was a PruningMethod

    def __init__(self, cfg, input_size: tuple[int, int] | None = None):
        super().__init__(cfg, input_size)
        self._scores: dict[str, torch.Tensor] | None = None

    @classmethod
    def validate_config(cls, c) -> list[str]:
        """MTP's own checks: λ, lr_cls, μ0 > 0; α1, α2 >= 0; ρ > 1 (Eq. 10) or 'auto'; μ_max >= μ0 and
        max(lr_seg, lr_cls)·μ_max < 1 (else the coupling step μ/2 ||W1 - W3||² diverges);
        update_every a positive integer; keep_copy 'w1' or 'w3'."""
        bad = []

        def need(cond, key, msg):
            if not cond:
                bad.append(f"method.{key}={c[key]!r}: {msg}")
        for key in ("lr_cls", "lam", "mu0"):
            need(_num(c[key]) and c[key] > 0, key, "must be > 0")
        for key in ("alpha1", "alpha2"):
            need(_num(c[key]) and c[key] >= 0, key, "must be >= 0")
        need(c["rho"] == "auto" or (_num(c["rho"]) and c["rho"] > 1), "rho",
             "must be > 1 (MTP paper, Eq. 10) or 'auto' (mu reaches mu_max at the last multiplier update)")
        need(_num(c["mu_max"]) and _num(c["mu0"]) and c["mu_max"] >= c["mu0"], "mu_max", "must be >= mu0")
        if _num(c["mu_max"]) and _num(c["lr_seg"]) and _num(c["lr_cls"]):
            need(max(c["lr_seg"], c["lr_cls"]) * c["mu_max"] < 1.0, "mu_max",
                 "lr * mu_max must stay < 1 or the coupling step mu/2||W1-W3||^2 diverges")
        need(_num(c["update_every"]) and isinstance(c["update_every"], int) and c["update_every"] > 0, "update_every",
             "must be a positive integer")
        need(c["keep_copy"] in ("w1", "w3"), "keep_copy", "must be 'w1' or 'w3'")
        need(_num(c.get("cls_weight", 1.0)) and c.get("cls_weight", 1.0) >= 0, "cls_weight",
             "must be a number >= 0 (weight of l_cls in Eq. 7; 1 = the paper, 0 = classification loss off)")
        return bad

    @classmethod
    def trains_for_budget(cls, cfg) -> bool:
        """The growing ℓ1 schedule trains for the budget (``methods.sparsity``)."""
        return MethodConfig(cfg, cls.name, tuple(cls.config_keys))["l1_schedule"] == "growing"

    def train(self, model: nn.Module, units: list[PruneUnit], seg_loader, cls_loader, ignore_index: int, log,
              ckpt=None, budget=None) -> dict:
        """Sparsity training of Eqs. 5-10 (:func:`run_mtp`), in place; the kept copy is written into
        ``model`` and the scores (γ1 of W1, γ2 of W2) are kept for :meth:`scores`.

        ``budget`` (``segprune.algorithm.Budget`` or None): the growing ℓ1 schedule drives the
        channels that :meth:`select_from_scores` removes at this budget to zero (None: the
        paper's constant α1, α2).

        Returns:
            {"mu", "rho", "gap" (||W1 - W3||), "gap_rel" (||W1 - W3|| / ||W3||), "spearman_gamma13"
            (rank correlation of |γ1| with |γ3| over the backbone channels), "gamma1_zero",
            "gamma2_zero", "steps", "gamma_quantiles" (10/50/90 % of the scores), "l1" (the ℓ1
            schedule's record, ``methods.sparsity.L1Sparsity.summary``)} and, with several
            processes, "rank_digests" (E, μ, W1 and model digests of every rank).

        Raises:
            ValueError: no classification head (:func:`cls_branch`) or no ``cls_loader``.
            NonFiniteLossError: NaN/inf loss.
        """
        if cls_loader is None:
            raise ValueError("MTP needs classification batches (cls_loader) for the W1 step (Eq. 7)")
        if current_amp() != "off":
            log.write(f"mtp: train.amp={current_amp()}: the W1 and W2/W3 forward passes run in autocast; "
                      "weights, γ, E, μ and BatchNorm statistics stay float32")
        mtp = run_mtp(model, units, cls_loader, seg_loader, self.cfg, ignore_index, log, ckpt=ckpt, budget=budget,
                      select=lambda s, p, mode, mc: self.select_from_scores(s, units, p, mode, mc),
                      input_size=self.input_size)
        self._scores = {k: v.detach().clone() for k, v in unit_gammas(model, units, mtp.score_sources()).items()}
        ag = mtp.agreement()
        l1 = mtp.l1.summary()
        info = {"mu": mtp.mu, "rho": mtp.rho, "gap": mtp.gap(), **ag, **mtp.sparsity(), "steps": mtp.steps,
                "gamma_quantiles": gamma_quantiles(self._scores), "l1": l1}
        msg = (f"mtp: mu {mtp.mu:.4g} (rho {mtp.rho:.6g}), ||W1-W3||/||W3|| {ag['gap_rel']:.4g}, "
               f"spearman(γ1,γ3) {ag['spearman_gamma13']:.4f}, l1 {l1['l1_mode']} {l1['l1_schedule']}")
        if l1["l1_schedule"] == "growing":
            msg += f", keep ratio {l1['keep_ratio']:.4f}: " + "; ".join(
                f"{n}: {g['planned_removed']} γ planned for removal, {100 * (g['removed_below_eps'] or 0):.1f}% below "
                f"eps {g['eps']:.3g}, lambda {g['lambda']:.4g}" for n, g in l1["groups"].items())
        log.write(msg)
        if mtp.rank_digests is not None:  # several processes: E, μ, W1, model digests of every rank
            info["rank_digests"] = mtp.rank_digests
        return info

    def scores(self, model: nn.Module, units: list[PruneUnit], calib_loader=None) -> dict[str, torch.Tensor]:
        """Unit name -> |γ| (C,): γ1 of W1 for backbone units, γ2 of the model for the others
        (Algorithm 1, line 9), as recorded at the end of :meth:`train` (or :meth:`load_trained_state`).

        Raises:
            RuntimeError: neither :meth:`train` nor :meth:`load_trained_state` ran (W1's γ are
                known only from the sparsity training).
        """
        if self._scores is None:
            raise RuntimeError("MTP scores are the γ of its sparsity training (W1 for the backbone): run train() "
                               "or load_trained_state() first")
        return {u.name: self._scores[u.name] for u in units}

    def gamma_record(self, model: nn.Module, units: list[PruneUnit]) -> dict[str, torch.Tensor]:
        """The scores (|γ1| of W1 for the backbone, |γ2| for the decoder)."""
        return self.scores(model, units)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Unit name -> score (C,) (:meth:`scores`), {} before :meth:`train`."""
        return dict(self._scores or {})

    def load_trained_state(self, model: nn.Module, units: list[PruneUnit], tensors: dict[str, torch.Tensor],
                           source: str) -> None:
        """Use stored scores (a run resumed after its sparsity stage).

        Raises:
            CheckpointError: a unit missing or of another width (names ``source``).
        """
        for u in units:
            t = tensors.get(u.name)
            if t is None or t.numel() != u.channels:
                raise CheckpointError(f"{source}: MTP scores of unit {u.name} "
                                      + ("missing" if t is None else f"have {t.numel()} values, the unit has "
                                                                     f"{u.channels} channels"))
        self._scores = {u.name: tensors[u.name].clone() for u in units}
