"""Fixed-grid integration along k: exact increments (endpoint prediction), Euler and Heun.

:class:`SolverConfig` is the ``solver`` config group (``configs/solver/*.yaml``) as one typed object; the
tasks' ``sample(model, batch, solver)`` take it whole (see ``docs/CONTRACTS.md``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .path import KPath

Hook = Callable[[int, Tensor, Tensor], Tensor | None]

METHODS = ("exact", "euler", "heun")
GRIDS = ("uniform", "band")
SOURCES = ("estimate", "fixed")


@dataclass(frozen=True)
class SolverConfig:
    """How to integrate along ``k``: one object for the ``solver`` config group, passed whole.

    Attributes:
        method: ``exact`` (exact increments of an endpoint prediction), ``euler`` or ``heun``.
        steps: integration steps (grid intervals); the model is called ``steps`` times, ``2 * steps`` for Heun
            (:attr:`evaluations`).
        grid: ``uniform`` in ``k``, or ``band``: more steps where the coarse bands are revealed
            (:func:`kflow.schedule.make_grid`).
        source: which ``x_0`` turns endpoint predictions into steps (see :func:`solve`): ``estimate``
            (re-estimated from ``x_k`` and ``x1_hat``; generation from noise) or ``fixed`` (the given ``x_0``;
            right when ``x_0`` is part of the condition). The rigid molecule sampler has its own source rule
            (``path.trans_source`` and ``path.rot_source``) and ignores it.
    """

    method: str = "exact"
    steps: int = 50
    grid: str = "uniform"
    source: str = "estimate"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown solver method {self.method!r}; choose one of {METHODS}")
        if isinstance(self.steps, bool) or int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"solver steps must be a positive integer, got {self.steps!r}")
        object.__setattr__(self, "steps", int(self.steps))
        if self.grid not in GRIDS:
            raise ValueError(f"unknown solver grid {self.grid!r}; choose one of {GRIDS}")
        if self.source not in SOURCES:
            raise ValueError(f"unknown solver source {self.source!r}; choose one of {SOURCES}")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None, **overrides: Any) -> SolverConfig:
        """From a ``solver`` config block (a dict or an OmegaConf node); ``overrides`` that are not ``None``
        replace its values (CLI flags such as ``--steps``).

        Raises:
            ValueError: an unknown key or an invalid value.
        """
        d = dict(cfg or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown solver keys {unknown}; a solver config has {sorted(names)}")
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**d)

    def replace(self, **changes: Any) -> SolverConfig:
        """A copy with the given fields changed; ``None`` values keep the current one."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def evaluations(self) -> int:
        """Model calls of one solve: ``steps``, twice that for Heun."""
        return self.steps * (2 if self.method == "heun" else 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
