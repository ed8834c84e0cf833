"""Physics refinement: real UFF parameters, rigid bodies, energy goes down, overlaps are pushed apart."""
import numpy as np

from kflow_mol.so3 import random_rotation_np
from kflow_mol.refine import RefineConfig, refine_cluster, uff_vdw


def _benzene():
    ang = np.arange(6) * np.pi / 3
    ring = np.stack([np.cos(ang), np.sin(ang), np.zeros(6)], 1)
    pos = np.concatenate([1.39 * ring, 2.47 * ring])
    return np.array([6] * 6 + [1] * 6), pos - pos.mean(0)


def test_uff_parameters_are_rdkits():
    x, d = uff_vdw(np.array([6, 1]))
    # UFF (Rappé et al. 1992): C x = 3.851 Å, D = 0.105 kcal/mol; H x = 2.886, D = 0.044; geometric mixing
    assert np.allclose([x[0, 0], d[0, 0], x[1, 1], d[1, 1]], [3.851, 0.105, 2.886, 0.044], atol=1e-3)
    assert np.isclose(x[0, 1], np.sqrt(3.851 * 2.886), atol=1e-3)


def test_refinement_separates_overlapping_rigid_molecules():
    species, t = _benzene()
    rng = np.random.default_rng(0)
    # a row of three benzenes far too close (1.2 Å apart along z): atoms overlap
    c = np.array([[0.0, 0.0, 0.0], [0.3, 0.0, 1.2], [0.0, 0.3, 2.4]])
    R = np.stack([random_rotation_np(rng) @ np.diag([1, 1, 1]) if i else np.eye(3) for i in range(3)])
    pos0 = np.einsum("mij,nj->mni", R, t) + c[:, None]
    res = refine_cluster(species, t, c, R, RefineConfig(steps=100, restraint=0.1))
    pos1 = np.einsum("mij,nj->mni", res.R, t) + res.c[:, None]

    def closest(p):
        return min(np.linalg.norm(p[i][:, None] - p[j][None], axis=-1).min() for i in range(3) for j in range(i))

    assert res.energy_after < res.energy_before
    assert closest(pos1) > closest(pos0) + 0.5
    # rigid: every molecule is still the template moved by a proper rotation
    for i in range(3):
        assert np.allclose(res.R[i] @ res.R[i].T, np.eye(3), atol=1e-9) and np.isclose(np.linalg.det(res.R[i]), 1)
        d = np.linalg.norm(pos1[i][:, None] - pos1[i][None], axis=-1)
        assert np.allclose(d, np.linalg.norm(t[:, None] - t[None], axis=-1), atol=1e-9)
