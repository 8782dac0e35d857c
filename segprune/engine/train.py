"""Training loops: segmentation (poly LR), classification (linear LR), with step hooks.

All loops are plain SGD with momentum, deterministic on CPU for a fixed seed (data order from a
seeded ``torch.Generator``, augmentation from per-sample seeds, see ``segprune.data``).

Under ``torchrun`` (``engine.distributed``) the same loops run data-parallel: each rank trains on
its slice of every global batch (``make_loader(..., shard=True)``), its loss is its share of the
global mean, the forward runs through torch's ``DistributedDataParallel``
(``distributed.data_parallel``), which sums the gradients over ranks during ``backward``, before
any step hook reads them, and BatchNorm/dropout see the global batch (``distributed.replicated``).
In a single process none of this code runs.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import distributed as ddp
from .amp import Amp
from .layout import training_layout
from .log import StageLog
from .resume import (LoaderCursor, StageCheckpoint, fault_point, load_module_tensors, load_optimizer_tensors,
                     module_tensors, optimizer_tensors, restore_rng, rng_state)

__all__ = ["NonFiniteLossError", "READ_EVERY", "StepValues", "make_loader", "poly_lr", "linear_lr", "set_lr",
           "make_sgd", "seg_loss", "train_segmentation", "train_classification", "iters_per_epoch", "train_loop", "LoopState"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the stage and the step."""


def make_loader(ds: Dataset, batch_size: int, train: bool, seed: int, num_workers: int = 0,
                shard: bool = False) -> DataLoader:
    """Shuffled (train, drop_last) or ordered (eval) loader with a seeded generator.

    ``shard=True`` in a multi-process run: this rank's part of the same loader, ``batch_size``
    being the global batch (train: ``distributed.train_loader``, the 1-process order cut into
    per-rank slices; eval: a contiguous slice of ``ds``, metrics all-reduced). Ignored in a single
    process.
    """
    if shard and ddp.active():
        return (ddp.train_loader(ds, batch_size, seed, num_workers) if train
                else ddp.eval_loader(ds, batch_size, num_workers))
    gen = torch.Generator().manual_seed(int(seed))
    return DataLoader(ds, batch_size=batch_size, shuffle=train, drop_last=train and len(ds) >= batch_size,
                      num_workers=num_workers, generator=gen, **loader_speedups(num_workers))


def loader_speedups(num_workers: int) -> dict:
    """``DataLoader`` options that only change speed: ``pin_memory`` when CUDA is available (page-locked
    host batches, copied to the GPU with ``non_blocking=True``).

    ``persistent_workers`` is deliberately not used, for two reasons (torch 2.14's DataLoader):

    * every sample is augmented from a seed of its own index and the dataset's epoch (``set_epoch`` in
      the main process before each epoch); persistent worker processes keep the dataset copy of the
      first epoch and would silently repeat its augmentation; re-spawned workers see the new epoch;
    * the DataLoader draws its workers' base seed from ``loader.generator`` when it creates an
      iterator; persistent workers reuse the first iterator, so from the second epoch on the generator
      would no longer advance by that draw and the shuffling would differ from a run with
      ``num_workers: 0`` or with re-spawned workers, and from a resumed run (whose first iterator, in a
      later epoch, does draw), breaking the bitwise resume.

    Fixing both needs the epoch in shared memory in every dataset class and an emulated seed draw per
    epoch (private DataLoader state); not done. The cost is one worker start-up per epoch."""
    return {"pin_memory": bool(torch.cuda.is_available())}


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


def check_finite(loss: torch.Tensor | float, stage: str, step: int) -> None:
    """Raise :class:`NonFiniteLossError` if ``loss`` (a 0-d tensor on any device, or a number) is NaN/inf.

    A tensor is read on the host (one device sync); pass the float the step reads anyway (``loss.item()``)
    to avoid a second one.
    """
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    if not math.isfinite(value):
        raise NonFiniteLossError(f"stage {stage}: loss became {value} at step {step}; "
                                 f"lower the learning rate (the last good checkpoint is kept)")


#: training losses (and counts) stay on the device and are read on the host every this many steps, before
#: every in-stage checkpoint and at the end of every epoch (:class:`StepValues`)
READ_EVERY = 10


