"""Spectral graph transform: eigenbasis of the normalised Laplacian, schedules as matrix functions."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import KTransform


def gaussian_weights(dist: Tensor, mask: Tensor | None = None, sigma: Tensor | float | None = None,
                     knn: int | None = None) -> Tensor:
    """Gaussian affinities ``W_ij = exp(-d_ij^2 / 2 sigma^2)`` with a zero diagonal.

    Args:
        dist: pairwise distances, ``(B, N, N)``.
        mask: ``(B, N)`` bool, True for real nodes (padding gets no edges).
        sigma: bandwidth; ``None`` uses the median off-diagonal distance of each graph.
        knn: keep only each node's ``knn`` nearest neighbours (symmetrised); ``None`` keeps all.

    Returns:
        ``(B, N, N)`` symmetric weights.
    """
    b, n, _ = dist.shape
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=dist.device)
    pair = mask[:, :, None] & mask[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=dist.device)
    if sigma is None:
        big = torch.where(pair, dist, torch.full_like(dist, float("nan")))
        sigma = torch.nanmedian(big.reshape(b, -1), dim=1).values.clamp_min(1e-6)
    sigma = torch.as_tensor(sigma, dtype=dist.dtype, device=dist.device).reshape(-1, 1, 1)
    w = torch.exp(-dist**2 / (2 * sigma**2)) * pair
    if knn is not None and knn < n - 1:
        masked = torch.where(pair, dist, torch.full_like(dist, float("inf")))
        idx = masked.topk(knn, dim=-1, largest=False).indices
        keep = torch.zeros_like(pair).scatter_(-1, idx, True)
        w = w * (keep | keep.transpose(1, 2)) * pair
    return w


class GraphSpectralTransform(KTransform):
    """Graph Fourier transform over the nodes of a batch of graphs.

    ``L = I - D^-1/2 W D^-1/2 = U diag(lambda) U^T`` with ``lambda`` in [0, 2] and ``kappa = lambda / 2``
    (``kappa_scale="half"``) or ``kappa = lambda / lambda_max`` per graph (``"max"``: the spectrum actually
    present fills [0, 1]; dense Gaussian graphs of a few dozen nodes have ``lambda_max`` near 1, so with
    ``lambda / 2`` the finest band is revealed long before ``k = 1``).
    Samples are node signals ``(B, N, F)``. :meth:`mix` applies ``U diag(mu) U^T``, a matrix function of
    ``L``: since ``mu`` depends only on the eigenvalue it does not depend on eigenvector signs or on the
    basis chosen inside a degenerate eigenspace, and it is equivariant to relabelling the nodes.

    Args:
        evals: ``(B, N)`` eigenvalues of ``L``.
        evecs: ``(B, N, N)`` orthonormal eigenvectors (columns).
        mask: ``(B, N)`` bool, True for real nodes (padded nodes are isolated and carry zero signal).
        kappa_scale: ``half`` or ``max`` (see above).
    """

    KAPPA_SCALES = ("half", "max")

    def __init__(self, evals: Tensor, evecs: Tensor, mask: Tensor | None = None, kappa_scale: str = "half"):
        super().__init__()
        if kappa_scale not in self.KAPPA_SCALES:
            raise ValueError(f"kappa_scale must be one of {self.KAPPA_SCALES}, got '{kappa_scale}'")
        self.evals, self.evecs, self.mask, self.kappa_scale = evals, evecs, mask, kappa_scale

    @classmethod
    def from_weights(cls, weights: Tensor, mask: Tensor | None = None, kappa_scale: str = "half") -> GraphSpectralTransform:
        """Build from symmetric non-negative weights ``(B, N, N)`` (or ``(N, N)``)."""
        if weights.dim() == 2:
            weights = weights[None]
            mask = None if mask is None else mask.reshape(1, -1)
        n = weights.shape[-1]
        deg = weights.sum(-1)
        inv_sqrt = torch.where(deg > 0, deg.clamp_min(1e-300).rsqrt(), torch.zeros_like(deg))
        lap = torch.eye(n, dtype=weights.dtype, device=weights.device) - \
            inv_sqrt[:, :, None] * weights * inv_sqrt[:, None, :]
        evals, evecs = torch.linalg.eigh(0.5 * (lap + lap.transpose(1, 2)))
        return cls(evals.clamp(0.0, 2.0), evecs, mask, kappa_scale)

    @classmethod
    def from_distances(cls, dist: Tensor, mask: Tensor | None = None, sigma: float | None = None,
                       knn: int | None = None, kappa_scale: str = "half") -> GraphSpectralTransform:
        """Build from pairwise distances ``(B, N, N)`` through :func:`gaussian_weights`."""
        if dist.dim() == 2:
            dist = dist[None]
            mask = None if mask is None else mask.reshape(1, -1)
        return cls.from_weights(gaussian_weights(dist, mask, sigma, knn), mask, kappa_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.evecs.transpose(-1, -2).to(x.dtype) @ x

    def inverse(self, c: Tensor) -> Tensor:
        return self.evecs.to(c.dtype) @ c

    @property
    def kappa(self) -> Tensor:
        if self.kappa_scale == "max":
            return (self.evals / self.evals.amax(-1, keepdim=True).clamp_min(1e-12)).unsqueeze(-1)
        return (self.evals / 2).unsqueeze(-1)  # (B, N, 1) against node signals (B, N, F)

    def matrix(self, values: Tensor) -> Tensor:
        """``U diag(values) U^T`` for per-eigenvalue ``values`` of shape ``(B, N)`` or ``(B, N, 1)``."""
        v = values.reshape(self.evals.shape).to(self.evecs.dtype)
        return (self.evecs * v[:, None, :]) @ self.evecs.transpose(-1, -2)

    def heat_kernel_diagonal(self, times: Tensor | list[float]) -> Tensor:
        """Sign-safe node features ``diag(exp(-t L))`` for each ``t``: ``(B, N, len(times))``."""
        t = torch.as_tensor(times, dtype=self.evals.dtype, device=self.evals.device)
        heat = torch.exp(-self.evals[:, :, None] * t)  # (B, N_eig, T)
        return torch.einsum("bnm,bmt->bnt", self.evecs**2, heat)
