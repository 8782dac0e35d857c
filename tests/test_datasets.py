"""PASCAL VOC (+SBD), Cityscapes, ADE20K and ImageNet-layout loaders on tiny fixture trees that
mimic each on-disk layout exactly (16x24 images)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segprune.data import (
    ADE20K,
    SEG_DATASET_NAMES,
    Cityscapes,
    ImageFolderDataset,
    SegEvalTransform,
    VOCSegmentation,
    build_cls_dataset,
    build_seg_dataset,
    seg_num_classes,
)
from segprune.data.cityscapes import LABEL_ID_TO_TRAIN_ID
from segprune.data.paired import voc_palette

H, W = 16, 24


def _img(path: Path, seed: int, hw=(H, W), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path, format="PNG" if path.suffix == ".png" else "JPEG")


def _label(path: Path, arr: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    im = Image.frombytes(mode, (arr.shape[1], arr.shape[0]), arr.tobytes())
    if mode == "P":  # VOC's own SegmentationClass PNGs: palette indices = class ids
        im.putpalette([c for rgb in voc_palette(256) for c in rgb])
    im.save(path)


from test_data import _expect_data_error as _err  # noqa: E402  (asserts a DataError naming every needle)


# --------------------------------------------------------------------------- PASCAL VOC + SBD

VOC_TRAIN_AUG = ["2007_000032", "2007_000039", "2008_000002", "2011_003276"]
VOC_TRAIN = ["2007_000032", "2007_000039"]
VOC_VAL = ["2007_000033", "2010_001079"]


def voc_label(i: int) -> np.ndarray:
    lab = np.zeros((H, W), np.uint8)          # background
    lab[4:12, 6:18] = 1 + i % 20                # an object
    lab[3, 5:19] = 255                          # its boundary (ignored)
    return lab


def make_voc(base: Path, aug: bool = True, plain: bool = True) -> Path:
    """``base/VOCdevkit/VOC2012`` with JPEGImages, SegmentationClassAug (mode L, train_aug + val),
    SegmentationClass (palette PNGs, train + val) and the three list files."""
    voc = base / "VOCdevkit" / "VOC2012"
    ids = sorted(set(VOC_TRAIN_AUG + VOC_VAL))
    for i, s in enumerate(ids):
        _img(voc / "JPEGImages" / f"{s}.jpg", i)
        if aug:
            _label(voc / "SegmentationClassAug" / f"{s}.png", voc_label(i))
        if plain and s in VOC_TRAIN + VOC_VAL:
            _label(voc / "SegmentationClass" / f"{s}.png", voc_label(i), mode="P")
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    for name, split in (("train_aug", VOC_TRAIN_AUG), ("train", VOC_TRAIN), ("val", VOC_VAL)):
        if name == "train_aug" and not aug:
            continue
        (lists / f"{name}.txt").write_text("\n".join(split) + "\n")
    return voc


def test_voc_sbd_split_sizes_roots_and_mapping(tmp_path):
    voc = make_voc(tmp_path)
    for root in (tmp_path, tmp_path / "VOCdevkit", voc):  # any of the three accepted roots
        assert len(VOCSegmentation(root, "train_aug", None)) == 4
    assert len(VOCSegmentation(tmp_path, "trainaug", None)) == 4  # alias
    assert len(VOCSegmentation(tmp_path, "val", None)) == 2
    assert len(VOCSegmentation(tmp_path, "train", None)) == 2
    assert len(VOCSegmentation(tmp_path, "train_aug+val", None)) == 6
    ds = VOCSegmentation(tmp_path, "train_aug", SegEvalTransform(None), ignore_index=254)
    assert all(lab.parent.name == "SegmentationClassAug" for _, lab in ds.pairs)
    img, lab = ds[2]
    assert img.shape == (3, H, W) and img.dtype == torch.float32
    assert lab.shape == (H, W) and lab.dtype == torch.int64
    raw = voc_label(sorted(set(VOC_TRAIN_AUG + VOC_VAL)).index("2008_000002"))  # make_voc's numbering
    expected = np.where(raw == 255, 254, raw)
    assert torch.equal(lab, torch.from_numpy(expected.astype(np.int64)))
    assert set(lab.unique().tolist()) == {0, int(raw[8, 10]), 254}
    assert ds.num_classes == 21 == len(ds.CLASSES) == len(ds.PALETTE) == seg_num_classes({"name": "voc_sbd"})
    assert ds.CLASSES[0] == "background" and ds.CLASSES[20] == "tvmonitor"
    assert ds.PALETTE[:3] == [(0, 0, 0), (128, 0, 0), (0, 128, 0)] and ds.PALETTE[20] == (0, 64, 128)
    ds.validate()


def test_voc_plain_segmentation_class_palette_pngs(tmp_path):
    make_voc(tmp_path, aug=False)
    ds = VOCSegmentation(tmp_path, "train", None)
    assert len(ds) == 2 and all(lab.parent.name == "SegmentationClass" for _, lab in ds.pairs)
    with Image.open(ds.pairs[0][1]) as im:
        assert im.mode == "P"  # palette indices are the labels, not the colours
    _, lab = ds.load_pair(0)
    assert np.array_equal(lab, voc_label(0).astype(np.int64))
    _err(lambda: VOCSegmentation(tmp_path, "train_aug", None), "train_aug.txt", "train.txt", "val.txt")


def test_voc_deeplab_two_column_list(tmp_path):
    voc = make_voc(tmp_path)
    (voc / "ImageSets" / "Segmentation" / "pairs.txt").write_text(
        "/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n")
    ds = VOCSegmentation(voc, "pairs", None)
    assert ds.pairs == [(voc / "JPEGImages" / "2007_000032.jpg", voc / "SegmentationClassAug" / "2007_000032.png")]


def test_voc_bad_inputs(tmp_path):
    voc = make_voc(tmp_path)
    _err(lambda: VOCSegmentation(tmp_path / "nope", "val", None), "nope")
    _err(lambda: VOCSegmentation(voc / "JPEGImages", "val", None), "JPEGImages")  # no VOC folder there
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n2099_999999\n")
    _err(lambda: VOCSegmentation(tmp_path, "val", None), "val.txt:2", "2099_999999.jpg")
    _img(voc / "JPEGImages" / "2099_999999.jpg", 0)
    _err(lambda: VOCSegmentation(tmp_path, "val", None), "val.txt:2", "2099_999999.png")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    _err(lambda: VOCSegmentation(tmp_path, "val", None), "empty")
    ds = VOCSegmentation(tmp_path, "train", None)
    bad = voc_label(0)
    bad[0, 0] = 21
    _label(ds.pairs[1][1], bad)
    _err(lambda: ds[1], ds.pairs[1][1].name, "21")
    _err(ds.validate, ds.pairs[1][1].name)
    ds[0]


# --------------------------------------------------------------------------- Cityscapes

#: labelId -> trainId as listed in cityscapesScripts/helpers/labels.py (independent of the table
#: in segprune.data.cityscapes): ids 0..33.
CS_TRAIN_IDS = [255, 255, 255, 255, 255, 255, 255, 0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5,
                255, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 255, 255, 16, 17, 18]
CS_SPLITS = {"train": {"aachen": 2, "bochum": 2}, "val": {"frankfurt": 2}}


def cs_label(k: int) -> np.ndarray:
    lab = np.full((H, W), 7, np.uint8)   # road
    lab[0, :] = np.arange(W) % 34          # every label id appears in the first rows
    lab[1, :10] = np.arange(24, 34)
    lab[8:, :] = 26 if k % 2 == 0 else 0  # car / unlabeled
    return lab


def make_cityscapes(root: Path) -> Path:
    k = 0
    for split, cities in CS_SPLITS.items():
        for city, n in cities.items():
            for i in range(n):
                stem = f"{city}_{i:06d}_{19 + i:06d}"
                _img(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", k)
                gt = root / "gtFine" / split / city
                _label(gt / f"{stem}_gtFine_labelIds.png", cs_label(k))
                _img(gt / f"{stem}_gtFine_color.png", k)            # distractors of the real layout
                _label(gt / f"{stem}_gtFine_instanceIds.png", cs_label(k))
                (gt / f"{stem}_gtFine_polygons.json").write_text("{}")
                k += 1
    return root


def test_cityscapes_split_sizes_and_label_mapping(tmp_path):
    root = make_cityscapes(tmp_path / "cityscapes")
    tr = Cityscapes(root, "train", SegEvalTransform(None))
    assert len(tr) == 4 and len(Cityscapes(root, "train_fine", None)) == 4
    assert len(Cityscapes(root, "val", None)) == 2 and len(Cityscapes(root, "train+val", None)) == 6
    assert [p[0].name for p in tr.pairs][:2] == ["aachen_000000_000019_leftImg8bit.png",
                                                  "aachen_000001_000020_leftImg8bit.png"]
    assert all(lab.name.endswith("_gtFine_labelIds.png") for _, lab in tr.pairs)
    assert {k: v for k, v in enumerate(CS_TRAIN_IDS) if v != 255} == LABEL_ID_TO_TRAIN_ID
    img, lab = tr[0]
    assert img.shape == (3, H, W) and lab.shape == (H, W) and lab.dtype == torch.int64
    raw = cs_label(0)
    expected = np.array(CS_TRAIN_IDS)[raw]
    assert torch.equal(lab, torch.from_numpy(expected))
    assert lab[2, 0] == 0           # labelId 7 (road) -> trainId 0
    assert lab[8, 0] == 13          # labelId 26 (car) -> trainId 13
    assert lab[0, 0] == 255         # labelId 0 (unlabeled) -> ignore
    assert lab[1, 9] == 18 and lab[0, 9] == 255  # 33 bicycle -> 18; 9 parking -> ignore
    _, lab1 = tr[1]
    assert (lab1[8:] == 255).all()  # labelId 0 everywhere below
    assert set(lab.unique().tolist()) == set(CS_TRAIN_IDS)
    ds = Cityscapes(root, "train", None, ignore_index=250)
    assert int(ds.load_pair(0)[1][0, 0]) == 250
    assert len(Cityscapes.CLASSES) == len(Cityscapes.PALETTE) == 19 == seg_num_classes({"name": "cityscapes"})
    assert Cityscapes.CLASSES[13] == "car" and Cityscapes.PALETTE[13] == (0, 0, 142)
    tr.validate()


def test_cityscapes_bad_inputs(tmp_path, monkeypatch):
    root = make_cityscapes(tmp_path / "cityscapes")
    _err(lambda: Cityscapes(tmp_path, "train", None), "leftImg8bit", "gtFine")
    _err(lambda: Cityscapes(root, "test", None), root / "leftImg8bit" / "test", "does not exist")  # no such split
    city = root / "gtFine" / "val" / "frankfurt"
    lab = city / "frankfurt_000001_000020_gtFine_labelIds.png"
    lab.rename(lab.with_suffix(".bak"))
    _err(lambda: Cityscapes(root, "val", None), "frankfurt_000001_000020_leftImg8bit.png",
         "frankfurt_000001_000020_gtFine_labelIds.png")  # missing pair
    lab.with_suffix(".bak").rename(lab)
    _label(city / "frankfurt_000009_000001_gtFine_labelIds.png", cs_label(0))
    _err(lambda: Cityscapes(root, "val", None), "frankfurt_000009_000001_gtFine_labelIds.png", "no image")
    (city / "frankfurt_000009_000001_gtFine_labelIds.png").unlink()
    bad = cs_label(0)
    bad[5, 5] = 34
    _label(lab, bad)
    ds = Cityscapes(root, "val", None)
    _err(lambda: ds[1], lab.name, "34", "0..33")
    _err(ds.validate, lab.name)
    _label(lab, np.zeros((H - 1, W), np.uint8))
    _err(lambda: ds[1], "size mismatch", lab.name, "24x15", "24x16")
    (root / "leftImg8bit" / "val" / "frankfurt" / "frankfurt_000000_000019_leftImg8bit.png").write_bytes(b"not a png")
    _err(lambda: ds[0], "frankfurt_000000_000019_leftImg8bit.png")
    # an unlistable folder (permission error; chmod cannot simulate it when running as root)
    real = os.scandir

    def deny(path):
        if Path(path).name == "bochum":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr("segprune.data.base.os.scandir", deny)
    _err(lambda: Cityscapes(root, "train", None), "bochum", "PermissionError")
    monkeypatch.undo()
    for f in (root / "leftImg8bit" / "train").rglob("*.png"):
        f.unlink()
    for f in (root / "gtFine" / "train").rglob("*_labelIds.png"):
        f.unlink()
    _err(lambda: Cityscapes(root, "train", None), "'train'", "empty")


# --------------------------------------------------------------------------- ADE20K

def ade_label(i: int) -> np.ndarray:
    lab = np.zeros((H, W), np.uint8)             # 0 = "other", ignored
    lab[:, 4:] = 1                                # wall
    lab[:, 12:] = 150                             # flag
    lab[2:6, 2:6] = 1 + (17 * i) % 150
    return lab


def make_ade(base: Path, n_train: int = 3, n_val: int = 2) -> Path:
    ade = base / "ADEChallengeData2016"
    for split, prefix, n in (("training", "ADE_train", n_train), ("validation", "ADE_val", n_val)):
        for i in range(n):
            stem = f"{prefix}_{i + 1:08d}"
            _img(ade / "images" / split / f"{stem}.jpg", i, mode="L" if i == 1 else "RGB")  # some are grayscale
            _label(ade / "annotations" / split / f"{stem}.png", ade_label(i))
    return ade


def test_ade20k_split_sizes_and_reduce_zero_label(tmp_path):
    ade = make_ade(tmp_path)
    for root in (tmp_path, ade):
        assert len(ADE20K(root, "train", None)) == 3 and len(ADE20K(root, "training", None)) == 3
        assert len(ADE20K(root, "val", None)) == 2 and len(ADE20K(root, "validation", None)) == 2
    ds = ADE20K(ade, "train", SegEvalTransform(None))
    img, lab = ds[1]  # a grayscale JPEG: converted to RGB
    assert img.shape == (3, H, W) and lab.shape == (H, W) and lab.dtype == torch.int64
    assert lab[0, 0] == 255      # 0 -> ignore
    assert lab[0, 5] == 0        # 1 (wall) -> 0
    assert lab[0, 20] == 149     # 150 (flag) -> 149
    assert lab[3, 3] == 17       # 18 -> 17
    raw = ade_label(1).astype(np.int64)
    assert torch.equal(lab, torch.from_numpy(np.where(raw == 0, 255, raw - 1)))
    assert len(ADE20K.CLASSES) == len(ADE20K.PALETTE) == 150 == seg_num_classes({"name": "ade20k"})
    assert ADE20K.CLASSES[0] == "wall" and ADE20K.CLASSES[149] == "flag" and ADE20K.PALETTE[0] == (120, 120, 120)
    assert len(set(ADE20K.CLASSES)) == 150
    ds.validate()


def test_ade20k_bad_inputs(tmp_path):
    ade = make_ade(tmp_path)
    _err(lambda: ADE20K(ade / "images", "train", None), "annotations")
    ann = ade / "annotations" / "validation" / "ADE_val_00000002.png"
    bad = ade_label(0)
    bad[1, 1] = 151
    _label(ann, bad)
    ds = ADE20K(ade, "val", None)
    _err(lambda: ds[1], "ADE_val_00000002.png", "151")
    Image.new("RGB", (W, H)).save(ann)  # a colour-coded annotation instead of class indices
    _err(lambda: ds[1], "ADE_val_00000002.png", "RGB")
    ann.unlink()
    _err(lambda: ADE20K(ade, "val", None), "ADE_val_00000002.jpg", "ADE_val_00000002.png")  # missing pair
    (ade / "images" / "validation" / "ADE_val_00000002.jpg").unlink()
    _label(ade / "annotations" / "validation" / "ADE_val_00000007.png", ade_label(0))
    _err(lambda: ADE20K(ade, "val", None), "ADE_val_00000007.png", "no image")
    (ade / "images" / "empty").mkdir()
    (ade / "annotations" / "empty").mkdir()
    _err(lambda: ADE20K(ade, "empty", None), "'empty' is empty")


# --------------------------------------------------------------------------- factories

def test_build_seg_dataset_selects_each_layout(tmp_path):
    make_voc(tmp_path / "voc")
    make_cityscapes(tmp_path / "cs")
    make_ade(tmp_path / "ade")
    assert {"camvid", "voc_sbd", "cityscapes", "ade20k", "synthetic"} <= set(SEG_DATASET_NAMES)
    for name, root, tr_split, ev_split, cls in (("voc_sbd", "voc", "train_aug", "val", VOCSegmentation),
                                                ("cityscapes", "cs", "train", "val", Cityscapes),
                                                ("ade20k", "ade", "training", "validation", ADE20K)):
        cfg = {"name": name, "root": str(tmp_path / root), "input_size": [8, 12], "crop_size": [8, 8]}
        tr = build_seg_dataset(cfg, tr_split, train=True, seed=1)
        ev = build_seg_dataset(cfg, ev_split, train=False)
        assert isinstance(tr, cls) and isinstance(ev, cls) and tr.num_classes == seg_num_classes(cfg)
        x, y = tr[0]
        assert x.shape == (3, 8, 8) and y.shape == (8, 8)
        x, y = ev[0]
        assert x.shape == (3, 8, 12) and y.shape == (H, W)  # labels keep their resolution
        _err(lambda: build_seg_dataset({"name": name}, "val", False), "root", name)


# --------------------------------------------------------------------------- ImageNet layout

def test_imagenet_layout_upper_case_extensions_and_modes(tmp_path):
    root = tmp_path / "imagenet"
    wnids = ["n01440764", "n01443537", "n15075141"]
    for k, wnid in enumerate(wnids):
        for i in range(2):
            _img(root / "train" / wnid / f"{wnid}_{10026 + i}.JPEG", 10 * k + i)
        _img(root / "val" / wnid / f"ILSVRC2012_val_{k + 1:08d}.JPEG", 100 + k)
    _img(root / "train" / wnids[0] / "n01440764_2.JPEG", 7, mode="CMYK")   # ImageNet has CMYK JPEGs
    _img(root / "train" / wnids[1] / "n01443537_3.JPEG", 8, mode="L")      # and grayscale ones
    (root / "train" / wnids[1] / "n01443537_4.jpeg").write_bytes((root / "train" / wnids[1] / "n01443537_3.JPEG").read_bytes())
    cfg = {"name": "imagefolder", "root": str(root), "input_size": [8, 8]}
    tr = build_cls_dataset(cfg, "train", train=True)
    val = build_cls_dataset(cfg, "val", train=False)
    assert isinstance(tr, ImageFolderDataset) and tr.classes == wnids and val.classes == wnids
    assert len(tr) == 9 and len(val) == 3
    assert val.targets == [0, 1, 2] and tr.targets == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    for i in range(len(tr)):
        x, y = tr[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and 0 <= y < 3
    # the validation images as shipped (one flat folder) are refused with the folder named
    flat = tmp_path / "flat"
    _img(flat / "val" / "ILSVRC2012_val_00000001.JPEG", 0)
    _err(lambda: ImageFolderDataset(flat, "val", None), "no class folders", "val")
