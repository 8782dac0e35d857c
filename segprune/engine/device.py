"""The compute device of a run: the top-level config key ``device`` and the command lines' ``--device``.

Accepted values (:func:`device_problem` checks the spelling, :func:`resolve_device` the machine):

* ``auto`` (default): the first CUDA device when CUDA is available, else the CPU;
* ``cpu``;
* ``cuda``: the current CUDA device (``cuda:LOCAL_RANK`` for one process of a ``torchrun`` launch);
* ``cuda:N``: CUDA device N (0-based index among the visible devices).

The key says *where* a run computes, not *what*: it is not part of the stage fingerprints
(``pipeline.stage_fingerprints``), so finished stages are shared and resumed across devices. Results
computed on different devices agree to floating-point rounding only (see ``segprune evaluate``).

The CUDA code paths of this project have not been run on a GPU (there was none); the CPU paths are
tested (tests/test_device.py).
"""
from __future__ import annotations

import contextlib
import os
import platform
import re

import torch

from ..config import ConfigError

__all__ = ["DEVICE_CHOICES", "device_problem", "resolve_device", "describe_device", "model_device", "strict_fp32"]

#: the accepted spellings, for messages and ``--device`` help
DEVICE_CHOICES = "auto | cpu | cuda | cuda:N"

_SPEC = re.compile(r"^(auto|cpu|cuda|cuda:(0|[1-9][0-9]*))$")


def device_problem(spec) -> str | None:
    """Why ``spec`` is not a valid device value (``None`` when it is). Does not look at the machine."""
    if isinstance(spec, str) and _SPEC.match(spec):
        return None
    return f"must be one of {DEVICE_CHOICES} (N: a CUDA device index >= 0)"


def resolve_device(spec: str | None = "auto", local_rank: int | None = None) -> torch.device:
    """The :class:`torch.device` that ``spec`` names on this machine.

    Args:
        spec: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; ``None`` means ``"auto"``.
        local_rank: this process's ``LOCAL_RANK`` under ``torchrun`` (``None`` in a single process);
            ``auto`` and ``cuda`` then mean ``cuda:local_rank``. ``cuda:N`` is taken as given.

    Returns:
        ``torch.device("cpu")`` or ``torch.device("cuda", index)`` (always with an index).

    Raises:
        ConfigError: a malformed ``spec`` (message ``device=...: must be one of ...``), CUDA requested on
            a machine without it (``device='cuda' requested but CUDA is not available on this machine``),
            or a device index beyond the visible devices. Call it before writing anything.
    """
    spec = "auto" if spec is None else spec
    bad = device_problem(spec)
    if bad:
        raise ConfigError(f"device={spec!r}: {bad}")
    if spec == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if spec == "auto" and not available:
        return torch.device("cpu")
    if not available:
        raise ConfigError(f"device={spec!r} requested but CUDA is not available on this machine "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
                          f"use device=cpu or device=auto")
    count = torch.cuda.device_count()
    if spec in ("auto", "cuda"):
        index = int(local_rank) if local_rank is not None else (torch.cuda.current_device() if count else 0)
    else:
        index = int(spec.split(":", 1)[1])
    if index >= count:
        raise ConfigError(f"device={spec!r}" + (f" (LOCAL_RANK {local_rank})" if local_rank is not None and
                                                 spec in ("auto", "cuda") else "")
                          + f": only {count} CUDA devices are visible (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return torch.device("cuda", index)


def describe_device(device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """What a measurement ran on, for metrics.json (key ``eval_device``) and reports.

    Returns:
        ``{"type": "cpu" | "cuda", "name": CPU model or GPU name, "dtype": "float32", "index": int | None}``.
        Two evaluations are bitwise comparable only on the same type, name and dtype.
    """
    device = torch.device(device)
    if device.type == "cuda":  # run on an H200 (docs/results/gpu.md)
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
    else:
        index, name = None, _cpu_name()
    return {"type": device.type, "name": name, "dtype": str(dtype).replace("torch.", ""), "index": index}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of ``model``'s first parameter or buffer (CPU for a model without any)."""
    t = next(iter(list(model.parameters()) + list(model.buffers())), None)
    return t.device if t is not None else torch.device("cpu")


@contextlib.contextmanager
def strict_fp32(device: torch.device | None = None):
    """Inside: float32 convolutions and matmuls in full IEEE precision on a CUDA ``device`` (cuDNN uses
    TF32 for convolutions by default on Ampere and later, ~1e-3 relative error); restored on exit.

    No effect on the CPU. Uses the ``fp32_precision`` settings (torch >= 2.9) for cuDNN conv, cuDNN RNN
    and CUDA matmul together, never the legacy ``allow_tf32`` flags (torch refuses a mix of both).
    Not run on a GPU in this project.
    """
    if device is None or torch.device(device).type != "cuda":
        yield
        return
    knobs = [getattr(getattr(torch.backends, mod, None), sub, None)
             for mod, sub in (("cudnn", "conv"), ("cudnn", "rnn"), ("cuda", "matmul"))]
    knobs = [k for k in knobs if k is not None and hasattr(k, "fp32_precision")]
    old = [k.fp32_precision for k in knobs]
    try:
        for k in knobs:
            k.fp32_precision = "ieee"
        yield
    finally:
        for k, v in zip(knobs, old):
            k.fp32_precision = v
