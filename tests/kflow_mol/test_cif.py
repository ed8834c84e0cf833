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
    with pytest.raises(BuildError) as ei:  # racemic / multiple_conformers are rejected only on request
        cluster_from_cif(DATA / name, allow_mirror=False, allow_conformers=False)
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
    # the toy cells are deliberately not close-packed (packing ~0.2): no packing threshold here
    summary = build_dataset(src, out, workers=1, noise_fn=noise, progress=False, min_packing=None)
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
    build_dataset(src, out2, workers=2, noise_fn=noise, progress=False, min_packing=None)
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
        cluster_from_cif(shared_dir / "data" / "crystals" / rel, allow_mirror=False, allow_conformers=False)
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


# ---------------------------------------------------------------------------------------------- bad input (issue 12)
METHANOL = (DATA / "ok_methanol_p21c.cif").read_text()


def _write(tmp_path, name, text) -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def test_utf8_bom_is_stripped(tmp_path):
    body = METHANOL.split("\n", 1)[1]  # the data_ line first: the BOM sits right before it
    rec = cluster_from_cif(_write(tmp_path, "bom.cif", b"\xef\xbb\xbf" + body.encode()))
    assert np.array_equal(rec.final, cluster_from_cif(DATA / "ok_methanol_p21c.cif").final)


@pytest.mark.parametrize("old,new,reason,fragment", [
    ("_cell_length_b 9.0000", "_cell_length_b -9.0000", "bad_cell", "_cell_length_b = -9"),
    ("_cell_angle_beta 90", "_cell_angle_beta -90", "bad_cell", "strictly between 0 and 180"),
    ("_cell_angle_alpha 90\n_cell_angle_beta 90\n_cell_angle_gamma 90",
     "_cell_angle_alpha 120\n_cell_angle_beta 120\n_cell_angle_gamma 120", "bad_cell", "do not form a cell"),
    ("_cell_length_c 10.0000\n", "", "bad_cell", "_cell_length_c is missing"),
    ("C1 C 0.186250", "C1 C 1e300", "bad_coordinates", "atom C1"),
    ("C1 C 0.186250", "C1 C 123456789", "bad_coordinates", "absurd"),
    ("C1 C 0.186250", "C1 C ?", "bad_coordinates", "not a finite number"),
    ("'x, y, z'\n", "'x, y, z'\n'x+1/2, y, z'\n", "bad_symmetry", "do not form a group"),
    ("'x, y, z'\n", "'x, y, z'\n'2*x, y, z'\n", "bad_symmetry", "not an isometry"),
    ("'-x, -y, -z'", "'-x, -y'", "bad_symmetry", "3 components"),
    ("_cell_length_c 10.0000", "_cell_length_c 1e6", "too_large", "max_cell_length"),
])
def test_invalid_cells_coordinates_and_operators_are_rejected(tmp_path, old, new, reason, fragment):
    """Each of these was accepted (and turned into a different cluster) or crashed before the checks."""
    assert old in METHANOL
    with pytest.raises(BuildError) as ei:
        cluster_from_cif(_write(tmp_path, "bad.cif", METHANOL.replace(old, new)))
    assert ei.value.reason == reason and fragment in str(ei.value), str(ei.value)


def test_space_group_centring_must_match_the_operators(tmp_path):
    # an explicit list {x, x+1/2} is a group, but not the primitive space group the file names
    text = METHANOL.replace("loop_\n_symmetry_equiv_pos_as_xyz\n'x, y, z'\n'-x, y+1/2, -z+1/2'\n'-x, -y, -z'\n"
                            "'x, -y+1/2, z+1/2'\n", "_symmetry_space_group_name_H-M 'P 1'\nloop_\n"
                            "_symmetry_equiv_pos_as_xyz\n'x, y, z'\n'x+1/2, y, z'\n")
    assert text != METHANOL
    with pytest.raises(BuildError) as ei:
        cluster_from_cif(_write(tmp_path, "c.cif", text))
    assert ei.value.reason == "bad_symmetry" and "lattice point" in str(ei.value)


