"""The rigid spectral K-path: oracle sampling lands on the packed cluster, rigidity, equivariance."""
import pytest
import torch

from kflow.schedule import BandSchedule, make_grid
from kflow.solver import solve
from kflow.testing import random_rotation
from kflow_mol import so3
from kflow_mol.rigid import RigidKPath, closest_equivalent_rotation, soft_min_contact

torch.manual_seed(0)
M = 17


def synthetic(b=2, n=7, dtype=torch.float64):
    t = torch.randn(b, n, 3, dtype=dtype)
    t = t - t.mean(1, keepdim=True)
    c1 = torch.randn(b, M, 3, dtype=dtype) * 5
    c0 = c1 * 2 + torch.randn(b, M, 3, dtype=dtype) * 3
    R1 = torch.stack([torch.stack([random_rotation(dtype) for _ in range(M)]) for _ in range(b)])
    R0 = torch.stack([torch.stack([random_rotation(dtype) for _ in range(M)]) for _ in range(b)])
    return t, c0, R0, c1, R1


def atoms(t, c, R):
    return torch.einsum("bmij,bnj->bmni", R, t) + c[:, :, None]


@pytest.mark.parametrize("window,profile", [(1.0, "linear"), (0.3, "smoothstep"), (0.1, "cosine")])
@pytest.mark.parametrize("distance", ["centroid", "contact"])
def test_oracle_sampler_lands_on_packed_cluster(window, profile, distance):
    t, c0, R0, c1, R1 = synthetic()
    path = RigidKPath(BandSchedule(window, profile), distance=distance)
    transform = path.transform(c0, atoms(t, c0, R0))
    s0, s1 = path.start(c0), path.endpoint(c1, R1, R0)
    for grid in (make_grid(1), make_grid(9), make_grid(30, "band", path.schedule, transform.distinct_kappa())):
        sol = solve(path.core(transform), s0, lambda s, k: s1, grid, method="exact")
        c, R = path.rigid(sol.x_1, R0)
        assert torch.allclose(atoms(t, c, R), atoms(t, c1, R1), atol=1e-9)


def test_path_keeps_molecules_rigid_and_hits_endpoints():
    t, c0, R0, c1, R1 = synthetic()
    path = RigidKPath(BandSchedule(0.3, "smoothstep"))
    tr = path.transform(c0)
    ref = torch.cdist(t, t)
    for k in (0.0, 0.2, 0.55, 1.0):
        s = path.sample(tr, c0, R0, c1, R1, torch.full((2,), k, dtype=torch.float64))
        x = atoms(t, s.c_k, s.R_k)
        assert torch.allclose(torch.cdist(x, x), ref[:, None].expand_as(torch.cdist(x, x)), atol=1e-10)
        if k == 0.0:
            assert torch.allclose(x, atoms(t, c0, R0), atol=1e-12)
        if k == 1.0:
            assert torch.allclose(x, atoms(t, c1, R1), atol=1e-10)


def test_w1_is_linear_centroids_and_geodesic_rotations():
    t, c0, R0, c1, R1 = synthetic()
    path = RigidKPath(BandSchedule(1.0))
    s = path.sample(path.transform(c0), c0, R0, c1, R1, torch.full((2,), 0.3, dtype=torch.float64))
    assert torch.allclose(s.c_k, 0.7 * c0 + 0.3 * c1, atol=1e-12)
    geo = so3.exp(0.3 * so3.log(R1 @ R0.transpose(-1, -2))) @ R0
    assert torch.allclose(s.R_k, geo, atol=1e-10)


def test_path_equivariant_to_global_motion_and_molecule_permutation():
    t, c0, R0, c1, R1 = synthetic(b=1)
    path = RigidKPath(BandSchedule(0.25, "cosine"))
    k = torch.tensor([0.4], dtype=torch.float64)
    ref = atoms(t, *(lambda s: (s.c_k, s.R_k))(path.sample(path.transform(c0), c0, R0, c1, R1, k)))
    q = random_rotation()
    shift = torch.randn(3, dtype=torch.float64) * 4
    c0q, c1q, R0q, R1q = c0 @ q.T + shift, c1 @ q.T + shift, q @ R0, q @ R1
    s = path.sample(path.transform(c0q), c0q, R0q, c1q, R1q, k)
    assert torch.allclose(atoms(t, s.c_k, s.R_k), ref @ q.T + shift, atol=1e-9)
    perm = torch.randperm(M)
    s = path.sample(path.transform(c0[:, perm]), c0[:, perm], R0[:, perm], c1[:, perm], R1[:, perm], k)
    assert torch.allclose(atoms(t, s.c_k, s.R_k), ref[:, perm], atol=1e-9)


