"""SIRFP: Spatial-aware Information Redundancy Filter Pruning (Wu, Guo, Yu, Sang, Gao,
"Structural Pruning via Spatial-aware Information Redundancy for Semantic Segmentation",
AAAI 2025, arXiv:2412.12672; public code github.com/dywu98/SIRFP, read for reference only).

Channels that carry the same *spatial* information as other channels of their layer are pruned
first. Everything below is per prunable unit (``segprune.pruning.groups.PruneUnit``), measured on
the output of the unit's BatchNorm(s), i.e. before the activation.

1. **Redundancy matrix** (paper Sec. "spatial-aware redundancy metric"; the printed equations were
   not available to us, this is our reading of the abstract and of the public code). For a batch
   of BN outputs F (N, C, H, W), each channel's *unpooled* map is flattened and ℓ1-normalised per
   image,

       F̂[n, c, :] = F[n, c, :] / (Σ_hw |F[n, c, hw]| + ε),        ε = 1e-5,

   and the batch redundancy matrix is  M = (1/N) Σ_n F̂_n F̂_nᵀ  (C, C), dimensionless
   (M[i, j] = Σ_hw F̂[n,i,hw]·F̂[n,j,hw]; for ℓ1-normalised maps |M| ≤ 1). With
   ``scale_by_hw`` the matrix is multiplied by H·W (an extension of ours, see docs).
2. **EMA over training iterations.** Every forward pass updates, per BatchNorm,
   S_t = r·S_{t−1} + (1 − r)·M_t (S_0 = 0, r = option ``ema``) and R = S_t / (1 − r^t) (bias
   correction; ranking-equivalent to the public code's un-corrected EMA, see docs). A unit with
   several BatchNorms (residual-coupled) averages their R.
3. **Edge term** (optional, backbone units only, weight ``edge_weight``): for each channel the
   standard deviation over H·W of the Sobel gradient magnitude sqrt(G_x² + G_y²) of its (raw)
   map, averaged over the batch and EMA-tracked like R (public code ``SI`` module).
4. **MEWCP, greedy** (paper: pruning as a maximum edge-weight clique problem, solved by a greedy
   heuristic). Vertices = channels, edge weights W = |R| (symmetrised), the diagonal W_ii being
   a vertex weight (option ``self_redundancy``). Keeping a set K costs
   Φ(K) = Σ_{i<j∈K} W_ij + Σ_{i∈K} W_ii; the greedy repeatedly removes the channel with the
   largest summed redundancy to the channels still kept, s_i = Σ_{j∈K} W_ij (self included),
   which is the steepest descent of Φ.
5. **Scores.** Channel i removed with summed redundancy v_i scores
   ``edge_weight·E_i·[backbone] − v_i``; v is non-increasing along the removal order, so without
   the edge term "removed first" = "lowest score". Scores are comparable across units (public
   code), so the percentile thresholds of ``select_channels`` apply: "ind" (default; one
   threshold for the backbone, one for the decoder) or "uni"; every unit keeps at least
   ``min_channels``.

Where R is accumulated: ``train`` fine-tunes on segmentation for ``epochs`` (cfg) with forward
hooks on the BatchNorms (train mode, the poly schedule of ``train_segmentation``). With
``epochs == 0`` nothing is trained and ``scores``/``select`` accumulate R in eval mode over
``calib_batches`` batches of the calibration loader. The same happens, with a warning, when
``select`` is called on a model that neither ``train`` nor :meth:`load_trained_state` has seen.
The EMAs are checkpointed in-stage and stored with the sparsity stage (``trained_state``).

The FLOPs target comes from the pipeline (``prune.target_flops_ratio``). Not implemented: the
paper's iterative schedule (prune → fine-tune → re-score → prune more); see docs/methods_sirfp.md.
"""
from __future__ import annotations

import math
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointError
from ..engine import distributed as ddp
from ..engine.train import LoopState, train_segmentation
from ..pruning.groups import PruneUnit
from .base import PruningMethod, register_method

__all__ = ["SIRFP", "redundancy_matrix", "sobel_edge_std", "EMA", "RedundancyTracker", "greedy_clique_removal",
           "kept_redundancy", "sirfp_scores"]

