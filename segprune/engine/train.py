"""Training loops: segmentation (poly LR), classification (linear LR), with step hooks.

All loops are plain SGD with momentum, deterministic on CPU for a fixed seed (data order from a
seeded ``torch.Generator``, augmentation from per-sample seeds, see ``segprune.data``).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .log import StageLog

__all__ = ["NonFiniteLossError", "make_loader", "poly_lr", "linear_lr", "set_lr", "make_sgd", "cycle",
           "train_segmentation", "train_classification", "iters_per_epoch"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the stage and the step."""


def make_loader(ds: Dataset, batch_size: int, train: bool, seed: int, num_workers: int = 0) -> DataLoader:
    """Shuffled (train, drop_last) or ordered (eval) loader with a seeded generator."""
    gen = torch.Generator().manual_seed(int(seed))
    return DataLoader(ds, batch_size=batch_size, shuffle=train, drop_last=train and len(ds) >= batch_size,
                      num_workers=num_workers, generator=gen)


def iters_per_epoch(loader: DataLoader, cap: int | None) -> int:
    n = len(loader)
    return n if cap is None else min(n, int(cap))


def poly_lr(base: float, it: int, max_it: int, power: float = 0.9) -> float:
    """Poly schedule, MTP paper App. 6.1: lr = base * (1 - it / max_it) ** power."""
    return base * (1.0 - min(it, max_it) / max(1, max_it)) ** power


def linear_lr(base: float, it: int, max_it: int) -> float:
    """Linear decay to 0 ("linear learning rate scheduler" of the paper's ImageNet stages)."""
    return base * (1.0 - min(it, max_it) / max(1, max_it))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def make_sgd(params, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=lr, momentum=momentum, weight_decay=weight_decay)


def cycle(loader: DataLoader, start_epoch: int = 0) -> Iterator:
    """Endless iterator over ``loader``; calls ``dataset.set_epoch`` before each pass."""
    epoch = start_epoch
    while True:
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        yield from loader
        epoch += 1


def check_finite(loss: torch.Tensor, stage: str, step: int) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"stage {stage}: loss became {loss.item()} at step {step}; "
                                 f"lower the learning rate (the last good checkpoint is kept)")


def train_segmentation(model: nn.Module, loader: DataLoader, cfg: dict, ignore_index: int, log: StageLog,
                       step_hook: Callable[[int], None] | None = None, post_step: Callable[[float], None] | None = None) -> dict:
    """Train ``model`` (images (N,3,H,W) -> logits (N,K,H,W)) with cross-entropy, ignore index excluded.

    ``cfg`` keys: epochs, lr, momentum, weight_decay, power, max_iters_per_epoch. ``post_step(lr)``
    runs after each optimiser step (e.g. a proximal ℓ1 step). Returns {"loss": last epoch mean, "iters"}.

    Raises:
        NonFiniteLossError: NaN/inf loss.
    """
    n_it = iters_per_epoch(loader, cfg.get("max_iters_per_epoch"))
    total = n_it * int(cfg["epochs"])
    opt = make_sgd(model.parameters(), cfg["lr"], cfg["momentum"], cfg["weight_decay"])
    model.train()
    it, mean = 0, float("nan")
    for epoch in range(int(cfg["epochs"])):
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        run = 0.0
        bar = log.progress(n_it, f"{log.stage} ep {epoch + 1}/{cfg['epochs']}")
        for i, (x, y) in enumerate(loader):
            if i >= n_it:
                break
            lr = poly_lr(cfg["lr"], it, total, cfg.get("power", 0.9))
            set_lr(opt, lr)
            loss = F.cross_entropy(model(x), y, ignore_index=ignore_index)
            check_finite(loss, log.stage, it)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if step_hook is not None:
                step_hook(it)
            opt.step()
            if post_step is not None:
                post_step(lr)
            run += loss.item()
            it += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        mean = run / max(1, n_it)
        log.write(f"epoch {epoch + 1}: seg loss {mean:.4f} lr {lr:.5f}" if total else "no iterations")
    return {"loss": mean, "iters": it}


def train_classification(net: nn.Module, loader: DataLoader, cfg: dict, log: StageLog,
                         forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Train a classifier (images (N,3,h,w) -> logits (N,K)) with cross-entropy and linear LR decay.

    ``forward`` defaults to ``net``; pass e.g. ``model.forward_cls`` to train a segmentation
    model's backbone through its classification head. Returns {"loss", "acc", "iters"}.
    """
    forward = forward or net
    n_it = iters_per_epoch(loader, cfg.get("max_iters_per_epoch"))
    total = n_it * int(cfg["epochs"])
    opt = make_sgd(net.parameters(), cfg["lr"], cfg["momentum"], cfg["weight_decay"])
    net.train()
    it, mean, acc = 0, float("nan"), float("nan")
    for epoch in range(int(cfg["epochs"])):
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        run, correct, seen = 0.0, 0, 0
        bar = log.progress(n_it, f"{log.stage} ep {epoch + 1}/{cfg['epochs']}")
        for i, (x, y) in enumerate(loader):
            if i >= n_it:
                break
            set_lr(opt, linear_lr(cfg["lr"], it, total) if cfg.get("schedule", "linear") == "linear" else cfg["lr"])
            logits = forward(x)
            loss = F.cross_entropy(logits, y)
            check_finite(loss, log.stage, it)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run += loss.item()
            correct += int((logits.argmax(1) == y).sum())
            seen += y.numel()
            it += 1
            bar.update(1)
        bar.close()
        mean, acc = run / max(1, n_it), correct / max(1, seen)
        log.write(f"epoch {epoch + 1}: cls loss {mean:.4f} train top-1 {acc:.3f}")
    return {"loss": mean, "acc": acc, "iters": it}


