"""Paired image/label transforms for segmentation and image transforms for classification.

All randomness comes from an explicit :class:`numpy.random.Generator` passed to
``__call__`` (the datasets derive it from ``(seed, epoch, index)``), so results
do not depend on the number of DataLoader workers or on global RNG state.

Conventions
-----------
* Sizes are ``(H, W)`` in pixels (note: PIL uses ``(W, H)``; the conversion is
  done here).
* Images go in as ``PIL.Image.Image`` and come out as ``torch.float32`` tensors
  of shape ``(3, H, W)``, scaled to [0, 1] then normalised per channel with
  ``(x - mean) / std``.
* Segmentation labels go in as integer ``numpy`` arrays of shape ``(H, W)`` and
  come out as ``torch.int64`` tensors of shape ``(H, W)``. Labels are only ever
  resized with nearest-neighbour sampling, so no new label values are created.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SegTrainTransform",
    "SegEvalTransform",
    "ClsTrainTransform",
    "ClsEvalTransform",
    "to_tensor_normalized",
    "resize_label_nearest",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_BILINEAR = Image.Resampling.BILINEAR


def _as_size(size: Sequence[int] | None, name: str) -> tuple[int, int] | None:
    """Validate an ``(H, W)`` size; ``None`` passes through. Raises ``ValueError``."""
    if size is None:
        return None
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (H, W) of positive ints, got {size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be a pair (H, W) of positive ints, got {size!r}")
    return h, w


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _resize_image(image: Image.Image, size_hw: tuple[int, int]) -> Image.Image:
    """Bilinear resize of a PIL image to ``(H, W)``; no-op when already that size."""
    h, w = size_hw
    if image.size == (w, h):
        return image
    return image.resize((w, h), _BILINEAR)


def resize_label_nearest(label: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer label map.

    Args:
        label: array of shape ``(H, W)``, any integer dtype.
        size_hw: target ``(h, w)`` in pixels.

    Returns:
        Array of shape ``(h, w)`` with the same dtype; every output value is a
        value of ``label`` (pixel-centre sampling, same convention as PIL NEAREST).
    """
    in_h, in_w = label.shape
    h, w = size_hw
    if (h, w) == (in_h, in_w):
        return label
    rows = np.minimum(((np.arange(h) + 0.5) * (in_h / h)).astype(np.int64), in_h - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * (in_w / w)).astype(np.int64), in_w - 1)
    return label[rows[:, None], cols[None, :]]


