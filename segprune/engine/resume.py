"""Kill-anywhere resume inside a stage: periodic, atomic checkpoints of a training loop.

A training loop (``engine.train``, MTP's ``run_mtp``, Slimming's sparsity training) saves every
``checkpoint_every`` iterations one safetensors file holding everything its continuation depends
on: module weights and BN statistics, SGD momentum buffers, the data order (the state of the
loader's ``torch.Generator`` at the start of the current epoch and the number of batches already
consumed), the global torch RNG state (dropout) and, for a model on a GPU, that device's CUDA RNG
state (:func:`rng_state`), the iteration counter and loop-specific state (MTP: W1, E, μ). A loop
restarted on the
same stage folder restores it and continues; on CPU the result is bitwise the one of an
uninterrupted run (augmentation is seeded per sample and epoch, see ``segprune.data``). The file
is written atomically (temporary file + rename), so a kill during the write leaves the previous
checkpoint; it is deleted when the stage finishes. Nothing is unpickled: tensors in safetensors,
scalars as JSON in its header.

Several processes (``engine.distributed``): only rank 0 writes and deletes the file (every rank
holds the same state); every rank reads it on resume. The data position is one of the *global*
batch order, so a checkpoint written at one world size resumes at another.
"""
from __future__ import annotations

import collections.abc
import json
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoint import CheckpointError, load_metadata, load_state_dict, save_state_dict
from . import distributed as ddp

__all__ = ["StageCheckpoint", "LoaderCursor", "ResumableCycle", "check_loader", "optimizer_tensors",
           "load_optimizer_tensors", "module_tensors", "load_module_tensors", "fault_point", "rng_state", "restore_rng"]


