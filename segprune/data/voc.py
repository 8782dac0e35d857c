"""PASCAL VOC 2012 segmentation with the SBD augmented training set (``data.seg.name: voc_sbd``).

Layout (``root`` may be the folder holding ``VOCdevkit/``, ``VOCdevkit/`` itself or ``VOC2012/``)::

    VOCdevkit/VOC2012/
        JPEGImages/<id>.jpg                       RGB images (about 500x375, sizes vary)
        SegmentationClassAug/<id>.png             labels of train_aug + val (SBD + VOC), mode L or P
        SegmentationClass/<id>.png                original VOC labels (palette PNG), optional
        ImageSets/Segmentation/
            train_aug.txt   10,582 ids  (also found as trainaug.txt or aug.txt)
            train.txt        1,464 ids
            val.txt          1,449 ids

Label values: 0 = background, 1..20 = the object classes, 255 = boundary / "difficult"
(ignored). A list line is either an image id (``2007_000032``) or two paths relative to
``VOC2012/`` (``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``, the
DeepLab list format). For an id, the label is ``SegmentationClassAug/<id>.png`` when that file
exists, else ``SegmentationClass/<id>.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import read_list_file
from .errors import DataError
from .paired import PairedSegDataset, scan_dir, voc_palette

__all__ = ["VOCSegmentation"]


class VOCSegmentation(PairedSegDataset):
    """PASCAL VOC 2012 (+ SBD ``train_aug``), 21 classes, label 255 ignored.

    Args:
        root: ``VOC2012/``, ``VOCdevkit/`` or the folder that holds ``VOCdevkit/``.
        split: list-file stem under ``ImageSets/Segmentation/``: ``"train_aug"`` (10,582;
            aliases ``"trainaug"``, ``"aug"``), ``"train"`` (1,464), ``"val"`` (1,449), or any
            other ``<split>.txt`` there. ``"a+b"`` concatenates splits.
        transform, ignore_index, seed: see :class:`~segprune.data.paired.PairedSegDataset`.

    Raises:
        DataError: missing ``JPEGImages/`` (no VOC 2012 folder found under ``root``), missing
            list file (the message lists the lists present), malformed list line, listed
            image or label not on disk (message names the list file, line and path), empty
            split; at item access, as :class:`PairedSegDataset` (labels must be 0..20 or 255).
    """

    DATASET = "PASCAL VOC 2012"
    CLASSES: tuple[str, ...] = (
        "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
        "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
        "sheep", "sofa", "train", "tvmonitor",
    )
    PALETTE: list[tuple[int, int, int]] = voc_palette(21)
    num_classes: int = 21
    LABEL_VALUES = "VOC class ids 0..20 or 255 (boundary, ignored)"
    SPLIT_ALIASES = {
        "train_aug": ("train_aug", "trainaug", "aug"),
        "trainaug": ("trainaug", "train_aug", "aug"),
        "aug": ("aug", "train_aug", "trainaug"),
    }
    LABEL_DIRS = ("SegmentationClassAug", "SegmentationClass")

    def resolve_root(self, root: Path) -> Path:
        """The ``VOC2012`` folder: ``root/VOCdevkit/VOC2012``, ``root/VOC2012`` or ``root``."""
        tried = [root / "VOCdevkit" / "VOC2012", root / "VOC2012", root]
        for cand in tried:
            if (cand / "JPEGImages").is_dir():
                return cand
        raise DataError(
            f"no PASCAL VOC 2012 folder under {root}: none of "
            + ", ".join(str(c / "JPEGImages") for c in tried) + " exists"
        )

    def raw_to_class(self) -> np.ndarray:
        return self.make_lut(256, {v: v for v in range(21)}, ignore=(255,))

    def find_pairs(self, split: str) -> list[tuple[Path, Path]]:
        list_dir = self.root / "ImageSets" / "Segmentation"
        names = self._split_candidates(split)
        list_file = next((list_dir / f"{n}.txt" for n in names if (list_dir / f"{n}.txt").is_file()), None)
        if list_file is None:
            present = sorted(e.name for e in scan_dir(list_dir, "VOC split list") if e.name.endswith(".txt"))
            raise DataError(
                f"VOC split list not found: {list_dir / (names[0] + '.txt')} (split={split!r}; "
                f"lists present: {present})"
            )
        images = {e.name for e in scan_dir(self.root / "JPEGImages", "VOC image")}
        label_dirs = [d for d in self.LABEL_DIRS if (self.root / d).is_dir()]
        if not label_dirs:
            raise DataError(
                f"no VOC label folder: neither {self.root / self.LABEL_DIRS[0]} nor "
                f"{self.root / self.LABEL_DIRS[1]} exists"
            )
        labels = {d: {e.name for e in scan_dir(self.root / d, "VOC label")} for d in label_dirs}
        pairs: list[tuple[Path, Path]] = []
        for lineno, line in enumerate(read_list_file(list_file, "VOC split list"), start=1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            where = f"{list_file}:{lineno}"
            if len(parts) == 1:
                stem = parts[0]
                if f"{stem}.jpg" not in images:
                    raise DataError(f"{where}: image does not exist: {self.root / 'JPEGImages' / (stem + '.jpg')}")
                d = next((d for d in label_dirs if f"{stem}.png" in labels[d]), None)
                if d is None:
                    raise DataError(
                        f"{where}: no label for {stem!r}: expected "
                        + " or ".join(str(self.root / d / f"{stem}.png") for d in label_dirs)
                    )
                pairs.append((self.root / "JPEGImages" / f"{stem}.jpg", self.root / d / f"{stem}.png"))
            elif len(parts) == 2:
                img, lab = (self.root / p.lstrip("/") for p in parts)
                for p in (img, lab):
                    if not p.is_file():
                        raise DataError(f"{where}: listed file does not exist: {p}")
                pairs.append((img, lab))
            else:
                raise DataError(f"{where}: expected '<id>' or '<image> <label>', got {line.strip()!r}")
        return pairs
