"""ADE20K scene parsing, SceneParsing challenge release (``data.seg.name: ade20k``).

Layout (``root`` is ``ADEChallengeData2016/`` or the folder holding it)::

    ADEChallengeData2016/
        images/training/ADE_train_<8 digits>.jpg         20,210 RGB images (sizes vary)
        images/validation/ADE_val_<8 digits>.jpg          2,000
        annotations/training/ADE_train_<8 digits>.png    mode L, values 0..150
        annotations/validation/ADE_val_<8 digits>.png

Label value 0 is "other objects" and is ignored; value ``v`` in ``1..150`` becomes class ``v - 1``
(mmsegmentation's ``reduce_zero_label``). Class names and palette are mmsegmentation's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import DataError
from .paired import PairedSegDataset, scan_dir

__all__ = ["ADE20K"]

_IMAGE_EXTS = (".jpg", ".jpeg")


class ADE20K(PairedSegDataset):
    """ADE20K (SceneParsing 150 classes), label 0 ignored, ``v -> v - 1`` otherwise.

    Args:
        root: ``ADEChallengeData2016/`` or its parent.
        split: ``"train"`` / ``"training"`` or ``"val"`` / ``"validation"`` (or any sub-folder of
            ``images/``); ``"a+b"`` concatenates.
        transform, ignore_index, seed: see :class:`~segprune.data.paired.PairedSegDataset`.

    Raises:
        DataError: missing ``images/<split>`` or ``annotations/<split>`` folder, an image
            without its ``.png`` annotation or an annotation without its image (message names
            both paths), empty split; at item access, as :class:`PairedSegDataset` (raw values
            must be 0..150).
    """

    DATASET = "ADE20K"
    CLASSES: tuple[str, ...] = (
        "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
        "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
        "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
        "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
        "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
        "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
        "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
        "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
        "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
        "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
        "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
        "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
        "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
        "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
        "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
        "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
        "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
        "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
    )
    PALETTE: list[tuple[int, int, int]] = [
        (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
        (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
        (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
        (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
        (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
        (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
        (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
        (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
        (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
        (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
        (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
        (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
        (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
        (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
        (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
        (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
        (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
        (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
        (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
        (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
        (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
        (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
        (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
        (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
        (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
    ]
    num_classes: int = 150
    LABEL_VALUES = "ADE20K values 0..150 (0 = other, ignored)"
    SPLIT_ALIASES = {"train": ("training",), "val": ("validation",)}

    def resolve_root(self, root: Path) -> Path:
        """``root`` if it holds ``images/``, else ``root/ADEChallengeData2016``."""
        for cand in (root, root / "ADEChallengeData2016"):
            if (cand / "images").is_dir() and (cand / "annotations").is_dir():
                return cand
        raise DataError(
            f"no ADE20K folder under {root}: expected {root / 'images'} and {root / 'annotations'} "
            f"(or the same under {root / 'ADEChallengeData2016'})"
        )

    def raw_to_class(self) -> np.ndarray:
        return self.make_lut(151, {v: v - 1 for v in range(1, 151)}, ignore=(0,))

    def find_pairs(self, split: str) -> list[tuple[Path, Path]]:
        folder = self._split_candidates(split)[0]
        img_dir, lab_dir = self.root / "images" / folder, self.root / "annotations" / folder
        images = [e.name for e in scan_dir(img_dir, f"ADE20K image split {split!r}")
                  if e.is_file() and e.name.lower().endswith(_IMAGE_EXTS)]
        labels = {e.name for e in scan_dir(lab_dir, f"ADE20K annotation split {split!r}")
                  if e.is_file() and e.name.endswith(".png")}
        stems = set()
        pairs: list[tuple[Path, Path]] = []
        for name in images:
            stem = name.rsplit(".", 1)[0]
            stems.add(stem)
            if f"{stem}.png" not in labels:
                raise DataError(f"missing ADE20K annotation for image {img_dir / name}: expected {lab_dir / (stem + '.png')}")
            pairs.append((img_dir / name, lab_dir / f"{stem}.png"))
        orphans = sorted(n for n in labels if n[:-4] not in stems)
        if orphans:
            raise DataError(
                f"ADE20K annotation {lab_dir / orphans[0]} has no image: expected {img_dir / (orphans[0][:-4] + '.jpg')}"
                + (f" ({len(orphans) - 1} more annotations without images)" if len(orphans) > 1 else "")
            )
        return pairs
