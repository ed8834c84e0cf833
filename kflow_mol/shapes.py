"""Per-copy rigid bodies: the distinct shapes among the 17 copies of a cluster.

The 17 copies of a real cluster are not always one rigid shape: a centrosymmetric crystal of a conformationally
chiral molecule holds mirror images, a Z' > 1 crystal holds several conformers, and COD-Cluster17 makes each
molecule a rigid body of its own conformation. So every copy ``i`` carries its own body-frame coordinates
``body_i`` (same element sequence and atom order in every copy) with ``x_i = body_i @ R_i^T + c_i`` exactly.

Copies whose bodies agree (a proper rigid fit within ``tol`` Å RMSD) share one *shape*: a representative
template that the network encodes once per cluster, and whose automorphisms are computed once. ``body_i`` is
the copy's own coordinates expressed in its shape's frame (so it equals the template up to the fit residual),
which keeps the placement exact whatever ``tol`` is.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .frames import body_coordinates
from .so3 import kabsch_np
from .symmetry import automorphisms

__all__ = ["SHAPE_TOL", "Shapes", "find_shapes", "shape_symmetries"]

# Å RMSD under which two copies share a shape (an encoding and an automorphism group). Builder clusters are
# exact images (~1e-12 Å); 0.01 Å only merges copies whose differences no network feature can resolve.
SHAPE_TOL = 0.01


@dataclass
class Shapes:
    """Distinct rigid shapes of a cluster's copies.

    Attributes:
        templates: ``(K, n, 3)`` centred body-frame coordinates of each distinct shape (inertial frame of the
            first copy that has it; shape 0 is the central copy's).
        copy_shape: ``(M,)`` shape index of every copy.
        R: ``(M, 3, 3)`` orientation of every copy (body -> lab, proper).
        body: ``(M, n, 3)`` each copy's own body coordinates (``x_i = body_i @ R_i^T + c_i`` exactly).
        fit_rmsd: ``(M,)`` RMSD (Å) between ``body_i`` and its shape's template.
        mirror_of: ``(K,)`` index of an earlier shape that this one is the mirror image of (-1: none).
    """

    templates: np.ndarray
    copy_shape: np.ndarray
    R: np.ndarray
    body: np.ndarray
    fit_rmsd: np.ndarray
    mirror_of: np.ndarray

    @property
    def num_shapes(self) -> int:
        return int(self.templates.shape[0])


def find_shapes(positions: np.ndarray, tol: float = SHAPE_TOL) -> Shapes:
    """Group the copies of a cluster into distinct rigid shapes.

    Args:
        positions: ``(M, n, 3)`` copies in the same atom order (any rigid state: final or loose).
        tol: proper-fit RMSD (Å) under which a copy takes an existing shape.

    Returns:
        :class:`Shapes`.
    """
    x = np.asarray(positions, dtype=np.float64)
    M = x.shape[0]
    xc = x - x.mean(1, keepdims=True)
    templates: list[np.ndarray] = []
    mirror_of: list[int] = []
    copy_shape = np.zeros(M, dtype=np.int64)
    R = np.zeros((M, 3, 3))
    rmsd = np.zeros(M)
    for i in range(M):
        for s, t in enumerate(templates):
            Ri, r = kabsch_np(t, xc[i])
            if r < tol:
                copy_shape[i], R[i], rmsd[i] = s, Ri, r
                break
        else:
            t, _ = body_coordinates(torch.from_numpy(x[i]))
            t = t.numpy()
            mirror = -1
            for s, u in enumerate(templates):  # a mirror image: an improper fit onto an earlier shape
                Rm, r = kabsch_np(t, u, proper=False)
                if r < tol and np.linalg.det(Rm) < 0:
                    mirror = s
                    break
            templates.append(t)
            mirror_of.append(mirror)
            copy_shape[i] = len(templates) - 1
            R[i] = kabsch_np(t, xc[i])[0]  # the inertial frame up to rounding, kept a proper rotation
    body = np.einsum("mna,mab->mnb", xc, R)  # R_i^T (x_i - c_i), row form
    return Shapes(np.stack(templates), copy_shape, R, body, rmsd, np.asarray(mirror_of, dtype=np.int64))


def shape_symmetries(species, templates: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Automorphisms of every distinct shape, identity-padded to a common count.

    Returns:
        ``perms (K, G, n)`` long, ``rotations (K, G, 3, 3)`` and ``orders (K,)`` (the real group orders;
        rows past ``orders[k]`` repeat the identity, which changes no minimum over the group).
    """
    found = [automorphisms(species, t) for t in templates]
    K, n = len(found), templates.shape[1]
    G = max(int(p.shape[0]) for p, _ in found)
    perms = np.tile(np.arange(n), (K, G, 1))
    rots = np.tile(np.eye(3), (K, G, 1, 1))
    orders = np.zeros(K, dtype=np.int64)
    for k, (p, r) in enumerate(found):
        g = int(p.shape[0])
        perms[k, :g], rots[k, :g], orders[k] = p.numpy(), r.numpy(), g
    return perms, rots, orders
