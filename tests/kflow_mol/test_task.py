"""Assembly task: the loss trains, the oracle lands on the packed cluster, targets are well posed."""
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kflow.schedule import BandSchedule
from kflow_mol import so3
from kflow_mol.dataset import load_prepared, mini_dir, split_indices
from kflow_mol.evaluate import evaluate
from kflow_mol.frames import inertial_frame
from kflow_mol.rigid import RigidKPath
from kflow_mol.task import AssemblyTask, Collator, make_batch


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    src = tmp_path_factory.mktemp("cifs")
    for name in ("2000334", "2000583", "2000642", "2000724"):  # single-shape crystals (per-copy: test_shapes.py)
        shutil.copy(mini_dir() / "cifs" / f"{name}.cif", src)
    out, report = load_prepared(str(src), cache_dir=tmp_path_factory.mktemp("cache"), progress=False)
    assert report["accepted"] == len(out) >= 3
    return out


class Oracle(torch.nn.Module):
    """Returns the exact residual to the (closest-equivalent) target: a perfect network."""

    def __init__(self, task, batch):
        super().__init__()
        self.c1, self.R1 = batch.c1, task.targets(batch)
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_k, k, batch=None, node_features=None):
        return torch.cat([self.c1 - x_k.c, so3.log(self.R1 @ x_k.R.transpose(-1, -2))], -1)


PATHS = [dict(), dict(rotation="own"), dict(rotation="own", rot_source="estimate", rot_window=(0.2, 0.7)),
         dict(rot_source="estimate", kappa_scale="max"),
         dict(rotation="own", rot_source="estimate", trans_window=(0.0, 0.6), rot_window=(0.4, 1.0)),
         dict(rotation="own", rot_source="estimate", trans_source="estimate", trans_window=(0.0, 0.5),
              rot_window=(0.5, 1.0))]


