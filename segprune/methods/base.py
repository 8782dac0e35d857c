"""Common interface of the baseline pruning criteria (Uniform, Network Slimming, ThiNet, FPGM).

A :class:`PruningMethod` ranks the channels of every prunable unit
(``segprune.pruning.discover_units``) and chooses which to keep:

* ``per_layer=True`` (Uniform, ThiNet, FPGM — their papers prune every layer by the same ratio):
  every unit keeps its ``round(p * C)`` best channels (at least ``min(min_channels, C)``),
  see :func:`per_layer_select`;
* ``per_layer=False`` (Network Slimming; MTP in ``mtp.py`` works the same way): one percentile
  threshold per part ("ind") or over all units ("uni"), see
  ``segprune.pruning.thresholds.select_channels``.

MTP keeps its own entry points in ``segprune.methods.mtp`` and is not registered here.
"""
from __future__ import annotations

import torch
from torch import nn

from ..pruning.groups import PruneUnit
from ..pruning.thresholds import check_keep_ratio, select_channels

__all__ = ["PruningMethod", "per_layer_select", "METHODS", "register_method", "build_method", "method_class",
           "method_config"]


def per_layer_select(scores: dict[str, torch.Tensor], keep_ratio: float, min_channels: int = 1) -> dict[str, torch.Tensor]:
    """Keep the same fraction of channels in every unit.

    Args:
        scores: unit name -> importance (C,) (larger = more important).
        keep_ratio: fraction p in (0, 1); each unit keeps ``k = round(p * C)`` channels (Python
            ``round``, i.e. halves go to the even integer), but at least ``min(min_channels, C)``.
        min_channels: lower bound per unit (>= 1).

    Returns:
        unit name -> sorted LongTensor (k,) of the indices of the k highest-scoring channels
        (ties broken towards the lower channel index).

    Raises:
        ValueError: keep_ratio outside (0, 1) or min_channels < 1.
    """
    p = check_keep_ratio(keep_ratio)
    if int(min_channels) < 1:
        raise ValueError(f"prune.min_channels={min_channels!r} must be >= 1")
    kept = {}
    for name, s in scores.items():
        c = s.numel()
        k = max(int(round(p * c)), min(int(min_channels), c))
        top = torch.argsort(s.flatten().double(), descending=True, stable=True)[:k]
        kept[name] = torch.sort(top).values
    return kept


