"""Rigid-body frames of molecules: centroids, relative rotations, inertial (body) frames.

All functions are torch, batched over leading dimensions, and take positions ``(..., n, 3)`` of the atoms
of one molecule (e.g. ``(B, 17, n, 3)`` for a batch of clusters).

Conventions:
- centroid = *unweighted* mean of the atoms (what the PM-centre metric uses);
- the relative rotation between two poses of a rigid molecule is found by Kabsch on corresponding atoms,
  which is exact for rigid data and needs no frame heuristics;
- the inertial frame is the canonical *body frame* for features and SE(3) updates. Its columns are the
  principal axes with ascending moments, right-handed, signs fixed by the third moment along each axis
  (an equivariant choice whenever that moment is non-zero). Near-degenerate moments are flagged.
"""
from __future__ import annotations

import numpy as np
import torch

from kflow_mol import so3

__all__ = ["body_coordinates", "centroid", "inertial_frame", "relative_rotation", "rigid_transform"]


def centroid(pos: torch.Tensor) -> torch.Tensor:
    """Unweighted mean of the atoms.

    Args:
        pos: ``(..., n, 3)``.

    Returns:
        ``(..., 3)``.
    """
    return pos.mean(-2)


def relative_rotation(pos_0: torch.Tensor, pos_1: torch.Tensor) -> torch.Tensor:
    """Rotation ``dR = R1 R0^T`` mapping the centred ``pos_0`` onto the centred ``pos_1`` (Kabsch).

    Args:
        pos_0: ``(..., n, 3)`` molecule(s) in the first pose.
        pos_1: ``(..., n, 3)`` same atoms in the second pose.

    Returns:
        ``(..., 3, 3)`` with ``(pos_0 - c0) @ dR^T ~= pos_1 - c1``.
    """
    return so3.kabsch(pos_0, pos_1)


def _fix_signs(axes: torch.Tensor, r: torch.Tensor, m: torch.Tensor, rel_tol: float) -> torch.Tensor:
    """Deterministic axis signs: third moment > 0, else the farthest atom along the axis is positive."""
    proj = r @ axes  # (..., n, 3) coordinates along the three axes
    third = (m.unsqueeze(-1) * proj**3).sum(-2)  # (..., 3)
    scale = (m.unsqueeze(-1) * proj.abs() ** 3).sum(-2).clamp_min(torch.finfo(r.dtype).tiny)
    reliable = third.abs() > rel_tol * scale
    # Fallback (centrosymmetric along this axis: every odd moment vanishes, no equivariant choice exists):
    # the first atom (by index) among those farthest from the plane through the centre.
    ab = proj.abs()
    amax = ab.amax(-2, keepdim=True)
    first = ((ab >= amax - 1e-6 * amax.clamp_min(1.0)).to(torch.int64)).argmax(-2, keepdim=True)
    fallback = torch.gather(proj, -2, first).squeeze(-2)
    s = torch.where(reliable, third, fallback)
    sign = torch.where(s < 0, -torch.ones_like(s), torch.ones_like(s))
    axes = axes * sign.unsqueeze(-2)
    # Right-handed: flip the axis whose sign was least reliable.
    det = torch.linalg.det(axes)
    confidence = torch.where(reliable, third.abs() / scale, torch.zeros_like(third))
    worst = confidence.argmin(-1)  # (...,)
    flip = torch.ones_like(third)
    flip = torch.where(
        (det < 0).unsqueeze(-1) & (torch.arange(3, device=r.device) == worst.unsqueeze(-1)), -flip, flip
    )
    return axes * flip.unsqueeze(-2)


def inertial_frame(
    pos: torch.Tensor,
    masses: torch.Tensor | None = None,
    degenerate_tol: float = 1e-3,
    sign_tol: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Principal-axis body frame of rigid molecules.

    Args:
        pos: ``(..., n, 3)`` atom positions.
        masses: optional ``(n,)`` or ``(..., n)`` weights; ``None`` = unit weights (geometric frame).
        degenerate_tol: two moments whose gap is below ``degenerate_tol * largest moment`` are flagged
            as degenerate (symmetric tops, spheres): their axes are then arbitrary within the eigenspace.
        sign_tol: relative third moment below which an axis sign falls back to the farthest-atom rule.

    Returns:
        ``R_body (..., 3, 3)`` whose columns are the principal axes (ascending moments, ``det = +1``),
        ``moments (..., 3)`` ascending principal moments of inertia, and ``is_degenerate (...,)`` bool.
        Body coordinates are ``(pos - c) @ R_body``.
    """
    m = torch.ones(pos.shape[:-1], dtype=pos.dtype, device=pos.device) if masses is None else masses
    m = torch.as_tensor(m, dtype=pos.dtype, device=pos.device).expand(pos.shape[:-1])
    c = (m.unsqueeze(-1) * pos).sum(-2, keepdim=True) / m.sum(-1, keepdim=True).unsqueeze(-1)
    r = pos - c
    # Inertia tensor I = sum m (|r|^2 Id - r r^T).
    rr = (m.unsqueeze(-1) * r).transpose(-1, -2) @ r
    eye = torch.eye(3, dtype=pos.dtype, device=pos.device)
    inertia = rr.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] * eye - rr
    moments, axes = torch.linalg.eigh(inertia)  # ascending
    gaps = moments[..., 1:] - moments[..., :-1]
    top = moments[..., -1:].abs().clamp_min(torch.finfo(pos.dtype).tiny)
    is_degenerate = (gaps < degenerate_tol * top).any(-1)
    axes = _fix_signs(axes, r, m, sign_tol)
    return axes, moments, is_degenerate


def body_coordinates(
    pos: torch.Tensor, masses: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates of the atoms in the molecule's inertial frame about its centroid.

    Args:
        pos: ``(..., n, 3)``.
        masses: optional weights for the frame (the origin is always the unweighted centroid).

    Returns:
        ``template (..., n, 3)`` and ``R_body (..., 3, 3)`` with
        ``pos == rigid_transform(template, R_body, centroid(pos))``.
    """
    R, _, _ = inertial_frame(pos, masses)
    template = (pos - centroid(pos).unsqueeze(-2)) @ R
    return template, R


def rigid_transform(template_body: torch.Tensor, R: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Place a body-frame template with orientation ``R`` and centroid ``c``.

    Args:
        template_body: ``(n, 3)`` or broadcastable ``(..., n, 3)`` body coordinates (centred).
        R: ``(..., 3, 3)`` orientations (body -> lab).
        c: ``(..., 3)`` centroids.

    Returns:
        ``(..., n, 3)`` lab positions ``template @ R^T + c``.
    """
    return template_body @ R.transpose(-1, -2) + c.unsqueeze(-2)


def frame_from_vectors(u, v):
    """Right-handed orthonormal frame (columns, numpy ``(3, 3)``) from two non-collinear vectors."""
    e1 = u / np.linalg.norm(u)
    w = v - (v @ e1) * e1
    e2 = w / np.linalg.norm(w)
    return np.stack([e1, e2, np.cross(e1, e2)], axis=1)
