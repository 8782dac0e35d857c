"""Evaluation metrics, following the protocol mmsegmentation uses.

Segmentation metrics are accumulated as a single ``(C, C)`` confusion matrix
over the whole split (not averaged per image):

* ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``; a class whose union is 0 (absent in
  both ground truth and prediction over the whole split) has IoU NaN and is
  left out of the mean (``nanmean``).
* ``pixel_acc = sum_c TP_c / #labelled pixels``.
* ``mean_acc = nanmean_c TP_c / #gt pixels of c`` (NaN for classes absent from
  the ground truth).

Pixels whose target equals ``ignore_index`` are excluded everywhere.

The confusion matrix is accumulated where the logits are (integer counts: the same result on every
device) and read on the host once, by :meth:`SegmentationMetric.compute` (or ``.confusion``). On the
CPU every batch's labels are checked at once; on another device the check is deferred to that read,
so that no batch waits for the host (see :class:`SegmentationMetric`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "confusion_matrix",
    "SegmentationMetric",
    "top1_accuracy",
    "ClassificationMetric",
]


def _check_integer(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{what} must be an integer tensor, got dtype {t.dtype}")


def _format_values(values: torch.Tensor, limit: int = 10) -> str:
    vals = torch.unique(values).tolist()
    shown = ", ".join(str(v) for v in vals[:limit])
    if len(vals) > limit:
        shown += f", ... ({len(vals) - limit} more)"
    return "[" + shown + "]"


def confusion_matrix(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Confusion matrix of a batch of label maps.

    Args:
        pred: predicted class indices, integer tensor of shape ``(N, H, W)`` or
            ``(H, W)`` (any shape works as long as it equals ``target``'s).
        target: ground-truth class indices, integer tensor of the same shape.
            Pixels equal to ``ignore_index`` are excluded.
        num_classes: number of classes ``C`` (> 0).
        ignore_index: label value to exclude (default 255).

    Returns:
        ``torch.int64`` tensor of shape ``(C, C)`` on ``pred``'s device (``target`` is
        moved there); rows index the ground-truth class, columns the predicted class,
        entries are pixel counts. The range checks read two flags on the host.

    Raises:
        TypeError: ``pred``/``target`` are not integer tensors.
        ValueError: shapes differ; ``num_classes`` < 1; a target value outside
            ``[0, C)`` that is not ``ignore_index`` (the message lists the
            offending values); a prediction value outside ``[0, C)``.
    """
    _check_integer(pred, "pred")
    _check_integer(target, "target")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target shapes differ: pred {tuple(pred.shape)} vs target {tuple(target.shape)}"
        )
    pred = pred.detach().reshape(-1).to(dtype=torch.int64)
    target = target.detach().reshape(-1).to(device=pred.device, dtype=torch.int64)

    bad_pred = (pred < 0) | (pred >= num_classes)
    if bool(bad_pred.any()):
        raise ValueError(
            f"prediction values outside [0, {num_classes}): {_format_values(pred[bad_pred])}"
        )
    valid = target != ignore_index
    bad_target = valid & ((target < 0) | (target >= num_classes))
    if bool(bad_target.any()):
        raise ValueError(
            f"target values outside [0, {num_classes}) that are not ignore_index={ignore_index}: "
            f"{_format_values(target[bad_target])}"
        )
    idx = target[valid] * num_classes + pred[valid]
    cm = torch.bincount(idx, minlength=num_classes * num_classes)
    return cm.reshape(num_classes, num_classes)


