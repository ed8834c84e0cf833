"""Shared fixtures: locate the read-only ``shared`` folder (data, weights) or skip cleanly."""
from __future__ import annotations

import os
from pathlib import Path

# before torch loads: busy-waiting OpenMP threads make tiny ops 10-50x slower on shared 2-core machines
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared() -> Path | None:
    env = os.environ.get("KFLOW_SHARED")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared"]:
        if cand.is_dir() and (cand / "data").is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """Path of the shared data folder; skips the test when it is absent."""
    path = _shared()
    if path is None:
        pytest.skip("shared data not found: set KFLOW_SHARED=/path/to/shared")
    return path


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster and immune to a busy machine; restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO
