"""Mixed precision for the training loops: ``train.amp: bf16 | fp16 | off``.

The pipeline (and ``segprune.api.prune_model(amp=...)``) sets the mode around each stage with
:func:`amp_mode`; the loops that support it build an :class:`Amp` for their device and run the
forward pass and the loss under its autocast. Autocast casts the *inputs* of matmuls and
convolutions to the low precision; parameters, their gradients, optimizer state, BatchNorm
statistics, BN scaling factors γ, MTP's multipliers E and μ, and the loss (computed from float32
logits) stay float32. With ``fp16`` a ``GradScaler`` scales the loss; every gradient edit a method
makes after ``backward`` (ℓ1 sub-gradients, MTP's coupling terms, CAP's guidance) sees unscaled
gradients, because :meth:`Amp.backward` unscales them before returning. fp16 needs CUDA; bf16 runs
on the CPU too (what the tests use). Evaluation always runs in float32.

Every training loop uses it: pre-training, segmentation training, the baselines' sparsity training,
fine-tuning, MTP's W1 step (Eq. 7) and W2/W3 step (Eqs. 8-9), each with its own loss scale (its own
optimizer), and ACoSP's mask training. MTP's coupling step, proximal ℓ1 step and multiplier update
(Eq. 10) act on the float32 parameters outside autocast, after the optimiser step; with fp16, an
iteration whose gradient overflowed skips them as well (:meth:`Amp.step` returns False). ACoSP's
mask logits stay float32 (the mask is computed from them and cast to the activation's dtype).
Several processes: the gradients are summed over ranks during ``backward`` (DistributedDataParallel),
before the unscale, so every rank sees the same inf/NaN check and skips the same steps.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

__all__ = ["AMP_MODES", "amp_mode", "current_amp", "Amp"]

AMP_MODES = ("off", "bf16", "fp16")
_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("segprune_amp", default="off")


@contextlib.contextmanager
def amp_mode(mode: str | None):
    """Within the block, training loops run with mixed precision ``mode`` (``None`` = ``"off"``).

    Raises:
        ValueError: ``mode`` not one of :data:`AMP_MODES`.
    """
    mode = "off" if mode is None else mode
    if mode not in AMP_MODES:
        raise ValueError(f"train.amp={mode!r} must be one of {', '.join(AMP_MODES)}")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def current_amp() -> str:
    """The mode set by the innermost :func:`amp_mode` (``"off"`` outside any)."""
    return _MODE.get()


class Amp:
    """Autocast and (fp16) gradient scaling of one training loop on ``device``.

    Args:
        device: the model's device.
        mode: ``"off"``, ``"bf16"`` or ``"fp16"``; default :func:`current_amp`.

    Raises:
        ValueError: ``fp16`` on a device that is not CUDA.
    """

    def __init__(self, device: torch.device, mode: str | None = None):
        self.device = torch.device(device)
        self.mode = current_amp() if mode is None else mode
        if self.mode not in AMP_MODES:
            raise ValueError(f"train.amp={self.mode!r} must be one of {', '.join(AMP_MODES)}")
        if self.mode == "fp16" and self.device.type != "cuda":
            raise ValueError("train.amp=fp16 needs a CUDA device (float16 autocast with loss scaling); "
                             "use train.amp=bf16 on the CPU")
        self.enabled = self.mode != "off"
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mode)
        # fp16 only (run on an H200: docs/results/gpu.md)
        self.scaler = torch.amp.GradScaler("cuda") if self.mode == "fp16" else None

    def autocast(self):
        """Context for the forward pass and the loss (a no-op when off)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        """``loss.backward()`` (scaled with fp16), then unscale ``opt``'s gradients, so that what
        runs before :meth:`step` sees true gradients."""
        if self.scaler is None:
            loss.backward()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(opt)

    def step(self, opt: torch.optim.Optimizer, report: bool = False) -> bool:
        """``opt.step()``; with fp16 skipped when a gradient is inf/NaN, and the scale updated.

        Returns:
            True if the step was taken, False if fp16 skipped it. Without fp16 always True. With fp16
            and ``report``, known from the loss scale (``GradScaler.update`` lowers it exactly when a
            gradient was inf/NaN; two host syncs, so only MTP asks); without ``report``, True.
        """
        if self.scaler is None:
            opt.step()
            return True
        before = self.scaler.get_scale() if report else None
        self.scaler.step(opt)
        self.scaler.update()
        return True if before is None else self.scaler.get_scale() >= before