def _pair_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Pixel counts of (target, pred) pairs plus two error bins, without a host sync.

    Returns:
        int64 ``(C*C + 2,)`` on ``pred``'s device: entry ``t*C + p`` counts labelled pixels of class
        ``t`` predicted ``p``; entry ``C*C`` labelled pixels whose target lies outside ``[0, C)``
        (and is not ``ignore_index``); entry ``C*C + 1`` labelled pixels with an in-range target
        whose prediction lies outside ``[0, C)``. Accumulated with ``scatter_add_`` (integer adds:
        exact and order-independent on every device), so nothing waits for the host.
    """
    c = int(num_classes)
    pred = pred.detach().reshape(-1).to(dtype=torch.int64)
    target = target.detach().reshape(-1).to(device=pred.device, dtype=torch.int64)
    t_ok = (target >= 0) & (target < c)
    p_ok = (pred >= 0) & (pred < c)
    idx = torch.where(t_ok, torch.where(p_ok, target * c + pred, c * c + 1), c * c)
    idx = torch.where(target != ignore_index, idx, c * c + 2)  # ignored pixels: a bin that is dropped
    counts = torch.zeros(c * c + 3, dtype=torch.int64, device=pred.device)
    counts.scatter_add_(0, idx, torch.ones((), dtype=torch.int64, device=pred.device).expand(idx.shape))
    return counts[: c * c + 2]


def _nanmean(values: torch.Tensor) -> float:
    mask = ~torch.isnan(values)
    if not bool(mask.any()):
        return float("nan")
    return float(values[mask].mean())


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


class SegmentationMetric:
    """Accumulates a confusion matrix over a split and reports mIoU etc.

    The matrix lives on the device of the predictions it is given (moved there at the first
    :meth:`update`); :meth:`compute` reads it on the host once.

    Args:
        num_classes: number of classes ``C``.
        ignore_index: target label excluded from all statistics (default 255).
        class_names: optional names (length ``C``) used as keys of
            ``per_class_iou``; defaults to the class indices as strings.
        eager_checks: check every batch's label ranges in :meth:`update` (raising there, with the
            offending values: :func:`confusion_matrix`), or count out-of-range pixels on the device and
            raise when the matrix is read (``compute``, ``.confusion``), with their number only.
            ``None`` (default): eager on the CPU, where the check costs nothing; deferred on other
            devices, where it would make every batch wait for the host.

    Raises:
        ValueError: ``num_classes`` < 1 or ``class_names`` has the wrong length.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_names: list[str] | None = None,
        eager_checks: bool | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} entries but num_classes={num_classes}"
            )
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.class_names = list(class_names) if class_names is not None else None
        self.eager_checks = eager_checks
        self._confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device="cpu")
        self._pending: torch.Tensor | None = None  # deferred-check counts (C*C + 2,), see _pair_counts

    @property
    def confusion(self) -> torch.Tensor:
        """The ``(C, C)`` int64 matrix (rows: ground truth, columns: prediction) on the device it was
        accumulated on.

        Raises:
            ValueError: deferred checks found labelled pixels with an out-of-range target or prediction.
        """
        if self._pending is not None:
            c = self.num_classes
            pending, self._pending = self._pending, None
            bad_t, bad_p = (int(v) for v in pending[c * c:].tolist())  # the one host read
            if bad_t:
                raise ValueError(f"target values outside [0, {c}) that are not ignore_index={self.ignore_index}: "
                                 f"{bad_t} pixel(s) (checked on the device; the values are not kept)")
            if bad_p:
                raise ValueError(f"prediction values outside [0, {c}): {bad_p} pixel(s) (checked on the device)")
            self._confusion = self._confusion.to(pending.device) + pending[: c * c].reshape(c, c)
        return self._confusion

    @confusion.setter
    def confusion(self, value: torch.Tensor) -> None:
        self._pending = None
        self._confusion = value

    def reset(self) -> None:
        """Clear the accumulated confusion matrix."""
        self._pending = None
        self._confusion = torch.zeros_like(self._confusion)

    @torch.no_grad()
    def update(self, logits_or_pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch.

        Args:
            logits_or_pred: either float logits of shape ``(N, C, h, w)`` --
                if ``(h, w)`` differs from the target size they are bilinearly
                upsampled (``align_corners=False``) to ``(H, W)`` before the
                argmax over ``C`` -- or integer predictions of shape ``(N, H, W)``.
            target: integer ground truth of shape ``(N, H, W)``, on any device (moved to
                the predictions').

        Raises:
            ValueError: wrong ranks, channel count != ``num_classes``, batch or
                spatial size mismatch, or (eager checks) out-of-range labels (see
                :func:`confusion_matrix`).
            TypeError: non-tensor inputs or a float ``target``.
        """
        if not isinstance(logits_or_pred, torch.Tensor):
            raise TypeError(
                f"logits_or_pred must be a torch.Tensor, got {type(logits_or_pred).__name__}"
            )
        _check_integer(target, "target")
        if target.dim() != 3:
            raise ValueError(f"target must have shape (N, H, W), got {tuple(target.shape)}")
        if logits_or_pred.dtype.is_floating_point:
            logits = logits_or_pred
            if logits.dim() != 4:
                raise ValueError(
                    f"logits must have shape (N, C, h, w), got {tuple(logits.shape)}"
                )
            if logits.shape[1] != self.num_classes:
                raise ValueError(
                    f"logits have {logits.shape[1]} channels but num_classes={self.num_classes}"
                )
            if logits.shape[0] != target.shape[0]:
                raise ValueError(
                    f"batch size mismatch: logits {logits.shape[0]} vs target {target.shape[0]}"
                )
            size = tuple(target.shape[-2:])
            if tuple(logits.shape[-2:]) != size:
                logits = F.interpolate(
                    logits.float(), size=size, mode="bilinear", align_corners=False
                )
            pred = logits.argmax(dim=1)
        else:
            pred = logits_or_pred
            if pred.dim() != 3:
                raise ValueError(
                    f"predictions must have shape (N, H, W), got {tuple(pred.shape)}"
                )
        eager = self.eager_checks if self.eager_checks is not None else pred.device.type == "cpu"
        if eager:
            cm = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
            self._confusion = self.confusion.to(cm.device) + cm
            return
        if tuple(pred.shape) != tuple(target.shape):
            raise ValueError(
                f"pred and target shapes differ: pred {tuple(pred.shape)} vs target {tuple(target.shape)}"
            )
        counts = _pair_counts(pred, target, self.num_classes, self.ignore_index)
        self._pending = counts if self._pending is None else self._pending.to(counts.device) + counts

    def compute(self) -> dict[str, Any]:
        """Metrics over everything seen since the last reset.

        Returns:
            ``{"miou": float, "per_class_iou": {name: float | None},
            "pixel_acc": float, "mean_acc": float, "confusion": list[list[int]]}``.
            Values are fractions in ``[0, 1]``. ``per_class_iou`` maps each class
            name (or index as a string) to its IoU, ``None`` where the class is
            absent from both ground truth and prediction. If no labelled pixel
            has been seen, ``miou``, ``pixel_acc`` and ``mean_acc`` are NaN.
        """
        conf = self.confusion.cpu()  # the matrix's one read on the host
        cm = conf.to(torch.float64)
        tp = torch.diagonal(cm)
        gt = cm.sum(dim=1)
        pr = cm.sum(dim=0)
        union = gt + pr - tp
        nan = torch.full_like(tp, float("nan"))
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
        total = float(gt.sum())
        pixel_acc = float(tp.sum()) / total if total > 0 else float("nan")
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        return {
            "miou": _nanmean(iou),
            "per_class_iou": {n: _none_if_nan(float(v)) for n, v in zip(names, iou.tolist())},
            "pixel_acc": pixel_acc,
            "mean_acc": _nanmean(acc),
            "confusion": conf.tolist(),
        }


def top1_accuracy(logits: torch.Tensor, target: torch.Tensor) -> int:
    """Number of samples whose argmax over ``K`` equals the target.

    Args:
        logits: float scores of shape ``(N, K)``.
        target: integer class indices of shape ``(N,)``.

    Returns:
        Count of correct predictions (an ``int``; the caller sums/divides).

    Raises:
        ValueError: shapes are not ``(N, K)`` / ``(N,)`` with equal ``N``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (N, K), got {tuple(logits.shape)}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"target must have shape ({logits.shape[0]},), got {tuple(target.shape)}"
        )
    pred = logits.detach().argmax(dim=1)
    return int((pred == target.to(pred.device)).sum().item())


class ClassificationMetric:
    """Accumulates top-1 accuracy over a split."""

    def __init__(self) -> None:
        self.correct = 0
        self.count = 0

    def reset(self) -> None:
        self.correct = 0
        self.count = 0

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``logits`` ``(N, K)`` float, ``target`` ``(N,)`` integer."""
        self.correct += top1_accuracy(logits, target)
        self.count += int(target.shape[0])

    def compute(self) -> dict[str, Any]:
        """``{"top1": float in [0, 1] (NaN if nothing seen), "count": int}``."""
        top1 = self.correct / self.count if self.count else float("nan")
        return {"top1": top1, "count": self.count}
