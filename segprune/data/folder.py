"""Your own data: a folder of images and a folder of label PNGs (``data.seg.name: folder``).

The keys are named as mmsegmentation's ``BaseSegDataset`` / ``CustomDataset`` names them, under
``data.seg.folder`` (``root`` and ``ignore_index`` are the usual ``data.seg`` keys)::

    <root>/<img_dir>/<id><img_suffix>          RGB images (any size; sizes may differ)
    <root>/<ann_dir>/<id><seg_map_suffix>      labels: single-channel PNG (mode L / I;16) or palette
                                               PNG (mode P: the palette index is the class)
    <root>/<ann_file>                          optional split file: one <id> per line
    <root>/<classes file>                      optional: one class name per line

* ``<id>`` may contain sub-folders (``aachen/aachen_000000_000019``). In a split file it is written
  without ``img_suffix`` (as in mmsegmentation; a trailing ``img_suffix`` is tolerated and dropped).
* Splits (``data.seg.train_split`` / ``eval_split``): ``img_dir``, ``ann_dir`` and ``ann_file`` may
  contain ``{split}``, replaced by the split name (``ann_file: splits/{split}.txt``, or
  ``img_dir: img_dir/{split}`` for mmsegmentation's per-split folders); ``ann_file`` may also be a
  mapping ``{train: splits/train.txt, val: splits/val.txt}``. Without ``ann_file`` a split is every
  image under ``img_dir`` (searched recursively), and every label under ``ann_dir`` must then have
  its image (unless only ``img_dir`` holds ``{split}``: one label folder for all splits). ``a+b``
  joins splits.
* Label values: ``0..C-1`` (``C = len(classes)``) or ``ignore_index``; with ``reduce_zero_label``
  (mmsegmentation's, e.g. ADE20K) raw ``0`` is ignored and ``v`` in ``1..C`` becomes class ``v - 1``.
  Any other value is an error naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from .base import read_list_file, scan_dir
from .errors import DataError
from .paired import PairedSegDataset, voc_palette

__all__ = ["FolderSegDataset", "FOLDER_DEFAULTS", "folder_config_problems", "read_classes"]

#: ``data.seg.folder`` keys and their defaults (mmsegmentation's names where it has the key).
FOLDER_DEFAULTS: dict[str, Any] = {
    "img_dir": "images", "ann_dir": "labels", "img_suffix": ".jpg", "seg_map_suffix": ".png",
    "ann_file": None, "classes": None, "palette": None, "reduce_zero_label": False,
}

_K = "data.seg.folder."  # prefix of the keys named in messages


def _sub(template: str, split: str) -> str:
    return template.replace("{split}", split)


def read_classes(classes: str | Path | Sequence[str], root: str | Path | None = None) -> tuple[str, ...]:
    """Class names from a list, or from a file (one name per line; blank lines and ``#`` comments
    skipped; a relative path is relative to ``root``).

    Raises:
        DataError: missing/unreadable file, no class, an empty or duplicated name, or a value that is
            neither a list of names nor a path; the message names ``data.seg.folder.classes`` and
            the file or value.
    """
    if classes is None:
        raise DataError(f"{_K}classes is required for the folder dataset: a list of class names "
                        f"or a file with one name per line (relative to data.seg.root)")
    if isinstance(classes, (str, Path)):
        path = Path(classes)
        if not path.is_absolute() and root is not None:
            path = Path(root) / path
        if not path.is_file():
            raise DataError(f"{_K}classes={str(classes)!r}: classes file does not exist: {path}")
        names = [ln.strip() for ln in read_list_file(path, "classes file")]
        names = [n for n in names if n and not n.startswith("#")]
        where = f"classes file {path}"
    elif isinstance(classes, Sequence) and all(isinstance(n, str) for n in classes):
        names, where = [n.strip() for n in classes], f"{_K}classes"
    else:
        raise DataError(f"{_K}classes={classes!r}: must be a list of class names or the path of a classes file")
    if not names:
        raise DataError(f"{where} lists no class")
    if not all(names):
        raise DataError(f"{where}: empty class name in {names!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{where}: class names listed twice: {dup}")
    return tuple(names)


def _palette(palette: Any, n: int) -> list[tuple[int, int, int]]:
    ok = isinstance(palette, Sequence) and not isinstance(palette, str) and all(
        isinstance(c, Sequence) and len(c) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                                                        for v in c) for c in palette)
    if not ok:
        raise DataError(f"{_K}palette={palette!r}: must be a list of [R, G, B] (ints 0..255), one per class")
    if len(palette) != n:
        raise DataError(f"{_K}palette has {len(palette)} colours but there are {n} classes: one [R, G, B] per class")
    return [tuple(int(v) for v in c) for c in palette]


class FolderSegDataset(PairedSegDataset):
    """A user's segmentation data laid out as mmsegmentation lays out a custom dataset.

    Args:
        root: the dataset folder (``data.seg.root``); every other path is relative to it.
        split: split name, substituted for ``{split}`` in ``img_dir`` / ``ann_dir`` / ``ann_file``
            (or looked up in an ``ann_file`` mapping); ``"a+b"`` concatenates splits.
        transform: paired transform ``(PIL image, int64 label (H, W), rng) -> (image, label)``
            (``SegTrainTransform`` / ``SegEvalTransform``); ``None`` = normalise only, native size.
        img_dir, ann_dir: image and label folders (searched recursively when there is no split file).
        img_suffix, seg_map_suffix: file name endings of images (``.jpg``) and labels (``.png``);
            may be longer (``_leftImg8bit.png``), matched case-sensitively.
        ann_file: ``None`` (every image under ``img_dir``), a split file path (may contain
            ``{split}``) or a mapping split name -> split file path.
        classes: class names, or the path of a file with one name per line.
        palette: one ``(R, G, B)`` per class, or ``None``: the palette of the first label when it is
            a palette PNG, else the PASCAL VOC colour map.
        reduce_zero_label: raw label 0 is ignored and ``v`` becomes ``v - 1``.
        ignore_index: label value ignored by loss and metrics (raw value kept as is).
        seed: base seed of the augmentation RNG (per item: ``(seed, epoch, index)``).

    Items:
        ``(image, label)``: ``float32 (3, h, w)`` normalised image and ``int64 (h, w)`` labels in
        ``0..num_classes-1`` or ``ignore_index``.

    Raises:
        DataError: at construction: missing root / image or label folder, missing or unreadable
            split file or classes file, a malformed split line, an image without its label (or, with
            no split file, a label without its image), an empty split, an unknown split in an
            ``ann_file`` mapping, a bad palette or an ``ignore_index`` that is a class id; at item
            access (and in :meth:`validate`): corrupt image or label, multi-channel label,
            image/label size mismatch, a label value outside the classes that is not
            ``ignore_index``. Every message names the file, folder or key and the value.
    """

    DATASET = "folder dataset"

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable | None,
        *,
        classes: str | Path | Sequence[str],
        img_dir: str = "images",
        ann_dir: str = "labels",
        img_suffix: str = ".jpg",
        seg_map_suffix: str = ".png",
        ann_file: str | Mapping[str, str] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        reduce_zero_label: bool = False,
        ignore_index: int = 255,
        seed: int = 0,
    ) -> None:
        if not Path(root).is_dir():
            raise DataError(f"folder dataset root (data.seg.root) does not exist or is not a folder: {root}")
        for key, val in (("img_dir", img_dir), ("ann_dir", ann_dir), ("img_suffix", img_suffix),
                         ("seg_map_suffix", seg_map_suffix)):
            if not isinstance(val, str) or not val:
                raise DataError(f"{_K}{key}={val!r}: must be a non-empty string")
        self.img_dir, self.ann_dir = img_dir, ann_dir
        self.img_suffix, self.seg_map_suffix = img_suffix, seg_map_suffix
        self.ann_file = ann_file
        self.reduce_zero_label = bool(reduce_zero_label)
        self.CLASSES = read_classes(classes, root)
        self.num_classes = len(self.CLASSES)
        C, ign = self.num_classes, int(ignore_index)
        if not 0 <= ign <= 65535:
            raise DataError(f"data.seg.ignore_index={ign}: must be in [0, 65535] (a label value, usually 255)")
        if (not self.reduce_zero_label and 0 <= ign < C) or (self.reduce_zero_label and 1 <= ign <= C):
            cls = ign - 1 if self.reduce_zero_label else ign
            raise DataError(f"data.seg.ignore_index={ign} is the label of class {cls} ({self.CLASSES[cls]!r}) of "
                            f"the {C} classes: choose a value that no class uses (usually 255)")
        if self.reduce_zero_label:
            self.LABEL_VALUES = (f"0 (ignored: reduce_zero_label), 1..{C} (classes 0..{C - 1} of "
                                 f"{_K}classes) or {ign} (data.seg.ignore_index)")
        else:
            self.LABEL_VALUES = f"class ids 0..{C - 1} ({C} classes in {_K}classes) or {ign} (data.seg.ignore_index)"
        super().__init__(root, split, transform, ignore_index=ign, seed=seed)
        self.PALETTE = _palette(palette, C) if palette is not None else self._default_palette()

    @classmethod
    def from_config(cls, seg: Mapping, split: str, transform: Callable | None, seed: int = 0) -> "FolderSegDataset":
        """Build from a ``data.seg`` mapping (``root``, ``ignore_index`` and the ``folder`` sub-mapping;
        missing folder keys take :data:`FOLDER_DEFAULTS`).

        Raises:
            DataError: see the class; also a ``folder`` value that is not a mapping or holds unknown keys.
        """
        root = seg.get("root")
        if not root:
            raise DataError("data.seg.root is required for the folder dataset (the folder holding img_dir and ann_dir)")
        ignore_index = seg.get("ignore_index")
        return cls(root, split, transform, ignore_index=255 if ignore_index is None else int(ignore_index),
                   seed=seed, **folder_options(seg))

    # ------------------------------------------------------------------ PairedSegDataset hooks
    def raw_to_class(self) -> np.ndarray:
        C, ign = self.num_classes, self.ignore_index
        if self.reduce_zero_label:
            return self.make_lut(max(C + 1, ign + 1), {v: v - 1 for v in range(1, C + 1)}, ignore=(0, ign))
        return self.make_lut(max(C, ign + 1), {v: v for v in range(C)}, ignore=(ign,))

    def find_pairs(self, split: str) -> list[tuple[Path, Path]]:
        img_dir = self.root / _sub(self.img_dir, split)
        ann_dir = self.root / _sub(self.ann_dir, split)
        ann_file = self._split_file(split)
        for key, folder in (("img_dir", img_dir), ("ann_dir", ann_dir)):
            if not folder.is_dir():
                raise DataError(f"{_K}{key}={getattr(self, key)!r}: folder does not exist: {folder} (split={split!r})")
        if img_dir.resolve() == ann_dir.resolve() and self.img_suffix == self.seg_map_suffix:
            raise DataError(f"{_K}img_dir and ann_dir are the same folder {img_dir} and img_suffix == seg_map_suffix "
                            f"== {self.img_suffix!r}: images and labels cannot be told apart")
        if ann_file is not None:
            return self._pairs_from_file(ann_file, img_dir, ann_dir, split)
        return self._pairs_from_folder(img_dir, ann_dir, split)

    # ------------------------------------------------------------------ helpers
    def _split_file(self, split: str) -> Path | None:
        af = self.ann_file
        if af is None:
            return None
        if isinstance(af, Mapping):
            if split not in af:
                raise DataError(f"{_K}ann_file has no split file for split {split!r} (splits given: {sorted(af)})")
            af = af[split]
        if not isinstance(af, (str, Path)) or not str(af):
            raise DataError(f"{_K}ann_file={self.ann_file!r}: must be null, a path or a mapping split -> path")
        path = self.root / _sub(str(af), split)
        if not path.is_file():
            raise DataError(f"{_K}ann_file: split file of split {split!r} does not exist: {path}")
        return path

    def _pairs_from_file(self, ann_file: Path, img_dir: Path, ann_dir: Path, split: str) -> list[tuple[Path, Path]]:
        pairs: list[tuple[Path, Path]] = []
        for lineno, line in enumerate(read_list_file(ann_file, "split file"), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{ann_file}:{lineno}"
            if len(line.split()) != 1:
                raise DataError(f"{where}: expected one id per line (a file name under {_K}img_dir without "
                                f"img_suffix), got {line!r}")
            ident = line[: -len(self.img_suffix)] if line.endswith(self.img_suffix) else line
            img, lab = img_dir / f"{ident}{self.img_suffix}", ann_dir / f"{ident}{self.seg_map_suffix}"
            if not img.is_file():
                raise DataError(f"{where}: image of id {ident!r} does not exist: {img}")
            if not lab.is_file():
                raise DataError(f"{where}: label of id {ident!r} does not exist: {lab} (image {img})")
            pairs.append((img, lab))
        if not pairs:
            raise DataError(f"folder dataset split {split!r} is empty: split file {ann_file} lists no id")
        return pairs

    def _pairs_from_folder(self, img_dir: Path, ann_dir: Path, split: str) -> list[tuple[Path, Path]]:
        same = img_dir.resolve() == ann_dir.resolve()
        files = _walk(img_dir, "image (data.seg.folder.img_dir)")
        images = [f for f in files if f.endswith(self.img_suffix)
                  and not (same and f.endswith(self.seg_map_suffix) and self.seg_map_suffix.endswith(self.img_suffix))]
        labels = {f for f in (files if same else _walk(ann_dir, "label (data.seg.folder.ann_dir)"))
                  if f.endswith(self.seg_map_suffix)
                  and not (same and f.endswith(self.img_suffix) and self.img_suffix.endswith(self.seg_map_suffix))}
        if not images:
            found = sorted({os.path.splitext(f)[1] for f in files})
            raise DataError(f"folder dataset split {split!r} is empty: no file ending {self.img_suffix!r} "
                            f"({_K}img_suffix) under {img_dir} (file endings found: {found or 'none'})")
        ids, pairs = set(), []
        for f in images:
            ident = f[: -len(self.img_suffix)]
            ids.add(ident)
            lab = f"{ident}{self.seg_map_suffix}"
            if lab not in labels:
                raise DataError(f"missing label for image {img_dir / f}: expected {ann_dir / lab} "
                                f"({_K}ann_dir + {_K}seg_map_suffix)")
            pairs.append((img_dir / f, ann_dir / lab))
        # labels without images: an error unless the label folder is shared by splits whose images are not
        orphans = sorted(f for f in labels if f[: -len(self.seg_map_suffix)] not in ids) \
            if "{split}" in self.ann_dir or "{split}" not in self.img_dir else []
        if orphans:
            raise DataError(f"label {ann_dir / orphans[0]} has no image: expected "
                            f"{img_dir / (orphans[0][: -len(self.seg_map_suffix)] + self.img_suffix)}"
                            + (f" ({len(orphans) - 1} more labels without images)" if len(orphans) > 1 else ""))
        return pairs

    def _default_palette(self) -> list[tuple[int, int, int]]:
        """The first label's own palette when it is a palette PNG, else the VOC colour map."""
        try:
            with Image.open(self.pairs[0][1]) as im:
                pal = im.getpalette() if im.mode == "P" else None
        except (OSError, SyntaxError, ValueError):
            pal = None  # a corrupt label is reported (with its name) when it is read
        C = self.num_classes
        if pal and len(pal) >= 3 * (C + self.reduce_zero_label):
            off = 3 if self.reduce_zero_label else 0  # reduce_zero_label: class c is palette index c + 1
            return [tuple(pal[off + 3 * c: off + 3 * c + 3]) for c in range(C)]
        return voc_palette(C + 1)[1:] if self.reduce_zero_label else voc_palette(C)

    def load_pair(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """Load and check pair ``index`` without any transform.

        Returns:
            ``(RGB PIL image, int64 label (H, W))``, labels in ``0..num_classes-1`` or ``ignore_index``.

        Raises:
            DataError: corrupt image/label, multi-channel label, size mismatch or a label value
                outside the classes that is not ``ignore_index``; the message names the file(s).
        """
        image, raw, lab_path = self.read_pair(index)
        if raw.dtype == bool:  # mode "1" (bilevel) PNGs
            raw = raw.astype(np.uint8)
        return image, self.map_label(raw, lab_path)

    def check_uniform_label_size(self, key: str = "data.seg.eval_batch_size") -> None:
        """Check that every label has the same size (PNG headers only; nothing is decoded).

        Evaluation keeps each label at its native resolution, so a batch of several images can only
        be stacked when they agree.

        Raises:
            DataError: two labels of different sizes (both named, with ``key``), or an unreadable label.
        """
        first = None
        for _, lab in self.pairs:
            try:
                with Image.open(lab) as im:
                    size = im.size
            except (OSError, SyntaxError, ValueError) as e:
                raise DataError(f"cannot read label {lab}: {type(e).__name__}: {e}") from e
            if first is None:
                first = (lab, size)
            elif size != first[1]:
                raise DataError(
                    f"split {self.split!r} has labels of different sizes ({first[0]} is {first[1][0]}x{first[1][1]}, "
                    f"{lab} is {size[0]}x{size[1]}, WxH); evaluation keeps each label's resolution, so its batches "
                    f"cannot hold several images: set {key}: 1")

    def describe(self) -> str:
        return (f"FolderSegDataset(split={self.split}, n={len(self)}, classes={self.num_classes}, root={self.root}, "
                f"img_dir={self.img_dir}, ann_dir={self.ann_dir})")


def _walk(folder: Path, what: str) -> list[str]:
    """Files under ``folder`` (recursively, links followed) as sorted POSIX paths relative to it.

    Raises:
        DataError: missing or unlistable folder (named).
    """
    scan_dir(folder, what)  # DataError naming a missing / unlistable folder
    out: list[str] = []
    errors: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=errors.append):
        dirnames.sort()
        rel = Path(dirpath).relative_to(folder)
        out += [(rel / f).as_posix() for f in filenames]
    if errors:
        e = errors[0]
        raise DataError(f"cannot list {what} folder {getattr(e, 'filename', folder)}: {type(e).__name__}: {e}")
    return sorted(out)


