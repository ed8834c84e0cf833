"""The paper's sampling controls, and PNG image grids (PIL + numpy; no torchvision).

* classifier-free guidance: ``cfg_scale`` (see :meth:`kflow_image.task.ImageFlowTask.model_fn`);
* class-condition drop: the label is used for ``k < k_drop`` and the null class afterwards
  (:func:`class_drop_labels`), and the paper's class-drop ratio :func:`cdr`;
* noise splitting: the noise of chosen bands is shared across the batch (:func:`split_noise`);
* training-free restoration (super-resolution / deblurring): after every step the coarse coefficients of the
  state are replaced by those of the path through the *degraded observation's* latent, so at ``k = 1`` the
  coarse bands equal the observation's and the model fills in the fine ones (:func:`restoration_hook`,
  :func:`restore`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from kflow.solver import SolverConfig
from kflow.transforms import KTransform
from kflow_image.metrics import class_drop_ratio, psnr
from kflow_image.task import ImageFlowTask, band_mask, class_drop_labels

__all__ = [
    "cdr",
    "class_drop_grid",
    "class_drop_labels",
    "degrade",
    "guidance_grid",
    "make_grid",
    "noise_split_grid",
    "psnr",
    "restoration_bands",
    "restoration_hook",
    "restore",
    "sdedit",
    "save_grid",
    "save_labelled_grid",
    "split_noise",
    "to_uint8",
]


# --------------------------------------------------------------------------------------------- grids
def to_uint8(images: Tensor) -> np.ndarray:
    """``(N, C, H, W)`` floats in [0, 1] -> ``(N, H, W, C)`` uint8 (C = 1 or 3)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1|3, H, W), got {tuple(images.shape)}")
    arr = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    return arr.transpose(0, 2, 3, 1)


def make_grid(images: Tensor, nrow: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile images into one array.

    Args:
        images: ``(N, C, H, W)`` in [0, 1].
        nrow: images per row (default ``ceil(sqrt(N))``).
        pad: pixels between tiles.
        pad_value: grey level of the padding.

    Returns:
        ``(rows*(H+pad)+pad, nrow*(W+pad)+pad, C)`` uint8 array.
    """
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = arr[i]
    return out


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, pad: int = 2,
              scale: int = 1) -> Path:
    """Write ``(N, C, H, W)`` images in [0, 1] as one PNG grid (``scale``: integer nearest upscaling)."""
    grid = make_grid(images, nrow, pad)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def save_labelled_grid(images: Tensor, labels: Tensor | Sequence[int], path: str | Path,
                       per_row: int | None = None, class_names: Sequence[str] | None = None, pad: int = 2,
                       scale: int = 2) -> Path:
    """PNG grid with one row per class, the class written at the left of its row.

    Images are grouped by label (classes in increasing order, images in their original order within a class);
    a class with more than ``per_row`` images continues on the next row (labelled again).

    Args:
        images: ``(N, C, H, W)`` in [0, 1].
        labels: ``(N,)`` class of each image.
        path: output PNG.
        per_row: images per row (default: the largest class count).
        class_names: text of each class (default: the class index).
        pad: pixels between tiles (before ``scale``).
        scale: integer nearest upscaling of the tiles (the label text is drawn after scaling).
    """
    from PIL import ImageDraw, ImageFont

    y = torch.as_tensor(labels).reshape(-1).cpu()
    if len(y) != len(images):
        raise ValueError(f"{len(y)} labels for {len(images)} images")
    rows: list[tuple[int, Tensor]] = []
    counts = {int(c): int((y == c).sum()) for c in torch.unique(y)}
    per = per_row or max(counts.values())
    for c in sorted(counts):
        idx = torch.nonzero(y == c).flatten()
        for i in range(0, len(idx), per):
            rows.append((c, idx[i:i + per]))
    h, w = images.shape[-2:]
    tile = torch.ones((len(rows) * per, *images.shape[1:]), dtype=torch.float32)
    for r, (_, idx) in enumerate(rows):
        tile[r * per: r * per + len(idx)] = images[idx].detach().float().cpu()
    grid = make_grid(tile, nrow=per, pad=pad)
    body = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        body = body.resize((body.width * scale, body.height * scale), Image.NEAREST)
    font = ImageFont.load_default()
    names = [str(class_names[c]) if class_names else str(c) for c, _ in rows]
    probe = ImageDraw.Draw(body)
    margin = 8 + max(int(probe.textlength(n, font=font)) for n in names)
    out = Image.new(body.mode, (body.width + margin, body.height), 255 if body.mode == "L" else (255, 255, 255))
    out.paste(body, (margin, 0))
    draw = ImageDraw.Draw(out)
    ink = 0 if out.mode == "L" else (0, 0, 0)
    for r, name in enumerate(names):
        top = (pad + r * (h + pad)) * scale
        draw.text((4, top + (h * scale) // 2 - 5), name, fill=ink, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path, format="PNG")
    return path


# --------------------------------------------------------------------------------------------- class drop
def cdr(fid_full: Mapping[int, float] | Sequence[float], fid_drop: Mapping[int, float] | Sequence[float]
        ) -> dict:
    """Class-drop ratio with the per-class ratios: mean over classes of ``FID_drop(c) / FID_full(c)``.

    The mean is :func:`kflow_image.metrics.class_drop_ratio` (see there why it is drop/full although the
    paper prints bef/aft). ``FID_full(c)``: class ``c`` sampled with the label for all of ``k``;
    ``FID_drop(c)``: with the label for an initial fraction only (the paper keeps 30%).

    Returns:
        ``{"cdr": mean ratio, "per_class": {c: ratio}}``.
    """
    full = dict(fid_full) if isinstance(fid_full, Mapping) else dict(enumerate(fid_full))
    drop = dict(fid_drop) if isinstance(fid_drop, Mapping) else dict(enumerate(fid_drop))
    if set(full) != set(drop) or not full:
        raise ValueError(f"cdr needs the same non-empty classes in both: {sorted(full)} vs {sorted(drop)}")
    return {"cdr": class_drop_ratio(full, drop),
            "per_class": {c: float(drop[c]) / float(full[c]) for c in full}}


# --------------------------------------------------------------------------------------------- noise split
def split_noise(transform: KTransform, n: int, event_shape: Sequence[int], kappa_min: float = 0.0,
                kappa_max: float = 1.0, generator: torch.Generator | None = None,
                shared: Tensor | None = None, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Source noise whose coefficients in the chosen bands are shared across the batch.

    ``x_0 = T^-1(m * T z_shared + (1 - m) * T z_i)`` with ``m`` the band mask of ``kappa`` in
    ``[kappa_min, kappa_max]``: still exactly ``N(0, I)`` per sample (``T`` is orthonormal), with the masked
    coefficients identical for every sample. Sharing the fine bands keeps details and varies the coarse
    layout (paper §4.1, Fig. 9).

    Args:
        transform: the task's transform.
        n: batch size.
        event_shape: ``(C, H, W)``.
        kappa_min: lowest shared scale.
        kappa_max: highest shared scale.
        generator: RNG.
        shared: optional ``(C, H, W)`` shared noise (default: drawn).
        dtype: dtype of the noise.

    Returns:
        ``(x_0 (n, C, H, W), mask)`` with ``mask`` shaped like ``transform.kappa``.
    """
    shape = tuple(int(s) for s in event_shape)
    dev = transform.kappa.device
    z = torch.randn((n, *shape), generator=generator, dtype=dtype).to(dev)
    if shared is None:
        shared = torch.randn(shape, generator=generator, dtype=dtype)
    zs = shared.to(device=dev, dtype=dtype).expand(n, *shape)
    mask = band_mask(transform, kappa_min, kappa_max).to(device=dev, dtype=dtype)
    return transform.mix(zs, mask) + transform.mix(z, 1 - mask), mask


# --------------------------------------------------------------------------------------------- restoration
def _gaussian_kernel(sigma: float) -> Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def degrade(images: Tensor, kind: str = "downsample", factor: int = 4, sigma: float = 2.0) -> Tensor:
    """Degraded observation at full resolution.

    Args:
        images: ``(N, C, H, W)`` in [0, 1].
        kind: ``downsample`` (box-average by ``factor``, bicubic back up: super-resolution input) or ``blur``
            (Gaussian blur of std ``sigma`` pixels, reflect padding: deblurring input).
        factor: downsampling factor.
        sigma: blur std.

    Returns:
        ``(N, C, H, W)`` in [0, 1].
    """
    h, w = images.shape[-2:]
    if kind == "downsample":
        if h % factor or w % factor:
            raise ValueError(f"image size {h}x{w} is not divisible by the downsampling factor {factor}")
        low = F.avg_pool2d(images, factor)
        return F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    if kind == "blur":
        k = _gaussian_kernel(sigma).to(images)
        c, r = images.shape[1], (k.numel() - 1) // 2
        x = F.pad(images, (r, r, r, r), mode="reflect")
        x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c).clamp(0, 1)
    raise ValueError(f"unknown degradation {kind!r}; choose 'downsample' or 'blur'")


def restoration_bands(task: ImageFlowTask, event_shape: Sequence[int] | None = None) -> KTransform:
    """The transform whose scales define "coarse bands" for restoration and noise splitting.

    The task's own transform, except when all its scales are equal (``identity``: the ``w = 1`` baseline has no
    bands): then a :class:`kflow.transforms.FourierTransform` of ``event_shape`` (default: the shape the
    identity transform was built for), so the baseline gets the same trick on Fourier bands (ILVR-style
    low-pass replacement on its straight path).
    """
    t = task.transform
    kappa = t.kappa
    if kappa.numel() > 1 and bool((kappa != kappa.flatten()[0]).any()):
        return t
    from kflow.transforms import FourierTransform

    shape = event_shape or getattr(t, "event_shape", None)
    if shape is None:
        raise ValueError("the task's transform has no bands; pass event_shape for a Fourier band transform")
    return FourierTransform(tuple(int(s) for s in shape)).to(kappa.device)


def restoration_hook(task: ImageFlowTask, x_0: Tensor, observation: Tensor, kappa_max: float,
                     kappa_min: float = 0.0, bands: KTransform | None = None):
    """Solver hook that pins the coarse coefficients to the path through the observation's latent.

    After the step to ``k'``: ``x <- x + B^-1(m * B(x_obs(k') - x))`` with
    ``x_obs(k') = KPath.sample(x_0, observation, k').x_k`` and ``m`` the mask of scales in
    ``[kappa_min, kappa_max]`` of the band transform ``B``; at ``k' = 1`` the masked coefficients equal the
    observation's.

    Args:
        task: the image task (its path).
        x_0: ``(B, C, H, W)`` the sampler's starting noise.
        observation: ``(B, C, H, W)`` latent of the degraded image.
        kappa_max: highest scale taken from the observation.
        kappa_min: lowest scale taken from the observation.
        bands: the band transform ``B`` (default: :func:`restoration_bands`, i.e. the task's transform, or
            Fourier bands for a task without bands).
    """
    t = bands if bands is not None else restoration_bands(task, x_0.shape[1:])
    mask = band_mask(t, kappa_min, kappa_max).to(device=x_0.device, dtype=x_0.dtype)

    def hook(step: int, k_next: Tensor, x: Tensor) -> Tensor:
        target = task.path.sample(x_0, observation.to(x), k_next).x_k
        return x + t.mix(target - x, mask)

    return hook


@torch.no_grad()
def restore(task: ImageFlowTask, model: nn.Module, codec: nn.Module, degraded: Tensor,
            y: Tensor | None = None, kappa_max: float = 0.25, steps: int | None = None, cfg_scale: float = 1.0,
            generator: torch.Generator | None = None, method: str | None = None,
            solver: SolverConfig | None = None, bands: KTransform | None = None) -> tuple[Tensor, Tensor]:
    """Training-free restoration: sample with the coarse bands fixed from the degraded observation.

    Args:
        task: the trained task; for a task without bands (``identity``) the bands are Fourier bands
            (:func:`restoration_bands`).
        model: the network.
        codec: encodes the degraded images and decodes the result.
        degraded: ``(B, C, H, W)`` degraded images in [0, 1] at full resolution (see :func:`degrade`).
        y: optional ``(B,)`` labels.
        kappa_max: highest scale taken from the observation (its coarse bands).
        steps: overrides ``solver.steps``.
        cfg_scale: guidance scale.
        generator: RNG of the source noise.
        method: overrides ``solver.method``.
        solver: the sampler (default :class:`kflow.solver.SolverConfig()`).
        bands: the band transform (default :func:`restoration_bands`).

    Returns:
        ``(restored images (B, C, H, W) in [0, 1], restored latents)``.
    """
    dev = next(model.parameters()).device
    obs = codec.encode(degraded.to(dev))
    x_0 = torch.randn(obs.shape, generator=generator).to(dev)
    hook = restoration_hook(task, x_0, obs, kappa_max, bands=bands)
    solver = (solver or SolverConfig()).replace(steps=steps, method=method)
    sol = task.sample(model, y, solver, x_0=x_0, cfg_scale=cfg_scale, hook=hook)
    return codec.decode(sol.x_1), sol.x_1


@torch.no_grad()
def sdedit(task: ImageFlowTask, model: nn.Module, codec: nn.Module, degraded: Tensor, k_start: float = 0.5,
           y: Tensor | None = None, steps: int | None = None, cfg_scale: float = 1.0,
           generator: torch.Generator | None = None, solver: SolverConfig | None = None
           ) -> tuple[Tensor, Tensor]:
    """SDEdit-style restoration (Meng et al. 2022): put the observation's latent on the path at ``k_start``
    (``x = KPath.sample(x_0, obs, k_start).x_k`` with fresh noise ``x_0``) and integrate from there to ``k = 1``.

    The baseline's restoration trick; it works for any transform (for K-Flow the coarse bands of the
    observation are then already mostly revealed at ``k_start``). ``k_start = 0`` is plain generation,
    ``k_start = 1`` returns the observation.

    Args:
        k_start: where the observation enters the path, in ``[0, 1)``.
        steps: sampler steps over ``[k_start, 1]`` (default: ``solver.steps`` scaled by ``1 - k_start``, the
            same step size as a full solve).
        (others as in :func:`restore`)

    Returns:
        ``(restored images in [0, 1], restored latents)``.
    """
    if not 0.0 <= k_start < 1.0:
        raise ValueError(f"k_start must be in [0, 1), got {k_start}")
    dev = next(model.parameters()).device
    obs = codec.encode(degraded.to(dev))
    x_0 = torch.randn(obs.shape, generator=generator).to(dev)
    solver = solver or SolverConfig()
    n = steps or max(1, round(solver.steps * (1 - k_start)))
    x_start = task.path.sample(x_0, obs, torch.full((len(obs),), k_start, device=dev, dtype=obs.dtype)).x_k
    grid = torch.linspace(k_start, 1.0, n + 1, dtype=torch.float64)
    sol = task.sample(model, y, solver, x_0=x_start, grid=grid, cfg_scale=cfg_scale)
    return codec.decode(sol.x_1), sol.x_1


# --------------------------------------------------------------------------------------------- figure grids
def _labels(classes: Sequence[int], n_per: int, device) -> Tensor:
    return torch.tensor([c for c in classes for _ in range(n_per)], device=device, dtype=torch.long)


@torch.no_grad()
def guidance_grid(task: ImageFlowTask, model: nn.Module, codec: nn.Module, out: str | Path,
                  classes: Sequence[int], scales: Sequence[float] = (1.0, 2.0, 4.0), n_per: int = 2,
                  steps: int = 50, seed: int = 0, event_shape: Sequence[int] | None = None) -> Path:
    """One row per guidance scale (same noise and classes in every row)."""
    dev = next(model.parameters()).device
    y = _labels(classes, n_per, dev)
    g = torch.Generator().manual_seed(seed)
    shape = event_shape or _event_shape(model)
    x_0 = torch.randn((len(y), *shape), generator=g).to(dev)
    rows = [codec.decode(task.sample(model, y=y, x_0=x_0, steps=steps, cfg_scale=s).x_1) for s in scales]
    return save_grid(torch.cat(rows), out, nrow=len(y))


@torch.no_grad()
def class_drop_grid(task: ImageFlowTask, model: nn.Module, codec: nn.Module, out: str | Path,
                    classes: Sequence[int], drops: Sequence[float | None] = (None, 0.6, 0.3),
                    n_per: int = 2, steps: int = 50, cfg_scale: float = 1.0, seed: int = 0,
                    event_shape: Sequence[int] | None = None) -> Path:
    """One row per class-drop point (``None`` = label kept throughout), same noise in every row."""
    dev = next(model.parameters()).device
    y = _labels(classes, n_per, dev)
    g = torch.Generator().manual_seed(seed)
    shape = event_shape or _event_shape(model)
    x_0 = torch.randn((len(y), *shape), generator=g).to(dev)
    rows = [codec.decode(task.sample(model, y=y, x_0=x_0, steps=steps, cfg_scale=cfg_scale,
                                     class_drop_at=d).x_1) for d in drops]
    return save_grid(torch.cat(rows), out, nrow=len(y))


@torch.no_grad()
def noise_split_grid(task: ImageFlowTask, model: nn.Module, codec: nn.Module, out: str | Path,
                     kappa_min: float, kappa_max: float = 1.0, n: int = 8, rows: int = 2,
                     y: Tensor | None = None, steps: int = 50, cfg_scale: float = 1.0, seed: int = 0,
                     event_shape: Sequence[int] | None = None) -> Path:
    """``rows`` rows of ``n`` samples; within a row the noise of scales in ``[kappa_min, kappa_max]`` is shared."""
    dev = next(model.parameters()).device
    shape = event_shape or _event_shape(model)
    g = torch.Generator().manual_seed(seed)
    task.transform.to(dev)
    imgs = []
    for _ in range(rows):
        x_0, _ = split_noise(task.transform, n, shape, kappa_min, kappa_max, generator=g)
        yy = None if y is None else torch.as_tensor(y, device=dev)[:n]
        imgs.append(codec.decode(task.sample(model, y=yy, x_0=x_0, steps=steps, cfg_scale=cfg_scale).x_1))
    return save_grid(torch.cat(imgs), out, nrow=n)


def _event_shape(model: nn.Module) -> tuple[int, int, int]:
    cfg = model.config
    size = cfg.input_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (cfg.in_channels, h, w)
