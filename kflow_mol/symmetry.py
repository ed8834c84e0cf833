"""Proper point-group symmetry (automorphisms) of a rigid molecule, and closest equivalent labellings.

Symmetry-equivalent orientations of a molecule are the *same* physical pose with the atom labels permuted,
so a model cannot tell which of them a data set's labels chose. The training target, the symmetry-aware
metrics and the oracles all relabel each target molecule to the equivalent orientation closest to the
current one (:func:`closest_equivalent`).

Method (geometric, chosen over graph automorphisms): a graph-automorphism enumeration
(RDKit ``GetSubstructMatches(m, m, uniquify=False)``) explodes as ``3^k`` on molecules with ``k`` methyl
groups, and most of those permutations are not geometric symmetries, so capping the enumeration can miss
the real ones. Instead, a proper rotation about the centroid is fixed by the images of two non-collinear
atoms: take a reference pair ``(a, b)`` from the smallest classes of atoms with equal species and equal
distance to the centroid, enumerate every candidate image pair ``(a', b')`` with matching species, radii
and ``|a - b|``, build the rotation from the two frames, match atoms species by species (Hungarian on
distances), refine the rotation by Kabsch on the full permutation and accept it when the RMSD is below
``tol`` and the permutation preserves the covalent bond graph (:mod:`kflow_mol.molecule`'s bond rule). This finds every point group (including
cubic ones, e.g. adamantane) with at most ``|class(a)| * |class(b)|`` Hungarian solves.

Convention: ``rotations[g] @ x[a] ~= x[perms[g, a]]`` for centred coordinates ``x``; the identity is first.
Relabelling a molecule's positions as ``pos[..., perms[g], :]`` gives the same rigid molecule posed with
orientation ``R @ rotations[g]``.
"""
from __future__ import annotations

import numpy as np
import torch

from kflow_mol import so3
from kflow_mol.frames import frame_from_vectors
from kflow_mol.molecule import assign, bond_graph
from kflow_mol.so3 import kabsch_np

__all__ = ["automorphisms", "centroid_symmetries", "closest_equivalent", "equivalent_packings", "graph_automorphism_count"]


