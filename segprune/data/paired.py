"""Shared machinery of the folder-layout segmentation datasets (PASCAL VOC, Cityscapes, ADE20K).

A :class:`PairedSegDataset` is a list of ``(image file, label file)`` pairs found on disk by a
subclass (:meth:`PairedSegDataset.find_pairs`) plus a lookup table that maps every *raw* label
value of the annotation files to a training class ``0..C-1`` or to ``ignore_index``; every other
raw value is an error. The per-item checks are the ones :class:`~segprune.data.camvid.CamVid`
makes (image decodes, label is single-channel, sizes agree, values are known), and
:meth:`PairedSegDataset.validate` runs them over the whole split (``data.seg.validate``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .base import SegPairs, scan_dir  # noqa: F401  (scan_dir: imported from here by voc, cityscapes, ade20k)
from .errors import DataError
from .transforms import SegEvalTransform

__all__ = ["PairedSegDataset", "scan_dir", "voc_palette"]


def voc_palette(n: int = 256) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map (bit-interleaved class index), first ``n`` entries as RGB tuples.

    Index 0 is black, 1 ``(128, 0, 0)``, 2 ``(0, 128, 0)``, ..., 255 ``(224, 224, 192)``.
    """
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


class PairedSegDataset(SegPairs):
    """Base class: segmentation pairs found on disk, raw label values mapped by a lookup table.

    Subclasses set :attr:`CLASSES`, :attr:`PALETTE`, :attr:`num_classes`, :attr:`DATASET`,
    :attr:`LABEL_VALUES` and implement :meth:`find_pairs` and :meth:`raw_to_class`
    (optionally :meth:`resolve_root` and :attr:`SPLIT_ALIASES`).

    Args:
        root: dataset folder (see the subclass for the layout and the accepted parents).
        split: split name; several splits may be joined with ``+`` (e.g. ``"train+val"``),
            their pairs are concatenated in that order.
        transform: paired transform ``(PIL image, int64 label (H, W), rng) -> (image, label)``
            such as :class:`SegTrainTransform` / :class:`SegEvalTransform`; ``None`` means
            ``SegEvalTransform(None)`` (normalise only, native size).
        ignore_index: value written for ignored pixels (ignored by loss and metrics).
        seed: base seed of the augmentation RNG (per item: ``(seed, epoch, index)``).

    Items:
        ``(image, label)``: ``float32 (3, h, w)`` normalised image and ``int64 (h, w)`` labels
        in ``0..num_classes-1`` or ``ignore_index``.

    Raises:
        DataError: at construction for a missing/unlistable folder, a missing pair, an
            unknown split or an empty split; at item access (and in :meth:`validate`) for a
            corrupt image or label, a multi-channel label, an image/label size mismatch or a
            raw label value the dataset does not define. Messages name the file(s).
    """

    #: Dataset name used in messages.
    DATASET: str = "segmentation dataset"
    CLASSES: tuple[str, ...] = ()
    PALETTE: list[tuple[int, int, int]] = []
    num_classes: int = 0
    #: Human-readable description of the raw label values accepted (for error messages).
    LABEL_VALUES: str = ""
    #: ``split name -> folder / list names to try, in order``.
    SPLIT_ALIASES: dict[str, tuple[str, ...]] = {}

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable | None,
        ignore_index: int = 255,
        seed: int = 0,
    ) -> None:
        self.split = str(split)
        self.transform = transform if transform is not None else SegEvalTransform(None)
        self.ignore_index = int(ignore_index)
        self.seed = int(seed)
        self.epoch = 0
        given = Path(root)
        if not given.is_dir():
            raise DataError(f"{self.DATASET} root folder does not exist: {given}")
        self.root = self.resolve_root(given)
        parts = [p.strip() for p in self.split.split("+")]
        if not all(parts):
            raise DataError(f"{self.DATASET}: malformed split {self.split!r} (empty part)")
        self.pairs: list[tuple[Path, Path]] = []
        for part in parts:
            self.pairs += self.find_pairs(part)
        if not self.pairs:
            raise DataError(f"{self.DATASET} split {self.split!r} is empty: no image/label pairs under {self.root}")
        lut = np.asarray(self.raw_to_class(), np.int64)
        self._valid = lut != -1
        self._lut = np.where(lut >= 0, lut, self.ignore_index).astype(np.int64)

    # ------------------------------------------------------------------ subclass hooks
    def resolve_root(self, root: Path) -> Path:
        """The folder the layout is relative to (default: ``root`` itself)."""
        return root

    def find_pairs(self, split: str) -> list[tuple[Path, Path]]:
        """``(image, label)`` paths of one split, in a deterministic order.

        Raises:
            DataError: unknown split, missing folder/list or a missing half of a pair.
        """
        raise NotImplementedError

    def raw_to_class(self) -> np.ndarray:
        """Lookup table over raw label values ``0..L-1``: a class in ``0..C-1``, ``-2`` for
        "ignore" (becomes ``ignore_index``) or ``-1`` for "not a valid value" (an error).
        Raw values ``>= L`` are invalid (see :meth:`make_lut`)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ items
    def map_label(self, raw: np.ndarray, path: Path | str = "<label>") -> np.ndarray:
        """Map raw label values to training classes.

        Args:
            raw: integer array ``(H, W)`` as stored in the annotation file.
            path: the label file, for the error message.

        Returns:
            ``int64 (H, W)`` with values in ``0..num_classes-1`` or ``ignore_index``.

        Raises:
            DataError: a value outside :attr:`LABEL_VALUES` (the message lists up to 10 of them).
        """
        raw = np.asarray(raw)
        n = self._lut.shape[0]
        lo, hi = (int(raw.min()), int(raw.max())) if raw.size else (0, 0)
        if lo < 0 or hi >= n:
            idx = np.clip(raw, 0, n - 1)
            bad_mask = (raw < 0) | (raw >= n) | ~self._valid[idx]
        else:
            idx = raw
            bad_mask = ~self._valid[idx]
        if bad_mask.any():
            bad = np.unique(raw[bad_mask])
            raise DataError(
                f"label {path} has values that are not {self.LABEL_VALUES}: {bad[:10].tolist()}"
                + (f" ... ({bad.size - 10} more)" if bad.size > 10 else "")
            )
        return self._lut[idx]

    def load_pair(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """Load and check pair ``index`` without any transform.

        Returns:
            ``(RGB PIL image, int64 label (H, W))`` with raw values already mapped to classes
            (or ``ignore_index``).

        Raises:
            DataError: corrupt image/label, multi-channel label, size mismatch or unknown
                raw label values; the message names the file(s).
        """
        image, raw, lab_path = self.read_pair(index)
        return image, self.map_label(raw, lab_path)

    # ------------------------------------------------------------------ helpers for subclasses
    def _split_candidates(self, split: str) -> tuple[str, ...]:
        return self.SPLIT_ALIASES.get(split, (split,))

    @staticmethod
    def make_lut(size: int, mapping: dict[int, int], ignore: tuple[int, ...] = ()) -> np.ndarray:
        """Lookup table for :meth:`raw_to_class`: ``size`` entries, ``mapping`` raw -> class,
        ``ignore`` raw values -> ``-2`` (ignore), everything else ``-1`` (invalid)."""
        lut = np.full(size, -1, np.int64)
        for raw, cls in mapping.items():
            lut[raw] = cls
        for raw in ignore:
            lut[raw] = -2
        return lut
