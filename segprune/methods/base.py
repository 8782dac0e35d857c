"""The contract of a pruning method, and the registry of methods.

A :class:`PruningMethod` does two things for the Algorithm-1 core (``segprune.algorithm``):

* optional **sparsity training** (:meth:`PruningMethod.train`, Algorithm 1 lines 1-7 for MTP), in
  place, with an in-stage checkpoint the core passes;
* **scores**: unit name -> importance (C,) of the channels of every prunable unit
  (``segprune.pruning.discover_units``), from which :meth:`PruningMethod.select_from_scores` keeps

  * ``per_layer=True`` (Uniform, ThiNet, FPGM, ACoSP: their papers prune every layer by the same
    ratio): every unit keeps its ``round(p * C)`` best channels (at least ``min(min_channels, C)``),
    see :func:`per_layer_select`;
  * ``per_layer=False`` (MTP, Network Slimming, CAP, SIRFP): one percentile threshold per part
    ("ind") or over all units ("uni"), see ``segprune.pruning.thresholds.select_channels``.

A method reads its hyper-parameters from ``self.cfg``, a read-only view of the ``method:`` config
section that holds only ``name``, ``options`` and the keys listed in :attr:`PruningMethod.config_keys`
(missing ones take ``segprune.config.DEFAULTS["method"]``); reading any other key raises
:class:`UndeclaredKeyError`, so that every key a method depends on is in its stage fingerprint.
Every method, MTP included, registers itself with :func:`register_method`; adding a method is one
file in this package (docs/adding_a_method.md).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterator

import torch
from torch import nn

from ..pruning.groups import PruneUnit, unit_gammas
from ..pruning.thresholds import check_keep_ratio, select_channels

__all__ = ["PruningMethod", "per_layer_select", "METHODS", "register_method", "build_method", "method_class",
           "method_config", "method_names", "MethodConfig", "UndeclaredKeyError", "check_method_config", "training_budget"]


class UndeclaredKeyError(KeyError):
    """A method read a ``method:`` key that is not in its ``config_keys``."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class MethodConfig(Mapping):
    """Read-only view of a ``method:`` config section restricted to what one method declares.

    Holds ``name``, ``options`` and every key of ``declared``; a declared key missing from
    ``cfg`` takes its value from ``segprune.config.DEFAULTS["method"]``.

    Raises:
        UndeclaredKeyError: (on ``view[key]`` / ``view.get(key)``) ``key`` is not declared; the
            message names the method and tells to add the key to its ``config_keys``.
    """

    def __init__(self, cfg: Mapping, method: str, declared: tuple[str, ...]):
        from ..config import DEFAULTS
        defaults = DEFAULTS["method"]
        cfg = dict(cfg or {})
        self._method = method
        self._data: dict[str, Any] = {"name": cfg.get("name", method), "options": dict(cfg.get("options") or {})}
        for k in declared:
            self._data[k] = cfg[k] if k in cfg else defaults.get(k)

    def _undeclared(self, key) -> UndeclaredKeyError:
        return UndeclaredKeyError(
            f"method {self._method!r} reads method.{key}, which is not in its config_keys "
            f"({', '.join(k for k in self._data if k not in ('name', 'options')) or 'none'}): add it to "
            f"{self._method}'s config_keys so that it enters the stage fingerprint")

    def __getitem__(self, key):
        if key not in self._data:
            raise self._undeclared(key)
        return self._data[key]

    def get(self, key, default=None):
        """As ``dict.get`` for declared keys (``default`` is ignored: declared keys always have a value).

        Raises:
            UndeclaredKeyError: ``key`` is not declared.
        """
        return self[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"MethodConfig({self._data!r})"


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
    """One pruning method. Subclasses set :attr:`name` (and :func:`register_method` them), declare
    the ``method:`` keys they read in :attr:`config_keys`, and implement :meth:`scores`; a method
    that trains overrides :meth:`train`.

    What the Algorithm-1 core (``segprune.algorithm``) calls, in order: :meth:`validate_config`
    (via ``segprune.config.validate``, before anything runs), the constructor,
    :meth:`set_training_keep_ratio` (only with :attr:`widths_fixed_in_training`), :meth:`train`,
    :meth:`trained_state` (stored with the sparsity stage) / :meth:`load_trained_state` (a run
    resumed after that stage), :meth:`scores` then :meth:`select_from_scores` (once per keep ratio
    a FLOPs-target search probes), and :meth:`after_prune` on the physically pruned network.

    Args:
        cfg: the ``method:`` config section (a mapping; ``cfg["name"]`` selects the class in
            :func:`build_method`). Seen by the method as ``self.cfg`` (:class:`MethodConfig`: only
            ``name``, ``options`` and :attr:`config_keys`).
        input_size: (H, W) at which the network is traced and its FLOPs counted (methods that trace
            the network themselves, e.g. ThiNet, use it); default (64, 64).
    """

    name: str = "base"
    per_layer: bool = True
    #: method-specific options read from ``method.options`` (name -> default); a key not listed here
    #: is a config error. Subclasses may add range checks in :meth:`validate_options`.
    OPTIONS: dict = {}
    #: the ``method:`` keys this method reads. They, and nothing else, are visible in ``self.cfg``
    #: and enter the stage fingerprints (runs differing only in another method's keys share stages).
    config_keys: tuple[str, ...] = ()
    #: keys of :attr:`config_keys` added after run folders existed (key -> default): at their default they
    #: stay out of the stage fingerprints, so those runs keep theirs (MTP's ``cls_weight``)
    FINGERPRINT_DEFAULTS: dict = {}
    #: True when the widths are decided before :meth:`train` (ACoSP trains masks for a fixed k per
    #: unit): a FLOPs target is then met by choosing the training keep ratio with
    #: :meth:`fixed_widths` before training (``segprune.pruning.search.search_training_keep_ratio``),
    #: not by bisecting :meth:`select_from_scores` after it.
    widths_fixed_in_training: bool = False
    #: True when :meth:`train` needs a classification task besides segmentation (MTP, Eq. 5): a
    #: classification head on the network and a classification loader.
    needs_classification: bool = False
    #: file (in the sparsity stage folder) that held :meth:`trained_state` in run folders written
    #: before ``method_state.safetensors`` existed for this method (MTP: ``scores.safetensors``).
    legacy_state_file: str | None = None

    def __init__(self, cfg: Mapping, input_size: tuple[int, int] | None = None):
        self.cfg = MethodConfig(cfg, self.name, tuple(self.config_keys))
        #: ``method.options`` merged over :attr:`OPTIONS`
        self.options = {**self.OPTIONS, **self.cfg["options"]}
        self.input_size = tuple(int(v) for v in (input_size or (64, 64)))

    @classmethod
    def validate_options(cls, options: dict) -> list[str]:
        """Range/type problems of the merged options, one string per bad key (default: none)."""
        return []

    @classmethod
    def validate_config(cls, cfg: Mapping) -> list[str]:
        """Problems of this method's own ``method:`` keys that span several keys or belong to this
        method alone (e.g. MTP's ``lr * mu_max < 1``), as ``"method.<key>=<value>: why"`` strings;
        run by ``segprune.config.validate`` only when ``method.name`` is this method. Default: none."""
        return []

    @classmethod
    def trains_for_budget(cls, cfg: Mapping) -> bool:
        """True when :meth:`train` depends on the pruning budget it is given (the γ methods with
        ``l1_schedule: growing``), so that their sparsity stage must be fingerprinted with the
        budget (:func:`training_budget`). ``cfg``: the ``method:`` section. Default: False."""
        return False

    @property
    def training_keep_ratio(self) -> float | None:
        """The keep ratio :meth:`train` was configured with (methods with
        :attr:`widths_fixed_in_training`), None when it is left to the budget (the core then sets
        ``prune.keep_ratio`` with :meth:`set_training_keep_ratio`). Default: None."""
        return None

    def train(self, model: nn.Module, units: list[PruneUnit], seg_loader, cls_loader, ignore_index: int, log,
              ckpt=None, budget=None) -> dict:
        """Optional sparsity training of ``model`` in place before scoring (default: nothing, ``{}``).

        Args:
            model: the segmentation network, images (N, C, H, W) -> logits (N, K, H, W).
            units: its prunable units.
            seg_loader: segmentation batches (x (N, C, H, W) float, y (N, H, W) long).
            cls_loader: classification batches (x (N, C, h, w), y (N,)) or None; used only by a
                method with :attr:`needs_classification`.
            ignore_index: void label of y.
            log: a ``segprune.engine.log.StageLog``.
            ckpt: ``segprune.engine.resume.StageCheckpoint`` or None: save every ``ckpt.every``
                iterations and resume from it if present (``engine.train.train_loop`` does both).
            budget: the pruning budget (``segprune.algorithm.Budget``: keep_ratio or
                target_flops_ratio, threshold_mode, min_channels, round_to) that the channels will
                be removed for, or None (not known: e.g. a method called on its own). The γ methods
                use it for the growing ℓ1 schedule (``segprune.methods.sparsity``): the channels that
                :meth:`select_from_scores` would remove at this budget are driven to zero during
                training; with None they fall back to the papers' constant α. ``algorithm.sparsify``
                passes it only to a ``train`` that declares this keyword (methods written before it
                existed keep working).

        Returns:
            JSON-able statistics recorded in the sparsity stage's done.json (losses, iterations, ...).
        """
        return {}

    def seg_training_config(self) -> dict:
        """``engine.train.train_segmentation`` settings of a sparsity training on segmentation:
        ``epochs``, ``lr`` (= method.lr_seg, poly decay with power 0.9), ``momentum``,
        ``weight_decay``, ``max_iters_per_epoch``, all read from ``self.cfg`` (so they must be in
        :attr:`config_keys`).

        Raises:
            UndeclaredKeyError: one of these keys is not declared.
        """
        c = self.cfg
        return {"epochs": int(c["epochs"]), "lr": float(c["lr_seg"]), "momentum": float(c["momentum"]),
                "weight_decay": float(c["weight_decay"]), "power": 0.9, "max_iters_per_epoch": c["max_iters_per_epoch"]}

    def scores(self, model: nn.Module, units: list[PruneUnit], calib_loader=None) -> dict[str, torch.Tensor]:
        """Unit name -> importance (C,) float tensor, larger = more important."""
        raise NotImplementedError

    def gamma_record(self, model: nn.Module, units: list[PruneUnit]) -> dict[str, torch.Tensor]:
        """Unit name -> |γ| (C,) after sparsity training, as this method reads the scaling factors
        (stored as ``scores.safetensors`` with the sparsity stage, for analysis). Default:
        ``unit_gammas(model, units)``."""
        return unit_gammas(model, units)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What :meth:`train` learned besides the model weights and :meth:`scores` needs (SIRFP's
        redundancy EMAs, ACoSP's logits, MTP's γ1 of W1), as tensors; the pipeline stores it with the
        sparsity stage so a run resumed after that stage scores exactly as an uninterrupted one. Default: {}."""
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
        """Unit name -> sorted LongTensor of the channel indices to keep: :meth:`scores` followed by
        :meth:`select_from_scores` (what the core does, scoring once per pruning)."""
        scores = self.scores(model, units, calib_loader)
        return self.select_from_scores(scores, units, keep_ratio, threshold_mode, min_channels)

    def select_from_scores(self, scores: dict[str, torch.Tensor], units: list[PruneUnit], keep_ratio: float,
                           threshold_mode: str = "ind", min_channels: int = 1) -> dict[str, torch.Tensor]:
        """Unit name -> sorted LongTensor of the channels kept at ``keep_ratio`` given ``scores``.

        ``per_layer`` methods keep ``round(keep_ratio * C)`` channels of each unit
        (:func:`per_layer_select`; ``threshold_mode`` is ignored); the others use the percentile
        thresholds of ``select_channels`` with ``threshold_mode`` ("ind" or "uni"). The core
        scores once and calls this at every keep ratio a FLOPs-target search probes, so the kept
        sets must grow with ``keep_ratio``.

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
        if mod.name != "base":
            importlib.import_module(f"{methods.__name__}.{mod.name}")


def method_names() -> tuple[str, ...]:
    """Names of the registered methods (what ``method.name`` may be), MTP first."""
    _load_all()
    return tuple(sorted(METHODS, key=lambda n: (n != "mtp", n)))


def check_options(name: str, options: dict) -> list[str]:
    """Config problems of ``method.options`` for method ``name`` (unknown keys, bad values)."""
    _load_all()
    cls = METHODS.get(name)
    if cls is None:
        return [f"method.name={name!r}: no such method is registered (known: {', '.join(method_names())})"]
    bad = [f"method.options.{k}: unknown option of method {name!r} (known: {', '.join(sorted(cls.OPTIONS)) or 'none'})"
           for k in options if k not in cls.OPTIONS]
    return bad + [f"method.options: {p}" for p in cls.validate_options({**cls.OPTIONS, **options})]


def check_method_config(cfg: Mapping) -> list[str]:
    """Problems of a ``method:`` section for the method it names: its options
    (:func:`check_options`) and its own cross-key checks (:meth:`PruningMethod.validate_config`)."""
    name = cfg.get("name")
    bad = check_options(name, cfg.get("options") or {}) if isinstance(cfg.get("options"), dict) else []
    cls = METHODS.get(name)
    if cls is not None:
        bad += cls.validate_config(MethodConfig(cfg, name, tuple(cls.config_keys)))
    return bad


def method_class(name: str) -> type[PruningMethod] | None:
    """The registered class of method ``name``, None for an unknown name."""
    _load_all()
    return METHODS.get(name)


def build_method(cfg: Mapping, input_size: tuple[int, int] | None = None) -> PruningMethod:
    """Instantiate the method named ``cfg["name"]`` with ``cfg`` (and ``input_size``, see :class:`PruningMethod`).

    Raises:
        ValueError: missing or unknown name (the message lists the known names).
    """
    _load_all()
    name = (cfg or {}).get("name")
    if name not in METHODS:
        raise ValueError(f"method.name={name!r} is not a known pruning method; known: {', '.join(method_names())}")
    return METHODS[name](cfg, input_size=input_size)


def training_budget(cfg: Mapping) -> dict | None:
    """The ``prune:`` keys that the sparsity training of ``cfg["method"]`` depends on, or None.

    For a method whose :meth:`PruningMethod.trains_for_budget` is true (the γ methods with the growing
    ℓ1 schedule drive the channels that this budget removes to zero): ``threshold_mode``,
    ``min_channels``, ``round_to`` and either ``keep_ratio`` or, under a FLOPs target,
    ``target_flops_ratio`` and ``flops_tolerance``. These belong in the sparsity stage's
    fingerprint: two runs with different budgets must not share that stage.
    """
    cls = method_class(cfg["method"]["name"])
    if cls is None or not cls.trains_for_budget(cfg["method"]):
        return None
    pr = cfg["prune"]
    keys = ("threshold_mode", "min_channels", "round_to") + (
        ("target_flops_ratio", "flops_tolerance") if pr.get("target_flops_ratio") is not None else ("keep_ratio",))
    out = {k: pr.get(k) for k in keys}
    if int(out.get("round_to") or 1) == 1:  # no rounding: as configs written before round_to existed
        out.pop("round_to")
    return out


def method_config(cfg: Mapping) -> dict:
    """The part of a ``method:`` section that the named method reads (name + its ``config_keys``,
    + its options if it has any): what enters the sparsity stage's fingerprint."""
    _load_all()
    name = cfg["name"]
    cls = METHODS[name]
    late = cls.FINGERPRINT_DEFAULTS  # keys added later: absent or at their default, they stay out
    out = {"name": name, **{k: cfg.get(k) for k in cls.config_keys
                            if not (k in late and cfg.get(k, late[k]) == late[k])}}
    opts = {**cls.OPTIONS, **(cfg.get("options") or {})}
    if opts:  # only methods with options: the fingerprints of the others stay as they were
        out["options"] = opts
    return out
