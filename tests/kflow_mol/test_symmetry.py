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
