"""SO(3) helpers for rigid molecules, batched over leading dimensions (torch, float32/float64).

Every rotation utility of the package lives here: the exp/log maps, Kabsch fits (:func:`kabsch`, batched torch;
:func:`kabsch_np`, its numpy twin for per-molecule loops, also with reflections), Haar random rotations
(:func:`random_rotation`, torch; :func:`random_rotation_np`, a numpy generator's stream), geodesic distances and
the choice of the closest among candidate rotations (:func:`closest`, behind both symmetry-aware relabellings).

Rotation vectors (axis * angle) are the Lie-algebra coordinates used by the rigid K-path. The maps go
through unit quaternions (``roma``), which keeps them stable both near the identity and near angle pi.
"""
from __future__ import annotations

import numpy as np
import roma
import torch

__all__ = ["closest", "exp", "geodesic_distance", "hat", "kabsch", "kabsch_np", "log", "random_rotation",
           "random_rotation_np"]


def hat(omega: torch.Tensor) -> torch.Tensor:
    """Skew-symmetric matrix of a vector.

    Args:
        omega: ``(..., 3)``.

    Returns:
        ``(..., 3, 3)`` with ``hat(a) @ b == cross(a, b)``.
    """
    x, y, z = omega.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack(
        [torch.stack([zero, -z, y], -1), torch.stack([z, zero, -x], -1), torch.stack([-y, x, zero], -1)], -2
    )


def exp(omega: torch.Tensor) -> torch.Tensor:
    """Exponential map: rotation vector -> rotation matrix.

    Args:
        omega: ``(..., 3)`` rotation vectors (axis times angle, radians).

    Returns:
        ``(..., 3, 3)`` proper rotation matrices.
    """
    if omega.shape[-1] != 3:
        raise ValueError(f"so3.exp expects (..., 3), got {tuple(omega.shape)}")
    # roma works through the unit quaternion (cos(t/2), sin(t/2) axis) with a Taylor branch at 0.
    return roma.rotvec_to_rotmat(omega)


def log(R: torch.Tensor) -> torch.Tensor:
    """Logarithm map (shortest arc): rotation matrix -> rotation vector with ``|omega| <= pi``.

    Args:
        R: ``(..., 3, 3)`` rotation matrices.

    Returns:
        ``(..., 3)`` rotation vectors. Near pi the axis sign is the one of the (w >= 0) quaternion.
    """
    if R.shape[-2:] != (3, 3):
        raise ValueError(f"so3.log expects (..., 3, 3), got {tuple(R.shape)}")
    # Quaternion extraction (Shepperd-style branch on the largest component) is stable at all angles;
    # the direct (R - R^T)/2 sin formula is not near pi.
    return roma.rotmat_to_rotvec(R)


