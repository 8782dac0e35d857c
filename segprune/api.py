"""Prune your own network: any method, any ``nn.Module`` with BatchNorm layers.

The pipeline (``segprune run``) builds its networks from the model zoo. This module runs the same
steps on a module you built yourself::

    from segprune.api import prune_model, save_pruned, load_pruned

    res = prune_model(unet, "mtp", keep_ratio=0.5,
                      parts={"backbone": "enc.", "decoder": "dec."},   # module-name prefixes
                      never_prune=["head"],                            # output widths never changed
                      seg_loader=seg_loader, num_classes=5,            # (x (N,C,H,W), y (N,H,W)) batches
                      cls_head="enc_fc", cls_loader=cls_loader,        # MTP's classification task
                      input_size=(64, 64), finetune=True)
    res.model            # the physically pruned network (your class, smaller tensors)
    res.report           # params / FLOPs before and after, kept channels per unit and per part
    save_pruned(res, "pruned_unet/")                                   # safetensors + JSON, no pickle
    net = load_pruned(UNet(...), "pruned_unet/")                       # a fresh instance, re-narrowed

What segprune needs to know about the network, and where it goes:

* ``parts``: part name -> module-name prefix (or list of prefixes). The MTP paper's Ind
  thresholds (Sec. 3, Table 4) prune the same fraction of each part; MTP's backbone part is the
  one shared with the classification task (W1/W3 of Eq. 5). Units matching no prefix form the
  part ``"other"``.
* ``never_prune``: module names whose *output* channels must not change (the classifier conv,
  layers whose width another program depends on). Their *input* channels still follow the
  layers they read.
* the classification head for MTP: ``cls_head`` (module name) and optionally ``cls_forward``.

While it works, segprune sets the attributes its layers read (``parts``, ``never_prune``,
``input_channels`` and, with a classification head, ``cls_head`` and ``forward_cls``) on the
module and removes them again before returning (also on error); nothing has to be subclassed.
Everything else is the library's own machinery: unit discovery and physical removal with
Torch-Pruning's DepGraph (``segprune.pruning``), the methods of ``segprune.methods``, the
training loops of ``segprune.engine`` and the pickle-free checkpoints of ``segprune.checkpoint``.
The walk-through with a U-Net is docs/own_model.md.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .checkpoint import CheckpointError, load_into_model, load_json, load_state_dict, save_json, save_state_dict
from .config import DEFAULTS, merge, validate
from .engine.amp import AMP_MODES, amp_mode
from .engine.device import model_device
from .engine.log import StageLog
from .engine.profile import count_flops, count_params
from .engine.resume import check_loader
from .algorithm import Budget, choose_widths, finetune_classification, finetune_segmentation, kept_per_part, remove, sparsify
from .methods.base import PruningMethod, build_method, method_names
from .pruning import apply_widths, build_graph, discover_units, layer_widths, removed_gamma_share, widths_spec
from .pruning.groups import has_cls_forward, parts_without_units

__all__ = ["prune_model", "PruneResult", "save_pruned", "load_pruned", "USER_ARCH_FORMAT"]

#: ``format`` of the ``arch.json`` written by :func:`save_pruned`.
USER_ARCH_FORMAT = "segprune-user-arch/1"



@dataclass
class PruneResult:
    """What :func:`prune_model` returns.

    Attributes:
        model: the physically pruned network — the same class as the input, with smaller
            convolution/BatchNorm/linear tensors; ``model(x)`` maps (N, C_in, H, W) to logits
            (N, K, H', W') as before. In train or eval mode as the input was.
        report: JSON-able dict: ``method``, ``keep_ratio`` (the one used or found), ``threshold_mode``,
            ``min_channels``, ``input_size`` [H, W], ``params``/``flops``/``macs``
            ({"before", "after", "ratio"}; FLOPs by ``torch.utils.flop_counter`` at ``input_size``,
            batch 1, one multiply-add = 2 FLOPs), ``units`` (root conv name -> {"part", "channels",
            "kept"}), ``parts`` (part -> {"channels", "kept", "units"}), ``parts_without_units`` (part ->
            why it has no prunable unit, e.g. no BatchNorm in a LayerNorm encoder; also warned), ``removed_gamma_share``
            ({"total", "parts"}: share of the units' Σ|γ| the removal deleted), ``compensation`` (what
            ``segprune.pruning.fold_removed_constants`` folded for removed channels with γ = 0), ``layer_widths``
            ({"before", "after"}: conv name -> [in, out]), ``sparsity`` (what the method's training
            reported, e.g. MTP's μ and ||W1 − W3||), ``flops_target`` (the search, with a
            ``target_flops_ratio``), ``finetune`` (per stage: loss, accuracy, iterations, or why it
            was skipped) and ``wall_s`` per phase.
        widths: ``segprune.pruning.widths_spec`` of the pruning (per unit: part, channels, kept),
            what :func:`load_pruned` re-applies to a fresh instance.
        setup: the JSON-able settings the pruning used (parts, never_prune, cls_head, whether a
            custom ``cls_forward`` was given, input size and channels), saved with the weights.
    """

    model: nn.Module
    report: dict
    widths: dict
    setup: dict = field(default_factory=dict)

    def summary(self) -> str:
        """A short plain-text table: params, FLOPs and kept channels per part."""
        r = self.report
        target = (f", FLOPs target {r['flops_target']['target_flops_ratio']:g}" if r.get("flops_target") else "")
        lines = [f"{r['method']} keep ratio {r['keep_ratio']:.4g} ({r['threshold_mode']}{target}) "
                 f"at input {r['input_size'][0]}x{r['input_size'][1]}",
                 f"  params {r['params']['before']:>10,} -> {r['params']['after']:>10,}  ({r['params']['ratio']:.3f}x)",
                 f"  FLOPs  {r['flops']['before']:>10,} -> {r['flops']['after']:>10,}  ({r['flops']['ratio']:.3f}x)"]
        for part, d in r["parts"].items():
            lines.append(f"  {part:<9} {d['kept']:>5} / {d['channels']:<5} channels kept in {d['units']} units")
        return "\n".join(lines)


# ---- validation helpers ----------------------------------------------------------------------------
def _module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def _unknown_name(name: str, names: list[str], what: str, model: nn.Module) -> ValueError:
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    top = ", ".join(n for n, _ in model.named_children())
    return ValueError(f"{what}={name!r} is not a module of {type(model).__name__} (top-level modules: {top}){hint}")


def _resolve_parts(model: nn.Module, parts: Mapping | None) -> dict:
    """Part name -> str or tuple of str prefixes, each matching at least one module name."""
    if parts is None:
        parts = getattr(model, "parts", None)
        if not parts:
            raise ValueError("parts is required: name the module-name prefixes of the network's parts, "
                             "e.g. parts={'backbone': 'enc.', 'decoder': 'dec.'}")
    if not isinstance(parts, Mapping) or not parts:
        raise ValueError(f"parts={parts!r} must be a non-empty mapping part name -> module-name prefix")
    names = _module_names(model)
    out = {}
    for part, prefix in parts.items():
        prefixes = [prefix] if isinstance(prefix, str) else list(prefix) if isinstance(prefix, (list, tuple)) else None
        if not prefixes or not all(isinstance(p, str) and p for p in prefixes):
            raise ValueError(f"parts[{part!r}]={prefix!r} must be a non-empty str or a list of non-empty str")
        for p in prefixes:
            if not any(n.startswith(p) for n in names):
                top = ", ".join(n for n, _ in model.named_children())
                raise ValueError(f"parts[{part!r}]: prefix {p!r} matches no module of {type(model).__name__} "
                                 f"(top-level modules: {top}); prefixes are module names as in "
                                 f"model.named_modules(), e.g. 'enc.' for everything under model.enc")
        out[str(part)] = prefix if isinstance(prefix, str) else tuple(prefixes)
    return out


def _resolve_names(model: nn.Module, names, what: str) -> tuple[str, ...]:
    if names is None:
        return ()
    if isinstance(names, str):
        names = [names]
    known = _module_names(model)
    for n in names:
        if n not in known:
            raise _unknown_name(n, known, what, model)
    return tuple(names)


def _check_cls_forward(fn) -> None:
    if not callable(fn):
        raise TypeError(f"cls_forward={fn!r} must be a callable fn(model, x) -> class logits (N, K_cls)")
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        raise TypeError("cls_forward must take two arguments (model, x): MTP calls it on its own copy of the "
                        "network (W1 of Eq. 5), so it must not close over one particular instance") from None
    except ValueError:  # no signature available (some builtins): accept
        pass


def _default_cls_forward(backbone: str, head: str) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """fn(model, x): the deepest feature of module ``backbone`` (its output, or the last element of a
    returned list/tuple), global-average-pooled (N, C, h, w) -> (N, C), then module ``head`` -> (N, K_cls)."""
    def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        feat = model.get_submodule(backbone)(x)
        if isinstance(feat, (list, tuple)):
            feat = feat[-1]
        if not isinstance(feat, torch.Tensor) or feat.dim() not in (2, 4):
            raise TypeError(f"the default classification forward needs module {backbone!r} to return a tensor "
                            f"(N, C, h, w) or a list/tuple ending with one; pass cls_forward=fn(model, x) instead")
        if feat.dim() == 4:
            feat = torch.flatten(F.adaptive_avg_pool2d(feat, 1), 1)
        return model.get_submodule(head)(feat)
    return forward


def _method_config(method: str, method_cfg: Mapping | None) -> dict:
    """The ``method:`` section: :data:`segprune.config.DEFAULTS` merged with ``method_cfg``, checked
    by the config's own rules (``segprune.config.validate``: shared keys, the method's options and
    its own checks).

    Raises:
        ValueError: unknown keys or bad values, all listed.
    """
    unknown: list[str] = []
    sec = merge(DEFAULTS["method"], {**dict(method_cfg or {}), "name": method}, "method.", unknown)
    full = merge(DEFAULTS, {"method": sec})
    bad = [p for p in validate(full, raise_error=False) if p.startswith("method.")]
    bad += [f"{k}: unknown key (known: {', '.join(sorted(DEFAULTS['method']))})" for k in unknown]
    if bad:
        raise ValueError("invalid method_cfg:\n  " + "\n  ".join(bad))
    return sec


def _finetune_config(finetune) -> dict:
    """``finetune`` argument -> {"cls": cfg or None, "seg": cfg or None} (segprune.config rules)."""
    if finetune is None or finetune is False:
        return {"cls": None, "seg": None}
    if finetune is True:
        finetune = {"cls": {}, "seg": {}}
    if not isinstance(finetune, Mapping) or set(finetune) - {"cls", "seg"}:
        raise ValueError(f"finetune={finetune!r} must be None, True or a mapping with keys 'cls' and/or 'seg' "
                         f"(each a dict of epochs, lr, momentum, weight_decay, max_iters_per_epoch, or None)")
    unknown: list[str] = []
    sec = merge(DEFAULTS["finetune"], {k: v for k, v in finetune.items() if v}, "finetune.", unknown)
    bad = [p for p in validate(merge(DEFAULTS, {"finetune": sec}), raise_error=False) if p.startswith("finetune.")]
    bad += [f"{k}: unknown key" for k in unknown]
    if bad:
        raise ValueError("invalid finetune:\n  " + "\n  ".join(bad))
    return {k: (sec[k] if finetune.get(k) not in (None, False) else None) for k in ("cls", "seg")}


def _input_size(input_size, seg_loader) -> tuple[int, int]:
    if input_size is None:
        ds = getattr(seg_loader, "dataset", None)
        if ds is None or len(ds) == 0:
            raise ValueError("input_size=(H, W) is required (it cannot be read from seg_loader.dataset[0])")
        input_size = tuple(ds[0][0].shape[-2:])
    if (not isinstance(input_size, (list, tuple)) or len(input_size) != 2
            or not all(isinstance(v, int) and v > 0 for v in input_size)):
        raise ValueError(f"input_size={input_size!r} must be (H, W) with positive integers")
    return int(input_size[0]), int(input_size[1])


@contextlib.contextmanager
def _attached(model: nn.Module, attrs: dict[str, Any]) -> Iterator[nn.Module]:
    """Set plain attributes on ``model`` for the duration of the block; restore the previous state.

    Raises:
        ValueError: an attribute name is taken by a submodule, parameter or buffer of ``model``.
    """
    for k in attrs:
        if k in model._modules or k in model._parameters or k in model._buffers:
            raise ValueError(f"{type(model).__name__} has a submodule/parameter/buffer named {k!r}, which segprune "
                             f"uses as an attribute while pruning; rename it or wrap the model")
    saved = {k: model.__dict__[k] for k in attrs if k in model.__dict__}
    try:
        for k, v in attrs.items():
            object.__setattr__(model, k, v)
        yield model
    finally:
        for k in attrs:
            if k in saved:
                object.__setattr__(model, k, saved[k])
            else:
                model.__dict__.pop(k, None)


def _attach_for(model: nn.Module, setup: dict, cls_forward):
    """:func:`_attached` with the attributes a resolved ``setup`` asks for (see :class:`PruneResult`).

    ``forward_cls`` is attached as a method bound to ``model``: a deep copy of the model (MTP's W1)
    re-binds it to the copy, so the classification task runs on the copy's parameters.
    """
    attrs = {"parts": setup["parts"], "never_prune": tuple(setup["never_prune"]),
             "input_channels": setup["input_channels"]}
    if setup.get("cls_head"):
        fn = cls_forward or _default_cls_forward(setup["default_cls_backbone"], setup["cls_head"][0])

        def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
            return fn(self, x)
        attrs["cls_head"] = tuple(setup["cls_head"])
        attrs["forward_cls"] = types.MethodType(forward_cls, model)
    return _attached(model, attrs)


def _output_check(model: nn.Module, size, in_channels: int, num_classes, when: str) -> tuple:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, in_channels, *size, device=model_device(model)))
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{when}: model(x) must return logits (N, K, H, W) for x (N, {in_channels}, H, W); got {got}")
    if num_classes is not None and out.shape[1] != int(num_classes):
        raise ValueError(f"{when}: model(x) returns {out.shape[1]} channels, num_classes={num_classes}")
    return tuple(out.shape)


# ---- the public API -------------------------------------------------------------------------------
def prune_model(model: nn.Module, method: str = "mtp", *, keep_ratio: float | None = None,
                target_flops_ratio: float | None = None, flops_tolerance: float = 0.01,
                parts: Mapping[str, str | Sequence[str]] | None = None, never_prune: Sequence[str] | None = None,
                seg_loader=None, num_classes: int | None = None, cls_head: str | Sequence[str] | None = None,
                cls_forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None, cls_loader=None,
                input_size: tuple[int, int] | None = None, in_channels: int = 3, threshold_mode: str = "ind",
                min_channels: int = 1, include_coupled: bool = False, ignore_index: int = 255,
                method_cfg: Mapping | None = None, finetune: bool | Mapping | None = None, calib_loader=None,
                round_to: int = 1, amp: str = "off",
                seed: int | None = None, inplace: bool = False, quiet: bool = True,
                log_dir: str | Path | None = None) -> PruneResult:
    """Prune the channels of ``model`` with ``method`` and remove them physically (Algorithm 1, lines 1-10,
    and optionally line 11's fine-tuning).

    Args:
        model: any ``nn.Module`` mapping images (N, in_channels, H, W) to logits (N, K, H', W'); its
            prunable units are convolutions followed by a BatchNorm (the γ that MTP and Slimming rank by).
            Not changed unless ``inplace``.
        method: ``"mtp"`` (multi-task: classification + segmentation, MTP paper Eqs. 5-10) or a
            single-task method of ``segprune.methods``: ``"slimming"``, ``"uniform"``, ``"thinet"``,
            ``"fpgm"``, ``"cap"``, ``"sirfp"``, ``"acosp"``.
        keep_ratio: fraction p in (0, 1) of the prunable channels to keep (per part with
            ``threshold_mode="ind"``, overall with ``"uni"``; per layer for Uniform/ThiNet/FPGM).
        target_flops_ratio: instead of ``keep_ratio``: wanted FLOPs(pruned)/FLOPs(unpruned) in (0, 1),
            reached by bisecting the keep ratio of the method's own selection rule
            (``segprune.pruning.search.search_keep_ratio``, docs/methods_flops_target.md) within
            ``flops_tolerance`` (absolute).
        parts: part name -> module-name prefix or list of prefixes, e.g. ``{"backbone": "enc.",
            "decoder": "dec."}``; default: ``model.parts`` (zoo models). MTP needs ``"backbone"``.
        never_prune: module names whose output channels are kept (default: ``model.never_prune`` or none).
        seg_loader: segmentation training batches (x float (N, C, H, W), y long (N, H, W), void =
            ``ignore_index``), a DataLoader or a list of such tuples; needed by methods that train (MTP, Slimming, CAP, SIRFP, ACoSP) and by
            segmentation fine-tuning; also ThiNet/SIRFP's calibration data unless ``calib_loader``.
        num_classes: K; if given, the output channels are checked before and after pruning.
        cls_head: module name (or names) of the classification head, e.g. ``"enc_fc"``: parameters
            trained only by the classification task (W1's head in MTP, not tied to W3).
        cls_forward: ``fn(model, x) -> (N, K_cls)`` logits through the backbone and the head, called
            on the model or on MTP's copy W1 (hence the ``model`` argument). Default: the output of the
            module named by ``parts["backbone"]`` (a tensor, or the last element of a list/tuple),
            global-average-pooled, then ``cls_head`` — which needs that prefix to name one module.
        cls_loader: classification batches (x (N, C, h, w), y long (N,)); MTP's Eq. 7 and the
            classification fine-tuning.
        input_size: (H, W) used to trace the network (DepGraph) and to count FLOPs; default: the size
            of ``seg_loader.dataset[0]``.
        in_channels: image channels C of the traced input (default 3).
        threshold_mode: ``"ind"`` (one percentile threshold per part, the MTP paper's default, Table 4)
            or ``"uni"`` (one global threshold).
        min_channels: every unit keeps at least this many channels (>= 1).
        include_coupled: also prune residual-coupled groups (convolutions joined by an addition).
        ignore_index: void label of the segmentation targets.
        method_cfg: the method's hyper-parameters, the keys of the ``method:`` config section
            (docs/methods.md; e.g. MTP ``epochs, lr_seg, lr_cls, lam, alpha1, alpha2, mu0, rho, mu_max,
            update_every, l1_mode, keep_copy``; for MTP, Slimming and CAP the ℓ1 schedule ``l1_schedule``
            (growing, or the paper's constant), ``l1_eps``, ``l1_ramp``; Slimming ``alpha``; ``options`` for CAP/SIRFP/ACoSP),
            over ``segprune.config.DEFAULTS["method"]``.
        finetune: None/False (no fine-tuning), True (defaults) or {"cls": {...}, "seg": {...}} over
            ``DEFAULTS["finetune"]`` (epochs, lr, momentum, weight_decay, max_iters_per_epoch): the
            pruned network is trained on classification (backbone + head, needs ``cls_head`` and
            ``cls_loader``; skipped otherwise and the report says why), then on segmentation.
        calib_loader: calibration images for ThiNet/SIRFP (default ``seg_loader``).
        amp: mixed precision of the training phases (``"off"``, ``"bf16"``, or ``"fp16"`` for a model
            on a CUDA device): forward and loss under autocast, weights and γ in float32
            (``segprune.engine.amp``).
        round_to: round every pruned unit's width to a multiple of this (1 = off; 8 or 16 for
            kernels that are faster on aligned widths), adding back the best-ranked or dropping the
            worst-ranked channels; inside a FLOPs-target search the target is met after rounding.
        seed: if given, ``torch.manual_seed`` before each training phase (as the pipeline does).
        inplace: prune ``model`` itself instead of a deep copy.
        quiet / log_dir: console output and optional per-phase log files (``<log_dir>/<phase>.log``).

    Returns:
        :class:`PruneResult` (pruned model, report, widths, setup).

    Raises:
        ValueError: every check below runs before any training: unknown method; neither or both of
            ``keep_ratio`` / ``target_flops_ratio``; ``keep_ratio`` or ``target_flops_ratio`` outside
            (0, 1); a ``parts`` prefix that matches no module; a ``never_prune`` or ``cls_head`` name
            that is no module; MTP without ``parts["backbone"]``, classification head
            (``cls_head``) or data (``cls_loader``, ``seg_loader``); a training method without
            ``seg_loader``; bad ``method_cfg`` / ``finetune`` keys or values; a model output that is
            not (N, K, H, W) or has K != ``num_classes``; no prunable unit at all.
        TypeError: ``cls_forward`` not callable as fn(model, x); ``seg_loader`` / ``cls_loader`` a one-shot
            iterator (a generator) or without ``len`` (pass a DataLoader or a list of batches).
    """
    t_start = time.perf_counter()
    # ---- every check that can fail happens before anything is trained ---------------------------
    budget, size, setup, has_cls, meth, ft = _checked_arguments(
        model, method, keep_ratio, target_flops_ratio, flops_tolerance, threshold_mode, min_channels, round_to, parts,
        never_prune, cls_head, cls_forward, in_channels, input_size, seg_loader, cls_loader, method_cfg, finetune)
    work = model if inplace else copy.deepcopy(model)
    was_training = work.training
    logs: dict[str, StageLog] = {}

    def log(phase: str) -> StageLog:
        logs[phase] = StageLog(phase, Path(log_dir) if log_dir else None, quiet=quiet)
        return logs[phase]

    if amp not in AMP_MODES or (amp == "fp16" and model_device(work).type != "cuda"):
        raise ValueError(f"amp={amp!r} must be one of {', '.join(AMP_MODES)} (fp16 only for a model on a CUDA device)")
    with _attach_for(work, setup, cls_forward), amp_mode(amp):
        out_shape = _output_check(work, size, in_channels, num_classes, "before pruning")
        if setup["cls_head"]:
            _cls_output_check(work, size, in_channels)
        params0, flops0 = count_params(work), count_flops(work, size, in_channels)["flops"]
        widths0 = layer_widths(work)
        graph = build_graph(work, size)  # training changes weights, not structure: the graph is reused
        units = discover_units(work, graph, include_coupled)
        empty_parts = parts_without_units(work, graph, units, include_coupled)  # e.g. a LayerNorm encoder
        if not units:
            why = "".join(f"; {p}: {r}" for p, r in empty_parts.items())
            raise ValueError(f"{type(work).__name__} has no prunable unit: segprune prunes the output channels of "
                             f"Conv2d layers followed by a BatchNorm, outside never_prune={list(setup['never_prune'])}"
                             + why)
        for part, why in empty_parts.items():
            warnings.warn(f"part {part!r} of {type(work).__name__}: {why}", stacklevel=2)
        # ---- Algorithm 1 (segprune.algorithm, shared with the CLI) --------------------------------
        lg = log("sparsity")
        sparsity = sparsify(meth, work, units, seg_loader, cls_loader, ignore_index, lg, budget, size, seed=seed,
                            flops_unpruned=flops0)
        wall = {"sparsity": round(lg.elapsed(), 2)}
        lg = log("prune")
        kept, flops_target = choose_widths(meth, work, units, budget, size,
                                           calib_loader=calib_loader if calib_loader is not None else seg_loader,
                                           log=lg.write, training_search=sparsity.pop("flops_search", None),
                                           flops_unpruned=flops0)
        if budget.target_flops_ratio is not None:
            keep_ratio = flops_target["keep_ratio_found"]
        gamma_share, compensation = removed_gamma_share(work, units, kept), {}  # before removal (in place)
        remove(meth, work, units, kept, graph, lg, input_size=size, record=compensation)
        spec = widths_spec(units, kept, include_coupled)
        out_after = _output_check(work, size, in_channels, num_classes, "after pruning")
        if out_after[1] != out_shape[1]:
            raise ValueError(f"pruning changed the number of output classes {out_shape[1]} -> {out_after[1]}: "
                             f"add the final classifier layer to never_prune")
        params1, flops1 = count_params(work), count_flops(work, size, in_channels)["flops"]
        wall["prune"] = round(lg.elapsed(), 2)
        ft_report = _finetune(work, ft, has_cls, cls_loader, seg_loader, ignore_index, log, seed)
        work.train(was_training)

    report = {
        "method": method, "keep_ratio": keep_ratio, "threshold_mode": threshold_mode, "min_channels": min_channels,
        "round_to": round_to, "input_size": list(size), "in_channels": in_channels,
        "output_shape": [None, *out_after[1:]],
        "params": {"before": params0, "after": params1, "ratio": params1 / params0},
        "flops": {"before": flops0, "after": flops1, "ratio": flops1 / flops0},
        "macs": {"before": flops0 // 2, "after": flops1 // 2},
        "flops_note": "FLOPs count one multiply-add as 2 FLOPs (torch.utils.flop_counter); MACs = FLOPs / 2",
        "units": spec["units"], "parts": kept_per_part(units, kept), "parts_without_units": empty_parts,
        "removed_gamma_share": gamma_share, "compensation": compensation,
        "layer_widths": {"before": widths0, "after": layer_widths(work)},
        "sparsity": {k: v for k, v in sparsity.items() if isinstance(v, (int, float, str, bool))},
        "flops_target": flops_target if budget.target_flops_ratio is not None else None, "finetune": ft_report,
        "wall_s": {**wall, **{k: round(v.elapsed(), 2) for k, v in logs.items() if k.startswith("finetune")},
                   "total": round(time.perf_counter() - t_start, 2)},
    }
    return PruneResult(model=work, report=report, widths=spec, setup=_public_setup(setup))


def _checked_arguments(model, method, keep_ratio, target_flops_ratio, flops_tolerance, threshold_mode, min_channels,
                       round_to, parts, never_prune, cls_head, cls_forward, in_channels, input_size, seg_loader,
                       cls_loader, method_cfg, finetune) -> tuple:
    """Every check of :func:`prune_model` that can fail before anything is trained.

    Returns:
        ``(budget, input size (H, W), setup, has_cls, method instance, finetune config)``.

    Raises:
        ValueError, TypeError: as listed in :func:`prune_model`.
    """
    known = method_names()
    if method not in known:
        raise ValueError(f"method={method!r} is not a known pruning method; known: {', '.join(known)}")
    if (keep_ratio is None) == (target_flops_ratio is None):
        raise ValueError("give exactly one of keep_ratio (fraction of channels kept, in (0, 1)) and "
                         "target_flops_ratio (fraction of FLOPs kept, in (0, 1))")
    budget = Budget(keep_ratio=keep_ratio, target_flops_ratio=target_flops_ratio, flops_tolerance=flops_tolerance,
                    threshold_mode=threshold_mode, min_channels=min_channels, round_to=round_to)
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels={in_channels!r} must be a positive integer")
    for what, loader in (("seg_loader", seg_loader), ("cls_loader", cls_loader)):
        if loader is not None:  # a DataLoader or a list of batches; not a one-shot generator
            check_loader(loader, what)
    size = _input_size(input_size, seg_loader)
    setup = _resolve_setup(model, parts, never_prune, cls_head, cls_forward, in_channels, size)
    if cls_forward is not None:
        _check_cls_forward(cls_forward)
    has_cls = bool(setup["cls_head"]) or has_cls_forward(model)
    meth = build_method(_method_config(method, method_cfg), input_size=size)
    _check_method_inputs(meth, setup, has_cls, seg_loader, cls_loader)
    ft = _finetune_config(finetune)
    if ft["seg"] is not None and seg_loader is None:
        raise ValueError("finetune['seg'] needs seg_loader")
    return budget, size, setup, has_cls, meth, ft


def _cls_output_check(work: nn.Module, size, in_channels: int) -> None:
    """The attached classification forward must map (2, C, H, W) to logits (2, K_cls)."""
    was = work.training
    work.eval()
    try:
        with torch.no_grad():
            logits = work.forward_cls(torch.zeros(2, in_channels, *size, device=model_device(work)))
    finally:
        work.train(was)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 2:
        raise ValueError(f"the classification forward must return logits (N, K_cls); got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")


def _check_method_inputs(meth: PruningMethod, setup: dict, has_cls: bool, seg_loader, cls_loader) -> None:
    """What the method needs besides the network: a classification task (MTP) or segmentation data.

    Raises:
        ValueError: the missing pieces, all named.
    """
    if meth.needs_classification:
        missing = []
        if "backbone" not in setup["parts"]:
            missing.append("parts['backbone'] (the module-name prefix of the part shared with classification)")
        if not has_cls:
            missing.append("cls_head (module name of the classification head, e.g. 'enc_fc'; with cls_forward="
                           "fn(model, x) if the default pooled-backbone forward does not fit)")
        if cls_loader is None:
            missing.append("cls_loader (classification batches (x, y))")
        if seg_loader is None:
            missing.append("seg_loader (segmentation batches (x, y))")
        if missing:
            raise ValueError(f"{meth.name.upper()} ({type(meth).__name__}) needs a classification task next to "
                             "segmentation; missing: "
                             + "; ".join(missing) + ". Without classification data use a single-task method, "
                             "e.g. method='slimming', 'fpgm', 'thinet' or 'uniform'.")
    if type(meth).train is not PruningMethod.train and seg_loader is None:
        raise ValueError(f"method {meth.name!r} trains on segmentation data before scoring: seg_loader is required")


def _finetune(work: nn.Module, ft: dict, has_cls: bool, cls_loader, seg_loader, ignore_index: int, log, seed) -> dict:
    """Algorithm 1, line 11 with the phases ``ft`` asks for; a phase without its data is reported as skipped."""
    report: dict[str, Any] = {}
    if ft["cls"] is not None:
        if has_cls and cls_loader is not None:
            report["cls"] = finetune_classification(work, cls_loader, ft["cls"], log("finetune_cls"), seed=seed)
        else:
            report["cls"] = {"skipped": "no classification head (cls_head) or data (cls_loader)"}
    if ft["seg"] is not None:
        report["seg"] = finetune_segmentation(work, seg_loader, ft["seg"], ignore_index, log("finetune_seg"), seed=seed)
    return report


def _resolve_setup(model, parts, never_prune, cls_head, cls_forward, in_channels, size) -> dict:
    """Checked, JSON-able settings: parts, never_prune, cls_head, input size/channels."""
    parts = _resolve_parts(model, parts)
    never = _resolve_names(model, never_prune if never_prune is not None else getattr(model, "never_prune", ()),
                           "never_prune")
    heads = _resolve_names(model, cls_head, "cls_head")
    if cls_forward is not None and not heads:
        raise ValueError("cls_forward needs cls_head too: the head's parameters are trained by the classification "
                         "task only (MTP keeps them out of the W1 = W3 coupling)")
    default_backbone = None
    if heads and cls_forward is None:
        prefix = parts.get("backbone")
        name = prefix[:-1] if isinstance(prefix, str) and prefix.endswith(".") else prefix
        if len(heads) != 1 or not isinstance(name, str) or name not in _module_names(model):
            raise ValueError(f"the default classification forward needs one cls_head and parts['backbone'] naming one "
                             f"module (e.g. 'enc.' for model.enc); got cls_head={list(heads)}, "
                             f"parts['backbone']={prefix!r}; pass cls_forward=fn(model, x) -> (N, K_cls) instead")
        default_backbone = name
    return {"parts": parts, "never_prune": list(never), "cls_head": list(heads),
            "cls_forward": None if not heads else ("custom" if cls_forward is not None else "default"),
            "default_cls_backbone": default_backbone, "input_size": list(size), "input_channels": int(in_channels)}


def _public_setup(setup: dict) -> dict:
    return {**setup, "parts": {k: (v if isinstance(v, str) else list(v)) for k, v in setup["parts"].items()}}


# ---- pickle-free save / load ----------------------------------------------------------------------
def save_pruned(result: PruneResult, folder: str | Path) -> Path:
    """Write ``result`` to ``folder``: ``model.safetensors`` (weights and BN statistics) and
    ``arch.json`` (format, the model's class name, setup, pruned widths, params/FLOPs of the report).

    Both files are written atomically (``segprune.checkpoint``); nothing is pickled.

    Returns:
        The folder as a ``Path``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_state_dict(folder / "model.safetensors", result.model.state_dict(), {"format": USER_ARCH_FORMAT})
    cls = type(result.model)
    r = result.report
    save_json(folder / "arch.json", {
        "format": USER_ARCH_FORMAT, "model_class": f"{cls.__module__}.{cls.__qualname__}",
        "setup": result.setup, "widths": result.widths,
        "report": {k: r.get(k) for k in ("method", "keep_ratio", "threshold_mode", "params", "flops", "parts")},
        "segprune_version": __version__})
    return folder


def load_pruned(model: nn.Module, folder: str | Path,
                cls_forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> nn.Module:
    """Rebuild a network saved by :func:`save_pruned` from a fresh, unpruned instance of its class.

    ``model`` is narrowed in place to the recorded widths (``segprune.pruning.apply_widths``: the
    same units are found again with the saved parts / never_prune / classification head, each keeps
    its first ``kept`` channels), then the weights are loaded strictly. Returns ``model``.

    Args:
        model: a new instance built with the same constructor arguments as the pruned one.
        folder: what :func:`save_pruned` wrote.
        cls_forward: the same ``fn(model, x)`` as at pruning time, if one was given then (it decides
            which layers the classification head reads, hence the head's pruned input width).

    Raises:
        CheckpointError: missing/corrupt files, another format, or widths/weights that do not fit
            ``model`` (another architecture or constructor arguments); the message names the file.
        ValueError: the network was pruned with a custom ``cls_forward`` and none is given.
    """
    folder = Path(folder)
    arch_path = folder / "arch.json"
    arch = load_json(arch_path)
    if not isinstance(arch, dict) or arch.get("format") != USER_ARCH_FORMAT:
        raise CheckpointError(f"{arch_path}: not a file written by segprune.api.save_pruned "
                              f"(expected format {USER_ARCH_FORMAT!r})")
    try:
        setup, widths = dict(arch["setup"]), arch["widths"]
        setup["parts"] = {k: (v if isinstance(v, str) else tuple(v)) for k, v in setup["parts"].items()}
        size = tuple(int(v) for v in setup["input_size"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{arch_path}: malformed setup/widths: {exc!r}") from None
    if setup.get("cls_forward") == "custom" and cls_forward is None:
        raise ValueError(f"{arch_path}: this network was pruned with a custom cls_forward; pass the same "
                         f"cls_forward=fn(model, x) to load_pruned")
    if cls_forward is not None:
        _check_cls_forward(cls_forward)
    with _attach_for(model, setup, cls_forward if setup.get("cls_forward") == "custom" else None):
        try:
            apply_widths(model, widths, size, source=str(arch_path))
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
    weights = folder / "model.safetensors"
    load_into_model(model, load_state_dict(weights), str(weights))
    return model