def test_truncated_files_are_not_diagnosed_as_no_hydrogen(tmp_path):
    cut_before_h = METHANOL[: METHANOL.index("\nH3 H")]  # the H rows lost, no final newline
    mid_row = METHANOL[: METHANOL.index("H4 H") + 12]
    text_field = METHANOL + "_publ_section_title\n;\n A title that never ends\n"
    for name, text in (("before_h", cut_before_h), ("mid_row", mid_row), ("field", text_field)):
        with pytest.raises(BuildError) as ei:
            cluster_from_cif(_write(tmp_path, f"{name}.cif", text))
        assert ei.value.reason == "truncated", (name, str(ei.value))
    # the same atoms with a final newline are a complete (H-free) file: no_hydrogen, as before
    with pytest.raises(BuildError) as ei:
        cluster_from_cif(_write(tmp_path, "complete.cif", cut_before_h + "\n"))
    assert ei.value.reason == "no_hydrogen"


def test_caps_are_checked_before_expansion(tmp_path):
    from kflow_mol.cif import CifLimits

    p = DATA / "ok_methanol_p21c.cif"
    for limits, fragment in ((CifLimits(max_cell_volume=100.0), "max_cell_volume"),
                             (CifLimits(max_cell_atoms=23), "6 sites x 4 operators"),
                             (CifLimits(max_symops=2), "max_symops")):
        with pytest.raises(BuildError) as ei:
            cluster_from_cif(p, limits=limits)
        assert ei.value.reason == "too_large" and fragment in str(ei.value)
    assert cluster_from_cif(p, limits=CifLimits(max_cell_atoms=24)).n_atoms == 6


def test_build_dataset_caps_memory_and_kills_stuck_workers(tmp_path):
    """A cell the caps would stop, let through with raised caps, hits the per-worker memory limit (reason
    ``memory``); a worker stuck where the alarm cannot reach it is killed (``timeout``); the good file beside
    them is kept and the summary states the limits."""
    import signal
    import time

    from kflow_mol.cif import CifLimits

    src = tmp_path / "cifs"
    src.mkdir()
    (src / "good.cif").write_text(METHANOL)
    (src / "huge.cif").write_text(METHANOL.replace("_cell_length_c 10.0000", "_cell_length_c 1000000"))
    s = build_dataset(src, tmp_path / "o", workers=2, progress=False, min_packing=None, max_memory_gb=0.5,
                      limits=CifLimits(max_cell_length=1e7, max_cell_volume=1e12))
    assert s["accepted_ids"] == ["good"] and s["reasons"] == {"memory": 1}
    assert s["limits"]["max_memory_gb"] == 0.5 and s["limits"]["max_cell_volume"] == 1e12
    with_defaults = build_dataset(src, tmp_path / "o2", workers=1, progress=False, min_packing=None)
    assert with_defaults["reasons"] == {"too_large": 1} and with_defaults["accepted_ids"] == ["good"]

    def stuck(rec, rng):  # blocks the alarm, as compiled code that never returns to Python would
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(120)

    (src / "huge.cif").unlink()
    (src / "other.cif").write_text((DATA / "ok_chiral_p21.cif").read_text())
    s = build_dataset(src, tmp_path / "o3", workers=2, progress=False, min_packing=None, timeout=0.5, noise_fn=stuck)
    rows = [json.loads(line) for line in (tmp_path / "o3" / "report.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["good", "other"]
    assert all(r["reason"] == "timeout" and "killed" in r["message"] for r in rows)


def test_run_limited_and_deadline():
    import time

    from kflow_mol.build import deadline, run_limited

    assert run_limited(sum, [1, 2, 3], timeout=30) == 6
    with pytest.raises(BuildError) as ei:
        run_limited(time.sleep, 60, timeout=0.3, what="x.cif")
    assert ei.value.reason == "timeout" and ei.value.path == "x.cif"
    with pytest.raises(BuildError) as ei:  # the child's own BuildError keeps its reason
        run_limited(cluster_from_cif, DATA / "metal_p1.cif", timeout=60)
    assert ei.value.reason == "metal"
    with pytest.raises(BuildError) as ei, deadline(0.2, "y.cif"):
        time.sleep(30)
    assert ei.value.reason == "timeout" and "0.2 s" in str(ei.value)
