"""Algorithm 1 of the MTP paper as resumable stages writing a self-contained run folder.

Stages (each writes ``stages/<stage>/`` with ``model.safetensors``, ``arch.json`` and, last,
``done.json``; a stage whose ``done.json`` exists is loaded instead of re-run):

1. ``pretrain_cls``  classification pre-training of the backbone (Eq. 1)
2. ``train_seg``     segmentation training of backbone + decoder (Eq. 2) -> the baseline
3. ``sparsity``      MTP sparsity training (Eqs. 5-10, Algorithm 1 lines 1-7); records the
                     single-scale mIoU of the network before removal (``sparse_eval``)
4. ``prune``         thresholds on γ (Ind/Uni) and physical removal (lines 9-10), folding the
                     constant output of removed γ = 0 channels into their consumers; records the
                     removed share of Σ|γ| and the mIoU right after removal
5. ``finetune_cls``  fine-tune the pruned backbone on classification (line 11)
6. ``finetune_seg``  fine-tune the pruned network on segmentation (line 11)
7. ``evaluate``      mIoU, pixel accuracy, params, FLOPs, MACs, latency of baseline and pruned

The run folder holds ``config.yaml`` (resolved), ``logs/``, ``metrics.json`` and ``report.md``;
``metrics.json`` has ``baseline``, ``pruned`` and, for the removal step, ``sparse`` ({miou,
pixel_acc} before removal), ``prune_step_loss`` (sparse mIoU − mIoU right after removal) and
``removed_gamma_share`` (docs/methods.md, "Metrics of the removal step"); null in run folders made
before they were recorded.

Under ``torchrun`` (several processes, ``engine.distributed``, docs/distributed.md) every rank runs
the same stages on its slice of each global batch; only rank 0 writes into the run folder (the
others wait at a barrier and read what it wrote), the prune stage's channel selection is rank 0's
(broadcast), evaluation is sharded and latency is measured by rank 0 alone.
"""
from __future__ import annotations

import copy
import hashlib
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
from .engine.amp import amp_mode
from .engine.layout import channels_last_mode
from .engine.device import describe_device, resolve_device, strict_fp32
from .engine.evaluate import evaluate_classification, evaluate_segmentation
from .engine.log import StageLog
from .engine.profile import count_flops, profile_model
from .engine.resume import StageCheckpoint
from .engine.train import make_loader, train_classification, train_segmentation
from .algorithm import Budget, choose_widths, finetune_classification, finetune_segmentation, kept_per_part, remove, sparsify
from .methods.base import PruningMethod, build_method, method_class, method_config, training_budget
from .models import build_model
from .pruning import apply_widths, build_graph, discover_units, layer_widths, removed_gamma_share, widths_spec
from .pruning.groups import parts_without_units

