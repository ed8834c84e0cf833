"""Fixed-grid integration along k: exact increments (endpoint prediction), Euler and Heun."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .path import KPath

Hook = Callable[[int, Tensor, Tensor], Tensor | None]

METHODS = ("exact", "euler", "heun")


@dataclass
class Solution:
    """Result of :func:`solve`.

    Attributes:
        x_1: final state, ``(B, *event)``.
        trajectory: states at every grid point ``(n_steps + 1, B, *event)`` when requested, else ``None``.
        grid: the k-grid used, ``(n_steps + 1,)``.
        evaluations: number of model calls.
    """

    x_1: Tensor
    trajectory: Tensor | None
    grid: Tensor
    evaluations: int


def solve(path: KPath, x_0: Tensor, fn: Callable[[Tensor, Tensor], Tensor], grid: Tensor,
          method: str = "exact", prediction: str = "endpoint", hook: Hook | None = None,
          return_trajectory: bool = False, source: str = "estimate") -> Solution:
    """Integrate the K-Flow ODE from ``x_0`` at ``k = grid[0]`` to ``grid[-1]``.

    Args:
        path: the path (transform and schedule) the model was trained on.
        x_0: start, ``(B, *event)``; it stays known, so endpoint predictions turn into velocities exactly.
        fn: model closure ``fn(x_k, k) -> x1_hat`` (``prediction="endpoint"``) or the velocity
            (``"velocity"``); ``k`` has shape ``(B,)``.
        grid: increasing k values, ``(n_steps + 1,)``.
        method: ``exact``: ``x += T^-1((mu(k') - mu(k)) * T(x1_hat - x_0))``, which reaches ``x_1`` exactly
            for a perfect predictor on any grid (endpoint prediction only); ``euler``; ``heun``.
        prediction: what ``fn`` returns.
        hook: ``hook(step, k_next, x) -> x or None`` called after each step (e.g. to record or project).
        return_trajectory: keep every state.
        source: with endpoint predictions, which ``x_0`` turns them into steps. ``estimate`` (default): the
            source consistent with ``x_k`` and ``x1_hat`` (:meth:`KPath.estimate_source`), i.e. the marginal
            velocity ``E[x_1 - x_0 | x_k]``; needed when the model does not see ``x_0`` (generation from
            noise), since keeping the drawn ``x_0`` makes the sample the *average* of the predictions along
            ``k`` (``x_1 = int x1_hat dk`` for rectified flow), blurry even for the Bayes-optimal model.
            ``fixed``: the given ``x_0`` throughout; right when ``x_0`` is part of the condition (assembly of a
            given loose cluster, restoration). Both reach ``x_1`` exactly for a perfect predictor.

    Returns:
        A :class:`Solution`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose one of {METHODS}")
    if prediction not in ("endpoint", "velocity"):
        raise ValueError(f"prediction must be 'endpoint' or 'velocity', got '{prediction}'")
    if source not in ("estimate", "fixed"):
        raise ValueError(f"source must be 'estimate' or 'fixed', got '{source}'")
    if method == "exact" and prediction != "endpoint":
        raise ValueError("the exact-increment sampler needs endpoint predictions; use euler or heun for velocities")
    grid = torch.as_tensor(grid, dtype=x_0.dtype, device=x_0.device)
    b = x_0.shape[0]

    def src(x: Tensor, x1_hat: Tensor, kb: Tensor) -> Tensor:
        return x_0 if source == "fixed" else path.estimate_source(x, x1_hat, kb, x_0)

    def velocity(x: Tensor, kb: Tensor) -> Tensor:
        out = fn(x, kb)
        return out if prediction == "velocity" else path.velocity(src(x, out, kb), out, kb)

    x, traj, evals = x_0, [x_0] if return_trajectory else None, 0
    for i in range(len(grid) - 1):
        k, k_next = grid[i].expand(b), grid[i + 1].expand(b)
        h = grid[i + 1] - grid[i]
        if method == "exact":
            x1_hat = fn(x, k)
            x = x + path.increment(src(x, x1_hat, k), x1_hat, k, k_next)
            evals += 1
        elif method == "euler":
            x = x + h * velocity(x, k)
            evals += 1
        else:
            v1 = velocity(x, k)
            v2 = velocity(x + h * v1, k_next)
            x = x + 0.5 * h * (v1 + v2)
            evals += 2
        if hook is not None:
            out = hook(i, k_next, x)
            x = x if out is None else out
        if traj is not None:
            traj.append(x)
    return Solution(x, torch.stack(traj) if traj is not None else None, grid, evals)
