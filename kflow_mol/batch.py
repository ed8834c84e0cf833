"""Batch structure for clusters of 17 rigid copies of one molecule, and the rigid state the network reads.

Every copy ``i`` is its own rigid body: body-frame coordinates ``body_i (n, 3)`` (centred on the unweighted
centroid; same element sequence and atom order in every copy), placed at ``x_i,a = R_i @ body_i,a + c_i``.
Copies that have the same rigid shape (all 17 of most crystals; a molecule and its mirror image, or the Z'
conformers, are different shapes) share one *template* ``t (n, 3)`` with atomic numbers ``species (n,)``,
which the network encodes once per cluster (:mod:`kflow_mol.shapes`). A :class:`ClusterBatch` concatenates
the templates of every shape of ``B`` clusters (possibly with different atom counts ``n_b``) and carries
index layouts over the ``A = 17 * sum_b n_b`` atoms of all copies:

* flat: ``atom_template (A,)`` (row of each atom in the template arrays: its copy's shape) and ``atom_mol (A,)``
  (global molecule index ``b * 17 + i``); atoms are ordered cluster, then molecule, then template atom;
* padded: ``copy_pad_index (B, 17, n_max)`` / ``pad_mask (B, n_max)`` so that dense per-cluster work (contact
  distances) runs as batched tensor algebra without Python loops over atoms or molecules.

A cluster given as one template (``(species, template)``) has one shape and ``body_i = template`` for all copies.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from .data import N_MOLECULES

__all__ = ["ClusterBatch", "RigidState", "collate"]


@dataclass
class RigidState:
    """Rigid state of ``B`` clusters of ``M`` (=17) molecules.

    Attributes:
        c: ``(B, M, 3)`` centroids (lab frame, Å).
        R: ``(B, M, 3, 3)`` orientations, body -> lab (proper rotations).
    """

    c: torch.Tensor
    R: torch.Tensor

    def to(self, device=None, dtype=None) -> RigidState:
        return RigidState(self.c.to(device=device, dtype=dtype), self.R.to(device=device, dtype=dtype))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.c.shape[:2])


@dataclass
class ClusterBatch:
    """Shape templates of ``B`` clusters, each copy's body coordinates, and the index maps between them.

    Attributes:
        species: ``(A_t,)`` long, atomic numbers of all shape templates concatenated.
        template: ``(A_t, 3)`` float, body-frame coordinates of every distinct shape (each centred).
        template_batch: ``(A_t,)`` long, cluster of each template atom.
        atom_template: ``(A,)`` long, template row of every atom of every copy (its copy's shape).
        atom_mol: ``(A,)`` long, global molecule index in ``[0, num_mols * B)`` of every atom.
        num_atoms: ``(B,)`` long, atoms per molecule ``n_b``.
        template_ptr: ``(B + 1,)`` long, offsets of each cluster's template rows (all its shapes).
        pad_index: ``(B, n_max)`` long, template row of each padded atom slot of the cluster's shape 0 (0 where
            padded).
        pad_mask: ``(B, n_max)`` bool, which padded slots are real atoms.
        num_clusters: ``B``.
        num_mols: molecules per cluster (17).
        body: ``(A, 3)`` float, each copy's own body coordinates (flat layout).
        template_shape: ``(A_t,)`` long, global shape index of each template atom.
        shape_cluster: ``(S,)`` long, cluster of each of the ``S`` shapes of the batch.
        mol_shape: ``(B, M)`` long, global shape index of every copy.
        shape_pad_index: ``(S, n_max)`` long, template rows of each shape in padded slots (0 where padded).
        copy_pad_index: ``(B, M, n_max)`` long, template row of each padded atom slot of each copy.
        body_pad_index: ``(B, M, n_max)`` long, row of ``body`` of each padded atom slot of each copy.
    """

    species: torch.Tensor
    template: torch.Tensor
    template_batch: torch.Tensor
    atom_template: torch.Tensor
    atom_mol: torch.Tensor
    num_atoms: torch.Tensor
    template_ptr: torch.Tensor
    pad_index: torch.Tensor
    pad_mask: torch.Tensor
    num_clusters: int
    num_mols: int = N_MOLECULES
    body: torch.Tensor | None = None
    template_shape: torch.Tensor | None = None
    shape_cluster: torch.Tensor | None = None
    mol_shape: torch.Tensor | None = None
    shape_pad_index: torch.Tensor | None = None
    copy_pad_index: torch.Tensor | None = None
    body_pad_index: torch.Tensor | None = None

    def to(self, device=None, dtype=None) -> ClusterBatch:
        """Move to ``device``; ``dtype`` (if given) applies to the float tensors (``template``, ``body``) only."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
            out[f.name] = v
        return ClusterBatch(**out)

    @property
    def n_max(self) -> int:
        return self.pad_index.shape[1]

    @property
    def num_shapes(self) -> int:
        """Distinct shapes in the batch (``S >= B``)."""
        return int(self.shape_cluster.shape[0])

    @property
    def shape_pad_mask(self) -> torch.Tensor:
        """``(S, n_max)`` real atom slots of each shape."""
        return self.pad_mask[self.shape_cluster]

    @property
    def template_padded(self) -> torch.Tensor:
        """``(B, n_max, 3)`` shape-0 templates, zeros in padded slots."""
        return self.template[self.pad_index] * self.pad_mask[..., None]

    @property
    def shape_template_padded(self) -> torch.Tensor:
        """``(S, n_max, 3)`` every shape's template, zeros in padded slots."""
        return self.template[self.shape_pad_index] * self.shape_pad_mask[..., None]

    @property
    def body_padded(self) -> torch.Tensor:
        """``(B, M, n_max, 3)`` every copy's body coordinates, zeros in padded slots."""
        return self.body[self.body_pad_index] * self.pad_mask[:, None, :, None]

    def positions(self, c: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """Atom positions of all copies in the flat layout.

        Args:
            c: ``(B, M, 3)`` centroids.
            R: ``(B, M, 3, 3)`` orientations (body -> lab).

        Returns:
            ``(A, 3)`` positions ``R_i @ body_i,a + c_i``, ordered cluster, molecule, atom.
        """
        self._check_state(c, R)
        c = c.reshape(-1, 3)[self.atom_mol]
        R = R.reshape(-1, 3, 3)[self.atom_mol]
        return torch.einsum("aij,aj->ai", R, self.body.to(R.dtype)) + c

    def positions_padded(self, c: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """Atom positions in the padded layout (padded slots sit at the centroid).

        Args:
            c: ``(B, M, 3)`` centroids.
            R: ``(B, M, 3, 3)`` orientations.

        Returns:
            ``(B, M, n_max, 3)``.
        """
        self._check_state(c, R)
        t = self.body_padded.to(R.dtype)
        return torch.einsum("bmij,bmnj->bmni", R, t) + c[:, :, None, :]

    def _check_state(self, c: torch.Tensor, R: torch.Tensor) -> None:
        B, M = self.num_clusters, self.num_mols
        if tuple(c.shape) != (B, M, 3) or tuple(R.shape) != (B, M, 3, 3):
            raise ValueError(
                f"ClusterBatch of {B} clusters x {M} molecules expects c (B,{M},3) and R (B,{M},3,3), "
                f"got c {tuple(c.shape)} and R {tuple(R.shape)}"
            )


def _as_tensor(x, dtype) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    return torch.as_tensor(x).to(dtype)


def collate(
    items: Sequence[tuple], num_mols: int = N_MOLECULES, dtype: torch.dtype | None = None, center_tol: float = 1e-3
) -> ClusterBatch:
    """Build a :class:`ClusterBatch` from per-cluster templates.

    Args:
        items: sequence of ``(species (n,), template (n, 3))`` (one shape: every copy is the template) or
            ``(species (n,), templates (K, n, 3), copy_shape (M,)[, body (M, n, 3)])`` (``K`` distinct shapes;
            ``body`` defaults to each copy's template); numpy or torch; ``n`` may differ per item.
        num_mols: copies per cluster.
        dtype: float dtype of the templates and bodies (default: torch's default dtype).
        center_tol: templates and bodies must be centred (body frame about the unweighted centroid): the
            mean of each may not exceed this (Å).

    Returns:
        The batch (on CPU).

    Raises:
        ValueError: empty input, shape mismatch, a bad shape index, or a template that is not centred.
    """
    if len(items) == 0:
        raise ValueError("collate: empty list of clusters")
    dtype = dtype or torch.get_default_dtype()
    M = num_mols
    species, templates, shapes, bodies = [], [], [], []
    for idx, item in enumerate(items):
        if len(item) not in (2, 3, 4):
            raise ValueError(f"collate: item {idx} must be (species, template) or (species, templates, copy_shape"
                             f"[, body]), got {len(item)} fields")
        s = _as_tensor(item[0], torch.long).reshape(-1)
        t = _as_tensor(item[1], dtype)
        if len(item) == 2:
            t = t[None] if t.ndim == 2 else t
            cs = torch.zeros(M, dtype=torch.long)
        else:
            cs = _as_tensor(item[2], torch.long).reshape(-1)
        if t.ndim != 3 or t.shape[2] != 3 or t.shape[1] != s.shape[0] or s.shape[0] == 0 or t.shape[0] == 0:
            raise ValueError(
                f"collate: item {idx} needs species (n,) and template (n, 3) or templates (K, n, 3) with n > 0, "
                f"got {tuple(s.shape)} and {tuple(t.shape)}"
            )
        if cs.shape != (M,) or int(cs.min()) < 0 or int(cs.max()) >= t.shape[0]:
            raise ValueError(f"collate: item {idx}: copy_shape must be ({M},) indices into its {t.shape[0]} "
                             f"templates, got {tuple(cs.shape)}")
        body = _as_tensor(item[3], dtype) if len(item) == 4 else t[cs]
        if tuple(body.shape) != (M, s.shape[0], 3):
            raise ValueError(f"collate: item {idx}: body must be ({M}, {s.shape[0]}, 3), got {tuple(body.shape)}")
        off = max(t.mean(1).abs().max().item(), body.mean(1).abs().max().item())
        if off > center_tol:
            raise ValueError(
                f"collate: template {idx} is not centred (|mean| = {off:.3g} Å); pass body coordinates "
                "about the unweighted centroid (kflow_mol.frames.body_coordinates)"
            )
        species.append(s)
        templates.append(t)
        shapes.append(cs)
        bodies.append(body)
    B = len(items)
    n = torch.tensor([s.shape[0] for s in species], dtype=torch.long)
    K = torch.tensor([t.shape[0] for t in templates], dtype=torch.long)
    ptr = torch.zeros(B + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(n * K, 0)
    template_batch = torch.repeat_interleave(torch.arange(B), n * K)
    shape_cluster = torch.repeat_interleave(torch.arange(B), K)  # (S,)
    n_shape = n[shape_cluster]
    shape_ptr = torch.cumsum(n_shape, 0) - n_shape  # start row of each shape
    template_shape = torch.repeat_interleave(torch.arange(len(shape_cluster)), n_shape)
    shape_off = torch.cumsum(K, 0) - K  # first global shape of each cluster
    mol_shape = torch.stack(shapes) + shape_off[:, None]  # (B, M)

    # Flat copies layout: cluster b, molecule i, atom a -> template row shape_ptr[mol_shape[b, i]] + a.
    n_per_mol = n.repeat_interleave(M)  # (B*M,)
    atom_mol = torch.repeat_interleave(torch.arange(B * M), n_per_mol)
    mol_ptr = torch.cumsum(n_per_mol, 0) - n_per_mol  # start of each molecule in the flat layout
    local = torch.arange(int(n_per_mol.sum())) - mol_ptr[atom_mol]
    atom_template = shape_ptr[mol_shape.reshape(-1)][atom_mol] + local

    n_max = int(n.max())
    slot = torch.arange(n_max)
    pad_mask = slot[None, :] < n[:, None]
    zero = torch.zeros((), dtype=torch.long)
    shape_pad_index = torch.where(pad_mask[shape_cluster], shape_ptr[:, None] + slot[None, :], zero)
    pad_index = shape_pad_index[shape_off]
    copy_pad_index = shape_pad_index[mol_shape]  # (B, M, n_max)
    body_pad_index = torch.where(pad_mask[:, None, :], mol_ptr.reshape(B, M)[..., None] + slot, zero)
    return ClusterBatch(
        species=torch.cat([s.repeat(k) for s, k in zip(species, K.tolist())]),
        template=torch.cat([t.reshape(-1, 3) for t in templates]),
        template_batch=template_batch,
        atom_template=atom_template,
        atom_mol=atom_mol,
        num_atoms=n,
        template_ptr=ptr,
        pad_index=pad_index,
        pad_mask=pad_mask,
        num_clusters=B,
        num_mols=M,
        body=torch.cat([b.reshape(-1, 3) for b in bodies]),
        template_shape=template_shape,
        shape_cluster=shape_cluster,
        mol_shape=mol_shape,
        shape_pad_index=shape_pad_index,
        copy_pad_index=copy_pad_index,
        body_pad_index=body_pad_index,
    )
