"""Pickle-free, atomic checkpoint I/O.

Weights are stored as safetensors, run metadata as JSON. Every write goes to a
temporary file in the destination directory which is fsynced and then
``os.replace``-d over the target, so a crash mid-write leaves any previous
file intact. All read failures raise :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping

import torch
import torch.nn as nn

__all__ = [
    "CheckpointError",
    "atomic_write_bytes",
    "save_json",
    "load_json",
    "save_state_dict",
    "load_state_dict",
    "load_metadata",
    "load_into_model",
    "torch_load_safe",
]

_MAX_LISTED = 10


class CheckpointError(RuntimeError):
    """A checkpoint/JSON file is missing, corrupt, or does not match the model.

    The message always names the file (or source) and the problem.
    """


def _current_umask() -> int:
    """The process umask, read without changing it where possible (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _fsync_dir(dirname: str) -> None:
    """Best-effort fsync of a directory so the rename itself is durable."""
    if os.name != "posix":
        return
    try:
        fd = os.open(dirname, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``.

    The bytes go to a temporary file in the same directory (created with the
    parent directories if needed), which is flushed, fsynced and moved over
    ``path`` with ``os.replace``. On any failure the temporary file is removed
    and the exception re-raised; a previous file at ``path`` is left untouched.
    New files get mode ``0o666 & ~umask`` (an existing file's mode is kept).

    Raises:
        TypeError: ``data`` is not bytes-like.
        OSError: the write, fsync or rename failed.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    path = os.fspath(path)
    dirname = os.path.dirname(os.path.abspath(path))
    os.makedirs(dirname, exist_ok=True)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_current_umask()
    fd, tmp = tempfile.mkstemp(
        dir=dirname, prefix="." + os.path.basename(path) + ".", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, mode)
        except OSError:
            pass
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(dirname)


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as UTF-8 JSON (``indent=2``, trailing newline).

    Raises:
        TypeError: ``obj`` is not JSON-serialisable (nothing is written).
    """
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def load_json(path: str | os.PathLike) -> Any:
    """Read a JSON file.

    Raises:
        CheckpointError: the file is missing/unreadable (names the file) or is
            not valid JSON (names the file, line and column).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"JSON file {path} does not exist") from None
    except OSError as e:
        raise CheckpointError(f"cannot read JSON file {path}: {e}") from e
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"JSON file {path} is not valid UTF-8: {e}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"invalid JSON in {path} at line {e.lineno} column {e.colno}: {e.msg}"
        ) from e


def save_state_dict(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Atomically save tensors as a safetensors file.

    Each tensor is detached, moved to the CPU, made contiguous and cloned, so
    tensors sharing storage (tied weights, views) are fine. The file is built
    in memory with ``safetensors.torch.save`` and written with
    :func:`atomic_write_bytes`.

    Args:
        path: destination file (conventionally ``*.safetensors``).
        state_dict: ``{name: Tensor}`` (e.g. ``model.state_dict()``, incl.
            BN running stats and ``num_batches_tracked``).
        metadata: optional ``{str: str}`` stored in the safetensors header.

    Raises:
        TypeError: a key is not a str, a value is not a tensor (message names
            the key), or metadata is not ``{str: str}``.
    """
    from safetensors.torch import save as st_save

    tensors: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict key {key!r} is not a str")
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"state_dict[{key!r}] is a {type(value).__name__}, not a torch.Tensor"
            )
        tensors[key] = value.detach().to("cpu").contiguous().clone()
    meta: dict[str, str] | None = None
    if metadata is not None:
        meta = {}
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(
                    f"metadata must map str to str; got {k!r}: {type(v).__name__}"
                )
            meta[k] = v
    data = st_save(tensors, metadata=meta)
    atomic_write_bytes(path, data)


def _check_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise CheckpointError(f"{what} {path} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path} is not a regular file")


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load all tensors of a safetensors file onto the CPU.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt (names the file).
    """
    from safetensors.torch import load_file

    path = os.fspath(path)
    _check_file(path, "checkpoint")
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # SafetensorError, OSError, ...
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt safetensors file?): {e}"
        ) from e


def load_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``{str: str}`` metadata of a safetensors file (``{}`` if none).

    Raises:
        CheckpointError: the file is missing, truncated or corrupt (names the file).
    """
    from safetensors import safe_open

    path = os.fspath(path)
    _check_file(path, "checkpoint")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata()
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt safetensors file?): {e}"
        ) from e
    return dict(meta or {})


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f", ... ({len(items) - _MAX_LISTED} more)"
    return shown


def load_into_model(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str
) -> None:
    """Strictly load ``state`` into ``model`` (parameters and persistent buffers).

    All missing keys, unexpected keys and shape mismatches are collected
    first and reported together in one :class:`CheckpointError` naming
    ``source``, e.g. ``"checkpoint runs/x/pruned.safetensors does not match the
    model: shape mismatch backbone.conv1.weight: file (16, 3, 3, 3) vs model
    (32, 3, 3, 3); missing keys (1): head.bias"``. Up to 10 entries of each kind
    are listed. Nothing is modified if a mismatch is found. Values are copied
    (with dtype conversion) into the model's existing tensors.

    Raises:
        CheckpointError: any mismatch, or a non-tensor value in ``state``.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched: list[str] = []
    for k, v in state.items():
        if k not in expected:
            continue
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(
                f"checkpoint {source}: value for {k} is a {type(v).__name__}, not a tensor"
            )
        if tuple(v.shape) != tuple(expected[k].shape):
            mismatched.append(
                f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
            )
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"shape mismatch {_listed(mismatched)}")
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
        raise CheckpointError(
            f"checkpoint {source} does not match the model: " + "; ".join(parts)
        )
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {source} could not be loaded: {e}") from e


def torch_load_safe(path: str | os.PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with clear errors.

    For user-supplied ``.pth``/``.pt`` files (e.g. ImageNet-pretrained weights).
    ``weights_only=True`` refuses arbitrary pickled objects.

    Raises:
        CheckpointError: the file is missing, corrupt, or contains objects not
            allowed by ``weights_only`` (names the file).
    """
    path = os.fspath(path)
    _check_file(path, "checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot load torch checkpoint {path}: {e}") from e
