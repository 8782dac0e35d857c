"""Shared by every dataset: image and label decoding with clear errors, and the item access of the
segmentation datasets made of (image file, label file) pairs."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import DataError

__all__ = ["SegPairs", "load_rgb", "load_label"]

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def scan_dir(folder: Path, what: str) -> list[os.DirEntry]:
    """Entries of ``folder`` sorted by name.

    Args:
        folder: the folder to list.
        what: a few words naming the folder's role, used in error messages (e.g.
            ``"Cityscapes image split"``).

    Raises:
        DataError: ``folder`` does not exist, is not a folder or cannot be listed
            (permissions, I/O error); the message names the folder.
    """
    if not folder.exists():
        raise DataError(f"{what} folder does not exist: {folder}")
    if not folder.is_dir():
        raise DataError(f"{what} path is not a folder: {folder}")
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"cannot list {what} folder {folder}: {type(e).__name__}: {e}") from e


def read_list_file(path: Path, what: str) -> list[str]:
    """Lines of a split list file (e.g. CamVid ``train.txt``, VOC ``ImageSets/.../val.txt``).

    Raises:
        DataError: the file cannot be read (permission, I/O) or is not text; names the file.
    """
    try:
        return Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from e


def load_rgb(path: Path) -> Image.Image:
    """Fully decode an image file and return it as an RGB PIL image.

    Raises:
        DataError: the file is missing, not an image, corrupt or truncated
            (the message names the file and the decoder error).
    """
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def load_label(path: Path) -> np.ndarray:
    """Decode a single-channel label PNG into an integer array of shape ``(H, W)``.

    Modes ``L``, ``P`` (palette indices are used as labels), ``I`` and ``I;16``
    are accepted.

    Raises:
        DataError: unreadable/corrupt file, or a multi-channel (e.g. colour-coded
            RGB) label; the message names the file and its mode.
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.array(im)
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot read label {path}: {type(e).__name__}: {e}") from e
    if arr.ndim != 2:
        raise DataError(
            f"label {path} must be a single-channel image of class ids, got mode {mode!r} "
            f"with shape {arr.shape}"
        )
    return arr


class SegPairs(Dataset):
    """Base of :class:`~segprune.data.camvid.CamVid` and :class:`~segprune.data.paired.PairedSegDataset`.

    A subclass sets ``pairs`` (list of ``(image path, label path)``), ``root``, ``split``, ``seed``,
    ``epoch`` and ``transform`` (``(PIL image, label (H, W) int64, rng) -> (image (3, h, w) float32,
    label (h, w) int64)``) and implements ``load_pair(index) -> (PIL RGB image, label (H, W) int64)``
    with its per-item checks. Augmentation draws from ``np.random.default_rng([seed, epoch, index])``.
    """

    def read_pair(self, index: int) -> tuple[Image.Image, np.ndarray, Path]:
        """Decode pair ``index``: ``(RGB image, raw label (H, W) as stored, label path)``.

        Raises:
            DataError: corrupt image or label, multi-channel label, or image and label of
                different sizes; the message names the file(s).
        """
        img_path, lab_path = self.pairs[index]
        image = load_rgb(img_path)
        raw = load_label(lab_path)
        if raw.shape != (image.size[1], image.size[0]):
            raise DataError(
                f"size mismatch: image {img_path} is {image.size[0]}x{image.size[1]} (WxH) but "
                f"label {lab_path} is {raw.shape[1]}x{raw.shape[0]} (WxH)"
            )
        return image, raw, lab_path

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
