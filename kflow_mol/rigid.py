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

``rotation="own"`` keeps the graph for the centroids only and turns each molecule along its own geodesic on
a scalar *rotation clock* ``mu_r(k)`` (linear over ``rot_window``)::

    omega_k,i = mu_r(k) Omega_i,      R_k,i = Exp(mu_r(k) Omega_i) R0_i

The loose orientations are independent uniform draws, so mixing them across molecules (``M_k Omega``)
blends unrelated random rotation vectors: for centroids the graph modes are collective motions, for
independent random rotations they are not. With uniform loose orientations the rotational part is
*generation*, so :meth:`RigidKPath.step` can re-estimate the rotational source at every step
(``rot_source="estimate"``: a geodesic step from the current orientation towards the predicted one, the
SO(3) form of the marginal velocity) instead of keeping the loose orientation (``"fixed"``), which returns
the average of the predictions along ``k``.
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


ROTATIONS = ("graph", "own")
SOURCES = ("fixed", "estimate")


class RigidKPath:
    """Spectral-graph K-path for clusters of rigid molecules.

    Args:
        schedule: the band schedule (``window=1`` gives the baseline).
        sigma: Gaussian bandwidth (Å); ``None`` uses each cluster's median distance.
        knn: optional kNN sparsification of the affinities.
        distance: ``centroid`` (distances of unweighted centroids) or ``contact`` (soft-min atom contact).
        rotation: ``graph`` (rotation vectors mixed by ``M_k`` like the centroids) or ``own`` (each molecule
            on its own geodesic, timed by the rotation clock).
        rot_window: ``(start, end)`` in [0, 1]: with ``rotation="own"`` the orientations turn linearly in k
            over this window (``(0, 1)``: the same clock as rectified flow).
        trans_window: ``(start, end)``: the centroids' band schedule runs on the clock
            ``k_c = (k - start) / (end - start)`` clipped to [0, 1], e.g. ``(0, 0.6)`` with ``rot_window=(0.4, 1)``
            packs the centroids first and turns the molecules once their neighbours are near.
        kappa_scale: ``half`` (``kappa = lambda / 2``) or ``max`` (``lambda / lambda_max``, so the bands of
            each cluster's graph fill [0, 1]); see :class:`kflow.transforms.GraphSpectralTransform`.
        rot_source: how the sampler turns endpoint predictions into rotation steps (``fixed`` or
            ``estimate``, see :meth:`step`).
        trans_source: the same for the centroids: ``fixed`` (the given loose state is the source, so the sampled
            centroids are a band-weighted average of the endpoint predictions along ``k``) or ``estimate`` (the
            source re-estimated from the state each step, the DDIM step: the last prediction counts most).
    """

    def __init__(self, schedule: BandSchedule, sigma: float | None = None, knn: int | None = None,
                 distance: str = "centroid", rotation: str = "graph", rot_window=(0.0, 1.0),
                 kappa_scale: str = "half", rot_source: str = "fixed", trans_window=(0.0, 1.0),
                 trans_source: str = "fixed"):
        if distance not in ("centroid", "contact"):
            raise ValueError(f"distance must be 'centroid' or 'contact', got '{distance}'")
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got '{rotation}'")
        if rot_source not in SOURCES:
            raise ValueError(f"rot_source must be one of {SOURCES}, got '{rot_source}'")
        if trans_source not in SOURCES:
            raise ValueError(f"trans_source must be one of {SOURCES}, got '{trans_source}'")
        self.trans_source = trans_source
        a, b = (float(x) for x in rot_window)
        ta, tb = (float(x) for x in trans_window)
        for name, (lo, hi) in (("rot_window", (a, b)), ("trans_window", (ta, tb))):
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(f"{name} must satisfy 0 <= start < end <= 1, got {(lo, hi)}")
        if rotation == "graph" and (ta, tb) != (0.0, 1.0):
            raise ValueError("trans_window needs rotation='own' (with graph rotations both share one clock)")
        self.trans_window = (ta, tb)
        self.schedule, self.sigma, self.knn, self.distance = schedule, sigma, knn, distance
        self.rotation, self.rot_window, self.kappa_scale, self.rot_source = rotation, (a, b), kappa_scale, rot_source
        # The rotation clock is a one-band schedule: window b - a starting at a = (1 - w) kappa_r.
        self._rot_clock = BandSchedule(window=b - a, profile="linear")
        self._rot_kappa = a / (1 - (b - a)) if b - a < 1 else 0.0

    def trans_clock(self, k: Tensor) -> tuple[Tensor, Tensor]:
        """``(k_c, dk_c/dk)``: the time the centroids' band schedule sees, shaped like ``k``."""
        a, b = self.trans_window
        if (a, b) == (0.0, 1.0):
            return k, torch.ones_like(k)
        u = (k - a) / (b - a)
        inside = (u >= 0) & (u <= 1)
        return u.clamp(0.0, 1.0), torch.where(inside, torch.full_like(u, 1 / (b - a)), torch.zeros_like(u))

    def rot_clock(self, k: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu_r(k), dmu_r/dk)`` of the rotation clock (``rotation="own"``), shaped like ``k``."""
        return self._rot_clock(k, torch.full_like(k, self._rot_kappa))

    def transform(self, c0: Tensor, pos0: Tensor | None = None, mask: Tensor | None = None) -> GraphSpectralTransform:
        """Graph transform of the loose state: ``c0 (B, M, 3)``; ``pos0 (B, M, n, 3)`` for contact distances."""
        if self.distance == "contact":
            if pos0 is None:
                raise ValueError("contact distances need the loose atom positions pos0")
            d = soft_min_contact(pos0, mask=mask)
        else:
            d = torch.cdist(c0, c0)
        return GraphSpectralTransform.from_distances(d, sigma=self.sigma, knn=self.knn, kappa_scale=self.kappa_scale)

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
        kc, dkc = self.trans_clock(k)
        ps = self.core(transform).sample(s0, s1, kc)
        s_k, ds_k = ps.x_k, ps.dx_k * dkc[:, None, None]
        if self.rotation == "own":  # centroids from the graph path, rotations on their own clock
            mu, dmu = self.rot_clock(k)
            s_k = torch.cat([s_k[..., :3], mu[:, None, None] * s1[..., 3:]], dim=-1)
            ds_k = torch.cat([ds_k[..., :3], dmu[:, None, None] * s1[..., 3:]], dim=-1)
        c_k, R_k = self.rigid(s_k, R0)
        return RigidPathSample(k, s0, s1, s_k, ds_k, c_k, R_k)

    def step(self, transform: GraphSpectralTransform, s_k: Tensor, s1_hat: Tensor, c0: Tensor, R0: Tensor,
             k: Tensor, k_next: Tensor) -> Tensor:
        """One exact-increment sampler step from ``s_k`` at ``k`` to ``k_next`` (both ``(B,)``).

        Centroids: ``c += M_{k'} - M_k`` applied to ``c1_hat - src``, where ``src`` is the loose centroids
        (``trans_source="fixed"``) or the source re-estimated from ``c_k`` and ``c1_hat`` (``"estimate"``).
        Rotations, ``rot_source="fixed"``: the same increment on ``Log(R1_hat R0^T)`` with the loose
        orientation as source (the training path through ``R0``). ``"estimate"``: the source is re-estimated
        from the state, which on the rotation clock is the geodesic step
        ``R <- Exp(a Log(R1_hat R^T)) R`` with ``a = (mu_r(k') - mu_r(k)) / (1 - mu_r(k))`` (``rotation="own"``),
        or the core DDIM step in the rotation-vector chart at ``R0`` (``rotation="graph"``). Every form lands
        on the prediction at ``k = 1``.

        Returns:
            ``(B, M, 6)`` the next state.
        """
        core = self.core(transform)
        kc, kc_next = self.trans_clock(k)[0], self.trans_clock(k_next)[0]
        src = c0 if self.trans_source == "fixed" else core.estimate_source(s_k[..., :3], s1_hat[..., :3], kc, c0)
        c_next = s_k[..., :3] + core.increment(src, s1_hat[..., :3], kc, kc_next)
        om, om1 = s_k[..., 3:], s1_hat[..., 3:]
        if self.rotation == "graph":
            src = torch.zeros_like(om)
            if self.rot_source == "estimate":
                src = core.estimate_source(om, om1, k, src)
            om_next = om + core.increment(src, om1, k, k_next)
        else:
            mu, mu_next = self.rot_clock(k)[0], self.rot_clock(k_next)[0]
            if self.rot_source == "fixed":
                om_next = om + (mu_next - mu)[:, None, None] * om1
            else:
                R_k = so3.exp(om) @ R0
                R1 = so3.exp(om1) @ R0
                left = (1 - mu).clamp_min(1e-6)
                a = torch.where(mu_next > mu, (mu_next - mu) / left, torch.zeros_like(mu)).clamp(max=1.0)
                R_next = so3.exp(a[:, None, None] * so3.log(R1 @ R_k.transpose(-1, -2))) @ R_k
                om_next = so3.log(R_next @ R0.transpose(-1, -2))
        return torch.cat([c_next, om_next], dim=-1)

    def node_features(self, transform: GraphSpectralTransform, k: Tensor) -> Tensor:
        """Sign-safe per-molecule features: band progress ``diag(M_k)``, ``diag(dM_k/dk)`` and heat-kernel
        diagonals ``diag(exp(-t L))``: ``(B, M, 2 + len(HEAT_TIMES))``."""
        path = self.core(transform)
        like = transform.evecs
        kc, dkc = self.trans_clock(k)
        mu, dmu = path.weights(kc, like[..., :1])
        dmu = dmu * dkc.to(dmu.dtype).reshape(-1, *([1] * (dmu.dim() - 1)))
        prog = torch.diagonal(transform.matrix(mu), dim1=-2, dim2=-1)
        dprog = torch.diagonal(transform.matrix(dmu), dim1=-2, dim2=-1)
        heat = transform.heat_kernel_diagonal(list(HEAT_TIMES))
        return torch.cat([prog[..., None], dprog[..., None], heat], dim=-1)


NUM_NODE_FEATURES = 2 + len(HEAT_TIMES)


def rotation_error(R: Tensor, R1: Tensor, symmetries: Tensor, sym_mask: Tensor | None = None) -> Tensor:
    """Angle (degrees) between ``R (B, M, 3, 3)`` and the closest symmetry-equivalent of ``R1``: ``(B, M)``."""
    best, _ = closest_equivalent_rotation(R1, R, symmetries, sym_mask)
    return torch.rad2deg(so3.geodesic_distance(best, R))


def closest_equivalent_rotation(R1: Tensor, R0: Tensor, symmetries: Tensor,
                                sym_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The symmetry-equivalent target orientation closest to the current one, per molecule.

    If the body-frame rotation ``S_g`` maps the template onto itself (``S_g t_a = t_{perm_g(a)}``), the
    orientation ``R1 S_g`` places the same atoms at the same positions up to relabelling: the same crystal.
    We pick the one at the smallest rotation angle away from ``R0`` (:func:`kflow_mol.so3.closest`).

    Args:
        R1: ``(B, M, 3, 3)`` target orientations; R0: ``(B, M, 3, 3)`` current orientations.
        symmetries: ``(B, G, 3, 3)`` body-frame symmetry rotations (identity first, padded with identity), or
            ``(B, M, G, 3, 3)`` per copy (copies of different shapes have different groups).
        sym_mask: ``(B, G)`` or ``(B, M, G)`` bool, real symmetries (padding excluded).

    Returns:
        ``(R1_equiv (B, M, 3, 3), index (B, M))`` with ``R1_equiv = R1 S_index``.
    """
    per_copy = symmetries.ndim == 5
    cand = R1[:, :, None] @ (symmetries if per_copy else symmetries[:, None]).to(R1.dtype)  # (B, M, G, 3, 3)
    mask = None if sym_mask is None else (sym_mask if per_copy else sym_mask[:, None, :])
    idx = so3.closest(cand, R0, mask)
    best = torch.gather(cand, 2, idx[:, :, None, None, None].expand(-1, -1, 1, 3, 3)).squeeze(2)
    return best, idx
