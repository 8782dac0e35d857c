"""Evaluation loops: segmentation (mIoU, pixel accuracy) and classification (top-1), and the test-time
protocol of the paper (multi-scale + flip testing, sliding-window inference).

Protocol (config ``eval:`` keys, see :func:`eval_protocol`):

* ``scales`` (default ``[1.0]``): the network input (the image as the eval transform delivers it,
  ``(N, 3, H, W)``) is resized bilinearly to ``(int(H*s + 0.5), int(W*s + 0.5))`` for every scale ``s``.
* ``flip`` (default ``false``): every scale is also run on the horizontally flipped input; its
  logits are flipped back.
* ``mode`` (default ``whole``): ``whole`` runs the network on the full (scaled) image; ``slide``
  runs it on ``crop_size`` windows placed every ``stride`` pixels (the last window of a row/column
  is moved back to end at the border, mmsegmentation's ``slide_inference``); the logits of
  overlapping windows are **averaged** (sum of window logits / number of windows covering the pixel).

Each (scale, flip) pair is a *view*. A view's logits are upsampled bilinearly
(``align_corners=False``) to the label resolution and turned into softmax probabilities; the
**probabilities** of all views are averaged (as mmsegmentation's ``aug_test`` and the PSPNet
authors' ``semseg`` code do). Probabilities rather than logits because every view then has the
same weight, one vote per pixel bounded by 1: a view whose logits are large (e.g. an over-confident
wrong scale) cannot outvote the others, which it can when logits are averaged. With one view
only (the default), nothing is averaged and the raw logits are used, so the default protocol is
bit-identical to plain ``model(x)`` evaluation.

Several processes (``engine.distributed``): evaluation runs *sharded*. A loader made by
``make_loader(..., shard=True)`` holds this rank's contiguous slice of the split; the confusion
matrix (segmentation) or the correct/seen counts (classification) are summed over ranks before the
metrics are computed (integers: exact), so every rank returns the metrics of the whole split.
Images and labels are moved to the model's device (nothing is moved for a CPU model); the confusion
matrix is accumulated there and read on the host once, at the end (``metrics.SegmentationMetric``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from . import distributed as ddp
from .metrics import ClassificationMetric, SegmentationMetric

__all__ = ["evaluate_segmentation", "evaluate_classification", "predict_logits", "slide_logits",
           "eval_protocol", "check_protocol", "PROTOCOL_DEFAULTS"]

#: The test-time protocol of the config's ``eval:`` section and its defaults (single scale, no flip,
#: whole image: plain ``model(x)``).
PROTOCOL_DEFAULTS: dict = {"scales": [1.0], "flip": False, "mode": "whole", "crop_size": None, "stride": None}


def _pair(value, name: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value)
        ok = h > 0 and w > 0 and all(float(v) == int(v) for v in value)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be [h, w] with positive integers (pixels), got {value!r}")
    return h, w


def check_protocol(scales: Sequence[float] = (1.0,), flip: bool = False, mode: str = "whole",
                   crop_size: Sequence[int] | None = None, stride: Sequence[int] | None = None
                   ) -> tuple[tuple[float, ...], bool, str, tuple[int, int] | None, tuple[int, int] | None]:
    """Validate and normalise a test-time protocol.

    Args:
        scales: non-empty sequence of positive resize factors of the network input.
        flip: also run each scale on the horizontally flipped input.
        mode: ``"whole"`` or ``"slide"``.
        crop_size: ``(h, w)`` window in pixels of the *scaled* input; required for ``"slide"``.
        stride: ``(h, w)`` window step in pixels, each ``<= crop_size`` (no pixel left uncovered);
            ``None`` = ``crop_size`` (windows touch, the last one overlaps at the border).

    Returns:
        ``(scales, flip, mode, crop_size, stride)`` as tuples of floats / ints (``crop_size`` and
        ``stride`` are ``None`` in ``"whole"`` mode).

    Raises:
        ValueError: empty or non-positive scales, a non-bool flip, unknown mode, missing or
            malformed crop size, stride larger than the crop; the message names the value.
    """
    try:
        sc = tuple(float(s) for s in scales)
    except (TypeError, ValueError):
        raise ValueError(f"scales must be a list of positive numbers, got {scales!r}") from None
    if not sc or any(not (s > 0) or s == float("inf") for s in sc):
        raise ValueError(f"scales must be a non-empty list of positive finite numbers, got {scales!r}")
    if not isinstance(flip, bool):
        raise ValueError(f"flip must be true or false, got {flip!r}")
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "whole":
        return sc, flip, mode, None, None
    if crop_size is None:
        raise ValueError("mode 'slide' needs crop_size [h, w] (pixels), got None")
    crop = _pair(crop_size, "crop_size")
    step = crop if stride is None else _pair(stride, "stride")
    if step[0] > crop[0] or step[1] > crop[1]:
        raise ValueError(f"stride {list(step)} must not exceed crop_size {list(crop)} (pixels would be left uncovered)")
    return sc, flip, mode, crop, step


def eval_protocol(ev: Mapping | None) -> dict:
    """The keyword arguments of :func:`predict_logits` / :func:`evaluate_segmentation` from a config's
    ``eval:`` section; keys it lacks (configs written before they existed) take
    :data:`PROTOCOL_DEFAULTS`."""
    ev = ev or {}
    return {k: (ev.get(k) if ev.get(k) is not None else d) for k, d in PROTOCOL_DEFAULTS.items()}


def _is_default(scales, flip, mode) -> bool:
    return len(scales) == 1 and scales[0] == 1.0 and not flip and mode == "whole"


def slide_logits(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                 crop_size: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """Sliding-window logits, overlapping windows averaged.

    Windows of ``crop_size`` start every ``stride`` pixels; ``max(H - h_crop + h_stride - 1, 0) //
    h_stride + 1`` rows of them (same for columns), the last row/column shifted back so that it ends
    at the border; a window larger than the image is the image. A window's logits are upsampled
    bilinearly to the window size if the model returns them smaller.

    Args:
        model: ``(N, 3, h, w) -> (N, K, h', w')`` logits.
        images: ``(N, 3, H, W)`` float input.
        crop_size: ``(h, w)`` window size in pixels.
        stride: ``(h, w)`` step in pixels, ``<= crop_size``.

    Returns:
        ``(N, K, H, W)`` logits: at every pixel the mean of the logits of the windows covering it.
        With a single window equal to the image this is exactly ``model(images)``.

    Raises:
        ValueError: ``images`` is not 4-D, or bad ``crop_size`` / ``stride``.
    """
    if images.dim() != 4:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
    crop, step = check_protocol(mode="slide", crop_size=crop_size, stride=stride)[3:]
    n, _, h, w = images.shape
    (ch, cw), (sh, sw) = crop, step
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    out: torch.Tensor | None = None
    count = torch.zeros((1, 1, h, w), dtype=images.dtype, device=images.device)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            logits = model(images[:, :, y1:y2, x1:x2])
            if tuple(logits.shape[-2:]) != (y2 - y1, x2 - x1):
                logits = F.interpolate(logits, size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)
            if out is None:
                out = logits.new_zeros((n, logits.shape[1], h, w))
            out[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
    if out is None or not bool((count > 0).all()):  # cannot happen with stride <= crop_size
        raise RuntimeError(f"sliding windows left pixels uncovered (crop {crop}, stride {step}, image {h}x{w})")
    return out / count


def predict_logits(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                   scales: Sequence[float] = (1.0,), flip: bool = False, mode: str = "whole",
                   crop_size: Sequence[int] | None = None, stride: Sequence[int] | None = None,
                   out_size: Sequence[int] | None = None) -> torch.Tensor:
    """Test-time prediction under the paper's protocol (see the module docstring).

    Args:
        model: ``(N, 3, h, w) -> (N, K, h', w')`` logits (a segmentation network in eval mode;
            the caller sets the mode and ``torch.no_grad``).
        images: ``(N, 3, H, W)`` normalised float input (the eval transform's output).
        scales: resize factors of the input (see :func:`check_protocol`).
        flip: add the horizontally flipped input of every scale.
        mode: ``"whole"`` or ``"slide"`` (sliding window, :func:`slide_logits`).
        crop_size, stride: ``(h, w)`` in pixels of the scaled input, for ``"slide"``.
        out_size: ``(H_out, W_out)`` of the result, normally the label resolution; ``None`` = the
            input's ``(H, W)`` when several views are averaged, the model's output size otherwise.

    Returns:
        ``(N, K, H_out, W_out)`` float scores whose argmax over ``K`` is the prediction. With one
        view (one scale, no flip): that view's logits (in ``"whole"`` mode at scale 1 with
        ``out_size=None``, exactly ``model(images)``). With several views: ``log`` of the mean of
        the views' softmax probabilities (clamped to the smallest positive float before the
        log), so that ``softmax`` of the result is the averaged probability map.

    Raises:
        ValueError: invalid protocol (:func:`check_protocol`) or ``images`` not ``(N, C, H, W)``.
    """
    scales, flip, mode, crop, step = check_protocol(scales, flip, mode, crop_size, stride)
    if images.dim() != 4:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    views = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    size = tuple(int(v) for v in out_size) if out_size is not None else None
    prob_sum: torch.Tensor | None = None
    for s, f in views:
        x = images
        if s != 1.0:
            x = F.interpolate(x, size=(max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))),
                              mode="bilinear", align_corners=False)
        if f:
            x = x.flip(-1)
        logits = model(x) if mode == "whole" else slide_logits(model, x, crop, step)
        if f:
            logits = logits.flip(-1)
        target = size if size is not None else ((h, w) if len(views) > 1 else None)
        if target is not None and tuple(logits.shape[-2:]) != target:
            logits = F.interpolate(logits.float(), size=target, mode="bilinear", align_corners=False)
        if len(views) == 1:
            return logits
        p = logits.float().softmax(dim=1)
        prob_sum = p if prob_sum is None else prob_sum + p
    prob = prob_sum / len(views)
    return prob.clamp_min(torch.finfo(prob.dtype).tiny).log()


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader: DataLoader, num_classes: int, ignore_index: int = 255,
                          class_names: list[str] | None = None, scales: Sequence[float] = (1.0,),
                          flip: bool = False, mode: str = "whole", crop_size: Sequence[int] | None = None,
                          stride: Sequence[int] | None = None, protocol: Mapping | None = None) -> dict:
    """mIoU etc. over the whole split (see :class:`SegmentationMetric`).

    Args:
        model: segmentation network, ``(N, 3, h, w) -> (N, K, h', w')`` logits, ``K = num_classes``.
        loader: yields ``(float (N, 3, h, w), int64 (N, H, W))`` batches; ``(H, W)`` is the label
            resolution the metrics are computed at.
        num_classes, ignore_index, class_names: see :class:`SegmentationMetric`.
        scales, flip, mode, crop_size, stride: test-time protocol (:func:`predict_logits`); the
            defaults (one scale 1.0, no flip, whole image) evaluate ``model(x)`` exactly as before
            these options existed: its logits are bilinearly upsampled to the label resolution
            before the argmax.
        protocol: a config's ``eval:`` section; when given, its ``scales``, ``flip``, ``mode``,
            ``crop_size``, ``stride`` (:func:`eval_protocol`, missing keys = defaults) replace the
            five arguments above.

    Returns:
        :meth:`SegmentationMetric.compute`'s dict (``miou``, ``per_class_iou``, ``pixel_acc``, ...).

    Raises:
        ValueError: invalid protocol, or label/logit shape problems (:meth:`SegmentationMetric.update`).

    Restores the model's train/eval mode.
    """
    if protocol is not None:
        p = eval_protocol(protocol)
        scales, flip, mode, crop_size, stride = (p[k] for k in ("scales", "flip", "mode", "crop_size", "stride"))
    proto = check_protocol(scales, flip, mode, crop_size, stride)
    default = _is_default(*proto[:3])
    was = model.training
    model.eval()
    metric = SegmentationMetric(num_classes, ignore_index, list(class_names) if class_names else None)
    like = next(model.parameters(), None)
    try:
        for x, y in loader:
            x, y = ddp.to_device(x, y, like=like) if like is not None else (x, y)
            if default:
                metric.update(model(x), y)
            else:
                metric.update(predict_logits(model, x, *proto, out_size=tuple(y.shape[-2:])), y)
    finally:
        model.train(was)
    if ddp.is_sharded(loader):  # this rank saw its slice of the split: sum the confusion matrices
        metric.confusion = ddp.sum_over_ranks(metric.confusion)
    return metric.compute()


@torch.no_grad()
def evaluate_classification(forward: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader) -> dict:
    """Top-1 accuracy of ``forward`` ((N,3,h,w) -> (N,K) logits) over ``loader``; eval mode of its module."""
    owner = getattr(forward, "__self__", forward)
    was = getattr(owner, "training", False)
    if isinstance(owner, nn.Module):
        owner.eval()
    metric = ClassificationMetric()
    like = next(owner.parameters(), None) if isinstance(owner, nn.Module) else None
    try:
        for x, y in loader:
            (x,) = ddp.to_device(x, like=like) if like is not None else (x,)
            metric.update(forward(x), y)
    finally:
        if isinstance(owner, nn.Module):
            owner.train(was)
    if ddp.is_sharded(loader):  # this rank saw its slice of the split: sum the counts
        metric.correct, metric.count = (int(v) for v in ddp.sum_over_ranks(
            torch.tensor([metric.correct, metric.count], device="cpu")))
    return metric.compute()
