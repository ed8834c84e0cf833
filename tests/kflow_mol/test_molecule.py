"""The one chemistry perception: bond rule, components, species-constrained assignment."""
import numpy as np
import pytest
import torch

from kflow_mol import so3
from kflow_mol.molecule import BOND_TOLERANCE, assign, bond_cutoff, bond_graph, components, covalent_radii

# water: O at the origin, two H at 0.96 A
WATER_Z = np.array([8, 1, 1])
WATER_X = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])


def test_bond_rule_is_radii_sum_plus_tolerance():
    assert BOND_TOLERANCE == 0.4
    r = covalent_radii([6, 6])
    assert bond_cutoff(6, 6) == pytest.approx(r.sum() + 0.4)
    x = np.array([[0.0, 0, 0], [bond_cutoff(6, 6) - 1e-6, 0, 0], [2 * bond_cutoff(6, 6) + 0.1, 0, 0]])
    adj = bond_graph([6, 6, 6], x)
    assert adj[0, 1] and adj[1, 0] and not adj[1, 2] and not adj.diagonal().any()
    with pytest.raises(ValueError):
        covalent_radii([0])


def test_components_split_two_waters():
    z = np.concatenate([WATER_Z, WATER_Z])
    x = np.concatenate([WATER_X, WATER_X + [5.0, 0, 0]])
    n, labels = components(z, x)
    assert n == 2 and labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_assign_recovers_a_permutation_within_species():
    rng = np.random.default_rng(0)
    z = np.array([6, 6, 6, 1, 1, 1, 8])
    a = rng.normal(size=(7, 3)) * 2
    perm = np.array([2, 0, 1, 5, 3, 4, 6])
    b = np.empty_like(a)
    b[perm] = a  # b[perm[i]] = a[i]
    got = assign(a + 0.01 * rng.normal(size=a.shape), b, z, z[np.argsort(perm)])
    assert got.tolist() == perm.tolist()


def test_closest_prefers_lowest_index_and_respects_mask():
    R = so3.random_rotation(4, torch.Generator().manual_seed(0))
    cand = torch.stack([R, R, R @ so3.exp(torch.tensor([0.0, 0.0, 3.0], dtype=R.dtype))], 1)  # (4, 3, 3, 3)
    assert so3.closest(cand, R).tolist() == [0, 0, 0, 0]  # exact tie: the first
    mask = torch.tensor([False, True, True]).expand(4, 3)
    assert so3.closest(cand, R, mask).tolist() == [1, 1, 1, 1]
