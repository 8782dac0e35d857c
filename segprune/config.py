"""Run configuration: defaults, YAML loading, ``--set key=value`` overrides and validation.

Every hyper-parameter of a run lives here; ``validate`` reports *all* bad keys in one
:class:`ConfigError` (unknown or misspelt keys, wrong types, impossible values).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "DEFAULTS", "load_config", "read_yaml_mapping", "apply_overrides", "validate", "merge", "demo_config"]



def __getattr__(name: str):
    """``METHOD_NAMES``: the ``method.name`` values, read from the method registry
    (``segprune.methods.base.method_names``: every registered method, MTP first)."""
    if name == "METHOD_NAMES":
        from .methods.base import method_names
        return method_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: Config sections whose keys are free-form (checked by their owner, not by :data:`DEFAULTS`):
#: ``method.options`` holds method-specific options, validated by the method class
#: (``segprune.methods.base.PruningMethod.OPTIONS`` / ``check_options``).
FREE_FORM = ("method.options",)


class ConfigError(ValueError):
    """A configuration problem; the message lists every offending key with its value."""


_SEG_DATA = {
    "name": "camvid", "root": "../shared/data/camvid", "input_size": [240, 320], "crop_size": [240, 320],
    "scale_range": [0.5, 2.0], "hflip": True, "ignore_index": 255, "train_split": "train", "eval_split": "test",
    "batch_size": 8, "eval_batch_size": 8, "num_workers": 0,
    "num_train": 256, "num_eval": 64, "num_kinds": 4, "image_size": [64, 64], "validate": True,
    # name: folder only (your own data; mmsegmentation's key names; segprune/data/folder.py, docs/datasets.md)
    "folder": {"img_dir": "images", "ann_dir": "labels", "img_suffix": ".jpg", "seg_map_suffix": ".png",
               "ann_file": None, "classes": None, "palette": None, "reduce_zero_label": False},
}
_CLS_DATA = {
    "name": "imagefolder", "root": "../shared/data/tiny_imagenet_subset", "input_size": [64, 64],
    "train_split": "train", "eval_split": "val", "batch_size": 64, "eval_batch_size": 128, "num_workers": 0,
    "num_train": 512, "num_eval": 128, "num_kinds": 4, "image_size": [32, 32], "validate": False,
}


def _opt(epochs, lr, momentum=0.9, weight_decay=1e-4):
    return {"epochs": epochs, "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "max_iters_per_epoch": None}


#: The complete schema: every key a config may set, with its default.
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "threads": None,
    # in-stage checkpoint every N training iterations (kill-anywhere resume); 0 = stage by stage only
    "checkpoint_every": 50,
    "model": {"name": "deeplabv3_resnet18", "width": 1.0, "output_stride": 16, "multi_grid": None,
              "aspp_channels": 256, "aspp_rates": None, "pretrained": None,
              # torchvision.* / smp.* models (segprune/models/ecosystem.py): smp encoder, torchvision aux head
              "encoder_name": None, "aux_loss": False},
    "data": {"seg": _SEG_DATA, "cls": _CLS_DATA},
    "train": {
        # seed of the baseline stages (pre-training, segmentation training); null = the top-level seed.
        # A sweep over ``seed`` with a fixed ``train.seed`` shares one trained baseline between runs.
        "seed": None,
        # mixed precision of every training loop (segprune/engine/amp.py): off | bf16 | fp16 (CUDA only)
        "amp": "off",
        # NHWC memory format of the trained modules and images in every training loop (segprune/engine/layout.py)
        "channels_last": False,
        "pretrain_cls": {**_opt(10, 0.1), "schedule": "linear"},
        "seg": {**_opt(30, 0.01), "power": 0.9},
    },
    "method": {
        "name": "mtp", "epochs": 10, "lr_seg": 0.005, "lr_cls": 0.01, "momentum": 0.9, "weight_decay": 1e-4,
        # rho: "auto" = mu reaches mu_max at the last multiplier update (MTP Eq. 10; [ours]), or a number > 1
        "lam": 1.0, "alpha1": 1e-3, "alpha2": 1e-3, "mu0": 0.01, "rho": "auto", "mu_max": 10.0, "update_every": 20,
        "keep_copy": "w3", "max_iters_per_epoch": None,
        # MTP: weight of l_cls in the W1 step (Eq. 7); 1 = the paper; 0 = an ablation (classification loss off) [ours]
        "cls_weight": 1.0,
        # the ℓ1 term of the γ methods (mtp, slimming, cap; segprune/methods/sparsity.py): l1_mode proximal (ISTA on
        # a momentum-free γ group) | subgradient; l1_schedule growing (ours: the channels the budget removes are
        # driven to γ = 0 before removal) | constant (the papers' α); l1_eps: γ count as zero below
        # l1_eps x their mean |γ| before training; l1_ramp: fraction of the training over which the penalty grows
        "l1_mode": "proximal", "l1_schedule": "growing", "l1_eps": 1e-3, "l1_ramp": 0.25,
        # baselines (segprune/methods/): slimming's ℓ1 strength, uniform from scratch, ThiNet calibration
        "alpha": 1e-3, "from_scratch": False, "calib_batches": 2, "samples_per_batch": 64,
        # options of other methods (CAP, SIRFP, ACoSP, ...): {key: value}, checked by the method class
        "options": {},
    },
    # target_flops_ratio: null = prune keep_ratio of the channels; a float in (0, 1) = find the keep ratio
    # whose pruned FLOPs / unpruned FLOPs (at data.seg.input_size) is within flops_tolerance (absolute)
    # of it, by bisection (keep_ratio is then ignored); see docs/methods_flops_target.md
    "prune": {"keep_ratio": 0.5, "threshold_mode": "ind", "min_channels": 4, "prune_coupled": False,
              "target_flops_ratio": None, "flops_tolerance": 0.01,
              # round every pruned layer's width to a multiple of round_to (8, 16: hardware-friendly); 1 = off
              "round_to": 1},
    "finetune": {
        "cls": {**_opt(2, 0.01), "schedule": "linear"},
        "seg": {**_opt(10, 0.005), "power": 0.9},
    },
    # test-time protocol (segprune/engine/evaluate.py): input scales, + horizontal flip, softmax
    # probabilities of the views averaged; mode whole | slide (windows of crop_size [h, w] every stride
    # [h, w] pixels, null = crop_size; overlapping logits averaged). Defaults = plain single-scale model(x).
    "eval": {"latency_runs": 20, "latency_warmup": 5, "threads": None, "split": None,
             "scales": [1.0], "flip": False, "mode": "whole", "crop_size": None, "stride": None},
    # several processes under torchrun (segprune/engine/distributed.py, docs/distributed.md); unused in a
    # single process. backend null = nccl with CUDA, else gloo; device null = cuda:LOCAL_RANK when CUDA is
    # available, else cpu; sync_bn = BatchNorm statistics of the global batch; timeout_s = collective timeout
    "distributed": {"backend": None, "device": None, "sync_bn": True, "timeout_s": 1800},
    # where the run computes: auto (CUDA when available, else CPU) | cpu | cuda | cuda:N
    # (segprune/engine/device.py); not part of the stage fingerprints, so stages are shared across devices
    "device": "auto",
}


def merge(base: dict, override: dict, path: str = "", unknown: list | None = None) -> dict:
    """Deep-merge ``override`` into a copy of ``base``; keys absent from ``base`` go to ``unknown``."""
    out = copy.deepcopy(base)
    for key, val in (override or {}).items():
        full = f"{path}{key}"
        if key not in base:
            if unknown is not None:
                unknown.append(full)
            continue
        if full in FREE_FORM:
            out[key] = copy.deepcopy(val)
        elif isinstance(base[key], dict) and val is None:  # an empty section (``prune:``) keeps its defaults
            continue
        elif isinstance(base[key], dict) and isinstance(val, dict):
            out[key] = merge(base[key], val, full + ".", unknown)
        else:
            out[key] = copy.deepcopy(val)
    return out


def _set_path(cfg: dict, dotted: str, value: Any, unknown: list) -> None:
    node, keys = cfg, dotted.split(".")
    ref = DEFAULTS
    if any(dotted.startswith(f + ".") for f in FREE_FORM):  # e.g. method.options.tau_end=0.001
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
        return
    for k in keys[:-1]:
        if not isinstance(ref, dict) or k not in ref or not isinstance(ref[k], dict):
            unknown.append(dotted)
            return
        ref, node = ref[k], node[k]
    if keys[-1] not in ref:
        unknown.append(dotted)
        return
    node[keys[-1]] = value


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to ``cfg`` in place.

    Raises:
        ConfigError: malformed override or unknown key (all of them listed).
    """
    bad = []
    for item in overrides or []:
        if "=" not in item:
            bad.append(f"--set {item!r}: expected key=value")
            continue
        key, raw = item.split("=", 1)
        unknown: list[str] = []
        _set_path(cfg, key.strip(), yaml.safe_load(raw), unknown)
        bad += [f"--set {u}: unknown key" for u in unknown]
    if bad:
        raise ConfigError("bad overrides:\n  " + "\n  ".join(bad))
    return cfg


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict:
    """Read a YAML file that must hold a mapping (an empty file is ``{}``).

    Raises:
        ConfigError: missing file, YAML syntax error, or a top level that is not a mapping; the
            message starts with ``what`` and the path.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {p} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {p} must hold a mapping at top level, got {type(raw).__name__}")
    return raw


def read_run_config(run_dir: str | Path) -> dict:
    """The ``config.yaml`` of a run folder, merged over :data:`DEFAULTS` (keys a run made before
    they existed lacks take their defaults, which is what that run used).

    Raises:
        ConfigError: no ``config.yaml`` (not a run folder), unreadable, invalid YAML or not a mapping;
            the message names the file.
    """
    run = Path(run_dir)
    f = run / "config.yaml"
    if not f.is_file():
        raise ConfigError(f"{run} is not a segprune run folder (no config.yaml)")
    try:
        return merge(DEFAULTS, read_yaml_mapping(f, "run config"))
    except OSError as exc:
        raise ConfigError(f"run config {f} cannot be read: {exc}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    """Read a YAML config (``None`` = defaults), merge over :data:`DEFAULTS`, apply overrides, validate.

    Relative data roots are resolved against the config file's folder first, then the CWD.

    Raises:
        ConfigError: missing/unreadable file, YAML syntax error, unknown keys, bad values;
            the message names the file and every bad key.
    """
    raw: dict = {}
    src = "<defaults>"
    if path is not None:
        src = str(path)
        raw = read_yaml_mapping(path, "config file")
    unknown: list[str] = []
    cfg = merge(DEFAULTS, raw, "", unknown)
    problems = [f"{k}: unknown key" for k in unknown]
    try:
        apply_overrides(cfg, overrides or [])
    except ConfigError as exc:
        problems.append(str(exc))
    tr = cfg.get("train")
    if isinstance(tr, dict) and tr.get("amp") is False:  # YAML 1.1 reads a bare `off` as false
        tr["amp"] = "off"
    problems += validate(cfg, raise_error=False)
    if problems:
        raise ConfigError(f"invalid config {src}:\n  " + "\n  ".join(problems))
    if path is not None:
        base = Path(path).resolve().parent
        for sec in ("seg", "cls"):
            root = cfg["data"][sec].get("root")
            if root and not Path(root).is_absolute() and not Path(root).exists() and (base / root).exists():
                cfg["data"][sec]["root"] = str((base / root).resolve())
    return cfg


def _num(v, kind=(int, float)):
    return isinstance(v, kind) and not isinstance(v, bool)


def _shape_problems(cfg: Any, ref: dict = DEFAULTS, path: str = "") -> list[str]:
    """Sections of :data:`DEFAULTS` that ``cfg`` gives as something other than a mapping, or lacks."""
    out = []
    for key, sub in ref.items():
        full = f"{path}{key}"
        if not isinstance(sub, dict) or full in FREE_FORM:
            continue
        val = cfg.get(key) if isinstance(cfg, dict) else None
        if not isinstance(val, dict):
            what = "missing" if isinstance(cfg, dict) and key not in cfg else f"{val!r}"
            out.append(f"{full}={what}: must be a mapping (a config section with keys "
                       f"{', '.join(list(sub)[:4])}{', ...' if len(sub) > 4 else ''})")
        else:
            out += _shape_problems(val, sub, full + ".")
    return out


def validate(cfg: dict, raise_error: bool = True) -> list[str]:
    """Check types and ranges; return the list of problems (or raise :class:`ConfigError`).

    A section given as a scalar (``prune: 0.5``) is reported as such; the value checks then stop,
    since they need the sections' keys.
    """
    shape = _shape_problems(cfg)
    if shape:
        if raise_error:
            raise ConfigError("invalid config:\n  " + "\n  ".join(shape))
        return shape
    bad: list[str] = []

    def need(cond: bool, key: str, msg: str):
        if not cond:
            val = cfg
            for k in key.split("."):
                val = val.get(k) if isinstance(val, dict) else None
            bad.append(f"{key}={val!r}: {msg}")

    need(_num(cfg["seed"], int), "seed", "must be an integer")
    need(_num(cfg["checkpoint_every"], int) and cfg["checkpoint_every"] >= 0, "checkpoint_every", "must be an integer >= 0")
    need(cfg["train"]["seed"] is None or _num(cfg["train"]["seed"], int), "train.seed", "must be null or an integer")
    need(cfg["train"].get("amp", "off") in ("off", "bf16", "fp16"), "train.amp",
         "must be off, bf16 or fp16 (fp16 needs CUDA)")
    need(isinstance(cfg["train"].get("channels_last", False), bool), "train.channels_last", "must be true or false")
    need(cfg["threads"] is None or (_num(cfg["threads"], int) and cfg["threads"] > 0), "threads", "must be null or a positive integer")
    m = cfg["model"]
    need(_num(m["width"]) and m["width"] > 0, "model.width", "must be > 0")
    need(m["output_stride"] in (8, 16), "model.output_stride", "must be 8 or 16")
    need(_num(m["aspp_channels"], int) and m["aspp_channels"] > 0, "model.aspp_channels", "must be a positive integer")
    need(m.get("pretrained") is None or (isinstance(m["pretrained"], str) and m["pretrained"] != ""), "model.pretrained",
         "must be null or the path of a torchvision-format checkpoint (.pth / .safetensors)")
    for sec in ("seg", "cls"):
        d = cfg["data"][sec]
        for key in ("input_size", "image_size") + (("crop_size",) if sec == "seg" else ()):
            v = d[key]
            if sec == "seg" and key == "input_size" and v is None:
                need(_num(d["eval_batch_size"], int) and d["eval_batch_size"] == 1, "data.seg.eval_batch_size",
                     "must be 1 when data.seg.input_size is null (images are evaluated at their native sizes, "
                     "which differ within a batch)")
                continue
            need(isinstance(v, list) and len(v) == 2 and all(_num(x, int) and x > 0 for x in v),
                 f"data.{sec}.{key}", "must be [H, W] with positive integers"
                 + (" or null (native image sizes; FLOPs and latency at crop_size)" if (sec, key) == ("seg", "input_size") else ""))
        for key in ("batch_size", "eval_batch_size"):
            need(_num(d[key], int) and d[key] >= (2 if key == "batch_size" else 1), f"data.{sec}.{key}",
                 "must be an integer >= 2 for training (BatchNorm), >= 1 for evaluation")
        need(_num(d["num_workers"], int) and d["num_workers"] >= 0, f"data.{sec}.num_workers", "must be >= 0")
    from .models import model_name_problems  # the model registry (segprune/models/)
    from .models.ecosystem import config_problems
    bad += model_name_problems(m["name"]) + config_problems(m)
    ints = lambda v, n=None: isinstance(v, list) and len(v) > 0 and (n is None or len(v) == n) and all(  # noqa: E731
        _num(x, int) and x > 0 for x in v)
    need(m["multi_grid"] is None or ints(m["multi_grid"], 3), "model.multi_grid",
         "must be null or three positive integers, e.g. [1, 2, 4] (DeepLabv3 Sec. 3.2)")
    need(m["aspp_rates"] is None or ints(m["aspp_rates"]), "model.aspp_rates",
         "must be null or a list of positive integers, e.g. [6, 12, 18]")
    for sec in ("seg", "cls"):
        d = cfg["data"][sec]
        need(isinstance(d["validate"], bool), f"data.{sec}.validate", "must be true or false")
        for key in ("train_split", "eval_split"):
            need(isinstance(d[key], str) and d[key] != "", f"data.{sec}.{key}", "must be a non-empty split name")
        for key in ("num_train", "num_eval", "num_kinds"):
            need(_num(d[key], int) and d[key] >= 1, f"data.{sec}.{key}", "must be a positive integer (synthetic data)")
        need(d["root"] is None or (isinstance(d["root"], str) and d["root"] != ""), f"data.{sec}.root",
             "must be null or a folder path")
    need(isinstance(cfg["data"]["seg"]["hflip"], bool), "data.seg.hflip", "must be true or false")
    ign = cfg["data"]["seg"]["ignore_index"]
    need(_num(ign, int) and 0 <= ign <= 65535, "data.seg.ignore_index",
         "must be an integer in [0, 65535] (the label value excluded from loss and mIoU, usually 255)")
    seg = cfg["data"]["seg"]
    from .data import SEG_DATASET_NAMES  # the registry of segmentation datasets (segprune/data/)
    need(seg["name"] in SEG_DATASET_NAMES, "data.seg.name", "must be one of: " + ", ".join(SEG_DATASET_NAMES))
    from .data.folder import folder_config_problems  # data.seg.folder (name: folder, your own data)
    bad += folder_config_problems(cfg)
    need(cfg["data"]["cls"]["name"] in ("imagefolder", "synthetic"), "data.cls.name", "must be 'imagefolder' or 'synthetic'")
    sr = seg["scale_range"]
    need(isinstance(sr, list) and len(sr) == 2 and all(_num(x) and x > 0 for x in sr) and sr[0] <= sr[1],
         "data.seg.scale_range", "must be [lo, hi] with 0 < lo <= hi")
    stages = {"train.pretrain_cls": cfg["train"]["pretrain_cls"], "train.seg": cfg["train"]["seg"],
              "finetune.cls": cfg["finetune"]["cls"], "finetune.seg": cfg["finetune"]["seg"]}
    for name, st in stages.items():
        need(_num(st["epochs"], int) and st["epochs"] >= 0, f"{name}.epochs", "must be an integer >= 0")
        need(_num(st["lr"]) and st["lr"] > 0, f"{name}.lr", "must be > 0")
        need(_num(st["momentum"]) and 0 <= st["momentum"] < 1, f"{name}.momentum", "must be in [0, 1)")
        need(_num(st["weight_decay"]) and st["weight_decay"] >= 0, f"{name}.weight_decay", "must be >= 0")
        mi = st["max_iters_per_epoch"]
        need(mi is None or (_num(mi, int) and mi > 0), f"{name}.max_iters_per_epoch", "must be null or > 0")
    me = cfg["method"]
    from .methods.base import check_method_config, method_names  # the method registry (segprune/methods/)
    names = method_names()
    need(me["name"] in names, "method.name", "must be one of: " + ", ".join(names))
    need(isinstance(me["options"], dict), "method.options", "must be a mapping of method-specific options")
    if me["name"] in names:  # the named method's options and its own checks (e.g. MTP's lr * mu_max < 1)
        bad += check_method_config(me)
    # keys several methods share (each method reads only those in its config_keys)
    need(_num(me["alpha"]) and me["alpha"] >= 0, "method.alpha", "must be >= 0")
    need(isinstance(me["from_scratch"], bool), "method.from_scratch", "must be true or false")
    for key in ("calib_batches", "samples_per_batch"):
        need(_num(me[key], int) and me[key] > 0, f"method.{key}", "must be a positive integer")
    need(_num(me["epochs"], int) and me["epochs"] >= 0, "method.epochs", "must be an integer >= 0")
    need(me["max_iters_per_epoch"] is None or (_num(me["max_iters_per_epoch"], int) and me["max_iters_per_epoch"] > 0),
         "method.max_iters_per_epoch", "must be null or > 0")
    need(_num(me["lr_seg"]) and me["lr_seg"] > 0, "method.lr_seg", "must be > 0")
    need(_num(me["weight_decay"]) and me["weight_decay"] >= 0, "method.weight_decay", "must be >= 0")
    need(_num(me["momentum"]) and 0 <= me["momentum"] < 1, "method.momentum", "must be in [0, 1)")
    from .methods.sparsity import sparsity_config_problems  # shared by mtp, slimming, cap
    bad += sparsity_config_problems(me)
    pr = cfg["prune"]
    need(_num(pr["keep_ratio"]) and 0 < pr["keep_ratio"] < 1, "prune.keep_ratio", "must lie in (0, 1), e.g. 0.5")
    need(pr["threshold_mode"] in ("ind", "uni"), "prune.threshold_mode", "must be 'ind' or 'uni'")
    need(_num(pr["min_channels"], int) and pr["min_channels"] >= 1, "prune.min_channels", "must be an integer >= 1")
    need(_num(pr["round_to"], int) and pr["round_to"] >= 1, "prune.round_to",
         "must be an integer >= 1 (1 = no rounding; 8 or 16 for hardware-friendly widths)")
    tfr, ftol = pr.get("target_flops_ratio"), pr.get("flops_tolerance", 0.01)
    need(tfr is None or (_num(tfr) and 0 < tfr < 1), "prune.target_flops_ratio",
         "must be null or lie in (0, 1), e.g. 0.5 for half the FLOPs of the unpruned network")
    need(_num(ftol) and ftol > 0, "prune.flops_tolerance",
         "must be > 0 (absolute tolerance on the FLOPs ratio, e.g. 0.01)")
    if tfr is not None and (me.get("options") or {}).get("keep_ratio") is not None:
        from .methods.base import method_class
        need(not getattr(method_class(me["name"]), "widths_fixed_in_training", False), "method.options.keep_ratio",
             f"{me['name']} with prune.target_flops_ratio finds its training keep ratio from the FLOPs target "
             "(before sparsity training); leave method.options.keep_ratio null, or drop the FLOPs target")
    ev = cfg["eval"]
    need(_num(ev["latency_runs"], int) and ev["latency_runs"] >= 1, "eval.latency_runs", "must be >= 1")
    need(_num(ev["latency_warmup"], int) and ev["latency_warmup"] >= 0, "eval.latency_warmup", "must be >= 0")
    need(ev["threads"] is None or (_num(ev["threads"], int) and ev["threads"] > 0), "eval.threads",
         "must be null (all cores) or a positive integer")
    need(ev["split"] is None or (isinstance(ev["split"], str) and ev["split"] != ""), "eval.split",
         "must be null (= data.seg.eval_split) or a split name")
    sc = ev["scales"]
    need(isinstance(sc, list) and len(sc) > 0 and all(_num(x) and 0 < x < float("inf") for x in sc), "eval.scales",
         "must be a non-empty list of positive numbers, e.g. [1.0] or [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]")
    need(isinstance(ev["flip"], bool), "eval.flip", "must be true or false")
    need(ev["mode"] in ("whole", "slide"), "eval.mode", "must be 'whole' or 'slide'")
    pair = lambda v: isinstance(v, list) and len(v) == 2 and all(_num(x, int) and x > 0 for x in v)  # noqa: E731
    need(ev["crop_size"] is None or pair(ev["crop_size"]), "eval.crop_size", "must be null or [h, w] with positive integers")
    need(ev["mode"] != "slide" or ev["crop_size"] is not None, "eval.crop_size", "is required when eval.mode is 'slide'")
    need(ev["stride"] is None or pair(ev["stride"]), "eval.stride", "must be null (= crop_size) or [h, w] with positive integers")
    if pair(ev["stride"]) and pair(ev["crop_size"]):
        need(all(s <= c for s, c in zip(ev["stride"], ev["crop_size"])), "eval.stride",
             "must not exceed eval.crop_size (pixels would be left uncovered)")
    dd = cfg["distributed"]  # several processes (torchrun); see segprune/engine/distributed.py
    need(dd["backend"] is None or dd["backend"] in ("gloo", "nccl", "mpi", "ucc"), "distributed.backend",
         "must be null (nccl with CUDA, else gloo) or one of gloo, nccl, mpi, ucc")
    need(dd["device"] in (None, "cpu", "cuda"), "distributed.device", "must be null (cuda when available), 'cpu' or 'cuda'")
    need(isinstance(dd["sync_bn"], bool), "distributed.sync_bn", "must be true or false")
    need(_num(dd["timeout_s"]) and dd["timeout_s"] > 0, "distributed.timeout_s", "must be a number of seconds > 0")
    from .engine.device import device_problem  # the spelling only; whether CUDA exists is checked at run time
    dev_bad = device_problem(cfg.get("device", "auto"))
    need(dev_bad is None, "device", dev_bad or "")
    if bad and raise_error:
        raise ConfigError("invalid config:\n  " + "\n  ".join(bad))
    return bad


def demo_config() -> dict:
    """The embedded default used by ``segprune demo``: synthetic data, a width-0.125 DeepLabv3-R18 (OS 8)."""
    cfg = copy.deepcopy(DEFAULTS)
    return merge(cfg, yaml.safe_load(DEMO_YAML))


#: The demo settings, kept as YAML so that the run folder's config.yaml reads like a user's.
#: The segmentation lr of sparsity training and fine-tuning (0.02, the baseline's) was 0.01 until
#: session 8: the half-width network then had too little training after the cut (docs/results/sparsity.md,
#: "Demo: capacity and the learning rate after the cut"). MTP's sparsity lrs are 0.04 since session 9: its
#: tied copies W1 = W3 share one backbone, which moves by about the mean of the two copies' steps, so each
#: copy's lr acts at about half its value on it; at 0.02 the network after sparsity training was 2.0
#: points below Network Slimming's at the same lr (docs/results/sparsity.md, "Demo: MTP's sparsity lr").
#: lr 0.04 keeps lr * mu_max = 0.8 < 1 (MTP's own check).
#: Session 12 (docs/results/demo.md, "How the demo got here"): width 0.125 instead of 0.25 (about half the time
#: per step) to meet the <= 2 min target. Every demo schedule was iteration-limited, not capacity-limited, so
#: the time saved buys 35 segmentation epochs instead of 30 and 12 sparsity epochs instead of 8 (pre-training
#: 5 instead of 6). The network after sparsity training is already the pruned one (prune-step loss ~0), so
#: fine-tuning on segmentation is 2 epochs.
DEMO_YAML = """
seed: 0
model: {name: deeplabv3_resnet18, width: 0.125, output_stride: 8}
data:
  seg: {name: synthetic, input_size: [64, 64], crop_size: [64, 64], image_size: [64, 64], scale_range: [0.75, 1.25],
        num_train: 320, num_eval: 96, num_kinds: 4, batch_size: 16, eval_batch_size: 32}
  cls: {name: synthetic, input_size: [32, 32], image_size: [32, 32], num_train: 1024, num_eval: 256, num_kinds: 4,
        batch_size: 64, eval_batch_size: 128}
train:
  pretrain_cls: {epochs: 5, lr: 0.05}
  seg: {epochs: 35, lr: 0.02}
method: {epochs: 12, lr_seg: 0.04, lr_cls: 0.04, alpha1: 0.1, alpha2: 0.1, mu0: 0.1, rho: auto, mu_max: 20.0, update_every: 5,
         l1_schedule: growing}
prune: {keep_ratio: 0.5, threshold_mode: ind, min_channels: 2}
finetune:
  cls: {epochs: 1, lr: 0.01}
  seg: {epochs: 2, lr: 0.02}
eval: {latency_runs: 20, latency_warmup: 5}
"""
