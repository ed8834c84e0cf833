"""The K-amplitude transform interface: an orthonormal map with a scale ``kappa`` per coefficient."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class KTransform(nn.Module):
    """Orthonormal transform ``T`` (``T^-1 = T^T``) with a scale ``kappa`` in [0, 1] per coefficient.

    ``kappa = 0`` marks the coarsest coefficients (revealed first along ``k``), ``kappa = 1`` the finest.
    Subclasses implement :meth:`forward`, :meth:`inverse` and :attr:`kappa`; :meth:`mix` is the one operation
    the path needs and defaults to ``T^-1(mu * T x)``.
    """

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        """Coefficients ``T x`` with the same shape as ``x``."""
        raise NotImplementedError

    def inverse(self, c: Tensor) -> Tensor:  # pragma: no cover - interface
        """``T^-1 c`` (= ``T^T c``)."""
        raise NotImplementedError

    @property
    def kappa(self) -> Tensor:  # pragma: no cover - interface
        """Scale per coefficient in [0, 1], with a leading batch dim (1 for data-independent transforms)."""
        raise NotImplementedError

    def mix(self, x: Tensor, mu: Tensor) -> Tensor:
        """Apply the coefficient weights ``mu`` in the transform domain: ``T^-1(mu * T x)``.

        Args:
            x: data, shape ``(B, *event)``.
            mu: weights broadcastable against the coefficients, e.g. ``(B, *kappa.shape[1:])``.
        """
        return self.inverse(mu * self.forward(x))

    def distinct_kappa(self) -> Tensor:
        """Sorted distinct scales (the bands); used to build per-band grids."""
        return torch.unique(self.kappa.detach().flatten().cpu().double())