class StepValues:
    """Per-step values of a training loop (losses, counts) kept where they were computed (0-d tensors on
    the model's device, or numbers) and read on the host every ``every`` steps (:meth:`add`) or when
    :meth:`flush` is called: one host synchronisation per read instead of one per step.

    A read stacks the pending values into one float64 tensor (steps, keys), sums it over ranks in a
    multi-process run (each value is a rank's share of a global mean or count), reads it, checks the
    ``checked`` keys step by step (:class:`NonFiniteLossError` names the first bad step) and adds the
    values to :attr:`sums` in step order: the sums are bitwise those of reading every step.

    A NaN/inf loss is therefore noticed up to ``every - 1`` steps late; the loops flush before every
    in-stage checkpoint, so the checkpoint on disk stays the last good one.

    Args:
        checked: key -> the stage label of the error message (e.g. ``{"loss": "train_seg"}``).
        sums: running sums to continue (a resumed epoch); default empty.
        every: steps between reads (>= 1).
    """

    def __init__(self, checked: dict[str, str], sums: dict | None = None, every: int = READ_EVERY):
        self.checked, self.every = dict(checked), max(1, int(every))
        self.sums: dict[str, float] = dict(sums or {})
        self._pending: list[tuple[int, dict]] = []

    def add(self, step: int, values: dict) -> None:
        """Record step ``step``'s values (key -> 0-d tensor or number; the same keys every step)."""
        self._pending.append((int(step), values))
        if len(self._pending) >= self.every:
            self.flush()

    def flush(self) -> dict[str, float]:
        """Read the pending values (see the class docstring) and return :attr:`sums`.

        Raises:
            NonFiniteLossError: a checked value is NaN/inf (the message names its stage and step).
        """
        if not self._pending:
            return self.sums
        pending, self._pending = self._pending, []
        keys = list(pending[0][1])
        dev = next((v.device for _, r in pending for v in r.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        rows = torch.stack([torch.stack([v.detach().to(torch.float64).reshape(()) if isinstance(v, torch.Tensor)
                                         else torch.full((), float(v), dtype=torch.float64, device=dev)
                                         for v in (r[k] for k in keys)]) for _, r in pending])
        if ddp.active():  # the ranks' shares of every step summed
            rows = ddp.sum_over_ranks(rows)
        for (step, _), vals in zip(pending, rows.tolist()):  # the read's one host sync
            row = dict(zip(keys, vals))
            for k, stage in self.checked.items():
                check_finite(row[k], stage, step)
            for k, v in row.items():
                self.sums[k] = self.sums.get(k, 0.0) + v
        return self.sums


class LoopState:
    """Method state a training loop must checkpoint besides weights, optimizer and data order
    (e.g. CAP's importance averages, SIRFP's redundancy EMAs, ACoSP's mask logits).

    Subclasses return tensors only (scalars as 0-d tensors); keys need not be prefixed.
    """

    def state_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Restore from :meth:`state_tensors` output. Raises CheckpointError (naming ``source``) on a mismatch."""
        raise NotImplementedError


def train_loop(net: nn.Module, params, loader: DataLoader, cfg: dict, log: StageLog, lr_at: Callable[[int, int], float],
               step: Callable[..., dict], epoch_msg: Callable[[dict, int, float], str], ckpt: StageCheckpoint | None,
               opt: torch.optim.Optimizer | None = None, extra: LoopState | None = None,
               trained: tuple[nn.Module, ...] = ()) -> dict:
    """Shared epoch loop of the training functions: LR schedule, periodic in-stage checkpoints
    (``engine.resume``) and resume.

    ``step(x, y, opt, it, run)`` runs one iteration and returns the batch's values to sum (e.g. loss,
    as 0-d tensors left on the device: :class:`StepValues` reads them every :data:`READ_EVERY` steps
    and checks ``"loss"`` for NaN/inf); it computes its forward as ``run(fn, *args)`` (=
    ``fn(*args)``; several processes: through ``distributed.data_parallel`` over ``net`` and
    ``trained``, so that ``backward`` sums the gradients over ranks). ``trained``: further modules
    whose parameters the step trains besides ``net``'s (ACoSP's mask logits). ``opt`` defaults to SGD
    over ``params`` from ``cfg`` (lr, momentum, weight_decay); ``extra`` is saved with every in-stage
    checkpoint and restored on resume. The checkpoint holds the CPU RNG
    state and, for a model on a GPU, that device's CUDA RNG state (``resume.rng_state``). Batches are
    moved to the device of ``net``'s first parameter (and, with ``train.channels_last``, to the
    channels-last format, as are ``net`` and ``trained`` during the loop: ``engine.layout``).
    Returns the last epoch's means of the sums and ``iters``.
    """
    n_it = iters_per_epoch(loader, cfg.get("max_iters_per_epoch"))
    epochs = int(cfg["epochs"])
    total = n_it * epochs
    if opt is None:
        opt = make_sgd(params, cfg["lr"], cfg["momentum"], cfg["weight_decay"])
    net.train()
    cursor = LoaderCursor(loader)
    like = next(net.parameters(), None)
    dev = like.device if like is not None else None
    it, start_epoch, skip, sums, lr = 0, 0, 0, {}, float(cfg["lr"])
    saved = ckpt.load(("it", "epoch", "batch", "sums"), ("loader.gen", "rng.torch")) if ckpt is not None else None
    if saved is not None:
        tensors, meta = saved
        load_module_tensors("model", net, tensors, str(ckpt.path))
        load_optimizer_tensors("opt", opt, tensors, str(ckpt.path))
        it, start_epoch, skip, sums = int(meta["it"]), int(meta["epoch"]), int(meta["batch"]), dict(meta["sums"])
        cursor.restore(tensors["loader.gen"])
        if extra is not None:
            extra.load_state_tensors({k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}, str(ckpt.path))
        restore_rng(tensors, dev)  # dropout draws from the global generator (on a GPU: the device's)
        lr = lr_at(max(0, it - 1), total)  # the last rate applied (reported if the epoch is already complete)
        log.write(f"resumed from {ckpt.path} at iteration {it} (epoch {start_epoch + 1}, batch {skip})")
    out: dict = {}
    # train.channels_last (engine/layout.py); several processes: global-batch BatchNorm statistics and
    # dropout masks, gradients summed by DDP (built after the layout change: its buckets follow the strides)
    with training_layout(net, *trained) as fmt, ddp.replicated(net), ddp.data_parallel(net, *trained) as run:
        for epoch in range(start_epoch, epochs):
            if epoch != start_epoch:
                sums, skip = {}, 0
            acc = StepValues({"loss": log.stage}, sums)
            bar = log.progress(n_it, f"{log.stage} ep {epoch + 1}/{epochs}", initial=skip)
            for i, (x, y) in enumerate(cursor.batches(epoch, skip), start=skip):
                if i >= n_it:
                    break
                x, y = ddp.to_device(x, y, like=like)  # CPU model: the same tensors
                x = fmt(x)  # train.channels_last: NHWC images (else the same tensor)
                lr = lr_at(it, total)
                set_lr(opt, lr)
                acc.add(it, step(x, y, opt, it, run))
                it += 1
                bar.update(1)
                if ckpt is not None and ckpt.due(it):
                    sums = dict(acc.flush())  # losses checked before anything is saved
                    more = {} if extra is None else {f"extra.{k}": v for k, v in extra.state_tensors().items()}
                    ckpt.save({**module_tensors("model", net), **optimizer_tensors("opt", opt), "loader.gen": cursor.epoch_state,
                               **rng_state(dev), **more},
                              {"it": it, "epoch": epoch, "batch": i + 1, "sums": sums})
                fault_point(log.stage, it)
            bar.close()
            out = {k: v / max(1, n_it) for k, v in acc.flush().items()}
            log.write(epoch_msg(out, epoch, lr) if total else "no iterations")
    return {**out, "iters": it}  # the caller deletes the in-stage checkpoint once the stage is saved


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def seg_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ignore_index: int,
             denom: torch.Tensor | float | None = None) -> torch.Tensor:
    """Segmentation loss of ``model`` on images x (N, 3, H, W) and labels y (N, H, W), ignore index excluded.

    ``CE(model(x), y)``; for a model in train mode with auxiliary heads (``forward_aux`` and
    ``aux_weights``, see ``segprune.models.common``) ``CE(main) + sum_i aux_weights[i] * CE(aux_i)``
    (PSPNet: 0.4 on the layer3 FCN head, PSPNet paper Sec. 3.4; BiSeNet: 1 on each of its two
    context heads, BiSeNet paper Eq. 2). Models without auxiliary heads take exactly the plain path.

    ``denom`` (several processes): every CE is the *sum* over this rank's non-ignored pixels divided
    by ``denom`` (a 0-d tensor, :func:`seg_denominator`, or a number), the global number of
    non-ignored pixels, so that the ranks' losses add up to the
    1-process mean. ``None``: the mean over ``y``'s non-ignored pixels (a single process).

    Raises:
        ValueError: ``forward_aux`` returns another number of auxiliary outputs than ``aux_weights``.
    """
    def ce(logits):
        if logits.dtype in (torch.float16, torch.bfloat16):  # mixed precision: the loss in float32
            logits = logits.float()
        if denom is None:
            return F.cross_entropy(logits, y, ignore_index=ignore_index)
        total = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum")
        return ddp.share(total, torch.as_tensor(denom))

    weights = getattr(model, "aux_weights", None)
    if not weights or not model.training or not hasattr(model, "forward_aux"):
        return ce(model(x))
    main, aux = model.forward_aux(x)
    if len(aux) != len(weights):
        raise ValueError(f"{type(model).__name__}: {len(aux)} auxiliary outputs but {len(weights)} aux_weights")
    loss = ce(main)
    for w, a in zip(weights, aux):
        loss = loss + float(w) * ce(a)
    return loss


def seg_denominator(y: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Global number of non-ignored pixels of the ranks' label batches, a 0-d float64 tensor left on
    the device (``distributed.global_count``; ``None`` in a single process)."""
    return ddp.global_count((y != ignore_index).sum()) if ddp.active() else None


