"""Evaluation loops: segmentation (mIoU, pixel accuracy) and classification (top-1)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from .metrics import ClassificationMetric, SegmentationMetric

__all__ = ["evaluate_segmentation", "evaluate_classification"]


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader: DataLoader, num_classes: int, ignore_index: int = 255,
                          class_names: list[str] | None = None) -> dict:
    """mIoU etc. over the whole split (see :class:`SegmentationMetric`); logits (N,K,h,w) are
    bilinearly upsampled to the label resolution before the argmax. Restores the model's mode."""
    was = model.training
    model.eval()
    metric = SegmentationMetric(num_classes, ignore_index, list(class_names) if class_names else None)
    try:
        for x, y in loader:
            metric.update(model(x), y)
    finally:
        model.train(was)
    return metric.compute()


@torch.no_grad()
def evaluate_classification(forward: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader) -> dict:
    """Top-1 accuracy of ``forward`` ((N,3,h,w) -> (N,K) logits) over ``loader``; eval mode of its module."""
    owner = getattr(forward, "__self__", forward)
    was = getattr(owner, "training", False)
    if isinstance(owner, nn.Module):
        owner.eval()
    metric = ClassificationMetric()
    try:
        for x, y in loader:
            metric.update(forward(x), y)
    finally:
        if isinstance(owner, nn.Module):
            owner.train(was)
    return metric.compute()
