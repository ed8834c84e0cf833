"""The lattice behind a cluster's centroids: fit ``c_i ≈ o + n_i B`` with integer ``n_i``.

In a crystal with one molecule per lattice point, the 17 centroids of a cluster are points of one Bravais
lattice. Fitting that lattice to approximate centroids averages their errors over 17 molecules and 12
parameters (measured on real clusters with 0.3 Å noise per coordinate: the fitted points lie about half as far
from the truth as the noisy ones), which an orientation search by pair energy needs: clashes grow fast with
centroid error. Where the centroids are not one lattice (several molecules per lattice point, or errors of
more than about 1 Å), no fit passes the checks below or its residual says so.

Every independent triple of the 12 shortest centroid differences is tried as a basis (the successive minima
of a three-dimensional lattice always form a basis, so the right one is among them even when noise reorders
the lengths); the integer coordinates come by rounding, ``o, B`` by least squares, twice, and the triple with
the smallest residual wins among those whose coordinates generate all of Z^3 and that leave no lattice site
inside the cluster empty (a finer lattice, with sites left empty, fits a set of points as well or better:
the points of a lattice, or of two interpenetrating ones).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

__all__ = ["LatticeFit", "SearchConfig", "SearchResult", "central_index", "fit_lattice", "scan_orientation",
           "search_orientation"]


@dataclass
class LatticeFit:
    """A lattice fitted to centroids ``(M, 3)``.

    Attributes:
        origin: ``(3,)``; basis: ``(3, 3)`` rows are the lattice vectors; coords: ``(M, 3)`` integers.
        points: ``(M, 3)`` the fitted centroids ``origin + coords @ basis``.
        residual: RMS distance (Å) from the centroids to their fitted points.
    """

    origin: np.ndarray
    basis: np.ndarray
    coords: np.ndarray
    points: np.ndarray
    residual: float


def central_index(c) -> int:
    """The central molecule of centroids ``c (M, 3)``: the one nearest their mean."""
    c = np.asarray(c, dtype=np.float64)
    return int(np.linalg.norm(c - c.mean(0), axis=1).argmin())


def _candidates(c: np.ndarray, min_len: float, keep: int = 12) -> np.ndarray:
    """The ``keep`` shortest centroid differences of at least ``min_len`` Å, one of each ``±v`` pair."""
    i, j = np.triu_indices(len(c), 1)
    d = c[j] - c[i]
    n = np.linalg.norm(d, axis=1)
    d = d[n >= min_len][np.argsort(n[n >= min_len])]
    out: list[np.ndarray] = []
    for v in d:  # differences of translation-related pairs repeat: keep one per direction and length
        if all(min(np.linalg.norm(v - w), np.linalg.norm(v + w)) > 0.5 * min_len for w in out):
            out.append(v)
        if len(out) == keep:
            break
    return np.array(out)


def _fit(c: np.ndarray, B: np.ndarray, o: np.ndarray, rounds: int) -> LatticeFit:
    """Round to integer coordinates in basis ``B`` about ``o``, refit ``o, B`` by least squares, ``rounds`` times."""
    for _ in range(rounds):
        n = np.rint(np.linalg.solve(B.T, (c - o).T).T)
        A = np.concatenate([np.ones((len(c), 1)), n], 1)
        if np.linalg.matrix_rank(A) < 4:  # the coordinates are not three-dimensional: keep the last basis
            break
        sol, *_ = np.linalg.lstsq(A, c, rcond=None)
        o, B = sol[0], sol[1:]
    n = np.rint(np.linalg.solve(B.T, (c - o).T).T)
    points = o + n @ B
    return LatticeFit(o, B, n.astype(np.int64), points, float(np.sqrt(((c - points) ** 2).sum(1).mean())))


def fit_lattice(c: np.ndarray, min_len: float = 3.0, rounds: int = 2) -> LatticeFit | None:
    """Fit one lattice to centroids ``c (M, 3)``; ``None`` when no basis passes (the centroids span fewer than
    three dimensions, or every candidate lattice is finer than the points or leaves sites inside empty).

    Args:
        c: centroids (Å).
        min_len: differences shorter than this (Å) are not lattice vectors (two molecules cannot be closer).
        rounds: rounding and least-squares rounds.
    """
    c = np.asarray(c, dtype=np.float64)
    v = _candidates(c, min_len)
    o = c[central_index(c)]
    best = None
    for t in combinations(range(len(v)), 3):  # every independent triple; the best fit wins
        B = v[list(t)]
        vol = abs(np.linalg.det(B))
        if vol < 0.2 * np.prod(np.linalg.norm(B, axis=1)):  # nearly coplanar
            continue
        f = _fit(c, B, o, rounds)
        if _index(f.coords) == 1 and not _empty_sites(f) and (best is None or f.residual < best.residual):
            best = f
    return best


def _empty_sites(f: LatticeFit, reach: int = 4) -> int:
    """Lattice points well inside the cluster (within 0.9 of its radius about the central point) that no molecule
    occupies. A cluster of nearest neighbours leaves none; a finer lattice fitted to two interpenetrating ones
    (long, skewed vectors) leaves many."""
    r = np.arange(-reach, reach + 1)
    grid = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    centre = f.coords[central_index(f.points)]
    radius = 0.9 * np.linalg.norm((f.coords - centre) @ f.basis, axis=1).max()
    inside = grid[np.linalg.norm(grid @ f.basis, axis=1) < radius] + centre
    occupied = {tuple(v) for v in f.coords.tolist()}
    return sum(tuple(v) not in occupied for v in inside.tolist())


def _index(n: np.ndarray) -> int:
    """Index in Z^3 of the lattice the integer coordinates ``n (M, 3)`` generate (gcd of the 3x3 minors of their
    differences). Above 1 the fitted basis is finer than the lattice of the points (it fits them as well, with
    points left empty), so it is not the lattice of the cluster."""
    d = n - n[0]
    g = 0
    for t in combinations(range(len(d)), 3):
        g = int(np.gcd(g, round(abs(np.linalg.det(d[list(t)])))))
        if g == 1:
            break
    return g


@dataclass
class SearchConfig:
    """Knobs of :func:`search_orientation`.

    Attributes:
        candidates: uniform random orientations scanned (heavy atoms, ``scan_cutoff``).
        keep: best scanned orientations relaxed (all atoms, ``cutoff``).
        steps: L-BFGS iterations of each relaxation.
        max_residual: centroids whose lattice fit is worse than this (RMS Å) are not one lattice: no search.
        scan_cutoff, cutoff: pair cutoffs (Å).
        seed: seed of the scanned orientations.
    """

    candidates: int = 4096
    keep: int = 10
    steps: int = 30
    max_residual: float = 0.5
    scan_cutoff: float = 6.0
    cutoff: float = 8.0
    seed: int = 0


@dataclass
class SearchResult:
    """The searched packing: ``c (M, 3)`` lattice points, ``G (3, 3)`` the common orientation of every copy,
    ``energy`` the central molecule's pair energy (kcal/mol) and the lattice fit it started from."""

    c: np.ndarray
    G: np.ndarray
    energy: float
    lattice: LatticeFit

    def positions(self, template: np.ndarray) -> np.ndarray:
        """``(M, n, 3)`` every copy of ``template (n, 3)`` at its lattice point, turned by ``G``."""
        return self.c[:, None] + np.asarray(template) @ self.G.T


