"""Per-copy rigid bodies: distinct shapes (mirror images, Z' > 1 conformers) through shapes, batch, model, task
and metrics (float64 where exact)."""
from __future__ import annotations

import numpy as np
import pytest
import roma
import torch

from kflow_mol.batch import RigidState, collate
from kflow_mol.data import ClusterRecord
from kflow_mol.dataset import prepare
from kflow_mol.metrics import evaluate_cluster, oracle_floors, pm_atom_symmetry_aware
from kflow_mol.model import AssemblyNet
from kflow_mol.shapes import find_shapes
from kflow_mol.symmetry import closest_equivalent

M = 17
MIRROR = np.diag([1.0, 1.0, -1.0])


def _molecule(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random chiral 'molecule' (centred; no proper symmetry), species among C, N, O, H."""
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(n, 3)) * np.array([2.5, 1.4, 0.8])
    species = rng.choice([1, 6, 7, 8], size=n)
    return species.astype(np.int64), t - t.mean(0)


def _cluster(t_a: np.ndarray, t_b: np.ndarray, copy_shape: np.ndarray, seed: int) -> np.ndarray:
    """17 copies, copy i a random proper rigid motion of shape copy_shape[i] (``t_a`` or ``t_b``), well apart."""
    rng = np.random.default_rng(seed)
    R = roma.unitquat_to_rotmat(roma.random_unitquat(M, dtype=torch.float64)).numpy()
    c = rng.normal(size=(M, 3)) * 6.0
    c += 9.0 * np.stack(np.unravel_index(np.arange(M), (3, 3, 2)), -1)  # no overlaps
    shapes = np.stack([t_a, t_b])[copy_shape]
    return np.einsum("mij,mnj->mni", R, shapes) + c[:, None]


@pytest.fixture(scope="module")
def mixed():
    """A molecule and its mirror image (every third copy), and the same with a different conformer."""
    species, t = _molecule(11, 0)
    mirror = t @ MIRROR
    conf = t.copy()
    conf[:3] += np.array([0.9, -0.6, 0.7])  # a side chain turned: another conformer, same atom order
    conf -= conf.mean(0)
    cs = (np.arange(M) % 3 == 2).astype(np.int64)
    return species, t, mirror, conf, cs


def test_find_shapes_mirror_and_conformer(mixed):
    _, t, mirror, conf, cs = mixed
    for other, is_mirror in ((mirror, True), (conf, False)):
        x = _cluster(t, other, cs, seed=1)
        sh = find_shapes(x)
        assert sh.num_shapes == 2
        assert np.array_equal(sh.copy_shape, cs)  # copy 0 defines shape 0
        assert list(sh.mirror_of) == ([-1, 0] if is_mirror else [-1, -1])
        # every copy's own body places it exactly; bodies agree with their shape's template
        placed = np.einsum("mij,mnj->mni", sh.R, sh.body) + x.mean(1, keepdims=True)
        assert np.abs(placed - x).max() < 1e-10
        assert np.all(np.linalg.det(sh.R) > 0)
        assert np.abs(sh.body - sh.templates[sh.copy_shape]).max() < 1e-8
    assert find_shapes(_cluster(t, t, cs, seed=2)).num_shapes == 1


def _model(**kw) -> AssemblyNet:
    torch.manual_seed(0)
    return AssemblyNet(node_feature_dim=2, enc_layers=2, mol_layers=2, hidden_scalars=16, hidden_vectors=4,
                       hidden_l2=2, enc_scalars=16, enc_vectors=4, contact_channels=4, **kw).double()


@pytest.fixture(scope="module")
def setup(mixed):
    species, t, mirror, _, cs = mixed
    sp2, t2 = _molecule(7, 3)
    x = _cluster(t, mirror, cs, seed=4)
    sh = find_shapes(x)
    sh2 = find_shapes(_cluster(t2, t2 @ MIRROR, (np.arange(M) % 2).astype(np.int64), seed=5))
    items = [(species, sh.templates, sh.copy_shape, sh.body), (sp2, sh2.templates, sh2.copy_shape, sh2.body)]
    gen = torch.Generator().manual_seed(6)
    c = torch.randn(2, M, 3, generator=gen, dtype=torch.float64) * 5.0
    R = roma.unitquat_to_rotmat(roma.random_unitquat((2, M), dtype=torch.float64))
    k = torch.tensor([0.3, 0.8], dtype=torch.float64)
    nf = torch.randn(2, M, 2, generator=gen, dtype=torch.float64)
    return items, RigidState(c, R), k, nf


def test_per_shape_encoding_equals_per_copy_encoding(setup):
    """Encoding each distinct shape once gives the same output as encoding every copy as its own shape."""
    items, x, k, nf = setup
    model = _model()
    per_shape = collate(items, dtype=torch.float64)
    per_copy = collate([(s, b, np.arange(M), b) for s, _, _, b in items], dtype=torch.float64)
    assert per_shape.num_shapes == 4 and per_copy.num_shapes == 2 * M
    a = model(x, k, batch=per_shape, node_features=nf)
    b = model(x, k, batch=per_copy, node_features=nf)
    assert torch.allclose(a, b, atol=1e-9, rtol=0), (a - b).abs().max()
    # the shape matters: giving the mirror copies the other enantiomer's body changes the output
    wrong = collate([(s, t[:1], np.zeros(M, dtype=np.int64)) for s, t, _, _ in items], dtype=torch.float64)
    assert not torch.allclose(model(x, k, batch=wrong, node_features=nf), a, atol=1e-6)


def test_single_template_equals_one_shape(setup):
    """The old single-template input and a one-shape cluster are the same batch and the same output."""
    items, x, k, nf = setup
    model = _model()
    s, t = items[0][0], items[0][1][0]
    old = collate([(s, t)], dtype=torch.float64)
    new = collate([(s, t[None], np.zeros(M, dtype=np.int64))], dtype=torch.float64)
    x1 = RigidState(x.c[:1], x.R[:1])
    assert torch.equal(model(x1, k[:1], batch=old, node_features=nf[:1]),
                       model(x1, k[:1], batch=new, node_features=nf[:1]))


@pytest.mark.parametrize("rot_output", ["rotvec", "quat"])
def test_equivariance_with_mixed_shapes(setup, rot_output):
    items, x, k, nf = setup
    model = _model(rot_output=rot_output)
    batch = collate(items, dtype=torch.float64)
    out = model(x, k, batch=batch, node_features=nf)
    Q = roma.unitquat_to_rotmat(roma.random_unitquat(dtype=torch.float64))
    shift = torch.tensor([3.0, -7.0, 11.0], dtype=torch.float64)
    out2 = model(RigidState(x.c @ Q.T + shift, Q @ x.R), k, batch=batch, node_features=nf)
    expect = torch.cat([out[..., :3] @ Q.T, out[..., 3:] @ Q.T], dim=-1)
    assert torch.allclose(out2, expect, atol=1e-9, rtol=0)
    # permuting the copies permutes the outputs (the shape index travels with its copy)
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(3))
    p_items = [(s, t, cs[perm.numpy()], b[perm.numpy()]) for s, t, cs, b in items]
    out3 = model(RigidState(x.c[:, perm], x.R[:, perm]), k, batch=collate(p_items, dtype=torch.float64),
                 node_features=nf[:, perm])
    assert torch.allclose(out3, out[:, perm], atol=1e-9, rtol=0)
    # re-choosing one shape's body frame (t -> t Q0^T for its copies, R -> R Q0^T) changes nothing
    Q0 = roma.unitquat_to_rotmat(roma.random_unitquat(dtype=torch.float64)).numpy()
    s, t, cs, b = items[0]
    t2, b2 = t.copy(), b.copy()
    t2[1], b2[cs == 1] = t[1] @ Q0.T, b[cs == 1] @ Q0.T
    R2 = x.R.clone()
    R2[0, torch.from_numpy(cs == 1)] = R2[0, torch.from_numpy(cs == 1)] @ torch.from_numpy(Q0).T
    out4 = model(RigidState(x.c, R2), k, batch=collate([(s, t2, cs, b2), items[1]], dtype=torch.float64),
                 node_features=nf)
    assert torch.allclose(out4, out, atol=1e-9, rtol=0)


def test_prepared_mixed_cluster_is_exact(mixed):
    """prepare: per-copy bodies place every copy exactly; the symmetry-blind oracle scores PM 0 per copy."""
    from kflow_mol.task import make_batch

    species, t, _, conf, cs = mixed
    final = _cluster(t, conf, cs, seed=7)
    rec = ClusterRecord("mixed", species, final)
    prep = prepare(rec)
    assert len(prep.templates) == 2 and np.array_equal(prep.copy_shape, cs)
    batch = make_batch([prep], dtype=torch.float64)
    pos = batch.clusters.positions_padded(batch.c1, batch.R1)[0].numpy()
    assert np.abs(pos - final).max() < 1e-9
    pos0 = batch.clusters.positions_padded(batch.c0, batch.R0)[0].numpy()
    assert np.abs(pos0 - prep.initial).max() < 1e-9
    fl = oracle_floors(prep.initial, final, species, prep.copy_perms())
    assert fl["symmetry_blind_oracle"]["pm_atom_symmetry_aware"] < 1e-9


def test_closest_equivalent_per_molecule_perms():
    """Per-molecule automorphism groups: each molecule picks from its own group (identity padding is inert)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 3, generator=gen, dtype=torch.float64)
    perms = torch.tensor([[[0, 1, 2, 3], [1, 0, 2, 3]], [[0, 1, 2, 3], [0, 1, 2, 3]], [[0, 1, 2, 3], [0, 1, 3, 2]]])
    cur = x.clone()
    cur[0] = x[0][[1, 0, 2, 3]]  # molecule 0 is closer to its relabelled self
    out, idx = closest_equivalent(x, cur, perms)
    assert idx.tolist() == [1, 0, 0]
    assert torch.equal(out[0], x[0][[1, 0, 2, 3]]) and torch.equal(out[1:], x[1:])
    with pytest.raises(ValueError, match="per-molecule"):
        closest_equivalent(x, cur, perms[:2])


