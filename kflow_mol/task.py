"""The assembly task: batches of prepared clusters, the training loss and the sampler (both domains share
the core path and solver; this module only adds the rigid-body plumbing)."""
from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor, nn

from kflow.schedule import make_grid
from kflow.solver import Solution, SolverConfig

from . import so3
from .batch import ClusterBatch, RigidState, collate
from .frames import inertial_frame
from .noise import LooseConfig, make_loose
from .prepared import PreparedCluster
from .rigid import RigidKPath, closest_equivalent_rotation


@dataclass
class AssemblyBatch:
    """``B`` prepared clusters.

    Attributes:
        clusters: templates and index maps (:class:`kflow_mol.batch.ClusterBatch`).
        c0, R0: ``(B, M, 3)``, ``(B, M, 3, 3)`` loose state. c1, R1: packed state with the *labelled*
            orientation (the symmetry-equivalent closest to ``R0`` is chosen by the task).
        symmetries: ``(B, M, G, 3, 3)`` body-frame symmetry rotations of every copy's shape (identity-padded),
            sym_mask ``(B, M, G)``.
        gyration: ``(B, M, 3, 3)`` ``mean_a t_a t_a^T`` of each copy's body (turns rotation errors into Å²).
        ids: cluster ids.
        packings_c1, packings_R1: ``(B, P, M, 3)``, ``(B, P, M, 3, 3)`` the packings equivalent to the labelled
            one under the symmetries of its centroid set (:meth:`PreparedCluster.equivalent_packings`; the
            labelled packing first, identity-padded), packings_mask ``(B, P)`` the real ones.
    """

    clusters: ClusterBatch
    c0: Tensor
    R0: Tensor
    c1: Tensor
    R1: Tensor
    symmetries: Tensor
    sym_mask: Tensor
    gyration: Tensor
    ids: list
    packings_c1: Tensor | None = None
    packings_R1: Tensor | None = None
    packings_mask: Tensor | None = None

    def to(self, device=None, dtype=None) -> AssemblyBatch:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (Tensor, ClusterBatch)):
                v = v.to(device=device, dtype=dtype if (not isinstance(v, Tensor) or v.is_floating_point()) else None)
            out[f.name] = v
        return AssemblyBatch(**out)


def make_batch(items: list[PreparedCluster], initial: list[np.ndarray] | None = None,
               dtype=torch.float32, with_packings: bool = False) -> AssemblyBatch:
    """Collate prepared clusters; ``initial`` overrides their loose states; ``with_packings`` adds the
    equivalent packings (training targets with ``AssemblyTask(packing_targets=True)``)."""
    cb = collate([(it.species, it.templates, it.copy_shape, it.body) for it in items], dtype=dtype)
    initial = initial if initial is not None else [it.initial for it in items]
    M = cb.num_mols
    syms = [it.copy_symmetries() for it in items]  # (M, G_b, 3, 3) and real-group mask (M, G_b) each
    g = max(s.shape[1] for s, _ in syms)
    sym = torch.eye(3, dtype=torch.float64).repeat(len(items), M, g, 1, 1)
    mask = torch.zeros(len(items), M, g, dtype=torch.bool)
    c0, R0, gyr = [], [], []
    for b, (it, ini) in enumerate(zip(items, initial)):
        sym[b, :, :syms[b][0].shape[1]] = torch.from_numpy(syms[b][0])
        mask[b, :, :syms[b][1].shape[1]] = torch.from_numpy(syms[b][1])
        ini = torch.from_numpy(np.asarray(ini, dtype=np.float64))
        t = torch.from_numpy(np.ascontiguousarray(it.body, dtype=np.float64))  # each copy's own body
        c0.append(ini.mean(1))
        R0.append(so3.kabsch(t, ini))
        gyr.append(torch.einsum("mna,mnb->mab", t, t) / t.shape[1])
    gyr = torch.stack(gyr)
    stack = lambda key: torch.from_numpy(np.stack([getattr(it, key) for it in items]))  # noqa: E731
    c1, R1 = stack("c1"), stack("R1")
    packings = [it.equivalent_packings() for it in items] if with_packings else None
    pc = pR = pm = None
    if packings is not None:
        P = max(len(c) for c, _ in packings)
        pc, pR = c1[:, None].repeat(1, P, 1, 1), R1[:, None].repeat(1, P, 1, 1, 1)
        pm = torch.zeros(len(items), P, dtype=torch.bool)
        for b, (c, R) in enumerate(packings):
            pc[b, :len(c)], pR[b, :len(c)], pm[b, :len(c)] = torch.from_numpy(c), torch.from_numpy(R), True
        pc, pR = pc.to(dtype), pR.to(dtype)
    return AssemblyBatch(cb, torch.stack(c0).to(dtype), torch.stack(R0).to(dtype), c1.to(dtype), R1.to(dtype),
                         sym.to(dtype), mask, gyr.to(dtype), [it.id for it in items], pc, pR, pm)


