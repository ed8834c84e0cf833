"""The lattice behind a cluster's centroids, and the orientation search on it (kflow_mol.lattice)."""
import numpy as np
import torch

from kflow_mol.lattice import SearchConfig, fit_lattice, search_orientation
from kflow_mol.refine import pair_energy
from kflow_mol.so3 import random_rotation_np


def _lattice_points(B, o, reach=1):
    r = np.arange(-reach, reach + 1)
    n = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    n = n[np.argsort(np.linalg.norm(n @ B, axis=1), kind="stable")][:17]
    return o + n @ B, n


def test_pair_energy_focus_is_the_pairs_of_that_molecule():
    g = torch.Generator().manual_seed(0)
    pos = 3 * torch.randn(2, 5, 4, 3, generator=g, dtype=torch.float64)
    x = 2 + torch.rand(4, 4, generator=g, dtype=torch.float64)
    d = torch.rand(4, 4, generator=g, dtype=torch.float64)
    x, d = (x + x.T) / 2, (d + d.T) / 2
    for i in range(5):
        rest = pair_energy(pos[:, [j for j in range(5) if j != i]], x, d, 8.0)
        assert torch.allclose(pair_energy(pos, x, d, 8.0, focus=i), pair_energy(pos, x, d, 8.0) - rest)


def test_fit_recovers_a_lattice_and_averages_noise():
    rng = np.random.default_rng(0)
    B = np.array([[5.1, 0.0, 0.0], [1.3, 6.2, 0.0], [-0.8, 1.1, 7.4]]) @ random_rotation_np(rng).T
    c, _ = _lattice_points(B, np.array([1.0, -2.0, 3.0]))
    fit = fit_lattice(c[rng.permutation(17)])
    assert fit.residual < 1e-9
    assert np.isclose(abs(np.linalg.det(fit.basis)), abs(np.linalg.det(B)))  # a basis, not a sublattice
    noisy = c + 0.25 * rng.standard_normal(c.shape)
    fit = fit_lattice(noisy)
    err = lambda p: np.sqrt(((p - c) ** 2).sum(1).mean())
    assert err(fit.points) < 0.8 * err(noisy)  # 17 points, 12 parameters: the fit is closer than the input


def test_search_puts_a_real_crystal_back_from_its_centroids():
    """COD 2007300 (embedded cod17-mini): one shape on one lattice. From the true centroids alone, the search
    turns every copy to within 10 degrees of an equivalent of its true orientation."""
    from kflow_mol.cif import cluster_from_cif
    from kflow_mol.dataset import mini_dir, prepare
    from kflow_mol.evaluate import _score

    c = prepare(cluster_from_cif(mini_dir() / "cifs" / "2007300.cif"))
    assert len(c.templates) == 1 and fit_lattice(c.c1).residual < 1e-6
    res = search_orientation(c.species, c.templates[0], c.c1, SearchConfig(candidates=1024, keep=5))
    assert np.allclose(res.G @ res.G.T, np.eye(3), atol=1e-9) and np.isclose(np.linalg.det(res.G), 1)
    score = _score(res.positions(c.templates[0]), c)
    assert score["rot_within_10deg"] == 1.0 and score["pm_atom_symmetry_aware"] < 0.5
    # two sublattices (every copy shifted off half of the points) are not one lattice: no search
    off = c.c1 + np.where(np.arange(17)[:, None] % 2 == 0, 0.0, 1.0) * np.array([1.9, -1.4, 1.1])
    assert fit_lattice(off).residual > SearchConfig().max_residual
    assert search_orientation(c.species, c.templates[0], off) is None
