"""The image K-Flow task on latents: transforms for ``(C, H, W)`` latents, the training loss and the sampler.

A batch is ``(x_1, y)``: standardised latents ``(B, C, H, W)`` and integer labels ``(B,)``. Training draws
``x_0 ~ N(0, I)`` and ``k`` (uniform or logit-normal), takes the path point from :class:`kflow.path.KPath`
(the one implementation of the interpolant) and regresses the endpoint ``x_1`` (default) or the conditional
velocity ``dx_k``. The transform decides the order in which latent coefficients are revealed:

* ``identity`` with ``window = 1``: plain rectified flow on latents (the LFM-style baseline);
* ``fourier``: radial frequency of the orthonormal 2-D real (Hartley) spectrum over the latent ``H, W``;
* ``wavelet``: 2-D DWT (``haar``/``db2``/...; the core refuses level counts the latent size cannot take);
* ``pca``: principal directions fitted on training latents (most variance first).

Sampling (:meth:`ImageFlowTask.sample`) integrates along ``k`` with :func:`kflow.solver.solve`, or with the
exact-increment rule using a *re-estimated* source (``x0_mode="estimate"``, the default; see
:meth:`kflow.path.KPath.estimate_source` for why the given ``x_0`` is not used as is).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from kflow.path import KPath
from kflow.schedule import BandSchedule, KappaWarp, make_grid
from kflow.solver import Solution, SolverConfig, solve
from kflow.transforms import FourierTransform, IdentityTransform, KTransform, PCATransform, WaveletTransform

__all__ = [
    "TRANSFORMS",
    "ImageFlowTask",
    "band_mask",
    "build_transform",
    "class_drop_labels",
    "fit_energy_warp",
    "make_task",
    "unpack_batch",
]

TRANSFORMS = ("identity", "fourier", "wavelet", "pca")
Hook = Callable[[int, Tensor, Tensor], "Tensor | None"]


def build_transform(name: str, event_shape: Sequence[int], *, wave: str = "haar", levels: int | None = None,
                    fit_data: Tensor | None = None) -> KTransform:
    """Build the K-amplitude transform of an image task.

    Args:
        name: ``identity``, ``fourier``, ``wavelet`` or ``pca``.
        event_shape: shape of one latent ``(C, H, W)``.
        wave: wavelet name (``wavelet`` only).
        levels: wavelet levels; ``None`` = the most the latent size allows for ``wave``.
        fit_data: ``(N, C, H, W)`` training latents, required for ``pca``.

    Returns:
        The transform; ``kappa`` has shape ``(1, ...)`` broadcastable against ``(B, C, H, W)``.

    Raises:
        ValueError: unknown name, missing fit data, or a wavelet level count invalid for the size.
    """
    shape = tuple(int(s) for s in event_shape)
    if len(shape) != 3:
        raise ValueError(f"image latents must be (C, H, W), got event shape {shape}")
    if name == "identity":
        return IdentityTransform(event_dims=3)
    if name == "fourier":
        return FourierTransform(shape, dims=(-2, -1))
    if name == "wavelet":
        return WaveletTransform(shape, wave=wave, levels=levels)
    if name == "pca":
        t = PCATransform(shape)
        if fit_data is None:
            raise ValueError("the pca transform must be fitted: pass the training latents as fit_data")
        return t.fit(fit_data)
    raise ValueError(f"unknown image transform {name!r}; choose one of {TRANSFORMS}")


@torch.no_grad()
def fit_energy_warp(transform: KTransform, latents: Tensor, seed: int = 0) -> KappaWarp:
    """Energy-aware timing (paper §3.2) fitted on the *dataset*: band energy of ``T x_1 - T x_0``.

    Args:
        transform: the task's transform.
        latents: ``(N, C, H, W)`` training latents.
        seed: seed of the source noise ``x_0``.
    """
    g = torch.Generator().manual_seed(seed)
    x1 = latents.float()
    x0 = torch.randn(x1.shape, generator=g)
    energy = (transform(x1) - transform(x0)).pow(2).mean(0, keepdim=True)
    return KappaWarp.from_coefficients(transform.kappa.cpu(), energy)


def band_mask(transform: KTransform, kappa_min: float = 0.0, kappa_max: float = 1.0,
              like: Tensor | None = None) -> Tensor:
    """0/1 mask of the coefficients whose scale lies in ``[kappa_min, kappa_max]``.

    Args:
        transform: the transform (its raw ``kappa``, before any energy warp).
        kappa_min: lowest scale included.
        kappa_max: highest scale included.
        like: optional tensor whose shape/dtype/device the mask is expanded to (``(B, C, H, W)``).

    Returns:
        Float mask shaped like ``transform.kappa`` (or ``like``).
    """
    kappa = transform.kappa
    mask = ((kappa >= kappa_min - 1e-9) & (kappa <= kappa_max + 1e-9)).to(torch.float64)
    if like is not None:
        mask = mask.to(device=like.device, dtype=like.dtype).expand_as(like)
    return mask


def class_drop_labels(y: Tensor, k: Tensor, k_drop: float, null_class: int) -> Tensor:
    """Labels for the class-condition drop: ``y`` where ``k < k_drop``, the null class elsewhere.

    Args:
        y: ``(B,)`` labels.
        k: ``(B,)`` (or scalar) current scale.
        k_drop: fraction of ``[0, 1]`` during which the label is kept.
        null_class: the model's null label.
    """
    k = torch.as_tensor(k, device=y.device)
    return torch.where(k < k_drop, y, torch.full_like(y, null_class))


def unpack_batch(batch) -> tuple[Tensor, Tensor | None]:
    """``(x_1, y)`` from a tuple/list ``(latents, labels)``, a dict or a bare tensor (no labels)."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, dict):
        x = next((batch[k] for k in ("x_1", "x", "latents", "image", "images") if k in batch), None)
        y = next((batch[k] for k in ("y", "label", "labels") if k in batch), None)
        if x is None:
            raise ValueError(f"batch dict has no latents under x_1/x/latents/image(s): keys {sorted(batch)}")
        return x, y
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(f"cannot read a batch of type {type(batch).__name__}: expected (latents, labels)")


