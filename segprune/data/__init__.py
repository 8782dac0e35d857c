"""Datasets, transforms and config-driven factories.

The factories take the plain ``dict`` of a YAML config section.

Segmentation config (``build_seg_dataset``)::

    name: camvid | voc_sbd | cityscapes | ade20k | folder | synthetic
    root: path                     # every dataset but synthetic (layouts: docs/datasets.md)
    folder: {img_dir, ann_dir, img_suffix, seg_map_suffix, ann_file, classes, palette, reduce_zero_label}
                                   # folder only: your own data (segprune/data/folder.py)
    input_size: [H, W]             # eval input size and train base size (optional: keep native)
    crop_size: [h, w]              # train crop (default: input_size, else synthetic image_size)
    scale_range: [lo, hi]          # default [0.5, 2.0]
    hflip: true
    ignore_index: 255
    num_train, num_eval, num_kinds, image_size: [H, W]   # synthetic
    data_seed: int                 # synthetic, optional: generation seed (default: the seed argument)

Classification config (``build_cls_dataset``)::

    name: imagefolder | synthetic
    root: path                     # imagefolder: <root>/<split>/<class>/*.jpg
    input_size: [H, W]             # default for synthetic: image_size
    pad: 4, padding_mode: reflect, hflip: true     # optional train augmentation
    train_split: train             # imagefolder, optional: split that defines the classes
    num_train, num_eval, num_kinds, image_size: [H, W]   # synthetic
    data_seed: int                 # synthetic, optional
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .ade20k import ADE20K
from .camvid import CamVid
from .cityscapes import Cityscapes
from .errors import DataError
from .folder import FolderSegDataset, folder_options, read_classes
from .imagefolder import ImageFolderDataset, list_class_dirs
from .paired import PairedSegDataset
from .synthetic import SyntheticClassification, SyntheticSegmentation
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClsEvalTransform,
    ClsTrainTransform,
    SegEvalTransform,
    SegTrainTransform,
)
from .voc import VOCSegmentation

__all__ = [
    "DataError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SegTrainTransform",
    "SegEvalTransform",
    "ClsTrainTransform",
    "ClsEvalTransform",
    "CamVid",
    "VOCSegmentation",
    "Cityscapes",
    "ADE20K",
    "PairedSegDataset",
    "FolderSegDataset",
    "SEG_DATASETS",
    "SEG_DATASET_NAMES",
    "ImageFolderDataset",
    "SyntheticSegmentation",
    "SyntheticClassification",
    "build_seg_dataset",
    "build_cls_dataset",
    "seg_num_classes",
    "cls_num_classes",
]

_MISSING = object()

#: ``data.seg.name`` -> dataset class, for the datasets read from disk. Each class is built as
#: ``cls(root, split, transform, ignore_index=..., seed=...)`` and has ``num_classes``,
#: ``CLASSES`` (names) and ``PALETTE`` (RGB per class, used by ``segprune compare``).
SEG_DATASETS: dict[str, type] = {
    "camvid": CamVid,
    "voc_sbd": VOCSegmentation,
    "cityscapes": Cityscapes,
    "ade20k": ADE20K,
}
#: Every accepted ``data.seg.name``: ``folder`` is a user's own data (:class:`FolderSegDataset`, its
#: classes come from the config, see ``data.seg.folder``).
SEG_DATASET_NAMES: tuple[str, ...] = (*SEG_DATASETS, "folder", "synthetic")


def _get(cfg: Mapping, key: str, default: Any = _MISSING, section: str = "data") -> Any:
    if not isinstance(cfg, Mapping):
        raise DataError(f"{section} config must be a mapping, got {type(cfg).__name__}: {cfg!r}")
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is _MISSING:
        raise DataError(f"{section} config is missing required key {key!r} (keys: {sorted(cfg)})")
    return default


def _size(cfg: Mapping, key: str, default: Any = _MISSING, section: str = "data") -> tuple[int, int] | None:
    value = _get(cfg, key, default, section)
    if value is None:
        return None
    try:
        h, w = (int(v) for v in value)
        ok = h > 0 and w > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DataError(f"{section} config key {key!r} must be [H, W] with positive ints, got {value!r}")
    return h, w


def _pair(cfg: Mapping, key: str, default: tuple[float, float], section: str) -> tuple[float, float]:
    value = _get(cfg, key, default, section)
    try:
        lo, hi = (float(v) for v in value)
        ok = 0 < lo <= hi
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DataError(f"{section} config key {key!r} must be [lo, hi] with 0 < lo <= hi, got {value!r}")
    return lo, hi


def _name(cfg: Mapping, allowed: tuple[str, ...], section: str) -> str:
    name = str(_get(cfg, "name", section=section)).lower()
    if name not in allowed:
        raise DataError(f"{section} config key 'name' must be one of {list(allowed)}, got {cfg['name']!r}")
    return name


def _synthetic_count(cfg: Mapping, split: str, section: str) -> int:
    key = "num_train" if split == "train" else "num_eval"
    return int(_get(cfg, key, section=section))


def build_seg_dataset(cfg: dict, split: str, train: bool, seed: int = 0) -> Dataset:
    """Build a segmentation dataset from a config section.

    Args:
        cfg: config mapping (see module docstring for keys).
        split: ``"train"``, ``"val"``, ``"test"``, ... (CamVid / VOC list-file stem, Cityscapes /
            ADE20K split folder, see each class; for synthetic, ``"train"`` uses ``num_train``
            and any other split ``num_eval``).
        train: ``True`` -> :class:`SegTrainTransform`, ``False`` -> :class:`SegEvalTransform`.
        seed: augmentation seed (and synthetic generation seed unless ``data_seed`` is set).

    Returns:
        A dataset yielding ``(float32 (3, h, w), int64 (h, w))`` with ``num_classes``
        and ``ignore_index`` attributes.

    Raises:
        DataError: unknown ``name``, missing/invalid keys (message names the key and
            value), or any dataset construction error.
    """
    name = _name(cfg, SEG_DATASET_NAMES, "seg data")
    section = f"seg data (name={name!r})"
    ignore_index = int(_get(cfg, "ignore_index", 255, section))
    input_size = _size(cfg, "input_size", None, section)
    image_size = _size(cfg, "image_size", (64, 64), section) if name == "synthetic" else None

    if train:
        crop_size = _size(cfg, "crop_size", input_size or image_size, section)
        if crop_size is None:
            raise DataError(f"{section} config needs 'crop_size' or 'input_size' for training, got neither")
        transform = SegTrainTransform(
            base_size=input_size,
            crop_size=crop_size,
            scale_range=_pair(cfg, "scale_range", (0.5, 2.0), section),
            hflip=bool(_get(cfg, "hflip", True, section)),
            ignore_index=ignore_index,
        )
    else:
        transform = SegEvalTransform(input_size)

    if name in SEG_DATASETS:
        return SEG_DATASETS[name](_get(cfg, "root", section=section), split, transform,
                                  ignore_index=ignore_index, seed=seed)
    if name == "folder":
        ds = FolderSegDataset.from_config(cfg, split, transform, seed=seed)
        if not train and input_size is not None and int(_get(cfg, "eval_batch_size", 1, section)) > 1:
            ds.check_uniform_label_size()  # labels keep their size in evaluation: a batch must agree
        return ds
    return SyntheticSegmentation(
        _synthetic_count(cfg, split, section),
        image_size=image_size,
        num_kinds=int(_get(cfg, "num_kinds", 4, section)),
        seed=int(_get(cfg, "data_seed", seed, section)),
        split=split,
        transform=transform,
        ignore_index=ignore_index,
    )


def build_cls_dataset(cfg: dict, split: str, train: bool, seed: int = 0) -> Dataset:
    """Build a classification dataset from a config section.

    Args:
        cfg: config mapping (see module docstring for keys).
        split: image-folder split name, or for synthetic ``"train"`` (``num_train``)
            vs anything else (``num_eval``).
        train: ``True`` -> :class:`ClsTrainTransform`, ``False`` -> :class:`ClsEvalTransform`.
        seed: augmentation seed (and synthetic generation seed unless ``data_seed`` is set).

    Returns:
        A dataset yielding ``(float32 (3, H, W), int)`` with a ``num_classes`` attribute.
        For image folders, class indices always follow the ``train_split`` folder
        (default ``"train"``), so they agree across splits.

    Raises:
        DataError: unknown ``name``, missing/invalid keys, or dataset errors.
    """
    section = "cls data"
    name = _name(cfg, ("imagefolder", "synthetic"), section)
    image_size = _size(cfg, "image_size", (32, 32), section) if name == "synthetic" else None
    input_size = _size(cfg, "input_size", image_size, section)
    if train:
        if input_size is None:
            raise DataError(f"{section} config is missing required key 'input_size' for training")
        transform = ClsTrainTransform(
            input_size,
            pad=int(_get(cfg, "pad", 4, section)),
            padding_mode=str(_get(cfg, "padding_mode", "reflect", section)),
            hflip=bool(_get(cfg, "hflip", True, section)),
        )
    else:
        transform = ClsEvalTransform(input_size)

    if name == "imagefolder":
        root = Path(_get(cfg, "root", section=section))
        train_split = str(_get(cfg, "train_split", "train", section))
        classes = None if split == train_split else list_class_dirs(root / train_split)
        return ImageFolderDataset(root, split, transform, seed=seed, classes=classes)
    return SyntheticClassification(
        _synthetic_count(cfg, split, section),
        image_size=image_size,
        num_kinds=int(_get(cfg, "num_kinds", 4, section)),
        seed=int(_get(cfg, "data_seed", seed, section)),
        split=split,
        transform=transform,
    )


def seg_num_classes(cfg: dict) -> int:
    """Number of segmentation classes (excluding ignore): CamVid 11, VOC 21, Cityscapes 19,
    ADE20K 150, synthetic ``num_kinds + 1``, folder ``len(folder.classes)``. No file is read but
    the folder dataset's classes file.

    Raises:
        DataError: unknown ``name``; folder: missing/bad ``folder.classes`` or classes file.
    """
    name = _name(cfg, SEG_DATASET_NAMES, "seg data")
    if name in SEG_DATASETS:
        return SEG_DATASETS[name].num_classes
    if name == "folder":
        return len(read_classes(folder_options(cfg)["classes"], cfg.get("root")))
    return int(_get(cfg, "num_kinds", 4, "seg data")) + 1


def cls_num_classes(cfg: dict) -> int:
    """Number of classification classes: synthetic ``num_kinds``; image folder = number of
    class folders in ``<root>/<train_split>`` (no image is decoded).

    Raises:
        DataError: unknown ``name``, missing ``root`` or missing/empty train folder.
    """
    name = _name(cfg, ("imagefolder", "synthetic"), "cls data")
    if name == "synthetic":
        return int(_get(cfg, "num_kinds", 4, "cls data"))
    root = Path(_get(cfg, "root", section="cls data"))
    return len(list_class_dirs(root / str(_get(cfg, "train_split", "train", "cls data"))))
