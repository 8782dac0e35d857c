"""Model cost: parameter count, FLOPs/MACs and latency.

FLOPs follow the ``torch.utils.flop_counter`` convention: one multiply-add
counts as 2 FLOPs, so ``MACs = FLOPs / 2``. Only the operators that
``FlopCounterMode`` knows (convolutions, matmuls, attention, ...) are counted;
element-wise ops, normalisation and pooling are not.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_flops", "measure_latency", "profile_model"]

FLOPS_NOTE = (
    "FLOPs count one multiply-add as 2 FLOPs (torch.utils.flop_counter convention); "
    "MACs = FLOPs / 2"
)


def count_params(model: nn.Module) -> int:
    """Number of parameter elements of the deployed network, trainable or not.

    Parameters shared between modules (the same ``nn.Parameter`` registered
    twice) are counted once. Buffers (e.g. BN running stats) are not counted,
    nor are training-only submodules the model lists in ``aux_modules``
    (PSPNet's and BiSeNet's auxiliary heads, which inference never runs).
    """
    skip = {id(p) for name in getattr(model, "aux_modules", ()) for p in model.get_submodule(name).parameters()}
    seen: set[int] = set(skip)
    total = 0
    for p in model.parameters():  # already de-duplicates by identity
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own flag after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _input_like(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    device = torch.device("cpu")
    dtype = torch.float32
    for t in list(model.parameters()) + list(model.buffers()):
        device = t.device
        if t.dtype.is_floating_point:
            dtype = t.dtype
            break
    return torch.zeros(shape, device=device, dtype=dtype)


def _check_size(input_size: tuple[int, int]) -> tuple[int, int]:
    if len(input_size) != 2:
        raise ValueError(f"input_size must be (H, W), got {input_size!r}")
    h, w = int(input_size[0]), int(input_size[1])
    if h < 1 or w < 1:
        raise ValueError(f"input_size must be positive, got {input_size!r}")
    return h, w


def count_flops(
    model: nn.Module,
    input_size: tuple[int, int],
    in_channels: int = 3,
    forward_fn: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> dict[str, Any]:
    """FLOPs of one forward pass on a ``(1, in_channels, H, W)`` zero input.

    The model is run in eval mode under ``torch.no_grad()`` inside
    ``torch.utils.flop_counter.FlopCounterMode``; each submodule's
    ``training`` flag is restored afterwards. The input is created on the
    device and with the floating dtype of the model's first parameter.

    Args:
        model: the network.
        input_size: ``(H, W)`` in pixels.
        in_channels: input channels (default 3).
        forward_fn: optional ``forward_fn(model, x)``; default ``model(x)``.

    Returns:
        ``{"flops": int, "macs": int, "input_size": [H, W], "note": str}``.

    Raises:
        ValueError: ``input_size`` is not two positive ints.
    """
    h, w = _check_size(input_size)
    x = _input_like(model, (1, in_channels, h, w))
    counter = FlopCounterMode(display=False)
    with _eval_mode(model), torch.no_grad(), counter:
        if forward_fn is None:
            model(x)
        else:
            forward_fn(model, x)
    flops = int(counter.get_total_flops())
    return {"flops": flops, "macs": flops // 2, "input_size": [h, w], "note": FLOPS_NOTE}


def _percentile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of sorted values."""
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = (len(sorted_vals) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    frac = pos - lo
    return sorted_vals[lo] * (1 - frac) + sorted_vals[hi] * frac


def measure_latency(
    model: nn.Module,
    input_size: tuple[int, int],
    batch_size: int = 1,
    threads: int | None = None,
    warmup: int = 5,
    runs: int = 20,
    in_channels: int = 3,
    cuda_graph: bool = False,
) -> dict[str, Any]:
    """Wall-clock forward latency on a ``(batch_size, in_channels, H, W)`` zero input.

    Runs in eval mode under ``torch.inference_mode()``. If ``threads`` is given,
    ``torch.set_num_threads(threads)`` is applied for the measurement and the
    previous value restored afterwards (also on error). Each timed run is
    measured with ``time.perf_counter``; on a GPU instead with a pair of CUDA
    events around the forward pass, read after the device has finished it
    (the warm-up runs are synchronised first). With ``cuda_graph`` (CUDA only) the
    forward pass is captured once after the warm-up (which runs on a side stream, as
    ``torch.cuda.graph`` requires) into a ``torch.cuda.CUDAGraph`` and each timed run
    is one replay: the latency without the per-kernel launch cost of eager PyTorch,
    which dominates small batches on a fast GPU (docs/results/gpu.md).
    Each submodule's ``training`` flag is restored afterwards.

    Returns:
        ``{"latency_ms": median, "p10_ms", "p90_ms", "min_ms", "runs", "warmup",
        "threads", "batch_size", "input_size": [H, W], "device", "times_ms"}``; times in
        milliseconds per forward pass of the whole batch, ``threads`` is the
        intra-op thread count in effect during the measurement, ``device`` the
        device type of the input (``"cpu"`` for CPU models).

    Raises:
        ValueError: ``runs < 1``, ``warmup < 0``, ``batch_size < 1``,
            ``threads < 1``, an invalid ``input_size``, or ``cuda_graph`` for a model
            that is not on a CUDA device.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    h, w = _check_size(input_size)
    x = _input_like(model, (batch_size, in_channels, h, w))
    cuda = x.device.type == "cuda"
    if cuda_graph and not cuda:
        raise ValueError(f"cuda_graph=True needs a model on a CUDA device (this one is on {x.device})")
    sync = (lambda: torch.cuda.synchronize(x.device)) if cuda else (lambda: None)

    prev_threads = torch.get_num_threads()
    times: list[float] = []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        used_threads = torch.get_num_threads()
        with _eval_mode(model), torch.inference_mode():
            fwd = lambda: model(x)  # noqa: E731
            if cuda_graph:
                side = torch.cuda.Stream(x.device)
                side.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(side):
                    for _ in range(max(warmup, 1)):  # at least one run before the capture (cuDNN's choices)
                        model(x)
                torch.cuda.current_stream(x.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    model(x)
                fwd = graph.replay
            else:
                for _ in range(warmup):
                    model(x)
            sync()
            for _ in range(runs):
                if cuda:  # device time of the forward pass (or of one graph replay)
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fwd()
                    end.record()
                    end.synchronize()
                    times.append(float(start.elapsed_time(end)))
                    continue
                t0 = time.perf_counter()
                fwd()
                sync()
                times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        if torch.get_num_threads() != prev_threads:
            torch.set_num_threads(prev_threads)

    s = sorted(times)
    return {
        "latency_ms": float(statistics.median(s)),
        "p10_ms": _percentile(s, 0.10),
        "p90_ms": _percentile(s, 0.90),
        "min_ms": s[0],
        "runs": runs,
        "warmup": warmup,
        "threads": used_threads,
        "batch_size": batch_size,
        "input_size": [h, w],
        "device": x.device.type,
        **({"cuda_graph": True} if cuda_graph else {}),
        "times_ms": times,
    }


def profile_model(
    model: nn.Module,
    input_size: tuple[int, int],
    threads: int | None = None,
    runs: int = 20,
    warmup: int = 5,
    in_channels: int = 3,
) -> dict[str, Any]:
    """Params, FLOPs/MACs (batch 1) and batch-1 latency in one dict.

    Returns:
        ``{"params": int, "flops": int, "macs": int, "latency_ms": float,
        "latency": <dict from measure_latency>}``.
    """
    flops = count_flops(model, input_size, in_channels=in_channels)
    lat = measure_latency(
        model, input_size, batch_size=1, threads=threads, warmup=warmup, runs=runs,
        in_channels=in_channels,
    )
    lat.pop("times_ms")  # the summary is enough in metrics.json
    return {
        "params": count_params(model),
        "flops": flops["flops"],
        "macs": flops["macs"],
        "latency_ms": lat["latency_ms"],
        "latency": lat,
    }
