"""Tests for segprune.data: transforms, CamVid, ImageFolderDataset, synthetic sets, factories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from segprune.data import (
    CamVid,
    ClsEvalTransform,
    ClsTrainTransform,
    DataError,
    ImageFolderDataset,
    SegEvalTransform,
    SegTrainTransform,
    SyntheticClassification,
    SyntheticSegmentation,
    build_cls_dataset,
    build_seg_dataset,
    cls_num_classes,
    seg_num_classes,
)
from segprune.data.transforms import resize_label_nearest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
IGNORE = 255


# --------------------------------------------------------------------------- helpers

def _rand_image(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _write_pair(root: Path, split: str, stem: str, label: np.ndarray, img_hw=None, seed=0) -> str:
    """Write <split>/<stem>.jpg and <split>annot/<stem>.png; return the list line."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
    h, w = img_hw if img_hw is not None else label.shape
    _rand_image(np.random.default_rng(seed), h, w).save(root / split / f"{stem}.jpg", quality=95)
    Image.fromarray(label.astype(np.uint8), mode="L").save(root / f"{split}annot" / f"{stem}.png")
    return f"{split}/{stem}.jpg {split}annot/{stem}.png"


def make_camvid(root: Path, n: int = 3, split: str = "train", h: int = 12, w: int = 16) -> Path:
    """Tiny CamVid tree in the real layout; label of pair i: left half i, right half void (11)."""
    lines = []
    for i in range(n):
        label = np.full((h, w), 11, np.uint8)
        label[:, : w // 2] = i
        label[0, 0] = 10
        lines.append(_write_pair(root, split, f"0001TP_{i:06d}", label, seed=i))
    (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


# --------------------------------------------------------------------------- transforms

@settings(max_examples=40, deadline=None, database=None)  # no .hypothesis/ dir in the repo
@given(
    h=st.integers(4, 24),
    w=st.integers(4, 24),
    crop=st.tuples(st.integers(2, 32), st.integers(2, 32)),
    base=st.one_of(st.none(), st.tuples(st.integers(4, 24), st.integers(4, 24))),
    scale=st.tuples(st.floats(0.3, 1.0), st.floats(1.0, 2.5)),
    values=st.lists(st.integers(0, 20), min_size=1, max_size=4, unique=True),
    seed=st.integers(0, 2**31),
)
def test_seg_train_transform_properties(h, w, crop, base, scale, values, seed):
    rng = np.random.default_rng(seed)
    label = rng.choice(values, size=(h, w)).astype(np.int64)
    tf = SegTrainTransform(base, crop, scale_range=scale, ignore_index=IGNORE)
    img, lab = tf(_rand_image(rng, h, w), label, rng)
    assert img.shape == (3, *crop) and img.dtype == torch.float32
    assert lab.shape == crop and lab.dtype == torch.int64
    # nearest-neighbour only: no new label values
    assert set(lab.unique().tolist()) <= set(values) | {IGNORE}
    # padding: label == ignore exactly where the image is the padded 0 (mean colour);
    # a real uint8 pixel can never normalise to exactly 0 in all channels
    padded_img = (img == 0).all(dim=0)
    assert torch.equal(padded_img, lab == IGNORE)


def test_seg_train_transform_pads_only_when_needed():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, (10, 10))
    image = _rand_image(rng, 10, 10)
    tf = SegTrainTransform(None, (14, 12), scale_range=(1.0, 1.0), hflip=False, ignore_index=IGNORE)
    img, lab = tf(image, label, rng)
    assert torch.equal(lab[:10, :10], torch.from_numpy(label))
    assert (lab[10:, :] == IGNORE).all() and (lab[:, 10:] == IGNORE).all()
    assert (img[:, 10:, :] == 0).all() and (img[:, :, 10:] == 0).all()
    assert not (img[:, :10, :10] == 0).all(dim=0).any()
    # crop smaller than the image: never any padding
    tf = SegTrainTransform(None, (8, 8), scale_range=(1.0, 1.0), ignore_index=IGNORE)
    for s in range(10):
        _, lab = tf(image, label, np.random.default_rng(s))
        assert (lab != IGNORE).all()


def test_seg_train_transform_flips_image_and_label_together():
    h, w = 6, 10
    label = np.tile(np.arange(w), (h, 1))  # asymmetric: label = column index
    red = (label * 25).astype(np.uint8)  # image red channel encodes the label
    image = Image.fromarray(np.stack([red, np.zeros_like(red), np.zeros_like(red)], -1))
    tf = SegTrainTransform(None, (h, w), scale_range=(1.0, 1.0), hflip=True)
    seen = set()
    for s in range(30):
        img, lab = tf(image, label, np.random.default_rng(s))
        flipped = bool(torch.equal(lab, torch.from_numpy(label).flip(-1)))
        assert flipped or torch.equal(lab, torch.from_numpy(label))
        red_back = torch.round((img[0] * 0.229 + 0.485) * 255).long()
        assert torch.equal(red_back, lab * 25)  # image and label moved together
        seen.add(flipped)
    assert seen == {True, False}


def test_seg_train_transform_base_size_and_same_rng_is_deterministic():
    rng = np.random.default_rng(1)
    label = rng.integers(0, 3, (12, 16))
    image = _rand_image(rng, 12, 16)
    tf = SegTrainTransform((24, 32), (20, 20))
    a = tf(image, label, np.random.default_rng([0, 1, 2]))
    b = tf(image, label, np.random.default_rng([0, 1, 2]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="label shape"):
        tf(image, label[:5], rng)


def test_resize_label_nearest_preserves_values():
    label = np.array([[1, 2], [3, 4]], np.int64)
    out = resize_label_nearest(label, (4, 6))
    assert out.shape == (4, 6) and set(np.unique(out)) == {1, 2, 3, 4}
    assert (out[:2, :3] == 1).all() and (out[2:, 3:] == 4).all()


@settings(max_examples=40, deadline=None, database=None)
@given(h=st.integers(1, 20), w=st.integers(1, 20), oh=st.integers(1, 30), ow=st.integers(1, 30),
       k=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_resize_label_nearest_properties(h, w, oh, ow, k, seed):
    """Shape, dtype and values kept; identity at the same size; an integer upscale by k repeats each
    pixel as a k x k block, and the downscale back by k samples the block centres (pixel-centre rule)."""
    label = np.random.default_rng(seed).integers(0, 256, (h, w)).astype(np.uint8)
    out = resize_label_nearest(label, (oh, ow))
    assert out.shape == (oh, ow) and out.dtype == label.dtype
    assert set(np.unique(out)) <= set(np.unique(label))
    assert resize_label_nearest(label, (h, w)) is label
    up = resize_label_nearest(label, (h * k, w * k))
    assert np.array_equal(up, np.repeat(np.repeat(label, k, 0), k, 1))
    assert np.array_equal(resize_label_nearest(up, (h, w)), label)


@settings(max_examples=30, deadline=None, database=None)
@given(h=st.integers(2, 24), w=st.integers(2, 24), size=st.one_of(st.none(), st.tuples(st.integers(2, 24), st.integers(2, 24))),
       seed=st.integers(0, 2**31))
def test_seg_eval_transform_properties(h, w, size, seed):
    """The image goes to the network size (or stays), the label is passed through unchanged, and
    the result does not depend on an rng (evaluation is deterministic)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 12, (h, w))
    label[rng.random((h, w)) < 0.1] = IGNORE
    image = _rand_image(rng, h, w)
    tf = SegEvalTransform(size)
    img, lab = tf(image, label)
    img2, _ = tf(image, label, np.random.default_rng(seed + 1))
    assert img.shape == (3, *(size or (h, w))) and img.dtype == torch.float32 and torch.isfinite(img).all()
    assert lab.dtype == torch.int64 and torch.equal(lab, torch.from_numpy(label))
    assert torch.equal(img, img2)


@settings(max_examples=30, deadline=None, database=None)
@given(h=st.integers(4, 20), w=st.integers(4, 20), pad=st.integers(0, 6), seed=st.integers(0, 2**31))
def test_cls_train_transform_properties(h, w, pad, seed):
    """Output is (3, H, W) at the input size; the same rng state gives the same output; a constant
    image stays constant under reflect padding, crop and flip (only positions move); with pad >= the
    size, padding falls back to zeros (the mean colour after normalisation)."""
    rng = np.random.default_rng(seed)
    tf = ClsTrainTransform((h, w), pad=pad)
    image = _rand_image(rng, h, w)
    a = tf(image, np.random.default_rng(seed))
    b = tf(image, np.random.default_rng(seed))
    assert a.shape == (3, h, w) and torch.equal(a, b)
    reflect = pad < min(h, w)  # documented fallback: zero padding (the mean colour) when pad >= the size
    flat = Image.new("RGB", (w, h), (200, 30, 90))
    c = tf(flat, np.random.default_rng(seed))
    colour = ClsEvalTransform((h, w))(flat)[:, 0, 0].view(3, 1, 1)
    is_colour, is_zero = (c == colour).all(0), (c == 0).all(0)
    assert is_colour.all() if reflect else (is_colour | is_zero).all()
    # the crop only moves pixels: every output pixel value is one of the input's (no interpolation)
    ref = ClsEvalTransform((h, w))(image).reshape(3, -1).T
    if not reflect:
        ref = torch.cat([ref, torch.zeros(1, 3)])
    assert all(bool((ref == px).all(1).any()) for px in a.reshape(3, -1).T)


def test_seg_eval_transform_keeps_label_resolution():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 11, (12, 16))
    img, lab = SegEvalTransform((24, 40))(_rand_image(rng, 12, 16), label)
    assert img.shape == (3, 24, 40)
    assert lab.shape == (12, 16) and torch.equal(lab, torch.from_numpy(label))
    img, _ = SegEvalTransform(None)(_rand_image(rng, 12, 16), label)
    assert img.shape == (3, 12, 16)


def test_cls_transforms_shapes_and_grayscale():
    gray = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8), mode="L")
    out = ClsEvalTransform((16, 16))(gray)
    assert out.shape == (3, 16, 16)
    # grayscale -> identical R, G, B before normalisation
    raw = out * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)
    tf = ClsTrainTransform((16, 16), pad=4)
    outs = [tf(gray, np.random.default_rng(s)) for s in range(5)]
    assert all(o.shape == (3, 16, 16) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # augmentation does something
    with pytest.raises(ValueError, match="padding_mode"):
        ClsTrainTransform((16, 16), padding_mode="wrap")


# --------------------------------------------------------------------------- CamVid

def test_camvid_loads_and_maps_void(tmp_path):
    root = make_camvid(tmp_path / "camvid")
    ds = CamVid(root, "train", SegEvalTransform(None))
    assert len(ds) == 3 and ds.num_classes == 11 and ds.ignore_index == 255
    assert len(CamVid.CLASSES) == 11 and len(CamVid.PALETTE) == 11
    img, lab = ds[2]
    assert img.shape == (3, 12, 16) and img.dtype == torch.float32
    assert lab.shape == (12, 16) and lab.dtype == torch.int64
    assert (lab[:, 8:] == 255).all()  # void (11) -> ignore
    assert (lab[1:, :8] == 2).all() and lab[0, 0] == 10
    assert 11 not in lab.unique().tolist()
    ds.validate()
    assert "train" in ds.describe() and "3" in ds.describe()


def test_camvid_classes_match_shared_classes_txt():
    f = SHARED / "camvid" / "classes.txt"
    if not f.is_file():
        pytest.skip(f"shared data not found at {f}")
    rows = [ln.split() for ln in f.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert tuple(r[1] for r in rows[:11]) == CamVid.CLASSES
    assert [tuple(int(v) for v in r[2:5]) for r in rows[:11]] == CamVid.PALETTE


def test_camvid_augmentation_deterministic_per_epoch(tmp_path):
    root = make_camvid(tmp_path / "camvid", h=24, w=32)
    ds = CamVid(root, "train", SegTrainTransform(None, (16, 16)), seed=3)
    ds.set_epoch(1)
    a = [ds[i] for i in range(3)]
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    (x, y), = list(loader)
    assert torch.equal(x, torch.stack([t[0] for t in a])) and torch.equal(y, torch.stack([t[1] for t in a]))
    ds.set_epoch(2)
    b = [ds[i] for i in range(3)]
    assert any(not torch.equal(p[0], q[0]) for p, q in zip(a, b))


def _expect_data_error(fn, *needles):
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    for n in needles:
        assert str(n) in msg, f"{n!r} not in error message {msg!r}"
    return msg


def test_camvid_missing_root_and_list_and_empty(tmp_path):
    _expect_data_error(lambda: CamVid(tmp_path / "nope", "train", None), "nope")
    root = make_camvid(tmp_path / "camvid")
    _expect_data_error(lambda: CamVid(root, "val", None), "val.txt")
    (root / "test.txt").write_text("\n\n")
    _expect_data_error(lambda: CamVid(root, "test", None), "test.txt", "empty")
    (root / "bad.txt").write_text("train/0001TP_000000.jpg\n")
    _expect_data_error(lambda: CamVid(root, "bad", None), "bad.txt")
    (root / "gone.txt").write_text("train/missing.jpg trainannot/0001TP_000000.png\n")
    _expect_data_error(lambda: CamVid(root, "gone", None), "missing.jpg")


def test_camvid_corrupt_and_truncated_image(tmp_path):
    root = make_camvid(tmp_path / "camvid")
    ds = CamVid(root, "train", None)
    (root / "train" / "0001TP_000001.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    _expect_data_error(lambda: ds[1], "0001TP_000001.jpg")
    _expect_data_error(ds.validate, "0001TP_000001.jpg")
    good = (root / "train" / "0001TP_000002.jpg").read_bytes()
    (root / "train" / "0001TP_000002.jpg").write_bytes(good[: len(good) // 2])
    _expect_data_error(lambda: ds[2], "0001TP_000002.jpg")
    ds[0]  # untouched pair still loads


def test_camvid_bad_label_value_and_size_mismatch(tmp_path):
    root = tmp_path / "camvid"
    ok = np.zeros((12, 16), np.uint8)
    bad = ok.copy()
    bad[3, 3] = 13
    lines = [
        _write_pair(root, "train", "good", ok),
        _write_pair(root, "train", "badvalue", bad),
        _write_pair(root, "train", "mismatch", ok, img_hw=(10, 16)),
    ]
    (root / "train.txt").write_text("\n".join(lines))
    ds = CamVid(root, "train", None)
    ds[0]
    _expect_data_error(lambda: ds[1], "badvalue.png", "13")
    _expect_data_error(lambda: ds[2], "mismatch.jpg", "mismatch.png", "16x10", "16x12")
    _expect_data_error(ds.validate, "badvalue.png")


def test_camvid_rgb_label_rejected(tmp_path):
    root = make_camvid(tmp_path / "camvid", n=1)
    Image.new("RGB", (16, 12)).save(root / "trainannot" / "0001TP_000000.png")
    _expect_data_error(lambda: CamVid(root, "train", None)[0], "0001TP_000000.png", "RGB")


# --------------------------------------------------------------------------- ImageFolder

def make_imagefolder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for cls in ("zebra", "ant", "moth"):  # created unsorted
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                _rand_image(rng, 8, 8).save(d / f"{cls}_{i}.png")
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(root / "train" / "moth" / "gray.jpg")
    (root / "train" / "moth" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_sorted_classes_and_grayscale(tmp_path):
    root = make_imagefolder(tmp_path / "imf")
    ds = ImageFolderDataset(root, "train", ClsEvalTransform(None))
    assert ds.classes == ["ant", "moth", "zebra"] and ds.num_classes == 3
    assert len(ds) == 7  # notes.txt ignored
    assert ds.targets == [0, 0, 1, 1, 1, 2, 2]
    gi = [i for i, (p, _) in enumerate(ds.samples) if p.name == "gray.jpg"][0]
    x, y = ds[gi]
    assert x.shape == (3, 8, 8) and y == 1 and isinstance(y, int)
    assert cls_num_classes({"name": "imagefolder", "root": str(root)}) == 3


def test_imagefolder_errors(tmp_path):
    root = make_imagefolder(tmp_path / "imf")
    _expect_data_error(lambda: ImageFolderDataset(root, "test", None), "test")
    (root / "empty").mkdir()
    _expect_data_error(lambda: ImageFolderDataset(root, "empty", None), "empty")
    (root / "val" / "wasp").mkdir()
    _expect_data_error(lambda: ImageFolderDataset(root, "val", None), "wasp")
    (root / "val" / "wasp").rmdir()
    (root / "train" / "ant" / "ant_0.png").write_bytes(b"\x89PNG garbage")
    ds = ImageFolderDataset(root, "train", None)
    _expect_data_error(lambda: ds[0], "ant_0.png")
    _expect_data_error(ds.validate, "ant_0.png", "full scan")  # data.cls.validate: true


def test_imagefolder_full_scan_finds_truncated_image(tmp_path):
    root = make_imagefolder(tmp_path / "imf")
    ds = ImageFolderDataset(root, "val", None)
    assert ds.validate() == len(ds)
    victim = ds.samples[-1][0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    assert ds.validate(limit=len(ds) - 1) == len(ds) - 1  # the intact ones pass
    _expect_data_error(ds.validate, victim.name)


def test_build_cls_dataset_imagefolder_uses_train_classes(tmp_path):
    root = make_imagefolder(tmp_path / "imf")
    (root / "val" / "zebra" / "zebra_0.png").unlink()
    (root / "val" / "zebra").rmdir()  # val lacks a class: indices must still follow train
    cfg = {"name": "imagefolder", "root": str(root), "input_size": [8, 8]}
    val = build_cls_dataset(cfg, "val", train=False)
    assert val.classes == ["ant", "moth", "zebra"] and val.num_classes == 3
    assert val.targets == [0, 1]
    tr = build_cls_dataset(cfg, "train", train=True, seed=1)
    x, y = tr[0]
    assert x.shape == (3, 8, 8) and y == 0


# --------------------------------------------------------------------------- real shared data

def test_real_shared_data_samples():
    cam, tin = SHARED / "camvid", SHARED / "tiny_imagenet_subset"
    if not (cam / "train.txt").is_file() or not (tin / "train").is_dir():
        pytest.skip(f"shared data not found under {SHARED}")
    ds = CamVid(cam, "train", SegEvalTransform((180, 240)))
    assert len(ds) == 367
    for i in range(2):
        img, lab = ds[i]
        assert img.shape == (3, 180, 240) and lab.shape == (360, 480)
        vals = set(lab.unique().tolist())
        assert vals <= set(range(11)) | {255} and len(vals) > 3
    tr = CamVid(cam, "train", SegTrainTransform((180, 240), (128, 128)))
    img, lab = tr[0]
    assert img.shape == (3, 128, 128) and lab.shape == (128, 128)

    imf = ImageFolderDataset(tin, "train", ClsEvalTransform(None))
    assert imf.num_classes == 200 and len(imf) == 10_000
    gray_name = "n01768244_42.jpg"  # one of the 225 mode-L JPEGs
    gi = [i for i, (p, _) in enumerate(imf.samples) if p.name == gray_name]
    assert gi, f"{gray_name} not found"
    with Image.open(imf.samples[gi[0]][0]) as im:
        assert im.mode == "L"
    for i in (0, gi[0]):
        x, y = imf[i]
        assert x.shape == (3, 64, 64) and 0 <= y < 200
    assert imf.classes[imf[gi[0]][1]] == "n01768244"


# --------------------------------------------------------------------------- synthetic

def test_synthetic_determinism_and_seeds():
    a = SyntheticSegmentation(8, seed=5)
    b = SyntheticSegmentation(8, seed=5)
    c = SyntheticSegmentation(8, seed=6)
    v = SyntheticSegmentation(8, seed=5, split="val")
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    assert not np.array_equal(a.images, v.images)
    # sample i does not depend on the number of samples
    assert np.array_equal(SyntheticSegmentation(3, seed=5).images, a.images[:3])
    ca, cb = SyntheticClassification(8, seed=5), SyntheticClassification(8, seed=5)
    assert np.array_equal(ca.images, cb.images)
    assert not np.array_equal(ca.images, SyntheticClassification(8, seed=6).images)
    assert a.images.dtype == np.uint8 and a.images.shape == (8, 64, 64, 3)


def test_synthetic_labels_and_class_coverage():
    k = 4
    ds = SyntheticSegmentation(36, image_size=(48, 48), num_kinds=k, seed=0)
    assert ds.num_classes == k + 1 and ds.ignore_index == 255
    assert set(np.unique(ds.labels).tolist()) == set(range(k + 1))
    x, y = ds[0]
    assert x.shape == (3, 48, 48) and y.dtype == torch.int64 and int(y.max()) <= k
    cls = SyntheticClassification(16, num_kinds=k)
    assert cls.num_classes == k and sorted(set(cls.targets.tolist())) == list(range(k))
    x, t = cls[5]
    assert x.shape == (3, 32, 32) and t == 5 % k
    _expect_data_error(lambda: SyntheticSegmentation(4, num_kinds=7), "num_kinds", "7")


def test_synthetic_shapes_have_equal_area_and_kinds_equal_pixel_shares():
    """Every shape covers about pi * radius^2 pixels (AREA_SCALE), so every kind gets about the same share of the
    labelled pixels; before, a triangle covered half a disc's area and the demo often never learned it."""
    from segprune.data.synthetic import KINDS, render_object
    rng = np.random.default_rng(0)
    for kind, spec in enumerate(KINDS):
        area = np.mean([render_object(np.zeros((100, 100, 3), np.float32), None, kind, (50.0, 50.0), 20.0, rng).sum()
                        for _ in range(10)])
        assert abs(area / (np.pi * 20.0 ** 2) - 1) < 0.03, (spec.shape, area)
    k = 4
    ds = SyntheticSegmentation(200, num_kinds=k, seed=0)
    share = np.bincount(ds.labels.ravel(), minlength=k + 1)[1:] / ds.labels.size
    assert share.max() / share.min() < 1.25, share


def test_synthetic_colour_does_not_identify_kind():
    """Mean object colour gives a near-chance nearest-centroid classifier."""
    k = 4
    ds = SyntheticSegmentation(120, image_size=(48, 48), num_kinds=k, seed=1)
    feats, kinds = [], []
    for img, lab in zip(ds.images, ds.labels):
        for kind in range(1, k + 1):
            m = lab == kind
            if m.sum() >= 20:
                feats.append(img[m].mean(0) / 255.0)
                kinds.append(kind)
    feats, kinds = np.array(feats), np.array(kinds)
    centroids = np.stack([feats[kinds == c].mean(0) for c in range(1, k + 1)])
    pred = np.argmin(((feats[:, None] - centroids[None]) ** 2).sum(-1), 1) + 1
    acc = (pred == kinds).mean()
    assert len(kinds) > 150
    assert acc < 1.0 / k + 0.15, f"colour alone predicts the kind with accuracy {acc:.2f}"


# --------------------------------------------------------------------------- factories

def test_factories_synthetic_and_errors():
    cfg = {"name": "synthetic", "num_train": 6, "num_eval": 4, "num_kinds": 3,
           "image_size": [40, 40], "input_size": [40, 40], "crop_size": [32, 32],
           "scale_range": [0.75, 1.25]}
    tr = build_seg_dataset(cfg, "train", train=True, seed=0)
    ev = build_seg_dataset(cfg, "val", train=False, seed=0)
    assert len(tr) == 6 and len(ev) == 4 and seg_num_classes(cfg) == 4 == tr.num_classes
    assert tr[0][0].shape == (3, 32, 32) and ev[0][1].shape == (40, 40)
    assert "SyntheticSegmentation" in tr.describe()
    ccfg = {"name": "synthetic", "num_train": 8, "num_eval": 4, "num_kinds": 3, "image_size": [32, 32]}
    ctr = build_cls_dataset(ccfg, "train", train=True)
    assert cls_num_classes(ccfg) == 3 == ctr.num_classes and ctr[0][0].shape == (3, 32, 32)
    assert seg_num_classes({"name": "camvid"}) == 11
    _expect_data_error(lambda: build_seg_dataset({"name": "mapillary"}, "train", True), "name", "mapillary")
    _expect_data_error(lambda: build_cls_dataset({"name": "mnist"}, "train", True), "name", "mnist")
    _expect_data_error(lambda: build_seg_dataset({"name": "synthetic"}, "train", True), "num_train")
    _expect_data_error(lambda: build_seg_dataset(dict(cfg, crop_size=[0, 3]), "train", True), "crop_size", "[0, 3]")


def test_build_seg_dataset_camvid(tmp_path):
    root = make_camvid(tmp_path / "camvid", h=24, w=32)
    cfg = {"name": "camvid", "root": str(root), "input_size": [12, 16], "crop_size": [8, 8]}
    tr = build_seg_dataset(cfg, "train", train=True, seed=0)
    img, lab = tr[0]
    assert img.shape == (3, 8, 8) and lab.shape == (8, 8)
    ev = build_seg_dataset(cfg, "train", train=False)
    img, lab = ev[0]
    assert img.shape == (3, 12, 16) and lab.shape == (24, 32)
    _expect_data_error(lambda: build_seg_dataset({"name": "camvid"}, "train", False), "root")


def test_cls_full_scan_stops_the_run_before_anything_is_written(tmp_path, capsys):
    """data.cls.validate: true finds a corrupt classification image before any stage starts."""
    import yaml
    from segprune.cli import main
    from conftest import TINY
    root = make_imagefolder(tmp_path / "imf")
    (root / "val" / "ant" / "ant_0.png").write_bytes(b"\x89PNG garbage")
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    cfg["data"]["cls"] = {"name": "imagefolder", "root": str(root), "input_size": [8, 8], "batch_size": 2,
                          "eval_batch_size": 2, "validate": True}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["run", str(p), "--out", str(out), "--quiet"]) == 2
    assert "ant_0.png" in capsys.readouterr().err
    assert not (out / "stages").exists()


def test_unreadable_folders_and_list_files_are_data_errors(tmp_path, monkeypatch):
    """Permission denied (simulated: the tests run as root, where chmod 000 does not block) on a
    split list, a class folder or a dataset folder: a DataError naming the path, not a traceback."""
    import os

    cam = make_camvid(tmp_path / "cam", n=2)
    folder = make_imagefolder(tmp_path / "img")
    real_read, real_scandir = Path.read_text, os.scandir

    def deny_read(self, *a, **k):
        if self.name == "train.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *a, **k)

    def deny_scandir(path="."):
        if Path(path).parent.name == "train":  # a class folder of the image-folder split
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(Path, "read_text", deny_read)
    _expect_data_error(lambda: CamVid(cam, "train", None), "cannot read CamVid split list", "train.txt",
                       "PermissionError")
    monkeypatch.setattr(os, "scandir", deny_scandir)
    _expect_data_error(lambda: ImageFolderDataset(folder, "train", None), "cannot list class folder",
                       str(folder / "train"), "PermissionError")
