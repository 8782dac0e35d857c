"""Procedurally generated segmentation and classification sets (the ``segprune demo`` data).

Both sets share one visual vocabulary of ``K`` object *kinds*. A kind is a
shape family filled with a kind-specific texture:

====  ========  ==========================================
kind  shape     texture
====  ========  ==========================================
0     disc      horizontal stripes, period ~5 px
1     square    checkerboard, cell ~3 px (shape rotated)
2     triangle  vertical stripes, period ~5 px
3     ring      dot grid, period ~5 px
4     cross     diagonal stripes (45 deg), period ~6 px
5     ellipse   diagonal stripes (135 deg), period ~6 px
====  ========  ==========================================

Every shape covers about the same area at the same size (``AREA_SCALE``), so no kind is rarer in
pixels than another. The two colours of every texture are drawn independently of the kind, so
colour alone does not identify a kind; shape and texture do. Objects sit on a
random low-frequency two-colour background together with untextured
(flat-colour) distractor shapes that belong to the background class, so shape
or colour edges alone are not enough; Gaussian pixel noise is added everywhere. Masks are hard (no anti-aliasing), so label maps are exact per
pixel. Each sample is generated from its own seed ``(tag, seed, split, index)``,
so sample ``i`` does not depend on ``num_samples`` and different splits use
disjoint seed streams. Generation is numpy-only (about 0.3 ms per 64x64 image).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import DataError
from .transforms import ClsEvalTransform, SegEvalTransform

__all__ = ["KindSpec", "KINDS", "AREA_SCALE", "SyntheticSegmentation", "SyntheticClassification", "render_object"]


@dataclass(frozen=True)
class KindSpec:
    """One object kind: a shape family and its texture.

    Attributes:
        shape: ``"disc" | "square" | "triangle" | "ring" | "cross" | "ellipse"``.
        texture: ``"stripes" | "checker" | "dots"``.
        angle: texture orientation in degrees (stripe normal / checker axes).
        period: texture period in pixels.
    """

    shape: str
    texture: str
    angle: float
    period: float


KINDS: tuple[KindSpec, ...] = (
    KindSpec("disc", "stripes", 90.0, 5.0),
    KindSpec("square", "checker", 0.0, 6.0),
    KindSpec("triangle", "stripes", 0.0, 5.0),
    KindSpec("ring", "dots", 0.0, 5.0),
    KindSpec("cross", "stripes", 45.0, 6.0),
    KindSpec("ellipse", "stripes", 135.0, 6.0),
)

#: area of each shape at size parameter r = 1 (``_shape_mask``): disc π, ring π(1 − 0.5²), square (1.6)²,
#: triangle (3√3/4)(1.1)² (equilateral, circumradius 1.1), cross 2·(0.64·2) − 0.64², ellipse π·0.55
_UNIT_AREA = {"disc": math.pi, "ring": 0.75 * math.pi, "square": 1.6 ** 2, "triangle": 3 * math.sqrt(3) / 4 * 1.1 ** 2,
              "cross": 2 * (0.64 * 2.0) - 0.64 ** 2, "ellipse": 0.55 * math.pi}
#: size factor that gives every shape the disc's area π·radius² at the same ``radius`` (equal-area radius).
#: Without it a triangle covered half a disc's pixels, and the demo's triangle class was often never learned
#: (IoU 0-1.5 % in 4 of 4 runs at width 0.125; docs/results/demo.md, "How the demo got here").
AREA_SCALE = {shape: math.sqrt(math.pi / a) for shape, a in _UNIT_AREA.items()}

_SEG_TAG, _CLS_TAG = 0x5E6, 0xC15
_NOISE_STD = 0.05  # pixel noise, in [0, 1] intensity units


def _split_code(split: str) -> int:
    return zlib.crc32(split.encode("utf-8"))


def _check_args(num_samples: int, image_size, num_kinds: int) -> tuple[int, tuple[int, int], int]:
    if int(num_samples) < 1:
        raise DataError(f"synthetic dataset: num_samples must be >= 1, got {num_samples!r}")
    if not (1 <= int(num_kinds) <= len(KINDS)):
        raise DataError(f"synthetic dataset: num_kinds must be in 1..{len(KINDS)}, got {num_kinds!r}")
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise DataError(f"synthetic dataset: image_size must be [H, W], got {image_size!r}") from None
    if h < 16 or w < 16:
        raise DataError(f"synthetic dataset: image_size must be at least 16x16, got {image_size!r}")
    return int(num_samples), (h, w), int(num_kinds)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Random low-frequency two-colour texture, float32 ``(h, w, 3)`` in [0, 1]."""
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    field = np.zeros((h, w), np.float32)
    for _ in range(3):
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(0.6, 2.0) * max(h, w)
        k = 2 * math.pi / period
        field += np.sin(k * (math.cos(theta) * xx + math.sin(theta) * yy) + rng.uniform(0, 2 * math.pi))
    field = (field - field.min()) / max(float(field.max() - field.min()), 1e-6)
    c1 = rng.uniform(0.1, 0.9, 3).astype(np.float32)
    c2 = rng.uniform(0.1, 0.9, 3).astype(np.float32)
    return c1 + field[..., None] * (c2 - c1)