def rng_state(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The RNG states a training loop's continuation depends on, as checkpoint tensors (CPU uint8).

    ``rng.torch``: the global CPU generator (``torch.get_rng_state``); ``rng.cuda``: the generator of
    ``device`` (``torch.cuda.get_rng_state(device)``, dropout on a GPU draws from it), only when
    ``device`` is a CUDA device. A CPU run therefore writes exactly what it wrote before.
    """
    out = {"rng.torch": torch.get_rng_state()}
    if device is not None and torch.device(device).type == "cuda":  # run on an H200 (gpu_check resume checks)
        out["rng.cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return out


def restore_rng(tensors: dict[str, torch.Tensor], device: torch.device | None = None) -> None:
    """Inverse of :func:`rng_state`: set the CPU generator from ``rng.torch`` and, when ``device`` is a
    CUDA device and the checkpoint has ``rng.cuda``, that device's generator.

    A checkpoint without ``rng.cuda`` (written on the CPU, or before the key existed) leaves the CUDA
    generator alone; one with it resumed on the CPU ignores it (a resume on another device cannot be
    bitwise exact anyway).
    """
    torch.set_rng_state(tensors["rng.torch"].cpu())
    if device is not None and torch.device(device).type == "cuda" and "rng.cuda" in tensors:  # run on an H200 (gpu_check resume checks)
        torch.cuda.set_rng_state(tensors["rng.cuda"].cpu(), torch.device(device))


def optimizer_tensors(prefix: str, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """SGD state as ``{prefix.<param index>.<key>: tensor}`` (param index over all param groups)."""
    out = {}
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                out[f"{prefix}.{i}.{k}"] = v
    return out


def load_optimizer_tensors(prefix: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Inverse of :func:`optimizer_tensors`.

    Raises:
        CheckpointError: an index or shape that does not fit this optimizer (names ``source``).
    """
    params = [p for g in opt.param_groups for p in g["params"]]
    for key, t in tensors.items():
        if not key.startswith(prefix + "."):
            continue
        idx, name = key[len(prefix) + 1:].split(".", 1)
        i = int(idx)
        if i >= len(params) or params[i].shape != t.shape:
            raise CheckpointError(f"{source}: optimizer state {key} does not fit this model (another architecture?)")
        opt.state[params[i]][name] = t.to(params[i].device).clone()


class LoaderCursor:
    """Iterates a seeded training loader epoch by epoch and can restart mid-epoch.

    ``batches(epoch, skip)`` calls ``dataset.set_epoch(epoch)``, records (or, when resuming,
    restores) the loader generator's state at the epoch start, and yields the epoch's batches
    after skipping ``skip`` of them (those are loaded and dropped; their order is unchanged).
    A loop resumed from a checkpoint taken after the last batch of an epoch must still call
    ``batches(epoch, skip)`` and consume it as an uninterrupted loop would: that replays the
    epoch's draws from the generator, so the next epoch gets the order it would have had (skipping
    the call instead repeats the previous epoch's order).
    Without a resume it yields exactly what ``for x in loader`` yields.

    ``loader`` may also be any re-iterable sequence of batches with a length, e.g. a plain list
    of ``(x, y)`` tuples (``segprune.api``): it has no generator (nothing to restore: its order is
    fixed) and no ``dataset``.

    Raises:
        TypeError: ``loader`` is a one-shot iterator (e.g. a generator: a second epoch would be
            empty) or has no length (the iterations per epoch are counted from it).
    """

    def __init__(self, loader: DataLoader):
        check_loader(loader)
        self.loader = loader
        gen = getattr(loader, "generator", None)  # None: a list, or a user's loader without one
        # a CPU byte tensor like every generator state, whatever torch's default device is
        self.epoch_state: torch.Tensor = gen.get_state() if gen is not None else torch.empty(0, dtype=torch.uint8,
                                                                                              device="cpu")
        self._restore: torch.Tensor | None = None

    def restore(self, state: torch.Tensor) -> None:
        """Use ``state`` (a saved :attr:`epoch_state`) at the start of the next ``batches`` call."""
        self._restore = state.clone()

    def batches(self, epoch: int, skip: int = 0):
        ds = getattr(self.loader, "dataset", None)
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
        gen = getattr(self.loader, "generator", None)
        if self._restore is not None and gen is not None and self._restore.numel():
            gen.set_state(self._restore)
        self._restore = None
        if gen is not None:
            self.epoch_state = gen.get_state()
        for i, batch in enumerate(self.loader):
            if i >= skip:
                yield batch


def check_loader(loader, what: str = "loader") -> None:
    """Raise a TypeError naming ``what`` unless ``loader`` can be iterated once per epoch and has a
    length: a ``DataLoader``, or a list/tuple of batches.

    Raises:
        TypeError: a one-shot iterator (a ``collections.abc.Iterator``, e.g. a generator), or no ``len``.
    The check does not iterate ``loader`` (that would consume a DataLoader's seeded generator).
    """
    if isinstance(loader, (str, bytes)) or not hasattr(loader, "__iter__"):
        raise TypeError(f"{what} must be a DataLoader or a list of batches (x, y); got {type(loader).__name__}")
    # never iter(loader) here: a DataLoader's iterator draws its base seed from loader.generator
    if isinstance(loader, collections.abc.Iterator):
        raise TypeError(f"{what} is a one-shot iterator ({type(loader).__name__}): training runs several epochs over "
                        f"it; pass a DataLoader or a list of batches, e.g. list(batches)")
    try:
        len(loader)
    except TypeError:
        raise TypeError(f"{what} ({type(loader).__name__}) has no len(): pass a DataLoader or a list of batches") from None


class ResumableCycle:
    """Endless iterator over a loader, one epoch after another, whose position can be saved.

    State: ``epoch``, ``batch`` (consumed in this epoch) and the generator state at the epoch start.
    """

    def __init__(self, loader: DataLoader):
        self.cursor = LoaderCursor(loader)
        self.epoch, self.batch = 0, 0
        self._it = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._it = self.cursor.batches(self.epoch, self.batch)
        try:
            b = next(self._it)
        except StopIteration:
            self.epoch, self.batch = self.epoch + 1, 0
            self._it = self.cursor.batches(self.epoch)
            b = next(self._it)
        self.batch += 1
        return b

    def state(self, prefix: str) -> tuple[dict, dict]:
        return {f"{prefix}.gen": self.cursor.epoch_state}, {f"{prefix}.epoch": self.epoch, f"{prefix}.batch": self.batch}

    def load(self, prefix: str, tensors: dict, meta: dict) -> None:
        self.epoch, self.batch = int(meta[f"{prefix}.epoch"]), int(meta[f"{prefix}.batch"])
        self.cursor.restore(tensors[f"{prefix}.gen"])
        self._it = None


def fault_point(stage: str, it: int) -> None:
    """Fault injection for the resume tests: ``SEGPRUNE_KILL_AT=<stage>:<iteration>`` makes the
    process SIGKILL itself right after that iteration's checkpoint point (never set it otherwise)."""
    spec = os.environ.get("SEGPRUNE_KILL_AT")
    if spec and spec == f"{stage}:{it}":
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


class StageCheckpoint:
    """The in-stage checkpoint file ``<stage_dir>/partial.safetensors``.

    Args:
        path: the file; ``None`` disables checkpointing (every method is then a no-op).
        every: save every ``every`` iterations (0 disables).
    """

    def __init__(self, path: str | Path | None, every: int = 0):
        self.path = Path(path) if path is not None and every else None
        self.every = int(every)

    def due(self, it: int) -> bool:
        """True after iteration ``it`` (1-based count of finished iterations) if a save is due."""
        return self.path is not None and it % self.every == 0

    def save(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Write tensors + JSON-able ``meta`` atomically (the previous file stays valid until the rename).
        Rank 0 only in a multi-process run."""
        if self.path is None or not ddp.is_main():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_state_dict(self.path, tensors, {"segprune_partial": json.dumps(meta)})

    def load(self, keys: tuple[str, ...] = (), tensor_keys: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors, meta) of the last save, or None if there is none.

        ``keys`` / ``tensor_keys``: header entries and tensors the caller needs; a file lacking one
        is refused here, by name, instead of failing later with a ``KeyError``.

        Raises:
            CheckpointError: the file exists but is unreadable, not a segprune partial checkpoint, has a
                header that is not a JSON object, or lacks one of the required keys.
        """
        if self.path is None or not self.path.is_file():
            return None
        raw = load_metadata(self.path).get("segprune_partial")
        if raw is None:
            raise CheckpointError(f"{self.path}: not a segprune in-stage checkpoint (no 'segprune_partial' header)")
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{self.path}: damaged in-stage checkpoint header ({exc}); delete the file to "
                                  "restart this stage from its beginning") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{self.path}: in-stage checkpoint header is {type(meta).__name__}, not an object")
        tensors = load_state_dict(self.path)
        missing = [k for k in keys if k not in meta] + [k for k in tensor_keys if k not in tensors]
        if missing:
            raise CheckpointError(f"{self.path}: in-stage checkpoint lacks {', '.join(missing)} (written by another "
                                  "stage or version?); delete the file to restart this stage from its beginning")
        return tensors, meta

    def clear(self) -> None:
        if self.path is not None and ddp.is_main():
            self.path.unlink(missing_ok=True)


def module_tensors(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """``{prefix.<state_dict key>: tensor}``."""
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def load_module_tensors(prefix: str, module: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Inverse of :func:`module_tensors` (strict).

    Raises:
        CheckpointError: missing/unexpected keys or shapes (names ``source``).
    """
    sd = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: in-stage checkpoint does not fit the model: {str(exc)[:300]}") from None