class Collator:
    """DataLoader collate: optionally draws a fresh loose state per cluster with the noise model.

    Drawing from the global RNGs keeps training resumable: the trainer reseeds them before every batch.
    """

    def __init__(self, resample_loose: bool = True, noise_cfg=None, with_packings: bool = False):
        self.resample_loose, self.noise_cfg, self.with_packings = resample_loose, noise_cfg, with_packings

    def __call__(self, items: list[PreparedCluster]) -> AssemblyBatch:
        initial = None
        if self.resample_loose:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            rng = np.random.default_rng(seed)
            initial = [make_loose(it.final, rng, self.noise_cfg or LooseConfig()) for it in items]
        return make_batch(items, initial, with_packings=self.with_packings)


@dataclass
class Assembly(Solution):
    """What :meth:`AssemblyTask.sample` returns: a :class:`kflow.solver.Solution` (the task protocol's one
    result type) whose state is the atoms, plus the rigid poses and the wall time.

    Attributes:
        x_1: ``(B, M, n_max, 3)`` assembled atom positions (padded; also :attr:`positions`).
        trajectory: ``(steps + 1, B, M, n_max, 3)`` positions at every grid point when requested, else ``None``.
        grid: the k-grid used, ``(steps + 1,)``.
        evaluations: model calls (``steps``).
        c: ``(B, M, 3)`` centroids. R: ``(B, M, 3, 3)`` orientations.
        seconds: wall time of the sampling.
    """

    c: Tensor
    R: Tensor
    seconds: float

    @property
    def positions(self) -> Tensor:
        return self.x_1


