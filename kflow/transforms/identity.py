"""Identity transform: every coefficient at scale 0, so K-Flow reduces to plain flow matching."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import KTransform


class IdentityTransform(KTransform):
    """``T = I`` with a single band (``kappa = 0``).

    Args:
        event_dims: number of trailing dims of one sample (only used to shape :attr:`kappa`).
        event_shape: the shape of one sample; when given, ``event_dims = len(event_shape)`` (so the transform
            is built with the same call as the others: ``cls(event_shape=...)``).
    """

    def __init__(self, event_dims: int = 1, event_shape: tuple[int, ...] | None = None):
        super().__init__()
        if event_shape is not None:
            event_dims = len(event_shape)
        self.register_buffer("_kappa", torch.zeros((1,) + (1,) * event_dims), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x

    def inverse(self, c: Tensor) -> Tensor:
        return c

    @property
    def kappa(self) -> Tensor:
        return self._kappa
