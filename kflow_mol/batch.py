"""Batch structure for clusters of 17 rigid copies of one molecule, and the rigid state the network reads.

A cluster stores its molecule once, as a *template*: body-frame coordinates ``t (n, 3)`` (inertial frame,
centred on the unweighted centroid) and atomic numbers ``species (n,)``. Copy ``i`` of the molecule sits at
``x_i,a = R_i @ t_a + c_i``. A :class:`ClusterBatch` concatenates the templates of ``B`` clusters (possibly
with different atom counts ``n_b``) and carries two index layouts over the ``A = 17 * sum_b n_b`` atoms of
all copies:

* flat: ``atom_template (A,)`` (row of each atom in the template arrays) and ``atom_mol (A,)`` (global
  molecule index ``b * 17 + i``); atoms are ordered cluster, then molecule, then template atom;
* padded: ``pad_index (B, n_max)`` / ``pad_mask (B, n_max)`` so that dense per-cluster work (contact
  distances) runs as batched tensor algebra without Python loops over atoms or molecules.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

__all__ = ["ClusterBatch", "RigidState", "collate"]

N_MOLS = 17


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
    """Templates of ``B`` clusters and the index maps to their ``17`` copies.

    Attributes:
        species: ``(A_t,)`` long, atomic numbers of all templates concatenated.
        template: ``(A_t, 3)`` float, body-frame coordinates (each template centred).
        template_batch: ``(A_t,)`` long, cluster of each template atom.
        atom_template: ``(A,)`` long, template row of every atom of every copy (``A = num_mols * A_t``).
        atom_mol: ``(A,)`` long, global molecule index in ``[0, num_mols * B)`` of every atom.
        num_atoms: ``(B,)`` long, atoms per molecule ``n_b``.
        template_ptr: ``(B + 1,)`` long, offsets of each cluster's template rows.
        pad_index: ``(B, n_max)`` long, template row of padded atom slot (0 where padded).
        pad_mask: ``(B, n_max)`` bool, which padded slots are real atoms.
        num_clusters: ``B``.
        num_mols: molecules per cluster (17).
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
    num_mols: int = N_MOLS

    def to(self, device=None, dtype=None) -> ClusterBatch:
        """Move to ``device``; ``dtype`` (if given) applies to the float tensor ``template`` only."""
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
    def template_padded(self) -> torch.Tensor:
        """``(B, n_max, 3)`` templates, zeros in padded slots."""
        return self.template[self.pad_index] * self.pad_mask[..., None]

    def positions(self, c: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """Atom positions of all copies in the flat layout.

        Args:
            c: ``(B, M, 3)`` centroids.
            R: ``(B, M, 3, 3)`` orientations (body -> lab).

        Returns:
            ``(A, 3)`` positions ``R_i @ t_a + c_i``, ordered cluster, molecule, atom.
        """
        self._check_state(c, R)
        c = c.reshape(-1, 3)[self.atom_mol]
        R = R.reshape(-1, 3, 3)[self.atom_mol]
        t = self.template[self.atom_template].to(R.dtype)
        return torch.einsum("aij,aj->ai", R, t) + c

    def positions_padded(self, c: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """Atom positions in the padded layout (padded slots sit at the centroid).

        Args:
            c: ``(B, M, 3)`` centroids.
            R: ``(B, M, 3, 3)`` orientations.

        Returns:
            ``(B, M, n_max, 3)``.
        """
        self._check_state(c, R)
        t = self.template_padded.to(R.dtype)
        return torch.einsum("bmij,bnj->bmni", R, t) + c[:, :, None, :]

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
    items: Sequence[tuple], num_mols: int = N_MOLS, dtype: torch.dtype | None = None, center_tol: float = 1e-3
) -> ClusterBatch:
    """Build a :class:`ClusterBatch` from per-cluster ``(species, template)`` pairs.

    Args:
        items: sequence of ``(species (n,), template (n, 3))`` (numpy or torch); ``n`` may differ per item.
        num_mols: copies per cluster.
        dtype: float dtype of the template (default: torch's default dtype).
        center_tol: templates must be centred (body frame about the unweighted centroid): the mean of each
            template may not exceed this (Å).

    Returns:
        The batch (on CPU).

    Raises:
        ValueError: empty input, shape mismatch, or a template that is not centred.
    """
    if len(items) == 0:
        raise ValueError("collate: empty list of clusters")
    dtype = dtype or torch.get_default_dtype()
    species, templates = [], []
    for idx, item in enumerate(items):
        if len(item) != 2:
            raise ValueError(f"collate: item {idx} must be (species, template), got {len(item)} fields")
        s = _as_tensor(item[0], torch.long).reshape(-1)
        t = _as_tensor(item[1], dtype)
        if t.ndim != 2 or t.shape[1] != 3 or t.shape[0] != s.shape[0] or s.shape[0] == 0:
            raise ValueError(
                f"collate: item {idx} needs species (n,) and template (n, 3) with n > 0, "
                f"got {tuple(s.shape)} and {tuple(t.shape)}"
            )
        off = t.mean(0).abs().max().item()
        if off > center_tol:
            raise ValueError(
                f"collate: template {idx} is not centred (|mean| = {off:.3g} Å); pass body coordinates "
                "about the unweighted centroid (kflow_mol.frames.body_coordinates)"
            )
        species.append(s)
        templates.append(t)
    B, M = len(items), num_mols
    n = torch.tensor([s.shape[0] for s in species], dtype=torch.long)
    ptr = torch.zeros(B + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(n, 0)
    A_t = int(ptr[-1])
    template_batch = torch.repeat_interleave(torch.arange(B), n)

    # Flat copies layout: cluster b, molecule i, atom a -> template row ptr[b] + a.
    n_per_mol = n.repeat_interleave(M)  # (B*M,)
    atom_mol = torch.repeat_interleave(torch.arange(B * M), n_per_mol)
    mol_ptr = torch.cumsum(n_per_mol, 0) - n_per_mol  # start of each molecule in the flat layout
    local = torch.arange(M * A_t) - mol_ptr[atom_mol]
    atom_template = ptr[:-1].repeat_interleave(M)[atom_mol] + local

    n_max = int(n.max())
    slot = torch.arange(n_max)
    pad_mask = slot[None, :] < n[:, None]
    pad_index = torch.where(pad_mask, ptr[:-1, None] + slot[None, :], torch.zeros((), dtype=torch.long))
    return ClusterBatch(
        species=torch.cat(species),
        template=torch.cat(templates),
        template_batch=template_batch,
        atom_template=atom_template,
        atom_mol=atom_mol,
        num_atoms=n,
        template_ptr=ptr,
        pad_index=pad_index,
        pad_mask=pad_mask,
        num_clusters=B,
        num_mols=M,
    )
