"""Item access shared by every segmentation dataset made of (image file, label file) pairs."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SegPairs"]


class SegPairs(Dataset):
    """Base of :class:`~segprune.data.camvid.CamVid` and :class:`~segprune.data.paired.PairedSegDataset`.

    A subclass sets ``pairs`` (list of ``(image path, label path)``), ``root``, ``split``, ``seed``,
    ``epoch`` and ``transform`` (``(PIL image, label (H, W) int64, rng) -> (image (3, h, w) float32,
    label (h, w) int64)``) and implements ``load_pair(index) -> (PIL RGB image, label (H, W) int64)``
    with its per-item checks. Augmentation draws from ``np.random.default_rng([seed, epoch, index])``.
    """

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used to derive per-item augmentation RNGs."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.load_pair(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return self.transform(image, label, rng)

    def validate(self) -> None:
        """Fully decode and check every pair (slow: minutes for 10k images; opt-in through
        ``data.seg.validate``).

        Raises:
            DataError: on the first bad pair (see ``load_pair``).
        """
        for i in range(len(self)):
            self.load_pair(i)

    def describe(self) -> str:
        """Short one-line description for logs."""
        return f"{type(self).__name__}(split={self.split}, n={len(self)}, root={self.root})"

    def __repr__(self) -> str:
        return self.describe()