@pytest.mark.parametrize("window", [1.0, 0.3])
@pytest.mark.parametrize("kw", PATHS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_oracle_assembles_exactly_and_symmetry_aware_pm_is_zero(clusters, window, kw):
    task = AssemblyTask(RigidKPath(BandSchedule(window, "smoothstep"), **kw))
    batch = make_batch(clusters, dtype=torch.float64)
    res = task.sample(Oracle(task, batch), batch, steps=7)
    c_true = batch.c1
    assert torch.allclose(res.c, c_true, atol=1e-8)
    R_true = task.targets(batch)
    assert torch.allclose(res.R, R_true, atol=1e-6)
    preds = [res.positions[b, :, :len(c.species)].numpy() for b, c in enumerate(clusters)]
    from kflow_mol.metrics import evaluate_cluster, oracle_floors

    for p, c in zip(preds, clusters):
        m = evaluate_cluster(p, c.final, c.species, c.perms)
        floor = oracle_floors(c.initial, c.final, c.species, c.perms)["symmetry_blind_oracle"]
        # crystal copies are rigid images only up to the CIF's precision, and symmetries are accepted within a
        # tolerance: the oracle is off by at most those residuals per atom, so PM (a distance RMS) by twice that
        t = c.template
        rigid = np.einsum("mij,nj->mni", c.R1, t) + c.c1[:, None]
        sym = max(np.linalg.norm(t @ S.T - t[P], axis=-1).max() for S, P in zip(c.symmetries, c.perms))
        slack = 2 * (np.linalg.norm(rigid - c.final, axis=-1).max() + sym) + 1e-6
        assert slack < 0.5
        assert m["pm_atom_symmetry_aware"] < slack
        assert m["pm_atom"] == pytest.approx(floor["pm_atom"], abs=slack)


def _assert_a_perfect_network_assembles(task, src, batch):
    """From the rotational source ``src`` of ``task``, a network giving the exact residual to the closest
    equivalent of the truth (from any state) reaches the crystal, up to each shape's symmetry."""
    from kflow_mol.rigid import rotation_error

    class Perfect(torch.nn.Module):
        def forward(self, x_k, k, batch=None, node_features=None):
            best = task.targets(replace(src, R0=x_k.R))
            return torch.cat([src.c1 - x_k.c, so3.log(best @ x_k.R.transpose(-1, -2))], -1)

    res = task.sample(Perfect(), batch, steps=7)
    assert torch.allclose(res.c, batch.c1, atol=1e-8)
    assert rotation_error(res.R, batch.R1, batch.symmetries, batch.sym_mask).max() < 1e-4


def test_shared_start_turns_copies_of_a_shape_parallel_and_the_oracle_still_assembles(clusters):
    """shared_start: one random source orientation per distinct shape, loose centroids kept; a perfect network
    still reaches the crystal (up to each shape's symmetry) from it."""
    task = AssemblyTask(RigidKPath(BandSchedule(1.0), rotation="own", rot_source="estimate"), shared_start=True)
    batch = make_batch(clusters, dtype=torch.float64)
    torch.manual_seed(0)
    src = task.source(batch)
    ms = batch.clusters.mol_shape
    same = ms[:, :, None] == ms[:, None, :]  # (B, M, M)
    diff = (src.R0[:, :, None] - src.R0[:, None]).abs().amax((-1, -2))
    assert same.sum() > ms.numel() and diff[same].max() == 0
    assert (diff[~same] > 1e-3).all() and (src.R0[0, 0] - src.R0[1, 0]).abs().max() > 1e-3  # shapes, clusters differ
    assert torch.equal(src.c0, batch.c0) and not torch.allclose(src.R0, batch.R0)
    assert AssemblyTask(task.path).source(batch) is batch  # off: the loose orientations

    _assert_a_perfect_network_assembles(task, src, batch)


def test_lattice_start_is_the_frame_of_the_loose_centroids_and_the_oracle_still_assembles(clusters):
    """lattice_start: every molecule starts on the principal-axes frame of its cluster's loose centroids, which
    turns with the cluster; a perfect network still reaches the crystal from it."""
    task = AssemblyTask(RigidKPath(BandSchedule(1.0), rotation="own", rot_source="estimate"), lattice_start=True)
    batch = make_batch(clusters, dtype=torch.float64)
    src = task.source(batch)
    assert torch.equal(src.c0, batch.c0) and (src.R0 - src.R0[:, :1]).abs().max() == 0  # one frame per cluster
    assert (src.R0[0, 0] - src.R0[1, 0]).abs().max() > 1e-3
    Q = so3.random_rotation(dtype=torch.float64)
    turned = task.source(replace(batch, c0=batch.c0 @ Q.T + 2.0))
    assert torch.allclose(turned.R0, Q @ src.R0, atol=1e-9)
    with pytest.raises(ValueError, match="choose one"):
        AssemblyTask(task.path, shared_start=True, lattice_start=True)
    # the diagnosis "packed" takes the frame of the target centroids, whatever the loose state
    packed = AssemblyTask(task.path, lattice_start="packed")
    assert torch.equal(packed.source(batch).R0[:, 0], inertial_frame(batch.c1)[0])
    assert torch.equal(packed.source(replace(batch, c0=batch.c0 + 3.0)).R0, packed.source(batch).R0)
    assert AssemblyTask(task.path, lattice_start="false").lattice_start is False
    with pytest.raises(ValueError, match="'packed'"):
        AssemblyTask(task.path, lattice_start="target")

    _assert_a_perfect_network_assembles(task, src, batch)


def test_closest_equivalent_target_never_rotates_more_than_labelled(clusters):
    task = AssemblyTask(RigidKPath(BandSchedule(0.3)))
    batch = make_batch(clusters, dtype=torch.float64)
    ang = lambda R: so3.log(R @ batch.R0.transpose(-1, -2)).norm(dim=-1)  # noqa: E731
    assert torch.all(ang(task.targets(batch)) <= ang(batch.R1) + 1e-9)
    assert torch.equal(AssemblyTask(task.path, symmetric_targets=False).targets(batch), batch.R1)


def test_on_step_rewrites_the_sampler_state_after_every_step(clusters):
    """sample(on_step=f): f sees the sourced batch and every k_next of the grid, and its state is the one the
    sampler goes on from; putting the whole state back on the true path reaches the crystal with a network that
    predicts no move at all."""
    task = AssemblyTask(RigidKPath(BandSchedule(0.3), rotation="own"), lattice_start=True)
    batch = make_batch(clusters, dtype=torch.float64)

    class Still(torch.nn.Module):
        def forward(self, x_k, k, batch=None, node_features=None):
            return torch.zeros(*x_k.c.shape[:-1], 6, dtype=x_k.c.dtype)

    seen = []

    def on_path(b, s, k_next):
        seen.append(float(k_next[0]))
        assert torch.equal(b.R0, task.source(batch).R0)
        R1 = task.targets(b)
        return task.path.sample(task._transform(b), b.c0, b.R0, b.c1, R1, k_next).s_k

    res = task.sample(Still(), batch, steps=5, on_step=on_path)
    assert seen == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert torch.allclose(res.c, batch.c1, atol=1e-8)
    assert torch.allclose(res.R, task.targets(task.source(batch)), atol=1e-8)
    free = task.sample(Still(), batch, steps=5)
    assert torch.allclose(free.c, batch.c0) and not torch.allclose(free.c, batch.c1)


def test_state_noise_moves_only_the_centroids_the_network_sees(clusters):
    """state_noise: the network is fed the path's centroids plus Gaussian noise of that size (its orientations and
    the loss's targets unchanged); 0 feeds the path sample itself."""
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, state, k, batch, node_features):
            seen.append((state.c, state.R))
            return torch.zeros(*state.c.shape[:-1], 6, dtype=state.c.dtype)

    batch = make_batch(clusters, dtype=torch.float64)
    fed = {}
    for sigma in (0.0, 0.5):
        task = AssemblyTask(RigidKPath(BandSchedule(0.3), rotation="own"), state_noise=sigma)
        torch.manual_seed(3)
        task.loss(Spy(), batch)
        torch.manual_seed(3)
        ps = task.path.sample(task._transform(batch), batch.c0, batch.R0, batch.c1, task.targets(batch),
                              torch.rand(batch.c0.shape[0], dtype=batch.c0.dtype))
        fed[sigma] = seen.pop()
        assert torch.allclose(fed[sigma][1], ps.R_k, atol=1e-12)  # orientations as on the path
    assert torch.equal(fed[0.0][0], ps.c_k)
    dev = fed[0.5][0] - ps.c_k
    assert 0.35 < dev.std() < 0.65 and dev.mean().abs() < 0.15

    # state_noise_rot: the orientations fed are the path's turned by random rotations of that size; centroids kept
    task = AssemblyTask(RigidKPath(BandSchedule(0.3), rotation="own"), state_noise_rot=0.2)
    torch.manual_seed(3)
    task.loss(Spy(), batch)
    c_fed, R_fed = seen.pop()
    assert torch.allclose(c_fed, ps.c_k, atol=1e-12)
    angle = so3.geodesic_distance(R_fed, ps.R_k)
    # |N(0, 0.2^2 I)| in 3-D has mean 0.2 * sqrt(8 / pi) = 0.32 rad
    assert 0.25 < angle.mean() < 0.39 and angle.min() > 0


