"""The loose-state noise model."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from kflow_mol import metrics as M
from kflow_mol.noise import LooseConfig, make_loose, undo_mean_expansion
from kflow_mol.so3 import random_rotation_np

sys.path.insert(0, str(Path(__file__).parent))
from test_metrics import toy_cluster


def _kabsch(P, Q):
    P, Q = P - P.mean(0), Q - Q.mean(0)
    U, _, Vt = np.linalg.svd(Q.T @ P)
    d = np.sign(np.linalg.det(U @ Vt))
    return (U * [1, 1, d]) @ Vt


def test_deterministic_per_seed_and_different_across_seeds():
    _, true = toy_cluster()
    a = make_loose(true, np.random.default_rng(5))
    b = make_loose(true, np.random.default_rng(5))
    c = make_loose(true, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1.0


def test_each_molecule_moves_rigidly_and_is_rotated():
    _, true = toy_cluster()
    loose = make_loose(true, np.random.default_rng(0))
    angles = []
    for x1, x0 in zip(true, loose):
        R = _kabsch(x1, x0)
        np.testing.assert_allclose((x1 - x1.mean(0)) @ R.T, x0 - x0.mean(0), atol=1e-9)
        angles.append(np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1))))
    assert np.mean(angles) > 60  # uniform rotations: mean angle ~126 degrees
    no_rot = make_loose(true, np.random.default_rng(0), LooseConfig(rotate=False))
    for x1, x0 in zip(true, no_rot):
        np.testing.assert_allclose(x1 - x1.mean(0), x0 - x0.mean(0), atol=1e-9)


def test_no_overlaps():
    _, true = toy_cluster()
    cfg = LooseConfig()
    for seed in range(3):
        loose = make_loose(true, np.random.default_rng(seed), cfg)
        m = len(loose)
        d = min(np.linalg.norm(loose[i][:, None] - loose[j][None], axis=-1).min()
                for i in range(m) for j in range(i + 1, m))
        assert d >= cfg.min_distance


def test_impossible_placement_raises_clear_error():
    _, true = toy_cluster()
    cfg = LooseConfig(expansion_mean=0.05, expansion_spread=0.0, jitter=0.0, min_distance=3.0, max_tries=3)
    with pytest.raises(RuntimeError, match="could not place molecule"):
        make_loose(true, np.random.default_rng(0), cfg)
    with pytest.raises(ValueError):
        LooseConfig(expansion_mean=1.0, expansion_spread=1.0)


def test_per_molecule_factors_are_independent():
    _, true = toy_cluster()
    cfg = LooseConfig(jitter=0.0)
    loose = make_loose(true, np.random.default_rng(1), cfg)
    c1, c0 = true.mean(1), loose.mean(1)
    centre = c1.mean(0)
    f = np.linalg.norm(c0[1:] - centre, axis=1) / np.linalg.norm(c1[1:] - centre, axis=1)
    assert f.min() >= cfg.expansion_mean - cfg.expansion_spread - 1e-9
    assert f.max() <= cfg.expansion_mean + cfg.expansion_spread + 1e-9
    assert f.std() > 0.2  # not one global factor
    # a single global factor without jitter is exactly undone; ours is not
    glob = LooseConfig(expansion_spread=0.0, jitter=0.0)
    undone = undo_mean_expansion(make_loose(true, np.random.default_rng(1), glob), glob)
    assert M.pm_center(undone, true) < 1e-9
    undone = undo_mean_expansion(make_loose(true, np.random.default_rng(1)), LooseConfig())
    assert M.pm_center(undone, true) > 1.0


def test_random_rotation_np_is_proper():
    R = random_rotation_np(np.random.default_rng(0), 100)
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)


def test_calibration_on_real_clusters(shared_dir):
    """Do-nothing PM-atom is genuinely loose; undoing the mean expansion stays well above 1 Å."""
    cif = pytest.importorskip("kflow_mol.cif")
    names = ["ACRDIN05", "BENZEN", "ADAMAN01", "COUMAR01"]
    recs = []
    for name in names:
        path = shared_dir / "data" / "crystals" / "pyxtal_testdb" / f"{name}.cif"
        if path.exists():
            recs.append(cif.cluster_from_cif(path))
    if not recs:
        pytest.skip("no reference crystals")
    cfg = LooseConfig()
    pm, undo = [], []
    for i, r in enumerate(recs):
        x0 = make_loose(r.final, np.random.default_rng(i), cfg)
        pm.append(M.pm_atom(x0, r.final))
        undo.append(M.pm_center(undo_mean_expansion(x0, cfg), r.final))
    assert np.mean(pm) > 10.0
    assert np.mean(undo) > 1.0


def test_posterior_centroids_invert_a_known_factor_and_beat_the_mean_factor():
    """The per-molecule Bayes floor: with no spread and almost no jitter it undoes the expansion exactly; with
    the default noise it is closer to the truth than undoing the mean factor (on average over draws), and
    ``oracle_floors`` reports it when given the noise model."""
    from kflow_mol.noise import posterior_centroids

    z, true = toy_cluster()
    c1 = true.mean(1)
    rho = np.linalg.norm(c1 - c1.mean(0), axis=1)
    sharp = LooseConfig(expansion_mean=2.0, expansion_spread=0.0, jitter=0.01, min_distance=0.0)
    loose = make_loose(true, np.random.default_rng(0), sharp)
    est = posterior_centroids(loose, sharp, rho).mean(1)
    # the centre of the loose centroids is the true centre here (one factor, no jitter): exact up to the jitter
    assert np.abs(est - c1).max() < 0.1
    cfg = LooseConfig()
    bayes, undo = [], []
    for seed in range(6):
        fl = M.oracle_floors(make_loose(true, np.random.default_rng(seed), cfg), true, z, noise=cfg)
        bayes.append(fl["per_molecule_bayes"]["pm_center"])
        undo.append(fl["undo_mean_expansion"]["pm_center"])
    assert np.mean(bayes) < np.mean(undo)
    assert "per_molecule_bayes" not in M.oracle_floors(loose, true, z, expansion_mean=2.0)