def _shape_mask(spec: KindSpec, u: np.ndarray, v: np.ndarray, r: float, rot: float) -> np.ndarray:
    """Boolean mask of ``spec.shape`` centred at the origin of offsets ``(u, v)`` (x, y)."""
    c, s = math.cos(rot), math.sin(rot)
    a, b = c * u + s * v, -s * u + c * v  # rotated coordinates
    d2 = u * u + v * v
    if spec.shape == "disc":
        return d2 <= r * r
    if spec.shape == "ring":
        return (d2 <= r * r) & (d2 >= (0.5 * r) ** 2)
    if spec.shape == "square":
        return np.maximum(np.abs(a), np.abs(b)) <= 0.8 * r
    if spec.shape == "cross":
        arm = 0.32 * r
        return ((np.abs(a) <= arm) & (np.abs(b) <= r)) | ((np.abs(b) <= arm) & (np.abs(a) <= r))
    if spec.shape == "ellipse":
        return (a / r) ** 2 + (b / (0.55 * r)) ** 2 <= 1.0
    if spec.shape == "triangle":
        R = 1.1 * r  # circumradius; inside iff on the inner side of all three edges
        inside = np.ones(u.shape, bool)
        for k in range(3):
            phi = math.pi / 2 + 2 * math.pi * k / 3 + math.pi / 3  # outward edge normal
            inside &= (math.cos(phi) * a + math.sin(phi) * b) <= 0.5 * R
        return inside
    raise ValueError(f"unknown shape {spec.shape!r}")