def test_closest_equivalent_rotation_picks_smallest_angle():
    t, c0, R0, c1, R1 = synthetic(b=1)
    c2 = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))  # C2 about x
    sym = torch.stack([torch.eye(3, dtype=torch.float64), c2])[None]
    best, idx = closest_equivalent_rotation(R1, R0, sym)
    ang = lambda a: so3.log(a @ R0.transpose(-1, -2)).norm(dim=-1)  # noqa: E731
    assert torch.all(ang(best) <= ang(R1) + 1e-12) and torch.all(ang(best) <= ang(R1 @ c2) + 1e-12)
    # a target that is exactly the C2 image of the current orientation costs no rotation
    best, idx = closest_equivalent_rotation(R0 @ c2, R0, sym)
    assert torch.allclose(best, R0, atol=1e-12) and torch.all(idx == 1)


def test_soft_min_contact_close_to_min_distance():
    t, c0, R0, *_ = synthetic(b=1)
    pos = atoms(t, c0, R0)
    d = soft_min_contact(pos, tau=0.05)
    flat = pos.reshape(1, -1, 3)
    full = torch.cdist(flat, flat).reshape(1, M, 7, M, 7).amin((2, 4))
    off = ~torch.eye(M, dtype=torch.bool)
    assert torch.allclose(d[0][off], full[0][off], atol=0.2)
    assert torch.all(d[0][off] <= full[0][off] + 1e-9)


def test_own_rotation_clock_is_geodesic_and_matches_w1_graph_path():
    """rotation="own" turns each molecule along its own geodesic on the clock; with the (0, 1) window and
    w = 1 it is the same path as graph mixing (M_k = k I), and the window shifts when molecules turn."""
    t, c0, R0, c1, R1 = synthetic()
    k = torch.tensor([0.3, 0.8], dtype=torch.float64)
    own = RigidKPath(BandSchedule(1.0), rotation="own")
    graph = RigidKPath(BandSchedule(1.0))
    a = own.sample(own.transform(c0), c0, R0, c1, R1, k)
    b = graph.sample(graph.transform(c0), c0, R0, c1, R1, k)
    assert torch.allclose(a.s_k, b.s_k, atol=1e-12) and torch.allclose(a.ds_k, b.ds_k, atol=1e-12)
    late = RigidKPath(BandSchedule(0.3, "smoothstep"), rotation="own", rot_window=(0.5, 1.0))
    s = late.sample(late.transform(c0), c0, R0, c1, R1, k)
    omega = so3.log(R1 @ R0.transpose(-1, -2))
    # k = 0.3: not turned yet; k = 0.8: 60 % of the way along the geodesic
    assert torch.allclose(s.R_k[0], R0[0], atol=1e-12)
    assert torch.allclose(s.R_k[1], so3.exp(0.6 * omega[1]) @ R0[1], atol=1e-10)
    assert torch.allclose(s.ds_k[1, :, 3:], omega[1] / 0.5, atol=1e-10)


def test_kappa_scale_max_fills_unit_interval():
    _, c0, *_ = synthetic()
    half = RigidKPath(BandSchedule(0.3)).transform(c0).kappa
    full = RigidKPath(BandSchedule(0.3), kappa_scale="max").transform(c0).kappa
    assert torch.allclose(full.amax(1), torch.ones(2, 1, dtype=torch.float64))
    assert half.amax() < 0.75  # dense Gaussian graphs: lambda_max far below 2
    assert torch.allclose(full * half.amax(1, keepdim=True), half, atol=1e-12)


def test_estimated_rotation_step_is_geodesic_from_current_state():
    t, c0, R0, c1, R1 = synthetic()
    path = RigidKPath(BandSchedule(1.0), rotation="own", rot_source="estimate")
    tr = path.transform(c0)
    Rk = torch.stack([torch.stack([random_rotation(torch.float64) for _ in range(M)]) for _ in range(2)])
    s = torch.cat([c0, so3.log(Rk @ R0.transpose(-1, -2))], -1)
    k, kn = torch.full((2,), 0.5, dtype=torch.float64), torch.full((2,), 0.75, dtype=torch.float64)
    nxt = path.step(tr, s, path.endpoint(c1, R1, R0), c0, R0, k, kn)
    _, R = path.rigid(nxt, R0)
    # half of the remaining way (0.25 / 0.5) along the geodesic from R_k to R1
    want = so3.exp(0.5 * so3.log(R1 @ Rk.transpose(-1, -2))) @ Rk
    assert torch.allclose(R, want, atol=1e-8)