def scan_orientation(species, template, c, focus: int | None, cfg: SearchConfig | None = None) -> tuple[np.ndarray, float]:
    """The lowest-energy common orientation ``G (3, 3)`` of every copy of ``template (n, 3)`` at centroids
    ``c (M, 3)``, and its pair energy (kcal/mol).

    ``candidates`` seeded uniform rotations are scored on heavy atoms (``scan_cutoff``); the ``keep`` best are
    relaxed in orientation on all atoms (``cutoff``, L-BFGS, float64) and the lowest wins. ``focus``: score only
    the pairs of that molecule (:func:`kflow_mol.refine.pair_energy`); ``None``: every pair of the cluster.
    """
    import torch  # lazy, as the rest of the physics: only the search needs it

    from . import so3
    from .refine import minimise, pair_energy, uff_vdw

    cfg = cfg or SearchConfig()
    T = torch.as_tensor(np.asarray(template), dtype=torch.float64)
    p0 = torch.as_tensor(np.asarray(c), dtype=torch.float64)
    x, d = (torch.from_numpy(a) for a in uff_vdw(np.asarray(species)))
    G = so3.random_rotation(cfg.candidates, torch.Generator().manual_seed(cfg.seed))
    heavy = torch.as_tensor(np.asarray(species) > 1)  # the scan on heavy atoms only (about 4x fewer pairs)
    Th, xh, dh = T[heavy], x[heavy][:, heavy].float(), d[heavy][:, heavy].float()
    E = torch.cat([pair_energy((p0[None, :, None, :] + torch.einsum("nj,gij->gni", Th, g)[:, None]).float(),
                               xh, dh, cfg.scan_cutoff, focus) for g in G.split(16)]).double()
    best = (float("inf"), None)
    for b in E.argsort()[: cfg.keep]:
        om = torch.zeros(3, dtype=torch.float64, requires_grad=True)

        def energy(om=om, g0=G[b]):
            return pair_energy(p0[:, None] + (T @ (so3.exp(om) @ g0).T)[None], x, d, cfg.cutoff, focus)

        minimise([om], energy, cfg.steps)
        with torch.no_grad():
            e = float(energy())
        if e < best[0]:
            best = (e, (so3.exp(om.detach()) @ G[b]).numpy())
    return best[1], best[0]


def search_orientation(species, template, c, cfg: SearchConfig | None = None) -> SearchResult | None:
    """One orientation for every copy of a rigid molecule, chosen by pair energy on a lattice fitted to ``c``.

    Most real clusters are mostly one orientation class (copies related by lattice translations are parallel).
    Where the centroids ``c (M, 3)`` are one lattice (:func:`fit_lattice` residual <= ``max_residual``), the
    common orientation is :func:`scan_orientation` at the fitted points, scored by the pair energy of the
    **central** molecule with its 16 neighbours: a bulk-like energy, where the energy of the whole vacuum cluster
    prefers wrong orientations that turn the outer molecules into the vacuum. The lattice stays the fitted one:
    relaxing it too (UFF 12-6 has its own lattice minimum, ~0.4 Å away) turned right orientations wrong in a
    first test.

    Args:
        species: ``(n,)``; template: ``(n, 3)`` centred body coordinates; c: ``(M, 3)`` centroids (the flow's).
        cfg: :class:`SearchConfig`.

    Returns:
        :class:`SearchResult`, or ``None`` when the centroids are not one lattice.
    """
    cfg = cfg or SearchConfig()
    fit = fit_lattice(c)
    if fit is None or fit.residual > cfg.max_residual:
        return None
    focus = central_index(fit.points)
    G, e = scan_orientation(species, template, fit.points, focus, cfg)
    return SearchResult(fit.points, G, e, fit)