#: ε added to each channel's ℓ1 norm before dividing (as in the public code)
L1_EPS = 1e-5

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device="cpu")
#: (device, dtype) -> the (2, 1, 3, 3) Sobel kernels there (one host-to-device copy per device, not per forward)
_SOBEL_CACHE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _sobel_kernels(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (device, dtype)
    if key not in _SOBEL_CACHE:
        _SOBEL_CACHE[key] = torch.stack([_SOBEL_X, _SOBEL_X.T]).unsqueeze(1).to(device=device, dtype=dtype)
    return _SOBEL_CACHE[key]


def _check_maps(feat: torch.Tensor, what: str) -> None:
    if not isinstance(feat, torch.Tensor) or feat.dim() != 4:
        raise ValueError(f"{what}: expected feature maps (N, C, H, W), got "
                         f"{tuple(feat.shape) if isinstance(feat, torch.Tensor) else type(feat).__name__}")


def redundancy_matrix(feat: torch.Tensor, scale_by_hw: bool = False, eps: float = L1_EPS) -> torch.Tensor:
    """Batch redundancy matrix of unpooled feature maps (step 1 of the module docstring).

    Args:
        feat: feature maps (N, C, H, W) (detached; computed in float64 if ``feat`` is float64,
            else in float32).
        scale_by_hw: multiply the result by H·W (resolution-free variant, not in the paper).
        eps: added to each channel's ℓ1 norm Σ_hw |F[n, c, hw]| before dividing.

    Returns:
        M (C, C) float64, M = (1/N) Σ_n F̂_n F̂_nᵀ with F̂_n[c] = F_n[c] / (‖F_n[c]‖₁ + eps); symmetric,
        dimensionless, |M_ij| ≤ 1 (without ``scale_by_hw``).

    Raises:
        ValueError: ``feat`` is not 4-D.
    """
    _check_maps(feat, "redundancy_matrix")
    n, c = feat.shape[:2]
    f = feat.detach()
    f = (f.double() if f.dtype == torch.float64 else f.float()).reshape(n, c, -1)
    fh = f / (f.abs().sum(-1, keepdim=True) + eps)
    m = torch.bmm(fh, fh.transpose(1, 2)).mean(0).double()
    if scale_by_hw:
        m = m * f.shape[-1]
    return m


def sobel_edge_std(feat: torch.Tensor) -> torch.Tensor:
    """Spatial edge strength per channel (step 3 of the module docstring).

    The 3×3 Sobel kernels G_x = [[−1,0,1],[−2,0,2],[−1,0,1]] and G_y = G_xᵀ are applied to every
    channel map with replicate padding (so a constant map has zero gradient everywhere, also at
    the border); the gradient magnitude g = sqrt(G_x² + G_y²) (H, W) is reduced to its population
    standard deviation over the H·W positions, then averaged over the batch.

    Args:
        feat: feature maps (N, C, H, W).

    Returns:
        (C,) float64, in the units of the feature values (× the Sobel gain: a unit step edge gives
        gradient magnitude 4 next to the step).

    Raises:
        ValueError: ``feat`` is not 4-D.
    """
    _check_maps(feat, "sobel_edge_std")
    n, c, h, w = feat.shape
    x = F.pad(feat.detach().float().reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    kern = _sobel_kernels(x.device, x.dtype)                                         # (2, 1, 3, 3)
    g = F.conv2d(x, kern)                                                            # (N·C, 2, H, W)
    mag = g.pow(2).sum(1).sqrt().flatten(1)                                          # (N·C, H·W)
    return mag.std(dim=1, unbiased=False).reshape(n, c).mean(0).double()


class EMA:
    """Bias-corrected exponential moving average of tensors (step 2 of the module docstring).

    ``update(x)``: S_t = r·S_{t−1} + (1 − r)·x, S_0 = 0; ``value`` = S_t / (1 − r^t), i.e. the
    average of the updates with weights ∝ r^(t−s) (r = 0: the last update only).

    Raises:
        ValueError: decay outside [0, 1), or ``value`` read before any update.
    """

    def __init__(self, decay: float):
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"EMA decay {decay!r} must lie in [0, 1)")
        self.decay, self.t, self._s = float(decay), 0, None

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        self.t += 1
        self._s = (1.0 - self.decay) * x if self._s is None else self.decay * self._s + (1.0 - self.decay) * x

    @property
    def value(self) -> torch.Tensor:
        if self._s is None:
            raise ValueError("EMA read before any update")
        return self._s / (1.0 - self.decay ** self.t)


class RedundancyTracker(LoopState):
    """Forward hooks on the BatchNorms of ``units`` that EMA-track R (and optionally the edge term).

    Use as a context manager (hooks are removed on exit, also on errors)::

        with RedundancyTracker(model, units, ema=0.999, edge_parts=("backbone",)) as tr:
            ...  # forward passes
        stats = tr.unit_stats(units)

    Args:
        model: the network holding the BatchNorms named in ``units[i].bns``.
        units: prunable units.
        ema: decay r in [0, 1).
        edge_parts: parts (``PruneUnit.part``) whose BatchNorms also track the Sobel edge term.
        scale_by_hw: passed to :func:`redundancy_matrix`.
    """

    def __init__(self, model: nn.Module, units: list[PruneUnit], ema: float, edge_parts=(), scale_by_hw: bool = False):
        mods = dict(model.named_modules())
        self.scale_by_hw = bool(scale_by_hw)
        self.bns: dict[str, nn.Module] = {}
        self.edge_bns: set[str] = set()
        for u in units:
            for b in u.bns:
                if b not in mods:
                    raise ValueError(f"SIRFP: unit {u.name}: no module named {b!r} in the model")
                self.bns[b] = mods[b]
                if u.part in edge_parts:
                    self.edge_bns.add(b)
        self.red = {b: EMA(ema) for b in self.bns}
        self.edge = {b: EMA(ema) for b in self.edge_bns}
        self._handles = []

    def _hook(self, name: str):
        def hook(mod, inputs, output):
            with torch.no_grad():
                _check_maps(output, f"SIRFP: output of {name}")
                # several processes (train mode): means over samples, averaged over the ranks' equal
                # shards = the global batch's value; a single process: unchanged
                sync = ddp.mean_over_ranks if mod.training else (lambda t: t)
                self.red[name].update(sync(redundancy_matrix(output, self.scale_by_hw)))
                if name in self.edge:
                    self.edge[name].update(sync(sobel_edge_std(output)))
        return hook

    def __enter__(self) -> "RedundancyTracker":
        self._handles = [m.register_forward_hook(self._hook(b)) for b, m in self.bns.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every EMA's running sum and update count, for in-stage checkpoints (``engine.resume``)."""
        out = {}
        for kind, emas in (("red", self.red), ("edge", self.edge)):
            for b, e in emas.items():
                out[f"{kind}.{b}.t"] = torch.tensor(e.t, dtype=torch.int64, device="cpu")  # a counter
                if e._s is not None:
                    out[f"{kind}.{b}.s"] = e._s
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Restore :meth:`state_tensors`; the running sums go to the device of their BatchNorm
        (checkpoints are read onto the CPU).

        Raises:
            CheckpointError: a BatchNorm missing from either side, or a matrix of another size (names ``source``).
        """
        for kind, emas in (("red", self.red), ("edge", self.edge)):
            for b, e in emas.items():
                key = f"{kind}.{b}"
                if f"{key}.t" not in tensors:
                    raise CheckpointError(f"{source}: no SIRFP statistics for {b} ({kind}); another model or options?")
                t, s = int(tensors[f"{key}.t"]), tensors.get(f"{key}.s")
                c = self.bns[b].num_features if hasattr(self.bns[b], "num_features") else None
                if s is not None and c is not None and s.shape[0] != c:
                    raise CheckpointError(f"{source}: SIRFP statistics of {b} have {s.shape[0]} channels, "
                                          f"the model has {c}")
                e.t, e._s = t, (None if s is None else s.to(_module_device(self.bns[b]), copy=True))
        known = {f"{k}.{b}" for k, emas in (("red", self.red), ("edge", self.edge)) for b in emas}
        extra = sorted({k.rsplit(".", 1)[0] for k in tensors} - known)
        if extra:
            raise CheckpointError(f"{source}: SIRFP statistics for unknown BatchNorms {extra[:5]}")

    @property
    def updates(self) -> int:
        """Number of updates of the least-updated BatchNorm (= forward passes seen)."""
        return min((e.t for e in self.red.values()), default=0)

    def unit_stats(self, units: list[PruneUnit]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Unit name -> (R (C, C) float64, E (C,) float64 or None); averages over the unit's BatchNorms.

        Raises:
            ValueError: a BatchNorm of a unit never ran a forward pass while hooked.
        """
        out = {}
        for u in units:
            for b in u.bns:
                if self.red[b].t == 0:
                    raise ValueError(f"SIRFP: BatchNorm {b} (unit {u.name}) produced no output while hooked; "
                                     "is it used by the segmentation forward pass?")
            r = torch.stack([self.red[b].value for b in u.bns]).mean(0)
            e = torch.stack([self.edge[b].value for b in u.bns]).mean(0) if all(b in self.edge for b in u.bns) else None
            out[u.name] = (r, e)
        return out


def _module_device(mod: nn.Module) -> torch.device:
    """Device of a module's first parameter or buffer (CPU for a module without any)."""
    t = next(iter(list(mod.parameters()) + list(mod.buffers())), None)
    return t.device if t is not None else torch.device("cpu")


def _as_weights(redundancy: torch.Tensor, self_term: bool) -> torch.Tensor:
    # a tensor stays where it is (``torch.as_tensor`` would copy it to torch's default device)
    r = (redundancy if isinstance(redundancy, torch.Tensor) else torch.as_tensor(redundancy)).detach().double()
    if r.dim() != 2 or r.shape[0] != r.shape[1]:
        raise ValueError(f"redundancy matrix must be square (C, C), got {tuple(r.shape)}")
    if not torch.isfinite(r).all():
        raise ValueError("redundancy matrix has non-finite entries")
    w = 0.5 * (r.abs() + r.abs().T)
    if not self_term:
        w.fill_diagonal_(0.0)
    return w


def kept_redundancy(redundancy: torch.Tensor, kept, self_term: bool = True) -> float:
    """MEWCP objective of a kept set K: Φ(K) = Σ_{i<j∈K} W_ij + Σ_{i∈K} W_ii, W = |R| symmetrised
    (the diagonal term only with ``self_term``). Lower = less redundant."""
    w = _as_weights(redundancy, self_term)
    idx = torch.as_tensor(list(kept), dtype=torch.long, device=w.device)
    if idx.numel() == 0:
        return 0.0
    sub = w[idx][:, idx]
    return float(0.5 * (sub.sum() + torch.diagonal(sub).sum()))


def greedy_clique_removal(redundancy: torch.Tensor, self_term: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy MEWCP heuristic (step 4 of the module docstring) run to completion.

    Starting from K = all channels, repeatedly remove i* = argmax_{i∈K} s_i with
    s_i = Σ_{j∈K} W_ij (W = |R| symmetrised; W_ii included iff ``self_term``), ties to the lowest
    index. Removing i lowers Φ(K) (:func:`kept_redundancy`) by exactly s_i, so each step is the
    best single removal; the kept set after C − k steps is not always the optimal k-subset
    (the problem is NP-hard; measured gap in docs/methods_sirfp.md).

    Args:
        redundancy: R (C, C), any real matrix (|·| and symmetrisation are applied).
        self_term: include the diagonal (channel's self-redundancy Σ_hw F̂²) in s_i.

    Returns:
        (order, value): order (C,) long, the channels in removal order; value (C,) float64,
        value[t] = s_{order[t]} at the moment of removal. ``value`` is non-increasing.

    Raises:
        ValueError: R not square or not finite.
    """
    w = _as_weights(redundancy, self_term)
    c = w.shape[0]
    cur = w.sum(1)
    avail = torch.ones(c, dtype=torch.bool, device=w.device)
    order = torch.empty(c, dtype=torch.long, device=w.device)
    value = torch.empty(c, dtype=torch.float64, device=w.device)
    for t in range(c):
        j = int(torch.argmax(cur.masked_fill(~avail, -math.inf)))
        order[t], value[t] = j, cur[j]
        avail[j] = False
        cur = cur - w[:, j]
    return order, value


def sirfp_scores(redundancy: torch.Tensor, edge: torch.Tensor | None = None, edge_weight: float = 0.0,
                 self_term: bool = True) -> torch.Tensor:
    """Per-channel importance (step 5): score_i = edge_weight·E_i − v_i, v_i = summed redundancy of
    channel i when the greedy removed it (larger = more important).

    Args:
        redundancy: R (C, C).
        edge: E (C,) or None (then no edge term).
        edge_weight: λ ≥ 0 multiplying E.
        self_term: see :func:`greedy_clique_removal`.

    Returns:
        (C,) float64.
    """
    order, value = greedy_clique_removal(redundancy, self_term)
    s = torch.empty_like(value)
    s[order] = -value
    if edge is not None and edge_weight:
        e = torch.as_tensor(edge, device=s.device).double().flatten()
        if e.numel() != s.numel():
            raise ValueError(f"edge term has {e.numel()} entries for {s.numel()} channels")
        s = s + float(edge_weight) * e
    return s


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@register_method
class SIRFP(PruningMethod):
    """SIRFP: spatial redundancy (EMA over training), greedy MEWCP, Ind/Uni thresholds.

    Options (``method.options``): ``ema`` (0.999), ``edge_weight`` (0.0; backbone units only),
    ``self_redundancy`` (True), ``scale_by_hw`` (False). Shared keys read from ``method:``:
    epochs, lr_seg, momentum, weight_decay, max_iters_per_epoch, calib_batches.

    Raises (constructor):
        ValueError: invalid options (the message lists them all).
    """

    name = "sirfp"
    per_layer = False
    OPTIONS = {"ema": 0.999, "edge_weight": 0.0, "self_redundancy": True, "scale_by_hw": False}
    config_keys = ("epochs", "lr_seg", "momentum", "weight_decay", "max_iters_per_epoch", "calib_batches")

    def __init__(self, cfg, input_size: tuple[int, int] | None = None):
        super().__init__(cfg, input_size)
        bad = self.validate_options(self.options)
        if bad:
            raise ValueError("SIRFP options: " + "; ".join(bad))
        self.calib_batches = int(self.cfg["calib_batches"])
        if self.calib_batches < 1:
            raise ValueError(f"method.calib_batches={self.calib_batches!r} must be >= 1")
        self._stats = None          # (weakref to the trained model, unit name -> (R, E))
        self.last_source = None     # "train" or "calibration": where the last scores' R came from

    @classmethod
    def validate_options(cls, options: dict) -> list[str]:
        bad = []
        ema = options.get("ema")
        if not (_is_num(ema) and 0.0 <= ema < 1.0):
            bad.append(f"ema={ema!r} must be a number in [0, 1) (EMA decay of the redundancy matrix)")
        ew = options.get("edge_weight")
        if not (_is_num(ew) and ew >= 0.0):
            bad.append(f"edge_weight={ew!r} must be a number >= 0")
        for key in ("self_redundancy", "scale_by_hw"):
            if not isinstance(options.get(key), bool):
                bad.append(f"{key}={options.get(key)!r} must be true or false")
        return bad

    def _tracker(self, model: nn.Module, units: list[PruneUnit]) -> RedundancyTracker:
        o = self.options
        return RedundancyTracker(model, units, o["ema"], ("backbone",) if o["edge_weight"] > 0 else (),
                                 o["scale_by_hw"])

    def train(self, model: nn.Module, units: list[PruneUnit], seg_loader, cls_loader, ignore_index: int, log,
              ckpt=None) -> dict:
        """Fine-tune ``model`` on segmentation for ``epochs`` while EMA-tracking R (in place).

        ``cls_loader`` is unused; ``ckpt`` (an ``engine.resume.StageCheckpoint``) saves the EMAs
        with the weights, so a resumed stage continues them. With ``epochs == 0`` nothing is trained or tracked here (R is
        then accumulated by :meth:`scores` on the calibration loader). Returns the statistics of
        ``train_segmentation`` plus ``sirfp_updates`` (EMA updates per BatchNorm).
        """
        c = self.cfg
        epochs = int(c["epochs"])
        self._stats = None
        if epochs == 0:
            log.write(f"sirfp: epochs 0, no training; R is accumulated at the prune stage over "
                      f"{self.calib_batches} calibration batches (eval mode)")
            return {"sirfp_updates": 0}
        tcfg = self.seg_training_config()
        with self._tracker(model, units) as tr:
            st = train_segmentation(model, seg_loader, tcfg, ignore_index, log, ckpt=ckpt, extra=tr)
        if tr.updates == 0:
            log.write("sirfp: no training iteration ran; R will be accumulated on the calibration loader")
            return {**st, "sirfp_updates": 0}
        self._stats = (weakref.ref(model), tr.unit_stats(units))
        log.write(f"sirfp: redundancy EMA (r={self.options['ema']:g}) over {tr.updates} iterations, "
                  f"edge weight {self.options['edge_weight']:g}")
        return {**st, "sirfp_updates": tr.updates}

    def trained_state(self) -> dict[str, torch.Tensor]:
        """``{<unit>.R: (C, C), <unit>.E: (C,)}`` accumulated by :meth:`train` ({} if it did not run)."""
        if self._stats is None:
            return {}
        out = {}
        for name, (r, e) in self._stats[1].items():
            out[f"{name}.R"] = r
            if e is not None:
                out[f"{name}.E"] = e
        return out

    def load_trained_state(self, model: nn.Module, units: list[PruneUnit], tensors: dict[str, torch.Tensor],
                           source: str) -> None:
        """Use the stored R (and E) for ``model`` instead of recalibrating. They are moved to the device
        of each unit's BatchNorm (the stage's file is read onto the CPU), where :meth:`train` left them:
        a resumed run then scores on the same device, hence bitwise, as an uninterrupted one.

        Raises:
            CheckpointError: a unit missing or of another width (names ``source``).
        """
        if not tensors:
            return
        stats = {}
        mods = dict(model.named_modules())
        for u in units:
            r = tensors.get(f"{u.name}.R")
            if r is None or tuple(r.shape) != (u.channels, u.channels):
                raise CheckpointError(f"{source}: SIRFP redundancy of unit {u.name} "
                                      + ("missing" if r is None else f"is {tuple(r.shape)}, the unit has {u.channels} channels"))
            dev, e = _module_device(mods[u.bns[0]]), tensors.get(f"{u.name}.E")
            stats[u.name] = (r.to(dev, copy=True), None if e is None else e.to(dev, copy=True))
        self._stats = (weakref.ref(model), stats)

    def calibrate(self, model: nn.Module, units: list[PruneUnit], calib_loader) -> dict:
        """Unit name -> (R, E) accumulated in eval mode, without gradients, over ``calib_batches``
        batches of ``calib_loader`` (batches are ``(images, ...)`` or images (N, 3, H, W), moved to
        the device of the model's first parameter).

        Raises:
            ValueError: no loader, or it yields no batch.
        """
        if calib_loader is None:
            raise ValueError("SIRFP needs a calibration loader (segmentation training images) when the "
                             "redundancy was not accumulated by train() on this model")
        was_training = model.training
        model.eval()
        dev = _module_device(model)
        try:
            with self._tracker(model, units) as tr, torch.no_grad():
                for i, batch in enumerate(calib_loader):
                    if i >= self.calib_batches:
                        break
                    model((batch[0] if isinstance(batch, (tuple, list)) else batch).to(dev, non_blocking=True))
        finally:
            model.train(was_training)
        if tr.updates == 0:
            raise ValueError("SIRFP: the calibration loader yielded no batch")
        return tr.unit_stats(units)

    def unit_stats(self, model: nn.Module, units: list[PruneUnit], calib_loader=None) -> dict:
        """(R, E) per unit: from :meth:`train` if it ran on this very ``model`` with these units,
        else from :meth:`calibrate` (with a warning when ``epochs > 0``)."""
        if self._stats is not None:
            ref, stats = self._stats
            if ref() is model and all(u.name in stats and stats[u.name][0].shape[0] == u.channels for u in units):
                self.last_source = "train"
                return stats
        if int(self.cfg["epochs"]) > 0:
            warnings.warn("SIRFP: no redundancy accumulated by train() for this model (e.g. a resumed run); "
                          f"using {self.calib_batches} calibration batches in eval mode instead", RuntimeWarning,
                          stacklevel=3)
        self.last_source = "calibration"
        return self.calibrate(model, units, calib_loader)

    def scores(self, model: nn.Module, units: list[PruneUnit], calib_loader=None) -> dict[str, torch.Tensor]:
        """Unit name -> (C,) float64 score ``edge_weight·E·[backbone] − v`` (:func:`sirfp_scores`).

        float64 on purpose: rounding to float32 could tie two channels the greedy told apart."""
        stats = self.unit_stats(model, units, calib_loader)
        o = self.options
        out = {}
        for u in units:
            r, e = stats[u.name]
            edge = e if (u.part == "backbone" and o["edge_weight"] > 0) else None
            out[u.name] = sirfp_scores(r, edge, o["edge_weight"], o["self_redundancy"])
        return out
