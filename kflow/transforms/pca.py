"""PCA transform fitted on data and completed to a full orthonormal basis."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import KTransform


class PCATransform(KTransform):
    """Orthonormal transform onto principal directions, ordered by decreasing variance.

    The basis is the full eigenbasis of the ``D x D`` covariance, so it is complete even when fewer than
    ``D`` samples were seen (directions with no variance come last) and the round trip is exact. No mean is
    subtracted: the transform must stay linear for the path. ``kappa = rank / (D - 1)``.

    Args:
        event_shape: shape of one sample; the basis acts on its flattened ``D`` values.
    """

    def __init__(self, event_shape: Sequence[int]):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        d = 1
        for s in self.event_shape:
            d *= s
        self.dim = d
        # float64 so the round trip stays exact in float64; columns are components; saved in state_dict
        self.register_buffer("basis", torch.eye(d, dtype=torch.float64))  # (D, D)
        self.register_buffer("variance", torch.zeros(d, dtype=torch.float64))
        kappa = torch.arange(d, dtype=torch.float32) / max(d - 1, 1)
        self.register_buffer("_kappa", kappa.reshape(1, *self.event_shape), persistent=False)

    @torch.no_grad()
    def fit(self, x: Tensor) -> PCATransform:
        """Fit on samples ``x`` of shape ``(N, *event_shape)``; returns ``self``."""
        flat = x.reshape(x.shape[0], -1).double()
        if flat.shape[1] != self.dim:
            raise ValueError(f"PCATransform built for {self.event_shape}, got samples of shape {tuple(x.shape[1:])}")
        cov = torch.cov(flat.T) if flat.shape[0] > 1 else torch.zeros(self.dim, self.dim, dtype=torch.float64)
        evals, evecs = torch.linalg.eigh(cov.reshape(self.dim, self.dim))
        order = torch.argsort(evals, descending=True)
        self.basis.copy_(evecs[:, order].to(self.basis.dtype))
        self.variance.copy_(evals[order].clamp_min(0).to(self.variance.dtype))
        return self

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(*x.shape[:x.dim() - len(self.event_shape)], self.dim)
        return (flat @ self.basis.to(x.dtype)).reshape(x.shape)

    def inverse(self, c: Tensor) -> Tensor:
        flat = c.reshape(*c.shape[:c.dim() - len(self.event_shape)], self.dim)
        return (flat @ self.basis.to(c.dtype).T).reshape(c.shape)

    @property
    def kappa(self) -> Tensor:
        return self._kappa