def _outer_sum(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``sum_a A_a B_a^T`` for ``(..., n, 3)`` inputs, as a broadcast sum: measured far faster on CPU than a
    batched ``(3, n) @ (n, 3)`` matmul for these tiny shapes, and it keeps autograd simple."""
    return (A.unsqueeze(-1) * B.unsqueeze(-2)).sum(-3)


def kabsch(P: torch.Tensor, Q: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Optimal proper rotation aligning centred ``P`` onto centred ``Q``.

    Solves ``argmin_R sum_a w_a |R (P_a - cP) - (Q_a - cQ)|^2`` over SO(3) (a reflection is never
    returned: the SVD sign is fixed by ``roma.special_procrustes``).

    Args:
        P: ``(..., n, 3)`` source points.
        Q: ``(..., n, 3)`` target points (same atom order).
        weights: optional ``(..., n)`` non-negative weights (centroids are weighted the same way).

    Returns:
        ``(..., 3, 3)`` rotation ``R`` with ``R @ (P - cP) ~= Q - cQ``.
    """
    if P.shape[-1] != 3 or P.shape[-2:] != Q.shape[-2:]:
        raise ValueError(f"kabsch: incompatible shapes {tuple(P.shape)} and {tuple(Q.shape)}")
    if weights is None:
        cP = P.mean(-2, keepdim=True)
        cQ = Q.mean(-2, keepdim=True)
        Pc, Qc = P - cP, Q - cQ
        M = _outer_sum(Qc, Pc)  # (..., 3, 3) = sum_a q_a p_a^T
    else:
        w = weights.to(P.dtype).unsqueeze(-1)
        wsum = w.sum(-2, keepdim=True).clamp_min(torch.finfo(P.dtype).tiny)
        cP = (w * P).sum(-2, keepdim=True) / wsum
        cQ = (w * Q).sum(-2, keepdim=True) / wsum
        Pc, Qc = P - cP, Q - cQ
        M = _outer_sum(Qc, w * Pc)
    # argmax_R sum_a q_a^T R p_a = closest rotation (Frobenius) to M.
    return roma.special_procrustes(M)


def random_rotation(
    shape: tuple[int, ...] | int = (),
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform (Haar) random rotations.

    Args:
        shape: leading batch shape.
        generator: torch generator for reproducibility.
        dtype, device: of the result.

    Returns:
        ``(*shape, 3, 3)`` rotation matrices.
    """
    if isinstance(shape, int):
        shape = (shape,)
    # A normalised 4-D Gaussian is uniform on S^3, hence Haar on SO(3) through the double cover.
    q = torch.randn((*shape, 4), generator=generator, dtype=dtype, device=device)
    q = q / q.norm(dim=-1, keepdim=True)
    return roma.unitquat_to_rotmat(q)


def random_rotation_np(rng: np.random.Generator, size: int | None = None) -> np.ndarray:
    """Uniform (Haar) random rotation matrices from a numpy generator (normalised 4-D Gaussian quaternions).

    The numpy twin of :func:`random_rotation` for code that draws from a ``np.random.Generator`` stream (the
    loose-cluster noise model): one ``standard_normal((size, 4))`` draw per call.

    Args:
        rng: numpy generator.
        size: number of matrices (``None``: a single ``(3, 3)``).

    Returns:
        ``(3, 3)`` or ``(size, 3, 3)``.
    """
    q = rng.standard_normal((1 if size is None else size, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    R = np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )
    return R[0] if size is None else R


def geodesic_distance(R1: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    """Angle (radians, in [0, pi]) of the relative rotation ``R1^T R2``.

    Args:
        R1, R2: ``(..., 3, 3)`` broadcastable rotation matrices.

    Returns:
        ``(...)`` angles.
    """
    # |R2 - R1|_F = 2 sqrt(2) sin(alpha / 2): accurate near 0, unlike acos((tr - 1) / 2).
    return roma.rotmat_geodesic_distance(R1, R2)


def closest(candidates: torch.Tensor, R: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the candidate rotation closest (geodesic angle) to ``R``, per leading index.

    The one choice behind the symmetry-aware relabellings: among symmetry-equivalent orientations
    (:func:`kflow_mol.rigid.closest_equivalent_rotation`, rotation space) or symmetry-relabelled positions
    (:func:`kflow_mol.symmetry.closest_equivalent`, whose candidates are Kabsch fits compared with the identity).
    Numerically tied angles (within 1e-9 rad) go to the lowest index, so the identity, first, wins.

    Args:
        candidates: ``(..., G, 3, 3)`` rotations.
        R: ``(..., 3, 3)`` reference rotations (broadcast against the leading dims).
        mask: optional ``(..., G)`` bool, the candidates that may be chosen (padding excluded).

    Returns:
        ``(...)`` long index into ``G``.
    """
    G = candidates.shape[-3]
    angle = geodesic_distance(candidates, R.unsqueeze(-3).to(candidates.dtype))
    angle = angle + 1e-9 * torch.arange(G, dtype=angle.dtype, device=angle.device)
    if mask is not None:
        angle = torch.where(mask, angle, torch.full_like(angle, torch.inf))
    return angle.argmin(-1)


def kabsch_np(P: np.ndarray, Q: np.ndarray, proper: bool = True) -> tuple[np.ndarray, float]:
    """Numpy Kabsch for one small molecule (no torch call overhead in per-molecule loops).

    Args:
        P, Q: ``(n, 3)`` corresponding points; both are centred here.
        proper: fix the SVD sign so ``R`` is a rotation (``False`` allows a reflection).

    Returns:
        ``(R, rmsd)`` with ``R @ (P_a - cP) ~= Q_a - cQ`` and the RMSD of that fit.
    """
    Pc, Qc = P - P.mean(0), Q - Q.mean(0)
    U, _, Vt = np.linalg.svd(Qc.T @ Pc)
    d = (np.sign(np.linalg.det(U @ Vt)) or 1.0) if proper else 1.0
    R = (U * np.array([1.0, 1.0, d])) @ Vt
    return R, float(np.sqrt(np.mean(np.sum((Pc @ R.T - Qc) ** 2, axis=1))))