def folder_options(seg: Mapping) -> dict[str, Any]:
    """The ``data.seg.folder`` mapping of ``seg`` merged over :data:`FOLDER_DEFAULTS`.

    Raises:
        DataError: ``folder`` is not a mapping, or holds a key that is not in :data:`FOLDER_DEFAULTS`.
    """
    given = seg.get("folder") or {}
    if not isinstance(given, Mapping):
        raise DataError(f"data.seg.folder={given!r}: must be a mapping (keys: {', '.join(FOLDER_DEFAULTS)})")
    unknown = sorted(set(given) - set(FOLDER_DEFAULTS))
    if unknown:
        raise DataError(f"data.seg.folder: unknown keys {unknown} (keys: {', '.join(FOLDER_DEFAULTS)})")
    return {**FOLDER_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}


def folder_config_problems(cfg: Mapping) -> list[str]:
    """Problems of the ``data.seg.folder`` keys of a full config, as ``"key=value: message"`` lines
    (no file is read; the files are checked when the dataset is built).

    The keys' types are checked for every dataset; that ``classes`` is given, that the splits can be
    told apart and that ``ignore_index`` is not a class id only for ``data.seg.name: folder``.
    """
    seg = cfg["data"]["seg"]
    f = seg.get("folder")
    if not isinstance(f, Mapping):
        return []  # reported by the config's section-shape check
    bad: list[str] = []

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            bad.append(f"{_K}{key}={f.get(key)!r}: {msg}")

    text = lambda v: isinstance(v, str) and v != ""  # noqa: E731
    for key in ("img_dir", "ann_dir"):
        need(text(f.get(key)), key, "must be a folder relative to data.seg.root (may contain {split})")
    for key in ("img_suffix", "seg_map_suffix"):
        need(text(f.get(key)), key, "must be a non-empty file name ending, e.g. '.jpg' or '.png'")
    af = f.get("ann_file")
    af_ok = af is None or text(af) or (isinstance(af, Mapping) and len(af) > 0
                                       and all(text(k) and text(v) for k, v in af.items()))
    need(af_ok, "ann_file", "must be null (every image of img_dir), a split file relative to data.seg.root (may "
                            "contain {split}) or a mapping split -> split file")
    cl = f.get("classes")
    cl_list = isinstance(cl, list) and len(cl) > 0 and all(text(c) for c in cl) and len(set(cl)) == len(cl)
    need(cl is None or text(cl) or cl_list, "classes",
         "must be a list of distinct class names or the path of a classes file (one name per line)")
    pal = f.get("palette")
    pal_ok = pal is None or (isinstance(pal, list) and all(
        isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                                                    for v in c) for c in pal))
    need(pal_ok, "palette", "must be null or a list of [R, G, B] (ints 0..255), one per class")
    if pal_ok and pal is not None and cl_list:
        need(len(pal) == len(cl), "palette", f"must have one colour per class ({len(cl)} classes, {len(pal)} colours)")
    need(isinstance(f.get("reduce_zero_label"), bool), "reduce_zero_label", "must be true or false")
    if seg.get("name") != "folder":
        return bad
    need(cl is not None, "classes", "is required for data.seg.name: folder (a list of names or a classes file)")
    ign = seg.get("ignore_index")
    if cl_list and isinstance(ign, int):
        C, rz = len(cl), f.get("reduce_zero_label") is True
        if (not rz and 0 <= ign < C) or (rz and 1 <= ign <= C):
            bad.append(f"data.seg.ignore_index={ign!r}: is the label value of class {ign - rz} ({cl[ign - rz]!r}); "
                       "choose a value no class uses (usually 255)")
    splits = {s for s in (seg.get("train_split"), seg.get("eval_split"), (cfg.get("eval") or {}).get("split"))
              if isinstance(s, str) and s}
    if not af_ok:
        return bad
    if isinstance(af, Mapping):
        for s in sorted(splits):
            for part in s.split("+"):
                need(part.strip() in af, "ann_file",
                     f"has no split file for split {part.strip()!r} (data.seg.train_split / eval_split / eval.split)")
    elif len(splits) > 1:
        if "{split}" not in str(af if af is not None else f.get("img_dir")):
            what = (f"{_K}ann_file={af!r} (one file)" if af is not None
                    else f"every image of {_K}img_dir={f.get('img_dir')!r} (no ann_file)")
            bad.append(f"data.seg.train_split={seg.get('train_split')!r}, eval_split={seg.get('eval_split')!r}: both "
                       f"splits would read {what}: set {_K}ann_file to splits/{{split}}.txt (or a mapping split -> "
                       "file), or put {split} in img_dir (and ann_dir)")
    return bad
