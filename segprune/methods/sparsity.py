"""ℓ1 sparsity on BatchNorm scaling factors γ, shared by the γ methods (MTP, Network Slimming, CAP).

Each of these methods adds a penalty Σ_c w_c |γ_c| to its training loss (MTP paper Eq. 4: α1‖γ1‖₁ +
α2‖γ2‖₁; Network Slimming, Liu et al. ICCV 2017, Eq. 1: λ Σ|γ|; CAP: the same with a per-channel
context guidance g_c) and later removes the channels of smallest |γ|. This module holds the two
pieces they share, so that the three methods differ only in their criterion (which γ, which loss,
which per-channel multiplier):

**1. The ℓ1 step** (``method.l1_mode``).

* ``proximal`` (default): the penalised γ get their own optimizer parameter group with *no momentum
  and no weight decay* (:func:`sgd_param_groups`); after each SGD step they are soft-thresholded,
  ``γ ← sign(γ)·max(|γ| − lr·w, 0)`` (the proximal map of lr·w·|γ|: ISTA, Beck & Teboulle 2009).
  Where the data gradient is zero, γ_t = sign(γ_0)·max(|γ_0| − Σ_τ lr_τ·w_τ, 0) exactly, and a γ at
  exactly 0 stays at 0 as long as |∂l/∂γ| ≤ w (the optimality condition of the ℓ1 problem).
  Why not the momentum group: the heavy-ball buffer amplifies the data gradient by up to 1/(1−m)
  (10× at m = 0.9) but not the threshold applied after the step, and it keeps pushing a γ that the
  threshold set to zero back off zero; weight decay would add an ℓ2 term to the ℓ1 one.
* ``subgradient``: ``w·sign(γ)`` is added to ∂l/∂γ before an ordinary momentum-SGD step, as Network
  Slimming's code and Torch-Pruning do. It never produces exact zeros: a γ near zero oscillates
  with an amplitude of about lr·w/(1 − m). Kept for comparison (docs/methods.md, "ℓ1 step").

**2. The penalty schedule** (``method.l1_schedule``).

* ``constant``: ``w_c = α·g_c`` for every penalised γ (α = the method's ``alpha``/``alpha1``/``alpha2``,
  g_c = 1 but for CAP): the papers' objective.
* ``growing`` [ours, after growing regularisation, Wang et al., "Neural Pruning via Growing
  Regularization", ICLR 2021, and Torch-Pruning's ``GrowingRegPruner``]: the channels that the prune
  step *would remove if it ran now* get an extra penalty that grows until their γ are zero::

      w_c(t) = g_c · (α + λ_G(t) · 1[c ∈ R(t)])

  - R(t): every ``every`` steps, the complement of the method's own selection at the budget,
    ``round_kept(method.select_from_scores(scores(t), units, p, threshold_mode, min_channels),
    scores(t), round_to)``, on the method's *current* scores (MTP: |γ1| of W1 for the backbone,
    |γ2| for the decoder; Slimming and CAP: |γ|). The criterion of each method therefore still
    decides which channels go; the schedule only makes sure that they are gone (γ = 0) before removal.
  - λ_G per γ group G (the γ one optimizer steps; MTP has two: W1's with lr_cls, the segmentation
    network's with lr_seg): 0 during the *criterion phase*, the first :data:`CRITERION_PHASE` = ½ of
    the ramp (T_c = ½·l1_ramp·T steps: only the method's own objective acts, so its loss, not the
    initial |γ|, orders the channels); then λ0 = c0·γ̄_G / S_G (γ̄_G the group's mean |γ| before
    training, S_G = Σ_t lr_t over the planned steps, c0 = :data:`LAMBDA0_SHRINK` = 1 %: held alone,
    λ0 would shrink the mean γ by 1 % over the whole training), multiplied by
    ρ = :data:`GROWTH` ** (1 / (l1_ramp·T − T_c)) per step while some γ of R in the group exceeds
    ε_G = ``l1_eps``·γ̄_G; it is held once they are all below ε_G and grows again if one comes back.
    With 10⁴× growth over the second half of the ramp (default l1_ramp 0.25), R reaches exact zero
    near the end of the ramp (session-9 demo, 160 steps: step 39), and the remaining steps let the kept channels
    take over while R is held at zero. Everything is relative to γ̄ and Σ lr, so no α needs tuning
    per dataset or learning rate.
  - p: the budget's keep ratio. Under a FLOPs target the keep ratio is not known before training:
    it is estimated by the same bisection as the prune step (``pruning.search.search_keep_ratio``)
    on the current scores, at steps 0, T/10, 2T/10, ... up to the end of the ramp, and held after.
  - No budget (``budget=None``, e.g. a method called outside the core): the constant schedule.

Shapes: every γ is a BatchNorm weight (C,); scores and R masks are per unit (C,). Everything stays on
the γ's device; the selection (every ``every`` steps) reads the scores on the CPU.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..engine.train import LoopState
from ..pruning.groups import PruneUnit
from ..pruning.thresholds import round_kept

__all__ = ["L1_MODES", "L1_SCHEDULES", "SPARSITY_CONFIG_KEYS", "GROWTH", "LAMBDA0_SHRINK", "CRITERION_PHASE",
           "soft_threshold_",
           "add_l1_subgradient_", "sgd_param_groups", "make_sgd_with_gammas", "PenalisedGamma", "GammaGroup",
           "L1Sparsity", "StateBundle", "sparsity_config_problems", "lr_sum", "gamma_quantiles", "bn_params",
           "l1_from_config"]

L1_MODES = ("proximal", "subgradient")
L1_SCHEDULES = ("constant", "growing")
#: the ``method:`` keys of the shared machinery (declared by every γ method)
SPARSITY_CONFIG_KEYS = ("l1_mode", "l1_schedule", "l1_eps", "l1_ramp")
#: factor by which λ grows over the ramp (``l1_ramp`` of the training), [ours]
GROWTH = 1e4
#: λ0 held over the whole training would shrink the group's mean |γ| by this fraction, [ours]
LAMBDA0_SHRINK = 1e-2
#: fraction of the ramp during which λ = 0 (the criterion phase: only the method's own objective acts
#: on the γ, so that its loss, not the initial |γ|, orders the channels), [ours]
CRITERION_PHASE = 0.5


def soft_threshold_(gammas: list[torch.Tensor], thresholds) -> None:
    """In place: γ ← sign(γ)·max(|γ| − t, 0), the proximal map of t·|γ| (ISTA).

    Args:
        gammas: tensors (C,) (parameters; updated under ``no_grad``).
        thresholds: one float for all, or one float / tensor (C,) (>= 0) per γ.
    """
    if not isinstance(thresholds, (list, tuple)):
        thresholds = [thresholds] * len(gammas)
    with torch.no_grad():
        for g, t in zip(gammas, thresholds):
            if isinstance(t, (int, float)) and t <= 0:
                continue
            g.copy_(torch.sign(g) * torch.clamp(g.abs() - t, min=0.0))


def add_l1_subgradient_(gammas: list[torch.Tensor], weights) -> None:
    """``γ.grad += w·sign(γ)`` (sub-gradient of w·|γ|; Network Slimming, Liu et al. 2017, Eq. 1).

    Args:
        gammas: parameters (C,); a missing ``.grad`` is created as zeros.
        weights: one float for all, or one float / tensor (C,) per γ.
    """
    if not isinstance(weights, (list, tuple)):
        weights = [weights] * len(gammas)
    for g, w in zip(gammas, weights):
        if isinstance(w, (int, float)) and w <= 0:
            continue
        if g.grad is None:
            g.grad = torch.zeros_like(g)
        g.grad.add_(w * torch.sign(g.detach()))


def sgd_param_groups(params, penalised: list[torch.Tensor], momentum: float, weight_decay: float,
                     mode: str) -> list[dict]:
    """Optimizer parameter groups for a sparsity training.

    ``proximal``: group 0 = every parameter of ``params`` that requires grad except ``penalised``
    (given ``momentum`` and ``weight_decay``); group 1 = ``penalised`` with momentum 0 and weight decay 0
    (a proximal ℓ1 step after a heavy-ball step is not ISTA, see the module docstring).
    ``subgradient``: one group with everything (Network Slimming's practice). Empty groups are dropped.

    Raises:
        ValueError: unknown ``mode``.
    """
    if mode not in L1_MODES:
        raise ValueError(f"method.l1_mode={mode!r} must be one of {', '.join(L1_MODES)}")
    pen = {id(p) for p in penalised}
    params = [p for p in params if p.requires_grad]
    if mode == "subgradient":
        return [{"params": params, "momentum": momentum, "weight_decay": weight_decay}]
    rest = [p for p in params if id(p) not in pen]
    own = [p for p in params if id(p) in pen]
    groups = [{"params": rest, "momentum": momentum, "weight_decay": weight_decay}]
    if own:
        groups.append({"params": own, "momentum": 0.0, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def make_sgd_with_gammas(params, penalised: list[torch.Tensor], lr: float, momentum: float, weight_decay: float,
                         mode: str) -> torch.optim.SGD:
    """``torch.optim.SGD`` over :func:`sgd_param_groups` (``lr`` for every group)."""
    return torch.optim.SGD(sgd_param_groups(params, penalised, momentum, weight_decay, mode), lr=lr,
                           momentum=momentum, weight_decay=weight_decay)


def lr_sum(schedule: Callable[[int, int], float], total: int) -> float:
    """Σ_{t<total} schedule(t, total): the sum of the learning rates of a planned training."""
    return float(sum(schedule(t, total) for t in range(int(total))))


def gamma_quantiles(scores: dict[str, torch.Tensor], qs=(0.1, 0.5, 0.9)) -> dict[str, float]:
    """Quantiles of all values of ``scores`` (unit -> (C,)), as {"q10": ..., ...}."""
    if not scores:
        return {}
    v = torch.cat([s.detach().flatten().double().cpu() for s in scores.values()])
    return {f"q{int(round(q * 100))}": float(torch.quantile(v, q)) for q in qs}


@dataclass
class PenalisedGamma:
    """One penalised γ: the BN weight (C,), its unit (for R), its base α and its γ group."""

    param: torch.Tensor
    bn: str
    unit: str
    alpha: float
    group: str
    #: also under a proximal coupling step (MTP's W1 = W3), see :meth:`L1Sparsity.prox`
    coupled: bool = False


@dataclass
class GammaGroup:
    """The penalised γ one optimizer steps with one learning rate (λ is per group).

    Attributes:
        name: e.g. "seg" (Slimming, CAP, MTP's W2/W3) or "w1" (MTP's classification copy).
        lr_total: Σ_t lr_t over the planned steps of that optimizer (λ0 = c0·γ̄ / lr_total).
    """

    name: str
    lr_total: float
    members: list[PenalisedGamma] = field(default_factory=list)


class StateBundle(LoopState):
    """Several :class:`LoopState` under key prefixes ("<name>.<key>"), for ``train_loop``'s ``extra``."""

    def __init__(self, **parts: LoopState):
        self.parts = {k: v for k, v in parts.items() if v is not None}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{n}.{k}": v for n, s in self.parts.items() for k, v in s.state_tensors().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        for n, s in self.parts.items():
            s.load_state_tensors({k[len(n) + 1:]: v for k, v in tensors.items() if k.startswith(n + ".")}, source)


class L1Sparsity(LoopState):
    """The ℓ1 term on the penalised γ of a sparsity training: its step and its schedule.

    Call, in every training iteration ``it`` (0-based, counted over the whole stage):
    :meth:`update` (``it``) before the forward pass, :meth:`add_subgradients` (group) after the
    backward pass (``subgradient`` mode), :meth:`prox` (group, lr) after that group's optimizer step
    (``proximal`` mode). Build the optimizers with :func:`sgd_param_groups` so the penalised γ of
    the proximal mode have no momentum and no weight decay.

    Args:
        groups: the penalised γ, by optimizer (:class:`GammaGroup`).
        mode: "proximal" or "subgradient".
        schedule: "constant" or "growing" (module docstring); "growing" without ``budget`` or
            without ``scores`` falls back to "constant".
        total_steps: T, the planned number of iterations.
        budget: ``segprune.algorithm.Budget`` (keep_ratio, target_flops_ratio, flops_tolerance,
            threshold_mode, min_channels, round_to) or None.
        units: the prunable units.
        scores: ``scores() -> {unit: (C,)}``, the method's current importances (larger = kept).
        select: ``select(scores, p, mode, min_channels) -> {unit: kept indices}``, the method's
            ``select_from_scores`` bound to ``units``.
        eps: relative ε (``l1_eps``): R counts as zero when max |γ_R| <= eps·γ̄_G.
        ramp: fraction of T over which λ grows by :data:`GROWTH` (``l1_ramp``, in (0, 1]).
        multiplier: optional ``multiplier(bn) -> (C,) tensor or None``, a per-channel factor g_c on
            the whole penalty (CAP's guidance); None = 1.
        flops: ``(model, input_size)`` for the FLOPs-target estimate of the keep ratio.
        log: optional ``log(str)``.

    Raises:
        ValueError: unknown mode/schedule, ``eps <= 0``, ``ramp`` outside (0, 1].
    """

    def __init__(self, groups: list[GammaGroup], mode: str, schedule: str, total_steps: int, budget=None,
                 units: list[PruneUnit] | None = None, scores: Callable[[], dict[str, torch.Tensor]] | None = None,
                 select: Callable | None = None, eps: float = 1e-3, ramp: float = 0.25,
                 multiplier: Callable[[str], torch.Tensor | None] | None = None, flops=None, log=None):
        if mode not in L1_MODES:
            raise ValueError(f"method.l1_mode={mode!r} must be one of {', '.join(L1_MODES)}")
        if schedule not in L1_SCHEDULES:
            raise ValueError(f"method.l1_schedule={schedule!r} must be one of {', '.join(L1_SCHEDULES)}")
        if not float(eps) > 0:
            raise ValueError(f"method.l1_eps={eps!r} must be > 0")
        if not 0.0 < float(ramp) <= 1.0:
            raise ValueError(f"method.l1_ramp={ramp!r} must lie in (0, 1]")
        self.groups = {g.name: g for g in groups}
        self.mode, self.requested = mode, schedule
        self.schedule = schedule if (budget is not None and scores is not None and select is not None) else "constant"
        if self.schedule == "growing" and mode != "proximal":
            raise ValueError(GROWING_NEEDS_PROXIMAL)
        self.total = int(total_steps)
        self.budget, self.units, self._scores, self._select = budget, units or [], scores, select
        self.eps_rel, self.ramp = float(eps), float(ramp)
        self.multiplier, self.flops, self.log = multiplier, flops, log
        self.every = max(1, self.total // 200)
        #: first step of the budget phase: before it λ = 0 (the criterion phase, only α acts)
        self.start_step = int(CRITERION_PHASE * self.ramp * self.total)
        self.rho = GROWTH ** (1.0 / max(1.0, self.ramp * self.total - self.start_step))
        self.started = False
        self.lam = {n: 0.0 for n in self.groups}
        self.lam0 = {n: 0.0 for n in self.groups}
        self.gbar = {n: 0.0 for n in self.groups}
        self.keep_ratio: float | None = None
        self.removal: dict[str, torch.Tensor] = {}      # unit -> bool (C,): planned for removal now
        self.clean_at: dict[str, int | None] = {n: None for n in self.groups}
        self._weights: dict[str, list] = {}             # group -> per-member w (float or (C,) tensor)
        self._reweight()

    # ---- what the training loop calls -----------------------------------------------------------
    def update(self, it: int) -> None:
        """Start of iteration ``it``: on the first call, measure γ̄ and λ0 (and the keep ratio);
        every ``every`` steps (growing schedule), recompute R and grow or hold λ."""
        if not self.started:
            self._start()
        if self.schedule != "growing" or it % self.every:
            return
        if self.budget.target_flops_ratio is not None and it <= self.ramp * self.total:
            tenth = max(1, self.total // 10)
            if it % tenth < self.every:                      # about every T/10 steps, and at step 0
                self._estimate_keep_ratio(it)
        self._plan_removal()
        if it < self.start_step:                            # criterion phase: the method's own objective
            return
        for name, grp in self.groups.items():
            worst = self._max_removed(grp)
            if worst > self.eps_rel * self.gbar[name]:
                if self.lam[name] == 0.0:                   # first step of the budget phase
                    self.lam[name] = self.lam0[name]
                else:
                    self.lam[name] *= self.rho ** self.every
                if self.clean_at[name] is not None:
                    self.clean_at[name] = None
            elif self.clean_at[name] is None:
                self.clean_at[name] = it
                if self.log is not None:
                    self.log(f"l1 {name}: the {self._n_removed(grp)} γ planned for removal are below "
                             f"eps {self.eps_rel * self.gbar[name]:.3g} at step {it} (lambda {self.lam[name]:.4g})")
        self._reweight()

    def add_subgradients(self, group: str) -> None:
        """``subgradient`` mode: add w·sign(γ) to the γ gradients of ``group`` (after backward)."""
        if self.mode != "subgradient" or group not in self.groups:
            return
        grp = self.groups[group]
        add_l1_subgradient_([m.param for m in grp.members], self._effective(group))

    def prox(self, group: str, lr: float, coupled_lr: float | None = None) -> None:
        """``proximal`` mode: soft-threshold the γ of ``group`` by lr·w (after its optimizer step).

        ``coupled_lr``: the step of the members marked ``coupled`` when a proximal quadratic term
        was applied to them just before (MTP's coupling, μ: lr / (1 + lr μ); the prox of quadratic +
        ℓ1 is the quadratic's prox followed by the soft-threshold at that reduced step)."""
        if self.mode != "proximal" or group not in self.groups or lr <= 0:
            return
        grp = self.groups[group]
        w = self._effective(group)
        steps = [coupled_lr if (coupled_lr is not None and m.coupled) else lr for m in grp.members]
        soft_threshold_([m.param for m in grp.members], [x * s for x, s in zip(w, steps)])

    # ---- internals ------------------------------------------------------------------------------
    def _start(self) -> None:
        self.started = True
        for name, grp in self.groups.items():
            n = sum(m.param.numel() for m in grp.members)
            gbar = float(sum(m.param.detach().abs().sum() for m in grp.members)) / max(1, n) if n else 0.0
            self.gbar[name] = gbar
            if self.schedule == "growing" and grp.lr_total > 0:
                self.lam0[name] = LAMBDA0_SHRINK * gbar / grp.lr_total
        if self.schedule == "growing" and self.budget.target_flops_ratio is None:
            self.keep_ratio = float(self.budget.keep_ratio)

    def _estimate_keep_ratio(self, it: int) -> None:
        from ..pruning.search import search_keep_ratio
        model, size = self.flops
        scores = self._cpu_scores()
        b = self.budget
        # the search traces and counts copies of the network: a copy without the training's forward
        # hooks (CAP's guides would record the probes) and whose BN statistics the counting cannot move
        model = copy.deepcopy(model)
        for mod in model.modules():
            mod._forward_hooks.clear()
            mod._forward_pre_hooks.clear()
        res = search_keep_ratio(model, self.units,
                                lambda p: round_kept(self._select(scores, p, b.threshold_mode, b.min_channels),
                                                     scores, b.round_to),
                                float(b.target_flops_ratio), float(b.flops_tolerance), tuple(size))
        self.keep_ratio = float(res["keep_ratio_found"])
        if self.log is not None:
            self.log(f"l1: FLOPs target {b.target_flops_ratio:g}: keep ratio {self.keep_ratio:.4f} on the scores at "
                     f"step {it} (FLOPs ratio {res['flops_ratio_achieved']:.4f})")

    def _cpu_scores(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu() for k, v in self._scores().items()}

    def _plan_removal(self) -> None:
        scores = self._cpu_scores()
        b = self.budget
        kept = round_kept(self._select(scores, self.keep_ratio, b.threshold_mode, b.min_channels), scores, b.round_to)
        removal = {}
        for u in self.units:
            mask = torch.ones(u.channels, dtype=torch.bool, device="cpu")
            mask[kept[u.name]] = False
            removal[u.name] = mask
        self.removal = removal

    def _mask(self, m: PenalisedGamma) -> torch.Tensor | None:
        """R of ``m``'s unit on γ's device, None when nothing of it is planned for removal."""
        r = self.removal.get(m.unit)
        if r is None or not bool(r.any()):          # the masks live on the CPU: no device sync
            return None
        return r.to(m.param.device)

    def _max_removed(self, grp: GammaGroup) -> float:
        """max |γ| over the members' channels planned for removal (0 when none), one device sync."""
        vals = []
        for m in grp.members:
            r = self._mask(m)
            if r is not None:
                vals.append(m.param.detach().abs()[r].max())
        return float(torch.stack(vals).max()) if vals else 0.0

    def _n_removed(self, grp: GammaGroup) -> int:
        return sum(int(self.removal[m.unit].sum()) for m in grp.members if m.unit in self.removal)

    def _reweight(self) -> None:
        """Per member: w = α + λ_G·1[R] (float when uniform, else a tensor (C,) on γ's device)."""
        out = {}
        for name, grp in self.groups.items():
            lam = self.lam[name]
            ws = []
            for m in grp.members:
                r = self._mask(m) if lam > 0 else None
                if r is None:
                    ws.append(float(m.alpha))
                else:
                    ws.append(m.alpha + lam * r.to(m.param.dtype))
            out[name] = ws
        self._weights = out

    def _effective(self, group: str) -> list:
        ws = self._weights[group]
        if self.multiplier is None:
            return ws
        out = []
        for m, w in zip(self.groups[group].members, ws):
            g = self.multiplier(m.bn)
            out.append(w if g is None else w * g.to(m.param.dtype))
        return out

    def weights(self, group: str) -> list:
        """The current penalty weights w (float or (C,)) of the members of ``group``, before ``multiplier``."""
        return list(self._weights[group])

    # ---- records --------------------------------------------------------------------------------
    def summary(self) -> dict:
        """JSON-able record for the sparsity stage's done.json.

        Keys: l1_mode, l1_schedule, keep_ratio (the one R was planned at; None for the constant
        schedule), budget_phase_from_step (growing: the first step with λ > 0), per group: lambda, lambda0, eps (absolute), clean_at_step (first step from
        which all γ planned for removal stayed below eps; None if never), planned_removed, removed_below_eps
        (fraction), removed_max_gamma, kept_median_gamma.
        """
        out: dict = {"l1_mode": self.mode, "l1_schedule": self.schedule, "keep_ratio": self.keep_ratio, "groups": {}}
        if self.schedule == "growing":
            out["budget_phase_from_step"] = self.start_step
        if self.requested != self.schedule:
            out["l1_schedule_requested"] = self.requested
        if self.schedule == "growing" and self.started:
            self._plan_removal()
        for name, grp in self.groups.items():
            rem, kept = [], []
            for m in grp.members:
                a = m.param.detach().abs().float().cpu()
                r = self.removal.get(m.unit)
                if r is None:
                    kept.append(a)
                else:
                    rem.append(a[r])
                    kept.append(a[~r])
            rem_t = torch.cat(rem) if rem else torch.zeros(0, device="cpu")
            kept_t = torch.cat(kept) if kept else torch.zeros(0, device="cpu")
            eps = self.eps_rel * self.gbar[name]
            out["groups"][name] = {
                "lambda": self.lam[name], "lambda0": self.lam0[name], "eps": eps, "clean_at_step": self.clean_at[name],
                "planned_removed": int(rem_t.numel()),
                "removed_below_eps": float((rem_t <= eps).float().mean()) if rem_t.numel() else None,
                "removed_max_gamma": float(rem_t.max()) if rem_t.numel() else None,
                "kept_median_gamma": float(kept_t.median()) if kept_t.numel() else None}
        return out

    # ---- LoopState ------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        t = {"started": torch.tensor(float(self.started), dtype=torch.float64, device="cpu"),
             "keep_ratio": torch.tensor(float("nan") if self.keep_ratio is None else self.keep_ratio,
                                        dtype=torch.float64, device="cpu")}
        for n in self.groups:
            t[f"lambda.{n}"] = torch.tensor(self.lam[n], dtype=torch.float64, device="cpu")
            t[f"lambda0.{n}"] = torch.tensor(self.lam0[n], dtype=torch.float64, device="cpu")
            t[f"gbar.{n}"] = torch.tensor(self.gbar[n], dtype=torch.float64, device="cpu")
            t[f"clean_at.{n}"] = torch.tensor(-1 if self.clean_at[n] is None else self.clean_at[n], dtype=torch.int64, device="cpu")
        for u, r in self.removal.items():
            t[f"removal.{u}"] = r.to(torch.uint8)
        return t

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Restore :meth:`state_tensors`.

        Raises:
            CheckpointError: a group's entries are missing (a checkpoint of another configuration).
        """
        from ..checkpoint import CheckpointError
        for n in self.groups:
            if f"lambda.{n}" not in tensors:
                raise CheckpointError(f"{source}: no ℓ1 schedule state for the γ group {n!r}")
        self.started = bool(float(tensors["started"]))
        kr = float(tensors["keep_ratio"])
        self.keep_ratio = None if math.isnan(kr) else kr
        for n in self.groups:
            self.lam[n] = float(tensors[f"lambda.{n}"])
            self.lam0[n] = float(tensors[f"lambda0.{n}"])
            self.gbar[n] = float(tensors[f"gbar.{n}"])
            c = int(tensors[f"clean_at.{n}"])
            self.clean_at[n] = None if c < 0 else c
        self.removal = {k[len("removal."):]: v.bool().clone() for k, v in tensors.items() if k.startswith("removal.")}
        self._reweight()


GROWING_NEEDS_PROXIMAL = (
    "method.l1_schedule=growing needs method.l1_mode=proximal: with the sub-gradient the penalised γ never reach "
    "zero, they oscillate around it with an amplitude of about lr·λ/(1 − momentum), so λ keeps growing and the "
    "network diverges (docs/methods.md, 'The ℓ1 step'); use l1_schedule=constant with the sub-gradient")


def sparsity_config_problems(cfg) -> list[str]:
    """Problems of the shared keys (l1_mode, l1_schedule, l1_eps, l1_ramp) of a ``method:`` section."""
    bad = []

    def num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if cfg.get("l1_mode") not in L1_MODES:
        bad.append(f"method.l1_mode={cfg.get('l1_mode')!r}: must be one of {', '.join(L1_MODES)}")
    if cfg.get("l1_schedule") not in L1_SCHEDULES:
        bad.append(f"method.l1_schedule={cfg.get('l1_schedule')!r}: must be one of {', '.join(L1_SCHEDULES)}")
    if not (num(cfg.get("l1_eps")) and cfg.get("l1_eps") > 0):
        bad.append(f"method.l1_eps={cfg.get('l1_eps')!r}: must be > 0 (relative to the mean |γ| before training)")
    if not (num(cfg.get("l1_ramp")) and 0 < cfg.get("l1_ramp") <= 1):
        bad.append(f"method.l1_ramp={cfg.get('l1_ramp')!r}: must lie in (0, 1] (fraction of the sparsity training)")
    if cfg.get("l1_schedule") == "growing" and cfg.get("l1_mode") == "subgradient":
        bad.append(f"method.l1_schedule='growing': {GROWING_NEEDS_PROXIMAL}")
    return bad


def bn_params(model: nn.Module, units: list[PruneUnit], which: str | None = None) -> list[tuple[str, str, torch.Tensor]]:
    """(BN name, unit name, γ parameter (C,)) of every BN of ``units``, without duplicates.

    ``which``: None = all units, "backbone" = backbone units only, "other" = all but backbone units.
    """
    mods = dict(model.named_modules())
    seen, out = set(), []
    for u in units:
        if which is not None and (u.part == "backbone") != (which == "backbone"):
            continue
        for b in u.bns:
            if b not in seen:
                seen.add(b)
                out.append((b, u.name, mods[b].weight))
    return out


def l1_from_config(method, groups: list[GammaGroup], total_steps: int, units: list[PruneUnit], budget,
                   scores: Callable[[], dict[str, torch.Tensor]], model: nn.Module, log=None,
                   multiplier: Callable[[str], torch.Tensor | None] | None = None) -> L1Sparsity:
    """:class:`L1Sparsity` from a γ method's ``method:`` keys (``l1_mode``, ``l1_schedule``, ``l1_eps``,
    ``l1_ramp``); R is planned with ``method.select_from_scores`` on ``scores()``, the FLOPs of a
    FLOPs-target budget are counted on ``model`` at ``method.input_size``."""
    c = method.cfg
    return L1Sparsity(groups, c["l1_mode"], c["l1_schedule"], total_steps, budget=budget, units=units, scores=scores,
                      select=lambda s, p, mode, mc: method.select_from_scores(s, units, p, mode, mc),
                      eps=float(c["l1_eps"]), ramp=float(c["l1_ramp"]), multiplier=multiplier,
                      flops=(model, method.input_size), log=log)
