"""Official COD-Cluster17 raw layout (byte-exact round trip, strict validation) and the other formats."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from kflow_mol.cif import cluster_from_cif
from kflow_mol.data import BuildError, ClusterRecord
from kflow_mol.io import (
    HEADER,
    format_csv,
    hill_formula,
    list_raw_ids,
    molecule_from_smiles,
    raw_paths,
    read_cluster_xyz,
    read_csv,
    read_raw_pair,
    read_single_molecule,
    write_cluster_cif,
    write_raw_pair,
    write_xyz,
)

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def record() -> ClusterRecord:
    rec = cluster_from_cif(DATA / "ok_methanol_p21c.cif")
    c = rec.final.mean(1, keepdims=True)
    R = Rotation.random(17, random_state=3).as_matrix()
    rec.initial = np.einsum("mij,mnj->mni", R, rec.final - c) + 2.5 * c + 1.0  # rigid per molecule
    return rec


def test_round_trip_byte_identical(tmp_path, record):
    f, i = write_raw_pair(tmp_path / "a", record)
    assert f == tmp_path / "a" / "raw" / "FinalPositions" / "ok_methanol_p21c_cluster16.csv"
    assert i == tmp_path / "a" / "raw" / "InitialPositions" / "ok_methanol_p21c_cluster16_noised.csv"
    back = read_raw_pair(tmp_path / "a", record.id, require_initial=True)
    assert np.array_equal(back.final, record.final) and np.array_equal(back.initial, record.initial)
    assert np.array_equal(back.species, record.species)
    f2, i2 = write_raw_pair(tmp_path / "b", back)
    assert f.read_bytes() == f2.read_bytes() and i.read_bytes() == i2.read_bytes()
    assert list_raw_ids(tmp_path / "a") == [record.id]
    # the raw folder itself is accepted as root too
    assert np.array_equal(read_raw_pair(tmp_path / "a" / "raw", record.id).final, record.final)


def test_layout_matches_official_loader(tmp_path, record):
    f, _ = write_raw_pair(tmp_path, record)
    lines = f.read_text().split("\n")
    assert lines[0] == HEADER == "mol_idx,atom_type,x,y,z" and lines[-1] == ""
    rows = [ln.split(",") for ln in lines[1:-1]]
    assert len(rows) == 17 * record.n_atoms and all(len(r) == 5 for r in rows)
    assert sorted({int(r[0]) for r in rows}) == list(range(17))
    assert [r[1] for r in rows[: record.n_atoms]] == record.symbols
    # AssembleFlow's parser: mol_idx, atom_type, x, y, z = line.strip().split(",")
    mol_idx, atom_type, x, _y, _z = lines[1].strip().split(",")
    assert int(mol_idx) == 0 and atom_type.isalpha() and float(x) == record.final[0, 0, 0]


def test_reads_other_float_formatting(tmp_path, record):
    # files written by other tools (fixed decimals, CRLF) still parse
    p = tmp_path / "raw" / "FinalPositions" / "x_cluster16.csv"
    p.parent.mkdir(parents=True)
    rows = [HEADER] + [f"{m},{s},{a:.6f},{b:.6f},{c:.6f}" for m in range(17)
                       for s, (a, b, c) in zip(record.symbols, record.final[m])]
    p.write_bytes(("\r\n".join(rows) + "\r\n").encode())
    rec = read_raw_pair(tmp_path, "x")
    assert np.allclose(rec.final, record.final, atol=1e-6) and rec.initial is None


def _write(tmp_path, text, name="bad", kind="final"):
    d = tmp_path / "raw" / ("FinalPositions" if kind == "final" else "InitialPositions")
    d.mkdir(parents=True, exist_ok=True)
    p = d / (f"{name}_cluster16.csv" if kind == "final" else f"{name}_cluster16_noised.csv")
    p.write_text(text)
    return p


def _bad(tmp_path, match, cid="bad"):
    with pytest.raises(BuildError) as ei:
        read_raw_pair(tmp_path, cid, require_initial=True)
    e = ei.value
    assert e.reason == "bad_csv" and match in str(e), str(e)
    return e


def test_bad_header(tmp_path, record):
    text = format_csv(record.species, record.final).replace(HEADER, "idx,mol_idx,atom_type,x,y,z", 1)
    p = _write(tmp_path, text)
    e = _bad(tmp_path, "line 1: header")
    assert e.path == str(p) and p.name in str(e)


def test_sixteen_molecules(tmp_path, record):
    p = _write(tmp_path, format_csv(record.species, record.final[:16]))
    assert p.name in str(_bad(tmp_path, "16 molecules"))


def test_unequal_counts(tmp_path, record):
    lines = format_csv(record.species, record.final).splitlines()
    del lines[-1]  # drop the last atom of molecule 16
    _write(tmp_path, "\n".join(lines) + "\n")
    _bad(tmp_path, "unequal atom counts")


def test_different_atom_order(tmp_path, record):
    lines = format_csv(record.species, record.final).splitlines()
    n = record.n_atoms
    blk = lines[1 + 5 * n: 1 + 6 * n]
    lines[1 + 5 * n: 1 + 6 * n] = blk[::-1]
    _write(tmp_path, "\n".join(lines) + "\n")
    _bad(tmp_path, "different atom order")


def test_bad_fields(tmp_path, record):
    lines = format_csv(record.species, record.final).splitlines()
    lines[3] = lines[3].replace(",H,", ",Xx,").replace(",C,", ",Xx,").replace(",O,", ",Xx,")
    _write(tmp_path, "\n".join(lines) + "\n")
    _bad(tmp_path, "line 4: unknown element symbol 'Xx'")
    lines = format_csv(record.species, record.final).splitlines()
    lines[5] = lines[5] + ",7"
    _write(tmp_path, "\n".join(lines) + "\n")
    _bad(tmp_path, "line 6: expected 5")
    lines = format_csv(record.species, record.final).splitlines()
    lines[2] = "a" + lines[2]
    _write(tmp_path, "\n".join(lines) + "\n")
    _bad(tmp_path, "line 3: mol_idx")


def test_non_rigid_initial(tmp_path, record):
    _write(tmp_path, format_csv(record.species, record.final))
    init = record.initial.copy()
    init[7, 0] += 0.3  # one atom moved: molecule 7 is no longer a rigid copy
    p = _write(tmp_path, format_csv(record.species, init), kind="initial")
    e = _bad(tmp_path, "molecule 7 is not a proper rigid motion")
    assert e.path == str(p)
    # a mirror image is rigid but not proper: rejected too
    init = record.initial.copy()
    init[2] = -init[2]
    _write(tmp_path, format_csv(record.species, init), kind="initial")
    _bad(tmp_path, "molecule 2 is not a proper rigid motion")


def test_missing_files(tmp_path, record):
    with pytest.raises(BuildError, match="FinalPositions"):
        list_raw_ids(tmp_path)
    _write(tmp_path, format_csv(record.species, record.final), name="only_final")
    _bad(tmp_path, "file not found", cid="only_final")
    assert read_raw_pair(tmp_path, "only_final").initial is None
    with pytest.raises(BuildError, match="file not found"):
        read_raw_pair(tmp_path, "nope")
    fpath, ipath = raw_paths(tmp_path, "only_final")
    assert fpath.is_file() and not ipath.exists()


def test_read_csv_order_of_first_appearance(tmp_path, record):
    # mol_idx labels need not be 0..16; molecules keep the file order (as AssembleFlow's dict does)
    text = format_csv(record.species, record.final)
    lines = text.splitlines()
    out = [lines[0]] + [ln.replace(ln.split(",")[0], str(100 - int(ln.split(",")[0])), 1) for ln in lines[1:]]
    p = tmp_path / "x.csv"
    p.write_text("\n".join(out) + "\n")
    _, pos = read_csv(p)
    assert np.array_equal(pos, record.final)


def test_xyz_round_trips(tmp_path, record):
    p = write_xyz(tmp_path / "c.xyz", record.species, record.final)
    sp, pos = read_cluster_xyz(p)
    assert np.array_equal(sp, record.species) and np.allclose(pos, record.final, atol=1e-7)
    traj = np.stack([record.initial, record.final])
    p = write_xyz(tmp_path / "t.extxyz", record.species, traj)
    sp, pos = read_cluster_xyz(p)  # first frame
    assert np.allclose(pos, record.initial, atol=1e-7)
    from ase.io import read

    assert len(read(str(p), index=":")) == 2
    # shuffled atoms: molecules recovered by bonding, atom order made consistent by rigid matching
    rng = np.random.default_rng(0)
    z = np.tile(record.species, 17)
    x = record.final.reshape(-1, 3)
    perm = rng.permutation(len(z))
    q = tmp_path / "shuffled.xyz"
    q.write_text(f"{len(z)}\n\n" + "".join(f"{'CHO'[[6, 1, 8].index(a)]} {b[0]:.8f} {b[1]:.8f} {b[2]:.8f}\n"
                                           for a, b in zip(z[perm], x[perm])))
    sp, pos = read_cluster_xyz(q)
    assert pos.shape == (17, record.n_atoms, 3)
    for m in range(17):  # each molecule a rigid copy of the first with the same atom order
        A, B = pos[0] - pos[0].mean(0), pos[m] - pos[m].mean(0)
        assert abs(np.linalg.norm(A) - np.linalg.norm(B)) < 1e-6
        assert np.allclose(np.linalg.norm(A[:, None] - A[None], axis=-1),
                           np.linalg.norm(B[:, None] - B[None], axis=-1), atol=1e-6)
    bad = tmp_path / "bad.xyz"
    bad.write_text("3\n\nC 0 0 0\nH 0 0 1.0\nH 0 1.0 0\n")
    with pytest.raises(BuildError) as ei:
        read_cluster_xyz(bad)
    assert ei.value.reason == "bad_input" and "bad.xyz" in str(ei.value)


def test_smiles_sdf_and_cif(tmp_path, record):
    z, x = molecule_from_smiles("c1ccccc1", seed=0)
    assert sorted(z.tolist()) == [1] * 6 + [6] * 6 and x.shape == (12, 3)
    _, x2 = molecule_from_smiles("c1ccccc1", seed=0)
    assert np.array_equal(x, x2)  # seeded
    with pytest.raises(BuildError) as ei:
        molecule_from_smiles("C1CC(")
    assert ei.value.reason == "bad_input"
    from rdkit import Chem
    from rdkit.Chem import AllChem

    m = Chem.AddHs(Chem.MolFromSmiles("CCO"))
    AllChem.EmbedMolecule(m, randomSeed=0)
    w = Chem.SDWriter(str(tmp_path / "e.sdf"))
    w.write(m)
    w.close()
    z, x = read_single_molecule(tmp_path / "e.sdf")
    assert len(z) == 9 and x.shape == (9, 3)
    p = write_cluster_cif(tmp_path / "c.cif", record.species, record.final)
    from ase.io import read

    at = read(str(p))
    assert len(at) == 17 * record.n_atoms
    d = at.get_all_distances()
    assert np.allclose(np.sort(d.ravel())[-1], np.sort(np.linalg.norm(
        record.final.reshape(-1, 3)[:, None] - record.final.reshape(-1, 3)[None], axis=-1).ravel())[-1])
    # the file says it is a cluster, not a crystal, and gives a formula chemists can read
    text = p.read_text()
    assert text.startswith("# kflow-mol: a finite cluster of 17 molecules") and "NOT a" in text
    one = hill_formula(record.species)
    assert f"_chemical_formula_moiety          '17({one})'" in text
    assert "_chemical_formula_structural" not in text
    assert np.allclose(at.get_positions()[:record.n_atoms] - at.get_positions()[0],
                       record.final[0] - record.final[0, 0], atol=1e-3)


def test_hill_formula():
    assert hill_formula([6, 6, 1, 1, 1, 8]) == "C2 H3 O"
    assert hill_formula([1, 1, 8]) == "H2 O"  # without carbon: alphabetical
    assert hill_formula([17, 6, 1, 35]) == "C H Br Cl"


def test_record_validate():
    apart = np.zeros((17, 2, 3))
    apart[:, 1, 0] = 1.1
    apart[:, :, 1] += 5.0 * np.arange(17)[:, None]  # 17 distinct C-H molecules 5 A apart
    rec = ClusterRecord("x", np.array([6, 1]), apart)
    assert rec.validate() is rec and rec.symbols == ["C", "H"]
    with pytest.raises(BuildError, match="shape"):
        ClusterRecord("x", np.array([6, 1]), np.zeros((16, 2, 3))).validate()
    with pytest.raises(BuildError, match="non-finite"):
        ClusterRecord("x", np.array([6, 1]), np.full((17, 2, 3), np.nan)).validate()
    with pytest.raises(BuildError, match="a coordinate of 1e"):
        ClusterRecord("x", np.array([6, 1]), apart + 1e300).validate()
    with pytest.raises(BuildError, match="initial"):
        ClusterRecord("x", np.array([6, 1]), apart, np.zeros((17, 3, 3))).validate()
    with pytest.raises(BuildError, match="final molecules 0 and 1 overlap"):
        ClusterRecord("x", np.array([6, 1]), np.zeros((17, 2, 3))).validate()


def test_csv_reader_rejects_non_utf8_and_huge_coordinates(tmp_path):
    from kflow_mol.io import read_csv

    f = tmp_path / "a.csv"
    f.write_bytes("mol_idx,atom_type,x,y,z\n0,C,1.0,2.0,3.0\xe9\n".encode("latin-1"))
    with pytest.raises(BuildError, match="not UTF-8"):
        read_csv(f)
    f.write_text("mol_idx,atom_type,x,y,z\n0,C,1e300,2.0,3.0\n")
    with pytest.raises(BuildError, match="line 2: a coordinate of 1e"):
        read_csv(f)


# ------------------------------------------------------------------ one set of molecule rules for every input
@pytest.mark.parametrize("smiles,reason", [("[Na+].[Cl-]", "metal"), ("CC.O", "multiple_components"),
                                           ("C#C", "flat_molecule"), ("[H][H]", "flat_molecule"),
                                           ("ClC(Cl)(Cl)Cl", "no_hydrogen"), ("C[As](C)C", "element")])
def test_smiles_follow_the_cif_rules(smiles, reason):
    from kflow_mol.io import molecule_from_smiles

    with pytest.raises(BuildError) as ei:
        molecule_from_smiles(smiles)
    assert ei.value.reason == reason and smiles in str(ei.value)
    z, x = molecule_from_smiles("Cc1ccccc1O")  # a real molecule passes
    assert len(z) == 16 and x.shape == (16, 3)


def test_xyz_and_csv_molecules_follow_the_cif_rules(tmp_path, record):
    from kflow_mol.io import read_single_molecule, write_xyz

    write_xyz(tmp_path / "two.xyz", np.array([6, 1]), np.array([[[0.0, 0, 0], [1.1, 0, 0]]]))
    with pytest.raises(BuildError) as ei:
        read_single_molecule(tmp_path / "two.xyz")
    assert ei.value.reason == "flat_molecule"
    x = record.final[0]
    apart = np.concatenate([x, x + 20.0])  # two molecules in one "molecule"
    write_xyz(tmp_path / "pair.xyz", np.tile(record.species, 2), apart[None])
    with pytest.raises(BuildError) as ei:
        read_single_molecule(tmp_path / "pair.xyz")
    assert ei.value.reason == "multiple_components"
    # a cluster in the official layout whose carbon became sodium: the CIF route's `metal`, not a silent accept
    metal = ClusterRecord("na", np.where(record.species == 6, 11, record.species), record.final, None, {})
    write_raw_pair(tmp_path / "d", metal)
    with pytest.raises(BuildError) as ei:
        read_raw_pair(tmp_path / "d", "na")
    assert ei.value.reason == "metal"
