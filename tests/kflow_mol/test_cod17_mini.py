"""The shipped ``cod17-mini`` data set: its manifest matches its files, and the builder's rules accept them all."""
import json

import pytest

from kflow_mol.dataset import mini_dir

FACTS = ("racemic", "n_mirror_copies", "z_prime", "n_conformers", "n_cluster_shapes", "packing_coefficient",
         "min_contact", "min_vdw_ratio")


@pytest.fixture(scope="module")
def manifest():
    return json.loads((mini_dir() / "manifest.json").read_text())


def test_manifest_lists_exactly_the_shipped_files(manifest):
    files = sorted(p.name for p in (mini_dir() / "cifs").glob("*.cif"))
    listed = sorted(c["file"].removeprefix("cifs/") for c in manifest["clusters"])
    assert listed == files and manifest["n_clusters"] == len(files)
    assert {c["source"] for c in manifest["clusters"]} <= {"cod", "pyxtal_testdb", "pyxtal_examples"}
    assert "prepare_cod17_mini.py" in manifest["rebuild"]


def test_manifest_facts_pass_the_packing_rules_and_cover_mixed_shapes(manifest):
    """Every file passes the builder's default packing and contact thresholds; the set holds racemic and
    Z' > 1 (different-conformer) crystals, so the default data exercises per-copy shapes."""
    s = manifest["build_settings"]
    rows = manifest["clusters"]
    for c in rows:
        assert all(k in c for k in FACTS), c["id"]
        assert c["packing_coefficient"] >= s["min_packing"] and c["min_vdw_ratio"] >= s["min_contact_ratio"], c["id"]
    assert manifest["facts"]["racemic"] == sum(c["racemic"] for c in rows) > 0
    assert manifest["facts"]["multiple_conformers"] == sum(c["n_conformers"] > 1 for c in rows) > 0
    assert any(c["z_prime"] > 1 for c in rows)


def test_files_other_tests_name_are_shipped():
    for name in ("2000334", "2000583", "2000724", "ice", "resorcinol"):
        assert (mini_dir() / "cifs" / f"{name}.cif").is_file(), name


@pytest.mark.slow
def test_builder_accepts_every_shipped_file_with_the_manifest_facts(manifest, tmp_path):
    """``build-dataset`` with its defaults (packing and contact checks on) accepts every shipped CIF and reports
    the facts the manifest records (about a minute)."""
    from kflow_mol.build import build_dataset

    s = build_dataset(mini_dir() / "cifs", tmp_path, workers=1, progress=False)
    assert s["accepted"] == manifest["n_clusters"] and not s["reasons"], s["reasons"]
    rows = {json.loads(x)["id"]: json.loads(x) for x in (tmp_path / "report.jsonl").read_text().splitlines()}
    for c in manifest["clusters"]:
        r = rows[c["id"]]
        assert (r["racemic"], r["n_conformers"], r["packing_coefficient"]) == \
               (c["racemic"], c["n_conformers"], c["packing_coefficient"]), c["id"]
