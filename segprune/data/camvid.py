"""CamVid (SegNet 11-class version) segmentation dataset.

Expected layout (as in ``shared/data/camvid``)::

    <root>/<split>.txt          one "<image> <label>" pair per line, paths relative to <root>
    <root>/<split>/*.jpg|png    RGB images, 480x360
    <root>/<split>annot/*.png   single-channel labels, values 0..10 = classes, 11 = void
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .base import SegPairs, load_label, load_rgb, read_list_file
from .errors import DataError
from .transforms import SegEvalTransform

__all__ = ["CamVid", "load_rgb", "load_label"]

# Errors PIL may raise for missing, unreadable, corrupt or truncated files.
class CamVid(SegPairs):
    """CamVid semantic segmentation, 11 classes + void.

    Args:
        root: dataset folder containing ``<split>.txt``.
        split: list-file stem, e.g. ``"train"``, ``"val"``, ``"test"``.
        transform: paired transform ``(PIL image, label array, rng) -> (image, label)``
            such as :class:`SegTrainTransform` / :class:`SegEvalTransform`; ``None``
            means ``SegEvalTransform(None)`` (normalise only, native size).
        void_label: raw label value treated as void (mapped to ``ignore_index``).
        ignore_index: value written for void pixels (ignored by loss and metrics).
        seed: base seed of the augmentation RNG.

    Items:
        ``(image, label)``: ``float32 (3, h, w)`` normalised image and ``int64 (h, w)``
        labels in ``0..10`` or ``ignore_index``.

    Raises:
        DataError: at construction for a missing root, missing list file, malformed
            list line, listed file that does not exist or an empty split; at item
            access for a corrupt image, out-of-range label values or an
            image/label size mismatch. Messages name the offending path(s).
    """

    CLASSES: tuple[str, ...] = (
        "Sky", "Building", "Pole", "Road", "Pavement", "Tree",
        "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
    )
    PALETTE: list[tuple[int, int, int]] = [
        (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
        (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
    ]
    VOID_COLOR: tuple[int, int, int] = (0, 0, 0)
    num_classes: int = 11

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable | None,
        void_label: int = 11,
        ignore_index: int = 255,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform if transform is not None else SegEvalTransform(None)
        self.void_label = int(void_label)
        self.ignore_index = int(ignore_index)
        self.seed = int(seed)
        self.epoch = 0
        self.pairs = self._read_list()

    def _read_list(self) -> list[tuple[Path, Path]]:
        if not self.root.is_dir():
            raise DataError(f"CamVid root folder does not exist: {self.root}")
        list_file = self.root / f"{self.split}.txt"
        if not list_file.is_file():
            raise DataError(f"CamVid split list not found: {list_file} (split={self.split!r})")
        pairs: list[tuple[Path, Path]] = []
        for lineno, line in enumerate(read_list_file(list_file, "CamVid split list"), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise DataError(
                    f"{list_file}:{lineno}: expected '<image> <label>', got {line!r}"
                )
            img, lab = self.root / parts[0], self.root / parts[1]
            for p in (img, lab):
                if not p.is_file():
                    raise DataError(f"{list_file}:{lineno}: listed file does not exist: {p}")
            pairs.append((img, lab))
        if not pairs:
            raise DataError(f"CamVid split {self.split!r} is empty: {list_file} lists no pairs")
        return pairs

    def load_pair(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """Load and check pair ``index`` without any transform.

        Returns:
            ``(RGB PIL image, int64 label (H, W))`` with void mapped to ``ignore_index``.

        Raises:
            DataError: corrupt image/label, size mismatch, or label values outside
                ``0..10`` that are not ``void_label``.
        """
        image, raw, lab_path = self.read_pair(index)
        values = np.unique(raw)
        bad = values[((values < 0) | (values >= self.num_classes)) & (values != self.void_label)]
        if bad.size:
            raise DataError(
                f"label {lab_path} has values outside 0..{self.num_classes - 1} "
                f"(void={self.void_label}): {bad[:10].tolist()}"
            )
        label = raw.astype(np.int64)
        label[raw == self.void_label] = self.ignore_index
        return image, label
