"""Devices, seeding and ``torchrun`` (DDP) setup of the training loop and the CLIs."""
from __future__ import annotations

import collections
import copy
import dataclasses
import os
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["DistInfo", "distributed_setup", "distributed_teardown", "resolve_device", "seed_everything",
           "step_seed", "to_device"]


def resolve_device(device: str | torch.device = "auto", local_rank: int | None = None) -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N" | "mps"`` into a ``torch.device``.

    Args:
        device: ``"auto"`` picks CUDA when available, else CPU.
        local_rank: under ``torchrun`` the GPU index of this process (``LOCAL_RANK``); used when ``device``
            names CUDA without an index. Defaults to ``$LOCAL_RANK`` (or 0).

    Raises:
        RuntimeError: CUDA was requested explicitly but is not available.
        ValueError: unknown device string.
    """
    if isinstance(device, torch.device):
        dev = device
    else:
        name = str(device).strip().lower()
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(name)
        except RuntimeError as err:
            raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(device)!r} requested but CUDA is not available; use device=cpu or auto")
        if dev.index is None:
            idx = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
            dev = torch.device("cuda", idx % torch.cuda.device_count())
    return dev


def to_device(batch: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """Recursively move a collated batch to ``device``.

    Handles tensors, objects with a ``.to(device)`` method (e.g. ``torch_geometric`` ``Batch``, which is
    preferred over field-wise copying so such objects keep their own logic), dataclasses (a shallow copy
    with moved fields; ``__post_init__`` is not re-run), mappings, named tuples, tuples and lists. Anything
    else (numbers, strings, numpy arrays) is returned unchanged.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, (str, bytes, int, float, bool, type(None), np.ndarray, np.generic)):
        return batch
    to = getattr(batch, "to", None)
    if callable(to) and not isinstance(batch, type):
        try:
            return to(device, non_blocking=non_blocking)
        except TypeError:  # a .to() without non_blocking
            return to(device)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        out = copy.copy(batch)
        for f in dataclasses.fields(batch):
            # object.__setattr__ also works for frozen dataclasses
            object.__setattr__(out, f.name, to_device(getattr(batch, f.name), device, non_blocking))
        return out
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device, non_blocking) for k, v in batch.items()}
        if isinstance(batch, collections.defaultdict):
            return collections.defaultdict(batch.default_factory, moved)
        try:
            return type(batch)(moved)
        except TypeError:
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device, non_blocking) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch


# --------------------------------------------------------------------------------------------- seeding
def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and all CUDA devices)."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed % 2**64)


def step_seed(seed: int, rank: int, step: int) -> int:
    """A well-mixed 63-bit seed that depends only on ``(seed, rank, step)``.

    The trainer reseeds every step from it, so the random draws of step ``s`` (noise, flow time ``k``,
    dropout, augmentation in the main process) are the same whether the run went straight through or was
    resumed from a checkpoint, and different ranks draw different noise.
    """
    state = np.random.SeedSequence([int(seed) % 2**63, int(rank), int(step)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


# --------------------------------------------------------------------------------------------- distributed
@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Process-group facts of this process (``world_size == 1`` when not under ``torchrun``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False


def distributed_setup(device: torch.device | str | None = None, backend: str | None = None) -> DistInfo:
    """Initialise the default process group from ``torchrun`` env vars when ``WORLD_SIZE > 1``.

    Idempotent: returns the existing group's facts when one is already initialised.

    Args:
        device: the training device; picks ``nccl`` for CUDA, ``gloo`` otherwise.
        backend: force a backend.

    Raises:
        RuntimeError: ``WORLD_SIZE > 1`` but the ``torchrun`` rendezvous variables are missing.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, False)
    if world <= 1:
        return DistInfo(0, 1, 0, False)
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {missing} are not set: launch with torchrun")
    dev = torch.device(device) if device is not None else None
    if backend is None:
        backend = "nccl" if dev is not None and dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev is not None:
        torch.cuda.set_device(dev)
    dist.init_process_group(backend=backend, init_method="env://")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, True)


def distributed_teardown() -> None:
    """Destroy the default process group if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
