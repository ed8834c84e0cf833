"""The rigid spectral K-path: K-Flow on the centroids and rotation vectors of 17 rigid molecules.

Per cluster the K-amplitude transform is the spectral graph transform of the *given loose state*
(never of the target): Gaussian affinities of pairwise molecule distances, normalised Laplacian,
``kappa = lambda / 2``. The schedule acts as the matrix function ``M_k = U diag(mu(k, kappa)) U^T`` on the
per-molecule state ``s = [c, omega] (B, M, 6)`` through the core :class:`kflow.path.KPath`::

    s_0 = [c0, 0],  s_1 = [c1, Omega],  Omega_i = Log(R1_i R0_i^T)   (lab frame, |Omega_i| <= pi)
    s_k = s_0 + M_k (s_1 - s_0)           ->  c_k = c0 + M_k dc,  omega_k = M_k Omega
    R_k,i = Exp(omega_k,i) R0_i,          x_k,a = R_k,i t_a + c_k,i

Lab-frame rotation vectors are mixed across molecules (body-frame vectors would break invariance).
``window = 1`` is the AssembleFlow-style baseline: linear centroids and geodesic rotations, same code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kflow.path import KPath
from kflow.schedule import BandSchedule
from kflow.transforms import GraphSpectralTransform

from . import so3

HEAT_TIMES = (0.5, 1.0, 2.0, 4.0)


def soft_min_contact(pos: Tensor, tau: float = 0.5, mask: Tensor | None = None) -> Tensor:
    """Soft-min atom-atom distance between every pair of molecules.

    Args:
        pos: ``(B, M, n, 3)`` atom positions (padded slots masked by ``mask (B, n)``).
        tau: softness (Å); ``-tau log sum exp(-d / tau)`` tends to the minimum as ``tau -> 0``.

    Returns:
        ``(B, M, M)`` symmetric distances (diagonal 0).
    """
    b, m, n, _ = pos.shape
    flat = pos.reshape(b, m * n, 3)
    d = torch.cdist(flat, flat).reshape(b, m, n, m, n)
    if mask is not None:
        ok = mask[:, None, :, None, None] & mask[:, None, None, None, :]
        d = torch.where(ok, d, torch.full_like(d, 1e4))
    out = -tau * torch.logsumexp(-d.permute(0, 1, 3, 2, 4).reshape(b, m, m, n * n) / tau, dim=-1)
    return out * (1 - torch.eye(m, dtype=out.dtype, device=out.device))


@dataclass
class RigidPathSample:
    """A point on the rigid path.

    Attributes:
        k: ``(B,)``.
        s_0, s_1, s_k, ds_k: ``(B, M, 6)`` states ``[c, omega]`` and the velocity.
        c_k: ``(B, M, 3)`` centroids; R_k: ``(B, M, 3, 3)`` orientations (body -> lab).
    """

    k: Tensor
    s_0: Tensor
    s_1: Tensor
    s_k: Tensor
    ds_k: Tensor
    c_k: Tensor
    R_k: Tensor


class RigidKPath:
    """Spectral-graph K-path for clusters of rigid molecules.

    Args:
        schedule: the band schedule (``window=1`` gives the baseline).
        sigma: Gaussian bandwidth (Å); ``None`` uses each cluster's median distance.
        knn: optional kNN sparsification of the affinities.
        distance: ``centroid`` (distances of unweighted centroids) or ``contact`` (soft-min atom contact).
    """

    def __init__(self, schedule: BandSchedule, sigma: float | None = None, knn: int | None = None,
                 distance: str = "centroid"):
        if distance not in ("centroid", "contact"):
            raise ValueError(f"distance must be 'centroid' or 'contact', got '{distance}'")
        self.schedule, self.sigma, self.knn, self.distance = schedule, sigma, knn, distance

    def transform(self, c0: Tensor, pos0: Tensor | None = None, mask: Tensor | None = None) -> GraphSpectralTransform:
        """Graph transform of the loose state: ``c0 (B, M, 3)``; ``pos0 (B, M, n, 3)`` for contact distances."""
        if self.distance == "contact":
            if pos0 is None:
                raise ValueError("contact distances need the loose atom positions pos0")
            d = soft_min_contact(pos0, mask=mask)
        else:
            d = torch.cdist(c0, c0)
        return GraphSpectralTransform.from_distances(d, sigma=self.sigma, knn=self.knn)

    def core(self, transform: GraphSpectralTransform) -> KPath:
        return KPath(transform, self.schedule)

    @staticmethod
    def start(c0: Tensor) -> Tensor:
        """``s_0 = [c0, 0]``: ``(B, M, 6)``."""
        return torch.cat([c0, torch.zeros_like(c0)], dim=-1)

    @staticmethod
    def endpoint(c1: Tensor, R1: Tensor, R0: Tensor) -> Tensor:
        """``s_1 = [c1, Log(R1 R0^T)]``: ``(B, M, 6)``."""
        return torch.cat([c1, so3.log(R1 @ R0.transpose(-1, -2))], dim=-1)

    @staticmethod
    def rigid(s: Tensor, R0: Tensor) -> tuple[Tensor, Tensor]:
        """Centroids and orientations ``(c, Exp(omega) R0)`` of a state ``s (B, M, 6)``."""
        return s[..., :3], so3.exp(s[..., 3:]) @ R0

    @staticmethod
    def endpoint_from_residual(s_k: Tensor, R0: Tensor, residual: Tensor) -> Tensor:
        """Endpoint ``s_1`` from the network's residual ``[c_1 - c_k, Log(R_1 R_k^T)]`` at state ``s_k``."""
        c_k, R_k = RigidKPath.rigid(s_k, R0)
        R1 = so3.exp(residual[..., 3:]) @ R_k
        return torch.cat([c_k + residual[..., :3], so3.log(R1 @ R0.transpose(-1, -2))], dim=-1)

    def sample(self, transform: GraphSpectralTransform, c0: Tensor, R0: Tensor, c1: Tensor, R1: Tensor,
               k: Tensor) -> RigidPathSample:
        """Path point at ``k (B,)`` between the loose ``(c0, R0)`` and packed ``(c1, R1)`` states."""
        s0, s1 = self.start(c0), self.endpoint(c1, R1, R0)
        ps = self.core(transform).sample(s0, s1, k)
        c_k, R_k = self.rigid(ps.x_k, R0)
        return RigidPathSample(ps.k, s0, s1, ps.x_k, ps.dx_k, c_k, R_k)

    def node_features(self, transform: GraphSpectralTransform, k: Tensor) -> Tensor:
        """Sign-safe per-molecule features: band progress ``diag(M_k)``, ``diag(dM_k/dk)`` and heat-kernel
        diagonals ``diag(exp(-t L))``: ``(B, M, 2 + len(HEAT_TIMES))``."""
        path = self.core(transform)
        like = transform.evecs
        mu, dmu = path.weights(k, like[..., :1])
        prog = torch.diagonal(transform.matrix(mu), dim1=-2, dim2=-1)
        dprog = torch.diagonal(transform.matrix(dmu), dim1=-2, dim2=-1)
        heat = transform.heat_kernel_diagonal(list(HEAT_TIMES))
        return torch.cat([prog[..., None], dprog[..., None], heat], dim=-1)


