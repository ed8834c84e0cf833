"""Shared fixtures: locate the read-only ``shared`` folder (data, weights) or skip cleanly."""
from __future__ import annotations

import os
from pathlib import Path

# before torch loads: busy-waiting OpenMP threads make tiny ops 10-50x slower on shared 2-core machines
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """Path of the shared data folder (:func:`kflow.utils.shared_dir`); skips the test when it is absent."""
    from kflow.utils import shared_dir as find_shared

    path = find_shared()
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
