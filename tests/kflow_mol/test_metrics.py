"""Assembly metrics: the published ones (hand-computed cases) and ours (invariances, oracles)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kflow_mol import metrics as M
from kflow_mol import so3
from kflow_mol.noise import LooseConfig, make_loose
from kflow_mol.symmetry import automorphisms

sys.path.insert(0, str(Path(__file__).parent))
from test_symmetry import molecule


def _rot(seed: int) -> np.ndarray:
    return so3.random_rotation((), torch.Generator().manual_seed(seed)).numpy()


def toy_cluster(smiles: str = "c1ccc2ccccc2c1", M_: int = 17, spacing: float = 10.0, seed: int = 0):
    """A crystal-like cluster: M copies of a molecule on a jittered grid with random orientations."""
    z, x = molecule(smiles)
    x = x - x.mean(0)
    rng = np.random.default_rng(seed)
    grid = np.array([[i, j, k] for i in range(-1, 2) for j in range(-1, 2) for k in range(-1, 2)], float)
    grid = grid[np.argsort(np.linalg.norm(grid, axis=1), kind="stable")][:M_] * spacing
    rots = [_rot(seed * 100 + i) for i in range(M_)]
    pos = np.stack([x @ R.T + c for R, c in zip(rots, grid + rng.normal(0, 0.3, grid.shape))])
    return z, pos


# ---------------------------------------------------------------- published, hand-computed


def test_pm_hand_computed_two_molecules_of_two_atoms():
    true = np.array([[[0.0, 0, 0], [1, 0, 0]], [[0, 3, 0], [1, 3, 0]]])
    pred = true.copy()
    pred[1] += np.array([0.0, 1.0, 0.0])  # second molecule moved 1 Å further away
    # distance changes: atom pairs across molecules (0,2),(0,3),(1,2),(1,3) and symmetric counterparts
    d_true = np.array([3.0, math.sqrt(10), math.sqrt(10), 3.0])
    d_pred = np.array([4.0, math.sqrt(17), math.sqrt(17), 4.0])
    expected = math.sqrt(2 * np.sum((d_true - d_pred) ** 2) / 16)  # N^2 = 16 entries, diagonal included
    assert M.pm_atom(pred, true) == pytest.approx(expected, rel=1e-12)
    # centroids (0.5, 0) and (0.5, 3) -> 4: one pair, 4 entries
    assert M.pm_center(pred, true) == pytest.approx(math.sqrt(2 * 1.0 / 4), rel=1e-12)
    assert M.pm_atom(true, true) == 0.0 and M.pm_center(true, true) == 0.0


def test_collision_and_separation_published_definitions():
    # two H2-like molecules of two H atoms (r = 0.31 -> bond distance 0.62)
    species = np.array([1, 1])
    pred = np.array([[[0.0, 0, 0], [0.5, 0, 0]], [[0.0, 0.4, 0], [0.5, 5, 0]]])
    # colliding ordered pairs: 4 diagonal + (0,1),(1,0) intra 0.5 + (2,0),(0,2) inter 0.4 = 8 of 16
    assert M.collision_rate(pred, species) == pytest.approx(100 * 8 / 16)
    # inter-molecular only: (0,2),(2,0) of 8 ordered inter pairs
    assert M.collision_inter(pred, species) == pytest.approx(100 * 2 / 8)
    # one molecule pair, closest atoms 0.4 Å apart -> not separated
    assert M.separation_rate(pred) == 0.0
    pred[1] += 10.0
    assert M.separation_rate(pred) == 100.0
    assert M.collision_inter(pred, species) == 0.0


def test_collision_does_not_crash_on_elements_missing_from_their_table():
    species = np.array([6, 3])  # Li is not in AssembleFlow's table: falls back to ASE radii
    pred = np.random.default_rng(0).normal(size=(17, 2, 3)) * 5
    assert 0 < M.collision_rate(pred, species) <= 100


def test_pm_invariant_to_global_rigid_motion():
    _, true = toy_cluster()
    pred = make_loose(true, np.random.default_rng(0))
    R, t = _rot(7), np.array([3.0, -2.0, 10.0])
    moved = pred @ R.T + t
    for fn in (M.pm_atom, M.pm_center):
        assert fn(moved, true) == pytest.approx(fn(pred, true), rel=1e-9)
    assert M.cluster_rmsd(moved, true) == pytest.approx(M.cluster_rmsd(pred, true), rel=1e-9)
    assert M.cluster_rmsd(true @ R.T + t, true) < 1e-9


def test_summarize_valid_ratio_and_repeats():
    rows = [{"pm_atom": 5.0, "pm_center": 4.0, "collision": 1.0},
            {"pm_atom": float("nan"), "pm_center": 150.0, "collision": 3.0},
            {"pm_atom": 7.0, "pm_center": 2.0, "collision": 2.0}]
    s = M.summarize(rows)
    assert s["pm_atom"] == pytest.approx(6.0) and s["pm_atom_valid_ratio"] == pytest.approx(2 / 3)
    assert s["pm_center"] == pytest.approx(3.0) and s["pm_center_valid_ratio"] == pytest.approx(2 / 3)
    assert s["pm_center_all"] == pytest.approx(52.0)
    assert s["collision"] == pytest.approx(2.0) and s["n_clusters"] == 3
    # several samples of one cluster: min per cluster (AssembleFlow's protocol)
    rep = [dict(r, id="a") for r in rows[:1]] + [dict(rows[2], id="a"), dict(rows[2], id="b")]
    s = M.summarize(rep)
    assert s["n_clusters"] == 2 and s["pm_atom"] == pytest.approx(6.0)


# ------------------------------------------------------------------------------------- ours


def test_perm_invariant_pm_is_zero_for_molecule_permuted_copy():
    _, true = toy_cluster()
    shuffle = np.random.default_rng(1).permutation(len(true))
    pred = true[shuffle] @ _rot(3).T + 1.0
    assert M.pm_atom(pred, true) > 1.0
    val, sigma = M.pm_atom_perm_invariant(pred, true)
    assert val < 1e-9
    np.testing.assert_array_equal(shuffle[sigma], np.arange(len(true)))


def test_metric_ordering_and_identity():
    z, true = toy_cluster()
    perms, _ = automorphisms(z, true[0])
    r = M.evaluate_cluster(true, true, z, perms)
    for k in ("pm_atom", "pm_center", "pm_atom_perm_invariant", "pm_atom_symmetry_aware", "cluster_rmsd",
              "collision_inter"):
        assert r[k] == pytest.approx(0.0, abs=1e-9), k
    assert r["compack_matched"] == 15 and r["separation"] == 100.0
    pred = make_loose(true, np.random.default_rng(2), LooseConfig())
    r = M.evaluate_cluster(pred, true, z, perms)
    assert r["pm_atom_symmetry_aware"] <= r["pm_atom_perm_invariant"] + 1e-12
    assert r["pm_atom_perm_invariant"] <= r["pm_atom"] + 1e-12
    assert r["pm_atom"] > 5 and r["compack_matched"] < 5 and r["symmetry_order"] == 4


def test_symmetry_blind_oracle_has_zero_symmetry_aware_pm():
    z, true = toy_cluster()
    perms, _ = automorphisms(z, true[0])
    initial = make_loose(true, np.random.default_rng(3))
    fl = M.oracle_floors(initial, true, z, perms, expansion_mean=LooseConfig().expansion_mean)
    blind = fl["symmetry_blind_oracle"]
    assert blind["pm_atom_symmetry_aware"] < 1e-9
    assert blind["pm_center"] < 1e-9
    assert blind["pm_atom"] > 0.5  # the published metric cannot reach 0 for a symmetric molecule
    assert blind["compack_matched"] == 15
    # the oracles bracket the loose state
    assert fl["centroid_oracle"]["pm_center"] < 1e-9
    assert fl["do_nothing"]["pm_atom"] > fl["centroid_oracle"]["pm_atom"] > blind["pm_atom_symmetry_aware"]
    assert fl["orientation_oracle"]["pm_center"] == pytest.approx(fl["do_nothing"]["pm_center"])
    assert fl["undo_mean_expansion"]["pm_center"] > 1.0


def test_asymmetric_molecule_oracle_is_exact():
    z, true = toy_cluster("CCO", spacing=5.0)
    perms, _ = automorphisms(z, true[0])
    assert perms.shape[0] == 1
    fl = M.oracle_floors(make_loose(true, np.random.default_rng(4)), true, z, perms)
    assert fl["symmetry_blind_oracle"]["pm_atom"] < 1e-9


def test_compack_counts_consistent_subset():
    _, true = toy_cluster()
    pred = true.copy()
    # rotate 3 shell molecules in place by 90 degrees: they break orientation consistency
    ct = true.mean(1)
    shell = np.argsort(np.linalg.norm(ct - ct[0], axis=1), kind="stable")[:15]
    for i in shell[[3, 7, 11]]:
        pred[i] = (true[i] - ct[i]) @ so3.exp(torch.tensor([0.0, 0.0, math.pi / 2])).numpy().T + ct[i]
    assert M.compack_matched(pred, true) == 12


def test_real_cluster_oracles(shared_dir):
    cif = pytest.importorskip("kflow_mol.cif")
    path = shared_dir / "data" / "crystals" / "pyxtal_testdb" / "BENZEN.cif"
    if not path.exists():
        pytest.skip("BENZEN.cif not in shared data")
    rec = cif.cluster_from_cif(path)
    perms, _ = automorphisms(rec.species, rec.final[0])
    initial = make_loose(rec.final, np.random.default_rng(0))
    fl = M.oracle_floors(initial, rec.final, rec.species, perms)
    assert fl["symmetry_blind_oracle"]["pm_atom_symmetry_aware"] < 1e-9
    assert fl["symmetry_blind_oracle"]["pm_atom"] > 0.5
    assert fl["do_nothing"]["pm_atom"] > 8.0


def test_non_finite_prediction_is_invalid_not_a_crash():
    z, true = toy_cluster("O", spacing=4.0)
    pred = true.copy()
    pred[3, 1] = np.nan
    r = M.evaluate_cluster(pred, true, z)
    assert not np.isfinite(r["pm_atom"]) and r["compack_matched"] == 0
    far = true * 1e3
    r2 = M.evaluate_cluster(far, true, z)
    s = M.summarize([r, r2, M.evaluate_cluster(true, true, z)])
    assert s["pm_atom_valid_ratio"] == pytest.approx(1 / 3) and s["pm_atom"] == pytest.approx(0.0, abs=1e-9)


def test_intermolecular_clashes_hand_built():
    """C-H molecules: one C...C pair at 2.0 A (< 0.75 * 3.4) clashes; a far third molecule does not."""
    x = np.array([[[0.0, 0, 0], [1.09, 0, 0]],
                  [[0.0, 2.0, 0], [1.09, 2.0, 0]],
                  [[0.0, 0, 10.0], [1.09, 0, 10.0]]])
    r = M.intermolecular_clashes(x, [6, 1])
    assert r["clashes"] == 1 and r["clashing_molecules"] == 2
    assert r["min_contact"] == pytest.approx(2.0) and r["min_contact_atoms"] == "C...C"
    assert r["min_vdw_ratio"] == pytest.approx(2.0 / 3.4) and r["clash_fraction"] == 0.75
    assert M.intermolecular_clashes(x, [6, 1], fraction=0.5)["clashes"] == 0
    # apart, nothing clashes
    x[1] += [0, 3.0, 0]
    assert M.intermolecular_clashes(x, [6, 1])["clashes"] == 0


def test_hydrogen_bond_is_not_a_clash_but_a_collapsed_one_is():
    """O-H...O at H...O = 1.8 A (0.66 of the vdW sum, a normal hydrogen bond) is fine; at 1.4 A it clashes."""
    def pair(h_o):
        return np.array([[[0.0, 0, 0], [0.96, 0, 0]], [[0.96 + h_o, 0, 0], [1.92 + h_o, 0, 0]]])

    ok = M.intermolecular_clashes(pair(1.8), [8, 1])
    assert ok["clashes"] == 0 and ok["min_contact"] == pytest.approx(1.8) and ok["min_contact_atoms"] == "H...O"
    assert M.intermolecular_clashes(pair(1.4), [8, 1])["clashes"] == 1
    # the same distance between two carbons (no specific interaction) is a clash
    assert M.intermolecular_clashes(pair(1.8), [6, 6])["clashes"] >= 1


@pytest.mark.parametrize("name", ["ice", "resorcinol", "2000583"])
def test_real_crystals_with_hydrogen_and_halogen_bonds_have_no_clashes(name):
    from kflow_mol.cif import cluster_from_cif
    from kflow_mol.dataset import mini_dir

    rec = cluster_from_cif(mini_dir() / "cifs" / f"{name}.cif")
    r = M.intermolecular_clashes(rec.final, rec.species)
    assert r["clashes"] == 0 and r["min_vdw_ratio"] < 0.75  # short, specific contacts are present


def test_clashes_of_non_finite_positions_are_nan_not_a_crash():
    x = np.zeros((3, 2, 3))
    x[1] += 5.0
    x[2] = np.nan
    r = M.intermolecular_clashes(x, [6, 1])
    assert math.isnan(r["min_contact"])


def test_verdict_and_warning_words():
    from kflow_mol.evaluate import clash_warning, verdict

    clash = {"clashes": 93, "clashing_molecules": 12, "molecules": 17, "min_contact": 0.29, "min_contact_atoms": "H...C",
             "clash_fraction": 0.75}
    floors = {"do_nothing": {"pm_center": 8.0, "pm_atom_symmetry_aware": 9.0},
              "centroid_oracle": {"pm_center": 0.0, "pm_atom_symmetry_aware": 2.0}}
    lines = verdict({"pm_center": 3.0, "pm_atom_symmetry_aware": 4.0}, floors, clash)
    assert lines[0].startswith("clashes: 93 atom pairs of different molecules closer than 0.75 x")
    assert "involving 12 of 17 molecules; shortest intermolecular contact 0.29 Å (H...C)" in lines[0]
    assert lines[1] == "centroids (PM-centre) 3.00 Å: better than the loose state (8.00 Å)"
    assert "better than the loose state (9.00 Å), no better than true centroids" in lines[2]
    assert clash_warning("x", clash).startswith("WARNING: x: 93 intermolecular clashes")
    assert clash_warning("x", {**clash, "clashes": 0}) is None
    assert verdict({}, {}, {**clash, "clashes": 0})[0].startswith("clashes: no atom pairs")


def test_rotation_errors_are_angles_to_the_closest_equivalent():
    """A molecule turned by 30° reads 30°; a symmetric molecule turned onto its own image reads 0°."""
    rotation_errors = M.rotation_errors
    # planar D2h-like rectangle of 4 atoms + an asymmetric 4-atom molecule, two copies each
    rect = np.array([[1.5, 0.7, 0], [-1.5, 0.7, 0], [-1.5, -0.7, 0], [1.5, -0.7, 0]])
    swap = np.array([2, 3, 0, 1])  # the 180° turn about z maps atom a onto swap[a]
    perms = np.stack([np.arange(4), swap])
    true = np.stack([rect, rect + 10.0])
    rz = lambda deg: so3.exp(torch.tensor([0.0, 0.0, np.radians(deg)])).numpy()  # noqa: E731
    pred = np.stack([rect @ rz(30).T, (rect @ rz(180).T) + 10.0])
    err = rotation_errors(pred, true, perms)
    assert np.allclose(err, [30.0, 0.0], atol=1e-6)
    # without the automorphism the half turn is 180°
    assert np.isclose(rotation_errors(pred, true, perms[:1])[1], 180.0, atol=1e-6)