def train_segmentation(model: nn.Module, loader: DataLoader, cfg: dict, ignore_index: int, log: StageLog,
                       step_hook: Callable[[int], None] | None = None, post_step: Callable[[float], None] | None = None,
                       ckpt: StageCheckpoint | None = None, extra: LoopState | None = None,
                       opt: torch.optim.Optimizer | None = None) -> dict:
    """Train ``model`` (images (N,3,H,W) -> logits (N,K,H,W)) with cross-entropy, ignore index excluded.

    ``cfg`` keys: epochs, lr, momentum, weight_decay, power, max_iters_per_epoch. ``post_step(lr)``
    runs after each optimiser step (e.g. a proximal ℓ1 step). ``ckpt``: periodic in-stage
    checkpoint, restored if present (``engine.resume``); ``extra``: the method's state saved with
    it (:class:`LoopState`). ``opt``: an optimizer over ``model``'s parameters built by the caller
    (e.g. with the penalised γ in their own parameter group, ``methods.sparsity``); default SGD from
    ``cfg``. Every group's ``lr`` follows the schedule. Returns {"loss": last epoch mean, "iters"}.

    Raises:
        NonFiniteLossError: NaN/inf loss, noticed within :data:`READ_EVERY` steps and before the next
            in-stage checkpoint (the last in-stage checkpoint is kept; the message names the step).
    """
    amp = Amp(_device_of(model))  # train.amp (engine/amp.py): autocast of forward + loss

    def step(x, y, opt, it, run):
        denom = seg_denominator(y, ignore_index)  # None in a single process
        with amp.autocast():
            loss = run(seg_loss, model, x, y, ignore_index, denom)
        opt.zero_grad(set_to_none=True)
        amp.backward(loss, opt)  # several processes: gradients summed over ranks; unscaled on return (fp16)
        if step_hook is not None:
            step_hook(it)
        amp.step(opt)
        if post_step is not None:
            post_step(opt.param_groups[0]["lr"])
        return {"loss": loss.detach()}  # on the device; read (NaN check, summed over ranks) by StepValues

    st = train_loop(model, model.parameters(), loader, cfg, log,
                    lambda it, total: poly_lr(cfg["lr"], it, total, cfg.get("power", 0.9)), step,
                    lambda m, e, lr: f"epoch {e + 1}: seg loss {m.get('loss', float('nan')):.4f} lr {lr:.5f}", ckpt,
                    opt=opt, extra=extra)
    return {"loss": st.get("loss", float("nan")), "iters": st["iters"]}


