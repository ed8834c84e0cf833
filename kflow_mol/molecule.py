"""Chemistry perception of one molecule: radii, the bond rule, bonded components, atom correspondence, formula.

Every module that needs to know which atoms are bonded (the CIF builder splitting a cell into molecules, the
molecule checks of every reader, the XYZ cluster reader, the symmetry finder) uses :func:`bond_graph` /
:func:`bond_cutoff`, so a molecule is the same molecule everywhere.

The bond rule: atoms ``a`` and ``b`` are bonded when ``d_ab < r_a + r_b + BOND_TOLERANCE`` with the covalent
radii ``r`` of Cordero et al. 2008 (ASE's table) and ``BOND_TOLERANCE`` = 0.4 Å (the CSD convention).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
from ase.data import chemical_symbols
from ase.data import covalent_radii as _CORDERO  # Cordero et al. 2008, every element
from ase.data import vdw_radii as _BONDI  # Bondi 1964, NaN where it has none
from ase.data.vdw_alvarez import vdw_radii as _ALVAREZ  # Alvarez 2013
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["BOND_TOLERANCE", "assign", "bond_cutoff", "bond_graph", "components", "covalent_radii", "hill_formula",
           "vdw_radii"]

BOND_TOLERANCE = 0.4  # Å added to the sum of covalent radii (the CSD convention)


def covalent_radii(species) -> np.ndarray:
    """Covalent radii (Å, Cordero 2008) of atomic numbers ``species (...)``; ``ValueError`` outside the table."""
    species = np.asarray(species, dtype=np.int64)
    if species.size and (species.min() < 1 or species.max() >= len(_CORDERO)):
        raise ValueError(f"atomic numbers out of range: {sorted(set(species.ravel().tolist()))}")
    return _CORDERO[species]


def vdw_radii(species) -> np.ndarray:
    """Van der Waals radii (Å) of atomic numbers ``(...)``: Bondi 1964 (ASE's table), Alvarez 2013 where Bondi
    has none."""
    z = np.asarray(species, dtype=np.int64)
    r = np.asarray(_BONDI, dtype=np.float64)[z]
    return np.where(np.isfinite(r), r, np.asarray(_ALVAREZ, dtype=np.float64)[z])


def hill_formula(species, sep: str = "") -> str:
    """Hill-order formula (``"C2H6O"``; ``sep=" "``: ``"C2 H6 O"``, CIF spacing): C, then H, then the rest
    alphabetically when there is carbon; everything alphabetically when there is none."""
    counts = Counter(chemical_symbols[int(z)] for z in np.asarray(species).reshape(-1))
    first = [e for e in ("C", "H") if e in counts] if "C" in counts else []
    order = first + sorted(e for e in counts if e not in first)
    return sep.join(f"{e}{counts[e] if counts[e] > 1 else ''}" for e in order)


def bond_cutoff(species_a, species_b, tolerance: float = BOND_TOLERANCE) -> np.ndarray:
    """The bond rule's distance below which atoms of ``species_a`` and ``species_b`` (broadcast) are bonded."""
    return covalent_radii(species_a) + covalent_radii(species_b) + tolerance


def bond_graph(species, pos: np.ndarray, tolerance: float = BOND_TOLERANCE) -> np.ndarray:
    """Covalent bond adjacency of one molecule (or of any set of atoms without periodic images).

    Args:
        species: ``(n,)`` atomic numbers.
        pos: ``(n, 3)`` positions (Å).
        tolerance: Å added to the sum of covalent radii.

    Returns:
        ``(n, n)`` bool adjacency without self loops.
    """
    species = np.asarray(species, dtype=np.int64)
    r = covalent_radii(species)
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    return (d < r[:, None] + r[None] + tolerance) & ~np.eye(len(species), dtype=bool)


def components(species, pos: np.ndarray, tolerance: float = BOND_TOLERANCE) -> tuple[int, np.ndarray]:
    """Bonded components: ``(count, labels (n,))`` with ``labels[a]`` the component of atom ``a``."""
    n_comp, labels = connected_components(coo_matrix(bond_graph(species, pos, tolerance)), directed=False)
    return int(n_comp), labels


def assign(a: np.ndarray, b: np.ndarray, species_a, species_b=None) -> np.ndarray:
    """Species-constrained atom correspondence ``perm`` with ``b[perm] ~ a`` (the smallest summed distance).

    The nearest atom of the same species when that is already one-to-one (then it is optimal), else a
    Hungarian assignment species by species.

    Args:
        a: ``(n, 3)`` positions to match.
        b: ``(n, 3)`` positions matched against, any atom order.
        species_a, species_b: ``(n,)`` atomic numbers of ``a`` and ``b`` (the same multiset; ``species_b``
            defaults to ``species_a``).

    Returns:
        ``(n,)`` int index into ``b``.
    """
    species_a = np.asarray(species_a)
    species_b = species_a if species_b is None else np.asarray(species_b)
    D = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
    D = np.where(species_a[:, None] == species_b[None, :], D, np.inf)
    perm = D.argmin(1)
    if len(np.unique(perm)) == len(perm):
        return perm
    for z in np.unique(species_a):
        ia, ib = np.flatnonzero(species_a == z), np.flatnonzero(species_b == z)
        if len(ia) != len(ib):
            raise ValueError(f"assign: {len(ia)} vs {len(ib)} atoms of element {z}")
        rows, cols = linear_sum_assignment(D[np.ix_(ia, ib)])
        perm[ia[rows]] = ib[cols]
    return perm
