"""Lay out CamVid as a user's own folder dataset (``data.seg.name: folder``), outside the repository.

CamVid (../shared/data/camvid, SegNet's 11-class version) stands in for "your own data": this script
writes the layout of docs/datasets.md, "Your own data"::

    <out>/images/<stem>.jpg        the CamVid JPEGs (symbolic links, or copies with --copy)
    <out>/labels/<stem>.png        palette PNGs (mode P): index = class 0..10, 255 = void (ignored);
                                   the palette holds the CamVid colours (with --label-mode L: grey PNGs)
    <out>/splits/{train,val,test}.txt    one id (file stem) per line, in CamVid's list order
    <out>/classes.txt              one class name per line (Sky, Building, ..., Bicyclist)

The only change to the data: CamVid's void label 11 becomes 255, the usual ``ignore_index``. Then::

    python examples/camvid_as_folder.py /tmp/camvid_folder
    segprune run configs/folder_camvid_example.yaml --out runs/folder_camvid

trains and prunes exactly as ``data.seg.name: camvid`` would (same images, order and labels).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["CLASSES", "PALETTE", "VOID", "layout", "main"]

#: SegNet CamVid classes and colours (../shared/data/camvid/classes.txt); raw label 11 is void.
CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
           "Bicyclist")
PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
           (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]
VOID = 11
REPO = Path(__file__).resolve().parents[1]


def _pairs(camvid: Path, split: str) -> list[tuple[Path, Path]]:
    """CamVid's ``<split>.txt``: ``(image, label)`` paths, in list order."""
    out = []
    for line in (camvid / f"{split}.txt").read_text().splitlines():
        if line.strip():
            img, lab = line.split()
            out.append((camvid / img, camvid / lab))
    return out


def layout(camvid: str | Path, out: str | Path, splits=("train", "val", "test"), limit: int | None = None,
           copy: bool = False, label_mode: str = "P") -> Path:
    """Write the folder-dataset layout of ``camvid`` into ``out`` (created; must be empty or absent).

    Args:
        camvid: the CamVid folder (``train.txt``, ``train/``, ``trainannot/``, ...).
        out: the new dataset folder.
        splits: CamVid splits to write, each as ``splits/<split>.txt``.
        limit: the first ``limit`` images of each split only (tests), ``None`` = all.
        copy: copy the JPEGs instead of linking them.
        label_mode: ``"P"`` (palette PNG, the index is the class) or ``"L"`` (greyscale PNG).

    Returns:
        ``out`` as a :class:`Path`.

    Raises:
        FileNotFoundError: no CamVid list file for a split.
        FileExistsError: ``out`` exists and is not empty.
        ValueError: an unknown ``label_mode``, or raw label values other than 0..11.
    """
    camvid, out = Path(camvid).resolve(), Path(out)
    if label_mode not in ("P", "L"):
        raise ValueError(f"label_mode must be 'P' or 'L', got {label_mode!r}")
    for s in splits:
        if not (camvid / f"{s}.txt").is_file():
            raise FileNotFoundError(f"no CamVid split list {camvid / (s + '.txt')}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: choose a new folder")
    for d in ("images", "labels", "splits"):
        (out / d).mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    palette = [v for rgb in PALETTE for v in rgb] + [0, 0, 0] * (256 - len(PALETTE))  # 255 (void): black
    lut = np.arange(256, dtype=np.uint8)
    lut[VOID] = 255
    for s in splits:
        ids = []
        for img, lab in _pairs(camvid, s)[:limit]:
            stem = img.stem
            ids.append(stem)
            dst = out / "images" / img.name
            if copy:
                shutil.copyfile(img, dst)
            else:
                os.symlink(img, dst)
            with Image.open(lab) as im:
                raw = np.array(im)
            if raw.ndim != 2 or int(raw.max()) > VOID:
                raise ValueError(f"{lab}: expected a single-channel label with values 0..{VOID}")
            arr = np.ascontiguousarray(lut[raw])
            label = Image.frombytes(label_mode, (arr.shape[1], arr.shape[0]), arr.tobytes())
            if label_mode == "P":  # the stored index is the class; the palette only colours it
                label.putpalette(palette)
            label.save(out / "labels" / f"{stem}.png")
        (out / "splits" / f"{s}.txt").write_text("\n".join(ids) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="new dataset folder, outside the repository or under its gitignored runs/ "
                                "(e.g. /tmp/camvid_folder)")
    ap.add_argument("--camvid", default=str(REPO.parent / "shared" / "data" / "camvid"),
                    help="CamVid folder (default: ../shared/data/camvid beside the repository)")
    ap.add_argument("--copy", action="store_true", help="copy the images instead of linking them")
    ap.add_argument("--label-mode", choices=("P", "L"), default="P", help="palette (P, default) or grey (L) PNGs")
    ap.add_argument("--limit", type=int, default=None, help="first N images of each split only")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    runs = REPO / "runs"  # gitignored: run folders and local data may live there
    if (out == REPO or REPO in out.parents) and runs not in out.parents:
        print(f"error: {out} is inside the repository {REPO} (outside its gitignored runs/): write your data "
              "elsewhere", file=sys.stderr)
        return 2
    try:
        layout(args.camvid, out, limit=args.limit, copy=args.copy, label_mode=args.label_mode)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = {s: len((out / "splits" / f"{s}.txt").read_text().split()) for s in ("train", "val", "test")}
    print(f"wrote {out}: images/, labels/ ({args.label_mode} PNGs), splits/ {n}, classes.txt ({len(CLASSES)} classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