def train_classification(net: nn.Module, loader: DataLoader, cfg: dict, log: StageLog,
                         forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         ckpt: StageCheckpoint | None = None) -> dict:
    """Train a classifier (images (N,3,h,w) -> logits (N,K)) with cross-entropy and linear LR decay.

    ``forward`` defaults to ``net``; pass e.g. ``model.forward_cls`` to train a segmentation
    model's backbone through its classification head. ``ckpt`` as in :func:`train_segmentation`.
    Returns {"loss", "acc", "iters"}.

    Raises:
        NonFiniteLossError: NaN/inf loss (as in :func:`train_segmentation`).
    """
    forward = forward or net
    linear = cfg.get("schedule", "linear") == "linear"
    amp = Amp(_device_of(net))  # train.amp (engine/amp.py): autocast of forward + loss

    def step(x, y, opt, it, run):
        with amp.autocast():
            logits = run(forward, x)
        if logits.dtype in (torch.float16, torch.bfloat16):  # mixed precision: the loss in float32
            logits = logits.float()
        denom = ddp.global_count(y.numel())  # None in a single process
        if denom is None:
            loss = F.cross_entropy(logits, y)
        else:  # this rank's share of the global mean
            loss = ddp.share(F.cross_entropy(logits, y, reduction="sum"), denom)
        correct = (logits.detach().argmax(1) == y).sum()
        opt.zero_grad(set_to_none=True)
        amp.backward(loss, opt)  # several processes: gradients summed over ranks (DDP)
        amp.step(opt)
        # on the device; read (NaN check, summed over ranks; the count exact in float64) by StepValues
        return {"loss": loss.detach(), "correct": correct, "seen": float(y.numel())}

    st = train_loop(net, net.parameters(), loader, cfg, log,
                    lambda it, total: linear_lr(cfg["lr"], it, total) if linear else cfg["lr"], step,
                    lambda m, e, lr: f"epoch {e + 1}: cls loss {m.get('loss', float('nan')):.4f} train top-1 "
                                     f"{m.get('correct', 0.0) / max(1e-12, m.get('seen', 0.0)):.3f}", ckpt)
    acc = st["correct"] / st["seen"] if st.get("seen") else float("nan")
    return {"loss": st.get("loss", float("nan")), "acc": acc, "iters": st["iters"]}