def test_symmetry_aware_pm_per_copy_groups():
    """A benzene-like ring (C6 proper group) beside an asymmetric shape: relabelled truths score 0."""
    ang = np.arange(6) * np.pi / 3
    ring = np.stack([1.4 * np.cos(ang), 1.4 * np.sin(ang), np.zeros(6)], -1)
    rng = np.random.default_rng(0)
    x = np.stack([ring + rng.normal(size=3) * 8 for _ in range(4)])
    cyc = np.stack([np.roll(np.arange(6), -s) for s in range(6)])
    perms = np.stack([cyc, cyc, np.tile(np.arange(6), (6, 1)), np.tile(np.arange(6), (6, 1))])
    pred = x.copy()
    pred[0] = x[0][cyc[2]]  # the same pose, labels turned: only molecule 0's group may undo it
    val, _, _ = pm_atom_symmetry_aware(pred, x, perms)
    assert val < 1e-9
    assert evaluate_cluster(pred, x, np.full(6, 6), perms)["symmetry_order"] == 6


def test_prepared_cluster_round_trips_through_the_cache_format(mixed, tmp_path):
    """PreparedCluster -> plain tensors -> file (loaded with weights_only) -> the same cluster; the central
    copy's group and every copy's group are read off the per-shape arrays."""
    from kflow.utils import atomic_save
    from kflow_mol.prepared import PreparedCluster

    species, t, _, conf, cs = mixed
    prep = prepare(ClusterRecord("mixed", species, _cluster(t, conf, cs, seed=7)))
    path = tmp_path / "c.pt"
    atomic_save({"clusters": [prep.to_tensors()]}, path)
    back = PreparedCluster.from_tensors(torch.load(path, weights_only=True)["clusters"][0])
    for f in ("species", "final", "initial", "R1", "c1", "templates", "copy_shape", "body", "shape_perms",
              "shape_symmetries", "shape_orders", "mirror_of"):
        assert np.array_equal(getattr(back, f), getattr(prep, f)), f
    assert back.id == "mixed" and back.num_atoms == len(species)
    g0 = int(prep.shape_orders[0])
    assert back.perms.shape == (g0, len(species)) and back.symmetries.shape == (g0, 3, 3)
    rots, mask = back.copy_symmetries()
    assert rots.shape[:2] == mask.shape == back.copy_perms().shape[:2] == (len(cs), prep.shape_perms.shape[1])
    assert np.array_equal(mask.sum(1), prep.shape_orders[cs])
    moved = back.replace(initial=back.initial + 1.0)
    assert np.allclose(moved.initial, prep.initial + 1.0) and np.array_equal(back.initial, prep.initial)
