"""Official-layout files with mirror-image copies and Z' = 2 conformers, as they are: written by the builder,
read, trained on for a few steps, evaluated; the symmetry-blind oracle is exact on every cluster."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kflow_mol.build import LooseNoise, build_dataset
from kflow_mol.cli import main
from kflow_mol.dataset import load_prepared
from kflow_mol.metrics import evaluate_cluster, oracle_floors
from kflow_mol.rigid import closest_equivalent_rotation
from kflow_mol.symmetry import closest_equivalent
from kflow_mol.task import make_batch

from .test_cif import DATA


def symmetry_blind_oracle_positions(prep: dict) -> np.ndarray:
    """Each copy's own body placed at its true centroid with the true orientation equivalent (its shape's
    automorphisms) closest to the loose one: a physically perfect, symmetry-blind prediction."""
    b = make_batch([prep], dtype=torch.float64)
    R, _ = closest_equivalent_rotation(b.R1, b.R0, b.symmetries, b.sym_mask)
    return b.clusters.positions_padded(b.c1, R)[0].numpy()


def symmetry_residual(prep: dict) -> float:
    """Largest atom displacement (Å) of any shape's symmetry rotation from its atom permutation, plus how far
    the copies' bodies are from their shape's template (automorphisms of real conformers are approximate)."""
    t = np.asarray(prep.templates)
    res = max(float(np.linalg.norm(np.einsum("gij,nj->gni", S, tk) - tk[P], axis=-1).max())
              for tk, S, P in zip(t, prep.shape_symmetries, prep.shape_perms))
    return res + 2 * float(np.abs(np.asarray(prep.body) - t[prep.copy_shape]).max())


def assert_oracle_exact(prep: dict, tol: float = 1e-6) -> None:
    """The rigid representation reproduces the crystal; the symmetry-blind oracle (true centroids, the true
    orientation equivalent closest to the loose one) scores symmetry-aware PM 0; the rigid oracle the network is
    trained towards (each copy's body at ``R1 S_g``) is as exact as the molecule's symmetry is."""
    b = make_batch([prep], dtype=torch.float64)
    placed = b.clusters.positions_padded(b.c1, b.R1)[0].numpy()
    assert np.abs(placed - prep.final).max() < tol, prep.id
    perms = prep.copy_perms()
    blind, _ = closest_equivalent(torch.from_numpy(prep.final), torch.from_numpy(prep.initial),
                                  torch.from_numpy(perms))
    m = evaluate_cluster(blind.numpy(), prep.final, prep.species, perms)
    assert m["pm_atom_symmetry_aware"] < tol and m["pm_center"] < tol, (prep.id, m["pm_atom_symmetry_aware"])
    rigid = evaluate_cluster(symmetry_blind_oracle_positions(prep), prep.final, prep.species, perms)
    bound = 2 * symmetry_residual(prep) + tol  # each distance moves by at most twice the largest atom residual
    assert rigid["pm_atom_symmetry_aware"] <= bound, (prep.id, rigid["pm_atom_symmetry_aware"], bound)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """Official layout written by the builder from a racemic crystal, a Z' = 2 crystal and two plain ones."""
    src = tmp_path_factory.mktemp("cifs")
    for n in ("racemic_p-1.cif", "multiple_conformers_p1.cif", "ok_methanol_p21c.cif", "ok_chiral_p21.cif"):
        shutil.copy(DATA / n, src)
    out = tmp_path_factory.mktemp("official")
    s = build_dataset(src, out, workers=1, noise_fn=LooseNoise(), progress=False, min_packing=None)  # toy cells
    assert s["accepted"] == 4, s["reasons"]
    return out


def test_official_files_with_mirror_and_conformer_copies(official, tmp_path):
    assert (official / "raw" / "FinalPositions" / "racemic_p-1_cluster16.csv").exists()
    clusters, report = load_prepared(str(official), cache_dir=tmp_path / "cache", progress=False)
    assert report["accepted"] == 4 and not report["rejected"]
    by_id = {c.id: c for c in clusters}
    rac, conf = by_id["racemic_p-1"], by_id["multiple_conformers_p1"]
    assert len(rac.templates) == 2 and rac.mirror_of.tolist() == [-1, 0]
    assert len(conf.templates) == 2 and conf.mirror_of.tolist() == [-1, -1]
    assert len(by_id["ok_methanol_p21c"].templates) == 1
    for c in clusters:
        assert_oracle_exact(c, tol=1e-9)
        rigid = evaluate_cluster(symmetry_blind_oracle_positions(c), c.final, c.species, c.copy_perms())
        assert rigid["pm_atom_symmetry_aware"] < 1e-6, c.id
        fl = oracle_floors(c.initial, c.final, c.species, c.copy_perms())
        assert fl["symmetry_blind_oracle"]["pm_atom_symmetry_aware"] < 1e-9
    # one shared template (the old representation) misses the mirror copies: the test can fail
    M = len(rac.copy_shape)
    one = rac.replace(templates=rac.templates[:1], copy_shape=np.zeros(M, dtype=np.int64),
                      body=np.broadcast_to(rac.template, rac.body.shape).copy(), shape_perms=rac.shape_perms[:1],
                      shape_symmetries=rac.shape_symmetries[:1], shape_orders=rac.shape_orders[:1])
    b = make_batch([one], dtype=torch.float64)
    placed = b.clusters.positions_padded(b.c1, b.R1)[0].numpy()
    assert np.abs(placed - rac.final).max() > 0.1


def test_train_and_evaluate_on_official_files(official, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(official), "--run-dir", str(run), "trainer=smoke", "model=mol_tiny",
                 "solver.steps=3"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--ckpt", str(run / "model.pt"), "--data", str(official), "--split", "all",
                 "--steps", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["num_clusters"] == 4 and res["shapes_per_cluster"] == {"1": 2, "2": 2}
    assert res["symmetry_blind_oracle"]["pm_atom_symmetry_aware"] < 1e-9
    assert np.isfinite(res["model"]["pm_atom"]) and np.isfinite(res["model"]["pm_atom_symmetry_aware"])


def _shared_cif(shared_dir: Path, rel: str) -> Path:
    p = shared_dir / "data" / "crystals" / rel
    if not p.exists():
        pytest.skip(f"{rel} not in the shared folder")
    return p


@pytest.mark.shared
@pytest.mark.parametrize("rel,fact", [("cod/2001826.cif", "racemic"), ("cod/2007008.cif", "multiple_conformers")])
def test_assemble_real_racemic_and_z2(shared_dir, tmp_path, capsys, rel, fact):
    """``assemble`` on a real racemic CIF and a real Z' = 2 CIF (both were rejected before per-copy bodies)."""
    from kflow_mol.cif import cluster_from_cif
    from kflow_mol.dataset import prepare

    path = _shared_cif(shared_dir, rel)
    rec = cluster_from_cif(path)
    assert rec.meta[fact]
    prep = prepare(rec)
    assert len(prep.templates) >= 2
    assert_oracle_exact(prep)
    out = tmp_path / "out"
    assert main(["assemble", str(path), "--out", str(out), "--steps", "3"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["reference_known"] and np.isfinite(m["model"]["pm_atom_symmetry_aware"])
    assert m["floors"]["symmetry_blind_oracle"]["pm_atom_symmetry_aware"] < 1e-6


# racemic and Z' > 1 crystals of every shared folder (all rejected before per-copy rigid bodies)
_MIXED = ["cod/4024741.cif", "pyxtal_testdb/ACSALA.cif", "pyxtal_testdb/UJIRIO02.cif", "pyxtal_examples/aspirin.cif",
          "csd_organic_semiconductors/007ce7fb0a84194c8a3f1d2aa712a76c60e861f8.cif",
          "csd_organic_semiconductors/0526a149fc88980032725590bd2725f89d7d4ba5.cif"]


def _check_shared_cif(path: Path) -> bool:
    """Build one shared CIF as the builder does; an accepted one must have an exact oracle. Returns accepted."""
    from kflow_mol.cif import MIN_CONTACT_RATIO, MIN_PACKING, cluster_from_cif
    from kflow_mol.data import BuildError
    from kflow_mol.dataset import prepare

    try:
        rec = cluster_from_cif(path, min_packing=MIN_PACKING, min_contact_ratio=MIN_CONTACT_RATIO)
    except BuildError:
        return False
    assert_oracle_exact(prepare(rec))
    return True


@pytest.mark.shared
@pytest.mark.parametrize("rel", _MIXED)
def test_shared_mixed_shape_crystals_have_exact_oracles(shared_dir, rel):
    assert _check_shared_cif(_shared_cif(shared_dir, rel))


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("folder", ["cod", "pyxtal_testdb", "pyxtal_examples", "csd_organic_semiconductors"])
def test_every_accepted_shared_cluster_has_an_exact_oracle(shared_dir, folder):
    """Every cluster the builder accepts from a shared folder (minutes per folder: ``-m slow``)."""
    files = sorted((shared_dir / "data" / "crystals" / folder).glob("*.cif"))
    if not files:
        pytest.skip(f"{folder} not in the shared folder")
    assert sum(_check_shared_cif(f) for f in files) > 0
