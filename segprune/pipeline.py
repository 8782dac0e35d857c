"""Algorithm 1 of the MTP paper as resumable stages writing a self-contained run folder.

Stages (each writes ``stages/<stage>/`` with ``model.safetensors``, ``arch.json`` and, last,
``done.json``; a stage whose ``done.json`` exists is loaded instead of re-run):

1. ``pretrain_cls``  classification pre-training of the backbone (Eq. 1)
2. ``train_seg``     segmentation training of backbone + decoder (Eq. 2) -> the baseline
3. ``sparsity``      MTP sparsity training (Eqs. 5-10, Algorithm 1 lines 1-7)
4. ``prune``         thresholds on γ (Ind/Uni) and physical removal (lines 9-10)
5. ``finetune_cls``  fine-tune the pruned backbone on classification (line 11)
6. ``finetune_seg``  fine-tune the pruned network on segmentation (line 11)
7. ``evaluate``      mIoU, pixel accuracy, params, FLOPs, MACs, latency of baseline and pruned

The run folder holds ``config.yaml`` (resolved), ``logs/``, ``metrics.json`` and ``report.md``.

Under ``torchrun`` (several processes, ``engine.distributed``, docs/distributed.md) every rank runs
the same stages on its slice of each global batch; only rank 0 writes into the run folder (the
others wait at a barrier and read what it wrote), the prune stage's channel selection is rank 0's
(broadcast), evaluation is sharded and latency is measured by rank 0 alone.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from torch import nn

from . import __version__
from .checkpoint import CheckpointError, load_into_model, load_json, load_state_dict, save_json, save_state_dict, atomic_write_bytes
from .config import DEFAULTS, ConfigError, merge, read_yaml_mapping, validate
from .data import build_cls_dataset, build_seg_dataset, cls_num_classes, seg_num_classes
from .engine import distributed as ddp
from .engine.evaluate import evaluate_classification, evaluate_segmentation
from .engine.log import StageLog
from .engine.profile import count_flops, profile_model
from .engine.resume import StageCheckpoint
from .engine.train import make_loader, train_classification, train_segmentation
from .methods.base import build_method, method_class, method_config
from .methods.mtp import run_mtp
from .models import build_model
from .pruning import (apply_widths, build_graph, discover_units, layer_widths, prune_channels, round_kept, select_channels,
                      unit_gammas, widths_spec)
from .pruning.groups import parts_without_units

__all__ = ["Pipeline", "STAGES", "load_run_model", "ARCH_FORMAT", "stage_fingerprints", "baseline_seed",
           "search_keep_ratio", "search_training_keep_ratio", "pruned_flops", "stage_dir"]

STAGES = ("pretrain_cls", "train_seg", "sparsity", "prune", "finetune_cls", "finetune_seg", "evaluate")
ARCH_FORMAT = "segprune-arch/1"


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


#: Data keys that do not change what a stage computes (left out of the fingerprints).
_DATA_IGNORED = ("validate", "num_workers", "eval_batch_size", "eval_split")


def model_input_size(cfg: dict) -> tuple[int, int]:
    """(H, W) at which the network is traced for pruning and its FLOPs and latency are measured:
    ``data.seg.input_size``, or ``data.seg.crop_size`` when input_size is null (images kept at their
    native sizes, e.g. PASCAL VOC; the MTP paper's Table 2 counts DeepLabv3 FLOPs at the 513x513 crop)."""
    seg = cfg["data"]["seg"]
    return tuple(int(v) for v in (seg["input_size"] or seg["crop_size"]))


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    """``<run_dir>/stages/NN_<stage>``, NN the stage's 1-based position in :data:`STAGES`."""
    return Path(run_dir) / "stages" / f"{STAGES.index(stage) + 1:02d}_{stage}"


def baseline_seed(cfg: dict) -> int:
    """Seed of the baseline stages: ``train.seed``, or the top-level ``seed`` when that is null."""
    return int(cfg["seed"] if cfg["train"]["seed"] is None else cfg["train"]["seed"])


#: ``prune`` keys of the FLOPs target; without a target they change nothing and are left out of the
#: fingerprint, so that runs made before these keys existed keep their fingerprints (and share stages).
_FLOPS_TARGET_KEYS = ("target_flops_ratio", "flops_tolerance")


def _prune_fingerprint(pr: dict) -> dict:
    out = dict(pr)
    if pr.get("target_flops_ratio") is None:
        out = {k: v for k, v in out.items() if k not in _FLOPS_TARGET_KEYS}
    if int(pr.get("round_to", 1)) == 1:  # no rounding: the fingerprint of runs made before round_to existed
        out.pop("round_to", None)
    return out


#: ``eval`` keys of the test-time protocol with the values that mean "plain single-scale model(x)";
#: at these values they are left out of the fingerprint, so that runs made before they existed keep it.
_PLAIN_EVAL = {"scales": [1.0], "flip": False, "mode": "whole", "crop_size": None, "stride": None}


def _model_fingerprint(model: dict) -> dict:
    """``model`` section without ``pretrained: null`` and the ecosystem keys at their defaults
    (``encoder_name: null``, ``aux_loss: false``): runs made before those keys existed keep their fingerprint."""
    from .models.ecosystem import ECOSYSTEM_DEFAULTS
    defaults = {"pretrained": None, **ECOSYSTEM_DEFAULTS}
    return {k: v for k, v in model.items() if not (k in defaults and v == defaults[k] and type(v) is type(defaults[k]))}


def _eval_fingerprint(ev: dict) -> dict:
    return {k: v for k, v in ev.items() if not (k in _PLAIN_EVAL and v == _PLAIN_EVAL[k])}


def stage_fingerprints(cfg: dict) -> dict[str, str]:
    """Stage -> SHA-256 of every config value the stage's result depends on, chained over stages.

    Two runs whose fingerprints agree up to a stage computed identical results up to that stage,
    so a finished stage can be shared between them (``Pipeline(share=...)``, the sweep runner):
    the classification pre-training and the baseline depend on model, data, ``train`` and
    :func:`baseline_seed`; sparsity training adds ``method``, ``seed`` and which groups are
    prunable (and, for a method whose widths are fixed before training, ACoSP, the FLOPs target);
    pruning adds ``prune`` (with ``target_flops_ratio`` and ``flops_tolerance`` only when a
    FLOPs target is set); each fine-tuning adds its own section; evaluation ``eval``.
    """
    data = {sec: {k: v for k, v in d.items() if k not in _DATA_IGNORED} for sec, d in cfg["data"].items()}
    parts = {
        "pretrain_cls": {"model": _model_fingerprint(cfg["model"]), "data": data, "train": cfg["train"]["pretrain_cls"],
                         "seed": baseline_seed(cfg)},
        "train_seg": {"train": cfg["train"]["seg"]},
        "sparsity": {"method": method_config(cfg["method"]), "seed": cfg["seed"], "prune_coupled": cfg["prune"]["prune_coupled"]},
        "prune": {"prune": _prune_fingerprint(cfg["prune"])},
        "finetune_cls": {"finetune": cfg["finetune"]["cls"]},
        "finetune_seg": {"finetune": cfg["finetune"]["seg"]},
        "evaluate": {"eval": _eval_fingerprint(cfg["eval"]), "split": cfg["data"]["seg"]["eval_split"]},
    }
    if cfg["prune"].get("target_flops_ratio") is not None and \
            getattr(method_class(cfg["method"]["name"]), "widths_fixed_in_training", False):
        # ACoSP trains for the widths the FLOPs target gives: the target enters its sparsity stage
        parts["sparsity"]["flops_target"] = {k: cfg["prune"].get(k) for k in
                                             ("target_flops_ratio", "flops_tolerance", "min_channels")}
    out, prev = {}, ""
    for stage in STAGES:
        blob = json.dumps({"prev": prev, **parts[stage]}, sort_keys=True, default=str)
        prev = out[stage] = hashlib.sha256(blob.encode()).hexdigest()[:20]
    return out


def pruned_flops(model: nn.Module, units: list, kept: dict[str, torch.Tensor], input_size: tuple[int, int]) -> int:
    """FLOPs (2 per multiply-add, :func:`count_flops`) at ``input_size`` of ``model`` pruned to ``kept``.

    Exact: a deep copy is traced, pruned physically with ``prune_channels`` and counted; ``model``
    itself is not changed.
    """
    clone = copy.deepcopy(model)
    prune_channels(clone, units, kept, build_graph(clone, tuple(input_size)))
    return int(count_flops(clone, tuple(input_size), in_channels=int(getattr(model, "input_channels", 3)))["flops"])


def search_keep_ratio(model: nn.Module, units: list, select, target: float, tolerance: float,
                      input_size: tuple[int, int], max_probes: int = 14, log=None,
                      flops_unpruned: int | None = None) -> dict:
    """Find the keep ratio p whose selection prunes ``model`` to ``target`` x its FLOPs, by bisection.

    Args:
        model: the unpruned network (not changed).
        units: its prunable units.
        select: ``select(p) -> {unit name: kept indices}``, the method's selection rule on scores
            computed once (MTP: ``select_channels``; a ``PruningMethod``: ``select_from_scores``).
            The kept sets must grow with p (true of every rule here), so FLOPs(p) is non-decreasing.
        target: wanted FLOPs(pruned) / FLOPs(unpruned), in (0, 1).
        tolerance: absolute tolerance on that ratio (> 0); the search stops at the first probe
            within it.
        input_size: (H, W) at which FLOPs are counted.
        max_probes: at most this many keep ratios are tried (interval [0, 1] halved each time).
        log: optional ``log(str)``.
        flops_unpruned: FLOPs of ``model`` if already counted.

    Returns:
        {"kept", "target_flops_ratio", "flops_tolerance", "keep_ratio_found", "flops_ratio_achieved",
        "flops_target_met" (|achieved - target| <= tolerance), "flops_unpruned", "flops_pruned",
        "flops_probes" ([[p, ratio], ...] in probe order)}. When no probe lands within the tolerance
        (the channel counts are discrete, or min_channels bounds the ratio from below), the probe
        closest to the target is returned (ties: the one with fewer FLOPs) and ``flops_target_met``
        is False.

    Raises:
        ValueError: target outside (0, 1), tolerance <= 0 or max_probes < 1.
    """
    target, tolerance = float(target), float(tolerance)
    if not 0.0 < target < 1.0:
        raise ValueError(f"prune.target_flops_ratio={target!r} must lie in (0, 1)")
    if not tolerance > 0.0:
        raise ValueError(f"prune.flops_tolerance={tolerance!r} must be > 0")
    if int(max_probes) < 1:
        raise ValueError(f"max_probes={max_probes!r} must be >= 1")
    size = tuple(input_size)
    f0 = int(flops_unpruned) if flops_unpruned is not None else int(
        count_flops(model, size, in_channels=int(getattr(model, "input_channels", 3)))["flops"])
    order = {u.name: i for i, u in enumerate(units)}
    cache: dict[tuple, int] = {}  # FLOPs depend only on how many channels each unit keeps
    lo, hi = 0.0, 1.0
    probes, best = [], None
    for _ in range(int(max_probes)):
        p = (lo + hi) / 2.0
        kept = select(p)
        key = tuple(sorted((order.get(n, n), int(k.numel())) for n, k in kept.items()))
        if key not in cache:
            cache[key] = pruned_flops(model, units, kept, size)
        flops = cache[key]
        r = flops / f0
        probes.append([p, r])
        if log is not None:
            log(f"  probe {len(probes)}: keep ratio {p:.6f} -> FLOPs ratio {r:.4f}")
        cand = (abs(r - target), flops, p, r, kept)
        if best is None or cand[:2] < best[:2]:
            best = cand
        if abs(r - target) <= tolerance:
            break
        if r > target:
            hi = p
        else:
            lo = p
    _, flops, p, r, kept = best
    met = abs(r - target) <= tolerance
    if log is not None:
        if met:
            log(f"FLOPs target {target:g} met: keep ratio {p:.6f} gives FLOPs ratio {r:.4f} "
                f"(|diff| {abs(r - target):.4f} <= tolerance {tolerance:g}) after {len(probes)} probes")
        else:
            why = ("the smallest widths allowed by prune.min_channels give more FLOPs" if r > target and p < 0.01
                   else "the discrete channel counts allow no closer ratio")
            log(f"FLOPs target {target:g} NOT met within tolerance {tolerance:g}: {why}; using the closest "
                f"achieved ratio {r:.4f} (keep ratio {p:.6f}) after {len(probes)} probes")
    return {"kept": kept, "target_flops_ratio": target, "flops_tolerance": tolerance, "keep_ratio_found": p,
            "flops_ratio_achieved": r, "flops_target_met": met, "flops_unpruned": f0, "flops_pruned": flops,
            "flops_probes": probes}


def search_training_keep_ratio(model: nn.Module, units: list, method, target: float, tolerance: float,
                               input_size: tuple[int, int], min_channels: int = 1, log=None,
                               flops_unpruned: int | None = None) -> dict:
    """FLOPs target for a method whose widths are fixed *before* training (ACoSP's k per unit).

    Such a method cannot bisect its selection after training: the learned masks only make sense
    for the k they were trained with. The widths depend on the keep ratio alone, not on which
    channels are kept, so the same bisection as :func:`search_keep_ratio` runs on the untrained
    network, each probe keeping the first ``method.fixed_widths(units, p, min_channels)[name]``
    channels of every unit. The keep ratio found is then set as the method's training keep ratio
    (``method.set_training_keep_ratio``).

    Args:
        method: a ``PruningMethod`` with ``widths_fixed_in_training`` (its ``fixed_widths`` must
            be non-decreasing in p).
        min_channels: ``prune.min_channels``, the floor of every unit's width.
        Other arguments and the return value: as :func:`search_keep_ratio`, without ``"kept"``;
        ``keep_ratio_found`` is the keep ratio the method now trains with.

    Raises:
        ValueError: as :func:`search_keep_ratio`.
    """
    def select(p):
        return {n: torch.arange(int(k)) for n, k in method.fixed_widths(units, p, min_channels).items()}
    res = search_keep_ratio(model, units, select, target, tolerance, input_size, log=log, flops_unpruned=flops_unpruned)
    res.pop("kept")
    method.set_training_keep_ratio(res["keep_ratio_found"])
    return res


def save_model(stage_dir: Path, model: nn.Module, arch: dict) -> None:
    """Write weights (safetensors) then architecture (JSON), both atomically."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    save_state_dict(stage_dir / "model.safetensors", ddp.unwrap(model).state_dict(), {"format": ARCH_FORMAT})
    save_json(stage_dir / "arch.json", arch)


def load_run_model(stage_dir: Path) -> tuple[nn.Module, dict]:
    """Rebuild a (possibly pruned) model from ``arch.json`` + ``model.safetensors`` alone.

    No pickle is involved: the architecture is re-created from the registry and the recorded
    widths, then the weights are loaded strictly.

    Raises:
        CheckpointError: missing/corrupt files, a JSON of another format, or weights that do not
            fit the recorded architecture (the message names the file and the mismatch).
    """
    stage_dir = Path(stage_dir)
    arch_path = stage_dir / "arch.json"
    arch = load_json(arch_path)
    if not isinstance(arch, dict) or arch.get("format") != ARCH_FORMAT:
        raise CheckpointError(f"{arch_path}: not a segprune architecture file (expected format {ARCH_FORMAT!r})")
    try:
        # the run's own weights are loaded below: never re-read model.pretrained (it may have moved)
        model = build_model(dict(arch["model"]), int(arch["num_classes"]), int(arch["cls_classes"]),
                            load_pretrained_weights=False)
        if arch.get("widths"):
            apply_widths(model, arch["widths"], source=str(arch_path))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{arch_path}: cannot rebuild the model: {exc}") from None
    weights = stage_dir / "model.safetensors"
    load_into_model(model, load_state_dict(weights), str(weights))
    return model, arch


class Pipeline:
    """Runs Algorithm 1 for a validated config into ``out_dir``.

    Args:
        cfg: a full config (``segprune.config.load_config`` or ``demo_config``).
        out_dir: run folder; created if missing; an existing run folder with a *different*
            config is refused (nothing in it is touched).
        quiet: no console output (logs are still written).
        share: other run folders whose finished stages may be adopted (hard-linked or copied)
            instead of re-computed, when their fingerprint (:func:`stage_fingerprints`) matches.

    Raises:
        ConfigError: invalid config or a run folder made with another config.
        DataError: missing/corrupt data (raised before anything is written).
    """

    def __init__(self, cfg: dict, out_dir: str | Path, quiet: bool = False, share: list[str | Path] | None = None):
        validate(cfg)
        self.cfg, self.out, self.quiet = cfg, Path(out_dir), quiet or not ddp.is_main()  # several processes: rank 0 prints
        self.share = [Path(p) for p in share or [] if Path(p).resolve() != Path(out_dir).resolve()]
        self.fingerprints = stage_fingerprints(cfg)
        self.timings: dict[str, float] = {}
        # --- every check that can fail happens before anything is written -----------------
        dseg, dcls = cfg["data"]["seg"], cfg["data"]["cls"]
        self.num_classes, self.cls_classes = seg_num_classes(dseg), cls_num_classes(dcls)
        self.ignore_index = int(dseg["ignore_index"])
        seed = int(cfg["seed"])
        self.bseed = baseline_seed(cfg)
        self.seg_train = build_seg_dataset(dseg, dseg["train_split"], True, seed)
        self.seg_eval = build_seg_dataset(dseg, cfg["eval"]["split"] or dseg["eval_split"], False, seed)
        self.cls_train = build_cls_dataset(dcls, dcls["train_split"], True, seed)
        self.cls_eval = build_cls_dataset(dcls, dcls["eval_split"], False, seed)
        if self.bseed != seed:  # baseline stages see the augmentation stream of their own seed
            self.seg_train_base = build_seg_dataset(dseg, dseg["train_split"], True, self.bseed)
            self.cls_train_base = build_cls_dataset(dcls, dcls["train_split"], True, self.bseed)
        else:
            self.seg_train_base, self.cls_train_base = self.seg_train, self.cls_train
        pre = cfg["model"].get("pretrained")
        if pre is not None and not Path(pre).is_file():
            raise ConfigError(f"model.pretrained={pre!r}: no such file (a torchvision-format .pth or .safetensors)")
        for flag, sets in ((dseg.get("validate"), (self.seg_train, self.seg_eval)),
                           (dcls.get("validate"), (self.cls_train, self.cls_eval))):
            for ds in sets:
                if flag and hasattr(ds, "validate"):
                    ds.validate()  # full scan: every image decodes, labels in range, sizes match
        if ddp.active():  # several processes: data.*.batch_size is the global batch, split evenly
            for sec, ds in (("seg", self.seg_train), ("cls", self.cls_train)):
                b = int(cfg["data"][sec]["batch_size"])
                if b % ddp.world():
                    raise ConfigError(f"data.{sec}.batch_size={b}: the global batch must be divisible by the "
                                      f"{ddp.world()} processes (each takes batch_size / {ddp.world()})")
                if len(ds) < b:
                    raise ConfigError(f"data.{sec}.batch_size={b}: larger than the training set ({len(ds)} samples); "
                                      f"with several processes every global batch must be full")
        self.device = ddp.device()
        cfg_file = self.out / "config.yaml"
        if cfg_file.exists():
            old = read_yaml_mapping(cfg_file, "run config")  # ConfigError naming the file if damaged
            if old != cfg and isinstance(old, dict):
                # a folder made before a config key existed: the key's default is what that run used
                unknown: list[str] = []
                filled = merge(DEFAULTS, old, "", unknown)
                old = old if unknown else filled
            if isinstance(old, dict) and "distributed" in cfg:  # how it is launched may change between attempts
                old = {**old, "distributed": cfg["distributed"]}
            if old != cfg:
                diff = sorted(_diff_keys(old, cfg))
                raise ConfigError(f"run folder {self.out} was made with another config (differs at: "
                                  f"{', '.join(diff[:10])}); use another --out, or the same config to resume")
        if ddp.is_main():  # several processes: rank 0 writes, the others read after the barrier
            self.out.mkdir(parents=True, exist_ok=True)
            if not cfg_file.exists():
                atomic_write_bytes(cfg_file, yaml.safe_dump(cfg, sort_keys=False).encode())
        ddp.barrier()
        if not ddp.all_true(cfg_file.is_file()):
            raise ConfigError(f"run folder {self.out}: not visible from every process; with several nodes put --out "
                              f"on a file system all of them share")
        if cfg["threads"]:
            torch.set_num_threads(int(cfg["threads"]))

    # ------------------------------------------------------------------------------------
    def _place(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to this rank's device (``cuda:LOCAL_RANK`` under torchrun with CUDA); a CPU run: untouched."""
        if self.device.type != "cpu":
            model.to(self.device)
        return model

    def _log(self, stage: str) -> StageLog:
        if not ddp.is_main():  # several processes: rank 0 logs
            return StageLog(stage, None, quiet=True)
        return StageLog(stage, self.out / "logs", quiet=self.quiet)

    def _stage_dir(self, stage: str) -> Path:
        return stage_dir(self.out, stage)

    def _done(self, stage: str) -> dict | None:
        f = self._stage_dir(stage) / "done.json"
        return load_json(f) if f.exists() else None

    def _finish(self, stage: str, model: nn.Module | None, arch: dict | None, log: StageLog, info: dict) -> None:
        d = self._stage_dir(stage)
        if ddp.active() and model is not None:
            info = {**info, **self._check_replicas(model, log)}
        info = {"stage": stage, "wall_s": round(log.elapsed(), 2), "fingerprint": self.fingerprints[stage], **info}
        if ddp.is_main():  # several processes: rank 0 writes; the others continue from their identical replica
            if model is not None:
                save_model(d, model, arch)
            save_json(d / "done.json", info)
            self._ckpt(stage).clear()  # the in-stage checkpoint is obsolete only once done.json exists
        ddp.barrier()
        self.timings[stage] = info["wall_s"]
        log.write(f"done in {info['wall_s']:.1f}s")

    @staticmethod
    def _check_replicas(model: nn.Module, log: StageLog) -> dict:
        """Several processes: compare the ranks' weights and buffers bitwise (digests); should they
        differ (not expected: every rank takes the same steps), rank 0's are copied to all ranks."""
        digests = ddp.gather_object(ddp.state_digest(model.state_dict().values()))
        same = len(set(digests)) == 1
        if not same:
            log.write(f"warning: the {ddp.world()} replicas differ at the end of the stage ({digests}); "
                      f"continuing with rank 0's weights")
            ddp.broadcast_module(model)
        return {"world_size": ddp.world(), "replicas_identical": same}

    def _arch(self, widths: dict | None) -> dict:
        return {"format": ARCH_FORMAT, "model": self.cfg["model"], "num_classes": self.num_classes,
                "cls_classes": self.cls_classes, "widths": widths,
                "input_size": list(model_input_size(self.cfg)), "segprune_version": __version__}

    def _loaders(self, baseline: bool = False):
        d = self.cfg["data"]
        s = self.bseed if baseline else int(self.cfg["seed"])
        seg, cls = (self.seg_train_base, self.cls_train_base) if baseline else (self.seg_train, self.cls_train)
        return (make_loader(seg, d["seg"]["batch_size"], True, s, d["seg"]["num_workers"], shard=True),
                make_loader(cls, d["cls"]["batch_size"], True, s, d["cls"]["num_workers"], shard=True))

    def _ckpt(self, stage: str) -> StageCheckpoint:
        """In-stage checkpoint of ``stage`` (every ``checkpoint_every`` iterations; 0 = off)."""
        return StageCheckpoint(self._stage_dir(stage) / "partial.safetensors", int(self.cfg["checkpoint_every"]))

    def _adopt(self, stage: str) -> bool:
        """Take a finished stage with the same fingerprint from a ``share`` folder; True if done."""
        fp, name = self.fingerprints[stage], self._stage_dir(stage).name
        for other in self.share:
            src = other / "stages" / name
            try:
                info = load_json(src / "done.json") if (src / "done.json").is_file() else None
            except CheckpointError:
                continue
            if not isinstance(info, dict) or info.get("fingerprint") != fp:
                continue
            dst = self._stage_dir(stage)
            tmp = dst.with_name(name + ".adopting")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for f in src.iterdir():
                if f.is_file() and f.name not in ("done.json", "partial.safetensors"):
                    try:
                        os.link(f, tmp / f.name)  # files are never rewritten in place: a hard link is safe
                    except OSError:
                        shutil.copy2(f, tmp / f.name)
            save_json(tmp / "done.json", {**info, "shared_from": str(other)})
            shutil.rmtree(dst, ignore_errors=True)  # an unfinished attempt of this run, if any
            os.replace(tmp, dst)
            if not self.quiet:
                print(f"[{stage}] shared from {src}")
            return True
        return False

    def _eval_loaders(self):
        d = self.cfg["data"]
        return (make_loader(self.seg_eval, d["seg"]["eval_batch_size"], False, 0, d["seg"]["num_workers"], shard=True),
                make_loader(self.cls_eval, d["cls"]["eval_batch_size"], False, 0, d["cls"]["num_workers"], shard=True))

    def _training_keep_ratio(self, meth, model: nn.Module, units: list, size: tuple[int, int], log) -> dict | None:
        """With ``prune.target_flops_ratio`` and a method whose widths are fixed before training
        (ACoSP), search and set its training keep ratio (:func:`search_training_keep_ratio`);
        returns the search record (None without a target or for other methods)."""
        pr = self.cfg["prune"]
        target = pr.get("target_flops_ratio")
        if target is None or not meth.widths_fixed_in_training:
            return None
        log.write(f"FLOPs target {target:g} (tolerance {pr.get('flops_tolerance', 0.01):g}): {meth.name} fixes its "
                  f"widths before training; searching its training keep ratio at input {size[0]}x{size[1]}")
        return search_training_keep_ratio(model, units, meth, float(target), float(pr.get("flops_tolerance", 0.01)),
                                          size, pr["min_channels"], log=log.write)

    def _load_or(self, stage: str):
        if self._done(stage) is None and self.share:
            if ddp.is_main():
                self._adopt(stage)
            ddp.barrier()
        if self._done(stage) is not None:
            model, arch = load_run_model(self._stage_dir(stage))
            self._place(model)
            self.timings[stage] = self._done(stage).get("wall_s", 0.0)
            if not self.quiet:
                print(f"[{stage}] already done, loaded {self._stage_dir(stage)}")
            return model
        return None

    # ------------------------------------------------------------------------------------
    def run(self, stop_after: str | None = None) -> dict | None:
        """Run (or resume) every stage; return the metrics dict also written to metrics.json.

        ``stop_after``: a stage name; stop once it is done and return None (e.g. ``"train_seg"``
        trains only the baseline, which a sweep then shares).
        """
        cfg = self.cfg
        if stop_after is not None and stop_after not in STAGES:
            raise ConfigError(f"stop_after={stop_after!r}: not a stage ({', '.join(STAGES)})")
        # every stage gets fresh loaders (data order independent of which stages ran in this process)
        seg_eval, cls_eval = self._eval_loaders()
        ign = self.ignore_index

        # 1. classification pre-training (Eq. 1)
        model = self._load_or("pretrain_cls")
        if model is None:
            log = self._log("pretrain_cls")
            _seed(self.bseed)
            model = self._place(build_model(dict(cfg["model"]), self.num_classes, self.cls_classes))
            ddp.broadcast_module(model)  # several processes: one initialisation (identical seeds give it anyway)
            st = train_classification(model.backbone, self._loaders(baseline=True)[1], cfg["train"]["pretrain_cls"], log,
                                      ckpt=self._ckpt("pretrain_cls"))
            top1 = evaluate_classification(model.forward_cls, cls_eval)["top1"]
            log.write(f"backbone top-1 on {self.cls_eval.describe()}: {top1:.4f}")
            self._finish("pretrain_cls", model, self._arch(None), log, {**st, "top1": top1})
        if stop_after == "pretrain_cls":
            return None

        # 2. segmentation training (Eq. 2): the baseline
        base = self._load_or("train_seg")
        if base is None:
            log = self._log("train_seg")
            _seed(self.bseed + 1)
            st = train_segmentation(model, self._loaders(baseline=True)[0], cfg["train"]["seg"], ign, log,
                                    ckpt=self._ckpt("train_seg"))
            self._finish("train_seg", model, self._arch(None), log, st)
            base = model
        if stop_after == "train_seg":
            return None
        baseline = copy.deepcopy(base)

        # 3. MTP sparsity training (Algorithm 1, lines 1-7)
        size = model_input_size(cfg)
        pr = cfg["prune"]
        sparse_dir = self._stage_dir("sparsity")
        sparse = self._load_or("sparsity")
        method = cfg["method"]["name"]
        baseline_method = None if method == "mtp" else build_method(cfg["method"])
        graph = None
        if sparse is None:
            graph = build_graph(base, size)  # training changes weights, not structure: reused below
            units = discover_units(base, graph, pr["prune_coupled"])
            log = self._log("sparsity")
            for part, why in parts_without_units(base, graph, units, pr["prune_coupled"]).items():
                log.write(f"part {part!r}: {why}")  # e.g. a LayerNorm encoder (smp Segformer)
            _seed(cfg["seed"] + 2)
            if method == "mtp":
                seg_loader, cls_loader = self._loaders()
                mtp = run_mtp(base, units, cls_loader, seg_loader, cfg["method"], ign, log, ckpt=self._ckpt("sparsity"))
                scores = unit_gammas(base, units, mtp.score_sources())
                info = {"mu": mtp.mu, "gap": mtp.gap(), **mtp.sparsity(), "steps": mtp.steps}
                if mtp.rank_digests is not None:  # several processes: E, μ, W1, model digests of every rank
                    info["rank_digests"] = mtp.rank_digests
            else:  # baselines: optional sparsity training, scores taken at the prune stage
                seg_loader, cls_loader = self._loaders()
                kw = {"ckpt": self._ckpt("sparsity")} if "ckpt" in inspect.signature(baseline_method.train).parameters else {}
                search = self._training_keep_ratio(baseline_method, base, units, size, log)
                info = baseline_method.train(base, units, seg_loader, cls_loader, ign, log, **kw) or {}
                if search is not None:
                    info["flops_search"] = search
                scores = unit_gammas(base, units)
                learned = baseline_method.trained_state()
                if learned and ddp.is_main():  # e.g. SIRFP's redundancy EMAs: a resume after this stage scores with them
                    sparse_dir.mkdir(parents=True, exist_ok=True)
                    save_state_dict(sparse_dir / "method_state.safetensors",
                                    {k: v.contiguous() for k, v in learned.items()})
            if ddp.is_main():
                sparse_dir.mkdir(parents=True, exist_ok=True)
                save_state_dict(sparse_dir / "scores.safetensors", {k: v.contiguous() for k, v in scores.items()})
            self._finish("sparsity", base, self._arch(None), log, {"method": method, **info})
            sparse = base
        if stop_after == "sparsity":
            return None
        scores = load_state_dict(sparse_dir / "scores.safetensors")

        # 4. pruning (lines 9-10): thresholds + physical removal
        pruned = self._load_or("prune")
        if pruned is None:
            log = self._log("prune")
            if self.device.type != "cpu":  # tracing, selection and physical removal run on the CPU
                sparse, graph = sparse.cpu(), None
            if graph is None:  # sparsity stage was loaded from disk: trace the loaded model
                graph = build_graph(sparse, size)
                units = discover_units(sparse, graph, pr["prune_coupled"])
                state_file = sparse_dir / "method_state.safetensors"
                if baseline_method is not None and state_file.is_file():
                    baseline_method.load_trained_state(sparse, units, load_state_dict(state_file), str(state_file))
            target = pr.get("target_flops_ratio")
            parts = {u.name: u.part for u in units}
            flops0 = count_flops(sparse, size)["flops"]  # before prune_channels, which works in place
            round_to = int(pr.get("round_to", 1))
            if target is None:
                if method == "mtp":  # γ1 from W1, γ2 from W2 (Algorithm 1, line 9), Ind/Uni thresholds
                    kept = select_channels(scores, parts, pr["keep_ratio"], pr["threshold_mode"], pr["min_channels"])
                    rank = scores
                else:
                    calib = make_loader(self.seg_train, cfg["data"]["seg"]["batch_size"], True, int(cfg["seed"]) + 5)
                    kept = baseline_method.select(sparse, units, pr["keep_ratio"], pr["threshold_mode"],
                                                  pr["min_channels"], calib_loader=calib)
                    rank = None
                    if round_to > 1:  # the method's own ranking decides which channels rounding adds or drops
                        calib = make_loader(self.seg_train, cfg["data"]["seg"]["batch_size"], True, int(cfg["seed"]) + 5)
                        rank = baseline_method.scores(sparse, units, calib_loader=calib)
                unrounded = sum(k.numel() for k in kept.values())
                kept = round_kept(kept, rank, round_to)
                flops_info = {"target_flops_ratio": None}
            elif baseline_method is not None and baseline_method.widths_fixed_in_training:
                # FLOPs target met before training (ACoSP's k): keep the widths searched in the sparsity stage
                search = load_json(sparse_dir / "done.json").get("flops_search")
                if not isinstance(search, dict) or "keep_ratio_found" not in search:
                    raise CheckpointError(f"{sparse_dir / 'done.json'}: no 'flops_search' record, but "
                                          f"prune.target_flops_ratio={target} is set and {method} fixes its widths "
                                          "in training: delete that stage folder to re-run sparsity training with the target")
                p_found = float(search["keep_ratio_found"])
                baseline_method.set_training_keep_ratio(p_found)
                rank = baseline_method.scores(sparse, units)  # the learned logits (no calibration data)
                kept = baseline_method.select_from_scores(rank, units, p_found, pr["threshold_mode"], pr["min_channels"])
                unrounded = sum(k.numel() for k in kept.values())
                kept = round_kept(kept, rank, round_to)
                log.write(f"FLOPs target {target:g}: widths fixed before sparsity training at keep ratio {p_found:.6f} "
                          f"(FLOPs ratio {search['flops_ratio_achieved']:.4f} in that search); prune.keep_ratio is ignored")
                flops_info = {k: search[k] for k in ("target_flops_ratio", "flops_tolerance", "keep_ratio_found",
                                                     "flops_probes") if k in search}
            else:  # FLOPs target: score once, then bisect the keep ratio of the method's selection rule
                if method == "mtp":
                    def select(p, _s=scores):  # rounding inside the search: the target is met after rounding
                        return round_kept(select_channels(_s, parts, p, pr["threshold_mode"], pr["min_channels"]),
                                          _s, round_to)
                else:
                    calib = make_loader(self.seg_train, cfg["data"]["seg"]["batch_size"], True, int(cfg["seed"]) + 5)
                    unit_scores = baseline_method.scores(sparse, units, calib_loader=calib)

                    def select(p, _s=unit_scores):
                        return round_kept(baseline_method.select_from_scores(_s, units, p, pr["threshold_mode"],
                                                                             pr["min_channels"]), _s, round_to)
                log.write(f"FLOPs target {target:g} (tolerance {pr.get('flops_tolerance', 0.01):g}): "
                          f"prune.keep_ratio={pr['keep_ratio']} is ignored; searching the keep ratio by bisection "
                          f"at input {size[0]}x{size[1]}")
                res = search_keep_ratio(sparse, units, select, target, pr.get("flops_tolerance", 0.01), size,
                                        log=log.write, flops_unpruned=flops0)
                kept = res.pop("kept")
                unrounded = None
                flops_info = res
            # several processes: every rank computed the same selection; rank 0's is the one applied everywhere
            kept, unrounded, flops_info = ddp.broadcast_object((kept, unrounded, flops_info))
            if round_to > 1:
                total = sum(k.numel() for k in kept.values())
                flops_info["round_to"] = round_to
                if unrounded is not None:
                    flops_info["kept_channels_before_rounding"] = unrounded
                log.write(f"widths rounded to multiples of {round_to}: {total} channels kept"
                          + (f" (before rounding {unrounded})" if unrounded is not None else " (rounded inside the search)"))
            pruned = prune_channels(sparse, units, kept, graph)
            if baseline_method is not None:
                baseline_method.after_prune(pruned, log)
            spec = widths_spec(units, kept, pr["prune_coupled"])
            m = evaluate_segmentation(pruned, seg_eval, self.num_classes, ign)
            log.write(f"before fine-tuning: mIoU {m['miou']:.4f}")
            per_part = {}
            for u in units:
                a = per_part.setdefault(u.part, [0, 0])
                a[0] += spec["units"][u.name]["kept"]
                a[1] += u.channels
            log.write("kept channels per part: " + ", ".join(f"{k} {a}/{b}" for k, (a, b) in per_part.items()))
            f1 = count_flops(pruned, size)["flops"]  # the pruned network itself (with a target: as in the search)
            if flops_info.get("flops_pruned") not in (None, f1):
                log.write(f"warning: the search counted {flops_info['flops_pruned']} FLOPs for this selection, "
                          f"the pruned network has {f1}; recording the latter")
            flops_info.update(flops_unpruned=flops0, flops_pruned=f1, flops_ratio_achieved=f1 / flops0)
            if target is not None:
                flops_info["flops_target_met"] = abs(f1 / flops0 - target) <= float(flops_info["flops_tolerance"])
            log.write(f"FLOPs ratio {flops_info['flops_ratio_achieved']:.4f} at input {size[0]}x{size[1]}")
            self._finish("prune", pruned, self._arch(spec), log, {"miou_before_finetune": m["miou"],
                         "kept_per_part": per_part, **flops_info})
            self._place(pruned)
        if stop_after == "prune":
            return None

        # 5./6. fine-tuning: classification then segmentation (line 11)
        ft = self._load_or("finetune_cls")
        if ft is None:
            log = self._log("finetune_cls")
            _seed(cfg["seed"] + 3)
            st = train_classification(pruned.backbone, self._loaders()[1], cfg["finetune"]["cls"], log,
                                      ckpt=self._ckpt("finetune_cls"))
            top1 = evaluate_classification(pruned.forward_cls, cls_eval)["top1"]  # the paper's Table 5
            log.write(f"pruned backbone top-1 on {self.cls_eval.describe()}: {top1:.4f}")
            self._finish("finetune_cls", pruned, self._arch(self._widths()), log, {**st, "top1": top1})
            ft = pruned
        if stop_after == "finetune_cls":
            return None
        final = self._load_or("finetune_seg")
        if final is None:
            log = self._log("finetune_seg")
            _seed(cfg["seed"] + 4)
            st = train_segmentation(ft, self._loaders()[0], cfg["finetune"]["seg"], ign, log, ckpt=self._ckpt("finetune_seg"))
            self._finish("finetune_seg", ft, self._arch(self._widths()), log, st)
            final = ft
        if stop_after == "finetune_seg":
            return None

        # 7. evaluation
        return self.evaluate(baseline, final, seg_eval, cls_eval)

    def _widths(self) -> dict:
        return load_json(self._stage_dir("prune") / "arch.json")["widths"]

    def evaluate(self, baseline: nn.Module, pruned: nn.Module, seg_eval, cls_eval) -> dict:
        log = self._log("evaluate")
        cfg = self.cfg
        size = model_input_size(cfg)
        ev = cfg["eval"]
        out = {"method": cfg["method"]["name"], "keep_ratio": cfg["prune"]["keep_ratio"],
               "threshold_mode": cfg["prune"]["threshold_mode"], "input_size": list(size),
               "eval_split": cfg["eval"]["split"] or cfg["data"]["seg"]["eval_split"],
               "num_classes": self.num_classes, "seed": cfg["seed"], "baseline_seed": self.bseed,
               "dataset": cfg["data"]["seg"]["name"], "model": cfg["model"]["name"],
               "eval_native_size": cfg["data"]["seg"]["input_size"] is None}
        names = getattr(self.seg_eval, "CLASSES", None)
        for key, model in (("baseline", baseline), ("pruned", pruned)):
            m = evaluate_segmentation(model, seg_eval, self.num_classes, self.ignore_index, names, protocol=ev)
            ddp.barrier()  # several processes: the other ranks idle while rank 0 measures (CPU) latency
            p = profile_model(_on_cpu(model), size, threads=ev["threads"], runs=ev["latency_runs"],
                              warmup=ev["latency_warmup"]) if ddp.is_main() else None
            ddp.barrier()
            top1 = evaluate_classification(model.forward_cls, cls_eval)["top1"]
            if p is None:  # not rank 0: it writes the files and sends the metrics
                continue
            out[key] = {"miou": m["miou"], "pixel_acc": m["pixel_acc"], "mean_acc": m["mean_acc"],
                        "per_class_iou": m["per_class_iou"], "params": p["params"], "flops": p["flops"],
                        "macs": p["macs"], "latency_ms": p["latency_ms"], "latency": p["latency"], "cls_top1": top1}
            log.write(f"{key}: mIoU {m['miou']:.4f} pixel acc {m['pixel_acc']:.4f} params {p['params']} "
                      f"GFLOPs {p['flops'] / 1e9:.3f} latency {p['latency_ms']:.2f} ms top-1 {top1:.4f}")
        if not ddp.is_main():
            return ddp.broadcast_object(None)
        out["ratios"] = {k: out["pruned"][k] / out["baseline"][k] for k in ("params", "flops", "macs", "latency_ms")}
        out["delta_miou"] = out["pruned"]["miou"] - out["baseline"]["miou"]
        out["flops_note"] = "FLOPs count one multiply-add as 2 FLOPs (torch.utils.flop_counter); MACs = FLOPs / 2"
        prune_info = load_json(self._stage_dir("prune") / "done.json")
        # FLOPs target (prune.target_flops_ratio): keep_ratio above is then the keep ratio the search found
        target = cfg["prune"].get("target_flops_ratio")
        out["target_flops_ratio"] = target
        out["flops_tolerance"] = cfg["prune"].get("flops_tolerance") if target is not None else None
        out["keep_ratio_found"] = prune_info.get("keep_ratio_found") if target is not None else None
        out["flops_ratio_achieved"] = prune_info.get("flops_ratio_achieved")
        out["flops_target_met"] = prune_info.get("flops_target_met") if target is not None else None
        if target is not None and out["keep_ratio_found"] is not None:
            out["keep_ratio"] = out["keep_ratio_found"]
            out["keep_ratio_config"] = cfg["prune"]["keep_ratio"]  # ignored under a FLOPs target
        out["pruned"]["miou_before_finetune"] = prune_info.get("miou_before_finetune")
        out["kept_per_part"] = prune_info.get("kept_per_part")
        for key, stage in (("baseline", "pretrain_cls"), ("pruned", "finetune_cls")):  # backbone top-1 after its
            out[key]["cls_top1_after_cls_stage"] = (self._done(stage) or {}).get("top1")  # classification stage
        out["layer_widths"] = {"baseline": layer_widths(baseline), "pruned": layer_widths(pruned)}
        self.timings["evaluate"] = round(log.elapsed(), 2)
        out["stage_wall_s"] = dict(self.timings)
        out["threads"] = torch.get_num_threads()
        save_json(self.out / "metrics.json", out)
        atomic_write_bytes(self.out / "report.md", render_report(out, cfg).encode())
        save_json(self._stage_dir("evaluate") / "done.json", {"stage": "evaluate", "wall_s": self.timings["evaluate"],
                                                             "fingerprint": self.fingerprints["evaluate"]})
        return ddp.broadcast_object(out)  # several processes: every rank returns rank 0's metrics


def _on_cpu(model: nn.Module) -> nn.Module:
    """``model`` if it is on the CPU, else a CPU copy (latency is a CPU measurement)."""
    p = next(model.parameters(), None)
    return model if p is None or p.device.type == "cpu" else copy.deepcopy(model).cpu()


def _diff_keys(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _diff_keys(a.get(k), b.get(k), f"{path}{k}.")
    elif a != b:
        yield path.rstrip(".")


def render_report(m: dict, cfg: dict) -> str:
    """Markdown report: baseline vs pruned table with ratios, per-class IoU and stage wall times."""
    b, p, r = m["baseline"], m["pruned"], m["ratios"]
    if m.get("target_flops_ratio") is not None:
        met = "met" if m.get("flops_target_met") else "not met within tolerance, closest achieved"
        title = (f"{m['method']} FLOPs target {m['target_flops_ratio']:g}x ({m['threshold_mode']}; found keep ratio "
                 f"{m['keep_ratio']:.4f}, FLOPs ratio {m.get('flops_ratio_achieved') or float('nan'):.4f}, {met})")
    else:
        title = f"{m['method']} {m['keep_ratio']}x ({m['threshold_mode']})"
    lines = [f"# segprune report: {title}", "",
             f"Model `{cfg['model']['name']}` (width {cfg['model']['width']}, OS {cfg['model']['output_stride']}), "
             f"data `{cfg['data']['seg']['name']}` split `{m['eval_split']}`, "
             + (f"images at native size (params/FLOPs/latency at {m['input_size'][0]}x{m['input_size'][1]}). "
                if m.get("eval_native_size") else f"input {m['input_size'][0]}x{m['input_size'][1]}. ")
             + f"{m['flops_note']}. Latency: CPU, batch 1, {b['latency']['warmup']} warm-up runs, median of "
             f"{b['latency']['runs']}, {b['latency']['threads']} threads.", "",
             "| model | mIoU (%) | pixel acc (%) | params (M) | GFLOPs | GMACs | latency (ms) | cls top-1 (%) |",
             "|---|---|---|---|---|---|---|---|"]
    for key, d in (("baseline", b), ("pruned", p)):
        ratio = (f" ({r['params']:.2f}x)", f" ({r['flops']:.2f}x)", f" ({r['macs']:.2f}x)", f" ({r['latency_ms']:.2f}x)") if key == "pruned" else ("",) * 4
        delta = "" if key == "baseline" else f" ({100 * m['delta_miou']:+.2f})"
        lines.append(f"| {key} | {100 * d['miou']:.2f}{delta} | "
                     f"{100 * d['pixel_acc']:.2f} | {d['params'] / 1e6:.3f}{ratio[0]} | {d['flops'] / 1e9:.3f}{ratio[1]} | "
                     f"{d['macs'] / 1e9:.3f}{ratio[2]} | {d['latency_ms']:.2f}{ratio[3]} | {100 * d['cls_top1']:.2f} |")
    lines += ["", f"mIoU of the pruned network before fine-tuning: {100 * (p.get('miou_before_finetune') or float('nan')):.2f}%", "",
              "Kept channels per part: " + ", ".join(f"{k} {a}/{n}" for k, (a, n) in (m.get("kept_per_part") or {}).items()), "",
              "## Per-class IoU (%)", "", "| class | baseline | pruned |", "|---|---|---|"]
    for cls in b["per_class_iou"]:
        fmt = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
        lines.append(f"| {cls} | {fmt(b['per_class_iou'][cls])} | {fmt(p['per_class_iou'].get(cls))} |")
    lines += ["", "## Wall time per stage (s)", "", "| stage | s |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in m["stage_wall_s"].items()]
    return "\n".join(lines) + "\n"


