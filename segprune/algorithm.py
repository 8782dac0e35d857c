"""Algorithm 1 of the MTP paper (Chen et al.) as functions over a model, its units, its loaders and a method.

The one core that both entry points run:

* ``segprune.pipeline.Pipeline`` (``segprune run``: zoo models from a config) wraps each step in a
  resumable stage (folders, fingerprints, checkpoints);
* ``segprune.api.prune_model`` (a user's own ``nn.Module``) validates its arguments and calls the
  same steps in one go.

Steps, in order (Algorithm 1; every method goes through all of them):

1. :func:`sparsify`        lines 1-7: the method's sparsity training (MTP: Eqs. 5-10), in place;
   a method whose widths are fixed before training (ACoSP) first gets its training keep ratio
   (:func:`fix_training_widths`).
2. :func:`choose_widths`   line 9: the method's scores, then the kept channels for one of three
   budgets: a keep ratio (:attr:`Budget.keep_ratio`), a FLOPs target (bisection on the keep ratio,
   ``segprune.pruning.search``), or widths fixed before training; optional rounding of every
   width to a multiple of :attr:`Budget.round_to`.
3. :func:`remove`          line 10: physical removal (Torch-Pruning's DepGraph) and the method's
   :meth:`~segprune.methods.base.PruningMethod.after_prune`.
4. :func:`finetune_classification`, :func:`finetune_segmentation`   line 11.

Seeds: with a ``seed``, each step draws from ``torch.manual_seed(seed + offset)``
(:data:`SEED_OFFSETS`), the same in the CLI and the API.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .engine import distributed as ddp
from .engine.train import train_classification, train_segmentation
from .methods.base import PruningMethod
from .pruning import check_keep_ratio, prune_channels, round_kept
from .pruning.groups import PruneUnit
from .pruning.search import search_keep_ratio, search_training_keep_ratio

__all__ = ["Budget", "SEED_OFFSETS", "fix_training_widths", "sparsify", "choose_widths", "remove",
           "kept_per_part", "cls_trainable", "finetune_classification", "finetune_segmentation"]

#: step -> offset added to the run's seed before the step (``torch.manual_seed``)
SEED_OFFSETS = {"sparsity": 2, "finetune_cls": 3, "finetune_seg": 4}


def _seed(seed: int | None, step: str) -> None:
    if seed is not None:
        torch.manual_seed(int(seed) + SEED_OFFSETS[step])


@dataclass(frozen=True)
class Budget:
    """How much of the network to keep.

    Attributes:
        keep_ratio: fraction p in (0, 1) of the prunable channels to keep (per part with
            ``threshold_mode="ind"``, overall with ``"uni"``, per layer for per-layer methods).
            Ignored when ``target_flops_ratio`` is set.
        target_flops_ratio: wanted FLOPs(pruned) / FLOPs(unpruned) in (0, 1), or None.
        flops_tolerance: absolute tolerance on that ratio (> 0).
        threshold_mode: "ind" (one percentile threshold per part, MTP paper Table 4) or "uni".
        min_channels: every unit keeps at least this many channels (>= 1).
        round_to: every pruned width rounded to a multiple of this (1 = off; 8, 16 for aligned kernels).

    Raises:
        ValueError: (at construction) a value outside its range.
    """

    keep_ratio: float | None = 0.5
    target_flops_ratio: float | None = None
    flops_tolerance: float = 0.01
    threshold_mode: str = "ind"
    min_channels: int = 1
    round_to: int = 1

    def __post_init__(self):
        if self.target_flops_ratio is None:
            check_keep_ratio(self.keep_ratio)
        elif not isinstance(self.target_flops_ratio, (int, float)) or not 0.0 < float(self.target_flops_ratio) < 1.0:
            raise ValueError(f"target_flops_ratio={self.target_flops_ratio!r} must lie in (0, 1), e.g. 0.5")
        if not isinstance(self.flops_tolerance, (int, float)) or not self.flops_tolerance > 0:
            raise ValueError(f"flops_tolerance={self.flops_tolerance!r} must be > 0")
        if self.threshold_mode not in ("ind", "uni"):
            raise ValueError(f"threshold_mode={self.threshold_mode!r} must be 'ind' or 'uni'")
        if not isinstance(self.min_channels, int) or self.min_channels < 1:
            raise ValueError(f"min_channels={self.min_channels!r} must be an integer >= 1")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"round_to={self.round_to!r} must be an integer >= 1 (1 = no rounding)")

    @classmethod
    def from_config(cls, prune: dict) -> "Budget":
        """The budget of a validated ``prune:`` config section."""
        return cls(keep_ratio=prune["keep_ratio"], target_flops_ratio=prune.get("target_flops_ratio"),
                   flops_tolerance=float(prune.get("flops_tolerance", 0.01)), threshold_mode=prune["threshold_mode"],
                   min_channels=int(prune["min_channels"]), round_to=int(prune.get("round_to", 1)))


def fix_training_widths(method: PruningMethod, model: nn.Module, units: list[PruneUnit], budget: Budget,
                        input_size: tuple[int, int], log=None, flops_unpruned: int | None = None) -> dict | None:
    """Before sparsity training, for a method whose widths are fixed in training (ACoSP's k per unit):
    with a FLOPs target, search the keep ratio whose widths meet it and set it as the method's
    training keep ratio (``search_training_keep_ratio``; returns that search's record); without a
    target, train for ``budget.keep_ratio`` unless the method was configured with its own. Other
    methods: nothing (returns None).
    """
    if not method.widths_fixed_in_training:
        return None
    if budget.target_flops_ratio is None:
        if method.training_keep_ratio is None:
            method.set_training_keep_ratio(budget.keep_ratio)
        return None
    if log is not None:
        log(f"FLOPs target {budget.target_flops_ratio:g} (tolerance {budget.flops_tolerance:g}): {method.name} fixes "
            f"its widths before training; searching its training keep ratio at input {input_size[0]}x{input_size[1]}")
    return search_training_keep_ratio(model, units, method, float(budget.target_flops_ratio),
                                      float(budget.flops_tolerance), input_size, budget.min_channels, log=log,
                                      flops_unpruned=flops_unpruned)


def _takes_budget(method: PruningMethod) -> bool:
    """True if ``method.train`` accepts a ``budget`` keyword (explicitly or through ``**kwargs``)."""
    import inspect
    params = inspect.signature(method.train).parameters
    return "budget" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def sparsify(method: PruningMethod, model: nn.Module, units: list[PruneUnit], seg_loader, cls_loader,
             ignore_index: int, log, budget: Budget, input_size: tuple[int, int], ckpt=None, seed: int | None = None,
             flops_unpruned: int | None = None) -> dict:
    """Algorithm 1, lines 1-7: the method's sparsity training of ``model`` in place.

    Args:
        method: the pruning method (``segprune.methods.build_method``).
        model: the trained network, images (N, C, H, W) -> logits (N, K, H, W).
        units: its prunable units (``segprune.pruning.discover_units``).
        seg_loader / cls_loader: training batches; ``cls_loader`` only for a method with
            ``needs_classification`` (MTP).
        ignore_index: void label of the segmentation targets.
        log: a ``segprune.engine.log.StageLog``.
        budget: the pruning budget. A method with fixed widths trains for it
            (:func:`fix_training_widths`); a method whose ``train`` takes a ``budget`` keyword gets
            it (the γ methods' growing ℓ1 schedule drives the channels this budget removes to zero;
            under a FLOPs target they estimate the keep ratio by the same FLOPs search on their
            current scores during training, ``segprune.methods.sparsity``).
        input_size: (H, W) at which FLOPs are counted.
        ckpt: in-stage checkpoint (``segprune.engine.resume.StageCheckpoint``) or None.
        seed: if given, ``torch.manual_seed(seed + 2)`` first.

    Returns:
        the method's training statistics, plus ``flops_search`` when the training keep ratio was
        searched for a FLOPs target.
    """
    _seed(seed, "sparsity")
    search = fix_training_widths(method, model, units, budget, input_size, log.write, flops_unpruned)
    kwargs = {"budget": budget} if _takes_budget(method) else {}
    info = dict(method.train(model, units, seg_loader, cls_loader, ignore_index, log, ckpt=ckpt, **kwargs) or {})
    if search is not None:
        info["flops_search"] = search
    return info


def choose_widths(method: PruningMethod, model: nn.Module, units: list[PruneUnit], budget: Budget,
                  input_size: tuple[int, int], calib_loader=None, log=None, training_search: dict | None = None,
                  flops_unpruned: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Algorithm 1, line 9: score once and choose the channels every unit keeps.

    Three budgets:

    * keep ratio (``budget.target_flops_ratio`` None): ``select_from_scores`` at ``budget.keep_ratio``;
    * widths fixed before training (``method.widths_fixed_in_training`` with a FLOPs target): the
      keep ratio found before training (``training_search``, from :func:`sparsify`);
    * FLOPs target: bisection on the keep ratio of ``select_from_scores`` (``search_keep_ratio``;
      rounding applied inside each probe, so the target is met after rounding).

    Args:
        calib_loader: calibration batches for methods that score on data (ThiNet, SIRFP without
            training statistics).
        log: optional ``log(str)``.
        training_search: the ``flops_search`` record of :func:`sparsify` (fixed-width methods
            under a FLOPs target).
        flops_unpruned: FLOPs of ``model`` if already counted.

    Returns:
        ``(kept, info)``: unit name -> sorted LongTensor of the kept channel indices, and a
        JSON-able record: ``target_flops_ratio`` (None for a keep ratio), the search's
        ``keep_ratio_found``, ``flops_probes``, ... and, with rounding, ``round_to`` and
        ``kept_channels_before_rounding``. Several processes: every rank returns rank 0's choice.

    Raises:
        ValueError: a fixed-width method under a FLOPs target without ``training_search``.
    """
    write = log or (lambda s: None)
    scores = method.scores(model, units, calib_loader=calib_loader)
    target = budget.target_flops_ratio

    def select(p):
        return method.select_from_scores(scores, units, p, budget.threshold_mode, budget.min_channels)
    if target is None:
        kept = select(budget.keep_ratio)
        unrounded = sum(k.numel() for k in kept.values())
        kept = round_kept(kept, scores, budget.round_to)
        info: dict = {"target_flops_ratio": None}
    elif method.widths_fixed_in_training:
        if not isinstance(training_search, dict) or "keep_ratio_found" not in training_search:
            raise ValueError(f"{method.name} fixes its widths before training: a FLOPs target needs the keep ratio "
                             "searched before sparsity training (the 'flops_search' record of sparsify)")
        p_found = float(training_search["keep_ratio_found"])
        method.set_training_keep_ratio(p_found)
        kept = select(p_found)
        unrounded = sum(k.numel() for k in kept.values())
        kept = round_kept(kept, scores, budget.round_to)
        write(f"FLOPs target {target:g}: widths fixed before sparsity training at keep ratio {p_found:.6f} "
              f"(FLOPs ratio {training_search['flops_ratio_achieved']:.4f} in that search); keep ratio {budget.keep_ratio} is ignored")
        info = dict(training_search)
    else:
        write(f"FLOPs target {target:g} (tolerance {budget.flops_tolerance:g}): keep ratio {budget.keep_ratio} is ignored; "
              f"searching it by bisection at input {input_size[0]}x{input_size[1]}")
        info = search_keep_ratio(model, units, lambda p: round_kept(select(p), scores, budget.round_to), float(target),
                                 float(budget.flops_tolerance), input_size, log=log, flops_unpruned=flops_unpruned)
        kept = info.pop("kept")
        unrounded = None
    # several processes: every rank computed the same selection; rank 0's is the one applied everywhere
    kept, unrounded, info = ddp.broadcast_object((kept, unrounded, info))
    if budget.round_to > 1:
        total = sum(k.numel() for k in kept.values())
        info["round_to"] = budget.round_to
        if unrounded is not None:
            info["kept_channels_before_rounding"] = unrounded
        write(f"widths rounded to multiples of {budget.round_to}: {total} channels kept"
              + (f" (before rounding {unrounded})" if unrounded is not None else " (rounded inside the search)"))
    return kept, info


def remove(method: PruningMethod, model: nn.Module, units: list[PruneUnit], kept: dict[str, torch.Tensor],
           graph, log=None, input_size: tuple[int, int] = (64, 64), record: dict | None = None) -> nn.Module:
    """Algorithm 1, line 10: remove every unit's other channels physically (``prune_channels``, in
    place, through the DepGraph ``graph`` traced on ``model``), then the method's ``after_prune``
    (e.g. Uniform from scratch re-initialises). Returns ``model``, now with smaller tensors.

    Removed channels whose γ is exactly 0 first have their constant output folded into their
    consumers (``segprune.pruning.fold_removed_constants``, default ``compensate="interior"``;
    a probe forward at ``input_size``); ``record``, if given, receives what was folded."""
    rec: dict = {}
    pruned = prune_channels(model, units, kept, graph, input_size=tuple(input_size), record=rec)
    if log is not None and rec.get("channels"):
        log.write(f"removal compensation ({rec['mode']}): {rec['channels']} removed channels with γ = 0; folds "
                  f"exact {rec['exact']}, interior-exact {rec['interior']}, constant 0 {rec['zero_constant']}, "
                  f"skipped {sum(rec['skipped'].values())} {rec['skipped'] or ''}")
    if record is not None:
        record.update(rec)
    method.after_prune(pruned, log)
    return pruned


def kept_per_part(units: list[PruneUnit], kept: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Part -> {"channels": C summed over its units, "kept": kept channels, "units": number of units}."""
    out: dict[str, dict] = {}
    for u in units:
        d = out.setdefault(u.part, {"channels": 0, "kept": 0, "units": 0})
        d["channels"] += u.channels
        d["kept"] += int(kept[u.name].numel()) if u.name in kept else u.channels
        d["units"] += 1
    return out


def cls_trainable(model: nn.Module) -> tuple[nn.Module, Callable | None]:
    """``(module, forward)`` that classification training updates: a zoo model's ``backbone``
    (a ResNet whose ``forward`` gives class logits, head ``fc``) with its own forward; any other
    network with ``forward_cls`` (e.g. set by ``segprune.api``): the whole model through it.

    Raises:
        ValueError: the network has no classification forward.
    """
    if getattr(getattr(model, "backbone", None), "fc", None) is not None and not getattr(model, "cls_head", None):
        return model.backbone, None
    if not callable(getattr(model, "forward_cls", None)):
        raise ValueError(f"{type(model).__name__} has no classification forward (forward_cls): classification "
                         "fine-tuning needs a classification head")
    return model, model.forward_cls


def finetune_classification(model: nn.Module, loader, cfg: dict, log, ckpt=None, seed: int | None = None) -> dict:
    """Algorithm 1, line 11 (first half): fine-tune the pruned backbone and its classification head
    on classification batches (x (N, C, h, w), y (N,)); ``cfg`` as ``finetune.cls``. Returns
    ``train_classification``'s statistics ({"loss", "acc", "iters"})."""
    _seed(seed, "finetune_cls")
    module, forward = cls_trainable(model)
    return train_classification(module, loader, cfg, log, forward=forward, ckpt=ckpt)


def finetune_segmentation(model: nn.Module, loader, cfg: dict, ignore_index: int, log, ckpt=None,
                          seed: int | None = None) -> dict:
    """Algorithm 1, line 11 (second half): fine-tune the pruned network on segmentation batches
    (x (N, C, H, W), y (N, H, W)); ``cfg`` as ``finetune.seg``. Returns ``train_segmentation``'s
    statistics ({"loss", "iters"})."""
    _seed(seed, "finetune_seg")
    return train_segmentation(model, loader, cfg, ignore_index, log, ckpt=ckpt)