def _normalized_hwc(
    image: Image.Image, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """RGB image -> float32 ``(H, W, 3)`` array ``(x / 255 - mean) / std`` (numpy, no torch threads)."""
    arr = np.asarray(_rgb(image), dtype=np.uint8)
    scale = (1.0 / (255.0 * np.asarray(std, np.float32))).astype(np.float32)
    offset = (-np.asarray(mean, np.float32) / np.asarray(std, np.float32)).astype(np.float32)
    return arr.astype(np.float32) * scale + offset


def _chw_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def to_tensor_normalized(
    image: Image.Image,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Convert a PIL image (any mode; converted to RGB) to a normalised tensor.

    Returns:
        ``torch.float32`` tensor of shape ``(3, H, W)``: ``(x / 255 - mean) / std``.
    """
    return _chw_tensor(_normalized_hwc(image, mean, std))


def _label_tensor(label: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))


# Note: the random geometry below is done in numpy on purpose. Small torch ops
# (notably reflect padding) can be orders of magnitude slower in the main process
# when torch uses several intra-op threads.


class SegTrainTransform:
    """Training augmentation for an (image, label) pair.

    Pipeline: optional resize to ``base_size`` (image bilinear, label nearest) ->
    random scale ``s ~ U(scale_range)`` (image bilinear, label nearest) -> to
    tensor + normalise -> pad to at least ``crop_size`` (image with 0, i.e. the
    mean colour after normalisation; label with ``ignore_index``; padding is
    added at the bottom/right) -> random crop of ``crop_size`` -> horizontal
    flip with probability 0.5 (image and label together).

    Args:
        base_size: ``(H, W)`` to resize to first, or ``None`` to keep the input size.
        crop_size: ``(h, w)`` of the output.
        scale_range: ``(lo, hi)`` bounds of the uniform random scale factor.
        hflip: enable random horizontal flips.
        ignore_index: label value used for padded pixels.
        mean, std: per-channel normalisation constants (for [0, 1] inputs).

    Raises:
        ValueError: invalid sizes or scale range (at construction), or image and
            label sizes that differ (at call time).
    """

    def __init__(
        self,
        base_size: tuple[int, int] | None,
        crop_size: tuple[int, int],
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip: bool = True,
        ignore_index: int = 255,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.base_size = _as_size(base_size, "base_size")
        self.crop_size = _as_size(crop_size, "crop_size")
        if self.crop_size is None:
            raise ValueError("crop_size must be a pair (H, W) of positive ints, got None")
        lo, hi = (float(v) for v in scale_range)
        if not (0 < lo <= hi):
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range!r}")
        self.scale_range = (lo, hi)
        self.hflip = bool(hflip)
        self.ignore_index = int(ignore_index)
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(
        self, image: Image.Image, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the augmentation.

        Args:
            image: PIL image (converted to RGB if needed), size ``(W, H)`` in PIL terms.
            label: integer array of shape ``(H, W)``.
            rng: source of all randomness.

        Returns:
            ``(image, label)``: ``float32 (3, h, w)`` and ``int64 (h, w)`` with
            ``(h, w) == crop_size``.
        """
        label = np.asarray(label)
        if label.shape != (image.size[1], image.size[0]):
            raise ValueError(
                f"image size (H, W)={(image.size[1], image.size[0])} does not match "
                f"label shape {label.shape}"
            )
        image = _rgb(image)
        if self.base_size is not None:
            image = _resize_image(image, self.base_size)
            label = resize_label_nearest(label, self.base_size)

        lo, hi = self.scale_range
        s = float(rng.uniform(lo, hi)) if hi > lo else lo
        h0, w0 = label.shape
        sh, sw = max(1, int(round(h0 * s))), max(1, int(round(w0 * s)))
        image = _resize_image(image, (sh, sw))
        label = resize_label_nearest(label, (sh, sw))

        img = _normalized_hwc(image, self.mean, self.std)
        lab = label.astype(np.int64, copy=False)

        ch, cw = self.crop_size
        pad_h, pad_w = max(0, ch - sh), max(0, cw - sw)
        if pad_h or pad_w:
            img = np.pad(img, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0.0)
            lab = np.pad(lab, ((0, pad_h), (0, pad_w)), constant_values=self.ignore_index)
        H, W = lab.shape
        top = int(rng.integers(0, H - ch + 1))
        left = int(rng.integers(0, W - cw + 1))
        img = img[top : top + ch, left : left + cw]
        lab = lab[top : top + ch, left : left + cw]

        if self.hflip and rng.random() < 0.5:
            img = img[:, ::-1]
            lab = lab[:, ::-1]
        return _chw_tensor(img), _label_tensor(lab)

    def __repr__(self) -> str:
        return (
            f"SegTrainTransform(base_size={self.base_size}, crop_size={self.crop_size}, "
            f"scale_range={self.scale_range}, hflip={self.hflip}, ignore_index={self.ignore_index})"
        )


class ClsTrainTransform:
    """Classification training augmentation (CIFAR-style).

    Pipeline: resize to ``input_size`` (bilinear, skipped when already that size)
    -> to tensor + normalise -> pad ``pad`` pixels on every side -> random crop
    back to ``input_size`` -> horizontal flip with probability 0.5.

    Args:
        input_size: ``(H, W)`` of the output.
        pad: padding in pixels for the random crop (0 disables cropping).
        padding_mode: ``"reflect"`` (default) or ``"zero"`` (0 after
            normalisation, i.e. the mean colour). Reflect padding needs
            ``pad < min(H, W)``; for smaller inputs zero padding is used.
        hflip: enable random horizontal flips.
        mean, std: per-channel normalisation constants.

    Raises:
        ValueError: invalid size, negative pad or unknown padding mode.
    """

    def __init__(
        self,
        input_size: tuple[int, int],
        pad: int = 4,
        padding_mode: str = "reflect",
        hflip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.input_size = _as_size(input_size, "input_size")
        if self.input_size is None:
            raise ValueError("input_size must be a pair (H, W) of positive ints, got None")
        if int(pad) < 0:
            raise ValueError(f"pad must be >= 0, got {pad!r}")
        if padding_mode not in ("reflect", "zero"):
            raise ValueError(f"padding_mode must be 'reflect' or 'zero', got {padding_mode!r}")
        self.pad = int(pad)
        self.padding_mode = padding_mode
        self.hflip = bool(hflip)
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        """Returns a ``float32`` tensor of shape ``(3, H, W)`` with ``(H, W) == input_size``."""
        img = _normalized_hwc(_resize_image(_rgb(image), self.input_size), self.mean, self.std)
        h, w = self.input_size
        p = self.pad
        if p > 0:
            # reflect padding needs pad < dim; fall back to zero padding for tiny inputs
            if self.padding_mode == "reflect" and p < h and p < w:
                img = np.pad(img, ((p, p), (p, p), (0, 0)), mode="reflect")
            else:
                img = np.pad(img, ((p, p), (p, p), (0, 0)), constant_values=0.0)
            top = int(rng.integers(0, 2 * p + 1))
            left = int(rng.integers(0, 2 * p + 1))
            img = img[top : top + h, left : left + w]
        if self.hflip and rng.random() < 0.5:
            img = img[:, ::-1]
        return _chw_tensor(img)

    def __repr__(self) -> str:
        return (
            f"ClsTrainTransform(input_size={self.input_size}, pad={self.pad}, "
            f"padding_mode={self.padding_mode!r}, hflip={self.hflip})"
        )


class ClsEvalTransform:
    """Classification evaluation transform: resize to ``input_size`` (bilinear) and normalise.

    Args:
        input_size: ``(H, W)`` of the output, or ``None`` to keep the input size.
        mean, std: per-channel normalisation constants.
    """

    def __init__(
        self,
        input_size: tuple[int, int] | None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.input_size = _as_size(input_size, "input_size")
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Returns a ``float32`` tensor of shape ``(3, H, W)``; ``rng`` is unused."""
        image = _rgb(image)
        if self.input_size is not None:
            image = _resize_image(image, self.input_size)
        return to_tensor_normalized(image, self.mean, self.std)

    def __repr__(self) -> str:
        return f"ClsEvalTransform(input_size={self.input_size})"


class SegEvalTransform(ClsEvalTransform):
    """Evaluation transform: resize the image only; the label keeps its resolution.

    The evaluator is expected to upsample logits to the label size, so metrics
    are computed at the original annotation resolution.

    Args:
        input_size: ``(H_in, W_in)`` for the network input (bilinear), or ``None`` to keep.
        mean, std: per-channel normalisation constants.

    Raises:
        ValueError: invalid ``input_size``.
    """

    def __call__(
        self, image: Image.Image, label: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(float32 (3, H_in, W_in), int64 (H_lab, W_lab))``; ``rng`` is unused."""
        return super().__call__(image), _label_tensor(np.asarray(label))

    def __repr__(self) -> str:
        return f"SegEvalTransform(input_size={self.input_size})"
