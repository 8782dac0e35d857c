"""Cityscapes fine annotations, 19 evaluation classes (``data.seg.name: cityscapes``).

Layout (``root`` holds both folders, as unpacked from ``leftImg8bit_trainvaltest.zip`` and
``gtFine_trainvaltest.zip``)::

    <root>/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png   2048x1024 RGB
    <root>/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png    2048x1024, mode L

Only ``*_gtFine_labelIds.png`` is read (``_color``, ``_instanceIds``, ``_polygons.json`` and
``_labelTrainIds`` files are ignored). Splits: ``train`` (= ``train_fine``, 2,975 images, 18
cities), ``val`` (500, 3 cities), ``test`` (1,525; its public labels are void). The 34 label ids
``0..33`` are mapped to the 19 train ids of ``cityscapesscripts/helpers/labels.py``
(:data:`LABEL_ID_TO_TRAIN_ID`); the 15 ids with train id 255 become ``ignore_index``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import DataError
from .paired import PairedSegDataset, scan_dir

__all__ = ["Cityscapes", "LABEL_ID_TO_TRAIN_ID"]

#: Cityscapes ``labelId -> trainId`` for the 19 evaluated classes (cityscapesScripts
#: ``labels.py``); every other id in ``0..33`` (unlabeled, ego vehicle, rectification border,
#: out of roi, static, dynamic, ground, parking, rail track, guard rail, bridge, tunnel,
#: polegroup, caravan, trailer) is ignored.
LABEL_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

_IMG_SUFFIX = "_leftImg8bit.png"
_LAB_SUFFIX = "_gtFine_labelIds.png"


class Cityscapes(PairedSegDataset):
    """Cityscapes ``gtFine`` with label ids mapped to the 19 train ids, others ignored.

    Args:
        root: folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``"train"`` (alias ``"train_fine"``), ``"val"`` (``"val_fine"``), ``"test"``, or
            any sub-folder of ``leftImg8bit/``; ``"train+val"`` concatenates (the paper's
            protocol for the test server).
        transform, ignore_index, seed: see :class:`~segprune.data.paired.PairedSegDataset`.

    Raises:
        DataError: missing ``leftImg8bit/`` or ``gtFine/`` split folder, an unlistable city
            folder, an image without its ``_gtFine_labelIds.png`` or a label without its
            image (message names the file and the expected partner), an empty split; at item
            access, as :class:`PairedSegDataset` (label ids must be 0..33).
    """

    DATASET = "Cityscapes"
    CLASSES: tuple[str, ...] = (
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
        "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
        "motorcycle", "bicycle",
    )
    PALETTE: list[tuple[int, int, int]] = [
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
        (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
        (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ]
    num_classes: int = 19
    LABEL_VALUES = "Cityscapes label ids 0..33"
    SPLIT_ALIASES = {"train_fine": ("train",), "val_fine": ("val",), "test_fine": ("test",)}

    def resolve_root(self, root: Path) -> Path:
        """``root`` itself; it must hold ``leftImg8bit/`` and ``gtFine/``."""
        missing = [str(root / d) for d in ("leftImg8bit", "gtFine") if not (root / d).is_dir()]
        if missing:
            raise DataError(f"Cityscapes root {root} lacks {' and '.join(missing)}")
        return root

    def raw_to_class(self) -> np.ndarray:
        return self.make_lut(34, LABEL_ID_TO_TRAIN_ID, ignore=tuple(i for i in range(34) if i not in LABEL_ID_TO_TRAIN_ID))

    def find_pairs(self, split: str) -> list[tuple[Path, Path]]:
        folder = self._split_candidates(split)[0]
        img_split, lab_split = self.root / "leftImg8bit" / folder, self.root / "gtFine" / folder
        img_cities = [e.name for e in scan_dir(img_split, f"Cityscapes image split {split!r}") if e.is_dir()]
        lab_cities = {e.name for e in scan_dir(lab_split, f"Cityscapes label split {split!r}") if e.is_dir()}
        pairs: list[tuple[Path, Path]] = []
        for city in img_cities:
            images = [e.name for e in scan_dir(img_split / city, "Cityscapes city") if e.name.endswith(_IMG_SUFFIX)]
            if city not in lab_cities:
                if images:
                    raise DataError(
                        f"Cityscapes city {city!r} has images in {img_split / city} but no label folder "
                        f"{lab_split / city} (first image: {images[0]})"
                    )
                continue
            labels = {e.name for e in scan_dir(lab_split / city, "Cityscapes city") if e.name.endswith(_LAB_SUFFIX)}
            stems = {n[: -len(_IMG_SUFFIX)] for n in images}
            for name in images:
                stem = name[: -len(_IMG_SUFFIX)]
                if stem + _LAB_SUFFIX not in labels:
                    raise DataError(
                        f"missing Cityscapes label for image {img_split / city / name}: expected "
                        f"{lab_split / city / (stem + _LAB_SUFFIX)}"
                    )
                pairs.append((img_split / city / name, lab_split / city / (stem + _LAB_SUFFIX)))
            orphans = sorted(n for n in labels if n[: -len(_LAB_SUFFIX)] not in stems)
            if orphans:
                raise DataError(
                    f"Cityscapes label {lab_split / city / orphans[0]} has no image: expected "
                    f"{img_split / city / (orphans[0][: -len(_LAB_SUFFIX)] + _IMG_SUFFIX)}"
                    + (f" ({len(orphans) - 1} more labels without images)" if len(orphans) > 1 else "")
                )
        for city in sorted(lab_cities - set(img_cities)):
            labels = [e.name for e in scan_dir(lab_split / city, "Cityscapes city") if e.name.endswith(_LAB_SUFFIX)]
            if labels:
                raise DataError(
                    f"Cityscapes label {lab_split / city / labels[0]} has no image: city folder "
                    f"{img_split / city} does not exist"
                )
        return pairs