class AssemblyTask:
    """Loss and sampler of K-Flow assembly.

    Args:
        path: the rigid K-path (spectral graph transform + schedule).
        symmetric_targets: use the symmetry-equivalent target orientation closest to the loose one (the
            labelled one is a coin toss for symmetric molecules).
        rot_weight: weight of the rotational part of the atom-level loss.
        rot_late_weight: weight the rotational loss by ``1 / (1 - min(mu_r, 0.9))^2`` (``rotation="own"``;
            with the re-estimated rotation source an endpoint error at ``mu_r`` becomes a velocity error
            ``1 / (1 - mu_r)`` times larger, so late errors matter most; FrameFlow's weighting).
        shared_start: the rotational source is one uniform random orientation per distinct shape of each
            cluster instead of the loose orientations: copies of a shape start parallel. The loose
            orientations carry no information (the noise model draws them uniformly), and in a crystal most
            copies of a shape are parallel (translation-related; ``benchmarks/mol_orientation_classes.py``),
            so the network makes one collective turn per shape instead of 17 independent ones.
        lattice_start: the rotational source of every molecule is the principal-axes frame of the cluster's
            loose centroids (:func:`kflow_mol.frames.inertial_frame`, equivariant): each molecule starts with
            its inertial axes on the cluster's axes, so the start is a function of the arrangement, not noise. The network then
            learns one deterministic turn per molecule instead of undoing a random one (fed random current
            orientations it does not learn where a packed molecule points even on one training cluster;
            fed a fixed one it does, ``benchmarks/mol_orientation_probe.py``). The default since session 6
            (three seeds against a one-change control, ``BENCHMARKS.md``). Its limit: 91 % of real clusters
            are nearly centrosymmetric, so the frame's axis signs are set by the noise, not the crystal
            (``benchmarks/mol_frame_stability.py``): the start is one of four frames, not one.
            ``"packed"`` is a diagnosis, never for real assembly: the frame of the *target* centroids (a
            noise-free start, to measure what a stable frame would give).
        lattice_weight: ``> 0`` (a model with a lattice stream, ``lattice_layers > 0``): add this times the
            squared error of the stream's absolute targets, ``|v_j - R1 u_j|^2`` averaged over the body vectors,
            to the loss. A direct, noise-free regression of where each body vector points in the packed
            cluster: through the turn alone the stream learns it slowly (it starts on "no turn").
        state_noise: standard deviation (Å, per coordinate) of Gaussian noise added to the path's centroids
            before the network sees them in training (the targets stay exact). The sampler visits centroids
            off the training path (about 1 Å on training clusters, 2 Å held out); without this the
            orientations predicted there are lost: on 8 memorised clusters sampled orientations end 47° off,
            12° with the centroids teacher-forced on the true path (``BENCHMARKS.md``, session 7).
        state_noise_rot: the same for orientations: each current orientation the network sees in training is
            turned by ``Exp(state_noise_rot * eps)``, ``eps ~ N(0, I)`` (radians); the target stays exact. On
            the path the current orientations are partial turns towards the *true* targets, so they (and the
            turns between neighbours, ``model.neighbour_turns``) leak the answer; the sampler's own partial
            turns do not (``BENCHMARKS.md``, session 10).
        packing_targets: train towards the equivalent packing (:meth:`PreparedCluster.equivalent_packings`:
            the labelled one moved by a symmetry of its centroid set) closest to the rotational source, summed
            over the copies' atom-level rotation errors. The loose state cannot tell these packings apart, so
            the labelled target is a coin toss the network can only average; the closest one is a function
            of the input (the OT-style alignment of equivariant flow matching). Needs batches built with
            ``with_packings=True`` (the trainer's collator does so when this is set).
    """

    def __init__(self, path: RigidKPath, symmetric_targets: bool = True, rot_weight: float = 1.0,
                 rot_late_weight: bool = False, shared_start: bool = False, lattice_weight: float = 0.0,
                 lattice_start: bool | str = False, state_noise: float = 0.0, packing_targets: bool = False,
                 state_noise_rot: float = 0.0):
        lattice_start = {"false": False, "true": True, "loose": True}.get(str(lattice_start).lower(), lattice_start)
        if lattice_start not in (False, True, "packed"):
            raise ValueError(f"lattice_start must be true, false or 'packed' (diagnosis), got {lattice_start!r}")
        if shared_start and lattice_start:
            raise ValueError("shared_start and lattice_start are two different rotational sources: choose one")
        self.lattice_start, self.state_noise, self.packing_targets = lattice_start, float(state_noise), packing_targets
        self.state_noise_rot = float(state_noise_rot)
        self.path, self.symmetric_targets, self.rot_weight = path, symmetric_targets, rot_weight
        self.rot_late_weight, self.shared_start, self.lattice_weight = rot_late_weight, shared_start, lattice_weight

    def source(self, batch: AssemblyBatch) -> AssemblyBatch:
        """``batch`` with its rotational source: unchanged, with ``lattice_start`` every molecule on the frame of
        the loose centroids, or with ``shared_start`` every copy of a shape turned to one random orientation
        (global RNG, which the trainer reseeds per batch). The loose centroids are kept."""
        if self.lattice_start:
            F = inertial_frame(batch.c1 if self.lattice_start == "packed" else batch.c0)[0][:, None].expand_as(batch.R0)
            return replace(batch, R0=F.contiguous())
        if not self.shared_start:
            return batch
        G = so3.random_rotation(batch.clusters.num_shapes, dtype=batch.R0.dtype, device=batch.R0.device)
        return replace(batch, R0=G[batch.clusters.mol_shape])

    def align(self, batch: AssemblyBatch) -> AssemblyBatch:
        """``batch`` (with its rotational source) whose packed state is the equivalent packing closest to the
        source, with ``packing_targets``; else unchanged."""
        if not self.packing_targets:
            return batch
        if batch.packings_R1 is None:
            raise ValueError("packing_targets needs batches with equivalent packings: make_batch(..., "
                             "with_packings=True) or Collator(..., with_packings=True)")
        B, P, M = batch.packings_R1.shape[:3]
        ex = lambda t: t[:, None].expand(B, P, *t.shape[1:]).reshape(B * P, *t.shape[1:])  # noqa: E731
        R1 = closest_equivalent_rotation(batch.packings_R1.reshape(B * P, M, 3, 3), ex(batch.R0),
                                         ex(batch.symmetries), ex(batch.sym_mask))[0]
        dR = R1 - ex(batch.R0)
        cost = torch.einsum("bmij,bmjk,bmik->b", dR, ex(batch.gyration), dR).reshape(B, P)
        p = cost.masked_fill(~batch.packings_mask, torch.inf).argmin(1)
        b = torch.arange(B)
        return replace(batch, c1=batch.packings_c1[b, p], R1=batch.packings_R1[b, p])

    def targets(self, batch: AssemblyBatch) -> Tensor:
        """Target orientations ``(B, M, 3, 3)``: closest symmetry-equivalent to ``R0`` (or the labelled)."""
        if not self.symmetric_targets:
            return batch.R1
        return closest_equivalent_rotation(batch.R1, batch.R0, batch.symmetries, batch.sym_mask)[0]

    def _transform(self, batch: AssemblyBatch):
        pos0 = batch.clusters.positions_padded(batch.c0, batch.R0) if self.path.distance == "contact" else None
        return self.path.transform(batch.c0, pos0, batch.clusters.pad_mask)

    def predict(self, model: nn.Module, transform, s_k: Tensor, k: Tensor, batch: AssemblyBatch,
                cache=None) -> Tensor:
        """Endpoint prediction ``s1_hat (B, M, 6)`` from the state ``s_k``."""
        c_k, R_k = self.path.rigid(s_k, batch.R0)
        feats = self.path.node_features(transform, k).to(s_k.dtype)
        kw = {"template_cache": cache} if cache is not None else {}
        res = model(RigidState(c_k, R_k), k, batch=batch.clusters, node_features=feats, **kw)
        return self.path.endpoint_from_residual(s_k, batch.R0, res)

    def atom_error(self, s1_hat: Tensor, c1: Tensor, R1_hat: Tensor, R1: Tensor, gyration: Tensor) -> tuple[Tensor, Tensor]:
        """Mean squared atom displacement split into centroid and rotation parts, ``(B, M)`` each (Å²).

        For a rigid molecule ``mean_a |(R' - R) t_a + c' - c|^2 = |c' - c|^2 + tr((R'-R) G (R'-R)^T)``
        because each copy's body is centred (``G = mean_a t_a t_a^T``, per copy).
        """
        dc = ((s1_hat[..., :3] - c1) ** 2).sum(-1)
        dR = R1_hat - R1
        rot = torch.einsum("bmij,bmjk,bmik->bm", dR, gyration, dR)
        return dc, rot

    def loss(self, model: nn.Module, batch: AssemblyBatch) -> tuple[Tensor, dict]:
        """Atom-level endpoint MSE at a uniform random ``k`` (``loss_fn`` of :class:`kflow.train.Trainer`)."""
        b = batch.c0.shape[0]
        batch = self.align(self.source(batch))
        R1 = self.targets(batch)
        k = torch.rand(b, device=batch.c0.device, dtype=batch.c0.dtype)
        transform = self._transform(batch)
        ps = self.path.sample(transform, batch.c0, batch.R0, batch.c1, R1, k)
        s_k = ps.s_k
        if self.state_noise:  # centroids off the path, as the sampler meets them; the target stays exact
            s_k = torch.cat([s_k[..., :3] + self.state_noise * torch.randn_like(s_k[..., :3]), s_k[..., 3:]], -1)
        if self.state_noise_rot:  # orientations off the path (R_k = Exp(omega) R0 -> Exp(noise) R_k)
            turn = so3.exp(self.state_noise_rot * torch.randn_like(s_k[..., 3:])) @ so3.exp(s_k[..., 3:])
            s_k = torch.cat([s_k[..., :3], so3.log(turn)], -1)
        cache = model.encode_templates(batch.clusters) if self.lattice_weight else None  # shared by both calls
        s1_hat = self.predict(model, transform, s_k, k, batch, cache)
        _, R1_hat = self.path.rigid(s1_hat, batch.R0)
        dc, rot = self.atom_error(s1_hat, batch.c1, R1_hat, R1, batch.gyration)
        w = self.rot_weight
        if self.rot_late_weight and self.path.rotation == "own":
            w = w / (1 - self.path.rot_clock(k)[0].clamp(max=0.9))[:, None] ** 2
        loss = (dc + w * rot).mean()
        logs = {"rmsd_centroid": dc.mean().sqrt().detach(), "rmsd_rotation": rot.mean().sqrt().detach()}
        if self.lattice_weight:
            lat = self.lattice_error(model, transform, ps.s_k, k, batch, R1, cache)
            loss = loss + self.lattice_weight * lat.mean()
            logs["lattice_error"] = lat.mean().detach()
        return loss, logs

    def lattice_error(self, model: nn.Module, transform, s_k: Tensor, k: Tensor, batch: AssemblyBatch,
                      R1: Tensor, cache=None) -> Tensor:
        """``|v_j - R1 u_j|^2`` of the model's lattice stream (``AssemblyNet.lattice_targets``) averaged over the
        body vectors, ``(B, M)``: its direct loss (``lattice_weight``)."""
        state = RigidState(*self.path.rigid(s_k, batch.R0))
        feats = self.path.node_features(transform, k).to(s_k.dtype)
        v, u = model.lattice_targets(state, k, batch=batch.clusters, node_features=feats, template_cache=cache)
        return ((v - torch.einsum("bmij,bmvj->bmvi", R1, u)) ** 2).sum(-1).mean(-1)

    @torch.no_grad()
    def predict_path_sample(self, model: nn.Module, batch: AssemblyBatch, k: Tensor) -> dict:
        """Endpoint prediction on a training path sample at ``k (B,)`` (for diagnostics by k).

        Returns:
            dict with ``R_k``, ``R1`` (the target used in training), ``R1_hat`` ``(B, M, 3, 3)`` and the
            atom-level rotational RMSD (Å) of the prediction and of ``R_k``, ``rot_rmsd_hat`` / ``rot_rmsd_k``
            ``(B, M)``.
        """
        batch = self.align(self.source(batch))
        R1 = self.targets(batch)
        transform = self._transform(batch)
        ps = self.path.sample(transform, batch.c0, batch.R0, batch.c1, R1, k)
        s1_hat = self.predict(model, transform, ps.s_k, k, batch)
        _, R1_hat = self.path.rigid(s1_hat, batch.R0)
        rot_hat = self.atom_error(s1_hat, batch.c1, R1_hat, R1, batch.gyration)[1]
        rot_k = self.atom_error(s1_hat, batch.c1, ps.R_k, R1, batch.gyration)[1]
        return {"R_k": ps.R_k, "R1": R1, "R1_hat": R1_hat, "rot_rmsd_hat": rot_hat.sqrt(), "rot_rmsd_k": rot_k.sqrt()}

    @torch.no_grad()
    def sample(self, model: nn.Module, batch: AssemblyBatch, solver: SolverConfig | None = None, *,
               steps: int | None = None, method: str | None = None, grid: str | None = None,
               return_trajectory: bool = False, on_step=None) -> Assembly:
        """Assemble the loose clusters of ``batch`` (the task protocol's ``sample(model, batch, solver)``).

        Args:
            solver: steps, method (``exact`` only) and grid (default: 50 uniform steps); its ``source`` is not
                used (centroids follow ``path.trans_source``, rotations ``path.rot_source``).
            steps, method, grid: override single fields of ``solver``.
            on_step: optional ``f(batch, s, k_next) -> s``, applied to the state ``(B, M, 6)`` after every step
                (``batch`` with its rotational source); diagnoses use it to put part of the state back on a
                known path.

        Returns:
            :class:`Assembly`: positions, poses, the grid, model calls, seconds, optionally the trajectory.
        """
        solver = (solver or SolverConfig()).replace(steps=steps, method=method, grid=grid)
        steps, method, grid = solver.steps, solver.method, solver.grid
        if method != "exact":
            raise ValueError(f"the rigid sampler integrates with exact increments only (method='exact'), "
                             f"got '{method}'")
        t0 = time.perf_counter()
        batch = self.source(batch)
        transform = self._transform(batch)
        s = self.path.start(batch.c0)
        cache = model.encode_templates(batch.clusters) if hasattr(model, "encode_templates") else None
        k_grid = make_grid(steps, grid, self.path.schedule, transform.distinct_kappa() if grid == "band" else None)
        k_grid = k_grid.to(device=s.device, dtype=s.dtype)
        # SO(3) is not a vector space, so the rigid path takes its own steps (RigidKPath.step): centroids
        # follow path.trans_source (default: the given loose state), rotations path.rot_source
        traj = [s] if return_trajectory else None
        b = s.shape[0]
        for i in range(steps):
            k, k_next = k_grid[i].expand(b), k_grid[i + 1].expand(b)
            s1_hat = self.predict(model, transform, s, k, batch, cache)
            s = self.path.step(transform, s, s1_hat, batch.c0, batch.R0, k, k_next)
            if on_step is not None:
                s = on_step(batch, s, k_next)
            if traj is not None:
                traj.append(s)
        c, R = self.path.rigid(s, batch.R0)
        positions = batch.clusters.positions_padded(c, R)
        seconds = time.perf_counter() - t0
        trajectory = None
        if traj is not None:
            trajectory = torch.stack([batch.clusters.positions_padded(*self.path.rigid(x, batch.R0)) for x in traj])
        return Assembly(positions, trajectory, k_grid, steps, c, R, seconds)
