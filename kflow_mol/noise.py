"""The loose-state noise model: how an initial (x_0) arrangement is made from a packed cluster.

This is **our assumption**: the noise model of the official COD-Cluster17 data is unpublished. We make each
molecule's perturbation independent, so that no single global operation undoes it:

1. every molecule is rotated about its own centroid by an independent uniform (Haar) random rotation;
2. its centroid is moved away from the cluster centre (the mean of the 17 centroids) by its *own* factor
   ``f_i ~ U[expansion_mean - expansion_spread, expansion_mean + expansion_spread]``
   (a single global factor would be trivially invertible: shrinking back gives PM-centre ~0.7 Å);
3. isotropic Gaussian jitter of ``jitter`` Å is added to the centroid;
4. a molecule whose atoms come closer than ``min_distance`` Å to an already placed molecule is redrawn
   (at most ``max_tries`` times, then a ``RuntimeError``).

The defaults (factor 2.25 ± 0.75, jitter 3 Å) were calibrated on real clusters so that the do-nothing PM-atom
is clearly above the published baselines (≈13.6 Å) while undoing the mean expansion stays far off
(measured, one draw per cluster, seeds 0..):

=================================  =====  ==================  ===========================
clusters (cut with kflow_mol.cif)  count  do-nothing PM-atom  undo-mean-expansion PM-centre
=================================  =====  ==================  ===========================
pyxtal_testdb (small molecules)    67     16.6 Å (10.2-23.8)  2.46 Å (min 1.64)
csd_organic_semiconductors (1-60)  44     25.1 Å (19.9-33.1)  3.09 Å (min 2.00)
=================================  =====  ==================  ===========================

A single global factor (spread 0, jitter 0) would give PM-centre 0 after undoing it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .so3 import random_rotation_np

__all__ = ["LooseConfig", "make_loose", "posterior_centroids", "undo_mean_expansion"]


@dataclass
class LooseConfig:
    """Knobs of the loose-state noise model (lengths in Å).

    Attributes:
        expansion_mean: mean factor by which centroids are pushed out from the cluster centre.
        expansion_spread: half-width of the uniform distribution of the per-molecule factor.
        jitter: standard deviation of the isotropic Gaussian centroid jitter.
        min_distance: smallest allowed atom-atom distance between different molecules.
        max_tries: redraws per molecule before giving up.
        rotate: apply independent uniform random rotations (False: keep the crystal orientations).
    """

    expansion_mean: float = 2.25
    expansion_spread: float = 0.75
    jitter: float = 3.0
    min_distance: float = 1.5
    max_tries: int = 200
    rotate: bool = True

    def __post_init__(self) -> None:
        if self.expansion_spread < 0 or self.expansion_mean - self.expansion_spread <= 0:
            raise ValueError(
                f"LooseConfig: need expansion_mean - expansion_spread > 0, got "
                f"{self.expansion_mean} - {self.expansion_spread}"
            )
        if self.jitter < 0 or self.min_distance < 0 or self.max_tries < 1:
            raise ValueError(f"LooseConfig: invalid values {self}")


def _check(final: np.ndarray) -> np.ndarray:
    final = np.asarray(final, dtype=np.float64)
    if final.ndim != 3 or final.shape[-1] != 3 or final.shape[1] < 1:
        raise ValueError(f"expected positions (M, n, 3), got {final.shape}")
    if not np.all(np.isfinite(final)):
        raise ValueError("positions contain non-finite values")
    return final


def make_loose(final: np.ndarray, rng: np.random.Generator, cfg: LooseConfig | None = None) -> np.ndarray:
    """Draw a loose initial arrangement of a packed cluster (rigid moves per molecule).

    Args:
        final: ``(M, n, 3)`` packed positions (M = 17 for COD-Cluster17).
        rng: numpy generator (the result is a deterministic function of its state).
        cfg: noise knobs (default :class:`LooseConfig`).

    Returns:
        ``(M, n, 3)`` float64 loose positions, each molecule a rigid copy of its packed pose.

    Raises:
        RuntimeError: a molecule could not be placed without overlap in ``cfg.max_tries`` draws.
    """
    cfg = cfg or LooseConfig()
    final = _check(final)
    M = final.shape[0]
    c = final.mean(1)  # (M, 3) unweighted centroids
    centre = c.mean(0)
    body = final - c[:, None]
    lo, hi = cfg.expansion_mean - cfg.expansion_spread, cfg.expansion_mean + cfg.expansion_spread
    out = np.empty_like(final)
    for i in range(M):
        for _ in range(cfg.max_tries):
            R = random_rotation_np(rng) if cfg.rotate else np.eye(3)
            f = rng.uniform(lo, hi)
            ci = centre + f * (c[i] - centre) + cfg.jitter * rng.standard_normal(3)
            cand = body[i] @ R.T + ci
            if i == 0 or cfg.min_distance <= 0:
                break
            placed = out[:i].reshape(-1, 3)
            d2 = np.min(np.sum((cand[:, None] - placed[None]) ** 2, axis=-1))
            if d2 >= cfg.min_distance**2:
                break
        else:
            raise RuntimeError(
                f"make_loose: could not place molecule {i} without an atom closer than "
                f"{cfg.min_distance} Å to another molecule in {cfg.max_tries} tries; "
                f"increase expansion_mean/jitter or lower min_distance"
            )
        out[i] = cand
    return out


def undo_mean_expansion(initial: np.ndarray, cfg: LooseConfig | float | None = None) -> np.ndarray:
    """The "undo mean expansion" floor: shrink centroids about the cluster centre by the mean factor.

    Orientations are untouched. With per-molecule factors and jitter this must stay far from the target.

    Args:
        initial: ``(M, n, 3)`` loose positions.
        cfg: the noise config that produced them, or just its mean factor.

    Returns:
        ``(M, n, 3)`` positions with centroids ``centre + (c_i - centre) / expansion_mean``.
    """
    factor = float(cfg) if isinstance(cfg, (int, float)) else (cfg or LooseConfig()).expansion_mean
    initial = _check(initial)
    c = initial.mean(1)
    centre = c.mean(0)
    new_c = centre + (c - centre) / factor
    return initial - c[:, None] + new_c[:, None]


def posterior_centroids(initial: np.ndarray, cfg: LooseConfig, distances: np.ndarray, n_factors: int = 61) -> np.ndarray:
    """The per-molecule Bayes floor: every centroid moved to its posterior mean given its own loose centroid only.

    This is the best a model can do that learns each molecule's noise and nothing collective (no neighbours, no
    lattice). With ``l`` the loose centroid about the loose centre, a prior of distances from the centre
    ``rho ~ distances`` with a uniform direction, and ``f ~ U[mean - spread, mean + spread]``, the direction
    integral is a von Mises-Fisher one: ``E[r | l] = l/|l| sum w rho A(kappa) / sum w`` with
    ``kappa = f rho |l| / jitter^2``, ``A = coth(kappa) - 1/kappa`` and
    ``w = exp(-(|l|^2 + f^2 rho^2) / 2 jitter^2) sinh(kappa) / kappa``.

    Args:
        initial: ``(M, n, 3)`` loose positions.
        cfg: the noise config that produced them (``jitter > 0``).
        distances: ``(P,)`` prior sample of distances (Å) of packed centroids from their cluster's centre.
        n_factors: grid over the expansion factor.

    Returns:
        ``(M, n, 3)`` positions with the posterior-mean centroids, orientations untouched.
    """
    initial = _check(initial)
    c = initial.mean(1)
    centre = c.mean(0)
    f = np.linspace(cfg.expansion_mean - cfg.expansion_spread, cfg.expansion_mean + cfg.expansion_spread, n_factors)
    rho = np.asarray(distances, dtype=np.float64)
    s2 = max(cfg.jitter, 1e-3) ** 2
    new_c = np.empty_like(c)
    for i, x in enumerate(c - centre):
        L = max(float(np.linalg.norm(x)), 1e-9)
        fr = f[:, None] * rho[None, :]
        kap = np.maximum(fr * L / s2, 1e-6)
        logw = -(L**2 + fr**2) / (2 * s2) + kap + np.log1p(-np.exp(-2 * kap)) - np.log(2 * kap)  # log sinh(k)/k
        w = np.exp(logw - logw.max())
        new_c[i] = centre + x / L * (w * rho[None, :] * (1 / np.tanh(kap) - 1 / kap)).sum() / w.sum()
    return initial - c[:, None] + new_c[:, None]
