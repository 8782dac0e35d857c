"""ACoSP, Auto-Compressing Subset Pruning (Ditschuneit & Otterbach, "Auto-Compressing Subset
Pruning for Semantic Image Segmentation", arXiv:2201.11103, 2022; reference code merantix/acosp).

Every prunable unit gets a learnable logit vector w (C,). During training the unit's channels are
multiplied by a soft top-k mask (the paper's sigmoid selection, Sec. 3; reference code
``sigmoid_soft_top_k``):

    ŵ = (w − mean(w)) / max(std(w), 1e-3)                   (standardised per unit, unbiased std)
    x0 = quantile(ŵ, 1 − k/C)                                 (linear interpolation, no gradient)
    m = sigmoid((ŵ − x0) / τ)                                 (m = 1 when k = C)
    k = min(C, max(⌈p · C⌉, min_keep)),  p = keep_ratio = 1 − sparsity

With no ties exactly k standardised logits lie above x0, so as τ → 0 the mask tends to the 0/1
indicator of the k largest logits. The temperature decays exponentially from ``tau_start`` to
``tau_end`` over the first ``end_epoch_frac`` of the epochs (continuously per iteration):

    τ(e) = tau_start · (tau_end / tau_start) ^ min(e / e_end, 1),   e = fractional epoch, e_end = end_epoch_frac · epochs

From e_end on the mask is *hard*: the indicator of the top-k logits (exactly k ones; ties go to the
lower channel index) and the logits stop changing. There is no extra loss term: logits and network
are trained by the segmentation cross-entropy only (poly LR; the logits have their own learning rate
``lr_logits`` and no weight decay).

Where the mask acts. The reference code wraps every convolution and masks its output, i.e. before
the BatchNorm. Here a unit is a DepGraph group of coupled channels (one convolution, or for
residual-coupled groups several convolutions whose outputs are added): one logit vector per unit,
and the mask multiplies the output of *every* BatchNorm of the unit (forward hooks), so the channels
that are added together are switched off together and a masked channel is exactly zero after its BN.
After training the hard mask is folded into those BatchNorms (γ ← m·γ, β ← m·β) and the hooks are
removed: the network computes the same function as the masked one, and :meth:`ACoSP.select` keeps
exactly the channels whose mask is 1, which the pipeline then removes physically.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ..checkpoint import CheckpointError
from ..engine.amp import Amp
from ..engine.train import LoopState, iters_per_epoch, poly_lr, seg_denominator, seg_loss, train_loop
from ..pruning.groups import PruneUnit
from ..pruning.thresholds import check_keep_ratio
from .base import PruningMethod, register_method

__all__ = ["ACoSP", "acosp_k", "acosp_temperature", "soft_topk_mask", "hard_topk_mask", "UnitMasks"]


def acosp_k(channels: int, keep_ratio: float, min_keep: int = 8) -> int:
    """Channels a unit keeps: ``min(C, max(ceil(keep_ratio · C), min_keep))`` (reference code ``inject.py``).

    A small tolerance keeps e.g. ``ceil(0.3 · 10)`` at 3 despite floating-point rounding.
    """
    c = int(channels)
    return min(c, max(int(math.ceil(float(keep_ratio) * c - 1e-9)), int(min_keep)))


def acosp_temperature(epoch: float, end_epoch: float, tau_start: float = 1.0, tau_end: float = 1e-3) -> float:
    """Exponential temperature schedule: ``tau_start`` at epoch 0, ``tau_end`` at and after ``end_epoch``.

    ``τ(e) = tau_start · (tau_end / tau_start) ** min(e / end_epoch, 1)`` (geometric interpolation,
    as the reference code's ``calc_temperature``); ``end_epoch <= 0`` gives ``tau_end``.
    """
    if end_epoch <= 0:
        return float(tau_end)
    t = min(max(float(epoch) / float(end_epoch), 0.0), 1.0)
    return float(math.exp(math.log(tau_start) + t * (math.log(tau_end) - math.log(tau_start))))


def soft_topk_mask(logits: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    """Sigmoid soft top-k mask (C,) of ``logits`` (C,), differentiable w.r.t. the logits.

    ``sigmoid((ŵ − x0) / τ)`` with ŵ the standardised logits and ``x0 = quantile(ŵ, 1 − k/C)``
    (detached). Returns ones when ``k >= C``.

    Raises:
        ValueError: k < 1 or tau <= 0.
    """
    c = logits.numel()
    if k < 1 or tau <= 0:
        raise ValueError(f"soft_topk_mask: need k >= 1 and tau > 0 (got k={k}, tau={tau})")
    if k >= c:
        return torch.ones_like(logits)
    std, mean = torch.std_mean(logits)
    z = (logits - mean) / torch.clamp(std, min=1e-3)
    x0 = torch.quantile(z.detach(), 1.0 - k / c)
    return torch.sigmoid((z - x0) / tau)


def hard_topk_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask (C,) with exactly ``min(k, C)`` ones at the largest logits (ties: lower index first)."""
    c = logits.numel()
    top = torch.argsort(logits.detach().flatten().double(), descending=True, stable=True)[:min(int(k), c)]
    mask = torch.zeros(c, dtype=logits.dtype, device=logits.device)
    mask[top] = 1.0
    return mask


def _unit_device(mods: dict[str, nn.Module], unit: PruneUnit) -> torch.device:
    """Device of the unit's first BatchNorm (where its masks and logits must live)."""
    bn = mods[unit.bns[0]]
    t = next(iter(list(bn.parameters()) + list(bn.buffers())), None)
    return t.device if t is not None else torch.device("cpu")


class UnitMasks(nn.Module, LoopState):
    """Learnable channel masks of the prunable units, applied through forward hooks on their BatchNorms.

    Args:
        model: the network (its modules get hooks; its parameters are not changed here).
        units: prunable units; unit u gets ``logits[u.name]`` (C,) ~ N(0, 1) (reference-code init), drawn
            from the global CPU generator and placed on the device of the unit's first BatchNorm (the
            same initial logits whatever the device; a CPU run draws exactly what it drew before).
        keep: unit name -> k (channels the unit keeps).

    ``tau`` (float) is the current temperature; ``hard`` switches to the exact top-k mask. Each
    hooked BN output (N, C, H, W) is multiplied by ``mask(u)`` viewed as (1, C, 1, 1).
    """

    def __init__(self, model: nn.Module, units: list[PruneUnit], keep: dict[str, int]):
        super().__init__()
        self.names = [u.name for u in units]
        mods = dict(model.named_modules())
        self.logits = nn.ParameterList([nn.Parameter(torch.randn(u.channels, device="cpu").to(_unit_device(mods, u)))
                                        for u in units])
        self.keep = dict(keep)
        self.tau, self.hard = 1.0, False
        self._handles = []
        for i, u in enumerate(units):
            for b in u.bns:
                self._handles.append(mods[b].register_forward_hook(self._hook(i)))

    def mask(self, i: int) -> torch.Tensor:
        """Current mask (C,) of unit ``i``: hard top-k, or the soft top-k at temperature ``tau``."""
        w, k = self.logits[i], self.keep[self.names[i]]
        return hard_topk_mask(w, k) if self.hard else soft_topk_mask(w, k, self.tau)

    def _hook(self, i: int):
        def hook(module, inputs, output):
            return output * self.mask(i).to(output.dtype).view(1, -1, 1, 1)
        return hook

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The logits (unit name -> (C,)), for in-stage checkpoints (``engine.resume``)."""
        return {n: w.detach() for n, w in zip(self.names, self.logits)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Restore :meth:`state_tensors` in place (the optimizer keeps pointing at the same parameters).

        Raises:
            CheckpointError: a unit missing or of another width (names ``source``).
        """
        with torch.no_grad():
            for n, w in zip(self.names, self.logits):
                t = tensors.get(n)
                if t is None or t.shape != w.shape:
                    raise CheckpointError(f"{source}: ACoSP logits of unit {n} "
                                          + ("missing" if t is None else f"have shape {tuple(t.shape)}, expected {tuple(w.shape)}"))
                w.copy_(t)

    def hard_masks(self) -> dict[str, torch.Tensor]:
        """Unit name -> hard 0/1 mask (C,)."""
        return {n: hard_topk_mask(w, self.keep[n]) for n, w in zip(self.names, self.logits)}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def fold_masks_(model: nn.Module, units: list[PruneUnit], masks: dict[str, torch.Tensor]) -> None:
    """Multiply γ and β of every BN of each unit by its 0/1 mask (C,), in place: BN'(x) = m · BN(x)."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for u in units:
            m = masks[u.name]
            for b in u.bns:
                bn = mods[b]
                bn.weight.mul_(m.to(bn.weight.dtype))
                bn.bias.mul_(m.to(bn.bias.dtype))


@register_method
class ACoSP(PruningMethod):
    """Auto-Compressing Subset Pruning: learned soft top-k channel masks, annealed to hard ones.

    Config keys (``method:``): epochs, lr_seg, momentum, weight_decay, max_iters_per_epoch.
    Options (``method.options``): ``keep_ratio`` (fraction p of channels each unit keeps during
    training; None = the budget's: ``prune.keep_ratio``, or with ``prune.target_flops_ratio`` the keep
    ratio whose widths meet the target, searched before training, see :meth:`fixed_widths`), ``min_keep`` (8), ``tau_start`` (1.0), ``tau_end`` (1e-3),
    ``end_epoch_frac`` (0.75: the mask becomes hard after this fraction of the epochs; 1.0 = only
    at the very end), ``lr_logits`` (None = ``lr_seg``).

    Raises:
        ValueError: (at construction) a bad option.
    """

    name = "acosp"
    per_layer = True
    widths_fixed_in_training = True  # k per unit is set before training; a FLOPs target picks keep_ratio first
    OPTIONS = {"keep_ratio": None, "min_keep": 8, "tau_start": 1.0, "tau_end": 1e-3, "end_epoch_frac": 0.75,
               "lr_logits": None}
    config_keys = ("epochs", "lr_seg", "momentum", "weight_decay", "max_iters_per_epoch")

    def __init__(self, cfg, input_size: tuple[int, int] | None = None):
        super().__init__(cfg, input_size)
        bad = self.validate_options(self.options)
        if bad:
            raise ValueError("; ".join(bad))
        kr = self.options["keep_ratio"]
        #: the keep ratio the masks are trained for (None until set: the budget's keep ratio)
        self._training_keep_ratio = None if kr is None else float(kr)
        self.keep_ratio = 0.5 if kr is None else float(kr)
        self.min_keep = int(self.options["min_keep"])
        #: unit name -> logits (C,) after :meth:`train` (None before)
        self.logits: dict[str, torch.Tensor] | None = None

    @classmethod
    def validate_options(cls, options: dict) -> list[str]:
        def num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)
        bad = []
        kr = options.get("keep_ratio")
        if kr is not None and not (num(kr) and 0.0 < kr < 1.0):
            bad.append(f"keep_ratio={kr!r} must be null or a number in (0, 1) (set it to prune.keep_ratio)")
        mk = options.get("min_keep")
        if not (isinstance(mk, int) and not isinstance(mk, bool) and mk >= 1):
            bad.append(f"min_keep={mk!r} must be an integer >= 1")
        ts, te = options.get("tau_start"), options.get("tau_end")
        if not (num(ts) and ts > 0):
            bad.append(f"tau_start={ts!r} must be > 0")
        if not (num(te) and te > 0):
            bad.append(f"tau_end={te!r} must be > 0")
        elif num(ts) and ts > 0 and te > ts:
            bad.append(f"tau_end={te!r} must be <= tau_start={ts!r} (the temperature decays)")
        ef = options.get("end_epoch_frac")
        if not (num(ef) and 0.0 < ef <= 1.0):
            bad.append(f"end_epoch_frac={ef!r} must lie in (0, 1]")
        lr = options.get("lr_logits")
        if lr is not None and not (num(lr) and lr > 0):
            bad.append(f"lr_logits={lr!r} must be null or > 0")
        return bad

    def unit_k(self, units: list[PruneUnit], keep_ratio: float | None = None) -> dict[str, int]:
        """Unit name -> k = ``acosp_k(C, keep_ratio, min_keep)`` (default: the training keep ratio)."""
        p = self.keep_ratio if keep_ratio is None else keep_ratio
        return {u.name: acosp_k(u.channels, p, self.min_keep) for u in units}

    def fixed_widths(self, units: list[PruneUnit], keep_ratio: float, min_channels: int = 1) -> dict[str, int]:
        """Unit name -> channels :meth:`select` keeps at ``keep_ratio``: ``max(acosp_k(C, p, min_keep), min(min_channels, C))``.

        Depends on p and the unit widths only (not on the learned logits), so the pipeline can
        search the keep ratio of a FLOPs target on the untrained network
        (``segprune.pruning.search.search_training_keep_ratio``).

        Raises:
            ValueError: keep_ratio outside (0, 1).
        """
        p = check_keep_ratio(keep_ratio)
        return {u.name: max(acosp_k(u.channels, p, self.min_keep), min(int(min_channels), u.channels)) for u in units}

    def set_training_keep_ratio(self, keep_ratio: float) -> None:
        """Train the masks for ``keep_ratio`` instead of ``method.options.keep_ratio`` (FLOPs target).

        Raises:
            ValueError: keep_ratio outside (0, 1).
        """
        self.keep_ratio = self._training_keep_ratio = check_keep_ratio(keep_ratio)

    @property
    def training_keep_ratio(self) -> float | None:
        """``method.options.keep_ratio`` or the keep ratio set by :meth:`set_training_keep_ratio`;
        None when neither (the core then trains for ``prune.keep_ratio``; used directly, 0.5)."""
        return self._training_keep_ratio

    def train(self, model: nn.Module, units: list[PruneUnit], seg_loader, cls_loader, ignore_index: int, log,
              ckpt=None) -> dict:
        """Train network and unit logits under the annealed masks; fold the hard masks into the BNs.

        Args:
            model: segmentation network, images (N, 3, H, W) -> logits (N, K, H, W); changed in place.
            units: prunable units (each gets one logit vector (C,)).
            seg_loader: (images, labels (N, H, W)) batches. ``cls_loader`` is unused.
            ckpt: optional ``engine.resume.StageCheckpoint``; the logits are saved with it (temperature
                and hardness follow from the iteration count, so a resumed stage continues exactly).

        Under ``train.amp: bf16 | fp16`` the forward (network, masks) and the loss run in autocast
        (``engine.amp.Amp``; fp16 with a GradScaler, gradients unscaled before the step); the logits,
        the network's parameters, γ and the BatchNorm statistics stay float32. Several processes: the
        gradients of the network and of the logits are summed over ranks by one
        ``DistributedDataParallel`` over both (``engine.distributed.data_parallel``).

        Returns:
            {"loss": mean loss of the last epoch, "iters", "tau": last soft temperature, "hard_from_iter",
            "kept": kept channels over all units, "channels": all unit channels}.

        Raises:
            NonFiniteLossError: NaN/inf loss.
        """
        c = self.cfg
        epochs = int(c["epochs"])
        lr0 = float(c["lr_seg"])
        lr_logits = float(self.options["lr_logits"] if self.options["lr_logits"] is not None else lr0)
        amp = Amp(next(model.parameters()).device)  # train.amp (engine/amp.py)
        keep = self.unit_k(units)
        masks = UnitMasks(model, units, keep)
        n_it = iters_per_epoch(seg_loader, c["max_iters_per_epoch"])
        total = n_it * epochs
        end_epoch = float(self.options["end_epoch_frac"]) * epochs
        ts, te = float(self.options["tau_start"]), float(self.options["tau_end"])
        # the mask is hard from the first iteration whose fractional epoch it / n_it reaches end_epoch
        hard_from = next((i for i in range(total) if i / max(1, n_it) >= end_epoch), None)
        opt = torch.optim.SGD([
            {"params": [p for p in model.parameters() if p.requires_grad],
             "weight_decay": float(c["weight_decay"])},
            {"params": list(masks.logits), "weight_decay": 0.0, "lr_scale": lr_logits / lr0},
        ], lr=lr0, momentum=float(c["momentum"]))
        soft_steps = []  # iterations run soft in this process (none when resumed after hard_from)

        def step(x, y, opt, it, run):
            if hard_from is not None and it >= hard_from:
                masks.hard = True
            else:
                masks.tau = acosp_temperature(it / max(1, n_it), end_epoch, ts, te)
                soft_steps.append(it)
            denom = seg_denominator(y, ignore_index)  # None in a single process
            with amp.autocast():  # train.amp: network and masks in autocast; logits, γ, BN statistics float32
                loss = run(seg_loss, model, x, y, ignore_index, denom)  # + auxiliary heads (PSPNet, BiSeNet)
            opt.zero_grad(set_to_none=True)
            amp.backward(loss, opt)  # several processes: weights' and mask logits' gradients summed (DDP)
            amp.step(opt)
            return {"loss": loss.detach()}  # on the device; read (NaN check, sum over ranks) by train_loop

        tcfg = {"epochs": epochs, "lr": lr0, "max_iters_per_epoch": c["max_iters_per_epoch"]}
        try:
            st = train_loop(model, None, seg_loader, tcfg, log, lambda it, tot: poly_lr(lr0, it, tot, 0.9), step,
                            lambda m, e, lr: f"epoch {e + 1}: seg loss {m.get('loss', float('nan')):.4f} lr {lr:.5f} "
                                             + ("mask hard" if masks.hard else f"tau {masks.tau:.4g}"),
                            ckpt, opt=opt, extra=masks, trained=(masks,))
        finally:
            masks.remove()
        if not soft_steps and hard_from:  # resumed in the hard phase: report the last soft temperature
            masks.tau = acosp_temperature((hard_from - 1) / max(1, n_it), end_epoch, ts, te)
        hard = masks.hard_masks()
        fold_masks_(model, units, hard)
        self.logits = {n: w.detach().clone() for n, w in zip(masks.names, masks.logits)}
        kept = sum(int(m.sum()) for m in hard.values())
        chans = sum(u.channels for u in units)
        hard_at = hard_from if hard_from is not None else total
        log.write(f"acosp: keep ratio {self.keep_ratio:g} (min_keep {self.min_keep}), {kept}/{chans} channels kept; "
                  f"mask hard from iteration {hard_at} of {total}")
        return {"loss": st.get("loss", float("nan")), "iters": st["iters"], "tau": masks.tau, "hard_from_iter": hard_at,
                "kept": kept, "channels": chans}

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The learned logits (unit name -> (C,)) after :meth:`train` ({} before)."""
        return dict(self.logits or {})

    def load_trained_state(self, model: nn.Module, units: list[PruneUnit], tensors: dict[str, torch.Tensor],
                           source: str) -> None:
        """Use stored logits for scoring; they are moved to the device of each unit's BatchNorm (the
        stage's file is read onto the CPU), so a resumed run scores where an uninterrupted one does.

        Raises:
            CheckpointError: a unit missing or of another width (names ``source``).
        """
        if not tensors:
            return
        for u in units:
            t = tensors.get(u.name)
            if t is None or t.numel() != u.channels:
                raise CheckpointError(f"{source}: ACoSP logits of unit {u.name} "
                                      + ("missing" if t is None else f"have {t.numel()} values, the unit has {u.channels} channels"))
        mods = dict(model.named_modules())
        self.logits = {u.name: tensors[u.name].to(_unit_device(mods, u), copy=True) for u in units}

    def scores(self, model: nn.Module, units: list[PruneUnit], calib_loader=None) -> dict[str, torch.Tensor]:
        """Unit name -> score (C,): the learned logits after :meth:`train` (or :meth:`load_trained_state`).

        Without them (a fresh instance, e.g. a pipeline resumed after its sparsity stage), the score
        is read from the folded model: ``1 + |γ|/(1 + max|γ|)`` (mean over the unit's BNs) for a
        channel whose γ or β is non-zero in some BN of the unit, ``|γ|/(1 + max|γ|)`` < 1 for a
        masked channel (γ = β = 0 after folding), so the channels of the hard mask rank first.
        """
        if self.logits is not None and all(u.name in self.logits and self.logits[u.name].numel() == u.channels
                                           for u in units):
            return {u.name: self.logits[u.name].float() for u in units}
        mods = dict(model.named_modules())
        out = {}
        for u in units:
            g = torch.stack([mods[b].weight.detach().abs().float() for b in u.bns]).mean(0)
            alive = torch.stack([(mods[b].weight.detach() != 0) | (mods[b].bias.detach() != 0) for b in u.bns]).any(0)
            out[u.name] = alive.float() + g / (1.0 + float(g.max()))
        return out

    def select(self, model: nn.Module, units: list[PruneUnit], keep_ratio: float, threshold_mode: str = "ind",
               min_channels: int = 1, calib_loader=None) -> dict[str, torch.Tensor]:
        """Unit name -> sorted LongTensor of the channels to keep (``threshold_mode`` is ignored).

        Each unit keeps its ``max(acosp_k(C, keep_ratio, min_keep), min(min_channels, C))``
        highest-scoring channels (ties: lower index). When ``keep_ratio`` equals the training keep
        ratio (and ``min_channels <= k``) these are exactly the k channels of the hard mask. Otherwise
        (a warning is issued) more kept channels include masked, now dead (zero-output) ones ranked by
        their logits; fewer remove live channels with the lowest logits, and fine-tuning has to recover.

        Raises:
            ValueError: keep_ratio outside (0, 1) or min_channels < 1.
        """
        p = check_keep_ratio(keep_ratio)
        if int(min_channels) < 1:
            raise ValueError(f"prune.min_channels={min_channels!r} must be >= 1")
        if self.logits is not None and abs(p - self.keep_ratio) > 1e-12:
            warnings.warn(f"acosp: select keep_ratio {p:g} differs from the training keep ratio {self.keep_ratio:g} "
                          "(method.options.keep_ratio); the kept sets differ from the learned masks", stacklevel=2)
        return self.select_from_scores(self.scores(model, units, calib_loader), units, p, threshold_mode, min_channels)

    def select_from_scores(self, scores: dict[str, torch.Tensor], units: list[PruneUnit], keep_ratio: float,
                           threshold_mode: str = "ind", min_channels: int = 1) -> dict[str, torch.Tensor]:
        """:meth:`select` on precomputed ``scores`` (unit name -> (C,)): each unit keeps its
        :meth:`fixed_widths` highest-scoring channels (ties: lower index); no warning.

        Raises:
            ValueError: keep_ratio outside (0, 1) or min_channels < 1.
        """
        if int(min_channels) < 1:
            raise ValueError(f"prune.min_channels={min_channels!r} must be >= 1")
        widths = self.fixed_widths(units, keep_ratio, min_channels)
        kept = {}
        for u in units:
            top = torch.argsort(scores[u.name].flatten().double(), descending=True, stable=True)[:widths[u.name]]
            kept[u.name] = torch.sort(top).values
        return kept
