"""Small run-infrastructure helpers shared by the training loop and the CLIs.

Everything here is domain-free: devices, moving batches, atomic file writes, checkpoint I/O with
``weights_only=True``, JSONL metric logs, loss-curve plots, seeding and ``torchrun`` (DDP) setup.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import json
import math
import os
import random
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "CheckpointError",
    "DistInfo",
    "JsonlLogger",
    "atomic_save",
    "atomic_write",
    "atomic_write_text",
    "check_weights_only_safe",
    "distributed_setup",
    "distributed_teardown",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "load_checkpoint",
    "plot_curves",
    "read_jsonl",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
    "step_seed",
    "to_device",
]


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read (truncated, corrupt, not a kflow checkpoint)."""


# --------------------------------------------------------------------------------------------- devices
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


def get_rank() -> int:
    """Global rank (0 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    """Number of processes (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on rank 0: the only process that writes files."""
    return get_rank() == 0


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


# --------------------------------------------------------------------------------------------- files
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


# --------------------------------------------------------------------------------------------- logging
def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        v = v.item() if v.numel() == 1 else v.tolist()
    elif isinstance(v, np.generic):
        v = v.item()
    elif isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON has no NaN/inf
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; a torn last line (crash mid-write) is skipped with a warning."""
    path = Path(path)
    rows: list[dict] = []
    if not path.is_file():
        return rows
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: skipping torn last line", stacklevel=2)
            else:
                raise ValueError(f"{path}: line {i + 1} is not JSON: {err}") from err
    return rows


class JsonlLogger:
    """Append-only JSON-lines metric log (one object per line, flushed per write).

    Args:
        path: the ``.jsonl`` file.
        truncate_after_step: when resuming from a checkpoint at step ``s``, drop lines with ``step > s``
            (written after that checkpoint by a run that then died) so the log matches the resumed run.
        enabled: False on non-zero ranks: ``log`` becomes a no-op.
    """

    def __init__(self, path: str | os.PathLike, truncate_after_step: int | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and self.path.is_file():
            keep = [r for r in read_jsonl(self.path) if int(r.get("step", 0)) <= truncate_after_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one record (tensors/numpy values are converted; non-finite floats become null)."""
        if not self.enabled:
            return
        line = json.dumps(_jsonable(dict(record)))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def plot_curves(jsonl_path: str | os.PathLike, png_path: str | os.PathLike,
                keys: Iterable[str] | None = None) -> Path | None:
    """Plot the training loss (and lr, and numeric eval metrics) from a metrics JSONL to a PNG.

    Uses matplotlib's Agg canvas directly, so it never touches the global pyplot backend. The PNG is
    written atomically. Returns None when there is nothing to plot yet.

    Args:
        jsonl_path: metrics written by :class:`JsonlLogger` (records with ``kind`` ``"train"``/``"eval"``).
        png_path: output image.
        keys: extra train-record keys to plot beside the loss (default: none).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_jsonl(jsonl_path)
    train = [r for r in rows if r.get("kind", "train") == "train" and r.get("loss") is not None]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not train and not evals:
        return None
    skip = {"kind", "step", "epoch", "time_s"}
    eval_keys = sorted({k for r in evals for k, v in r.items()
                        if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)})
    extra = list(keys or [])
    panels = 1 + (1 if eval_keys else 0) + len(extra)
    fig = Figure(figsize=(6.5, 3.0 * panels), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, squeeze=False, sharex=True)[:, 0]  # eval points sit under their train steps
    ax = axes[0]
    if train:
        steps = [r["step"] for r in train]
        loss = [r["loss"] for r in train]
        ax.plot(steps, loss, lw=1.2, label="train loss")
        if all(v > 0 for v in loss):
            ax.set_yscale("log")
        ax.set_ylabel("loss")
        lrs = [(r["step"], r["lr"]) for r in train if r.get("lr") is not None]
        if lrs:
            ax2 = ax.twinx()
            ax2.plot(*zip(*lrs), color="tab:gray", lw=0.8, ls="--", label="lr")
            ax2.set_ylabel("lr (dashed)", color="tab:gray")
            ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))  # "1e-3" once, short tick labels
        ax.legend(loc="upper right")
    ax.set_xlabel("step")
    i = 1
    if eval_keys:
        vals = []
        for k in eval_keys:
            pts = [(r["step"], r[k]) for r in evals if isinstance(r.get(k), (int, float))]
            if pts:
                vals += [v for _, v in pts]
                # markers always: a single evaluation is otherwise an invisible zero-length line
                axes[i].plot(*zip(*pts), marker="o", ms=6 if len(pts) == 1 else 3, label=f"{k} (last {pts[-1][1]:.3g})")
        pos = [abs(v) for v in vals if v]
        if pos and max(pos) / min(pos) > 30:  # metrics of very different sizes (Å and degrees) on one axis
            axes[i].set_yscale("symlog", linthresh=1.0)
        axes[i].set_ylabel("eval")
        axes[i].set_xlabel("step")
        axes[i].legend(loc="best", fontsize=8)
        if len({r["step"] for r in evals}) == 1 and not train:
            s0 = evals[0]["step"]
            axes[i].set_xlim(s0 - 1, s0 + 1)
        i += 1
    for k in extra:
        pts = [(r["step"], r[k]) for r in train if isinstance(r.get(k), (int, float))]
        if pts:
            axes[i].plot(*zip(*pts), lw=1.0)
        axes[i].set_ylabel(k)
        axes[i].set_xlabel("step")
        i += 1
    for a in axes[:-1]:
        a.tick_params(labelbottom=True)  # sharex hides inner tick labels; keep them readable on every panel
    # fixed margins: tight_layout costs ~1 s per call on a busy CPU, and this runs at every checkpoint;
    # right=0.82 leaves room for the lr axis ticks and its label
    height = 3.0 * panels
    fig.subplots_adjust(left=0.13, right=0.82, top=1 - 0.3 / height, bottom=0.5 / height, hspace=0.4)
    return atomic_write(png_path, lambda f: fig.savefig(f, format="png"))


def resource_dir(name: str) -> Path | None:
    """A folder shipped beside the packages (``configs``, ``datasets``): the checkout's (editable install),
    else the copy a wheel installs under ``<prefix>/share/kflow/``; ``None`` if neither exists."""
    import sys

    for cand in (Path(__file__).resolve().parents[1] / name, Path(sys.prefix) / "share" / "kflow" / name):
        if cand.is_dir():
            return cand
    return None

