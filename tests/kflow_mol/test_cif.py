"""CIF -> 17-molecule cluster builder: acceptance geometry, determinism, every rejection reason, batch build."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kflow_mol.build import build_dataset
from kflow_mol.cif import ORGANIC_ELEMENTS, cluster_from_cif, match_rigid
from kflow_mol.data import REASONS, BuildError, ClusterRecord
from kflow_mol.io import list_raw_ids, read_raw_pair

DATA = Path(__file__).parent / "data"


def _proper_fit(a: np.ndarray, b: np.ndarray):
    """(rmsd, det) of the best rigid fit of a onto b, the rotation allowed to be improper (to expose mirrors)."""
    A, B = a - a.mean(0), b - b.mean(0)
    U, _, Vt = np.linalg.svd(A.T @ B)
    R = Vt.T @ U.T  # unconstrained orthogonal Procrustes
    return float(np.sqrt(np.mean(np.sum((A @ R.T - B) ** 2, 1)))), float(np.linalg.det(R))


def _check_cluster(rec: ClusterRecord, path: Path) -> None:
    rec.validate()
    assert rec.final.shape == (17, rec.n_atoms, 3) and rec.initial is None
    # every copy an exact *proper* rigid motion of molecule 0, same atom order
    for m in range(17):
        rmsd, det = _proper_fit(rec.final[0], rec.final[m])
        assert rmsd < 1e-3 and det > 0, (m, rmsd, det)
    # molecule 0 is central: the others are sorted by centroid distance to it
    c = rec.final.mean(1)
    d = np.linalg.norm(c - c[0], axis=1)
    assert d[0] == 0 and np.all(np.diff(d[1:]) >= -1e-9) and d[1] > 1.0
    # no two molecules overlap (distinct copies, no duplicate translations)
    x = rec.final.reshape(-1, 3)
    dd = np.linalg.norm(x[:, None] - x[None], axis=-1)
    same = np.repeat(np.arange(17), rec.n_atoms)
    assert dd[same[:, None] != same[None, :]].min() > 0.8
    # every atom sits on a site of the crystal (modulo lattice vectors): positions come from the CIF
    from pymatgen.core import Structure

    s = Structure.from_file(str(path))
    f = s.lattice.get_fractional_coords(x)
    diff = f[:, None, :] - s.frac_coords[None]
    diff -= np.round(diff)
    err = np.linalg.norm(diff @ s.lattice.matrix, axis=-1).min(1)
    assert err.max() < 0.16, err.max()
    assert rec.meta["n_cell_molecules"] * rec.n_atoms == len(s)


@pytest.mark.parametrize("name,n_atoms,n_cell", [("ok_methanol_p21c.cif", 6, 4), ("ok_chiral_p21.cif", 5, 2)])
def test_accepted_small(name, n_atoms, n_cell):
    rec = cluster_from_cif(DATA / name)
    assert rec.n_atoms == n_atoms and rec.meta["n_cell_molecules"] == n_cell
    _check_cluster(rec, DATA / name)


def test_achiral_mirror_copies_are_relabelled():
    # methanol in P2_1/c: half the copies are inversion images; for this achiral molecule a relabelling
    # (swap of the two out-of-plane methyl H) makes them proper. The swap must actually happen.
    rec = cluster_from_cif(DATA / "ok_methanol_p21c.cif")
    assert rec.meta["fit_rmsd_max"] < 1e-6 and rec.meta["n_mirror_copies"] == 0


def test_deterministic():
    a = cluster_from_cif(DATA / "ok_methanol_p21c.cif")
    b = cluster_from_cif(DATA / "ok_methanol_p21c.cif")
    assert np.array_equal(a.final, b.final) and np.array_equal(a.species, b.species)


@pytest.mark.parametrize("name,reason", [
    ("unparsable.cif", "unparsable"),
    ("disorder_occupancy_p1.cif", "disorder"),
    ("disorder_overlap_p1.cif", "disorder"),
    ("metal_p1.cif", "metal"),
    ("element_p1.cif", "element"),
    ("no_hydrogen_p1.cif", "no_hydrogen"),
    ("polymeric_p1.cif", "polymeric"),
    ("multiple_components_p1.cif", "multiple_components"),
    ("multiple_conformers_p1.cif", "multiple_conformers"),
    ("flat_molecule_p1.cif", "flat_molecule"),
    ("racemic_p-1.cif", "racemic"),
])
def test_rejections(name, reason):
    with pytest.raises(BuildError) as ei:
        cluster_from_cif(DATA / name)
    e = ei.value
    assert e.reason == reason and reason in REASONS
    assert name in str(e) and f"({reason})" in str(e)  # the message names the file and the reason
    assert e.path.endswith(name)


def test_too_many_atoms_and_missing_file(tmp_path):
    with pytest.raises(BuildError) as ei:
        cluster_from_cif(DATA / "ok_methanol_p21c.cif", max_atoms=5)
    assert ei.value.reason == "too_many_atoms" and "max_atoms" in str(ei.value)
    with pytest.raises(BuildError) as ei:
        cluster_from_cif(tmp_path / "nope.cif")
    assert ei.value.reason == "unparsable"


def test_allow_mirror_accepts_racemic_with_improper_copies():
    rec = cluster_from_cif(DATA / "racemic_p-1.cif", allow_mirror=True)
    assert rec.meta["n_mirror_copies"] > 0
    dets = [_proper_fit(rec.final[0], rec.final[m]) for m in range(17)]
    assert all(r < 1e-3 for r, _ in dets)
    assert sum(d < 0 for _, d in dets) == rec.meta["n_mirror_copies"]


def test_organic_elements_documented():
    assert ORGANIC_ELEMENTS == {"H", "B", "C", "N", "O", "F", "Si", "P", "S", "Cl", "Se", "Br", "I"}
    for sym in ORGANIC_ELEMENTS:
        assert sym in REASONS["element"]


def test_match_rigid_recovers_permutation():
    rng = np.random.default_rng(0)
    rec = cluster_from_cif(DATA / "ok_methanol_p21c.cif")
    X = rec.final[0]
    from scipy.spatial.transform import Rotation

    R = Rotation.random(random_state=1).as_matrix()
    perm = rng.permutation(len(X))
    Y = (X @ R.T + 3.0)[perm]
    got = match_rigid(X, Y, rec.species, rec.species[perm])
    assert got is not None
    p, Rf, rmsd = got
    assert rmsd < 1e-9 and np.allclose(Y[p], (X - X.mean(0)) @ Rf.T + Y.mean(0))


def test_build_dataset_batch(tmp_path):
    # a bad file never stops the batch and never loses the good ones
    src = tmp_path / "cifs"
    src.mkdir()
    for n in ["ok_methanol_p21c.cif", "ok_chiral_p21.cif", "metal_p1.cif", "unparsable.cif"]:
        (src / n).write_bytes((DATA / n).read_bytes())
    (src / "empty.cif").write_text("")

    def noise(rec, rng):  # a rigid shift per molecule: valid loose state for the reader's rigidity check
        return rec.final + rng.normal(size=(17, 1, 3)) * 5.0

    out = tmp_path / "out"
    summary = build_dataset(src, out, workers=1, noise_fn=noise, progress=False)
    assert summary["n_files"] == 5 and summary["accepted"] == 2
    assert summary["reasons"] == {"metal": 1, "unparsable": 2}
    rows = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert [r["file"].split("/")[-1] for r in rows] == sorted(p.name for p in src.iterdir())
    assert all(r["seconds"] is not None and r["message"] is None for r in rows if r["status"] == "accepted")
    assert json.loads((out / "summary.json").read_text())["accepted"] == 2
    assert list_raw_ids(out) == ["ok_chiral_p21", "ok_methanol_p21c"]
    rec = read_raw_pair(out, "ok_methanol_p21c", require_initial=True)
    ref = cluster_from_cif(DATA / "ok_methanol_p21c.cif")
    assert np.array_equal(rec.final, ref.final)
    # the per-file noise seed does not depend on the worker count
    out2 = tmp_path / "out2"
    build_dataset(src, out2, workers=2, noise_fn=noise, progress=False)
    for d in ("FinalPositions", "InitialPositions"):
        for f in (out / "raw" / d).iterdir():
            assert f.read_bytes() == (out2 / "raw" / d / f.name).read_bytes()


@pytest.mark.shared
@pytest.mark.parametrize("rel", ["pyxtal_examples/naphthalene.cif", "pyxtal_testdb/COUMAR01.cif",
                                 "cod/2006465.cif"])
def test_real_crystals(shared_dir, rel):
    path = shared_dir / "data" / "crystals" / rel
    rec = cluster_from_cif(path)
    _check_cluster(rec, path)
    again = cluster_from_cif(path)
    assert np.array_equal(rec.final, again.final)


@pytest.mark.shared
@pytest.mark.parametrize("rel,reason", [("cod/1000000.cif", "metal"), ("pyxtal_testdb/KONTIQ.cif",
                                                                       "multiple_components"),
                                        ("pyxtal_examples/aspirin.cif", "racemic"),
                                        ("pyxtal_examples/ht_quartz.cif", "no_hydrogen")])
def test_real_rejections(shared_dir, rel, reason):
    with pytest.raises(BuildError) as ei:
        cluster_from_cif(shared_dir / "data" / "crystals" / rel)
    assert ei.value.reason == reason


def test_build_error_pickles_and_timeout(tmp_path):
    import pickle

    e = BuildError("x.cif", "metal", "contains Na")
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.path, e2.reason, str(e2)) == (e.path, e.reason, str(e))
    src = tmp_path / "cifs"
    src.mkdir()
    (src / "a.cif").write_bytes((DATA / "ok_methanol_p21c.cif").read_bytes())
    s = build_dataset(src, tmp_path / "o", workers=1, progress=False, timeout=1e-4)
    assert s["reasons"] == {"timeout": 1} and s["accepted"] == 0
    with pytest.raises(BuildError) as ei:
        build_dataset(tmp_path / "nothing", tmp_path / "o2", progress=False)
    assert ei.value.reason == "bad_input"
