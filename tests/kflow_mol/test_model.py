"""Symmetry and consistency tests of the assembly network and its batch structure (float64 where exact)."""
from __future__ import annotations

import pytest
import roma
import torch

from kflow.testing import assert_equivariant_permutation, assert_equivariant_rotation
from kflow_mol.batch import RigidState, collate
from kflow_mol.model import AssemblyNet

M = 17
# these tensors are tiny: intra-op threads only add synchronisation (badly so on a loaded machine)
pytestmark = pytest.mark.usefixtures("one_thread")


def _template(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random elongated 'molecule' (centred), species among H, C, N, O."""
    t = torch.randn(n, 3, generator=gen, dtype=torch.float64) * torch.tensor([2.5, 1.2, 0.4], dtype=torch.float64)
    species = torch.tensor([1, 6, 7, 8])[torch.randint(0, 4, (n,), generator=gen)]
    return species, t - t.mean(0)


def _state(B: int, gen: torch.Generator, spread: float = 5.0) -> RigidState:
    """Centroids close enough that many molecule pairs are in contact."""
    c = torch.randn(B, M, 3, generator=gen, dtype=torch.float64) * spread
    R = roma.unitquat_to_rotmat(roma.random_unitquat((B, M), dtype=torch.float64))
    return RigidState(c, R)


_MODELS: dict = {}


def _model(F: int = 2, **kw) -> AssemblyNet:
    """Small model in float64, built once per configuration (e3nn compiles its tensor products on build)."""
    key = (F, tuple(sorted(kw.items())))
    if key not in _MODELS:
        _MODELS[key] = _build(F, **kw)
    return _MODELS[key]


def _build(F: int = 2, **kw) -> AssemblyNet:
    torch.manual_seed(0)
    kw = {"enc_layers": 2, "mol_layers": 2, "hidden_scalars": 16, "hidden_vectors": 4, "hidden_l2": 2,
          "enc_scalars": 16, "enc_vectors": 4, "contact_channels": 4, **kw}
    return AssemblyNet(node_feature_dim=F, **kw).double()


@pytest.fixture(scope="module")
def setup():
    gen = torch.Generator().manual_seed(1)
    items = [_template(12, gen), _template(7, gen)]
    batch = collate(items, dtype=torch.float64)
    x = _state(2, gen)
    k = torch.tensor([0.3, 0.8], dtype=torch.float64)
    nf = torch.randn(2, M, 2, generator=gen, dtype=torch.float64)
    return items, batch, x, k, nf


def test_collate_layout_and_positions(setup):
    items, batch, x, _, _ = setup
    assert batch.num_clusters == 2 and batch.num_atoms.tolist() == [12, 7]
    assert batch.atom_mol.shape == (M * 19,) and batch.atom_template.shape == (M * 19,)
    pos = batch.positions(x.c, x.R)
    # flat layout = cluster, molecule, atom; compare with a direct loop
    off = 0
    for b, (_, t) in enumerate(items):
        for i in range(M):
            ref = t @ x.R[b, i].T + x.c[b, i]
            assert torch.allclose(pos[off: off + len(t)], ref, atol=1e-12)
            assert (batch.atom_mol[off: off + len(t)] == b * M + i).all()
            off += len(t)
    padded = batch.positions_padded(x.c, x.R)
    for b, (_, t) in enumerate(items):
        assert torch.allclose(padded[b, :, : len(t)], pos[batch.atom_mol // M == b].reshape(M, len(t), 3))
    moved = batch.to("cpu", torch.float32)
    assert moved.template.dtype == torch.float32 and moved.atom_mol.dtype == torch.long


def test_collate_rejects_bad_input():
    with pytest.raises(ValueError, match="not centred"):
        collate([(torch.tensor([6, 6]), torch.tensor([[0.0, 0, 0], [1.0, 0, 0]]))])
    with pytest.raises(ValueError, match="template"):
        collate([(torch.tensor([6, 6, 1]), torch.zeros(2, 3))])
    with pytest.raises(ValueError, match="empty"):
        collate([])


@pytest.mark.parametrize("rot_output,self_interaction,lattice_layers,turns",
                         [("rotvec", False, 0, False), ("quat", False, 0, False), ("matrix", False, 0, False),
                          ("matrix", True, 0, False), ("anchor", True, 0, False), ("anchor", True, 1, False),
                          ("anchor", True, 0, True), ("rotvec", False, 0, True)])
def test_rotation_translation_equivariance(setup, rot_output, self_interaction, lattice_layers, turns):
    _, batch, x, k, nf = setup
    model = _model(rot_output=rot_output, self_interaction=self_interaction, lattice_layers=lattice_layers,
                   neighbour_turns=turns)
    out = model(x, k, batch=batch, node_features=nf)
    assert out.shape == (2, M, 6) and torch.isfinite(out).all()
    shift = torch.tensor([3.0, -7.0, 11.0], dtype=torch.float64)
    out_shifted = model(RigidState(x.c + shift, x.R), k, batch=batch, node_features=nf)
    assert torch.allclose(out_shifted, out, atol=1e-9, rtol=0), (out_shifted - out).abs().max()

    def fn(frames):  # (B, M, 4, 3): the centroid and the rows of R^T, which rotate as points do
        state = RigidState(frames[..., 0, :], frames[..., 1:, :].transpose(-1, -2))
        return model(state, k, batch=batch, node_features=nf).reshape(2, M, 2, 3)

    # The lattice stream's anchor sum is nearly rank one at initialisation (its vectors start almost parallel), so
    # the Procrustes SVD amplifies float64 round-off to ~1e-8 (measured 6e-9); a broken equivariance gives ~0.1.
    atol = 1e-7 if lattice_layers else 1e-9
    assert_equivariant_rotation(fn, torch.cat([x.c[..., None, :], x.R.transpose(-1, -2)], dim=-2), atol=atol)
    Q = roma.unitquat_to_rotmat(roma.random_unitquat(dtype=torch.float64))
    # the output is not trivially zero / invariant
    assert (out[..., :3] @ Q.T - out[..., :3]).abs().max() > 1e-3


@pytest.mark.parametrize("rot_output,lattice_layers,turns",
                         [("rotvec", 0, False), ("anchor", 0, False), ("anchor", 1, False), ("anchor", 0, True)])
def test_body_frame_choice_does_not_matter(setup, rot_output, lattice_layers, turns):
    """The network sees atom positions only (and turns between copies of one shape, whose frames move
    together): t -> Q0 t with R -> R Q0^T gives the same output."""
    items, batch, x, k, nf = setup
    model = _model(rot_output=rot_output, lattice_layers=lattice_layers, neighbour_turns=turns)
    Q0 = roma.unitquat_to_rotmat(roma.random_unitquat(dtype=torch.float64))
    batch2 = collate([(s, t @ Q0.T) for s, t in items], dtype=torch.float64)
    out = model(x, k, batch=batch, node_features=nf)
    out2 = model(RigidState(x.c, x.R @ Q0.T), k, batch=batch2, node_features=nf)
    # float64 round-off of t @ Q0^T, amplified by the network: ~1e-9 on outputs of size ~1 (a frame-dependent
    # network is off by ~0.1)
    assert torch.allclose(out, out2, atol=1e-8, rtol=0), (out - out2).abs().max()


def test_permutation_equivariance(setup):
    _, batch, x, k, nf = setup
    model = _model()

    def fn(packed):  # (B, M, 3 + 9 + F): centroid, rotation, node features of each molecule
        state = RigidState(packed[..., :3], packed[..., 3:12].reshape(*packed.shape[:2], 3, 3))
        return model(state, k, batch=batch, node_features=packed[..., 12:])

    torch.manual_seed(3)
    packed = torch.cat([x.c, x.R.flatten(-2), nf], dim=-1)
    assert_equivariant_permutation(fn, packed, dim=1, atol=1e-10)


def test_template_cache_matches(setup):
    _, batch, x, k, nf = setup
    model = _model()
    cache = model.encode_templates(batch)
    a = model(x, k, batch=batch, node_features=nf)
    b = model(x, k, batch=batch, node_features=nf, template_cache=cache)
    assert torch.equal(a, b)


def test_batch_equals_single(setup):
    items, batch, x, k, nf = setup
    model = _model()
    out = model(x, k, batch=batch, node_features=nf)
    for b in range(2):
        single = collate([items[b]], dtype=torch.float64)
        xb = RigidState(x.c[b: b + 1], x.R[b: b + 1])
        ob = model(xb, k[b: b + 1], batch=single, node_features=nf[b: b + 1])
        assert torch.allclose(ob, out[b: b + 1], atol=1e-10, rtol=0)


def test_far_apart_molecules_have_no_contacts(setup):
    """Contact pruning is exact: spreading molecules beyond the cutoff changes nothing discontinuously,
    and the contact features vanish (the output still depends on the k input and the geometry)."""
    _, batch, x, k, nf = setup
    model = _model()
    far = RigidState(x.c * 50.0, x.R)
    out = model(far, k, batch=batch, node_features=nf)
    assert torch.isfinite(out).all()
    out_k = model(far, k.flip(0), batch=batch, node_features=nf)
    assert not torch.allclose(out, out_k)


def test_gradients_flow(setup):
    _, batch, x, k, nf = setup
    model = _model()
    model.zero_grad()
    c = x.c.clone().requires_grad_(True)
    out = model(RigidState(c, x.R), k, batch=batch, node_features=nf)
    out.square().sum().backward()
    assert torch.isfinite(c.grad).all() and c.grad.abs().sum() > 0
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not dead, dead


def test_bad_shapes_raise(setup):
    _, batch, x, k, nf = setup
    model = _model()
    with pytest.raises(ValueError, match="node_features"):
        model(x, k, batch=batch, node_features=nf[..., :1])
    with pytest.raises(ValueError, match="c \\(B,17,3\\)"):
        model(RigidState(x.c[:1], x.R[:1]), k[:1], batch=batch, node_features=nf[:1])


def test_overfits_one_cluster():
    """A small float32 model fits fixed targets on one cluster (the loss drops by 5x)."""
    gen = torch.Generator().manual_seed(5)
    species, t = _template(8, gen)
    batch = collate([(species, t)], dtype=torch.float32)
    x = _state(1, gen).to(dtype=torch.float32)
    target = torch.randn(1, M, 6, generator=gen)
    target[..., :3] *= 5.0
    k = torch.tensor([0.5])
    torch.manual_seed(0)
    model = AssemblyNet(node_feature_dim=0, enc_layers=1, mol_layers=2, hidden_scalars=16, hidden_vectors=4,
                        hidden_l2=2, enc_scalars=8, enc_vectors=2, contact_channels=2)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(40):
        loss = (model(x, k, batch=batch) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


def test_ema_copy_keeps_state_dict_keys():
    """Deep copies of e3nn's compiled tensor products gain buffers; the trainer's EMA must not expose them."""
    import copy

    from kflow.train import EMA
    from kflow_mol.model import AssemblyNet

    model = AssemblyNet(node_feature_dim=2, enc_scalars=8, enc_vectors=2, enc_layers=1, hidden_scalars=8,
                        hidden_vectors=2, hidden_l2=2, mol_layers=1)
    assert set(copy.deepcopy(model).state_dict()) != set(model.state_dict())  # the quirk this guards against
    ema = EMA(model, 0.9)
    assert set(ema.state_dict()["model"]) == set(model.state_dict())
    ema.module.load_state_dict(model.state_dict())
    ema.update(model)
    fresh = AssemblyNet(node_feature_dim=2, enc_scalars=8, enc_vectors=2, enc_layers=1, hidden_scalars=8,
                        hidden_vectors=2, hidden_l2=2, mol_layers=1)
    fresh.load_state_dict(ema.state_dict()["model"])


def test_lattice_stream_ignores_orientations(setup, monkeypatch):
    """The lattice stream's targets ``v_j`` depend on the centroids only (not on any orientation, nor on the
    contacts the orientations make), and they do reach the output."""
    _, batch, x, k, nf = setup
    model = _model(rot_output="anchor", self_interaction=True, lattice_layers=1)
    seen = []
    inner = model._lattice_vectors
    monkeypatch.setattr(model, "_lattice_vectors", lambda *a: seen.append(inner(*a)) or seen[-1])
    torch.manual_seed(5)
    R2 = roma.unitquat_to_rotmat(roma.random_unitquat(x.R.shape[:2], dtype=torch.float64))
    out1 = model(x, k, batch=batch, node_features=nf)
    out2 = model(RigidState(x.c, R2), k, batch=batch, node_features=nf)
    assert torch.equal(seen[0], seen[1]) and seen[0].abs().max() > 1e-3
    with torch.no_grad():
        for p in model.lattice["head"].parameters():
            p.mul_(2.0)
    try:
        assert (model(x, k, batch=batch, node_features=nf) - out1)[..., 3:].abs().max() > 1e-6
    finally:
        with torch.no_grad():
            for p in model.lattice["head"].parameters():
                p.mul_(0.5)
    assert (out1 - out2).abs().max() > 1e-3  # the rest of the network does see the orientations


def test_lattice_stream_needs_anchor():
    with pytest.raises(ValueError, match="lattice_layers"):
        _build(rot_output="matrix", lattice_layers=1)


def test_neighbour_turns_are_the_relative_rotations_of_copies_of_one_shape(setup):
    """R_j R_i^T - I in e3nn's 0e + 1e + 2e basis, back to the matrix exactly; zero across shapes; identity
    turns (parallel copies) give zero."""
    _, batch, x, _, _ = setup
    model = _model(rot_output="anchor", neighbour_turns=True)
    turn = model._neighbour_turns(x.R, batch)
    assert turn.shape == (2, M, M, 9)
    back = torch.einsum("...i,ijk->...jk", turn, model.cart)
    want = x.R[:, None] @ x.R[:, :, None].transpose(-1, -2) - torch.eye(3, dtype=torch.float64)
    assert torch.allclose(back, want, atol=1e-12)
    # the trace part is the 0e coefficient: (tr - 3) / sqrt(3)
    assert torch.allclose(turn[..., 0], (want.diagonal(dim1=-2, dim2=-1).sum(-1)) / 3 ** 0.5, atol=1e-12)
    parallel = RigidState(x.c, x.R[:, :1].expand_as(x.R).contiguous())
    assert model._neighbour_turns(parallel.R, batch).abs().max() < 1e-12
    two = collate([(s, torch.stack([t, t[torch.randperm(len(t))]]), torch.arange(M) % 2)
                   for s, t in [_template(5, torch.Generator().manual_seed(2))] * 2], dtype=torch.float64)
    other = model._neighbour_turns(x.R, two)
    shape = two.mol_shape
    assert (other[shape[:, :, None] != shape[:, None, :]] == 0).all()
    assert (other[shape[:, :, None] == shape[:, None, :]].abs().amax(-1) > 0).sum() > M