def test_loss_is_atom_mse_and_trains(clusters):
    from kflow_mol.model import AssemblyNet
    from kflow_mol.rigid import NUM_NODE_FEATURES

    torch.manual_seed(0)
    task = AssemblyTask(RigidKPath(BandSchedule(0.3, "smoothstep")))
    batch = make_batch(clusters[:2])
    # the closed form of the loss equals the explicit atom-level MSE
    R1 = task.targets(batch)
    s1_hat = torch.cat([batch.c1 + 0.3, so3.log(R1 @ batch.R0.transpose(-1, -2)) * 0.9], -1)
    _, R1_hat = task.path.rigid(s1_hat, batch.R0)
    dc, rot = task.atom_error(s1_hat, batch.c1, R1_hat, R1, batch.gyration)
    cb = batch.clusters
    explicit = ((cb.positions_padded(s1_hat[..., :3], R1_hat) - cb.positions_padded(batch.c1, R1)) ** 2).sum(-1)
    n = cb.num_atoms.to(explicit.dtype)
    explicit = (explicit * cb.pad_mask[:, None]).sum(-1) / n[:, None]
    assert torch.allclose(dc + rot, explicit, rtol=1e-4, atol=1e-4)

    model = AssemblyNet(node_feature_dim=NUM_NODE_FEATURES, enc_scalars=8, enc_vectors=2, enc_layers=1,
                        hidden_scalars=16, hidden_vectors=4, hidden_l2=0, mol_layers=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        torch.manual_seed(step % 3)  # a fixed handful of k draws: the loss must fall on them
        loss, metrics = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert set(metrics) == {"rmsd_centroid", "rmsd_rotation"}


def test_lattice_loss_is_zero_for_the_true_targets_and_reaches_the_stream(clusters, monkeypatch):
    from kflow_mol.model import AssemblyNet
    from kflow_mol.rigid import NUM_NODE_FEATURES

    torch.manual_seed(0)
    model = AssemblyNet(node_feature_dim=NUM_NODE_FEATURES, enc_scalars=8, enc_vectors=2, enc_layers=1,
                        hidden_scalars=16, hidden_vectors=4, hidden_l2=2, mol_layers=1, rot_output="anchor",
                        lattice_layers=1)
    path = RigidKPath(BandSchedule(0.3, "smoothstep"), rotation="own")
    batch = make_batch(clusters[:2])
    plain = AssemblyTask(path)
    task = AssemblyTask(path, lattice_weight=0.5)
    torch.manual_seed(1)
    base, _ = plain.loss(model, batch)
    torch.manual_seed(1)
    loss, logs = task.loss(model, batch)
    assert logs["lattice_error"] > 0 and torch.allclose(loss, base + 0.5 * logs["lattice_error"], rtol=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.lattice["head"].parameters())

    # a stream that says exactly where the target's body vectors point has no lattice error
    inner = model.lattice_targets

    def perfect(*args, **kw):
        _, u = inner(*args, **kw)
        return torch.einsum("bmij,bmvj->bmvi", task.targets(batch), u), u

    monkeypatch.setattr(model, "lattice_targets", perfect)
    assert task.loss(model, batch)[1]["lattice_error"] < 1e-10


def test_collator_resamples_deterministically(clusters):
    col = Collator(resample_loose=True)
    torch.manual_seed(3)
    a = col(clusters[:2])
    torch.manual_seed(3)
    b = col(clusters[:2])
    torch.manual_seed(4)
    c = col(clusters[:2])
    assert torch.equal(a.c0, b.c0) and not torch.equal(a.c0, c.c0)
    # the packed state never changes
    assert torch.equal(a.c1, c.c1)


def test_split_is_seeded_and_disjoint():
    s = split_indices(50, 42)
    assert len(s["train"]) == 40 and len(s["val"]) == 5 and len(s["test"]) == 5
    assert not set(s["train"]) & set(s["test"])
    assert np.array_equal(split_indices(50, 42)["test"], s["test"])
    assert not np.array_equal(split_indices(50, 0)["test"], s["test"])


def test_evaluate_reports_floors_without_model(clusters):
    res = evaluate(None, None, clusters[:2])
    assert res["do_nothing"]["pm_atom"] > res["symmetry_blind_oracle"]["pm_atom"] >= 0
    assert res["undo_mean_expansion"]["pm_center"] > 1.0


def test_load_prepared_min_packing_rejects_loose_cells(tmp_path):
    """A folder dataset applies the builder's packing check when asked: COD 2001925's cell holds fewer
    molecules than a close-packed crystal needs, so it is rejected as ``loose_packing``; without the check it
    is cut as before (the file is kept in the tests' data: cod17-mini no longer ships it)."""
    src = tmp_path / "cifs"
    src.mkdir()
    shutil.copy(Path(__file__).parent / "data" / "2001925.cif", src)
    shutil.copy(mini_dir() / "cifs" / "2000334.cif", src)
    plain, rep0 = load_prepared(str(src), cache_dir=tmp_path / "c0", progress=False)
    assert rep0["accepted"] == 2 and not rep0["rejected"]
    kept, rep = load_prepared(str(src), cache_dir=tmp_path / "c1", progress=False, min_packing=0.5)
    assert [c.id for c in kept] == ["2000334"]
    assert [(r["id"], r["reason"]) for r in rep["rejected"]] == [("2001925", "loose_packing")]


def test_packing_targets_train_towards_the_equivalent_packing_closest_to_the_source(clusters):
    """packing_targets: among the packings equivalent under the centroid set's symmetries, the loss and the path
    use the one whose orientations are closest to the rotational source; off, or with one packing, the labelled."""
    batch = make_batch(clusters, dtype=torch.float64, with_packings=True)
    B, P, M = batch.packings_R1.shape[:3]
    assert torch.equal(batch.packings_R1[:, 0], batch.R1) and batch.packings_mask[:, 0].all()
    task = AssemblyTask(RigidKPath(BandSchedule(1.0)), packing_targets=True)
    # a second packing per cluster: the labelled one turned by 90 degrees about z (centroids kept)
    Z = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    two = replace(batch, packings_c1=batch.c1[:, None].repeat(1, 2, 1, 1),
                  packings_R1=torch.stack([batch.R1, Z @ batch.R1], 1),
                  packings_mask=torch.ones(B, 2, dtype=torch.bool))
    assert torch.equal(task.align(replace(two, R0=batch.R1)).R1, batch.R1)
    assert torch.equal(task.align(replace(two, R0=Z @ batch.R1)).R1, Z @ batch.R1)
    masked = replace(two, R0=Z @ batch.R1, packings_mask=torch.tensor([[True, False]] * B))
    assert torch.equal(task.align(masked).R1, batch.R1)  # padding is never chosen
    assert AssemblyTask(task.path).align(two) is two  # off: the labelled target
    with pytest.raises(ValueError, match="with_packings"):
        task.align(make_batch(clusters, dtype=torch.float64))
    # the loss asks for the aligned packing: a network predicting it exactly has loss 0, the labelled loss not
    src = replace(two, R0=Z @ batch.R1)
    oracle = Oracle(task, task.align(src))
    torch.manual_seed(0)
    assert task.loss(oracle, src)[0] < 1e-8
    assert AssemblyTask(task.path).loss(oracle, src)[0] > 1.0
