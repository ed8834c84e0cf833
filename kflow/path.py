"""The K-Flow interpolant and its conditional velocity: the one implementation used everywhere."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .schedule import BandSchedule
from .transforms.base import KTransform


@dataclass
class PathSample:
    """A point on the path.

    Attributes:
        x_0: source, ``(B, *event)``.
        x_1: target, ``(B, *event)``.
        k: scale-time, ``(B,)``.
        x_k: ``T^-1(mu * T x_1 + (1 - mu) * T x_0)``, ``(B, *event)``.
        dx_k: ``T^-1(dmu/dk * (T x_1 - T x_0))``, ``(B, *event)``.
    """

    x_0: Tensor
    x_1: Tensor
    k: Tensor
    x_k: Tensor
    dx_k: Tensor


class KPath:
    """K-amplitude path ``x_k = x_0 + T^-1(mu(k, kappa) * T(x_1 - x_0))`` (linear in the pair).

    Args:
        transform: the orthonormal K-amplitude transform.
        schedule: the band schedule; ``BandSchedule(1.0)`` with any transform is rectified flow.
    """

    def __init__(self, transform: KTransform, schedule: BandSchedule):
        self.transform, self.schedule = transform, schedule

    def weights(self, k: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, dmu/dk)`` shaped against the coefficients, in ``like``'s dtype and device."""
        kappa = self.transform.kappa.to(device=like.device, dtype=like.dtype)
        k = torch.as_tensor(k, dtype=like.dtype, device=like.device)
        if k.dim() == 0:
            k = k.expand(like.shape[0])
        return self.schedule(k.reshape(-1, *([1] * (kappa.dim() - 1))), kappa)

    def sample(self, x_0: Tensor, x_1: Tensor, k: Tensor) -> PathSample:
        """The path point and its conditional velocity at ``k`` (shape ``(B,)`` or scalar)."""
        mu, dmu = self.weights(k, x_0)
        delta = x_1 - x_0
        x_k = x_0 + self.transform.mix(delta, mu)
        dx_k = self.transform.mix(delta, dmu)
        return PathSample(x_0, x_1, torch.as_tensor(k), x_k, dx_k)

    def velocity(self, x_0: Tensor, x1_hat: Tensor, k: Tensor) -> Tensor:
        """Velocity of the path through ``x_0`` and a predicted endpoint: ``T^-1(dmu * T(x1_hat - x_0))``."""
        return self.transform.mix(x1_hat - x_0, self.weights(k, x_0)[1])

    def increment(self, x_0: Tensor, x1_hat: Tensor, k: Tensor, k_next: Tensor) -> Tensor:
        """Exact increment ``T^-1((mu(k_next) - mu(k)) * T(x1_hat - x_0))``: lands on ``x1_hat`` at k = 1."""
        mu0, _ = self.weights(k, x_0)
        mu1, _ = self.weights(k_next, x_0)
        return self.transform.mix(x1_hat - x_0, mu1 - mu0)

    def estimate_source(self, x_k: Tensor, x1_hat: Tensor, k: Tensor, x_0: Tensor, eps: float = 1e-4) -> Tensor:
        """The source consistent with the state and a predicted endpoint: ``T x0 = (T x_k - mu T x1_hat)/(1-mu)``.

        On coefficients already (almost) fully revealed (``1 - mu <= eps``) the given ``x_0`` is kept: they no
        longer move, so its value is irrelevant there. Used by :func:`kflow.solver.solve` with
        ``source="estimate"`` (the deterministic DDIM step along ``k``).
        """
        mu, _ = self.weights(k, x_k)
        t = self.transform
        c0, ck, c1 = t(x_0), t(x_k), t(x1_hat)
        one_minus = (1 - mu).expand_as(c0)
        safe = one_minus > eps
        est = (ck - mu * c1) / torch.where(safe, one_minus, torch.ones_like(one_minus))
        return t.inverse(torch.where(safe, est, c0))

