"""Orthonormal 2-D discrete wavelet transform (pytorch-wavelets, periodization) packed in place."""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import KTransform


def _wavelet_modules(wave: str, levels: int, dtype: torch.dtype, device) -> tuple:
    with warnings.catch_warnings():  # pytorch-wavelets imports pkg_resources, deprecated upstream
        warnings.simplefilter("ignore")
        from pytorch_wavelets import DWTForward, DWTInverse
    # the filters are made in the default dtype: build them in float64 so a float64 transform is exact
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        mods = (DWTForward(J=levels, wave=wave, mode="periodization"), DWTInverse(wave=wave, mode="periodization"))
    finally:
        torch.set_default_dtype(old)
    return tuple(m.to(device=device, dtype=dtype) for m in mods)


def filter_length(wave: str) -> int:
    import pywt

    return pywt.Wavelet(wave).dec_len


def max_levels(size: int, wave: str) -> int:
    """Largest level count for which every level's input is at least as long as the filter.

    pytorch-wavelets silently returns wrong coefficients past this point, so we refuse instead.
    """
    flen, j = filter_length(wave), 0
    while size % 2 == 0 and size >= flen and size >= 2:
        size //= 2
        j += 1
    return j


class WaveletTransform(KTransform):
    """2-D orthonormal DWT over the last two dims of ``(C, H, W)`` samples.

    Coefficients are packed into an array of the input's shape (approximation top-left, then the detail
    quadrants of each level), so the transform is a square orthonormal map. ``kappa`` is 0 for the
    approximation and ``(J - j + 1) / J`` for the details of level ``j`` (``j = J`` coarsest).

    Args:
        event_shape: ``(C, H, W)``.
        wave: any orthogonal wavelet known to PyWavelets (``haar``, ``db2``, ...).
        levels: number of levels ``J``; ``None`` picks the largest valid one.

    Raises:
        ValueError: when a level's input would be shorter than the filter or not even.
    """

    def __init__(self, event_shape: Sequence[int], wave: str = "haar", levels: int | None = None):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        if len(self.event_shape) != 3:
            raise ValueError(f"WaveletTransform expects (C, H, W) samples, got {self.event_shape}")
        _, h, w = self.event_shape
        limit = min(max_levels(h, wave), max_levels(w, wave))
        if levels is None:
            levels = limit
        if levels < 1 or levels > limit:
            raise ValueError(
                f"wavelet '{wave}' (filter length {filter_length(wave)}) allows at most {limit} level(s) on "
                f"{h}x{w} inputs (each level's input must be even and at least the filter length); "
                f"got levels={levels}. Use fewer levels or a shorter wavelet such as 'haar' or 'db2'.")
        self.wave, self.levels = wave, int(levels)
        self._modules_by_dtype: dict = {}  # (dtype, device) -> (DWTForward, DWTInverse), built on first use
        kappa = torch.zeros(h, w)
        for j in range(1, self.levels + 1):  # j = 1 finest
            hj, wj = h >> j, w >> j
            val = (self.levels - j + 1) / self.levels
            kappa[:2 * hj, :2 * wj] = torch.where(
                (torch.arange(2 * hj)[:, None] >= hj) | (torch.arange(2 * wj)[None, :] >= wj),
                torch.tensor(val), kappa[:2 * hj, :2 * wj])
        self.register_buffer("_kappa", kappa.reshape(1, 1, h, w), persistent=False)

    def _dwt_pair(self, x: Tensor) -> tuple:
        if tuple(x.shape[-3:]) != self.event_shape:
            raise ValueError(f"WaveletTransform built for samples of shape {self.event_shape}, got {tuple(x.shape)}")
        key = (x.dtype, x.device)
        if key not in self._modules_by_dtype:
            self._modules_by_dtype[key] = _wavelet_modules(self.wave, self.levels, x.dtype, x.device)
        return self._modules_by_dtype[key]

    def forward(self, x: Tensor) -> Tensor:
        dwt, _ = self._dwt_pair(x)
        lead = x.shape[:-3]
        xb = x.reshape(-1, *self.event_shape)
        yl, yh = dwt(xb)
        out = torch.empty_like(xb)
        hj, wj = yl.shape[-2:]
        out[..., :hj, :wj] = yl
        for d in reversed(yh):  # coarsest level first; d: (B, C, 3, h_j, w_j)
            hj, wj = d.shape[-2:]
            out[..., :hj, wj:2 * wj] = d[:, :, 0]
            out[..., hj:2 * hj, :wj] = d[:, :, 1]
            out[..., hj:2 * hj, wj:2 * wj] = d[:, :, 2]
        return out.reshape(*lead, *self.event_shape)

    def inverse(self, c: Tensor) -> Tensor:
        _, idwt = self._dwt_pair(c)
        lead = c.shape[:-3]
        cb = c.reshape(-1, *self.event_shape)
        _, h, w = self.event_shape
        yh = []
        for j in range(1, self.levels + 1):
            hj, wj = h >> j, w >> j
            yh.append(torch.stack([cb[..., :hj, wj:2 * wj], cb[..., hj:2 * hj, :wj],
                                   cb[..., hj:2 * hj, wj:2 * wj]], dim=2))
        yl = cb[..., :h >> self.levels, :w >> self.levels]
        return idwt((yl, yh)).reshape(*lead, *self.event_shape)

    @property
    def kappa(self) -> Tensor:
        return self._kappa
