"""Assertions shipped with the package so users can check their own transforms, schedules and models.

Run them in float64: the tolerances are tight on purpose.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .path import KPath
from .schedule import BandSchedule, make_grid
from .solver import solve
from .transforms.base import KTransform


def _close(a: Tensor, b: Tensor, atol: float, what: str) -> None:
    err = (a - b).abs().max().item() if a.numel() else 0.0
    if not err <= atol:
        raise AssertionError(f"{what}: max abs error {err:.3e} > {atol:.1e}")


def assert_round_trip(transform: KTransform, x: Tensor, atol: float = 1e-10) -> None:
    """``T^-1 T x == x``."""
    _close(transform.inverse(transform(x)), x, atol, f"{type(transform).__name__} round trip")


def assert_orthonormal(transform: KTransform, x: Tensor, y: Tensor | None = None, atol: float = 1e-10) -> None:
    """Parseval (``|T x| = |x|``) and preserved inner products ``<T x, T y> = <x, y>`` per sample."""
    name = type(transform).__name__
    y = torch.randn_like(x) if y is None else y
    tx, ty = transform(x), transform(y)
    dims = tuple(range(1, x.dim()))
    _close((tx * tx).sum(dims), (x * x).sum(dims), atol * max(1.0, x.numel()), f"{name} Parseval")
    _close((tx * ty).sum(dims), (x * y).sum(dims), atol * max(1.0, x.numel()), f"{name} inner product")
    if transform.kappa.min() < 0 or transform.kappa.max() > 1:
        raise AssertionError(f"{name}: kappa outside [0, 1]")


def assert_path_boundaries(path: KPath, x_0: Tensor, x_1: Tensor, atol: float = 1e-10) -> None:
    """``x_k`` equals ``x_0`` at ``k = 0`` and ``x_1`` at ``k = 1``."""
    b = x_0.shape[0]
    zero, one = torch.zeros(b, dtype=x_0.dtype), torch.ones(b, dtype=x_0.dtype)
    _close(path.sample(x_0, x_1, zero).x_k, x_0, atol, "x_k at k=0")
    _close(path.sample(x_0, x_1, one).x_k, x_1, atol, "x_k at k=1")


def assert_velocity_is_derivative(path: KPath, x_0: Tensor, x_1: Tensor, ks: Sequence[float],
                                  eps: float = 1e-6, atol: float = 1e-6) -> None:
    """``dx_k`` equals the central finite difference of ``x_k`` at each ``k`` (away from window edges)."""
    b = x_0.shape[0]
    for k in ks:
        kk = torch.full((b,), float(k), dtype=x_0.dtype)
        fd = (path.sample(x_0, x_1, kk + eps).x_k - path.sample(x_0, x_1, kk - eps).x_k) / (2 * eps)
        scale = max(1.0, fd.abs().max().item())
        _close(path.sample(x_0, x_1, kk).dx_k, fd, atol * scale, f"dx_k vs finite difference at k={k}")


def assert_oracle_sampler_exact(path: KPath, x_0: Tensor, x_1: Tensor, grids: Sequence[Tensor] | None = None,
                                atol: float = 1e-10) -> None:
    """The exact-increment sampler with the true endpoint lands on ``x_1`` on every grid."""
    if grids is None:
        grids = [make_grid(n) for n in (1, 3, 10)]
    for grid in grids:
        out = solve(path, x_0, lambda x, k: x_1, grid.to(x_0.dtype), method="exact").x_1
        _close(out, x_1, atol, f"oracle exact sampler on a {len(grid) - 1}-step grid")


def assert_rectified_flow(transform: KTransform, x_0: Tensor, x_1: Tensor, atol: float = 1e-12) -> None:
    """With ``w = 1`` and the linear profile the path is rectified flow: ``x_k = (1-k) x_0 + k x_1``."""
    path = KPath(transform, BandSchedule(1.0, "linear"))
    for k in (0.0, 0.13, 0.5, 0.91, 1.0):
        kk = torch.full((x_0.shape[0],), k, dtype=x_0.dtype)
        s = path.sample(x_0, x_1, kk)
        _close(s.x_k, (1 - k) * x_0 + k * x_1, atol, f"rectified flow x_k at k={k}")
        _close(s.dx_k, x_1 - x_0, atol, f"rectified flow dx_k at k={k}")


def random_rotation(dtype=torch.float64, generator: torch.Generator | None = None) -> Tensor:
    """A Haar-random proper rotation ``(3, 3)``."""
    q, r = torch.linalg.qr(torch.randn(3, 3, dtype=dtype, generator=generator))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def assert_equivariant_rotation(fn: Callable[[Tensor], Tensor], x: Tensor, out_vector: bool = True,
                                n_trials: int = 3, atol: float = 1e-9, translate: bool = False) -> None:
    """``fn(x Q^T) == fn(x) Q^T`` for random rotations ``Q`` (``== fn(x)`` for invariant outputs).

    Args:
        fn: maps ``(..., 3)`` points to ``(..., 3)`` vectors (or to invariants when ``out_vector=False``).
        x: points, last dim 3, float64.
        translate: also shift the input by a random vector (outputs must not change beyond the rotation).
    """
    base = fn(x)
    for _ in range(n_trials):
        q = random_rotation(x.dtype)
        shift = torch.randn(3, dtype=x.dtype) * 5 if translate else 0.0
        out = fn(x @ q.T + shift)
        _close(out, base @ q.T if out_vector else base, atol * max(1.0, base.abs().max().item()),
               "rotation equivariance")


def assert_equivariant_permutation(fn: Callable[[Tensor], Tensor], x: Tensor, dim: int = 0,
                                   atol: float = 1e-9) -> None:
    """``fn(x[perm]) == fn(x)[perm]`` along ``dim`` for a random permutation."""
    perm = torch.randperm(x.shape[dim])
    out = fn(x.index_select(dim, perm))
    _close(out, fn(x).index_select(dim, perm), atol, "permutation equivariance")