def automorphisms(
    species: np.ndarray | torch.Tensor,
    pos: np.ndarray | torch.Tensor,
    tol: float = 0.1,
    class_tol: float | None = None,
    check_bonds: bool = True,
    closure_slack: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Proper rotations mapping a rigid molecule onto itself up to an atom permutation.

    Args:
        species: ``(n,)`` atomic numbers.
        pos: ``(n, 3)`` positions of one molecule (Å).
        tol: accept a symmetry when the RMSD between the rotated molecule and its permuted self is below
            ``tol`` Å (after refining the rotation on all atoms).
        class_tol: tolerance (Å) for grouping atoms by distance to the centroid when generating candidates;
            default ``max(0.3, 3 * tol)`` so that no near-symmetry within ``tol`` RMSD is missed.
        check_bonds: also require the permutation to preserve the covalent bond graph
            (:func:`kflow_mol.molecule.bond_graph`).
        closure_slack: the accepted rotations are completed to the group they generate; its extra elements
            must fit within ``closure_slack * tol`` (else the worst generator is dropped), so the result is
            always a group.

    Returns:
        ``perms (G, n)`` long and ``rotations (G, 3, 3)`` float64, identity first, sorted deterministically.
        ``G`` is the order of the proper point group found (1 for an asymmetric molecule).
    """
    species = np.asarray(torch.as_tensor(species).cpu(), dtype=np.int64)
    x = np.asarray(torch.as_tensor(pos).cpu(), dtype=np.float64)
    n = len(species)
    if x.shape != (n, 3):
        raise ValueError(f"automorphisms: pos must be ({n}, 3), got {x.shape}")
    x = x - x.mean(0)
    class_tol = max(0.3, 3 * tol) if class_tol is None else class_tol
    adj = bond_graph(species, x) if check_bonds else None
    radius = np.linalg.norm(x, axis=1)

    def members(a: int) -> np.ndarray:
        return np.flatnonzero((species == species[a]) & (np.abs(radius - radius[a]) < class_tol))

    accepted: dict[tuple[int, ...], tuple[float, np.ndarray]] = {tuple(range(n)): (0.0, np.eye(3))}

    def consider(R0: np.ndarray) -> None:
        perm = assign(x @ R0.T, x, species)
        key = tuple(perm.tolist())
        if key in accepted or len(set(key)) != n:
            return
        R = kabsch_np(x, x[perm])[0]
        rmsd = np.sqrt(np.mean(np.sum((x @ R.T - x[perm]) ** 2, axis=1)))
        if rmsd >= tol:
            return
        if adj is not None and not np.array_equal(adj[np.ix_(perm, perm)], adj):
            return
        accepted[key] = (float(rmsd), R)

    off = np.flatnonzero(radius > 0.25)  # atoms far enough from the centre to define a direction
    if len(off) > 0:
        a, b = _reference_pair(x, radius, off, members)
        if b is not None:
            for _, R0 in _pair_images(x, a, b, members, 2 * class_tol):
                consider(R0)
        else:
            # Linear molecule: the proper group is infinite (C_inf); keep a C2 perpendicular to the axis
            # when it exists (D_inf), which is all a relabelling can express.
            ua = x[a] / radius[a]
            perp = np.cross(ua, [1.0, 0.0, 0.0])
            if np.linalg.norm(perp) < 0.1:
                perp = np.cross(ua, [0.0, 1.0, 0.0])
            perp /= np.linalg.norm(perp)
            consider(2 * np.outer(perp, perp) - np.eye(3))
    group = _close_group(accepted, x, tol, closure_slack)
    keys = sorted(group, key=lambda k: (k != tuple(range(n)), k))
    perms = torch.tensor(keys, dtype=torch.long)
    rots = torch.from_numpy(np.stack([group[k] for k in keys]))
    return perms, rots


def _reference_pair(x: np.ndarray, radius: np.ndarray, off: np.ndarray, members) -> tuple[int, int | None]:
    """The two points that fix an isometry about the centre: ``a`` from a smallest class (fewest candidate
    images), ``b`` non-collinear with it, from a small class and as perpendicular to ``a`` as possible
    (``None`` when every point of ``off`` is collinear with ``a``)."""
    sizes = np.array([len(members(i)) for i in off])
    a = off[np.argmin(sizes)]
    sin = np.linalg.norm(np.cross(x[a] / radius[a], x[off] / radius[off, None]), axis=1)
    if not (sin > 0.2).any():
        return a, None
    return a, off[sin > 0.2][np.lexsort((-sin[sin > 0.2], sizes[sin > 0.2]))[0]]


def _pair_images(x: np.ndarray, a: int, b: int, members, dist_tol: float, improper: bool = False):
    """Yield ``(sign, Q0)``: the rotation (``sign`` 1) and, with ``improper``, the improper isometry (``sign``
    -1) taking the pair ``(x[a], x[b])`` onto each candidate image pair ``(x[a2], x[b2])`` of the same classes
    whose distance matches within ``dist_tol``."""
    F, flip = frame_from_vectors(x[a], x[b]), np.diag([1.0, 1.0, -1.0])
    dab = np.linalg.norm(x[a] - x[b])
    for a2 in members(a):
        for b2 in members(b):
            if a2 == b2 or abs(np.linalg.norm(x[a2] - x[b2]) - dab) > dist_tol:
                continue
            if np.linalg.norm(np.cross(x[a2], x[b2])) < 1e-8:
                continue
            G = frame_from_vectors(x[a2], x[b2])
            yield 1.0, G @ F.T
            if improper:
                yield -1.0, G @ flip @ F.T


def _rmsd_of(x: np.ndarray, perm: tuple[int, ...]) -> tuple[float, np.ndarray]:
    p = np.asarray(perm)
    R = kabsch_np(x, x[p])[0]
    return float(np.sqrt(np.mean(np.sum((x @ R.T - x[p]) ** 2, axis=1)))), R


def _close_group(
    accepted: dict[tuple[int, ...], tuple[float, np.ndarray]],
    x: np.ndarray,
    tol: float,
    slack: float,
    max_order: int = 240,
) -> dict[tuple[int, ...], np.ndarray]:
    """Make the accepted symmetries (``perm -> (rmsd, R)``) a group.

    Real crystal conformers are slightly distorted, so some elements of a point group can fall just above
    ``tol`` while their neighbours fall below: the accepted set is then not closed (e.g. 7 of benzene's 12).
    Generate the group of the accepted elements; keep it when every element fits within ``slack * tol``,
    otherwise drop the worst-fitting generator and retry. The result is always a group.
    """
    gens = dict(accepted)
    fits = dict(accepted)
    identity = tuple(range(len(x)))
    while True:
        group = set(gens)
        arr = {k: np.asarray(k) for k in group}
        frontier = list(group)
        while frontier and len(group) <= max_order:
            new = []
            for a in frontier:
                pa = arr[a]
                for b in gens:
                    c = tuple(pa[arr[b]].tolist()) if b in arr else tuple(pa[np.asarray(b)].tolist())
                    if c not in group:
                        group.add(c)
                        arr[c] = np.asarray(c)
                        new.append(c)
            frontier = new
        ok = len(group) <= max_order
        if ok:
            for k in group:
                if k not in fits:
                    fits[k] = _rmsd_of(x, k)
            ok = all(fits[k][0] < slack * tol for k in group)
        if ok:
            return {k: fits[k][1] for k in group}
        worst = max((k for k in gens if k != identity), key=lambda k: fits[k][0])
        del gens[worst]


def graph_automorphism_count(species: np.ndarray, pos: np.ndarray, max_matches: int = 100000) -> int:
    """Number of automorphisms of the molecular graph (RDKit, bonds perceived from coordinates).

    Used as a cross-check: every geometric symmetry is a graph automorphism, but not conversely
    (e.g. methyl rotors give ``3^k`` graph automorphisms).
    """
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds

    species = np.asarray(species)
    lines = [str(len(species)), ""] + [
        f"{Chem.GetPeriodicTable().GetElementSymbol(int(z))} {p[0]:.6f} {p[1]:.6f} {p[2]:.6f}"
        for z, p in zip(species, np.asarray(pos))
    ]
    mol = Chem.MolFromXYZBlock("\n".join(lines))
    rdDetermineBonds.DetermineConnectivity(mol)
    matches = mol.GetSubstructMatches(mol, uniquify=False, useChirality=False, maxMatches=max_matches)
    return len(matches)


def closest_equivalent(
    pos_target: torch.Tensor, pos_current: torch.Tensor, perms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relabel each target molecule to its symmetry-equivalent orientation closest to the current one.

    For every molecule and every automorphism ``g`` the relabelled target ``pos_target[..., perms[g], :]``
    is the same rigid pose; the one whose Kabsch rotation from ``pos_current`` has the smallest geodesic
    angle is chosen (ties: the lowest index, so the identity wins when nothing is closer).

    Args:
        pos_target: ``(..., n, 3)`` target molecules, e.g. ``(B, M, n, 3)``.
        pos_current: ``(..., n, 3)`` current molecules (same atom labels).
        perms: ``(G, n)`` long automorphism permutations shared by every molecule (identity first), or
            ``(..., G, n)`` per molecule (copies of different shapes; identity-padded to a common ``G``).

    Returns:
        ``target_permuted (..., n, 3)`` and ``index (...)`` long, the chosen automorphism per molecule.
    """
    if pos_target.shape != pos_current.shape:
        raise ValueError(f"closest_equivalent: shapes differ {pos_target.shape} vs {pos_current.shape}")
    perms = torch.as_tensor(perms).to(pos_target.device)
    G = perms.shape[-2]
    lead = pos_target.shape[:-2]
    if perms.ndim == 2:
        if G == 1:
            idx = torch.zeros(lead, dtype=torch.long, device=pos_target.device)
            return pos_target[..., perms[0], :], idx
        candidates = pos_target[..., perms, :]  # (..., G, n, 3)
    else:
        if tuple(perms.shape[:-2]) != tuple(lead):
            raise ValueError(f"closest_equivalent: per-molecule perms {tuple(perms.shape)} do not match "
                             f"molecules {tuple(lead)}")
        n = pos_target.shape[-2]
        src = pos_target.unsqueeze(-3).expand(*lead, G, n, 3)
        candidates = torch.gather(src, -2, perms[..., None].expand(*lead, G, n, 3))
    R = so3.kabsch(pos_current.unsqueeze(-3).expand_as(candidates), candidates)  # (..., G, 3, 3)
    idx = so3.closest(R, torch.eye(3, dtype=R.dtype, device=R.device).expand(*lead, 3, 3))
    gather = idx[..., None, None, None].expand(*idx.shape, 1, *pos_target.shape[-2:])
    return torch.gather(candidates, -3, gather).squeeze(-3), idx


def centroid_symmetries(c: np.ndarray, tol: float = 0.3) -> list[tuple[np.ndarray, np.ndarray]]:
    """Isometries (rotations and improper ones) mapping a set of molecule centroids onto itself about its mean,
    other than the identity.

    The method of :func:`automorphisms` on points without species: an isometry about the mean is fixed by the
    images of two non-collinear points and the handedness, so every candidate image pair (same distances to
    the mean and to each other, within ``2 tol``) gives two candidates, refined on all points (Procrustes with
    the candidate's determinant) and accepted when every point lands within ``tol`` of a distinct point.

    Args:
        c: ``(M, 3)`` centroids.
        tol: distance tolerance (Å) per point.

    Returns:
        ``[(Q (3, 3), pi (M,))]`` with ``Q (c_i - o) ~= c_pi(i) - o`` for the mean ``o``; ``pi`` a permutation.
    """
    x = np.asarray(c, dtype=np.float64)
    x = x - x.mean(0)
    radius = np.linalg.norm(x, axis=1)
    off = np.flatnonzero(radius > 2 * tol)
    if len(off) < 2:
        return []

    def members(a: int) -> np.ndarray:
        return off[np.abs(radius[off] - radius[a]) < 2 * tol]

    a, b = _reference_pair(x, radius, off, members)
    if b is None:  # collinear set: no finite group to speak of
        return []
    out: dict[tuple[int, ...], np.ndarray] = {}
    for sign, Q0 in _pair_images(x, a, b, members, 2 * tol, improper=True):
        pi = np.linalg.norm((x @ Q0.T)[:, None] - x[None], axis=-1).argmin(1)
        key = tuple(pi.tolist())
        if key in out or len(set(key)) < len(x) or key == tuple(range(len(x))):
            continue
        Q = kabsch_np(sign * x, x[pi])[0] * sign  # the best isometry of this handedness
        if np.linalg.norm(x @ Q.T - x[pi], axis=1).max() <= tol:
            out[key] = Q
    return [(Q, np.array(k)) for k, Q in sorted(out.items())]


def equivalent_packings(c1: np.ndarray, R1: np.ndarray, body: np.ndarray, copy_shape: np.ndarray,
                        tol: float = 0.3, planar_tol: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """The packed cluster moved by each symmetry of its centroid set: other labelled packings with the same
    centroids (within ``tol``) that the loose state cannot tell from the labelled one.

    The loose state carries the centroids (blurred) and random orientations. When an isometry ``Q`` maps the
    17 packed centroids onto themselves (``Q c_i = c_pi(i)``) but is not a symmetry of the crystal, the
    rigidly moved cluster ``Q X`` puts a copy on every site of ``X`` with another orientation, and a loose
    state is as likely to come from ``Q X`` as from ``X``. The orientation the labelled target asks for is
    then a coin toss that no network can call: regressed on, it averages the two. PM is blind to the choice
    once copies are matched (distance matrices are invariant under isometries).

    ``Q X`` is a rigid-body state of the same copies when ``Q`` is a rotation (``R' = Q R1_i``), or a
    reflection of planar copies (``R' = Q R1_i sigma_i`` with ``sigma_i`` the mirror through the copy's
    plane, which fixes every atom). Reflections are skipped for clusters with a non-planar copy, and so is
    every operation that maps a copy onto a site of another shape.

    Args:
        c1: ``(M, 3)`` packed centroids. R1: ``(M, 3, 3)`` orientations (body -> lab).
        body: ``(M, n, 3)`` each copy's body coordinates. copy_shape: ``(M,)`` shape index of every copy.
        tol: distance tolerance of the centroid symmetry (Å, :func:`centroid_symmetries`).
        planar_tol: a copy counts as planar when its mirror image through its least-inertia plane moves
            its atoms by at most this RMS distance (Å).

    Returns:
        ``(c (P, M, 3), R (P, M, 3, 3))``: the site of copy ``i`` in every equivalent packing (within
        ``tol`` of ``c1_i``) and the orientation of the copy there; the labelled packing first.
    """
    c1, R1 = np.asarray(c1, dtype=np.float64), np.asarray(R1, dtype=np.float64)
    o = c1.mean(0)
    _, v = np.linalg.eigh(np.einsum("mna,mnb->mab", body, body))
    normal = v[..., 0]  # (M, 3) least-inertia axis: the normal of a planar copy
    planar = 2 * np.sqrt(np.mean(np.einsum("mna,ma->mn", body, normal) ** 2, axis=1)) <= planar_tol
    sigma = np.eye(3) - 2 * normal[:, :, None] * normal[:, None, :]
    out_c, out_R = [c1], [R1]
    for Q, pi in centroid_symmetries(c1, tol):
        improper = np.linalg.det(Q) < 0
        if np.any(copy_shape[pi] != copy_shape) or (improper and not planar.all()):
            continue
        Rq = np.einsum("ab,mbc->mac", Q, R1)
        c, R = np.empty_like(c1), np.empty_like(R1)
        c[pi], R[pi] = (c1 - o) @ Q.T + o, (Rq @ sigma if improper else Rq)
        out_c.append(c)
        out_R.append(R)
    return np.stack(out_c), np.stack(out_R)