def _texture(spec: KindSpec, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Binary texture pattern (float32, 0 or 1) evaluated at image coordinates ``(x, y)``."""
    ang = math.radians(spec.angle + rng.uniform(-8.0, 8.0))
    period = spec.period * rng.uniform(0.9, 1.1)
    c, s = math.cos(ang), math.sin(ang)
    p = c * x + s * y + rng.uniform(0, period)
    q = -s * x + c * y + rng.uniform(0, period)
    if spec.texture == "stripes":
        t = np.mod(p, period) < period / 2
    elif spec.texture == "checker":
        cell = period / 2
        t = (np.floor(p / cell) + np.floor(q / cell)) % 2 == 0
    elif spec.texture == "dots":
        dp, dq = np.mod(p, period) - period / 2, np.mod(q, period) - period / 2
        t = dp * dp + dq * dq > (0.32 * period) ** 2  # 1 = base colour, 0 = dot
    else:
        raise ValueError(f"unknown texture {spec.texture!r}")
    return t.astype(np.float32)


def render_object(
    canvas: np.ndarray,
    label: np.ndarray | None,
    kind: int,
    center: tuple[float, float],
    radius: float,
    rng: np.random.Generator,
    label_value: int | None = None,
    solid: bool = False,
) -> np.ndarray:
    """Paint one object of ``KINDS[kind]`` onto ``canvas`` in place.

    Args:
        canvas: float32 ``(H, W, 3)`` image in [0, 1].
        label: optional integer ``(H, W)`` map; pixels covered get ``label_value``.
        kind: index into :data:`KINDS`.
        center: ``(cy, cx)`` in pixels.
        radius: object size in pixels, as an equal-area radius: every shape covers about π·radius²
            pixels (its size parameter is ``radius · AREA_SCALE[shape]``).
        rng: randomness for rotation, colours and texture phase.
        label_value: value written into ``label`` (default ``kind + 1``).
        solid: paint a single flat colour instead of the kind's texture (used for
            background distractors, which are not written into ``label``).

    Returns:
        Boolean ``(H, W)`` mask of the painted pixels.
    """
    spec = KINDS[kind]
    radius = radius * AREA_SCALE[spec.shape]
    h, w = canvas.shape[:2]
    cy, cx = center
    ext = 1.2 * radius + 1
    y0, y1 = max(0, int(cy - ext)), min(h, int(math.ceil(cy + ext)) + 1)
    x0, x1 = max(0, int(cx - ext)), min(w, int(math.ceil(cx + ext)) + 1)
    full = np.zeros((h, w), bool)
    if y0 >= y1 or x0 >= x1:
        return full
    ys = np.arange(y0, y1, dtype=np.float32)[:, None]
    xs = np.arange(x0, x1, dtype=np.float32)[None, :]
    u, v = xs - cx, ys - cy
    u, v = np.broadcast_to(u, (y1 - y0, x1 - x0)), np.broadcast_to(v, (y1 - y0, x1 - x0))
    mask = _shape_mask(spec, u, v, radius, rng.uniform(0, 2 * math.pi))
    if solid:
        t = np.ones(u.shape, np.float32)
    else:
        t = _texture(spec, np.broadcast_to(xs, u.shape), np.broadcast_to(ys, u.shape), rng)
    col_a = rng.uniform(0.1, 0.95, 3).astype(np.float32)
    col_b = (col_a * rng.uniform(0.2, 0.5)).astype(np.float32)
    if rng.random() < 0.5:  # light-on-dark or dark-on-light, independent of kind
        col_a, col_b = col_b, col_a
    patch = col_b + t[..., None] * (col_a - col_b)
    region = canvas[y0:y1, x0:x1]
    region[mask] = patch[mask]
    if label is not None and not solid:
        label[y0:y1, x0:x1][mask] = kind + 1 if label_value is None else label_value
    full[y0:y1, x0:x1] = mask
    return full


def _finish(canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = canvas + rng.normal(0.0, _NOISE_STD, canvas.shape).astype(np.float32)
    return np.clip(np.rint(noisy * 255.0), 0, 255).astype(np.uint8)


def _kind_names(num_kinds: int) -> list[str]:
    return [KINDS[k].shape for k in range(num_kinds)]


class _SyntheticBase(Dataset):
    images: np.ndarray
    split: str
    seed: int
    epoch: int

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used to derive per-item augmentation RNGs."""
        self.epoch = int(epoch)

    def _item_rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])


