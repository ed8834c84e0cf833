"""Point-group automorphisms of rigid molecules and the closest-equivalent relabelling."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from kflow_mol import so3
from kflow_mol.symmetry import automorphisms, closest_equivalent, graph_automorphism_count


@functools.cache
def molecule(smiles: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """3-D molecule from SMILES (ETKDG + MMFF: the optimised geometry keeps the molecular symmetry)."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    m = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(m, randomSeed=seed) == 0
    AllChem.MMFFOptimizeMolecule(m, maxIters=5000)
    z = np.array([a.GetAtomicNum() for a in m.GetAtoms()])
    return z, m.GetConformer().GetPositions()


CASES = {
    "naphthalene": ("c1ccc2ccccc2c1", 4),  # D2h -> proper D2
    "anthracene": ("c1ccc2cc3ccccc3cc2c1", 4),
    "water": ("O", 2),  # C2v -> C2
    "pyridine": ("c1ccncc1", 2),
    "benzene": ("c1ccccc1", 12),  # D6h -> D6
    "adamantane": ("C1C2CC3CC1CC(C2)C3", 12),  # Td -> T (a spherical top)
    "ethanol": ("CCO", 1),
    "toluene": ("Cc1ccccc1", 1),  # 3^k-style graph automorphisms, no geometric symmetry
}


@pytest.mark.parametrize("name", list(CASES))
def test_point_group_orders(name):
    smiles, order = CASES[name]
    z, x = molecule(smiles)
    perms, rots = automorphisms(z, x)
    assert perms.shape == (order, len(z)) and rots.shape == (order, 3, 3)
    assert perms.dtype == torch.long
    # identity first, all proper, each a real symmetry: R x_a = x_perm[a] (centred)
    assert torch.equal(perms[0], torch.arange(len(z)))
    torch.testing.assert_close(torch.linalg.det(rots), torch.ones(order, dtype=rots.dtype))
    xc = torch.from_numpy(x - x.mean(0))
    for p, R in zip(perms, rots):
        assert torch.equal(torch.as_tensor(z)[p], torch.as_tensor(z))  # species preserved
        assert (xc @ R.T - xc[p]).norm(dim=-1).max() < 0.1
    # closure: the composition of two symmetries is a symmetry
    keys = {tuple(p.tolist()) for p in perms}
    for p in perms:
        for q in perms:
            assert tuple(p[q].tolist()) in keys
    # every geometric symmetry is a graph automorphism
    assert graph_automorphism_count(z, x) >= order


def test_order_is_invariant_to_pose_and_atom_order():
    z, x = molecule("c1ccc2cc3ccccc3cc2c1")
    rng = np.random.default_rng(0)
    shuffle = rng.permutation(len(z))
    R = so3.random_rotation((), torch.Generator().manual_seed(0)).numpy()
    perms, _ = automorphisms(z[shuffle], x[shuffle] @ R.T + 5.0)
    assert perms.shape[0] == 4


def test_distorted_molecule_loses_symmetry_beyond_tol():
    z, x = molecule("O")
    x = x.copy()
    o, h = np.flatnonzero(z == 8)[0], np.flatnonzero(z == 1)[0]
    bond = x[h] - x[o]
    x[h] += 0.3 * bond / np.linalg.norm(bond)  # one O-H bond stretched by 0.3 Å: no C2 left
    assert automorphisms(z, x, tol=0.1)[0].shape[0] == 1
    # ...unless the tolerance allows it (the bond check would still see a different graph)
    assert automorphisms(z, x, tol=0.5, check_bonds=False)[0].shape[0] == 2


def test_closest_equivalent_picks_smallest_rotation_batched():
    z, x = molecule("c1ccc2ccccc2c1")
    perms, _ = automorphisms(z, x)
    gen = torch.Generator().manual_seed(1)
    xt = torch.from_numpy(x)
    B, M = 3, 5
    R_cur = so3.random_rotation((B, M), gen)
    R_tgt = so3.random_rotation((B, M), gen)
    cur = xt @ R_cur.transpose(-1, -2) + torch.randn(B, M, 1, 3, generator=gen, dtype=torch.float64)
    tgt = xt @ R_tgt.transpose(-1, -2) + torch.randn(B, M, 1, 3, generator=gen, dtype=torch.float64)
    out, idx = closest_equivalent(tgt, cur, perms)
    assert out.shape == tgt.shape and idx.shape == (B, M)
    eye = torch.eye(3, dtype=torch.float64)
    chosen = so3.geodesic_distance(so3.kabsch(cur, out), eye)
    for g in range(perms.shape[0]):
        other = so3.geodesic_distance(so3.kabsch(cur, tgt[..., perms[g], :]), eye)
        assert (chosen <= other + 1e-9).all()
    # relabelled targets are the same physical molecules (same sets of points)
    torch.testing.assert_close(torch.sort(out.norm(dim=-1), -1).values, torch.sort(tgt.norm(dim=-1), -1).values)
    # with D2 symmetry the closest equivalent is never farther than 2*pi/3
    assert (chosen <= 2 * np.pi / 3 + 1e-6).all()