class PruningMethod:
    """One pruning criterion. Subclasses set ``name`` and ``per_layer`` and implement :meth:`scores`.

    Args:
        cfg: the ``method:`` config section (a dict; ``cfg["name"]`` selects the class in
            :func:`build_method`). Subclasses read their own options from it.
    """

    name: str = "base"
    per_layer: bool = True
    #: method-specific options read from ``method.options`` (name -> default); a key not listed here
    #: is a config error. Subclasses may add range checks in :meth:`validate_options`.
    OPTIONS: dict = {}
    #: the ``method:`` keys this method reads (they enter the stage fingerprints, so that runs
    #: differing only in another method's options still share their stages)
    config_keys: tuple[str, ...] = ()
    #: True when the widths are decided before :meth:`train` (ACoSP trains masks for a fixed k per
    #: unit): a FLOPs target is then met by choosing the training keep ratio with
    #: :meth:`fixed_widths` before training (``pipeline.search_training_keep_ratio``), not by
    #: bisecting :meth:`select_from_scores` after it.
    widths_fixed_in_training: bool = False

    def __init__(self, cfg: dict):
        self.cfg = dict(cfg or {})
        #: ``method.options`` merged over :attr:`OPTIONS`
        self.options = {**self.OPTIONS, **(self.cfg.get("options") or {})}

    @classmethod
    def validate_options(cls, options: dict) -> list[str]:
        """Range/type problems of the merged options, one string per bad key (default: none)."""
        return []

    def train(self, model: nn.Module, units: list[PruneUnit], seg_loader, cls_loader, ignore_index: int, log) -> None:
        """Optional sparsity training of ``model`` in place before scoring (default: nothing)."""
        return None

    def scores(self, model: nn.Module, units: list[PruneUnit], calib_loader=None) -> dict[str, torch.Tensor]:
        """Unit name -> importance (C,) float tensor, larger = more important."""
        raise NotImplementedError

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What :meth:`train` learned besides the model weights and :meth:`scores` needs (SIRFP's
        redundancy EMAs, ACoSP's logits), as tensors; the pipeline stores it with the sparsity
        stage so a run resumed after that stage scores exactly as an uninterrupted one. Default: {}."""
        return {}

    def load_trained_state(self, model: nn.Module, units: list[PruneUnit], tensors: dict[str, torch.Tensor],
                           source: str) -> None:
        """Restore :meth:`trained_state` for ``model`` (the trained model loaded from disk).

        Raises:
            CheckpointError: the tensors do not fit ``units`` (names ``source``).
        """
        return None

    def fixed_widths(self, units: list[PruneUnit], keep_ratio: float, min_channels: int = 1) -> dict[str, int]:
        """Unit name -> channels kept at ``keep_ratio``, for methods with :attr:`widths_fixed_in_training`.

        Raises:
            NotImplementedError: the method's widths follow from its scores (the default).
        """
        raise NotImplementedError(f"{self.name}: widths are chosen after training, from the scores")

    def set_training_keep_ratio(self, keep_ratio: float) -> None:
        """Set the keep ratio :meth:`train` uses (methods with :attr:`widths_fixed_in_training`).

        Raises:
            NotImplementedError: the method's training does not depend on a keep ratio (the default).
        """
        raise NotImplementedError(f"{self.name}: training does not depend on a keep ratio")

    def after_prune(self, model: nn.Module, log=None) -> None:
        """Optional change to the physically pruned ``model`` before fine-tuning (default: nothing)."""
        return None

    def select(self, model: nn.Module, units: list[PruneUnit], keep_ratio: float, threshold_mode: str = "ind",
               min_channels: int = 1, calib_loader=None) -> dict[str, torch.Tensor]:
        """Unit name -> sorted LongTensor of the channel indices to keep.

        ``per_layer`` methods keep ``round(keep_ratio * C)`` channels of each unit
        (:func:`per_layer_select`; ``threshold_mode`` is ignored); the others use the percentile
        thresholds of ``select_channels`` with ``threshold_mode`` ("ind" or "uni").
        Equivalent to :meth:`scores` followed by :meth:`select_from_scores`.
        """
        scores = self.scores(model, units, calib_loader)
        return self.select_from_scores(scores, units, keep_ratio, threshold_mode, min_channels)

    def select_from_scores(self, scores: dict[str, torch.Tensor], units: list[PruneUnit], keep_ratio: float,
                           threshold_mode: str = "ind", min_channels: int = 1) -> dict[str, torch.Tensor]:
        """The selection rule of :meth:`select` applied to precomputed ``scores`` (from :meth:`scores`).

        Lets a caller score once and select at many keep ratios (the FLOPs-target search of the
        pipeline's prune stage, ``prune.target_flops_ratio``), which matters for expensive scores
        (ThiNet's greedy, SIRFP's calibration). A method whose :meth:`select` is not "scores, then
        this rule" must override this too, or set :attr:`widths_fixed_in_training` (ACoSP).

        Raises:
            ValueError: keep_ratio outside (0, 1), min_channels < 1, unknown threshold_mode.
        """
        if self.per_layer:
            return per_layer_select(scores, keep_ratio, min_channels)
        return select_channels(scores, {u.name: u.part for u in units}, keep_ratio, threshold_mode, min_channels)


#: registry name -> class (filled by :func:`register_method` in each method's module).
METHODS: dict[str, type[PruningMethod]] = {}


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


def _load_all() -> None:
    """Import every module of ``segprune.methods`` so that each registers its class."""
    import importlib
    import pkgutil

    from .. import methods
    for mod in pkgutil.iter_modules(methods.__path__):
        if mod.name not in ("base", "mtp"):
            importlib.import_module(f"{methods.__name__}.{mod.name}")


def check_options(name: str, options: dict) -> list[str]:
    """Config problems of ``method.options`` for method ``name`` (unknown keys, bad values)."""
    _load_all()
    cls = METHODS.get(name)
    if cls is None:
        return [f"method.name={name!r}: no such method is registered (known: {', '.join(sorted(METHODS))})"]
    bad = [f"method.options.{k}: unknown option of method {name!r} (known: {', '.join(sorted(cls.OPTIONS)) or 'none'})"
           for k in options if k not in cls.OPTIONS]
    return bad + [f"method.options: {p}" for p in cls.validate_options({**cls.OPTIONS, **options})]


def method_class(name: str) -> type[PruningMethod] | None:
    """The registered class of method ``name``, None for MTP or an unknown name."""
    _load_all()
    return METHODS.get(name)


def build_method(cfg: dict) -> PruningMethod:
    """Instantiate the method named ``cfg["name"]`` with ``cfg``.

    Raises:
        ValueError: missing or unknown name (the message lists the known names).
    """
    _load_all()
    name = (cfg or {}).get("name")
    if name not in METHODS:
        raise ValueError(f"method.name={name!r} is not a known pruning method; known: {', '.join(sorted(METHODS))}"
                         " (MTP is run through segprune.methods.mtp)")
    return METHODS[name](cfg)


def method_config(cfg: dict) -> dict:
    """The part of a ``method:`` section that the named method reads (name + its ``config_keys``)."""
    from .mtp import MTP_CONFIG_KEYS
    _load_all()
    name = cfg["name"]
    keys = MTP_CONFIG_KEYS if name == "mtp" else METHODS[name].config_keys
    out = {"name": name, **{k: cfg.get(k) for k in keys}}
    opts = {} if name == "mtp" else {**METHODS[name].OPTIONS, **(cfg.get("options") or {})}
    if opts:  # only methods with options: the fingerprints of the others stay as they were
        out["options"] = opts
    return out
