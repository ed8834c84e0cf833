"""The prepared cluster: the one record that training, sampling, evaluation and the caches share.

:func:`kflow_mol.dataset.prepare` builds it from a :class:`kflow_mol.data.ClusterRecord`; the on-disk cache
stores :meth:`PreparedCluster.to_tensors` (plain tensors and strings, so loading it with
``torch.load(weights_only=True)`` never runs code) and reads it back with :meth:`PreparedCluster.from_tensors`.
Everything is numpy, float64 for coordinates; ``M`` copies (17), ``n`` atoms per copy, ``K`` distinct rigid
shapes (:mod:`kflow_mol.shapes`), ``G`` the largest point-group order among them.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from .symmetry import equivalent_packings

__all__ = ["PreparedCluster"]


@dataclass
class PreparedCluster:
    """One cluster with everything assembly needs.

    Attributes:
        id: cluster id (file stem or official id).
        species: ``(n,)`` atomic numbers, the same atom order in every copy.
        final: ``(M, n, 3)`` packed (target) positions, Å.
        initial: ``(M, n, 3)`` loose (input) positions, Å.
        R1: ``(M, 3, 3)`` packed orientation of every copy (body -> lab, proper).
        c1: ``(M, 3)`` packed centroids.
        templates: ``(K, n, 3)`` centred body-frame coordinates of each distinct shape (shape 0 is the central
            copy's).
        copy_shape: ``(M,)`` shape index of every copy.
        body: ``(M, n, 3)`` each copy's own body coordinates: ``final_i = body_i @ R1_i^T + c1_i`` exactly.
        shape_perms: ``(K, G, n)`` automorphism permutations of every shape (identity first, identity-padded).
        shape_symmetries: ``(K, G, 3, 3)`` the matching body-frame rotations.
        shape_orders: ``(K,)`` the real group orders (rows past them repeat the identity).
        mirror_of: ``(K,)`` index of an earlier shape this one is the mirror image of (-1: none).
    """

    id: str
    species: np.ndarray
    final: np.ndarray
    initial: np.ndarray
    R1: np.ndarray
    c1: np.ndarray
    templates: np.ndarray
    copy_shape: np.ndarray
    body: np.ndarray
    shape_perms: np.ndarray
    shape_symmetries: np.ndarray
    shape_orders: np.ndarray
    mirror_of: np.ndarray

    @property
    def num_atoms(self) -> int:
        return int(len(self.species))

    @property
    def template(self) -> np.ndarray:
        """``(n, 3)`` the central copy's shape."""
        return self.templates[0]

    @property
    def perms(self) -> np.ndarray:
        """``(G0, n)`` automorphisms of the central copy's shape (its point group; ``G0`` its order)."""
        return self.shape_perms[0, : int(self.shape_orders[0])]

    @property
    def symmetries(self) -> np.ndarray:
        """``(G0, 3, 3)`` body-frame rotations of the central copy's point group."""
        return self.shape_symmetries[0, : int(self.shape_orders[0])]

    def copy_perms(self) -> np.ndarray:
        """``(M, G, n)`` automorphisms of every copy (its shape's, identity-padded)."""
        return self.shape_perms[self.copy_shape]

    def copy_symmetries(self) -> tuple[np.ndarray, np.ndarray]:
        """Body-frame symmetry rotations of every copy ``(M, G, 3, 3)`` and the real-element mask ``(M, G)``."""
        rots = self.shape_symmetries[self.copy_shape]
        mask = np.arange(rots.shape[1])[None] < self.shape_orders[self.copy_shape][:, None]
        return rots, mask

    def equivalent_packings(self) -> tuple[np.ndarray, np.ndarray]:
        """``(P, M, 3)`` centroids and ``(P, M, 3, 3)`` orientations of the packings equivalent to the labelled one
        under the symmetries of its centroid set, labelled first (:func:`kflow_mol.symmetry.equivalent_packings`;
        computed once per record and kept, not cached on disk)."""
        if "_packings" not in self.__dict__:
            self.__dict__["_packings"] = equivalent_packings(self.c1, self.R1, self.body, self.copy_shape)
        return self.__dict__["_packings"]

    def replace(self, **changes) -> PreparedCluster:
        """A copy with some fields changed (e.g. ``initial``: a given loose state)."""
        return replace(self, **changes)

    def to_tensors(self) -> dict:
        """Plain ``{name: tensor | str}`` for the cache (``torch.load(weights_only=True)`` reads it back)."""
        return {f.name: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v)
                for f in fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_tensors(cls, blob: dict) -> PreparedCluster:
        """Inverse of :meth:`to_tensors`."""
        return cls(**{f.name: (blob[f.name].numpy() if isinstance(blob[f.name], torch.Tensor) else blob[f.name])
                      for f in fields(cls)})