class SyntheticSegmentation(_SyntheticBase):
    """Synthetic scenes with 1-4 (possibly overlapping) objects and exact label maps.

    Each scene also holds 0-2 flat-colour distractor shapes (label 0), drawn first.

    Args:
        num_samples: number of images (all generated in ``__init__``).
        image_size: ``(H, W)`` in pixels (at least 16x16).
        num_kinds: ``K`` object kinds, 1..6.
        seed: generation seed; also the base seed of the augmentation RNG.
        split: any string; different splits get disjoint generation seeds.
        transform: paired transform ``(PIL image, label array, rng) -> (image, label)``;
            ``None`` means ``SegEvalTransform(None)``.
        ignore_index: ignore value (never present in the raw labels; used by
            transforms for padding).

    Attributes:
        images: uint8 ``(N, H, W, 3)``; labels: uint8 ``(N, H, W)`` with
        0 = background and ``1..K`` = kinds. ``num_classes = K + 1``.

    Items:
        ``(float32 (3, h, w), int64 (h, w))``.

    Raises:
        DataError: invalid ``num_samples``, ``image_size`` or ``num_kinds``.
    """

    def __init__(
        self,
        num_samples: int,
        image_size: tuple[int, int] = (64, 64),
        num_kinds: int = 4,
        seed: int = 0,
        split: str = "train",
        transform: Callable | None = None,
        ignore_index: int = 255,
    ) -> None:
        n, (h, w), k = _check_args(num_samples, image_size, num_kinds)
        self.image_size, self.num_kinds, self.split = (h, w), k, split
        self.seed, self.epoch = int(seed), 0
        self.num_classes = k + 1
        self.ignore_index = int(ignore_index)
        self.classes = ["background"] + _kind_names(k)
        self.transform = transform if transform is not None else SegEvalTransform(None)
        self.images = np.empty((n, h, w, 3), np.uint8)
        self.labels = np.empty((n, h, w), np.uint8)
        code = _split_code(split)
        for i in range(n):
            rng = np.random.default_rng([_SEG_TAG, self.seed, code, i])
            self.images[i], self.labels[i] = self._generate(rng)

    def _generate(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.image_size
        canvas = _background(rng, h, w)
        label = np.zeros((h, w), np.uint8)
        m = min(h, w)
        for _ in range(int(rng.integers(0, 3))):  # untextured distractors = background
            r = rng.uniform(0.08, 0.18) * m
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            kind = int(rng.integers(0, self.num_kinds))
            render_object(canvas, label, kind, (cy, cx), r, rng, solid=True)
        for _ in range(int(rng.integers(1, 5))):
            kind = int(rng.integers(0, self.num_kinds))
            r = rng.uniform(0.11, 0.22) * m
            cy, cx = rng.uniform(0.5 * r, h - 0.5 * r), rng.uniform(0.5 * r, w - 0.5 * r)
            render_object(canvas, label, kind, (cy, cx), r, rng)
        return _finish(canvas, rng), label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = Image.fromarray(self.images[index])
        return self.transform(image, self.labels[index], self._item_rng(index))

    def describe(self) -> str:
        """Short one-line description for logs."""
        h, w = self.image_size
        return f"SyntheticSegmentation(split={self.split}, n={len(self)}, K={self.num_kinds}, {h}x{w})"

    def __repr__(self) -> str:
        return self.describe()


class SyntheticClassification(_SyntheticBase):
    """Synthetic images with one roughly centred object; class = kind index.

    Classes are balanced: sample ``i`` has class ``i % K``. Half of the images also
    hold a small flat-colour distractor shape near a corner.

    Args:
        num_samples: number of images (all generated in ``__init__``).
        image_size: ``(H, W)`` in pixels (at least 16x16).
        num_kinds: ``K`` classes, 1..6; same kinds as :class:`SyntheticSegmentation`.
        seed: generation seed; also the base seed of the augmentation RNG.
        split: any string; different splits get disjoint generation seeds.
        transform: ``(PIL image, rng) -> float32 (3, H, W)``; ``None`` means
            ``ClsEvalTransform(None)``.

    Attributes:
        images: uint8 ``(N, H, W, 3)``; targets: int64 ``(N,)``. ``num_classes = K``.

    Items:
        ``(float32 (3, H, W), int)``.

    Raises:
        DataError: invalid ``num_samples``, ``image_size`` or ``num_kinds``.
    """

    def __init__(
        self,
        num_samples: int,
        image_size: tuple[int, int] = (32, 32),
        num_kinds: int = 4,
        seed: int = 0,
        split: str = "train",
        transform: Callable | None = None,
    ) -> None:
        n, (h, w), k = _check_args(num_samples, image_size, num_kinds)
        self.image_size, self.num_kinds, self.split = (h, w), k, split
        self.seed, self.epoch = int(seed), 0
        self.num_classes = k
        self.classes = _kind_names(k)
        self.transform = transform if transform is not None else ClsEvalTransform(None)
        self.images = np.empty((n, h, w, 3), np.uint8)
        self.targets = np.arange(n, dtype=np.int64) % k
        code = _split_code(split)
        for i in range(n):
            rng = np.random.default_rng([_CLS_TAG, self.seed, code, i])
            canvas = _background(rng, h, w)
            m = min(h, w)
            if rng.random() < 0.5:  # one small untextured distractor near a corner
                r = rng.uniform(0.12, 0.2) * m
                cy = rng.choice([0.12, 0.88]) * h + rng.uniform(-0.05, 0.05) * h
                cx = rng.choice([0.12, 0.88]) * w + rng.uniform(-0.05, 0.05) * w
                render_object(canvas, None, int(rng.integers(0, k)), (cy, cx), r, rng, solid=True)
            r = rng.uniform(0.25, 0.38) * m
            cy = h / 2 + rng.uniform(-0.12, 0.12) * h
            cx = w / 2 + rng.uniform(-0.12, 0.12) * w
            render_object(canvas, None, int(self.targets[i]), (cy, cx), r, rng)
            self.images[i] = _finish(canvas, rng)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[index])
        return self.transform(image, self._item_rng(index)), int(self.targets[index])

    def describe(self) -> str:
        """Short one-line description for logs."""
        h, w = self.image_size
        return f"SyntheticClassification(split={self.split}, n={len(self)}, K={self.num_kinds}, {h}x{w})"

    def __repr__(self) -> str:
        return self.describe()