def test_closest_equivalent_identity_when_already_close():
    z, x = molecule("c1ccc2ccccc2c1")
    perms, _ = automorphisms(z, x)
    xt = torch.from_numpy(x)[None]
    out, idx = closest_equivalent(xt, xt + 1.0, perms)
    assert idx.item() == 0
    torch.testing.assert_close(out, xt)


def test_real_crystal_molecules(shared_dir):
    """Molecules cut from real crystals: benzene keeps D6 (order 12); adamantane in ADAMAN01 (the ordered
    low-temperature phase) is D2d-distorted (C radii 1.37/1.53 Å instead of one CH2 shell): order 4."""
    cif = pytest.importorskip("kflow_mol.cif")
    files = sorted((shared_dir / "data" / "crystals" / "pyxtal_testdb").glob("*.cif"))
    names = {"BENZEN": 12, "ADAMAN01": 4}
    found = 0
    for f in files:
        if f.stem in names:
            rec = cif.cluster_from_cif(f)
            for m in (0, 5):
                perms, _ = automorphisms(rec.species, rec.final[m])
                assert perms.shape[0] == names[f.stem], f.stem
            found += 1
    if not found:
        pytest.skip("reference crystals not present")


def _symmetric_cluster(Q: np.ndarray, body: np.ndarray, seed: int = 0):
    """17 centroids mapped onto themselves by ``Q`` (8 random points, their images, one on the axis) and
    random orientations of one rigid ``body``: a cluster whose centroid set has ``Q`` but whose packing does not."""
    rng = np.random.default_rng(seed)
    half = rng.normal(scale=6.0, size=(8, 3))
    c1 = np.concatenate([np.zeros((1, 3)), half, half @ Q.T]) + np.array([1.0, -2.0, 0.5])
    R1 = so3.random_rotation_np(rng, 17)
    return c1, R1, np.repeat(body[None], 17, 0), np.zeros(17, dtype=np.int64)


def _atoms(c, R, body):
    return np.einsum("mab,mnb->mna", R, body) + c[:, None]


CHIRAL = np.array([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0], [0.0, 1.1, 0.0], [0.0, 0.0, 0.8], [-0.7, -0.4, 1.9]])
CHIRAL = CHIRAL - CHIRAL.mean(0)
FLAT = np.array([[0.0, 0.0, 0.0], [1.4, 0.0, 0.0], [2.1, 1.2, 0.0], [-0.6, 1.3, 0.0]])
FLAT = FLAT - FLAT.mean(0)


def test_equivalent_packings_are_the_cluster_moved_by_its_centroid_symmetries():
    """A C2 of the centroids gives a second packing: copy i's image sits on site pi(i) with Q R1_i; a mirror of
    the centroids gives one only for planar copies (their mirror image is a proper pose), and each equivalent
    packing scores 0 under the symmetry-aware PM and the matched rotation error, not under the labelled ones."""
    from kflow_mol.metrics import evaluate_cluster
    from kflow_mol.symmetry import centroid_symmetries, equivalent_packings

    C2 = np.diag([-1.0, -1.0, 1.0])
    c1, R1, body, shape = _symmetric_cluster(C2, CHIRAL)
    ops = centroid_symmetries(c1)
    assert len(ops) == 1 and np.allclose(ops[0][0], C2, atol=1e-6)
    c, R = equivalent_packings(c1, R1, body, shape)
    assert c.shape == (2, 17, 3) and np.allclose(c[0], c1) and np.allclose(R[0], R1)
    pi, o = ops[0][1], c1.mean(0)
    moved = _atoms(c1 - o, R1, body) @ C2.T + o  # the whole cluster turned by Q about its centre
    assert np.allclose(_atoms(c[1], R[1], body)[pi], moved, atol=1e-6)
    assert np.allclose(np.linalg.det(R[1]), 1.0)
    e = evaluate_cluster(_atoms(c[1], R[1], body), _atoms(c1, R1, body), np.array([6, 7, 8, 9, 16]), np.arange(5)[None])
    assert e["pm_atom_symmetry_aware"] < 1e-6 and e["rot_median_deg_symmetry_aware"] < 1e-3
    assert e["pm_atom"] > 1.0 and e["rot_median_deg"] > 10.0

    mirror = np.diag([1.0, 1.0, -1.0])
    c1, R1, body, shape = _symmetric_cluster(mirror, CHIRAL, seed=1)
    assert len(equivalent_packings(c1, R1, body, shape)[0]) == 1  # a chiral copy has no proper mirror pose
    c1, R1, body, shape = _symmetric_cluster(mirror, FLAT, seed=1)
    c, R = equivalent_packings(c1, R1, body, shape)
    assert len(c) == 2 and np.allclose(np.linalg.det(R[1]), 1.0)
    pi, o = centroid_symmetries(c1)[0][1], c1.mean(0)
    assert np.allclose(_atoms(c[1], R[1], body)[pi], _atoms(c1 - o, R1, body) @ mirror.T + o, atol=1e-6)
    # copies of different shapes may not trade sites
    shape2 = shape.copy()
    shape2[1] = 1
    assert len(equivalent_packings(c1, R1, body, shape2)[0]) == 1
