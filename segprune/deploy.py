"""Deployment: ONNX export of a run's models, checked against PyTorch, and eager vs ONNX Runtime latency.

Two entry points, used by ``segprune export`` and ``segprune benchmark`` (and ``benchmarks/latency.py``):

* :func:`export_run` writes the pruned (or baseline) model of a run folder as ONNX with a dynamic batch
  axis, then runs it in ONNX Runtime and in PyTorch on real eval images of the run's dataset and
  records the largest logit difference and the pixel agreement of the argmax in a JSON sidecar.
* :func:`benchmark` times PyTorch eager and ONNX Runtime on CPU for each model and batch size
  (warm-up, then median and p10/p90 of the timed runs), beside params and FLOPs/MACs.

Device (``--device``, the config key ``device``; ``segprune.engine.device``): on the CPU everything is as
described above. On a CUDA device the export still traces the model on the CPU; the export check runs
PyTorch on the device (TF32 off) against ONNX Runtime's ``CUDAExecutionProvider`` where it is installed
(``onnxruntime-gpu``), else its CPU provider; the benchmark times PyTorch eager with CUDA events after the
warm-up and ONNX Runtime's CUDA provider (I/O bound on the device) where installed. These CUDA code paths
have not been run on a GPU in this project.

Exporter: torch 2.13's ``torch.onnx.export`` defaults to the ``torch.export``-based (dynamo) exporter,
which needs the ``onnxscript`` package; segprune does not depend on it, so every export here uses the
TorchScript exporter explicitly (``dynamo=False``, dynamic batch via ``dynamic_axes``). That path is
deprecated upstream (it emits a ``DeprecationWarning``, silenced here) and supports opsets up to 20.

Model I/O: input ``images`` float32 ``(N, 3, H, W)``, normalised as the run's eval transform does,
at the run's ``data.seg.input_size``; output ``logits`` float32 ``(N, K, H, W)``.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import CheckpointError, load_json, save_json, atomic_write_bytes
from .config import ConfigError, load_config, read_run_config
from .engine.device import describe_device, resolve_device, strict_fp32
from .engine.profile import _percentile  # one percentile definition for eager and ORT timings

__all__ = [
    "DEFAULT_OPSET", "MIN_OPSET", "MAX_OPSET", "EXPORTER", "INPUT_NAME", "OUTPUT_NAME",
    "find_run", "run_input_size", "eval_images", "export_onnx", "check_onnx", "export_run",
    "ort_session", "ort_cuda_available", "measure_ort_latency", "benchmark", "benchmark_models", "render_benchmark",
    "write_benchmark",
    "cpu_model", "sidecar_path", "load_benchmark",
]

DEFAULT_OPSET = 17
#: Bilinear ``Resize`` with ``align_corners=False`` needs opset >= 11; the TorchScript exporter stops at 20.
MIN_OPSET, MAX_OPSET = 11, 20
EXPORTER = "torch.onnx.export(dynamo=False) (TorchScript exporter; the dynamo exporter needs onnxscript)"
INPUT_NAME, OUTPUT_NAME = "images", "logits"
#: Export check thresholds: largest |logit difference| and smallest argmax agreement accepted.
CHECK_ATOL, CHECK_MIN_AGREEMENT = 1e-3, 0.99

_STAGE_OF = {"baseline": "train_seg", "pruned": "finetune_seg"}


# ------------------------------------------------------------------------------------------------
# run folders
# ------------------------------------------------------------------------------------------------
def _stage_dir(run: Path, stage: str) -> Path | None:
    found = sorted((run / "stages").glob(f"*_{stage}"))
    if found and (found[0] / "done.json").is_file():
        return found[0]
    return None


def find_run(run_dir: str | Path, pruned_stage_ok: bool = False) -> tuple[dict, dict[str, Path]]:
    """Config and finished model stages of a run folder.

    Args:
        pruned_stage_ok: when fine-tuning has not finished, take the pruned model from the finished
            pruning stage (``stages/NN_prune``): same architecture, weights not fine-tuned. Enough
            for latency, params and FLOPs (:func:`benchmark`), not for export or accuracy.

    Returns:
        ``(cfg, stages)``: the run's ``config.yaml`` merged over the defaults (as ``segprune
        evaluate`` does) and ``{"baseline": stages/NN_train_seg, "pruned": stages/NN_finetune_seg}``
        (the baseline entry is left out if that stage is not finished).

    Raises:
        ConfigError: ``run_dir`` has no ``config.yaml`` (not a run folder), an unreadable one, or no
            finished fine-tuning (``stages/*_finetune_seg/done.json``); the message names the path.
    """
    run = Path(run_dir)
    cfg = read_run_config(run)
    stages = {}
    for key, stage in _STAGE_OF.items():
        d = _stage_dir(run, stage)
        if d is not None:
            stages[key] = d
    if "pruned" not in stages and pruned_stage_ok:
        d = _stage_dir(run, "prune")
        if d is not None:
            stages["pruned"] = d
    if "pruned" not in stages:
        raise ConfigError(f"{run}: the run has not finished fine-tuning (no stages/*_finetune_seg/done.json)"
                          + (" nor pruning (stages/*_prune/done.json)" if pruned_stage_ok else ""))
    return cfg, stages


def run_input_size(cfg: dict) -> tuple[int, int]:
    """Network input ``(H, W)`` in pixels: ``data.seg.input_size``, else (images kept at their native
    sizes) ``data.seg.crop_size``, as in ``pipeline.model_input_size``; synthetic data with neither:
    ``image_size``.

    Raises:
        ConfigError: none of them is set.
    """
    dseg = cfg["data"]["seg"]
    size = (dseg.get("input_size") or dseg.get("crop_size")
            or (dseg.get("image_size") if dseg.get("name") == "synthetic" else None))
    if not size or len(size) != 2:
        raise ConfigError(f"data.seg.input_size={dseg.get('input_size')!r}, crop_size={dseg.get('crop_size')!r}: "
                          "a fixed (H, W) input size is needed")
    return int(size[0]), int(size[1])


def eval_images(cfg: dict, n: int) -> tuple[torch.Tensor, str]:
    """The first ``n`` eval images of the run's segmentation dataset, as the evaluator sees them.

    The dataset is built as ``segprune evaluate`` builds it (eval transform: resize to
    ``input_size``, normalise); a run evaluated at native sizes (``input_size: null``) gets its images
    resized to :func:`run_input_size`, the size the model is exported at. Fewer than ``n`` images are
    returned if the split is smaller.

    Returns:
        ``(images float32 (n, 3, H, W), split name)``.

    Raises:
        ValueError: ``n < 1``.
        DataError: the dataset cannot be built or read (names the file or key).
    """
    from .data import build_seg_dataset
    if n < 1:
        raise ValueError(f"number of images must be >= 1, got {n}")
    dseg = cfg["data"]["seg"]
    if dseg.get("input_size") is None:  # native sizes differ: use the export size
        dseg = {**dseg, "input_size": list(run_input_size(cfg))}
    split = cfg["eval"]["split"] or dseg["eval_split"]
    ds = build_seg_dataset(dseg, split, False, int(cfg["seed"]))
    k = min(n, len(ds))
    return torch.stack([ds[i][0] for i in range(k)]), split


# ------------------------------------------------------------------------------------------------
# export + check
# ------------------------------------------------------------------------------------------------
def _check_opset(opset: int) -> int:
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"opset {opset!r}: must be an integer in {MIN_OPSET}..{MAX_OPSET} "
                          f"(bilinear resize needs >= {MIN_OPSET}; the TorchScript exporter stops at {MAX_OPSET})")
    return opset


def export_onnx(model: nn.Module, path: str | Path, input_size: Sequence[int], opset: int = DEFAULT_OPSET) -> dict:
    """Export a segmentation model to ONNX with a dynamic batch axis.

    The model is exported in eval mode (its own mode is restored) with the TorchScript exporter
    (``dynamo=False``, see the module docstring), constant folding on, weights inside the file.
    The file is written to a temporary name next to ``path`` and moved over it, then loaded and
    checked with ``onnx.checker``.

    Args:
        model: ``(N, 3, H, W)`` float32 -> ``(N, K, H, W)`` logits.
        path: destination ``.onnx`` file (parent folders are created).
        input_size: ``(H, W)`` in pixels, fixed in the graph; only the batch axis is dynamic.
        opset: ONNX default-domain opset, ``MIN_OPSET..MAX_OPSET`` (default 17).

    Returns:
        ``{"opset", "input_size": [H, W], "input": "images", "output": "logits",
        "dynamic_axes", "exporter", "bytes", "sha256"}`` (opset as read back from the file).

    Raises:
        ConfigError: opset out of range.
        onnx.checker.ValidationError: the written model is invalid.
    """
    import onnx
    _check_opset(opset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = int(input_size[0]), int(input_size[1])
    dyn = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    flags = [(m, m.training) for m in model.modules()]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        model.eval()
        x = torch.zeros(1, 3, h, w, dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # legacy exporter, on purpose
            with torch.no_grad():
                torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_axes=dyn, do_constant_folding=True)
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto)
        os.replace(tmp, path)
    finally:
        for m, flag in flags:
            m.training = flag
        if tmp.exists():
            tmp.unlink()
    got = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    data = path.read_bytes()
    return {"opset": got[0] if got else opset, "input_size": [h, w], "input": INPUT_NAME, "output": OUTPUT_NAME,
            "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in dyn.items()},
            "exporter": EXPORTER, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def ort_cuda_available() -> bool:
    """True if the installed ONNX Runtime has the ``CUDAExecutionProvider`` (package ``onnxruntime-gpu``)."""
    import onnxruntime as ort
    return "CUDAExecutionProvider" in ort.get_available_providers()


def ort_session(path: str | Path, threads: int = 1, device: torch.device | None = None):
    """An ONNX Runtime session: ``intra_op_num_threads=threads``, ``inter_op_num_threads=1``,
    sequential execution, all graph optimisations (``ORT_ENABLE_ALL``); the CPU provider, or for a CUDA
    ``device`` the ``CUDAExecutionProvider`` on that device (TF32 off; CPU fallback for unsupported
    nodes; the CUDA provider has not been run on a GPU in this project).

    Raises:
        ValueError: ``threads < 1``, or a CUDA ``device`` without the CUDA provider installed.
        onnxruntime.capi.onnxruntime_pybind11_state.Fail etc.: the file cannot be loaded.
    """
    import onnxruntime as ort
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    providers: list = ["CPUExecutionProvider"]
    if device is not None and torch.device(device).type == "cuda":  # ORT's CUDA provider: not run on a GPU in this project
        if not ort_cuda_available():
            raise ValueError("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
        idx = torch.device(device).index or 0
        providers = [("CUDAExecutionProvider", {"device_id": idx, "use_tf32": 0}), "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), sess_options=so, providers=providers)


def check_onnx(path: str | Path, model: nn.Module, images: torch.Tensor, threads: int = 1,
               device: torch.device | None = None) -> dict:
    """Compare ONNX Runtime with PyTorch eval mode on the same images.

    Args:
        path: an ONNX file from :func:`export_onnx`.
        model: the PyTorch model it was exported from (run where it is, the images moved to it; on a
            GPU with TF32 off).
        images: float32 ``(N, 3, H, W)``; run through ONNX Runtime as one batch.
        device: a CUDA device: ONNX Runtime's CUDA provider there when installed (else the CPU's).

    Returns:
        ``{"images": N, "pixels": N*H*W, "max_abs_diff": max |logit_ort - logit_torch|,
        "mean_abs_diff", "agreement": fraction of pixels whose argmax over the K classes agrees,
        "output_shape": [N, K, H, W], "ort_provider": the provider that ran, "torch_device"}``.

    Raises:
        CheckpointError: ONNX Runtime's output shape differs from PyTorch's (names the file).
    """
    cuda = device is not None and torch.device(device).type == "cuda" and ort_cuda_available()
    sess = ort_session(path, threads, device if cuda else None)
    x = images.detach().to(device="cpu", dtype=torch.float32).contiguous()
    ort_out = torch.from_numpy(sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
    flags = [(m, m.training) for m in model.modules()]
    p = next(model.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    try:
        model.eval()
        with torch.inference_mode(), strict_fp32(dev):
            ref = model(x.to(dev)).float().cpu()
    finally:
        for m, flag in flags:
            m.training = flag
    if tuple(ort_out.shape) != tuple(ref.shape):
        raise CheckpointError(f"{path}: ONNX Runtime output {tuple(ort_out.shape)} vs PyTorch {tuple(ref.shape)}")
    diff = (ort_out - ref).abs()
    agree = (ort_out.argmax(1) == ref.argmax(1)).double().mean().item()
    n, _, h, w = ref.shape
    return {"images": int(n), "pixels": int(n * h * w), "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()), "agreement": float(agree), "output_shape": list(ref.shape),
            "ort_provider": sess.get_providers()[0], "torch_device": str(dev)}


def sidecar_path(onnx_path: str | Path) -> Path:
    """``FILE.onnx`` -> ``FILE.onnx.json`` (the export record)."""
    p = Path(onnx_path)
    return p.with_name(p.name + ".json")


def export_run(run_dir: str | Path, onnx_path: str | Path, opset: int = DEFAULT_OPSET, images: int = 8,
               baseline: bool = False, threads: int = 1, device: str | torch.device | None = "cpu") -> dict:
    """Export the pruned (or, ``baseline=True``, the unpruned) model of a run folder and check it.

    The model is rebuilt with :func:`segprune.pipeline.load_run_model` from ``arch.json`` +
    ``model.safetensors`` (no pickle), exported by :func:`export_onnx` at the run's input size,
    then compared by :func:`check_onnx` on the first ``images`` eval images of the run's dataset, with
    PyTorch on ``device`` (a spec of ``engine.device.resolve_device`` or a torch.device; ``None``: the
    run's ``device`` key). The record is written as JSON next to the model (:func:`sidecar_path`).

    Returns:
        the sidecar dict: ``format``, ``run``, ``model`` (``"pruned"``/``"baseline"``), ``stage``,
        the :func:`export_onnx` fields (``opset``, ``input_size``, ...), ``num_classes``,
        ``params``, ``flops``/``macs`` (batch 1; FLOPs = 2 x MACs), ``check`` (:func:`check_onnx`
        plus ``split``, ``atol``, ``min_agreement`` and ``ok``), versions and a timestamp.

    Raises:
        ConfigError: not a run folder / fine-tuning not finished / no baseline stage / bad opset / a
            device this machine does not have (raised before anything is read or written).
        CheckpointError: the stage's files cannot be rebuilt into a model.
        DataError: the run's eval data cannot be read.
        ValueError: ``images < 1``.
    """
    import onnx
    import onnxruntime
    from .engine.profile import count_flops, count_params
    from .pipeline import load_run_model
    _check_opset(opset)
    if images < 1:
        raise ValueError(f"--images must be >= 1, got {images}")
    dev = device if isinstance(device, torch.device) else resolve_device(device) if device is not None else None
    run = Path(run_dir)
    cfg, stages = find_run(run)
    dev = dev or resolve_device(cfg.get("device", "auto"))
    which = "baseline" if baseline else "pruned"
    if which not in stages:
        raise ConfigError(f"{run}: no finished baseline stage (stages/*_train_seg/done.json)")
    model, arch = load_run_model(stages[which])
    model.eval()
    size = run_input_size(cfg)
    x, split = eval_images(cfg, images)
    if tuple(x.shape[-2:]) != size:
        raise ConfigError(f"{run}: eval images are {tuple(x.shape[-2:])}, expected input_size {size}")
    info = export_onnx(model, onnx_path, size, opset)  # traced on the CPU
    fl = count_flops(model, size)
    chk = check_onnx(onnx_path, model.to(dev), x, threads, dev)
    chk.update(split=split, atol=CHECK_ATOL, min_agreement=CHECK_MIN_AGREEMENT,
               ok=bool(chk["max_abs_diff"] <= CHECK_ATOL and chk["agreement"] >= CHECK_MIN_AGREEMENT))
    rec = {"format": "segprune-onnx/1", "onnx": str(onnx_path), "run": str(run), "model": which,
           "stage": stages[which].name, **info, "num_classes": int(arch["num_classes"]),
           "params": count_params(model), "flops": fl["flops"], "macs": fl["macs"], "flops_note": fl["note"],
           "check": chk, "device": describe_device(dev), "torch_version": torch.__version__, "onnx_version": onnx.__version__,
           "onnxruntime_version": onnxruntime.__version__,
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    save_json(sidecar_path(onnx_path), rec)
    return rec


# ------------------------------------------------------------------------------------------------
# latency
# ------------------------------------------------------------------------------------------------
def measure_ort_latency(session, input_size: Sequence[int], batch_size: int = 1, warmup: int = 5,
                        runs: int = 20, device: torch.device | None = None) -> dict:
    """Wall-clock latency of ``session.run`` on a zero ``(batch_size, 3, H, W)`` float32 input.

    Same protocol as :func:`segprune.engine.profile.measure_latency`: ``warmup`` untimed runs,
    then ``runs`` runs each timed with ``time.perf_counter``. For a CUDA ``device`` (a session of
    :func:`ort_session` on it) input and output are bound on the device (I/O binding), so the time is
    the model's, without host-device copies; ORT's CUDA run returns once the device has finished.
    Not run on a GPU in this project.

    Returns:
        ``{"median_ms", "p10_ms", "p90_ms", "min_ms", "runs", "warmup", "batch_size",
        "input_size": [H, W], "threads"}``; milliseconds per run of the whole batch, ``threads`` the
        session's intra-op thread count.

    Raises:
        ValueError: ``runs < 1``, ``warmup < 0`` or ``batch_size < 1``.
    """
    if runs < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"need runs >= 1, warmup >= 0, batch_size >= 1; got {runs}, {warmup}, {batch_size}")
    h, w = int(input_size[0]), int(input_size[1])
    feed = {INPUT_NAME: np.zeros((batch_size, 3, h, w), dtype=np.float32)}
    run = lambda: session.run(None, feed)  # noqa: E731
    if device is not None and torch.device(device).type == "cuda":  # ORT's CUDA provider: not run on a GPU in this project
        import onnxruntime as ort
        idx = torch.device(device).index or 0
        binding = session.io_binding()
        binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(feed[INPUT_NAME], "cuda", idx))
        binding.bind_output(OUTPUT_NAME, "cuda", idx)
        run = lambda: session.run_with_iobinding(binding)  # noqa: E731
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1000.0)
    s = sorted(times)
    threads = session.get_session_options().intra_op_num_threads
    return {"median_ms": float(statistics.median(s)), "p10_ms": _percentile(s, 0.1), "p90_ms": _percentile(s, 0.9),
            "min_ms": s[0], "runs": runs, "warmup": warmup, "batch_size": batch_size, "input_size": [h, w],
            "threads": int(threads), "times_ms": times}


#: a baseline/pruned pair is timed in this many alternating rounds (see :func:`interleaved_latency`)
ROUNDS = 5


def interleaved_latency(measure: dict[str, Any], runs: int, warmup: int, rounds: int = ROUNDS) -> dict[str, dict]:
    """Time several models in alternating rounds so that each sees the same machine state.

    On a shared or throttling machine the speed drifts over seconds; timing model A's ``runs``
    then model B's compares two different machines. Here every model gets ``warmup`` untimed runs,
    then ``rounds`` rounds of ``ceil(runs / rounds)`` timed runs each, the model order reversed
    every other round (A B, B A, ...), and the times of all rounds are pooled.

    Args:
        measure: name -> ``fn(runs, warmup) -> dict`` with ``"times_ms"`` (a list of per-run ms),
            e.g. :func:`segprune.engine.profile.measure_latency` or :func:`measure_ort_latency`
            bound to one model.
    Returns:
        name -> the first round's dict with ``median_ms``, ``p10_ms``, ``p90_ms``, ``min_ms`` and
        ``runs`` recomputed over the pooled times (``runs`` = rounds x per-round runs >= ``runs``),
        ``warmup`` set to ``warmup`` and ``rounds`` added; ``times_ms`` is dropped.
    Raises:
        ValueError: ``runs < 1``, ``warmup < 0`` or ``rounds < 1``.
    """
    if runs < 1 or warmup < 0 or rounds < 1:
        raise ValueError(f"need runs >= 1, warmup >= 0, rounds >= 1; got {runs}, {warmup}, {rounds}")
    rounds = min(rounds, runs)
    per = -(-runs // rounds)
    names = list(measure)
    for name in names:
        if warmup:  # warmup - 1 untimed runs + 1 timed run that is thrown away
            measure[name](1, warmup - 1)
    pooled: dict[str, list[float]] = {n: [] for n in names}
    first: dict[str, dict] = {}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            res = measure[name](per, 0)
            pooled[name] += res.pop("times_ms")
            first.setdefault(name, res)
    out = {}
    for name in names:
        s = sorted(pooled[name])
        d = {k: v for k, v in first[name].items() if k not in ("latency_ms", "times_ms")}
        d.update(median_ms=float(statistics.median(s)), p10_ms=_percentile(s, 0.1), p90_ms=_percentile(s, 0.9),
                 min_ms=s[0], runs=len(s), warmup=warmup, rounds=rounds)
        out[name] = d
    return out


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (else ``platform.processor()``) and the logical CPU count."""
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    return f"{name} ({os.cpu_count()} logical CPUs)"


def _load_target(target: str | Path) -> tuple[str, dict, dict[str, nn.Module], dict[str, str]]:
    """(kind, cfg, {name: model}, {name: source}) of a run folder or a config YAML."""
    from .data import cls_num_classes, seg_num_classes
    from .models import build_model
    from .pipeline import load_run_model
    t = Path(target)
    if not t.exists():
        raise ConfigError(f"{t} does not exist (expected a run folder or a config YAML)")
    if t.is_dir():
        cfg, stages = find_run(t, pruned_stage_ok=True)  # latency depends on the widths, not on fine-tuning
        models, src = {}, {}
        for name in ("baseline", "pruned"):
            if name in stages:
                models[name], _ = load_run_model(stages[name])
                src[name] = str(stages[name])
        return "run", cfg, models, src
    if t.suffix.lower() in (".yaml", ".yml") or t.is_file():
        cfg = load_config(t)
        torch.manual_seed(int(cfg["seed"]))
        nc, cc = seg_num_classes(cfg["data"]["seg"]), cls_num_classes(cfg["data"]["cls"])
        try:
            model = build_model(dict(cfg["model"]), nc, cc, load_pretrained_weights=False)  # latency: weights do not matter
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"{t}: cannot build model: {exc}") from None
        return "config", cfg, {"unpruned": model}, {"unpruned": f"{t} (freshly built, random weights)"}
    raise ConfigError(f"{t}: neither a run folder nor a config YAML")


def benchmark(target: str | Path, batches: Sequence[int] = (1, 8), runs: int = 20, warmup: int = 5,
              threads: int | None = None, onnx: bool = True, opset: int = DEFAULT_OPSET,
              device: str | torch.device | None = "cpu", cuda_graph: bool = False) -> dict:
    """Eager and ONNX Runtime latency, params and FLOPs of a run's models or a config's model.

    ``target`` is a run folder (models ``baseline`` = stages/*_train_seg when finished, and
    ``pruned`` = stages/*_finetune_seg, or stages/*_prune while fine-tuning is unfinished: the same
    widths, so the same latency) or a config YAML (one freshly built, unpruned model
    ``unpruned``). For each batch size, PyTorch eager (:func:`~segprune.engine.profile.measure_latency`)
    and, with ``onnx``, ONNX Runtime (:func:`measure_ort_latency`, model exported to a temporary
    file by :func:`export_onnx`) are measured; per batch and backend the models are timed in
    alternating rounds (:func:`interleaved_latency`) so that a baseline/pruned pair sees the same
    machine state. Inputs are zeros.

    Args:
        batches: batch sizes (>= 1). runs: timed runs (>= 1). warmup: untimed runs (>= 0).
        threads: torch intra-op threads and ORT ``intra_op_num_threads``; ``None``: the config's
            ``eval.threads``, else ``threads``, else ``torch.get_num_threads()``.
        device: where to time (a spec of ``engine.device.resolve_device`` or a torch.device; ``None``:
            the config's ``device`` key). CPU: as above. CUDA (run on an H200, docs/results/gpu.md; ORT's CUDA provider was not): eager
            latency from CUDA events after the warm-up (``measure_latency``), ORT with its CUDA provider
            when installed (else ORT is left out, said in ``ort_note``); the ONNX files are exported on
            the CPU, then the models are moved to the device.
        cuda_graph: CUDA only: also time each model as one CUDA-graph replay per forward pass
            (``measure_latency(cuda_graph=True)``: no per-kernel launch cost), backend ``"graph"``.

    Returns:
        ``{"format", "source", "kind": "run"|"config", "input_size": [H, W], "batches", "runs",
        "warmup", "threads", "opset", "cpu", "torch_version", "onnxruntime_version", "flops_note",
        "models": {name: {"source", "params", "flops", "macs", "latency": {str(batch): {"eager":
        {"median_ms", "p10_ms", "p90_ms", "min_ms", "runs", "warmup", "threads", ...}, "ort": {...}}}}},
        "ratios": {str(batch): {"eager", "ort", "flops", "macs", "params"}}, "device": describe_device(...),
        "ort_note": why ORT was not timed, or None}`` (pruned / baseline of
        the medians; ``ratios`` only when both models exist, ``"ort"`` entries only with ``onnx``).
        FLOPs and MACs are per image (batch 1); FLOPs = 2 x MACs.

    Raises:
        ConfigError: not a run folder / unfinished run / invalid config / bad opset.
        CheckpointError, DataError: unreadable stage files or config data.
        ValueError: a batch, ``runs``, ``warmup`` or ``threads`` out of range; ``cuda_graph`` on a
            device that is not CUDA.
    """
    batches = [int(b) for b in batches]
    if not batches or min(batches) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batches}")
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if onnx:
        _check_opset(opset)
    dev = device if isinstance(device, torch.device) else resolve_device(device) if device is not None else None
    kind, cfg, models, src = _load_target(target)
    dev = dev or resolve_device(cfg.get("device", "auto"))
    if threads is None:
        threads = int(cfg["eval"].get("threads") or cfg.get("threads") or torch.get_num_threads())
    return benchmark_models(models, run_input_size(cfg), src, source=str(target), kind=kind, batches=batches,
                            runs=runs, warmup=warmup, threads=threads, onnx=onnx, opset=opset, device=dev,
                            cuda_graph=cuda_graph)


def benchmark_models(models: dict[str, nn.Module], size: Sequence[int], src: dict[str, str] | None = None,
                     source: str = "models", kind: str = "models", batches: Sequence[int] = (1, 8), runs: int = 20,
                     warmup: int = 5, threads: int | None = None, onnx: bool = True, opset: int = DEFAULT_OPSET,
                     device: str | torch.device | None = "cpu", cuda_graph: bool = False) -> dict:
    """:func:`benchmark` of networks given as modules (e.g. a library model and its pruned copy).

    Args:
        models: name -> network taking (N, 3, H, W) images; ``"baseline"`` and ``"pruned"`` give ratios.
        size: (H, W) input in pixels. src: name -> where the model came from (for the record).
        source, kind: recorded as :func:`benchmark`'s ``source`` / ``kind``.
        threads: ``None`` = ``torch.get_num_threads()``. Other arguments as :func:`benchmark`.

    Returns:
        :func:`benchmark`'s dict. The models are put in eval mode (and moved to ``device``).

    Raises:
        ValueError: a batch, ``runs``, ``warmup``, ``threads`` or ``size`` out of range, a bad opset, or
            ``cuda_graph`` on a device that is not CUDA.
    """
    from .engine.profile import count_flops, count_params, measure_latency
    batches = [int(b) for b in batches]
    if not batches or min(batches) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batches}")
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    size = tuple(int(v) for v in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"input size must be (H, W) of positive ints, got {size}")
    threads = int(threads) if threads is not None else torch.get_num_threads()
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if onnx:
        _check_opset(opset)
    dev = device if isinstance(device, torch.device) else resolve_device(device) if device is not None else resolve_device("cpu")
    if cuda_graph and dev.type != "cuda":
        raise ValueError(f"cuda_graph (--cuda-graph) needs a CUDA device, got {dev}")
    src = src or {name: type(m).__name__ for name, m in models.items()}
    ort_note = None
    if onnx and dev.type == "cuda" and not ort_cuda_available():
        onnx, ort_note = False, "ONNX Runtime not timed: its CUDAExecutionProvider is not installed (onnxruntime-gpu)"
    out: dict[str, Any] = {
        "format": "segprune-benchmark/1", "source": source, "kind": kind, "input_size": list(size),
        "batches": batches, "runs": runs, "warmup": warmup, "threads": threads, "input": "zeros",
        "opset": opset if onnx else None, "exporter": EXPORTER if onnx else None, "cpu": cpu_model(),
        "device": describe_device(dev), "ort_note": ort_note,
        "torch_version": torch.__version__, "onnxruntime_version": None, "flops_note":
        "FLOPs per image (batch 1) by torch.utils.flop_counter, conv/matmul only: one multiply-add = 2 FLOPs; "
        "MACs = FLOPs / 2",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "models": {},
    }
    for name, m in models.items():
        m.eval()
        fl = count_flops(m, size)
        out["models"][name] = {"source": src[name], "params": count_params(m), "flops": fl["flops"],
                               "macs": fl["macs"], "latency": {str(b): {} for b in batches}}
    with tempfile.TemporaryDirectory(prefix="segprune-bench-") as tmp:
        sessions = {}
        if onnx:
            import onnxruntime
            out["onnxruntime_version"] = onnxruntime.__version__
            for name, m in models.items():
                f = Path(tmp) / f"{name}.onnx"
                export_onnx(m, f, size, opset)  # traced on the CPU
                sessions[name] = ort_session(f, threads, dev)
        if dev.type != "cpu":
            for m in models.values():
                m.to(dev)
        for b in batches:  # models interleaved per backend: a pair sees the same machine state
            for backend, graph in (("eager", False), ("graph", True))[:2 if cuda_graph else 1]:
                lats = interleaved_latency({name: (lambda n, w, _m=m, _b=b, _g=graph: measure_latency(
                    _m, size, batch_size=_b, threads=threads, warmup=w, runs=n, cuda_graph=_g))
                    for name, m in models.items()}, runs, warmup)
                for name, lat in lats.items():
                    out["models"][name]["latency"][str(b)][backend] = lat
            if sessions:
                ort_lat = interleaved_latency({name: (lambda n, w, _s=sess, _b=b: measure_ort_latency(_s, size, _b, w, n, dev))
                                               for name, sess in sessions.items()}, runs, warmup)
                for name, lat in ort_lat.items():
                    out["models"][name]["latency"][str(b)]["ort"] = lat
    if "baseline" in models and "pruned" in models:
        bm, pm = out["models"]["baseline"], out["models"]["pruned"]
        out["ratios"] = {}
        for b in map(str, batches):
            r = {k: pm[k] / bm[k] for k in ("flops", "macs", "params")}
            for be in ("eager", "ort", "graph"):
                if be in bm["latency"][b]:
                    r[be] = pm["latency"][b][be]["median_ms"] / bm["latency"][b][be]["median_ms"]
            out["ratios"][b] = r
    return out


def _ms(d: dict | None) -> str:
    if not d:
        return "–"
    return f"{d['median_ms']:.2f} [{d['p10_ms']:.2f}–{d['p90_ms']:.2f}]"


def render_benchmark(res: dict) -> str:
    """A :func:`benchmark` result as Markdown: conditions, one row per model and batch, ratio rows."""
    h, w = res["input_size"]
    ort_v = res["onnxruntime_version"] or "not used (--no-onnx)"
    d = res.get("device") or {}  # results written before the key existed: the CPU
    graph = any("graph" in lat for m in res["models"].values() for lat in m["latency"].values())
    gpu = []
    if d.get("type") == "cuda":
        gpu.append(f"Device: cuda:{d.get('index')} ({d.get('name')}): eager latency from CUDA events after the warm-up"
                   + ("; CUDA graph: one replay of the captured forward pass per timed run" if graph else "")
                   + ("; ORT with its CUDAExecutionProvider, input and output bound on the device." if res["opset"] else "."))
    if res.get("ort_note"):
        gpu.append(res["ort_note"] + ".")
    lines = [
        f"Benchmark of `{res['source']}` ({res['kind']}): input {h}x{w} (zeros), batch sizes "
        f"{', '.join(map(str, res['batches']))}, {res['threads']} thread(s) (torch intra-op and ORT intra-op; "
        f"ORT inter-op 1, graph optimisations all), {res['warmup']} warm-up runs, median of {res['runs']} timed "
        f"runs [p10–p90] in ms per batch.",
        f"CPU: {res['cpu']}. torch {res['torch_version']}, onnxruntime {ort_v}"
        + (f", ONNX opset {res['opset']} (TorchScript exporter)." if res["opset"] else "."),
        *gpu,
        f"{res['flops_note']}.", "",
        "| model | batch | params (M) | GFLOPs | GMACs | eager ms | ORT ms |" + (" CUDA graph ms |" if graph else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if graph else ""),
    ]
    for b in map(str, res["batches"]):
        for name, m in res["models"].items():
            lat = m["latency"][b]
            lines.append(f"| {name} | {b} | {m['params'] / 1e6:.4g} | {m['flops'] / 1e9:.4g} | {m['macs'] / 1e9:.4g} | "
                         f"{_ms(lat.get('eager'))} | {_ms(lat.get('ort'))} |" + (f" {_ms(lat.get('graph'))} |" if graph else ""))
        r = res.get("ratios", {}).get(b)
        if r:
            f = lambda k: f"{r[k]:.3f}x" if k in r else "–"  # noqa: E731
            lines.append(f"| **pruned / baseline** | {b} | {f('params')} | {f('flops')} | {f('macs')} | "
                         f"{f('eager')} | {f('ort')} |" + (f" {f('graph')} |" if graph else ""))
    return "\n".join(lines) + "\n"


def write_benchmark(res: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``benchmark.json`` and ``benchmark.md`` into ``out_dir`` (created); returns both paths."""
    d = Path(out_dir)
    save_json(d / "benchmark.json", res)
    atomic_write_bytes(d / "benchmark.md", ("# Latency benchmark\n\n" + render_benchmark(res)).encode())
    return d / "benchmark.json", d / "benchmark.md"


def load_benchmark(path: str | Path) -> dict:
    """Read a ``benchmark.json`` written by :func:`write_benchmark`.

    Raises:
        CheckpointError: missing / invalid JSON / another format (names the file).
    """
    res = load_json(path)
    if not isinstance(res, dict) or res.get("format") != "segprune-benchmark/1":
        raise CheckpointError(f"{path}: not a segprune benchmark file")
    return res
