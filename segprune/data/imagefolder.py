"""Image classification dataset in the torchvision ``ImageFolder`` layout.

Layout::

    <root>/<split>/<class_dir>/*.{jpg,jpeg,png}

Class indices are the positions of the class folder names in sorted order,
which is what ``torchvision.datasets.ImageFolder`` assigns.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import load_rgb, scan_dir
from .errors import DataError
from .transforms import ClsEvalTransform

__all__ = ["ImageFolderDataset", "IMAGE_EXTENSIONS", "list_class_dirs"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def list_class_dirs(split_dir: str | Path) -> list[str]:
    """Sorted names of the sub-folders of ``split_dir`` (no image is decoded).

    Raises:
        DataError: ``split_dir`` does not exist or has no sub-folders.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError(f"image folder split does not exist: {split_dir}")
    classes = sorted(e.name for e in scan_dir(split_dir, "image folder split") if e.is_dir())
    if not classes:
        raise DataError(f"image folder split has no class folders: {split_dir}")
    return classes


class ImageFolderDataset(Dataset):
    """Classification images from ``<root>/<split>/<class>/``.

    Args:
        root: dataset root folder.
        split: sub-folder name, e.g. ``"train"`` or ``"val"``.
        transform: ``(PIL RGB image, rng) -> float32 (3, H, W)`` such as
            :class:`ClsTrainTransform` / :class:`ClsEvalTransform`; ``None`` means
            ``ClsEvalTransform(None)`` (normalise only).
        seed: base seed of the augmentation RNG.
        classes: optional explicit class list (e.g. the training split's) so that
            indices agree across splits even if a split lacks a class folder;
            default: the sorted class folders of this split.

    Items:
        ``(image, target)``: ``float32 (3, H, W)`` and a Python ``int`` in
        ``0..num_classes-1``. Images of any mode (e.g. grayscale ``L``) become RGB.

    Raises:
        DataError: missing split folder, no class folders, a class folder without
            images, a class folder not in ``classes``; at item access, an
            unreadable/corrupt image (message names the file).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable | None,
        seed: int = 0,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform if transform is not None else ClsEvalTransform(None)
        self.seed = int(seed)
        self.epoch = 0
        split_dir = self.root / split
        if not self.root.is_dir():
            raise DataError(f"image folder root does not exist: {self.root}")
        present = list_class_dirs(split_dir)
        self.classes: list[str] = list(classes) if classes is not None else present
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        unknown = [c for c in present if c not in self.class_to_idx]
        if unknown:
            raise DataError(
                f"class folders in {split_dir} not in the given class list: {unknown[:10]}"
            )
        self.samples: list[tuple[Path, int]] = []
        for c in present:
            cdir = split_dir / c
            files = sorted(
                cdir / e.name
                for e in scan_dir(cdir, "class")
                if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not files:
                raise DataError(
                    f"class folder has no images ({', '.join(IMAGE_EXTENSIONS)}): {cdir}"
                )
            idx = self.class_to_idx[c]
            self.samples.extend((f, idx) for f in files)

    @property
    def num_classes(self) -> int:
        """Number of classes (length of :attr:`classes`)."""
        return len(self.classes)

    @property
    def targets(self) -> list[int]:
        """Class index of every sample, in dataset order."""
        return [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used to derive per-item augmentation RNGs."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        image = load_rgb(path)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return self.transform(image, rng), target

    def validate(self, limit: int | None = None) -> int:
        """Full scan (``data.cls.validate: true``): decode every image of the split.

        Args:
            limit: scan only the first ``limit`` samples (``None``: all).
        Returns:
            number of images checked.
        Raises:
            DataError: the first unreadable, truncated or corrupt image, naming the file and
                how many images were fine before it.
        """
        items = self.samples if limit is None else self.samples[: int(limit)]
        for i, (path, _) in enumerate(items):
            try:
                load_rgb(path)
            except DataError as exc:
                raise DataError(f"{exc} (full scan of {self.root / self.split}: {i} images fine before it)") from None
        return len(items)

    def describe(self) -> str:
        """Short one-line description for logs."""
        return (
            f"ImageFolder(split={self.split}, n={len(self)}, classes={self.num_classes}, "
            f"root={self.root})"
        )

    def __repr__(self) -> str:
        return self.describe()