__all__ = ["Pipeline", "STAGES", "load_run_model", "ARCH_FORMAT", "stage_fingerprints", "baseline_seed", "stage_dir",
           "model_input_size"]

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
    prunable (and, for a method whose widths are fixed before training, ACoSP, the FLOPs target
    or, without a target and without ``method.options.keep_ratio``, ``prune.keep_ratio``);
    pruning adds ``prune`` (with ``target_flops_ratio`` and ``flops_tolerance`` only when a
    FLOPs target is set); each fine-tuning adds its own section; evaluation ``eval``.
    """
    data = {sec: {k: v for k, v in d.items() if k not in _DATA_IGNORED  # data.seg.folder only counts for name folder:
                  and not (k == "folder" and d.get("name") != "folder")}  # other runs keep their fingerprints
            for sec, d in cfg["data"].items()}
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
    if cfg["train"].get("amp", "off") != "off":  # mixed precision changes every training stage from the first on
        parts["pretrain_cls"]["amp"] = cfg["train"]["amp"]
    if cfg["train"].get("channels_last"):  # other kernels, other rounding in every training stage
        parts["pretrain_cls"]["channels_last"] = True
    budget = training_budget(cfg)  # γ methods with the growing ℓ1 schedule train for the budget
    if budget is not None:
        parts["sparsity"]["budget"] = budget
    if getattr(method_class(cfg["method"]["name"]), "widths_fixed_in_training", False):
        if cfg["prune"].get("target_flops_ratio") is not None:
            # ACoSP trains for the widths the FLOPs target gives: the target enters its sparsity stage
            parts["sparsity"]["flops_target"] = {k: cfg["prune"].get(k) for k in
                                                 ("target_flops_ratio", "flops_tolerance", "min_channels")}
        elif (cfg["method"].get("options") or {}).get("keep_ratio") is None:
            # no keep ratio of its own: it trains for prune.keep_ratio (algorithm.fix_training_widths)
            parts["sparsity"]["training_keep_ratio"] = cfg["prune"]["keep_ratio"]
    out, prev = {}, ""
    for stage in STAGES:
        blob = json.dumps({"prev": prev, **parts[stage]}, sort_keys=True, default=str)
        prev = out[stage] = hashlib.sha256(blob.encode()).hexdigest()[:20]
    return out


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


class _RunState:
    """What one :meth:`Pipeline.run` hands from stage to stage (models, units, the method)."""

    def __init__(self, seg_eval, cls_eval):
        self.seg_eval, self.cls_eval = seg_eval, cls_eval
        self.model = self.base = self.baseline = self.sparse = self.pruned = self.ft = self.final = None
        self.method: PruningMethod | None = None
        self.graph = None
        self.units: list | None = None
        self.metrics: dict | None = None


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
        # top-level ``device`` (auto | cpu | cuda | cuda:N); several processes: this rank's device (torchrun)
        self.device = ddp.device() if ddp.active() else resolve_device(cfg.get("device", "auto"))
        if cfg["train"].get("amp") == "fp16" and self.device.type != "cuda":
            raise ConfigError(f"train.amp='fp16' needs a CUDA device (float16 autocast with loss scaling); the run's "
                              f"device is {self.device}: use train.amp=bf16 or off")
        if self.device.type == "cuda":  # fixed input sizes: let cuDNN pick the fastest kernels (run on an H200: docs/results/gpu.md)
            torch.backends.cudnn.benchmark = True
        cfg_file = self.out / "config.yaml"
        if cfg_file.exists():
            old = read_yaml_mapping(cfg_file, "run config")  # ConfigError naming the file if damaged
            if old != cfg and isinstance(old, dict):
                # a folder made before a config key existed: the key's default is what that run used
                unknown: list[str] = []
                filled = merge(DEFAULTS, old, "", unknown)
                old = old if unknown else filled
            if isinstance(old, dict):  # where and how it is launched may change between attempts
                old = {**old, **{k: cfg[k] for k in ("distributed", "device") if k in cfg}}
            if old != cfg:
                diff = sorted(_diff_keys(old, cfg))
                raise ConfigError(f"run folder {self.out} was made with another config (differs at: "
                                  f"{', '.join(diff[:10])}); use another --out, or the same config to resume")
        for stage in STAGES:  # finished stages of another config (config.yaml deleted, stage folders copied in)
            self._done(stage)  # ConfigError naming the done.json before anything is written
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
        """The stage's done.json, or None if the stage has not finished.

        Raises:
            ConfigError: the finished stage was made with another config (its recorded fingerprint is not
                this run's, e.g. config.yaml was deleted or the stage folder copied in from another run);
                nothing is overwritten.
        """
        f = self._stage_dir(stage) / "done.json"
        if not f.exists():
            return None
        info = load_json(f)
        fp = info.get("fingerprint") if isinstance(info, dict) else None
        if fp is not None and fp != self.fingerprints[stage]:  # done.json written before fingerprints: trusted
            raise ConfigError(f"{f}: stage {stage} was made with another config (fingerprint {fp}, this run's "
                              f"{self.fingerprints[stage]}); use another --out, or the config that made it")
        return info

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

    def _load_finished(self, stage: str):
        """The model of ``stage`` if the stage is finished (here, or adopted from a ``share`` folder
        with the same fingerprint), placed on this rank's device; None if it has to run."""
        info = self._done(stage)
        if info is None and self.share:
            if ddp.is_main():
                self._adopt(stage)
            ddp.barrier()
            info = self._done(stage)
        if info is not None:
            model, arch = load_run_model(self._stage_dir(stage))
            self._place(model)
            self.timings[stage] = info.get("wall_s", 0.0)
            if not self.quiet:
                print(f"[{stage}] already done, loaded {self._stage_dir(stage)}")
            return model
        return None

    def _method(self) -> PruningMethod:
        return build_method(self.cfg["method"], input_size=model_input_size(self.cfg))

    def _calib_loader(self):
        """Calibration batches of the prune stage (ThiNet, SIRFP): training images in a fixed order."""
        return make_loader(self.seg_train, self.cfg["data"]["seg"]["batch_size"], True, int(self.cfg["seed"]) + 5)

    # ------------------------------------------------------------------------------------
    def run(self, stop_after: str | None = None) -> dict | None:
        """Run (or resume) every stage; return the metrics dict also written to metrics.json.

        ``stop_after``: a stage name; stop once it is done and return None (e.g. ``"train_seg"``
        trains only the baseline, which a sweep then shares).
        """
        if stop_after is not None and stop_after not in STAGES:
            raise ConfigError(f"stop_after={stop_after!r}: not a stage ({', '.join(STAGES)})")
        # every stage gets fresh loaders (data order independent of which stages ran in this process)
        run = _RunState(*self._eval_loaders())
        for stage in STAGES:
            # training loops read them (engine/amp.py, engine/layout.py)
            with amp_mode(self.cfg["train"].get("amp", "off")), channels_last_mode(self.cfg["train"].get("channels_last")):
                getattr(self, f"_stage_{stage}")(run)
            if stage == stop_after:
                return None
        return run.metrics

    def _stage_pretrain_cls(self, run: "_RunState") -> None:
        """1. classification pre-training of the backbone (Eq. 1)."""
        run.model = self._load_finished("pretrain_cls")
        if run.model is not None:
            return
        cfg, log = self.cfg, self._log("pretrain_cls")
        _seed(self.bseed)
        model = self._place(build_model(dict(cfg["model"]), self.num_classes, self.cls_classes))
        ddp.broadcast_module(model)  # several processes: one initialisation (identical seeds give it anyway)
        st = train_classification(model.backbone, self._loaders(baseline=True)[1], cfg["train"]["pretrain_cls"], log,
                                  ckpt=self._ckpt("pretrain_cls"))
        top1 = evaluate_classification(model.forward_cls, run.cls_eval)["top1"]
        log.write(f"backbone top-1 on {self.cls_eval.describe()}: {top1:.4f}")
        self._finish("pretrain_cls", model, self._arch(None), log, {**st, "top1": top1})
        run.model = model

    def _stage_train_seg(self, run: "_RunState") -> None:
        """2. segmentation training of backbone + decoder (Eq. 2): the baseline."""
        base = self._load_finished("train_seg")
        if base is None:
            log = self._log("train_seg")
            _seed(self.bseed + 1)
            st = train_segmentation(run.model, self._loaders(baseline=True)[0], self.cfg["train"]["seg"],
                                    self.ignore_index, log, ckpt=self._ckpt("train_seg"))
            self._finish("train_seg", run.model, self._arch(None), log, st)
            base = run.model
        run.base, run.baseline = base, None

    def _stage_sparsity(self, run: "_RunState") -> None:
        """3. the method's sparsity training (Algorithm 1, lines 1-7; ``algorithm.sparsify``)."""
        run.baseline = copy.deepcopy(run.base)
        run.method = self._method()
        sparse = self._load_finished("sparsity")
        if sparse is not None:
            run.sparse = sparse
            return
        cfg, size, sparse = self.cfg, model_input_size(self.cfg), run.base
        run.graph = build_graph(sparse, size)  # training changes weights, not structure: reused by the prune stage
        run.units = discover_units(sparse, run.graph, cfg["prune"]["prune_coupled"])
        log = self._log("sparsity")
        empty_parts = parts_without_units(sparse, run.graph, run.units, cfg["prune"]["prune_coupled"])
        for part, why in empty_parts.items():
            log.write(f"part {part!r}: {why}")  # e.g. a LayerNorm encoder (smp Segformer)
        seg_loader, cls_loader = self._loaders()
        meth = run.method
        info = sparsify(meth, sparse, run.units, seg_loader, cls_loader, self.ignore_index, log,
                        Budget.from_config(cfg["prune"]), size, ckpt=self._ckpt("sparsity"), seed=int(cfg["seed"]))
        # the network after sparsity training, before removal: the reference of the prune-step loss
        # (single-scale, like miou_before_finetune); the global RNG is left as it was (the data
        # loader draws a seed), so a run resumed after this stage continues identically
        with torch.random.fork_rng(devices=[]):
            ev = evaluate_segmentation(sparse, run.seg_eval, self.num_classes, self.ignore_index)
        info["sparse_eval"] = {"miou": ev["miou"], "pixel_acc": ev["pixel_acc"], "split": self._eval_split()}
        log.write(f"after sparsity training: mIoU {ev['miou']:.4f} pixel acc {ev['pixel_acc']:.4f}")
        d = self._stage_dir("sparsity")
        if ddp.is_main():
            d.mkdir(parents=True, exist_ok=True)
            learned = meth.trained_state()
            if learned:  # e.g. SIRFP's redundancy EMAs, MTP's γ1: a resume after this stage scores with them
                save_state_dict(d / "method_state.safetensors", {k: v.contiguous() for k, v in learned.items()})
            record = meth.gamma_record(sparse, run.units)
            save_state_dict(d / "scores.safetensors", {k: v.contiguous() for k, v in record.items()})
        self._finish("sparsity", sparse, self._arch(None), log, {"method": meth.name, **info,
                                                                 "parts_without_units": empty_parts})
        run.sparse = sparse

    def _eval_split(self) -> str:
        return self.cfg["eval"]["split"] or self.cfg["data"]["seg"]["eval_split"]

    def _restore_method_state(self, run: "_RunState") -> None:
        """The sparsity stage was loaded from disk: give the method what its training learned."""
        d, meth = self._stage_dir("sparsity"), run.method
        state_file = d / "method_state.safetensors"
        if not state_file.is_file() and meth.legacy_state_file:  # a run folder of an earlier segprune
            state_file = d / meth.legacy_state_file
        if state_file.is_file():
            meth.load_trained_state(run.sparse, run.units, load_state_dict(state_file), str(state_file))

    def _stage_prune(self, run: "_RunState") -> None:
        """4. scores, widths for the budget and physical removal (lines 9-10; ``algorithm.choose_widths``, ``remove``)."""
        run.pruned = self._load_finished("prune")
        if run.pruned is not None:
            return
        cfg, log, size = self.cfg, self._log("prune"), model_input_size(self.cfg)
        pr, sparse = cfg["prune"], run.sparse
        # tracing, scoring (with calibration batches), selection and removal run on the run's device
        if run.graph is None:  # sparsity stage loaded from disk (or moved): trace the model as it is now
            run.graph = build_graph(sparse, size)
            run.units = discover_units(sparse, run.graph, pr["prune_coupled"])
            self._restore_method_state(run)
        units, meth = run.units, run.method
        flops0 = count_flops(sparse, size)["flops"]  # before removal, which works in place
        training_search = None
        if pr.get("target_flops_ratio") is not None and meth.widths_fixed_in_training:
            sparse_done = self._stage_dir("sparsity") / "done.json"
            training_search = load_json(sparse_done).get("flops_search")
            if not isinstance(training_search, dict) or "keep_ratio_found" not in training_search:
                raise CheckpointError(f"{sparse_done}: no 'flops_search' record, but prune.target_flops_ratio="
                                      f"{pr['target_flops_ratio']} is set and {meth.name} fixes its widths in training: "
                                      "delete that stage folder to re-run sparsity training with the target")
        kept, flops_info = choose_widths(meth, sparse, units, Budget.from_config(pr), size,
                                         calib_loader=self._calib_loader(), log=log.write,
                                         training_search=training_search, flops_unpruned=flops0)
        share = removed_gamma_share(sparse, units, kept)  # before removal, which works in place
        log.write(f"removal deletes {100 * share['total']:.2f}% of the units' Σ|γ| ("
                  + ", ".join(f"{k} {100 * v:.2f}%" for k, v in share["parts"].items()) + ")")
        compensation: dict = {}
        pruned = remove(meth, sparse, units, kept, run.graph, log, input_size=size, record=compensation)
        spec = widths_spec(units, kept, pr["prune_coupled"])
        with strict_fp32(self.device):
            m = evaluate_segmentation(pruned, run.seg_eval, self.num_classes, self.ignore_index)
        log.write(f"before fine-tuning: mIoU {m['miou']:.4f}")
        per_part = {k: [d["kept"], d["channels"]] for k, d in kept_per_part(units, kept).items()}
        log.write("kept channels per part: " + ", ".join(f"{k} {a}/{b}" for k, (a, b) in per_part.items()))
        self._finish("prune", pruned, self._arch(spec), log, {"miou_before_finetune": m["miou"], "kept_per_part": per_part,
                     "removed_gamma_share": share, "compensation": compensation,
                     **self._flops_record(pruned, flops0, flops_info, size, log)})
        run.pruned = self._place(pruned)

    def _flops_record(self, pruned: nn.Module, flops0: int, flops_info: dict, size, log) -> dict:
        """``flops_info`` completed with the FLOPs of the pruned network itself (what the search counted, if any)."""
        target = self.cfg["prune"].get("target_flops_ratio")
        f1 = count_flops(pruned, size)["flops"]
        if flops_info.get("flops_pruned") not in (None, f1):
            log.write(f"warning: the search counted {flops_info['flops_pruned']} FLOPs for this selection, "
                      f"the pruned network has {f1}; recording the latter")
        flops_info = {**flops_info, "flops_unpruned": flops0, "flops_pruned": f1, "flops_ratio_achieved": f1 / flops0}
        if target is not None:
            flops_info["flops_target_met"] = abs(f1 / flops0 - target) <= float(flops_info["flops_tolerance"])
        log.write(f"FLOPs ratio {flops_info['flops_ratio_achieved']:.4f} at input {size[0]}x{size[1]}")
        return flops_info

    def _stage_finetune_cls(self, run: "_RunState") -> None:
        """5. fine-tune the pruned backbone on classification (line 11)."""
        ft = self._load_finished("finetune_cls")
        if ft is None:
            log, ft = self._log("finetune_cls"), run.pruned
            st = finetune_classification(ft, self._loaders()[1], self.cfg["finetune"]["cls"], log,
                                         ckpt=self._ckpt("finetune_cls"), seed=int(self.cfg["seed"]))
            top1 = evaluate_classification(ft.forward_cls, run.cls_eval)["top1"]  # the paper's Table 5
            log.write(f"pruned backbone top-1 on {self.cls_eval.describe()}: {top1:.4f}")
            self._finish("finetune_cls", ft, self._arch(self._widths()), log, {**st, "top1": top1})
        run.ft = ft

    def _stage_finetune_seg(self, run: "_RunState") -> None:
        """6. fine-tune the pruned network on segmentation (line 11)."""
        final = self._load_finished("finetune_seg")
        if final is None:
            log, final = self._log("finetune_seg"), run.ft
            st = finetune_segmentation(final, self._loaders()[0], self.cfg["finetune"]["seg"], self.ignore_index, log,
                                       ckpt=self._ckpt("finetune_seg"), seed=int(self.cfg["seed"]))
            self._finish("finetune_seg", final, self._arch(self._widths()), log, st)
        run.final = final

    def _stage_evaluate(self, run: "_RunState") -> None:
        """7. mIoU, pixel accuracy, params, FLOPs, latency of the baseline and the pruned network."""
        run.metrics = self.evaluate(run.baseline, run.final, run.seg_eval, run.cls_eval)

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
            with strict_fp32(self.device):  # no TF32 on a GPU: `segprune evaluate` compares within MIOU_TOLERANCE
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
        # after sparsity training, before removal (sparsity stage; null in run folders made before it was recorded)
        sp = (self._done("sparsity") or {}).get("sparse_eval") or {}
        if sp.get("split") not in (None, out["eval_split"]):  # adopted from a run evaluated on another split
            sp = {}
        out["sparse"] = {"miou": sp.get("miou"), "pixel_acc": sp.get("pixel_acc")}
        before = out["pruned"]["miou_before_finetune"]
        out["prune_step_loss"] = (out["sparse"]["miou"] - before if None not in (out["sparse"]["miou"], before)
                                  else None)
        out["removed_gamma_share"] = prune_info.get("removed_gamma_share")
        # parts of model.parts without any prunable unit, with the reason (e.g. smp Segformer's LayerNorm
        # encoder); {} when every part has units, null in run folders made before it was recorded
        out["parts_without_units"] = (self._done("sparsity") or {}).get("parts_without_units")
        out["removal_compensation"] = prune_info.get("compensation")
        for key, stage in (("baseline", "pretrain_cls"), ("pruned", "finetune_cls")):  # backbone top-1 after its
            out[key]["cls_top1_after_cls_stage"] = (self._done(stage) or {}).get("top1")  # classification stage
        out["layer_widths"] = {"baseline": layer_widths(baseline), "pruned": layer_widths(pruned)}
        self.timings["evaluate"] = round(log.elapsed(), 2)
        out["stage_wall_s"] = dict(self.timings)
        out["threads"] = torch.get_num_threads()
        out["eval_device"] = describe_device(self.device)  # what `segprune evaluate` compares against
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


def _pct(v, sign: bool = False) -> str:
    return "n/a" if v is None else (f"{100 * v:+.2f}" if sign else f"{100 * v:.2f}")


def _prune_step_lines(m: dict) -> list[str]:
    """Report lines on the removal itself: mIoU after sparsity training, the prune-step loss, the
    removed share of Σ|γ| and what the removal compensated (n/a where the run folder predates them)."""
    sp, share, comp = m.get("sparse") or {}, m.get("removed_gamma_share"), m.get("removal_compensation")
    lines = [f"mIoU after sparsity training, before removal: {_pct(sp.get('miou'))}% (pixel acc "
             f"{_pct(sp.get('pixel_acc'))}%); prune-step loss (that minus the mIoU right after removal, both "
             f"single-scale): {_pct(m.get('prune_step_loss'))} points", ""]
    parts = ", ".join(f"{k} {_pct(v)}%" for k, v in (share or {}).get("parts", {}).items())
    lines += [f"Share of the units' Σ|γ| that the removal deletes: {_pct((share or {}).get('total'))}%"
              + (f" ({parts})" if parts else ""), ""]
    if comp and comp.get("channels"):
        lines += [f"Removal compensation ({comp['mode']}): {comp['channels']} removed channels had γ = 0; their constant "
                  f"output was folded into consumers exactly {comp['exact']} times, interior-exactly (zero-padded k×k "
                  f"convs) {comp['interior']} times, was 0 {comp['zero_constant']} times, skipped "
                  f"{sum(comp['skipped'].values())} times" + (f" ({comp['skipped']})" if comp["skipped"] else ""), ""]
    return lines


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
              *_prune_step_lines(m),
              "Kept channels per part: " + ", ".join(f"{k} {a}/{n}" for k, (a, n) in (m.get("kept_per_part") or {}).items()), "",
              *[f"Part `{k}` was not pruned: {why}" + "\n" for k, why in (m.get("parts_without_units") or {}).items()],
              "## Per-class IoU (%)", "", "| class | baseline | pruned |", "|---|---|---|"]
    for cls in b["per_class_iou"]:
        fmt = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
        lines.append(f"| {cls} | {fmt(b['per_class_iou'][cls])} | {fmt(p['per_class_iou'].get(cls))} |")
    lines += ["", "## Wall time per stage (s)", "", "| stage | s |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in m["stage_wall_s"].items()]
    return "\n".join(lines) + "\n"


