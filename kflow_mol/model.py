"""SE(3)- and permutation-equivariant assembly network for clusters of 17 rigid molecules.

``AssemblyNet(x_k, k, batch=..., node_features=..., template_cache=None) -> (B, 17, 6)``: per molecule two
lab-frame vectors ``[dc, omega]`` = the predicted residual from the current rigid state to the endpoint
(``c_1 - c_k`` in Å and the rotation vector ``Log(R_1 R_k^T)``).

Three stages, each placed where its inputs change:

1. **Template encoder** (once per distinct shape of a cluster, not per copy nor per step; cache it with
   :meth:`AssemblyNet.encode_templates`): e3nn equivariant convolutions on the intramolecular radius graph
   of each body-frame shape template (most clusters have one; a molecule beside its mirror image or Z' > 1
   conformers have several, see :mod:`kflow_mol.shapes`). Gives per-atom invariant scalars ``s_a`` (shared by
   the copies of a shape) and pooled body-frame ``1o``/``1e`` vectors, which copy ``i`` rotates into the lab
   frame with its ``R_i``; each copy's atoms sit at its own body coordinates.
2. **Contacts at the current state**: atom-atom distances between different molecules (dense per molecule
   pair, only for pairs whose bounding spheres come within the cutoff - the others have no contact by the
   triangle inequality, so the pruning is exact). Aggregated per directed pair ``(i, j)`` *through the
   template atoms*: which atoms of ``i`` touch ``j`` at which distance (invariant ``sum_a rbf(d_a) s_a``),
   contact vectors, lever arms, torques and quadrupoles weighted by ``s_a``. Learned multipoles
   ``sum_a s_a Y_l(x_a - c_i)`` (l = 1, 2) give each copy's orientation in the lab frame: l = 2 is needed
   because the l = 1 moments of a centrosymmetric / D2 molecule (acenes) vanish.
3. **Molecule-level message passing**, all-to-all over the 17 molecules (no cutoff: loose states are tens
   of Å wide), as dense ``(B, 17, 17)`` edge tensors: e3nn ``uvu`` tensor products of neighbour features with
   spherical harmonics of ``c_j - c_i`` (weights from an MLP of centroid distance, contact invariants, the
   two endpoint scalars), plus gated linear maps of the equivariant contact features, then a ``Gate``.

Symmetry: only differences of positions enter, so the output is translation invariant; every vector is
built from lab-frame positions or rotated by ``R_i`` so the output is rotation equivariant
(``c -> Q c + t, R -> Q R`` gives ``out -> Q out``); molecules are treated identically and aggregated by sums,
so the output is permutation equivariant. The network depends on the atom positions only: re-choosing a
template's body frame (``t -> Q0 t, R -> R Q0^T``) leaves the output unchanged. Parity is tracked (``dc`` is
``1o``, the rotation vector ``omega`` a pseudovector ``1e``; torques come from ``1o x 1o -> 1e``) but only
proper rotations act on rigid states, so only rotation equivariance is tested.

Vectors are Cartesian ``(x, y, z)`` outside this module; they are mapped to e3nn's l = 1 component order on
the way in (``_TO_E3NN``) and back on the way out (``_FROM_E3NN``); in e3nn 0.6 both are the identity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import roma
import torch
import torch.nn.functional as F
from e3nn import o3
from e3nn.io import CartesianTensor
from e3nn.nn import FullyConnectedNet, Gate, NormActivation
from torch import nn
from torch_geometric.utils import scatter

from .batch import ClusterBatch, RigidState

__all__ = ["AssemblyNet", "TemplateCache", "TemplateEncoder"]

def _l1_basis() -> list[int]:
    """Component order of e3nn's l = 1 basis in Cartesian terms (``(x, y, z)`` in e3nn 0.6, ``(y, z, x)``
    in older releases): read off the l = 1 spherical harmonics of the unit vectors."""
    sh = o3.spherical_harmonics(1, torch.eye(3), normalize=False)
    return sh.abs().argmax(0).tolist()  # component m of e3nn's l=1 is Cartesian axis [m]


_TO_E3NN = _l1_basis()
_FROM_E3NN = [_TO_E3NN.index(i) for i in range(3)]


def _to_e3nn(v: torch.Tensor) -> torch.Tensor:
    return v[..., _TO_E3NN]


def _envelope(u: torch.Tensor) -> torch.Tensor:
    """Polynomial cutoff (p = 6, DimeNet): 1 at 0, 0 with two vanishing derivatives at u >= 1."""
    u = u.clamp(0.0, 1.0)
    u6 = u**6
    return 1.0 - 28.0 * u6 + 48.0 * u6 * u - 21.0 * u6 * u * u


def _gaussians(d: torch.Tensor, start: float, stop: float, num: int) -> torch.Tensor:
    """Gaussian radial basis ``(..., num)``."""
    mu = torch.linspace(start, stop, num, dtype=d.dtype, device=d.device)
    gamma = 1.0 / (mu[1] - mu[0]) ** 2 if num > 1 else 1.0
    return torch.exp(-0.5 * gamma * (d[..., None] - mu) ** 2)


def _bessel(d: torch.Tensor, cutoff: float, num: int) -> torch.Tensor:
    """Bessel basis ``sin(n pi d / rc) / d`` times the envelope, ``(..., num)``."""
    n = torch.arange(1, num + 1, dtype=d.dtype, device=d.device)
    d = d[..., None].clamp_min(1e-6)
    return math.sqrt(2.0 / cutoff) * torch.sin(n * math.pi * d / cutoff) / d * _envelope(d / cutoff)


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    layers.append(nn.Linear(dims[-2], dims[-1]))
    return nn.Sequential(*layers)


def _uvu_tp(irreps_in: o3.Irreps, irreps_sh: o3.Irreps, irreps_keep: o3.Irreps) -> o3.TensorProduct:
    """Depthwise (``uvu``) tensor product with external per-edge weights, keeping the output irreps that
    occur in ``irreps_keep`` (NequIP-style convolution)."""
    keep = {ir for _, ir in irreps_keep}
    mid, instr = [], []
    for i, (mul, ir_in) in enumerate(irreps_in):
        for j, (_, ir_sh) in enumerate(irreps_sh):
            for ir in ir_in * ir_sh:
                if ir in keep:
                    instr.append((i, j, len(mid), "uvu", True))
                    mid.append((mul, ir))
    return o3.TensorProduct(
        irreps_in, irreps_sh, o3.Irreps(mid), instr, shared_weights=False, internal_weights=False
    )


def _gate(irreps_out: o3.Irreps) -> Gate:
    """Gate producing ``irreps_out``: SiLU on scalars, sigmoid gates on the other irreps."""
    scalars = o3.Irreps([(m, ir) for m, ir in irreps_out if ir.l == 0])
    gated = o3.Irreps([(m, ir) for m, ir in irreps_out if ir.l > 0])
    gates = o3.Irreps(f"{gated.num_irreps}x0e") if gated.num_irreps else o3.Irreps("")
    return Gate(scalars, [F.silu] * len(scalars), gates, [torch.sigmoid] * len(gates), gated)


def _channel_index(irreps: o3.Irreps) -> torch.Tensor:
    """Index ``(irreps.dim,)`` mapping each component to its channel (for per-channel scalar gates)."""
    idx, ch = [], 0
    for mul, ir in irreps:
        for _ in range(mul):
            idx += [ch] * ir.dim
            ch += 1
    return torch.tensor(idx, dtype=torch.long)


class _Conv(nn.Module):
    """Point convolution on a sparse graph: ``uvu`` TP with SH of the edge, radial MLP weights, Gate."""

    def __init__(self, irreps_in, irreps_out, irreps_sh, num_radial: int, avg_neighbors: float):
        super().__init__()
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        self.tp = _uvu_tp(self.irreps_in, o3.Irreps(irreps_sh), self.irreps_out)
        self.radial = FullyConnectedNet([num_radial, 32, self.tp.weight_numel], act=F.silu)
        self.gate = _gate(self.irreps_out)
        self.lin = o3.Linear(self.tp.irreps_out, self.gate.irreps_in)
        self.self_lin = o3.Linear(self.irreps_in, self.gate.irreps_in)
        self.norm = 1.0 / math.sqrt(avg_neighbors)
        self.residual = self.irreps_in == self.gate.irreps_out

    def forward(self, h, src, dst, sh, radial):
        msg = self.tp(h[src], sh, self.radial(radial))
        agg = scatter(msg, dst, dim=0, dim_size=h.shape[0], reduce="sum") * self.norm
        out = self.gate(self.lin(agg) + self.self_lin(h))
        return out + h if self.residual else out


@dataclass
class TemplateCache:
    """Template-encoder output, valid for every copy and every step of the same clusters.

    Attributes:
        atom_scalars: ``(A_t, S)`` invariant per-atom features (rows of every distinct shape's template).
        pooled_scalars: ``(S_shapes, S)`` per-shape invariants.
        pooled_vectors: ``(S_shapes, V, 3)`` body-frame Cartesian vectors (``V/2`` of type 1o then ``V/2`` 1e).
    """

    atom_scalars: torch.Tensor
    pooled_scalars: torch.Tensor
    pooled_vectors: torch.Tensor

    def to(self, device=None, dtype=None) -> TemplateCache:
        return TemplateCache(*(t.to(device=device, dtype=dtype) for t in
                               (self.atom_scalars, self.pooled_scalars, self.pooled_vectors)))


class TemplateEncoder(nn.Module):
    """e3nn convolutions on the intramolecular radius graph of each body-frame template.

    Args:
        num_species: size of the atomic-number embedding.
        scalars: scalar channels (``0e``).
        vectors: ``1o`` and ``1e`` channels each.
        layers: number of convolutions.
        cutoff: radius graph cutoff (Å).
        num_radial: Bessel functions.
    """

    def __init__(self, num_species=120, scalars=32, vectors=8, layers=3, cutoff=4.5, num_radial=8):
        super().__init__()
        if scalars <= 0 or vectors <= 0 or layers <= 0:
            raise ValueError("TemplateEncoder needs scalars, vectors and layers > 0")
        self.cutoff, self.num_radial, self.vectors = cutoff, num_radial, vectors
        self.embed = nn.Embedding(num_species, scalars)
        self.irreps_sh = o3.Irreps.spherical_harmonics(2)
        hidden = o3.Irreps(f"{scalars}x0e+{vectors}x1o+{vectors}x1e")
        # Input: species embedding + the atom's (scaled) position relative to the centroid.
        irreps_in = o3.Irreps(f"{scalars}x0e+1x1o")
        self.convs = nn.ModuleList(
            [_Conv(irreps_in if i == 0 else hidden, hidden, self.irreps_sh, num_radial, 12.0)
             for i in range(layers)]
        )
        self.scalars = scalars

    def forward(self, batch: ClusterBatch) -> TemplateCache:
        """Encode the templates of ``batch``: one pass per distinct shape of each cluster (one for most
        clusters; e.g. two for a molecule and its mirror image), shared by the copies of that shape."""
        t = batch.template.to(self.embed.weight.dtype)
        with torch.no_grad():
            tp = batch.shape_template_padded.to(t.dtype)
            mask = batch.shape_pad_mask
            d = torch.cdist(tp, tp)
            ok = mask[:, :, None] & mask[:, None, :] & (d < self.cutoff)
            ok &= ~torch.eye(batch.n_max, dtype=torch.bool, device=d.device)
            b, a_dst, a_src = ok.nonzero(as_tuple=True)
            dst, src = batch.shape_pad_index[b, a_dst], batch.shape_pad_index[b, a_src]
        vec = t[src] - t[dst]
        dist = vec.norm(dim=-1)
        sh = o3.spherical_harmonics(self.irreps_sh, vec, normalize=True, normalization="component")
        radial = _bessel(dist, self.cutoff, self.num_radial)
        h = torch.cat([self.embed(batch.species), _to_e3nn(t) / 5.0], dim=-1)
        for conv in self.convs:
            h = conv(h, src, dst, sh, radial)
        S, V = self.scalars, self.vectors
        atom_scalars = h[:, :S]
        vecs = h[:, S:].reshape(-1, 2 * V, 3)[..., _FROM_E3NN]  # 1o block then 1e block, Cartesian
        S_shapes = batch.num_shapes
        pooled_s = scatter(atom_scalars, batch.template_shape, dim=0, dim_size=S_shapes, reduce="mean")
        pooled_v = scatter(vecs, batch.template_shape, dim=0, dim_size=S_shapes, reduce="mean")
        return TemplateCache(atom_scalars, pooled_s, pooled_v)


class _MolLayer(nn.Module):
    """All-to-all equivariant message passing over the molecules of each cluster (dense edges).

    The tensor product runs on a narrow projection ``irreps_msg`` of the node features (its cost is per
    edge), equivariant edge features enter through per-edge, per-channel scalar gates (a linear map after
    the sum over neighbours is the same as before it, so it is applied once per node), and one
    ``o3.Linear`` mixes [TP messages, edge-feature messages, self] into the Gate input.
    """

    def __init__(self, irreps_h: o3.Irreps, irreps_msg: o3.Irreps, irreps_sh: o3.Irreps, irreps_ev: o3.Irreps,
                 edge_dim: int, n_scalars: int, self_tp: bool = False):
        super().__init__()
        self.n_scalars = n_scalars
        self.pre = o3.Linear(irreps_h, irreps_msg)
        self.tp = _uvu_tp(irreps_msg, irreps_sh, irreps_h)
        self.weights = _mlp([edge_dim + 2 * n_scalars, 64, self.tp.weight_numel])
        self.ev_gate = _mlp([edge_dim, 64, irreps_ev.num_irreps])
        self.register_buffer("channel", _channel_index(irreps_ev), persistent=False)
        self.gate = _gate(irreps_h)
        irreps_agg = self.tp.irreps_out + irreps_ev
        lin_in = irreps_agg + irreps_h
        self.self_tp = None
        if self_tp:
            # Node x environment product: messages only ever multiply a *neighbour's* features with an edge
            # direction, so without it a molecule's own orientation meets the lattice around it only by a
            # round trip through its neighbours (two layers deep). A turn towards a target set by the
            # packing is exactly such a product (own frame x environment frame).
            # Both factors are squashed to norm <= 1 per irrep (tanh of the norm): an unbounded product of two
            # learned features blew up training on single batches (loss 1e4-1e7 at steps 220-420, measured).
            def squashed(irreps_in):
                return nn.Sequential(o3.Linear(irreps_in, irreps_msg), NormActivation(irreps_msg, torch.tanh))

            self.self_x, self.self_env = squashed(irreps_h), squashed(irreps_agg)
            self.self_tp = o3.FullyConnectedTensorProduct(irreps_msg, irreps_msg, irreps_msg)
            lin_in = lin_in + irreps_msg
        self.lin = o3.Linear(lin_in, self.gate.irreps_in)

    def forward(self, h, sh, z, ev, offdiag):
        """h ``(B, M, D)``; sh ``(B, M, M, 9)``; z ``(B, M, M, E)``; ev ``(B, M, M, D_ev)``;
        offdiag ``(M, M, 1)`` float mask. Edge ``(i, j)`` carries the message from ``j`` to ``i``."""
        B, M, _ = h.shape
        s = h[..., : self.n_scalars]
        zz = torch.cat([z, s[:, :, None].expand(B, M, M, -1), s[:, None].expand(B, M, M, -1)], dim=-1)
        w = self.weights(zz) * offdiag  # zero weights on i == j: the TP output vanishes there
        hj = self.pre(h)
        hj = hj[:, None].expand(B, M, M, hj.shape[-1])
        msg = self.tp(hj.reshape(B * M * M, -1), sh.reshape(B * M * M, -1), w.reshape(B * M * M, -1))
        emsg = ev * (self.ev_gate(z) * offdiag)[..., self.channel]
        # Sum over the M - 1 other molecules; 1/4 ~ 1/sqrt(16) keeps the scale of the sum.
        agg = torch.cat([msg.reshape(B, M, M, -1).sum(2), emsg.sum(2)], dim=-1) * 0.25
        parts = [agg, h]
        if self.self_tp is not None:
            parts.append(self.self_tp(self.self_x(h), self.self_env(agg)))
        return h + self.gate(self.lin(torch.cat(parts, dim=-1)))


class AssemblyNet(nn.Module):
    """Equivariant endpoint-residual network for rigid molecular assembly.

    Args:
        node_feature_dim: ``F``, invariant per-molecule features passed as ``node_features (B, 17, F)``.
        num_species: atomic-number embedding size.
        enc_scalars, enc_vectors, enc_layers, template_cutoff: template encoder (see
            :class:`TemplateEncoder`).
        hidden_scalars, hidden_vectors, hidden_l2: molecule-level irreps
            ``{s}x0e + {v}x1o + {v}x1e + {l2}x2e``.
        mol_layers: molecule-level message-passing layers.
        msg_scalars, msg_vectors: width of the projection the per-edge tensor product runs on
            (``{s}x0e + {v}x1o + {v}x1e + min(v, l2)x2e``): the main cost knob of the molecule level.
        contact_cutoff: atom-atom contact cutoff between molecules (Å).
        contact_channels: ``S``, template-atom channels the contact features are resolved into.
        contact_rbf: radial functions of per-atom contact distances.
        softmin_tau: temperature of the soft-min contact distance (Å).
        pos_scale: length unit of centroid vectors and of the ``dc`` output (Å).
        length_unit: length unit of lever arms and contact vectors (Å).
        rot_output: ``rotvec`` (the head's ``1e`` vector is the rotation vector), ``quat`` (a ``0e`` scalar
            ``w`` and the ``1e`` vector ``v`` form the quaternion ``(1 + w, v)``, normalised: a 180° turn is
            ``w = -1`` rather than a vector of length exactly pi) or ``matrix`` (``0e + 1e + 2e`` give a 3x3
            lab-frame matrix ``I + A``, projected onto SO(3) by special Procrustes: the relative turn is a
            *linear* function of the features, any angle equally easy; needs ``hidden_l2 > 0``)
            or ``anchor`` (``matrix`` plus ``sum_j v_j (R u_j)^T``: the head also predicts where each pooled body
            vector ``u_j`` of the shape should point in the lab, an absolute target independent of the current
            ``R``; the turn is the rotation that best takes the current vectors there).
        self_interaction: add a node x environment tensor product to every molecule-level layer (see
            :class:`_MolLayer`).
        lattice_layers: ``> 0`` adds the *lattice stream* (needs ``rot_output="anchor"``): molecule-level layers
            that see the centroids, the shapes' invariants and ``k`` but no orientation, no contact and no node
            feature (those describe the loose state's graph), and predict where each pooled body vector should
            point (``v_j``, added to the anchor sum). The target orientation of a packed molecule is a function of the lattice around it;
            the current orientations are noise until the molecules are nearly in place, and fed together they
            keep the network from learning that function even on one training cluster (measured:
            ``benchmarks/mol_orientation_probe.py``, ``BENCHMARKS.md``).
        neighbour_turns: add, on every edge between copies of the same shape, how far ``j`` is turned from
            ``i``: ``R_j R_i^T - I`` as ``0e`` (an edge scalar) ``+ 1e + 2e`` (equivariant edge features). With
            the ``matrix``/``anchor`` head, copying a neighbour's orientation is then a linear map (the turn
            ``I + A`` with ``A`` a weighted sum of these); from the other features it is a product of two
            frames, which the network did not learn from contacts (``benchmarks/mol_loo_probe.py``).
    """

    def __init__(
        self,
        node_feature_dim: int = 0,
        num_species: int = 120,
        enc_scalars: int = 32,
        enc_vectors: int = 8,
        enc_layers: int = 3,
        template_cutoff: float = 4.5,
        hidden_scalars: int = 64,
        hidden_vectors: int = 16,
        hidden_l2: int = 8,
        mol_layers: int = 3,
        msg_scalars: int = 16,
        msg_vectors: int = 8,
        contact_cutoff: float = 6.0,
        contact_channels: int = 8,
        contact_rbf: int = 8,
        softmin_tau: float = 0.5,
        pos_scale: float = 10.0,
        length_unit: float = 5.0,
        rot_output: str = "rotvec",
        self_interaction: bool = False,
        lattice_layers: int = 0,
        neighbour_turns: bool = False,
    ):
        super().__init__()
        if rot_output not in ("rotvec", "quat", "matrix", "anchor"):
            raise ValueError(f"rot_output must be 'rotvec', 'quat', 'matrix' or 'anchor', got '{rot_output}'")
        if rot_output in ("matrix", "anchor") and hidden_l2 <= 0:
            raise ValueError(f"rot_output='{rot_output}' needs hidden_l2 > 0 (the symmetric part of the turn is 2e)")
        if lattice_layers < 0 or (lattice_layers and rot_output != "anchor"):
            raise ValueError(f"lattice_layers must be >= 0 and needs rot_output='anchor', got {lattice_layers} "
                             f"with rot_output='{rot_output}'")
        self.rot_output = rot_output
        self.node_feature_dim = node_feature_dim
        self.rc, self.tau, self.K = contact_cutoff, softmin_tau, contact_rbf
        # The soft-min works on squared distances; this temperature gives it a sharpness of ~tau (Å) at a
        # typical contact distance of 3.5 Å.
        self.tau2 = 2 * 3.5 * softmin_tau
        self.pos_scale, self.length_unit = pos_scale, length_unit
        self.encoder = TemplateEncoder(num_species, enc_scalars, enc_vectors, enc_layers, template_cutoff)
        S = contact_channels
        self.S1 = S + 1  # + a constant channel: plain (not atom-resolved) sums
        self.contact_proj = nn.Linear(enc_scalars, S)
        self.multipole_proj = nn.Linear(enc_scalars, S)
        self.k_freq = nn.Parameter(torch.logspace(0, 2, 16) * 2 * math.pi, requires_grad=False)
        self.k_mlp = _mlp([32, 32, 32])

        if hidden_scalars <= 0 or hidden_vectors <= 0:
            raise ValueError("AssemblyNet needs hidden_scalars > 0 and hidden_vectors > 0 (the outputs are l=1)")
        self.irreps_h = o3.Irreps(
            [(m, ir) for m, ir in [(hidden_scalars, "0e"), (hidden_vectors, "1o"), (hidden_vectors, "1e"),
                                   (hidden_l2, "2e")] if m > 0]
        )
        self.irreps_sh = o3.Irreps.spherical_harmonics(2)
        # Node inputs: pooled body vectors (rotated), learned dipoles/quadrupoles, position in the cluster.
        self.irreps_node_vec = o3.Irreps(f"{enc_vectors}x1o+{enc_vectors}x1e+{S}x1o+{S}x2e+1x1o")
        self.node_scalar_in = _mlp([enc_scalars + 32 + node_feature_dim + 1, 64, hidden_scalars])
        self.node_vec_in = o3.Linear(self.irreps_node_vec, o3.Irreps([(m, ir) for m, ir in self.irreps_h if ir.l > 0]))
        # Edge equivariant features, per side (i's atoms w.r.t. j, then j's w.r.t. i), + c_j - c_i.
        S1 = self.S1
        self.neighbour_turns = neighbour_turns
        turns = "+1x1e+1x2e" if neighbour_turns else ""
        self.irreps_ev = o3.Irreps(f"{2 * S1}x1o+{S1}x1e+{S1}x2e+{2 * S1}x1o+{S1}x1e+{S1}x2e+1x1o{turns}")
        contact_scalar_dim = 1 + contact_rbf + contact_rbf * S1
        self.num_centroid_rbf = 24
        self.edge_mlp = _mlp([self.num_centroid_rbf + 2 * contact_scalar_dim + int(neighbour_turns), 64, 64])
        # Equivariant edge features are embedded once (a linear map), then gated per layer.
        self.irreps_evh = o3.Irreps(f"{hidden_vectors}x1o+{hidden_vectors}x1e+{max(hidden_l2, 4)}x2e")
        self.ev_embed = o3.Linear(self.irreps_ev, self.irreps_evh)
        self.irreps_msg = o3.Irreps(
            [(m, ir) for m, ir in [(msg_scalars, "0e"), (msg_vectors, "1o"), (msg_vectors, "1e"),
                                   (min(msg_vectors, hidden_l2), "2e")] if m > 0]
        )
        self.layers = nn.ModuleList(
            [_MolLayer(self.irreps_h, self.irreps_msg, self.irreps_sh, self.irreps_evh, 64, hidden_scalars,
                       self_interaction) for _ in range(mol_layers)]
        )
        self.lattice = None
        if lattice_layers:
            # Orientation-free inputs only: invariants, the position in the cluster (1o) and centroid edges.
            vec_h = o3.Irreps([(m, ir) for m, ir in self.irreps_h if ir.l > 0])
            self.lattice = nn.ModuleDict({
                # no node features: they describe the loose state's graph, redrawn noise to this stream
                "scalar_in": _mlp([enc_scalars + 32 + 1, 64, hidden_scalars]),
                "vec_in": o3.Linear(o3.Irreps("1x1o"), vec_h),
                "edge": _mlp([self.num_centroid_rbf, 64, 64]),
                "ev": o3.Linear(o3.Irreps("1x1o"), self.irreps_evh),
                "layers": nn.ModuleList(
                    [_MolLayer(self.irreps_h, self.irreps_msg, self.irreps_sh, self.irreps_evh, 64, hidden_scalars,
                               self_interaction) for _ in range(lattice_layers)]),
                "head": o3.Linear(self.irreps_h, o3.Irreps(f"{enc_vectors}x1o+{enc_vectors}x1e")),
            })
        head = {"rotvec": "1x1o+1x1e", "quat": "1x1o+1x1e+1x0e", "matrix": "1x1o+1x0e+1x1e+1x2e",
                "anchor": f"1x1o+1x0e+1x1e+1x2e+{enc_vectors}x1o+{enc_vectors}x1e"}[rot_output]
        self.head = o3.Linear(self.irreps_h, o3.Irreps(head))
        if rot_output in ("matrix", "anchor") or neighbour_turns:
            # (9, 3, 3) change of basis 0e+1e+2e -> Cartesian 3x3, and back (9, 9); buffers outside the state dict
            self.register_buffer("cart", CartesianTensor("ij").to_cartesian(torch.eye(9)), persistent=False)
            cart64 = CartesianTensor("ij").to_cartesian(torch.eye(9, dtype=torch.float64))
            self.register_buffer("cart_inv", torch.linalg.pinv(cart64.reshape(9, 9)), persistent=False)

    # ------------------------------------------------------------------ stages
    def encode_templates(self, batch: ClusterBatch) -> TemplateCache:
        """Run the template encoder once for ``batch``; pass the result as ``template_cache`` to reuse it."""
        return self.encoder(batch)

    def _k_embedding(self, k: torch.Tensor) -> torch.Tensor:
        arg = k[:, None] * self.k_freq.to(k.dtype)
        return self.k_mlp(torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1))

    def _contacts(self, xp, c, batch: ClusterBatch, s_pad, radius):
        """Directed pair contact features.

        Args:
            xp: ``(B, M, n, 3)`` padded positions; c: ``(B, M, 3)``; s_pad: ``(B, M, n, S1)`` atom channels of
                every copy (zero in padded slots); radius: ``(B, M)`` bounding radius of every copy.

        Returns:
            ``scal (B, M, M, Fs)`` and ``vec (B, M, M, D)`` (e3nn layout ``2S1x1o+S1x1e+S1x2e``) for the
            atoms of ``i`` w.r.t. ``j`` at ``[b, i, j]``; zero for pairs out of contact range.
        """
        B, M, n, _ = xp.shape
        rc, L = self.rc, self.length_unit
        S1, K = self.S1, self.K
        Fs = 1 + K + K * S1
        Dv = 3 * 2 * S1 + 3 * S1 + 5 * S1
        with torch.no_grad():
            # Exact pruning (triangle inequality): atoms of i and j can only come within rc if some atom of
            # j is within r_i + rc of c_i and vice versa. near[b, i, j] = min_b |x_b(j) - c_i|.
            dist = torch.cdist(c, xp.reshape(B, M * n, 3)).reshape(B, M, M, n)
            near = dist.masked_fill(~batch.pad_mask[:, None, None, :], float("inf")).amin(-1)
            reach = (radius + rc)[:, :, None]  # r_i + rc at [b, i, j]
            keep = (near < reach) & (near.transpose(1, 2) < reach.transpose(1, 2))
            keep &= torch.ones(M, M, dtype=torch.bool, device=c.device).triu(1)
            bi, ii, jj = keep.nonzero(as_tuple=True)
        scal = xp.new_zeros(B, M, M, Fs)
        vec = xp.new_zeros(B, M, M, Dv)
        if bi.numel() == 0:
            return scal, vec
        ci, cj = c[bi, ii], c[bi, jj]
        # Positions relative to c_i (small numbers: exact translation invariance, good float32 precision).
        xi = xp[bi, ii] - ci[:, None]
        xj = xp[bi, jj] - ci[:, None]
        mask = batch.pad_mask[bi].to(xp.dtype)
        m = mask[:, :, None] * mask[:, None, :]
        d2 = (xi * xi).sum(-1)[:, :, None] + (xj * xj).sum(-1)[:, None, :] - 2 * xi @ xj.transpose(1, 2)
        # Contact weight (1 - d^2/rc^2)^3: smooth (C^2) at rc, exactly 0 beyond and on padded slots; working
        # on d^2 avoids a sqrt and a high power on the largest tensor of the model.
        w = (1.0 - d2 * (1.0 / rc**2)).clamp_min(0.0)
        w = w * w * w * m
        q = w * torch.exp((rc**2 - d2) / self.tau2)  # soft-min weights (on d^2), relative to rc
        ones_i, ones_j = torch.ones_like(xi[..., :1]), torch.ones_like(xj[..., :1])
        wx = w @ torch.cat([xj, ones_j], -1)  # (P, n, 4): sum_b w x_b and the contact count of a
        wtx = w.transpose(1, 2) @ torch.cat([xi, ones_i], -1)
        n_i, n_j = wx[..., 3], wtx[..., 3]
        v_i = (wx[..., :3] - n_i[..., None] * xi) / L
        v_j = (wtx[..., :3] - n_j[..., None] * xj) / L
        lev_i = xi / L
        lev_j = (xp[bi, jj] - cj[:, None]) / L
        side_i = self._side(n_i, q.sum(2), v_i, lev_i, s_pad[bi, ii])
        side_j = self._side(n_j, q.sum(1), v_j, lev_j, s_pad[bi, jj])
        scal = scal.index_put((bi, ii, jj), side_i[0]).index_put((bi, jj, ii), side_j[0])
        vec = vec.index_put((bi, ii, jj), side_i[1]).index_put((bi, jj, ii), side_j[1])
        return scal, vec

    def _side(self, n_a, p_a, v_a, lev, s):
        """Reduce one side of a pair block to pair features.

        Args:
            n_a: ``(P, n)`` contact counts per atom; p_a: ``(P, n)`` soft-min sums (on squared distances); v_a: ``(P, n, 3)``
            contact vectors (towards the other molecule); lev: ``(P, n, 3)`` lever arms; s: ``(P, n, S1)``.
        """
        rc, tau2 = self.rc, self.tau2
        # soft-min distance: <= rc, == rc without contacts (so e_a vanishes there)
        dsoft = (rc**2 - tau2 * torch.log1p(p_a)).clamp_min(0.01).sqrt()
        e_a = _gaussians(dsoft, 1.0, rc, self.K) * _envelope(dsoft / rc)[..., None]  # (P, n, K)
        count = n_a.sum(1)
        dpair = (rc**2 - tau2 * torch.log1p(p_a.sum(1))).clamp_min(0.01).sqrt()
        e_pair = _gaussians(dpair, 1.0, rc, self.K) * _envelope(dpair / rc)[..., None]
        which = torch.einsum("pak,pas->pks", e_a, s).flatten(1)
        scal = torch.cat([torch.log1p(count)[:, None], e_pair, which], dim=-1)
        norm = 1.0 / (1.0 + count)[:, None, None]
        ns = n_a[..., None] * s  # (P, n, S1)
        cv = torch.einsum("pax,pas->psx", v_a, s) * norm
        arm = torch.einsum("pax,pas->psx", lev, ns) * norm
        torque = torch.einsum("pax,pas->psx", torch.cross(lev, v_a, dim=-1), s) * norm
        y2 = o3.spherical_harmonics(2, lev, normalize=False, normalization="component")
        quad = torch.einsum("pay,pas->psy", y2, ns) * norm
        P = s.shape[0]
        vec = torch.cat(
            [_to_e3nn(torch.cat([cv, arm], 1)).reshape(P, -1), _to_e3nn(torque).reshape(P, -1),
             quad.reshape(P, -1)], dim=-1)
        return scal, vec

    def _invariants(self, c, k, batch: ClusterBatch, node_features, cache: TemplateCache):
        """Orientation-free node inputs: scalars ``(B, M, .)`` and the position in the cluster ``rel (B, M, 3)``;
        ``node_features=None`` leaves them out."""
        B, M = c.shape[:2]
        rel = (c - c.mean(1, keepdim=True)) / self.pos_scale
        parts = [cache.pooled_scalars[batch.mol_shape], self._k_embedding(k)[:, None].expand(B, M, -1)]
        if node_features is not None and self.node_feature_dim:
            parts.append(node_features.to(c.dtype))
        parts.append(rel.norm(dim=-1, keepdim=True))
        return torch.cat(parts, -1), rel

    def _centroid_edges(self, c):
        """Dense centroid edges: ``c_j - c_i`` at ``[b, i, j]``, their spherical harmonics, radial basis and the
        off-diagonal mask ``(M, M, 1)``."""
        M = c.shape[1]
        cij = c[:, None, :, :] - c[:, :, None, :]
        eye = torch.eye(M, dtype=torch.bool, device=c.device)
        # Diagonal entries are masked out of every sum; give them a harmless direction (no NaN in SH).
        safe = torch.where(eye[..., None], torch.ones_like(cij), cij)
        sh = o3.spherical_harmonics(self.irreps_sh, safe, normalize=True, normalization="component")
        rbf = _gaussians(cij.norm(dim=-1), 0.0, 60.0, self.num_centroid_rbf)
        return cij, sh, rbf, (~eye).to(c.dtype)[..., None]

    def _lattice_vectors(self, scal_in, rel, cij, sh, rbf, offdiag) -> torch.Tensor:
        """The lattice stream's absolute targets ``v_j`` of the body vectors, ``(B, M, V, 3)`` Cartesian."""
        lat = self.lattice
        h = torch.cat([lat["scalar_in"](scal_in), lat["vec_in"](_to_e3nn(rel))], dim=-1)
        z, ev = lat["edge"](rbf), lat["ev"](_to_e3nn(cij) / self.pos_scale)
        for layer in lat["layers"]:
            h = layer(h, sh, z, ev, offdiag)
        B, M = h.shape[:2]
        return lat["head"](h).reshape(B, M, -1, 3)[..., _FROM_E3NN]

    def _neighbour_turns(self, R: torch.Tensor, batch: ClusterBatch) -> torch.Tensor:
        """``R_j R_i^T - I`` at ``[b, i, j]`` as ``0e + 1e + 2e`` coefficients ``(B, M, M, 9)`` (e3nn order), zero
        between copies of different shapes (their body frames are unrelated)."""
        turn = R[:, None] @ R[:, :, None].transpose(-1, -2) - torch.eye(3, dtype=R.dtype, device=R.device)
        same = batch.mol_shape[:, :, None] == batch.mol_shape[:, None, :]
        return (turn.flatten(-2) @ self.cart_inv.to(R.dtype)) * same[..., None].to(R.dtype)

    @staticmethod
    def _unit_rms(u: torch.Tensor) -> torch.Tensor:
        """Vectors ``(..., V, 3)`` scaled to unit rms length over ``V`` (floored: vanishing ones stay ~0)."""
        return u / u.pow(2).sum(-1).mean(-1).add(1e-4).sqrt()[..., None, None]

    def lattice_targets(self, x_k: RigidState, k: torch.Tensor, batch: ClusterBatch,
                        node_features: torch.Tensor | None = None,
                        template_cache: TemplateCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The lattice stream alone (``lattice_layers > 0``): where it says each body vector should point.

        Returns:
            ``v (B, M, V, 3)`` lab-frame predictions and ``u (B, M, V, 3)`` the shape's pooled body vectors at
            unit rms (body frame): for a target orientation ``R1`` the ideal answer is ``v = R1 u``
            (``AssemblyTask(lattice_weight=...)`` trains it so directly).
        """
        if self.lattice is None:
            raise ValueError("lattice_targets needs a model built with lattice_layers > 0")
        cache = self._check_inputs(x_k, k, batch, node_features, template_cache)
        scal_in, rel = self._invariants(x_k.c, k, batch, None, cache)
        v = self._lattice_vectors(scal_in, rel, *self._centroid_edges(x_k.c))
        return v, self._unit_rms(cache.pooled_vectors[batch.mol_shape])

    def _check_inputs(self, x_k, k, batch, node_features, template_cache) -> TemplateCache:
        """Shape checks of a call; the template cache (encoded now if not given)."""
        c, R = x_k.c, x_k.R
        B, M = c.shape[:2]
        batch._check_state(c, R)
        if k.shape != (B,):
            raise ValueError(f"k must have shape ({B},), got {tuple(k.shape)}")
        if self.node_feature_dim:
            if node_features is None or tuple(node_features.shape) != (B, M, self.node_feature_dim):
                got = None if node_features is None else tuple(node_features.shape)
                raise ValueError(f"node_features must have shape ({B}, {M}, {self.node_feature_dim}), got {got}")
        cache = template_cache if template_cache is not None else self.encoder(batch)
        if cache.pooled_scalars.shape[0] != batch.num_shapes:
            raise ValueError("template_cache was built for a different batch")
        return cache

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x_k: RigidState,
        k: torch.Tensor,
        batch: ClusterBatch,
        node_features: torch.Tensor | None = None,
        template_cache: TemplateCache | None = None,
    ) -> torch.Tensor:
        """Predict the residual to the endpoint.

        Args:
            x_k: current rigid state, ``c (B, 17, 3)``, ``R (B, 17, 3, 3)``.
            k: ``(B,)`` flow time.
            batch: the clusters' templates.
            node_features: ``(B, 17, F)`` invariant per-molecule features (``F = node_feature_dim``).
            template_cache: output of :meth:`encode_templates` for the same ``batch`` (skips the encoder).

        Returns:
            ``(B, 17, 6)``: ``[dc (Å), omega (rad)]`` in the lab frame.
        """
        c, R = x_k.c, x_k.R
        B, M = c.shape[:2]
        cache = self._check_inputs(x_k, k, batch, node_features, template_cache)

        # Per-atom template channels of each copy's shape (encoded once per shape), padded (B, M, n, .)
        valid = batch.pad_mask[:, None, :, None].to(c.dtype)
        ones = torch.ones_like(cache.atom_scalars[:, :1])
        s_c = torch.cat([self.contact_proj(cache.atom_scalars), ones], -1)[batch.copy_pad_index] * valid
        s_m = self.multipole_proj(cache.atom_scalars)[batch.copy_pad_index] * valid
        n_atoms = batch.num_atoms.to(c.dtype)[:, None, None, None]

        xp = batch.positions_padded(c, R)  # (B, M, n, 3)
        lev = (xp - c[:, :, None]) / self.length_unit
        with torch.no_grad():
            radius = (batch.body_padded.norm(dim=-1) * batch.pad_mask[:, None]).amax(2).to(c.dtype)  # (B, M)

        # ---- node inputs
        scal_in, rel = self._invariants(c, k, batch, node_features, cache)  # orientation-free
        y1 = torch.einsum("bmnx,bmns->bmsx", lev, s_m) / n_atoms
        y2 = torch.einsum("bmny,bmns->bmsy",
                          o3.spherical_harmonics(2, lev, normalize=False, normalization="component"),
                          s_m) / n_atoms
        body = torch.einsum("bmij,bmvj->bmvi", R, cache.pooled_vectors[batch.mol_shape])  # rotate body -> lab
        nvec = torch.cat([_to_e3nn(body).flatten(2), _to_e3nn(y1).flatten(2), y2.flatten(2),
                          _to_e3nn(rel)], dim=-1)
        h = torch.cat([self.node_scalar_in(scal_in), self.node_vec_in(nvec)], dim=-1)

        # ---- edges (dense, i receives from j)
        cs, cv = self._contacts(xp, c, batch, s_c, radius)
        cij, sh, rbf, offdiag = self._centroid_edges(c)  # c_j - c_i at [b, i, j]
        z_in, ev_in = [rbf, cs, cs.transpose(1, 2)], [cv, cv.transpose(1, 2), _to_e3nn(cij) / self.pos_scale]
        if self.neighbour_turns:
            turn = self._neighbour_turns(R, batch)
            z_in.append(turn[..., :1])
            ev_in.append(turn[..., 1:])
        z = self.edge_mlp(torch.cat(z_in, dim=-1))
        ev = self.ev_embed(torch.cat(ev_in, dim=-1))
        for layer in self.layers:
            h = layer(h, sh, z, ev, offdiag)
        out = self.head(h)  # (B, M, .): 1o (dc), then the rot_output irreps, e3nn order
        dc = out[..., 0:3][..., _FROM_E3NN] * self.pos_scale
        if self.rot_output in ("matrix", "anchor"):  # 0e + 1e + 2e -> 3x3 -> nearest rotation
            A = torch.einsum("...i,ijk->...jk", out[..., 3:12], self.cart.to(out.dtype))
            A = A + torch.eye(3, dtype=A.dtype, device=A.device)
            if self.rot_output == "anchor":
                # Absolute target frame: the head says where the shape's body vectors u_j should point in the
                # lab (v_j); sum_j v_j (R_k u_j)^T is the (unnormalised) turn taking the current vectors onto
                # them. The network then predicts an orientation set by the packing, which does not depend on
                # the random current R_k, instead of composing it with R_k^T itself. Symmetric shapes whose
                # pooled vectors vanish (D2h acenes) fall back on the relative term I + A.
                v = out[..., 12:].reshape(B, M, -1, 3)[..., _FROM_E3NN]
                if self.lattice is not None:
                    lat_in = self._invariants(c, k, batch, None, cache)
                    v = v + self._lattice_vectors(*lat_in, cij, sh, rbf, offdiag)
                    # Body vectors at unit rms: the encoder's pooled vectors start at ~0.1, so the absolute term
                    # began ~10x weaker than the identity and training sat on "no turn" for ~100 steps before
                    # it took over (measured on one cluster).
                    body = self._unit_rms(body)
                A = A + torch.einsum("bmvi,bmvj->bmij", v, body)
            omega = roma.rotmat_to_rotvec(roma.special_procrustes(A))
        else:
            omega = out[..., 3:6][..., _FROM_E3NN]
            if self.rot_output == "quat":  # roma's quaternions are (x, y, z, w)
                q = torch.cat([omega, 1.0 + out[..., 6:7]], dim=-1)
                omega = roma.unitquat_to_rotvec(q / q.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        return torch.cat([dc, omega], dim=-1)
