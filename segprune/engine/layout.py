"""Memory format of the training loops: ``train.channels_last: true | false`` (default false).

With ``true`` every training loop (pre-training, segmentation training, the methods' sparsity
training including MTP's two steps and ACoSP, fine-tuning) converts the modules it trains to
``torch.channels_last`` (the 4-D convolution weights become NHWC; 1-D tensors such as γ, β and the
BatchNorm statistics are unaffected) and feeds its 4-D image batches in the same format, on CUDA and
on the CPU. The modules are converted back to the default (contiguous) format when the loop ends, so
pruning, evaluation, export and checkpoints (which store contiguous tensors anyway) see what they
saw before. The memory format changes which kernels run, hence the rounding, not the mathematics:
tests/test_channels_last.py measures the difference. The pipeline sets the mode around each stage
with :func:`channels_last_mode`; the loops call :func:`training_layout`.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn

__all__ = ["channels_last_mode", "channels_last_enabled", "training_layout"]

_MODE: contextvars.ContextVar[bool] = contextvars.ContextVar("segprune_channels_last", default=False)


@contextlib.contextmanager
def channels_last_mode(enabled: bool | None):
    """Within the block, training loops use the channels-last memory format if ``enabled`` (``None`` = False).

    Raises:
        ValueError: ``enabled`` not a bool or None (the message names ``train.channels_last``).
    """
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"train.channels_last={enabled!r} must be true or false")
    token = _MODE.set(bool(enabled))
    try:
        yield
    finally:
        _MODE.reset(token)


def channels_last_enabled() -> bool:
    """The mode set by the innermost :func:`channels_last_mode` (False outside any)."""
    return _MODE.get()


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@contextlib.contextmanager
def training_layout(*modules: nn.Module):
    """Inside: with :func:`channels_last_enabled`, the 4-D parameters and buffers of ``modules`` are
    channels-last (the same ``Parameter`` objects, so optimizers and hooks keep working), and the
    yielded ``fmt(x)`` returns a 4-D tensor (N, C, H, W) in channels-last format (other tensors
    unchanged). On exit (also on errors) the modules are converted back to the contiguous format.
    When the mode is off: nothing is converted and ``fmt`` returns its argument."""
    if not channels_last_enabled():
        yield _same
        return
    for m in modules:
        m.to(memory_format=torch.channels_last)
    try:
        yield _nhwc
    finally:
        for m in modules:
            m.to(memory_format=torch.contiguous_format)
