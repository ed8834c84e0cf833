"""Atomic file writes and checkpoint I/O (``torch.load(..., weights_only=True)`` only)."""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["CheckpointError", "atomic_save", "atomic_write", "atomic_write_text", "check_weights_only_safe",
           "load_checkpoint", "save_checkpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read (truncated, corrupt, not a kflow checkpoint)."""


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file atomically: ``write(f)`` into a temp file in the same folder, fsync, ``os.replace``.

    A crash or exception midway leaves the previous file untouched and no temp file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (best effort; not supported everywhere)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write a UTF-8 text file."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


_SAFE_LEAVES = (torch.Tensor, int, float, bool, str, bytes, complex, type(None), torch.dtype, torch.device,
                torch.Size)


def check_weights_only_safe(obj: Any, where: str = "state") -> None:
    """Raise ``TypeError`` naming the offending key if ``obj`` would not load with ``weights_only=True``.

    Allowed: tensors, Python scalars/strings/None, dtypes/devices/sizes and dict/list/tuple/set of those.
    Catching this at save time beats an unreadable checkpoint at resume time (numpy scalars and arrays
    are the usual culprit: convert them with ``float()`` / ``torch.as_tensor``).
    """
    if isinstance(obj, _SAFE_LEAVES):
        return
    if isinstance(obj, dict):  # includes OrderedDict
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None), tuple)):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} is not checkpoint-safe")
            check_weights_only_safe(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            check_weights_only_safe(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} has type {type(obj).__module__}.{type(obj).__qualname__}, which torch.load("
                    "weights_only=True) refuses; store tensors, numbers, strings and plain containers only")


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically (temp file in the same folder, then ``os.replace``)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Validate that ``state`` is ``weights_only``-loadable, then save it atomically.

    Raises:
        TypeError: some entry cannot be loaded with ``weights_only=True`` (the message names it).
    """
    check_weights_only_safe(state, "checkpoint")
    return atomic_save(state, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``torch.load(..., weights_only=True)``.

    Raises:
        FileNotFoundError: no such file (the message names it).
        CheckpointError: the file is truncated/corrupt or does not hold a dict (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for bad zip/pickle data
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err} "
                              "(truncated or corrupt file, or not a torch checkpoint)") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj
