"""When each coefficient is revealed: ``mu(k, kappa)``, its k-derivative, energy warping and k-grids."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

PROFILES = ("linear", "smoothstep", "cosine")


def bump(u: Tensor, profile: str) -> tuple[Tensor, Tensor]:
    """Monotone profile ``h`` on [0, 1] with ``h(0) = 0``, ``h(1) = 1``, and its derivative ``h'``."""
    if profile == "linear":
        return u, torch.ones_like(u)
    if profile == "smoothstep":
        return u * u * (3 - 2 * u), 6 * u * (1 - u)
    if profile == "cosine":
        return 0.5 - 0.5 * torch.cos(math.pi * u), 0.5 * math.pi * torch.sin(math.pi * u)
    raise ValueError(f"unknown bump profile '{profile}'; choose one of {PROFILES}")


class KappaWarp(nn.Module):
    """Monotone piecewise-linear map of ``kappa`` fitted to dataset-level band energies (paper §3.2).

    Band ``b`` (sorted by scale) starts at the fraction of the total energy held by the coarser bands,
    rescaled so the finest band starts at 1: high-energy bands get more of ``[0, 1]``. Fit it on the
    *dataset* (e.g. the mean of ``(T x_1 - T x_0)^2`` over training pairs), never on the sample being
    generated.

    Args:
        bands: ``(nb,)`` sorted distinct scales.
        energy: ``(nb,)`` non-negative energy per band.
    """

    def __init__(self, bands: Tensor, energy: Tensor):
        super().__init__()
        bands = torch.as_tensor(bands, dtype=torch.float64).flatten()
        energy = torch.as_tensor(energy, dtype=torch.float64).flatten().clamp_min(0)
        if bands.numel() != energy.numel() or bands.numel() < 1:
            raise ValueError("bands and energy must be non-empty and of equal length")
        if bands.numel() == 1:
            warped = torch.zeros(1, dtype=torch.float64)
        else:
            cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(energy[:-1], 0)])
            warped = cum / cum[-1].clamp_min(1e-300) if cum[-1] > 0 else bands.clone()
        self.register_buffer("bands", bands)
        self.register_buffer("warped", warped)

    @classmethod
    def from_coefficients(cls, kappa: Tensor, energy: Tensor) -> KappaWarp:
        """Fit from a per-coefficient energy map broadcastable with ``kappa`` (summed per band)."""
        kappa, energy = torch.broadcast_tensors(kappa.double(), energy.double())
        bands, inverse = torch.unique(kappa.flatten(), return_inverse=True)
        per_band = torch.zeros_like(bands).scatter_add_(0, inverse, energy.flatten())
        return cls(bands, per_band)

    def forward(self, kappa: Tensor) -> Tensor:
        x = kappa.to(self.bands.dtype)
        if self.bands.numel() == 1:
            return torch.zeros_like(kappa)
        idx = torch.searchsorted(self.bands, x.clamp(self.bands[0], self.bands[-1]).contiguous()).clamp(1, len(self.bands) - 1)
        x0, x1 = self.bands[idx - 1], self.bands[idx]
        y0, y1 = self.warped[idx - 1], self.warped[idx]
        t = ((x - x0) / (x1 - x0).clamp_min(1e-300)).clamp(0, 1)
        return (y0 + t * (y1 - y0)).to(kappa.dtype)


class BandSchedule(nn.Module):
    """Band schedule: the coefficient of scale ``kappa`` is revealed during ``[(1-w) kappa, (1-w) kappa + w]``.

    ``mu = h((k - (1-w) kappa) / w)`` clipped to [0, 1], ``dmu/dk = h'(.) / w`` inside the window. ``w = 1``
    reveals all coefficients together (plain rectified flow for the linear profile); small ``w`` gives hard
    bands.

    Args:
        window: ``w`` in (0, 1].
        profile: ``linear``, ``smoothstep`` or ``cosine``.
        warp: optional :class:`KappaWarp` applied to ``kappa`` first (energy-aware timing).
    """

    def __init__(self, window: float = 1.0, profile: str = "linear", warp: KappaWarp | None = None):
        super().__init__()
        if not 0.0 < window <= 1.0:
            raise ValueError(f"window must be in (0, 1], got {window}")
        bump(torch.zeros(1), profile)  # validates the name
        self.window, self.profile, self.warp = float(window), profile, warp

    def effective_kappa(self, kappa: Tensor) -> Tensor:
        return self.warp(kappa) if self.warp is not None else kappa

    def forward(self, k: Tensor, kappa: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, dmu/dk)`` for ``k`` broadcastable against ``kappa`` (``(B, 1, ...)``, as
        :meth:`kflow.path.KPath.weights` shapes it)."""
        kappa = self.effective_kappa(kappa)
        w = self.window
        u_raw = (k - (1 - w) * kappa) / w
        # k = 1 must reveal every coefficient exactly, whatever the rounding of (1 - (1-w) kappa) / w
        u = torch.where(k >= 1, torch.ones_like(u_raw), u_raw.clamp(0.0, 1.0))
        mu, dh = bump(u, self.profile)
        inside = (u_raw >= 0) & (u_raw <= 1)  # closed window: w = 1 has velocity x_1 - x_0 on all of [0, 1]
        return mu, torch.where(inside, dh / w, torch.zeros_like(dh))

    def window_of(self, kappa: Tensor) -> tuple[Tensor, Tensor]:
        """Start and end of the reveal window of each (warped) scale."""
        start = (1 - self.window) * self.effective_kappa(kappa)
        return start, start + self.window


def make_grid(n_steps: int, kind: str = "uniform", schedule: BandSchedule | None = None,
              bands: Tensor | None = None, coarse_weight: float = 2.0, dtype=torch.float64) -> Tensor:
    """A k-grid of ``n_steps + 1`` points from 0 to 1.

    Args:
        n_steps: number of integration steps.
        kind: ``uniform``, or ``band``: points spread by a density that is the sum over bands of their
            reveal windows, each band weighted by ``1 + (coarse_weight - 1) * (1 - kappa)`` so the coarse
            bands (which carry the most energy) get more steps.
        schedule: needed for ``band``.
        bands: distinct scales (e.g. ``transform.distinct_kappa()``), needed for ``band``.
        coarse_weight: weight of the coarsest band relative to the finest.

    Returns:
        ``(n_steps + 1,)`` increasing tensor with exact endpoints 0 and 1.
    """
    if n_steps < 1:
        raise ValueError("n_steps must be >= 1")
    if kind == "uniform":
        return torch.linspace(0, 1, n_steps + 1, dtype=dtype)
    if kind != "band":
        raise ValueError(f"unknown grid kind '{kind}' (uniform | band)")
    if schedule is None or bands is None:
        raise ValueError("a band grid needs the schedule and the transform's distinct bands")
    bands = torch.as_tensor(bands, dtype=torch.float64).flatten()
    fine = torch.linspace(0, 1, 4097, dtype=torch.float64)
    start, end = schedule.window_of(bands)
    weight = 1 + (coarse_weight - 1) * (1 - bands)
    inside = (fine[:, None] >= start[None]) & (fine[:, None] <= end[None])
    density = (inside * weight[None]).sum(1) + 1e-3
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64),
                     torch.cumsum(0.5 * (density[1:] + density[:-1]) * (fine[1:] - fine[:-1]), 0)])
    cdf = cdf / cdf[-1]
    targets = torch.linspace(0, 1, n_steps + 1, dtype=torch.float64)
    idx = torch.searchsorted(cdf, targets).clamp(1, len(fine) - 1)
    c0, c1 = cdf[idx - 1], cdf[idx]
    grid = fine[idx - 1] + (targets - c0) / (c1 - c0).clamp_min(1e-300) * (fine[idx] - fine[idx - 1])
    grid[0], grid[-1] = 0.0, 1.0
    return torch.cummax(grid, 0).values.to(dtype)
