"""Append-only JSON-lines metric logs."""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import atomic_write_text

__all__ = ["JsonlLogger", "read_jsonl"]


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
