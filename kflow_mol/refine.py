"""Optional physics refinement after the flow: a short rigid-body minimisation of a UFF 12-6 pair energy.

The flow puts molecules in a basin; this only finishes. The 17 molecules stay rigid (their own template),
each moves by a rotation ``Exp(omega_i)`` about its centroid and a translation; a harmonic restraint holds
the centroids near the flow's output (a vacuum cluster with free centroids collapses). Intermolecular
pairs only (intramolecular geometry is rigid). The UFF well depth and minimum distance of each element
come from RDKit's UFF (``GetUFFVdWParams`` on a hydride of the element, Lorentz-Berthelot-style geometric
combination as in UFF); a soft core below ``0.7 x_ij`` keeps the energy finite for overlapping atoms so
clashing flow outputs can be pushed apart.

Reported beside the unrefined result, never folded into it (``kflow-mol assemble/evaluate --refine``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from ase.data import vdw_radii

from . import so3

__all__ = ["RefineConfig", "RefineResult", "minimise", "pair_energy", "refine_cluster", "uff_vdw"]


@lru_cache(maxsize=None)
def _uff_element(z: int) -> tuple[float, float]:
    """UFF ``(x_i, D_i)`` (Å, kcal/mol) of element ``z``, read from RDKit on its simplest hydride."""
    from rdkit import Chem, RDLogger  # lazy: RDKit takes seconds to import, only for the refinement
    from rdkit.Chem import rdForceFieldHelpers as ffh

    RDLogger.DisableLog("rdApp.*")
    sym = Chem.GetPeriodicTable().GetElementSymbol(int(z))
    mol = Chem.MolFromSmiles("[H][H]" if z == 1 else f"[{sym}]")
    if mol is not None and z != 1:
        mol = Chem.AddHs(mol, explicitOnly=False)
        if mol.GetNumAtoms() == 1:  # no default valence: try a plain organic-subset atom
            alt = Chem.MolFromSmiles(sym)
            mol = Chem.AddHs(alt) if alt is not None else mol
    try:
        if mol is not None and ffh.UFFHasAllMoleculeParams(mol):
            x, d = ffh.GetUFFVdWParams(mol, 0, 0)
            return float(x), float(d)
    except (RuntimeError, ValueError):
        pass
    # fall back on twice the vdW radius as the minimum distance and a typical well depth
    r = float(vdw_radii[int(z)]) if np.isfinite(vdw_radii[int(z)]) else 2.0
    return 2 * r, 0.1


def uff_vdw(species: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair parameters ``x_ij = sqrt(x_i x_j)`` and ``D_ij = sqrt(D_i D_j)``, ``(n, n)`` each."""
    p = np.array([_uff_element(int(z)) for z in species])
    return np.sqrt(p[:, None, 0] * p[None, :, 0]), np.sqrt(p[:, None, 1] * p[None, :, 1])


@dataclass
class RefineConfig:
    """Knobs of the refinement.

    Attributes:
        steps: L-BFGS iterations.
        restraint: harmonic centroid restraint (kcal/mol/Å²) towards the flow's centroids.
        cutoff: pair cutoff (Å).
    """

    steps: int = 60
    restraint: float = 1.0
    cutoff: float = 8.0


@dataclass
class RefineResult:
    """Refined ``c (M, 3)``, ``R (M, 3, 3)`` and the pair energy before/after (kcal/mol)."""

    c: np.ndarray
    R: np.ndarray
    energy_before: float
    energy_after: float


def pair_energy(pos: torch.Tensor, x: torch.Tensor, d: torch.Tensor, cutoff: float,
                focus: int | None = None) -> torch.Tensor:
    """UFF 12-6 energy of intermolecular pairs: ``pos (..., M, n, 3)``, ``x, d (n, n)`` -> ``(...)`` (a stack
    of candidate clusters is scored in one call).

    With ``focus = i`` only the pairs between molecule ``i`` and the others count: the energy of one molecule
    in its shell of neighbours. For the central molecule of a cluster this is a bulk-like energy, free of the
    vacuum surface that the other 16 molecules have on one side.
    """
    *lead, m, n, _ = pos.shape
    flat = pos.reshape(*lead, m * n, 3)
    if focus is None:
        r = torch.cdist(flat, flat).reshape(*lead, m, n, m, n)
        other = ~torch.eye(m, dtype=torch.bool)[:, None, :, None]
        xx, dd, half = x[None, :, None, :], d[None, :, None, :], 0.5  # each pair seen twice
    else:
        r = torch.cdist(pos[..., focus, :, :], flat).reshape(*lead, n, m, n)
        other = (torch.arange(m) != focus)[None, :, None]
        xx, dd, half = x[:, None, :], d[:, None, :], 1.0
    # soft core: below 0.7 x the 12-6 curve is continued linearly in r (finite for overlapping atoms)
    r0 = 0.7 * xx
    rr = torch.maximum(r, r0)
    u6 = (xx / rr) ** 6
    e = dd * (u6 * u6 - 2 * u6)
    slope = dd * (-12 * (xx / r0) ** 12 + 12 * (xx / r0) ** 6) / r0
    e = torch.where(r < r0, e + slope * (r - r0), e)
    e = torch.where(other & (r < cutoff), e, torch.zeros_like(e))
    return half * e.flatten(-other.ndim).sum(-1)


def minimise(params: list[torch.Tensor], loss, steps: int) -> None:
    """Minimise ``loss()`` over ``params`` in place: one L-BFGS run of ``steps`` iterations with a strong-Wolfe
    line search (every physics minimisation here: the refinement and the orientation scan)."""
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    opt.step(closure)


def refine_cluster(species: np.ndarray, template: np.ndarray, c: np.ndarray, R: np.ndarray,
                   cfg: RefineConfig | None = None) -> RefineResult:
    """Minimise the pair energy over the rigid poses of one cluster (float64, L-BFGS).

    Args:
        species: ``(n,)``; template: ``(n, 3)`` centred body-frame coordinates, or ``(M, n, 3)`` each copy's own.
        c: ``(M, 3)`` centroids; R: ``(M, 3, 3)`` orientations (the flow's output).
        cfg: :class:`RefineConfig`.
    """
    cfg = cfg or RefineConfig()
    x, d = (torch.from_numpy(a) for a in uff_vdw(np.asarray(species)))
    t = torch.as_tensor(np.asarray(template), dtype=torch.float64)
    t = t.expand(len(c), -1, -1) if t.ndim == 2 else t  # one template shared by every copy, or one per copy
    c_ref = torch.as_tensor(c, dtype=torch.float64)
    R_ref = torch.as_tensor(R, dtype=torch.float64)
    dc = torch.zeros_like(c_ref, requires_grad=True)
    om = torch.zeros_like(c_ref, requires_grad=True)

    def poses():
        return c_ref + dc, so3.exp(om) @ R_ref

    def energy():
        cc, Rn = poses()
        return pair_energy(torch.einsum("mij,mnj->mni", Rn, t) + cc[:, None], x, d, cfg.cutoff)

    def total():
        return energy() + cfg.restraint * (dc**2).sum()

    with torch.no_grad():
        e0 = float(energy())  # the restraint is zero at the start
    minimise([dc, om], total, cfg.steps)
    with torch.no_grad():
        cc, Rn = poses()
        e1 = float(energy())
    return RefineResult(cc.numpy(), Rn.numpy(), e0, e1)
