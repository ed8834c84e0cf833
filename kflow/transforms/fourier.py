"""Real orthonormal Fourier transform (the discrete Hartley transform) with radial-frequency scales."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import KTransform


def radial_frequency(sizes: Sequence[int]) -> Tensor:
    """Normalised radial frequency of each DFT bin, in [0, 1].

    Bin ``u`` of a length-``N`` axis has frequency ``min(u, N - u) / (N / 2)``, so a bin and its conjugate
    share the value; the radius over the axes is divided by ``sqrt(len(sizes))`` to end at 1.
    """
    grids = []
    for n in sizes:
        u = torch.arange(n, dtype=torch.float64)
        grids.append(torch.minimum(u, n - u) / max(n / 2, 1))
    mesh = torch.meshgrid(*grids, indexing="ij")
    r = torch.sqrt(sum(g**2 for g in mesh)) / len(sizes) ** 0.5
    return r / r.max().clamp_min(1e-12)


class FourierTransform(KTransform):
    """Orthonormal real Fourier transform over chosen dims.

    Uses the discrete Hartley transform ``H = Re(F) - Im(F)`` with the unitary DFT ``F``: it is real,
    orthonormal and its own inverse, and bin ``u`` holds only the frequency pair ``±u``, so ``kappa`` is the
    normalised radial frequency and conjugate pairs share it.

    Args:
        event_shape: shape of one sample, e.g. ``(C, H, W)``.
        dims: the dims of ``event_shape`` to transform (negative indices allowed), default the last two.
    """

    def __init__(self, event_shape: Sequence[int], dims: Sequence[int] = (-2, -1)):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        nd = len(self.event_shape)
        self.dims = tuple(sorted(d % nd for d in dims))
        kappa = radial_frequency([self.event_shape[d] for d in self.dims])
        shape = [self.event_shape[d] if d in self.dims else 1 for d in range(nd)]
        self.register_buffer("_kappa", kappa.reshape(1, *shape).float(), persistent=False)

    def _fft_dims(self, x: Tensor) -> tuple[int, ...]:
        if tuple(x.shape[-len(self.event_shape):]) != self.event_shape:
            raise ValueError(f"FourierTransform built for samples of shape {self.event_shape}, got {tuple(x.shape)}")
        off = x.dim() - len(self.event_shape)
        return tuple(off + d for d in self.dims)

    def forward(self, x: Tensor) -> Tensor:
        f = torch.fft.fftn(x, dim=self._fft_dims(x), norm="ortho")
        return f.real - f.imag

    def inverse(self, c: Tensor) -> Tensor:
        return self.forward(c)  # the orthonormal Hartley transform is an involution

    @property
    def kappa(self) -> Tensor:
        return self._kappa