NUM_NODE_FEATURES = 2 + len(HEAT_TIMES)


def closest_equivalent_rotation(R1: Tensor, R0: Tensor, symmetries: Tensor,
                                sym_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The symmetry-equivalent target orientation closest to the current one, per molecule.

    If the body-frame rotation ``S_g`` maps the template onto itself (``S_g t_a = t_{perm_g(a)}``), the
    orientation ``R1 S_g`` places the same atoms at the same positions up to relabelling: the same crystal.
    We pick ``argmax_g tr(R1 S_g R0^T)``, i.e. the smallest rotation angle away from ``R0``.

    Args:
        R1: ``(B, M, 3, 3)`` target orientations; R0: ``(B, M, 3, 3)`` current orientations.
        symmetries: ``(B, G, 3, 3)`` body-frame symmetry rotations (identity first, padded with identity).
        sym_mask: ``(B, G)`` bool, real symmetries (padding excluded).

    Returns:
        ``(R1_equiv (B, M, 3, 3), index (B, M))`` with ``R1_equiv = R1 S_index``.
    """
    cand = R1[:, :, None] @ symmetries[:, None].to(R1.dtype)  # (B, M, G, 3, 3)
    tr = (cand * R0[:, :, None]).sum((-1, -2))  # tr(A B^T) = sum(A * B)
    if sym_mask is not None:
        tr = torch.where(sym_mask[:, None, :], tr, torch.full_like(tr, -torch.inf))
    idx = tr.argmax(-1)
    best = torch.gather(cand, 2, idx[:, :, None, None, None].expand(-1, -1, 1, 3, 3)).squeeze(2)
    return best, idx