class ImageFlowTask(nn.Module):
    """K-Flow on image latents: loss for the :class:`kflow.train.Trainer` and class-conditional sampling.

    The module holds the transform and the schedule (their buffers, e.g. a fitted PCA basis or an energy
    warp, are in its ``state_dict``).

    Args:
        transform: the K-amplitude transform over ``(C, H, W)`` latents.
        schedule: the band schedule (``BandSchedule(1.0)`` with ``identity`` = rectified flow).
        num_classes: number of classes; label ``num_classes`` is the null class (0 = unconditional task).
        label_dropout: probability of replacing a label by the null class in training (enables guidance).
        k_sampling: ``uniform`` or ``logit_normal`` (``sigmoid(N(logit_mean, logit_std))``).
        logit_mean: mean of the logit-normal.
        logit_std: std of the logit-normal.
        prediction: ``endpoint`` (the model predicts ``x1_hat``) or ``velocity`` (it predicts ``dx_k``).
        loss_weighting: ``none``, or ``unrevealed``: endpoint errors weighted per coefficient by
            ``1 - mu(k, kappa)`` (coefficients already revealed are visible in ``x_k``; their error is cheap).
    """

    def __init__(self, transform: KTransform, schedule: BandSchedule, num_classes: int = 10,
                 label_dropout: float = 0.1, k_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0, prediction: str = "endpoint", loss_weighting: str = "none"):
        super().__init__()
        if k_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"k_sampling must be 'uniform' or 'logit_normal', got {k_sampling!r}")
        if prediction not in ("endpoint", "velocity"):
            raise ValueError(f"prediction must be 'endpoint' or 'velocity', got {prediction!r}")
        if loss_weighting not in ("none", "unrevealed"):
            raise ValueError(f"loss_weighting must be 'none' or 'unrevealed', got {loss_weighting!r}")
        if loss_weighting != "none" and prediction != "endpoint":
            raise ValueError("loss_weighting applies to the endpoint loss only")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        self.transform, self.schedule = transform, schedule
        self.path = KPath(transform, schedule)
        self.num_classes, self.label_dropout = int(num_classes), float(label_dropout)
        self.k_sampling, self.logit_mean, self.logit_std = k_sampling, float(logit_mean), float(logit_std)
        self.prediction, self.loss_weighting = prediction, loss_weighting

    @property
    def null_class(self) -> int:
        return self.num_classes

    # ------------------------------------------------------------------------------------------ training
    def draw_k(self, b: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               generator: torch.Generator | None = None) -> Tensor:
        """``(b,)`` scales from the training distribution of ``k``."""
        if self.k_sampling == "uniform":
            return torch.rand(b, generator=generator, device=device, dtype=dtype)
        z = torch.randn(b, generator=generator, device=device, dtype=dtype)
        return torch.sigmoid(self.logit_mean + self.logit_std * z)

    def drop_labels(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Replace labels by the null class with probability ``label_dropout``."""
        if self.label_dropout <= 0:
            return y
        drop = torch.rand(y.shape, generator=generator, device=y.device) < self.label_dropout
        return torch.where(drop, torch.full_like(y, self.null_class), y)

    def loss(self, model: nn.Module, batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Flow-matching loss of one batch (the ``loss_fn`` of :class:`kflow.train.Trainer`).

        Args:
            model: ``model(x_k, k, y=labels)`` (may be DDP-wrapped).
            batch: ``(x_1 (B, C, H, W), y (B,))``; ``y`` may be ``None`` for an unconditional task.

        Returns:
            ``(loss, {"mse_endpoint": ..., ...})``; randomness comes from the global RNG, which the trainer
            reseeds every step (exact resume).
        """
        x_1, y = unpack_batch(batch)
        x_1 = x_1.float()
        b = x_1.shape[0]
        x_0 = torch.randn_like(x_1)
        k = self.draw_k(b, x_1.device, x_1.dtype)
        ps = self.path.sample(x_0, x_1, k)
        cond = {}
        if self.num_classes > 0:
            if y is None:
                y = torch.full((b,), self.null_class, dtype=torch.long, device=x_1.device)
            cond["y"] = self.drop_labels(torch.as_tensor(y, device=x_1.device).long())
        pred = model(ps.x_k, ps.k, **cond).float()
        if self.prediction == "velocity":
            loss = (pred - ps.dx_k).pow(2).mean()
            return loss, {"mse_velocity": loss.detach()}
        err = pred - x_1
        mse = err.pow(2).mean()
        if self.loss_weighting == "unrevealed":
            mu, _ = self.path.weights(ps.k, x_1)
            w = (1 - mu).expand_as(err)
            loss = (w * self.transform(err).pow(2)).sum() / w.sum().clamp_min(1e-12)
        else:
            loss = mse
        return loss, {"mse_endpoint": mse.detach()}

    def forward(self, model: nn.Module, batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Same as :meth:`loss` (so the task can be passed as the trainer's ``loss_fn``)."""
        return self.loss(model, batch)

    # ------------------------------------------------------------------------------------------ sampling
    def grid(self, steps: int, kind: str = "uniform", coarse_weight: float = 2.0) -> Tensor:
        """``(steps + 1,)`` k-grid: ``uniform`` or ``band`` (more steps where coarse bands are revealed)."""
        if kind == "uniform":
            return make_grid(steps, "uniform")
        return make_grid(steps, kind, schedule=self.schedule, bands=self.transform.distinct_kappa(),
                         coarse_weight=coarse_weight)

    def model_fn(self, model: nn.Module, y: Tensor | None = None, cfg_scale: float = 1.0,
                 class_drop_at: float | None = None, cfg_interval: Sequence[float] | None = None
                 ) -> Callable[[Tensor, Tensor], Tensor]:
        """Closure ``fn(x_k, k)`` for the solver: conditional, guided, and with the class drop.

        Args:
            model: the network (a :class:`kflow_image.dit.DiT` or anything with the same call).
            y: ``(B,)`` labels or ``None`` (unconditional).
            cfg_scale: classifier-free guidance scale (1 = none).
            cfg_interval: ``(k_lo, k_hi)``: guide only for ``k_lo <= k < k_hi`` (plain conditional elsewhere);
                ``None`` = everywhere. Guidance while the mean brightness (DC) is revealed extrapolates it:
                thin classes ("1") turn blank.
            class_drop_at: when set, the label is used only for ``k < class_drop_at``; afterwards the null
                class (the paper's class-condition drop; guidance then has nothing to act on).
        """
        null = self.null_class

        def fn(x: Tensor, k: Tensor) -> Tensor:
            labels = y
            if labels is not None and class_drop_at is not None:
                labels = class_drop_labels(labels, k, class_drop_at, null)
            if labels is None or self.num_classes == 0 or bool((labels == null).all()):
                return model(x, k, y=None) if self.num_classes > 0 else model(x, k)
            if cfg_scale != 1.0:
                if cfg_interval is None:
                    return model.forward_with_cfg(x, k, labels, cfg_scale)
                inside = (k >= cfg_interval[0]) & (k < cfg_interval[1])
                if bool(inside.all()):
                    return model.forward_with_cfg(x, k, labels, cfg_scale)
                if not bool(inside.any()):
                    return model(x, k, y=labels)
                scale = torch.where(inside, cfg_scale, 1.0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
                cond, uncond = model(x, k, y=labels), model(x, k, y=None)
                return uncond + scale * (cond - uncond)
            return model(x, k, y=labels)

        return fn

    @torch.no_grad()
    def sample(self, model: nn.Module, batch: Tensor | int | None = None, solver: SolverConfig | None = None, *,
               n: int | None = None, y: Tensor | None = None, event_shape: Sequence[int] | None = None,
               steps: int | None = None, grid: Tensor | None = None, grid_kind: str | None = None,
               cfg_scale: float = 1.0, class_drop_at: float | None = None,
               cfg_interval: Sequence[float] | None = None,
               x_0: Tensor | None = None, method: str | None = None, x0_mode: str | None = None,
               generator: torch.Generator | None = None, hook: Hook | None = None,
               return_trajectory: bool = False, device: torch.device | str | None = None) -> Solution:
        """Generate latents (the task protocol's ``sample(model, batch, solver)``; ``docs/CONTRACTS.md``).

        Args:
            model: the trained network (use the EMA copy).
            batch: what to condition on: ``(n,)`` labels (the same as ``y``), or a sample count ``n``.
            solver: method, steps, grid and source of the integration (default :class:`SolverConfig()`:
                50 uniform exact-increment steps, re-estimated source).
            n: number of samples (default ``len(y)`` or ``len(x_0)``).
            y: ``(n,)`` labels; ``None`` = unconditional.
            event_shape: ``(C, H, W)``; needed when ``x_0`` is not given (default: the model's config).
            steps: overrides ``solver.steps`` (when ``grid`` is not given).
            grid: explicit ``(steps + 1,)`` k-grid.
            grid_kind: overrides ``solver.grid`` (``uniform`` or ``band``).
            cfg_scale: classifier-free guidance scale.
            cfg_interval: ``(k_lo, k_hi)`` where guidance applies (see :meth:`model_fn`); ``None`` = all of k.
            class_drop_at: drop the label for ``k >= class_drop_at``.
            x_0: ``(n, C, H, W)`` starting noise (e.g. from :func:`kflow_image.sampling.split_noise`).
            method: overrides ``solver.method`` (``exact``, ``euler`` or ``heun``).
            x0_mode: overrides ``solver.source``: ``estimate`` (re-estimate the source at each step, see
                :func:`kflow.solver.solve`) or ``fixed`` (use the starting noise throughout).
            generator: RNG for ``x_0``.
            hook: ``hook(step, k_next, x) -> x | None`` after each step (e.g. restoration).
            return_trajectory: keep every state.
            device: where to sample (default: the model's device).

        Returns:
            :class:`kflow.solver.Solution` with ``x_1`` ``(n, C, H, W)``.
        """
        if isinstance(batch, int):
            n = batch if n is None else n
        elif batch is not None:
            if y is not None:
                raise ValueError("give the labels once: as batch or as y")
            y = batch
        if x0_mode not in (None, "estimate", "fixed"):
            raise ValueError(f"x0_mode must be 'estimate' or 'fixed', got {x0_mode!r}")
        solver = (solver or SolverConfig()).replace(steps=steps, grid=grid_kind, method=method, source=x0_mode)
        method = solver.method
        if device is None:
            device = next(model.parameters()).device
        if x_0 is None:
            if n is None:
                if y is None:
                    raise ValueError("give n, y or x_0")
                n = len(y)
            if event_shape is None:
                cfg = getattr(model, "config", None)
                if cfg is None:
                    raise ValueError("event_shape is needed when the model has no config")
                size = cfg.input_size
                h, w = (size, size) if isinstance(size, int) else tuple(size)
                event_shape = (cfg.in_channels, h, w)
            x_0 = torch.randn((n, *event_shape), generator=generator).to(device)
        x_0 = x_0.to(device)
        if not x_0.is_floating_point():
            raise ValueError(f"x_0 must be a floating-point tensor, got {x_0.dtype}")
        if y is not None:
            y = torch.as_tensor(y, device=device).long()
            if len(y) != len(x_0):
                raise ValueError(f"{len(y)} labels for {len(x_0)} samples")
        if grid is None:
            grid = self.grid(solver.steps, solver.grid)
        fn = self.model_fn(model, y, cfg_scale, class_drop_at, cfg_interval)
        self.transform.to(device)
        self.schedule.to(device)

        if self.prediction == "velocity":
            if method == "exact":
                method = "euler"  # the exact increment needs an endpoint
            return solve(self.path, x_0, fn, grid, method=method, prediction="velocity", hook=hook,
                         return_trajectory=return_trajectory)
        return solve(self.path, x_0, fn, grid, method=method, prediction="endpoint", hook=hook,
                     return_trajectory=return_trajectory, source=solver.source)


def make_task(transform: str | KTransform, event_shape: Sequence[int], schedule: BandSchedule, *,
              wave: str = "haar", levels: int | None = None, fit_data: Tensor | None = None,
              energy_warp: bool = False, state_dict: dict | None = None, seed: int = 0,
              **task_kwargs) -> ImageFlowTask:
    """Build an :class:`ImageFlowTask` for training (``fit_data``) or restore one (``state_dict``).

    Args:
        transform: a built transform (e.g. instantiated from a ``transform`` config; an unfitted
            :class:`PCATransform` is fitted on ``fit_data`` unless ``state_dict`` restores it), or the name
            ``identity | fourier | wavelet | pca`` (:func:`build_transform` with ``wave`` and ``levels``).
        event_shape: ``(C, H, W)`` of one latent.
        schedule: the band schedule (without warp); it is not modified: with ``energy_warp`` the task holds a
            warped copy.
        wave: wavelet name (named transforms only).
        levels: wavelet levels (named transforms only).
        fit_data: ``(N, C, H, W)`` training latents: fits the PCA basis and the energy warp.
        energy_warp: warp ``kappa`` by the dataset band energy (needs ``fit_data`` or ``state_dict``).
        state_dict: a saved ``ImageFlowTask.state_dict()`` (PCA basis, warp) to restore instead of fitting.
        seed: seed of the noise used to fit the energy warp.
        **task_kwargs: the remaining :class:`ImageFlowTask` arguments.
    """
    shape = tuple(int(s) for s in event_shape)
    pca = transform == "pca" or isinstance(transform, PCATransform)
    if state_dict is None and fit_data is None and (pca or energy_warp):
        raise ValueError(f"transform={transform!r} energy_warp={energy_warp} needs fit_data (training latents)")
    if isinstance(transform, KTransform):
        t = transform.fit(fit_data) if pca and state_dict is None else transform
    elif state_dict is not None and pca:
        t = PCATransform(shape)  # the basis comes from the state dict
    else:
        t = build_transform(transform, shape, wave=wave, levels=levels, fit_data=fit_data)
    if energy_warp:
        schedule = copy.deepcopy(schedule)
        if state_dict is not None:
            bands = state_dict["schedule.warp.bands"]
            schedule.warp = KappaWarp(bands, torch.ones_like(bands))
        else:
            schedule.warp = fit_energy_warp(t, fit_data, seed)
    task = ImageFlowTask(t, schedule, **task_kwargs)
    if state_dict is not None:
        task.load_state_dict(state_dict)
    return task
