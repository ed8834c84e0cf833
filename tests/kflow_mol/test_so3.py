"""SO(3) maps, Kabsch and the rigid frames of molecules."""
from __future__ import annotations

import math

import pytest
import torch

from kflow_mol import frames, so3


def _rotvecs(angles: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    axis = torch.randn(len(angles), 3, generator=gen, dtype=torch.float64)
    return axis / axis.norm(dim=-1, keepdim=True) * angles[:, None]


def test_exp_is_rotation_and_matches_rodrigues():
    gen = torch.Generator().manual_seed(0)
    w = _rotvecs(torch.rand(50, generator=gen, dtype=torch.float64) * math.pi, gen)
    R = so3.exp(w)
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(R @ R.transpose(-1, -2), eye.expand_as(R), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(50, dtype=torch.float64))
    # Rodrigues' formula, independently.
    th = w.norm(dim=-1)[:, None, None]
    K = so3.hat(w / w.norm(dim=-1, keepdim=True))
    ref = eye + torch.sin(th) * K + (1 - torch.cos(th)) * K @ K
    torch.testing.assert_close(R, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_exp_log_round_trip_including_near_zero_and_pi(dtype, tol):
    gen = torch.Generator().manual_seed(1)
    angles = torch.cat(
        [
            torch.tensor([0.0, 1e-12, 1e-8, 1e-5, 1e-3]),
            torch.rand(40, generator=gen, dtype=torch.float64) * math.pi,
            math.pi - torch.tensor([1e-3, 1e-5, 1e-7]),
        ]
    ).to(torch.float64)
    w = _rotvecs(angles, gen).to(dtype)
    back = so3.log(so3.exp(w))
    assert back.dtype == dtype
    assert (back.norm(dim=-1) <= math.pi + 1e-6).all()
    # Compare as rotations (near pi, w and -w differ but are the same rotation) and as vectors away from pi.
    torch.testing.assert_close(so3.exp(back), so3.exp(w), atol=tol, rtol=0)
    away = angles < math.pi - 1e-2
    torch.testing.assert_close(back[away], w[away], atol=tol, rtol=0)


def test_log_is_shortest_arc_and_exactly_pi_works():
    w = torch.tensor([[0.0, 0.0, 1.5 * math.pi], [math.pi, 0.0, 0.0]], dtype=torch.float64)
    out = so3.log(so3.exp(w))
    torch.testing.assert_close(out[0], torch.tensor([0.0, 0.0, -0.5 * math.pi], dtype=torch.float64))
    torch.testing.assert_close(out[1].abs(), torch.tensor([math.pi, 0.0, 0.0], dtype=torch.float64))


def test_batched_shapes():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(4, 5, 3, generator=gen)
    assert so3.exp(w).shape == (4, 5, 3, 3)
    assert so3.log(so3.exp(w)).shape == (4, 5, 3)
    assert so3.random_rotation((2, 3), gen).shape == (2, 3, 3, 3)


def test_kabsch_recovers_rotation_and_never_reflects():
    gen = torch.Generator().manual_seed(3)
    P = torch.randn(8, 12, 3, generator=gen, dtype=torch.float64)
    R_true = so3.random_rotation(8, gen)
    t = torch.randn(8, 1, 3, generator=gen, dtype=torch.float64)
    Q = P @ R_true.transpose(-1, -2) + t
    R = so3.kabsch(P, Q)
    torch.testing.assert_close(R, R_true, atol=1e-10, rtol=0)
    # Weighted version recovers it too.
    Rw = so3.kabsch(P, Q, weights=torch.rand(8, 12, generator=gen, dtype=torch.float64) + 0.1)
    torch.testing.assert_close(Rw, R_true, atol=1e-10, rtol=0)
    # A mirror image: the best *proper* rotation is returned, det = +1.
    mirror = Q * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    Rm = so3.kabsch(P, mirror)
    torch.testing.assert_close(torch.linalg.det(Rm), torch.ones(8, dtype=torch.float64))


def test_random_rotation_is_uniform_in_distribution():
    gen = torch.Generator().manual_seed(4)
    R = so3.random_rotation(20000, gen)
    # Haar measure: E[R] = 0, and the angle has density (1 - cos t) / pi, so E[cos t] = -1/2.
    assert R.mean(0).abs().max() < 0.03
    cos_t = (R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    assert abs(cos_t.mean().item() + 0.5) < 0.02
    torch.testing.assert_close(so3.random_rotation(3, torch.Generator().manual_seed(9)),
                               so3.random_rotation(3, torch.Generator().manual_seed(9)))


def test_geodesic_distance():
    w = torch.tensor([[0.0, 0.0, 0.3], [1e-9, 0, 0], [0, 2.9, 0]], dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(so3.geodesic_distance(eye, so3.exp(w)), w.norm(dim=-1), atol=1e-9, rtol=0)


def test_relative_rotation_and_centroid():
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(17, 9, 3, generator=gen, dtype=torch.float64)
    dR = so3.random_rotation(17, gen)
    x1 = (x0 - frames.centroid(x0)[:, None]) @ dR.transpose(-1, -2) + torch.randn(17, 1, 3, generator=gen,
                                                                                  dtype=torch.float64)
    torch.testing.assert_close(frames.relative_rotation(x0, x1), dR, atol=1e-10, rtol=0)
    assert frames.centroid(x0).shape == (17, 3)


def test_inertial_frame_is_equivariant_and_right_handed():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 10, 3, generator=gen, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0],
                                                                                 dtype=torch.float64)
    Rb, mom, deg = frames.inertial_frame(x)
    torch.testing.assert_close(torch.linalg.det(Rb), torch.ones(5, dtype=torch.float64))
    assert (mom[:, 1:] >= mom[:, :-1]).all() and not deg.any()
    # Rotating and translating the molecule rotates the frame (generic molecule: signs are equivariant).
    Q = so3.random_rotation(5, gen)
    y = x @ Q.transpose(-1, -2) + 4.0
    Rb2, mom2, _ = frames.inertial_frame(y)
    torch.testing.assert_close(Rb2, Q @ Rb, atol=1e-8, rtol=0)
    torch.testing.assert_close(mom2, mom, atol=1e-8, rtol=1e-8)
    # body coordinates are invariant, and rigid_transform puts the molecule back.
    tpl, R = frames.body_coordinates(x)
    tpl2, _ = frames.body_coordinates(y)
    torch.testing.assert_close(tpl, tpl2, atol=1e-8, rtol=0)
    torch.testing.assert_close(frames.rigid_transform(tpl, R, frames.centroid(x)), x, atol=1e-10, rtol=0)


def test_inertial_frame_flags_degenerate_tops():
    # A square (symmetric top) has two equal moments.
    sq = torch.tensor([[1.0, 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0]], dtype=torch.float64)
    _, _, deg = frames.inertial_frame(sq)
    assert bool(deg)
    # Centrosymmetric but asymmetric top: deterministic frame, still right-handed.
    rect = torch.tensor([[2.0, 1, 0], [-2, -1, 0], [2, -1, 0], [-2, 1, 0]], dtype=torch.float64)
    Rb, _, deg = frames.inertial_frame(rect)
    assert not bool(deg)
    assert torch.linalg.det(Rb).item() == pytest.approx(1.0)
    torch.testing.assert_close(frames.inertial_frame(rect)[0], Rb)
