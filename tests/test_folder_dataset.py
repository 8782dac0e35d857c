"""``data.seg.name: folder`` (segprune/data/folder.py): a user's own images + label PNGs, on tiny
fixture trees made here (images of different sizes, L and palette labels, split files or none), every
bad input with the file / key it must name, the config keys, the stage fingerprints, and (when
../shared/data/camvid exists) CamVid laid out as a folder dataset against the built-in loader."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from segprune.config import DEFAULTS, ConfigError, load_config, merge, validate
from segprune.data import (
    SEG_DATASET_NAMES,
    CamVid,
    FolderSegDataset,
    build_seg_dataset,
    seg_num_classes,
)
from segprune.data.paired import voc_palette
from segprune.pipeline import stage_fingerprints

from test_data import _expect_data_error as _err

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "data" / "camvid"
CLASSES = ["road", "car", "sky"]
#: id -> (H, W): sizes differ on purpose
SIZES = {"a": (16, 24), "b": (20, 18), "c": (16, 24), "d": (30, 40), "e": (12, 12)}
TRAIN, VAL = ["a", "b", "c"], ["d", "e"]
MY_PALETTE = [(10, 20, 30), (200, 0, 0), (0, 0, 250)]


def _img(path: Path, hw: tuple[int, int], seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="PNG" if path.suffix == ".png" else "JPEG")


def _label(path: Path, arr: np.ndarray, mode: str = "L", palette=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    im = Image.frombytes(mode, (arr.shape[1], arr.shape[0]), arr.tobytes())
    if mode == "P":
        pal = [c for rgb in (palette or MY_PALETTE) for c in rgb]
        im.putpalette(pal + [0] * (768 - len(pal)))
    im.save(path)


def raw_label(i: int, hw: tuple[int, int], reduce: bool = False) -> np.ndarray:
    """Classes 0, 1, 2 in bands plus an ignored (255) stripe; +1 with reduce_zero_label (0 = ignored)."""
    h, w = hw
    lab = np.zeros(hw, np.uint8)
    lab[:, w // 3:] = 1
    lab[:, 2 * w // 3:] = 2 if i % 2 == 0 else 0
    if reduce:
        lab += 1
        lab[: h // 4, : w // 4] = 0  # reduce_zero_label: raw 0 is ignored
    lab[h // 2, :] = 255
    return lab


def expected(i: int, hw, reduce: bool = False, ignore: int = 255) -> np.ndarray:
    raw = raw_label(i, hw, reduce).astype(np.int64)
    if reduce:
        out = np.where((raw == 0) | (raw == 255), ignore, raw - 1)
    else:
        out = np.where(raw == 255, ignore, raw)
    return out


def make_tree(root: Path, mode: str = "L", reduce: bool = False, split_files: bool = True,
              classes_file: bool = True, img_suffix: str = ".jpg") -> Path:
    """<root>/images/<id>.jpg (sizes differ), labels/<id>.png, splits/{train,val}.txt, classes.txt."""
    for i, (ident, hw) in enumerate(SIZES.items()):
        _img(root / "images" / f"{ident}{img_suffix}", hw, seed=i)
        _label(root / "labels" / f"{ident}.png", raw_label(i, hw, reduce), mode)
    if split_files:
        (root / "splits").mkdir()
        (root / "splits" / "train.txt").write_text("# training ids\n" + "\n".join(TRAIN) + "\n\n")
        (root / "splits" / "val.txt").write_text("\n".join(VAL) + "\n")
    if classes_file:
        (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def seg_cfg(root: Path, **folder) -> dict:
    """A ``data.seg`` mapping (merged over the defaults) for the folder tree at ``root``."""
    f = {"ann_file": "splits/{split}.txt", "classes": "classes.txt", **folder}
    return merge(DEFAULTS["data"]["seg"], {"name": "folder", "root": str(root), "input_size": None,
                                            "crop_size": [8, 8], "folder": f})


# --------------------------------------------------------------------------- good trees


def test_registered_and_num_classes(tmp_path):
    assert "folder" in SEG_DATASET_NAMES
    root = make_tree(tmp_path)
    assert seg_num_classes(seg_cfg(root)) == 3
    assert seg_num_classes(seg_cfg(root, classes=["x", "y"])) == 2  # a list: no file read
    _err(lambda: seg_num_classes(seg_cfg(root, classes=None)), "data.seg.folder.classes", "required")


def test_grey_labels_split_files_and_different_sizes(tmp_path):
    root = make_tree(tmp_path)
    cfg = seg_cfg(root)
    ev = build_seg_dataset(cfg, "val", False)
    tr = build_seg_dataset(cfg, "train", False)
    assert isinstance(ev, FolderSegDataset) and len(tr) == 3 and len(ev) == 2
    assert [p[0].name for p in tr.pairs] == ["a.jpg", "b.jpg", "c.jpg"]  # split-file order
    assert tr.CLASSES == tuple(CLASSES) and tr.num_classes == 3 and len(tr.PALETTE) == 3
    assert tr.PALETTE == voc_palette(3)  # grey labels: the VOC colour map
    for ds, ids in ((tr, TRAIN), (ev, VAL)):
        for k, ident in enumerate(ids):
            i = list(SIZES).index(ident)
            img, lab = ds[k]  # input_size null: native size, image and label
            assert img.dtype == torch.float32 and tuple(img.shape) == (3, *SIZES[ident])
            assert lab.dtype == torch.int64 and torch.equal(lab, torch.from_numpy(expected(i, SIZES[ident])))
        ds.validate()
    # training: crops of crop_size from images of every size (padding the 12x12 one where scaled below 8)
    train = build_seg_dataset({**cfg, "scale_range": [0.5, 1.0]}, "train+val", True, seed=1)
    assert len(train) == 5
    for k in range(5):
        img, lab = train[k]
        assert tuple(img.shape) == (3, 8, 8) and tuple(lab.shape) == (8, 8)
        assert set(lab.unique().tolist()) <= {0, 1, 2, 255}
    # evaluation at input_size: images resized, labels keep their resolution (a batch must agree: below)
    img, lab = build_seg_dataset({**cfg, "input_size": [10, 14], "eval_batch_size": 1}, "val", False)[0]
    assert tuple(img.shape) == (3, 10, 14) and tuple(lab.shape) == SIZES["d"]


def test_palette_labels_and_palettes(tmp_path):
    root = make_tree(tmp_path, mode="P")
    with Image.open(root / "labels" / "a.png") as im:
        assert im.mode == "P"
    ds = build_seg_dataset(seg_cfg(root), "train", False)
    for k, ident in enumerate(TRAIN):  # the palette index is the class, not the colour
        _, lab = ds.load_pair(k)
        assert np.array_equal(lab, expected(list(SIZES).index(ident), SIZES[ident]))
    assert ds.PALETTE == MY_PALETTE  # default: the labels' own palette
    given = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert build_seg_dataset(seg_cfg(root, palette=given), "train", False).PALETTE == [tuple(c) for c in given]
    _err(lambda: build_seg_dataset(seg_cfg(root, palette=[[1, 2, 3]]), "train", False),
         "data.seg.folder.palette", "1 colours", "3 classes")


def test_reduce_zero_label_and_other_ignore_index(tmp_path):
    root = make_tree(tmp_path, reduce=True)
    ds = build_seg_dataset({**seg_cfg(root, reduce_zero_label=True), "ignore_index": 254}, "val", False)
    # raw 255 is neither a class (1..3) nor the ignore value (254) nor 0
    _err(lambda: ds.load_pair(0), "d.png", "[255]", "reduce_zero_label", "254 (data.seg.ignore_index)")
    ds = build_seg_dataset(seg_cfg(root, reduce_zero_label=True), "val", False)  # ignore_index 255
    for k, ident in enumerate(VAL):
        i = list(SIZES).index(ident)
        _, lab = ds.load_pair(k)
        assert np.array_equal(lab, expected(i, SIZES[ident], reduce=True))
        assert set(np.unique(lab).tolist()) <= {0, 1, 2, 255} and (lab == 255).any()
    ds.validate()
    # without reduce_zero_label the same labels hold 3, which is not a class of 3
    _err(lambda: build_seg_dataset(seg_cfg(root), "val", False).load_pair(1), "e.png", "[3]", "0..2")


def test_no_split_file_every_image_and_classes_list(tmp_path):
    root = make_tree(tmp_path, split_files=False, classes_file=False)
    cfg = seg_cfg(root, ann_file=None, classes=CLASSES)
    ds = build_seg_dataset(cfg, "anything", False)
    assert [p[0].stem for p in ds.pairs] == sorted(SIZES) and ds.CLASSES == tuple(CLASSES)
    ds.validate()


def test_mmseg_per_split_folders_recursive_ids_and_long_suffixes(tmp_path):
    """mmsegmentation's custom layout: img_dir/{split}, ann_dir/{split}, sub-folders in ids,
    Cityscapes-like suffixes; split files may name ids with sub-folders; ``a+b`` joins splits."""
    for split, ids in (("train", ["aachen/x_1", "aachen/x_2", "bonn/y_1"]), ("val", ["lindau/z_1"])):
        for i, ident in enumerate(ids):
            _img(tmp_path / "img_dir" / split / f"{ident}_leftImg8bit.png", (8, 10), seed=i)
            _label(tmp_path / "ann_dir" / split / f"{ident}_gtFine_labelTrainIds.png", raw_label(i, (8, 10)))
            (tmp_path / "ann_dir" / split / f"{ident}_gtFine_color.png").write_bytes(b"not read")
    (tmp_path / "val_list.txt").write_text("lindau/z_1_leftImg8bit.png\n")  # with img_suffix: tolerated
    f = dict(img_dir="img_dir/{split}", ann_dir="ann_dir/{split}", img_suffix="_leftImg8bit.png",
             seg_map_suffix="_gtFine_labelTrainIds.png", classes=CLASSES)
    ds = build_seg_dataset(seg_cfg(tmp_path, ann_file=None, **f), "train+val", False)
    assert [p[0].relative_to(tmp_path).as_posix() for p in ds.pairs] == [
        "img_dir/train/aachen/x_1_leftImg8bit.png", "img_dir/train/aachen/x_2_leftImg8bit.png",
        "img_dir/train/bonn/y_1_leftImg8bit.png", "img_dir/val/lindau/z_1_leftImg8bit.png"]
    ds.validate()
    ds = build_seg_dataset(seg_cfg(tmp_path, ann_file={"val": "val_list.txt"}, **f), "val", False)
    assert len(ds) == 1 and ds.pairs[0][1].name == "z_1_gtFine_labelTrainIds.png"
    _err(lambda: build_seg_dataset(seg_cfg(tmp_path, ann_file={"val": "val_list.txt"}, **f), "train", False),
         "data.seg.folder.ann_file", "'train'", "['val']")


def test_images_and_labels_in_one_folder(tmp_path):
    for i, ident in enumerate(["p", "q"]):
        _img(tmp_path / "data" / f"{ident}.png", (6, 6), seed=i)
        _label(tmp_path / "data" / f"{ident}_mask.png", raw_label(i, (6, 6)))
    f = dict(img_dir="data", ann_dir="data", img_suffix=".png", seg_map_suffix="_mask.png", classes=CLASSES)
    ds = build_seg_dataset(seg_cfg(tmp_path, ann_file=None, **f), "train", False)
    assert [(a.name, b.name) for a, b in ds.pairs] == [("p.png", "p_mask.png"), ("q.png", "q_mask.png")]
    _err(lambda: build_seg_dataset(seg_cfg(tmp_path, ann_file=None, **{**f, "seg_map_suffix": ".png"}), "train",
                                   False), "img_suffix", "seg_map_suffix", "data")


def test_eval_batches_of_different_label_sizes_are_refused_before_anything_runs(tmp_path):
    root = make_tree(tmp_path)
    cfg = {**seg_cfg(root), "input_size": [16, 16], "eval_batch_size": 4}
    _err(lambda: build_seg_dataset(cfg, "val", False), "data.seg.eval_batch_size", "d.png", "e.png", "40x30")
    assert len(build_seg_dataset({**cfg, "eval_batch_size": 1}, "val", False)) == 2
    assert len(build_seg_dataset(cfg, "val", True)) == 2  # training crops: any sizes
    (root / "splits" / "same.txt").write_text("a\nc\n")  # two 16x24 labels: batchable
    assert len(build_seg_dataset(cfg, "same", False)) == 2


# --------------------------------------------------------------------------- bad inputs


def test_missing_root_folders_and_split_files(tmp_path):
    root = make_tree(tmp_path / "data")
    _err(lambda: build_seg_dataset(seg_cfg(tmp_path / "nope"), "train", False), "data.seg.root", "nope")
    _err(lambda: build_seg_dataset(seg_cfg(root, img_dir="imgs"), "train", False),
         "data.seg.folder.img_dir", "imgs")
    _err(lambda: build_seg_dataset(seg_cfg(root, ann_dir="masks"), "train", False),
         "data.seg.folder.ann_dir", "masks")
    _err(lambda: build_seg_dataset(seg_cfg(root), "test", False),
         "data.seg.folder.ann_file", "'test'", str(root / "splits" / "test.txt"))
    _err(lambda: build_seg_dataset(seg_cfg(root, classes="names.txt"), "train", False),
         "data.seg.folder.classes", str(root / "names.txt"))


def test_missing_pairs(tmp_path):
    root = make_tree(tmp_path)
    (root / "splits" / "ghost.txt").write_text("a\nzz\n")
    _err(lambda: build_seg_dataset(seg_cfg(root), "ghost", False), "ghost.txt:2", "'zz'",
         str(root / "images" / "zz.jpg"))
    (root / "labels" / "b.png").unlink()
    _err(lambda: build_seg_dataset(seg_cfg(root), "train", False), "train.txt:3", str(root / "labels" / "b.png"))
    _err(lambda: build_seg_dataset(seg_cfg(root, ann_file=None), "train", False),
         "missing label", str(root / "images" / "b.jpg"), str(root / "labels" / "b.png"))
    root2 = make_tree(tmp_path / "two")
    _label(root2 / "labels" / "orphan.png", raw_label(0, (4, 4)))
    _err(lambda: build_seg_dataset(seg_cfg(root2, ann_file=None), "train", False),
         str(root2 / "labels" / "orphan.png"), "no image", "orphan.jpg")


def test_empty_splits_and_malformed_lines(tmp_path):
    root = make_tree(tmp_path)
    (root / "splits" / "empty.txt").write_text("# nothing\n\n")
    _err(lambda: build_seg_dataset(seg_cfg(root), "empty", False), "empty", "empty.txt")
    (root / "splits" / "two.txt").write_text("a labels/a.png\n")
    _err(lambda: build_seg_dataset(seg_cfg(root), "two", False), "two.txt:1", "one id per line")
    (root / "pngs").mkdir()
    _img(root / "pngs" / "x.PNG", (4, 4))
    _err(lambda: build_seg_dataset(seg_cfg(root, ann_file=None, img_dir="pngs"), "train", False),
         "empty", "'.jpg'", "data.seg.folder.img_suffix", ".PNG")


def test_size_mismatch_bad_values_corrupt_files_and_colour_labels(tmp_path):
    root = make_tree(tmp_path)
    ds = build_seg_dataset(seg_cfg(root), "train+val", False)
    _label(root / "labels" / "a.png", raw_label(0, (16, 20)))  # image is 24 wide
    _err(lambda: ds.load_pair(0), "size mismatch", "a.jpg", "a.png", "24x16", "20x16")
    bad = raw_label(1, SIZES["b"])
    bad[0, 0], bad[1, 1] = 3, 77
    _label(root / "labels" / "b.png", bad)
    _err(lambda: ds.load_pair(1), "b.png", "[3, 77]", "0..2", "data.seg.ignore_index")
    (root / "images" / "c.jpg").write_bytes(b"not a jpeg" * 20)
    _err(lambda: ds[2], "cannot read image", "c.jpg")
    good = (root / "labels" / "d.png").read_bytes()
    (root / "labels" / "d.png").write_bytes(good[: len(good) // 2])  # truncated
    _err(lambda: ds[3], "cannot read label", "d.png")
    Image.new("RGB", (12, 12), (200, 0, 0)).save(root / "labels" / "e.png")  # colour-coded label
    _err(lambda: ds.load_pair(4), "e.png", "single-channel", "'RGB'")
    _err(ds.validate, "a.png")  # the full scan stops at the first bad pair


def test_bad_classes_and_ignore_index(tmp_path):
    root = make_tree(tmp_path)
    (root / "none.txt").write_text("# no class\n\n")
    _err(lambda: build_seg_dataset(seg_cfg(root, classes="none.txt"), "train", False), "none.txt", "no class")
    (root / "dup.txt").write_text("road\ncar\nroad\n")
    _err(lambda: build_seg_dataset(seg_cfg(root, classes="dup.txt"), "train", False), "dup.txt", "road")
    _err(lambda: build_seg_dataset({**seg_cfg(root), "ignore_index": 1}, "train", False),
         "data.seg.ignore_index=1", "'car'")
    _err(lambda: build_seg_dataset({**seg_cfg(root), "folder": {"classes": CLASSES, "img_sufix": ".png"}},
                                   "train", False), "data.seg.folder", "img_sufix")


# --------------------------------------------------------------------------- config and fingerprints


def test_config_problems_are_all_listed_at_once(tmp_path):
    cfg = merge(DEFAULTS, {"data": {"seg": {"name": "folder", "ignore_index": 2, "folder": {
        "img_dir": "", "seg_map_suffix": 5, "ann_file": 3, "classes": ["a", "b", "a"], "palette": [[0, 0, 300]],
        "reduce_zero_label": "yes"}}}})
    bad = validate(cfg, raise_error=False)
    text = "\n".join(bad)
    for key in ("folder.img_dir=''", "folder.seg_map_suffix=5", "folder.ann_file=3", "folder.classes=",
                "folder.palette=", "folder.reduce_zero_label='yes'"):
        assert key in text, (key, text)
    assert len(bad) == 6
    # required for name: folder only; the splits must be told apart; ignore_index must not be a class
    assert not validate(merge(DEFAULTS, {}), raise_error=False)
    need = validate(merge(DEFAULTS, {"data": {"seg": {"name": "folder"}}}), raise_error=False)
    assert any("folder.classes=None: is required" in b for b in need)
    assert any("both splits would read every image" in b for b in need)
    ok = {"name": "folder", "folder": {"classes": ["a", "b"], "ann_file": "splits/{split}.txt"}}
    assert not validate(merge(DEFAULTS, {"data": {"seg": ok}}), raise_error=False)
    assert not validate(merge(DEFAULTS, {"data": {"seg": {**ok, "eval_split": "train", "folder": {
        "classes": ["a"]}}}}), raise_error=False)  # one split: every image is fine
    assert not validate(merge(DEFAULTS, {"data": {"seg": {"name": "folder", "folder": {
        "classes": ["a"], "img_dir": "img_dir/{split}", "ann_dir": "ann_dir/{split}"}}}}), raise_error=False)
    m = validate(merge(DEFAULTS, {"data": {"seg": {"name": "folder", "ignore_index": 0, "folder": {
        "classes": ["a", "b"], "ann_file": {"train": "t.txt"}}}}, "eval": {"split": "val"}}), raise_error=False)
    assert any("ignore_index=0" in b and "'a'" in b for b in m)
    assert any("no split file for split 'test'" in b for b in m) and any("'val'" in b for b in m)
    with pytest.raises(ConfigError, match=r"data\.seg\.folder\.bogus: unknown key"):
        load_config(None, ["data.seg.folder.bogus=1"])


def test_fingerprints_unchanged_for_other_datasets_and_folder_keys_count_for_folder():
    cfg = load_config(None)
    old = copy.deepcopy(cfg)  # a config from before data.seg.folder existed
    del old["data"]["seg"]["folder"]
    assert stage_fingerprints(old) == stage_fingerprints(cfg)
    other = copy.deepcopy(cfg)
    other["data"]["seg"]["folder"].update(classes=["x"], img_dir="elsewhere")  # unused by camvid
    assert stage_fingerprints(other) == stage_fingerprints(cfg)
    f1 = merge(DEFAULTS, {"data": {"seg": {"name": "folder", "folder": {"classes": ["a", "b"]}}}})
    f2 = merge(DEFAULTS, {"data": {"seg": {"name": "folder", "folder": {"classes": ["a", "c"]}}}})
    a, b = stage_fingerprints(f1), stage_fingerprints(f2)
    assert all(a[s] != b[s] for s in a)  # the data enter the first stage, and every later one is chained


# --------------------------------------------------------------------------- end to end through the CLI


def test_cli_run_on_a_folder_dataset(tmp_path):
    """``segprune run`` on a folder tree of mixed sizes, evaluated at native size; then ``compare``."""
    from segprune.cli import main
    from test_pipeline import TINY

    root = make_tree(tmp_path / "mydata", mode="P")
    for i in range(6):  # a few more training images (batch 4)
        _img(root / "images" / f"t{i}.jpg", (20, 24), seed=10 + i)
        _label(root / "labels" / f"t{i}.png", raw_label(i, (20, 24)), "P")
    (root / "splits" / "train.txt").write_text("\n".join(TRAIN + [f"t{i}" for i in range(6)]) + "\n")
    cfg = copy.deepcopy(TINY)
    cfg["data"]["seg"] = {"name": "folder", "root": "mydata", "input_size": None, "crop_size": [16, 16],
                          "batch_size": 4, "eval_batch_size": 1, "eval_split": "val",
                          "folder": {"ann_file": "splits/{split}.txt", "classes": "classes.txt"}}
    cfg["train"]["seg"]["epochs"] = 1
    path = tmp_path / "folder.yaml"
    path.write_text(yaml.safe_dump(cfg))  # root relative to the config file's folder
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval_native_size"] is True and set(m["pruned"]["per_class_iou"]) == set(CLASSES)
    assert main(["compare", str(out), str(out), "--out", str(tmp_path / "cmp")]) == 0


# --------------------------------------------------------------------------- CamVid as a user's folder


def _example():
    spec = importlib.util.spec_from_file_location("camvid_as_folder", REPO / "examples" / "camvid_as_folder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not (CAMVID / "train.txt").is_file(), reason="needs ../shared/data/camvid")
@pytest.mark.parametrize("label_mode", ["P", "L"])
def test_camvid_laid_out_as_a_folder_matches_the_builtin_loader(tmp_path, label_mode):
    ex = _example()
    root = ex.layout(CAMVID, tmp_path / "camvid_folder", limit=3, label_mode=label_mode)
    cfg = load_config(REPO / "configs" / "folder_camvid_example.yaml", [f"data.seg.root={root}"])
    seg = cfg["data"]["seg"]
    assert seg_num_classes(seg) == CamVid.num_classes == 11
    for split in ("train", "test"):
        mine = build_seg_dataset(seg, split, False)
        ref = CamVid(CAMVID, split, mine.transform)
        assert mine.CLASSES == CamVid.CLASSES
        if label_mode == "P":
            assert mine.PALETTE == CamVid.PALETTE  # from the label PNGs' palette
        for i in range(3):
            img, lab = mine[i]
            rimg, rlab = ref[i]
            assert torch.equal(img, rimg) and torch.equal(lab, rlab)
            assert (lab == 255).any() and int(lab[lab != 255].max()) <= 10
    with pytest.raises(FileExistsError):
        ex.layout(CAMVID, root)
    assert ex.main([str(REPO / "inside")]) == 2 and not (REPO / "inside").exists()
