"""The builder with mirror images and Z' > 1 conformers (facts, not rejections), and its packing sanity checks."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from kflow_mol.build import build_dataset
from kflow_mol.cif import cluster_from_cif, match_graph, vdw_volume
from kflow_mol.data import REASONS, BuildError
from kflow_mol.molecule import bond_graph
from kflow_mol.shapes import find_shapes

from .test_cif import DATA


def test_racemic_and_conformers_are_facts_by_default():
    rac = cluster_from_cif(DATA / "racemic_p-1.cif")
    assert rac.meta["racemic"] and rac.meta["n_mirror_copies"] > 0 and rac.meta["n_conformers"] == 1
    sh = find_shapes(rac.final)
    assert sh.num_shapes == 2 and list(sh.mirror_of) == [-1, 0]
    conf = cluster_from_cif(DATA / "multiple_conformers_p1.cif")
    assert conf.meta["multiple_conformers"] and conf.meta["n_conformers"] == 2 and not conf.meta["racemic"]
    assert conf.meta["n_cluster_shapes"] == 2 == find_shapes(conf.final).num_shapes
    # the conformer copies keep the template's atom order: every copy has the same bond graph
    adj = bond_graph(conf.species, conf.final[0])
    assert all(np.array_equal(bond_graph(conf.species, x), adj) for x in conf.final)
    # the old behaviour on request
    for name, kw, reason in (("racemic_p-1.cif", {"allow_mirror": False}, "racemic"),
                             ("multiple_conformers_p1.cif", {"allow_conformers": False}, "multiple_conformers")):
        with pytest.raises(BuildError) as ei:
            cluster_from_cif(DATA / name, **kw)
        assert ei.value.reason == reason


def test_match_graph_orders_a_conformer():
    conf = cluster_from_cif(DATA / "multiple_conformers_p1.cif")
    X, Y = conf.final[0], conf.final[next(i for i in range(17) if find_shapes(conf.final).copy_shape[i] == 1)]
    perm = np.random.default_rng(0).permutation(len(Y))
    got = match_graph(X, Y[perm], conf.species, conf.species[perm])
    assert got is not None
    assert np.array_equal(conf.species[perm][got[0]], conf.species)
    assert np.array_equal(bond_graph(conf.species, Y[perm][got[0]]), bond_graph(conf.species, X))
    water = np.array([[0.0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    assert match_graph(X[:3], water, conf.species[:3], np.array([8, 1, 1])) is None


def test_vdw_volume_of_one_atom():
    v = vdw_volume(np.array([6]), np.zeros((1, 3)))
    assert abs(v - 4 / 3 * np.pi * 1.7**3) / v < 0.02  # Bondi C 1.70 Å


def test_packing_sanity_thresholds(tmp_path):
    rec = cluster_from_cif(DATA / "ok_methanol_p21c.cif")
    pc = rec.meta["packing_coefficient"]
    assert 0.1 < pc < 0.3  # a toy cell: 4 methanols in 720 Å^3
    assert rec.meta["min_contact"] > 1.0 and 0 < rec.meta["min_vdw_ratio"] < 2
    with pytest.raises(BuildError) as ei:
        cluster_from_cif(DATA / "ok_methanol_p21c.cif", min_packing=0.5)
    assert ei.value.reason == "loose_packing" and "packing coefficient" in str(ei.value)
    with pytest.raises(BuildError) as ei:
        cluster_from_cif(DATA / "ok_methanol_p21c.cif", min_contact_ratio=rec.meta["min_vdw_ratio"] + 0.01)
    assert ei.value.reason == "impossible_contact"
    assert {"loose_packing", "impossible_contact"} <= set(REASONS)
    # the builder's report states the facts and its defaults reject the loose toy cell
    src = tmp_path / "cifs"
    src.mkdir()
    for n in ("ok_methanol_p21c.cif", "racemic_p-1.cif", "multiple_conformers_p1.cif"):
        shutil.copy(DATA / n, src)
    s = build_dataset(src, tmp_path / "o", workers=1, progress=False)
    assert s["reasons"] == {"loose_packing": 3} and s["min_packing"] == 0.5
    s = build_dataset(src, tmp_path / "o2", workers=1, progress=False, min_packing=None)
    assert s["accepted"] == 3 and s["facts"]["racemic"] == 1 and s["facts"]["multiple_conformers"] == 1
    assert s["facts"]["clusters_with_several_shapes"] == 2 and "racemic" in s["facts_explained"]
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "o2" / "report.jsonl").read_text().splitlines())}
    assert rows["racemic_p-1"]["racemic"] and rows["multiple_conformers_p1"]["n_conformers"] == 2
    assert all(r["packing_coefficient"] > 0 and r["min_contact"] > 0 for r in rows.values())
    s = build_dataset(src, tmp_path / "o3", workers=1, progress=False, min_packing=None, allow_mirror=False,
                      allow_conformers=False)
    assert s["reasons"] == {"multiple_conformers": 1, "racemic": 1}
