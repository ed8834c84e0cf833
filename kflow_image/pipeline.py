"""The image application as a library: data, codec, task and model building, training, runs, generation
and metrics.

``kflow-image`` (:mod:`kflow_image.cli`) only parses arguments and calls these; the benchmarks and the tests
call the same functions. Configs arrive as plain dicts (the composed ``configs/image.yaml``: ``data``,
``model``, ``transform``, ``schedule``, ``solver``, ``task``, ``sample``, ``evaluate``, ``trainer``); no hydra
here. Bad user input raises :class:`kflow.cli.InputError`.

Typed objects: :class:`ImageData` (datasets and latents), :class:`SampleConfig` (guidance settings of a run),
:class:`ImageRun` (codec, task, EMA model and settings of a trained run), :class:`kflow.solver.SolverConfig`.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kflow.cli import InputError, check_device, check_targets, instantiate
from kflow.solver import SolverConfig
from kflow.utils import shared_dir

__all__ = [
    "FitResult",
    "ImageData",
    "ImageRun",
    "SampleConfig",
    "build_model",
    "build_task",
    "evaluate",
    "fit",
    "generate",
    "labels_for",
    "load_image_data",
    "load_image_sets",
    "load_run",
    "make_codec",
    "metric_block",
    "restore",
    "restore_images",
    "restore_inputs",
    "sample_grid",
    "save_samples",
    "solver_config",
    "split_bands",
    "standardized_latents",
    "train",
    "transform_name",
]

TRANSFORM_NAMES = {"IdentityTransform": "identity", "FourierTransform": "fourier", "WaveletTransform": "wavelet",
                   "PCATransform": "pca"}
TINY_IMAGENET_TAR = Path("data") / "images" / "tiny-imagenet-64-10class.tar"


# ------------------------------------------------------------------------------------------ config
def transform_name(tcfg: Mapping) -> str:
    """``identity | fourier | wavelet | pca`` of a ``transform`` config (its ``_target_`` class)."""
    target = str(tcfg.get("_target_", "")).rsplit(".", 1)[-1]
    if target not in TRANSFORM_NAMES:
        raise InputError(f"transform {target!r} is not an image transform; use one of "
                         f"transform=identity|fourier|wavelet|pca")
    return TRANSFORM_NAMES[target]


def solver_config(cfg: Mapping) -> SolverConfig:
    """The run's :class:`SolverConfig` from its ``solver`` block.

    Runs written before ``solver.source`` existed kept the source under ``sample.x0_mode``; it is read there.
    """
    s = dict(cfg["solver"])
    legacy = (cfg.get("sample") or {}).get("x0_mode")
    if "source" not in s and legacy is not None:
        s["source"] = legacy
    try:
        return SolverConfig.from_dict(s)
    except ValueError as err:
        raise InputError(str(err)) from None


@dataclass(frozen=True)
class SampleConfig:
    """Guidance settings of a run (the ``sample`` config block).

    Attributes:
        cfg_scale: classifier-free guidance scale (1 = none).
        cfg_interval: ``(k_lo, k_hi)``: guide only there; ``None`` = all of k.
        class_drop_at: keep the label only for ``k <`` this (``None`` = throughout).
        per_class: samples per class of the end-of-training grid.
        seed: seed of the end-of-training grid.
    """

    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] | None = None
    class_drop_at: float | None = None
    per_class: int = 8
    seed: int = 0

    @classmethod
    def from_dict(cls, d: Mapping | None) -> SampleConfig:
        d = dict(d or {})
        iv = d.get("cfg_interval")
        return cls(cfg_scale=float(d.get("cfg_scale", 1.0)), cfg_interval=tuple(iv) if iv else None,
                   class_drop_at=d.get("class_drop_at"), per_class=int(d.get("per_class", 8)),
                   seed=int(d.get("seed", 0)))


# ------------------------------------------------------------------------------------------ data
@dataclass
class ImageData:
    """Training and held-out images of a ``data`` config, and (after :func:`load_image_data`) their raw
    (unstandardised) latents.

    Attributes:
        train_set: dataset of ``(image (C, H, W) in [0, 1], label)``.
        heldout_set: the held-out images (may be empty).
        identity: cache-key base of the underlying data, or ``None`` when the datasets carry their own.
        num_classes: number of classes (0 = unlabelled).
        train: ``(latents (N, C, h, w), labels (N,))`` or ``None`` before encoding.
        heldout: the same for the held-out set, or ``None``.
    """

    train_set: Any
    heldout_set: Any
    identity: str | None
    num_classes: int
    train: tuple[Tensor, Tensor] | None = None
    heldout: tuple[Tensor, Tensor] | None = None


def load_image_sets(dcfg: Mapping) -> ImageData:
    """Training and held-out image datasets described by a ``data`` config (nothing is encoded)."""
    from torch.utils.data import Subset

    from kflow_image.data import ImageFolderDataset, MNISTDataset, TarImageDataset

    name = dcfg["name"]
    res, ch = int(dcfg["resolution"]), int(dcfg["channels"])
    if name == "mnist":
        full = MNISTDataset(dcfg.get("root"), "test", resolution=res, channels=ch)
        hold = int(dcfg.get("holdout") or 0)
        if hold >= len(full):
            raise InputError(f"data.holdout={hold} leaves no MNIST training images (have {len(full)})")
        train_set, held_set = Subset(full, range(len(full) - hold)), Subset(full, range(len(full) - hold, len(full)))
        ident = f"{full.identity()}:h{hold}"
    elif name == "tiny-imagenet":
        tar = dcfg.get("tar")
        if tar is None:
            shared = shared_dir()
            if shared is None:
                raise InputError("Tiny-ImageNet tar not found: pass data.tar=PATH or set KFLOW_SHARED")
            tar = shared / TINY_IMAGENET_TAR
        if not Path(tar).exists():
            raise InputError(f"Tiny-ImageNet tar not found: {tar}")
        train_set = TarImageDataset(tar, "train", resolution=res, channels=ch)
        held_set = TarImageDataset(tar, "val", resolution=res, channels=ch)
        ident = None
    elif name == "folder":
        full = ImageFolderDataset(dcfg["root"], res, ch)
        hold = int(dcfg.get("holdout") or 0)
        if hold >= len(full):
            raise InputError(f"data.holdout={hold} leaves no training images in {dcfg['root']}")
        perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(0)).tolist()
        train_set, held_set = Subset(full, perm[hold:]), Subset(full, perm[:hold])
        ident = full.identity() + f":perm0:h{hold}"
    else:
        raise InputError(f"unknown data {name!r} (mnist | tiny-imagenet | folder with data.root=PATH)")
    limit = dcfg.get("limit")
    if limit:
        train_set = Subset(train_set, range(min(int(limit), len(train_set))))
    n_cls = dcfg.get("num_classes")
    if n_cls is None:
        base = train_set
        while isinstance(base, Subset):
            base = base.dataset
        n_cls = getattr(base, "num_classes", 0)
    return ImageData(train_set, held_set, ident, int(n_cls))


def load_image_data(dcfg: Mapping, codec, cache: bool = True, progress: bool = True,
                    heldout: bool = True) -> ImageData:
    """:func:`load_image_sets` plus the raw (unstandardised) latents, cached on disk (``heldout=False``:
    the training latents only)."""
    from torch.utils.data import Subset

    from kflow_image.data import default_cache_dir, encode_latents

    data = load_image_sets(dcfg)
    cache_dir = default_cache_dir() / "latents" if cache else None

    def enc(ds, tag):
        key = None
        if isinstance(ds, Subset):
            key = f"{data.identity}|{tag}|{len(ds)}|{codec.identity()}"
        return encode_latents(ds, codec, cache_dir, progress=progress, cache_key=key)

    data.train = enc(data.train_set, "train")
    data.heldout = enc(data.heldout_set, "heldout") if heldout and len(data.heldout_set) else None
    return data


def standardized_latents(codec, raw: Tensor) -> Tensor:
    """Fit the codec's per-channel statistics on the training latents and return them standardised."""
    codec.fit_stats(raw)
    return codec.standardize(raw).float()


# ------------------------------------------------------------------------------------------ build
def make_codec(dcfg: Mapping):
    """The codec named by a ``data`` config (``identity`` or ``taef2``)."""
    from kflow_image.codecs import make_codec as _make

    if dcfg["codec"] == "identity":
        return _make("identity", channels=int(dcfg["channels"]))
    return _make(dcfg["codec"], image_channels=int(dcfg["channels"]))


def build_model(mcfg: Mapping, event_shape: tuple[int, int, int], num_classes: int, prediction: str):
    """The DiT for latents of shape ``(C, H, W)`` from a ``model`` config."""
    from kflow_image.dit import build_dit

    c, h, w = event_shape
    patch = mcfg.get("patch_size") or max(1, min(h, w) // 8)
    return build_dit(mcfg.get("preset"), in_channels=c, input_size=h if h == w else (h, w), patch_size=patch,
                     hidden_size=mcfg.get("hidden_size"), depth=mcfg.get("depth"),
                     num_heads=mcfg.get("num_heads"), mlp_ratio=mcfg.get("mlp_ratio"),
                     num_classes=num_classes, prediction=prediction)


def build_task(cfg: Mapping, event_shape, num_classes: int, fit_data: Tensor | None = None,
               state_dict: dict | None = None):
    """The :class:`kflow_image.task.ImageFlowTask` of a run config: fitted on ``fit_data`` (training) or
    restored from ``state_dict`` (a checkpoint)."""
    from kflow_image.task import make_task

    transform_name(cfg["transform"])  # an image transform, not another group's class
    transform = instantiate(dict(cfg["transform"]))(event_shape=tuple(int(s) for s in event_shape))
    sch = instantiate(dict(cfg["schedule"]))
    t = cfg["task"]
    return make_task(transform, event_shape, sch, fit_data=fit_data, energy_warp=bool(t.get("energy_warp")),
                     state_dict=state_dict, num_classes=num_classes, label_dropout=t["label_dropout"],
                     k_sampling=t["k_sampling"], logit_mean=t["logit_mean"], logit_std=t["logit_std"],
                     prediction=t["prediction"], loss_weighting=t["loss_weighting"])


# ------------------------------------------------------------------------------------------ runs
@dataclass
class ImageRun:
    """A trained image model ready to sample: what :func:`load_run` rebuilds from a checkpoint and what
    :func:`train` returns.

    Attributes:
        codec: the fitted codec (standardisation statistics included).
        task: the :class:`kflow_image.task.ImageFlowTask` (transform, schedule, fitted bases).
        model: the network (the EMA weights), in eval mode.
        event_shape: ``(C, H, W)`` of one latent.
        num_classes: number of classes (0 = unconditional).
        device: where the model lives.
        solver: how to integrate along k.
        sampling: guidance settings.
        cfg: the full run config (as stored in the checkpoint).
        path: the checkpoint file, when loaded from one.
        step: the training step of the weights.
    """

    codec: nn.Module
    task: nn.Module
    model: nn.Module
    event_shape: tuple[int, int, int]
    num_classes: int
    device: torch.device
    solver: SolverConfig = field(default_factory=SolverConfig)
    sampling: SampleConfig = field(default_factory=SampleConfig)
    cfg: dict = field(default_factory=dict)
    path: Path | None = None
    step: int = 0

    def with_config(self, cfg: dict) -> ImageRun:
        """The same run with another run config's solver and sampling settings (sampler-side overrides)."""
        return dataclasses.replace(self, cfg=cfg, solver=solver_config(cfg),
                                   sampling=SampleConfig.from_dict(cfg.get("sample")))

    def with_overrides(self, pairs: Sequence[tuple[str, str]]) -> ImageRun:
        """The same run with ``(key, value)`` overrides of its stored config (``solver.steps=20``,
        ``solver.source=fixed``, ``sample.cfg_scale=2``); values are read as YAML."""
        import yaml
        from omegaconf import OmegaConf

        base = OmegaConf.create(self.cfg)
        for key, val in pairs:
            OmegaConf.update(base, key, yaml.safe_load(val), merge=True)
        return self.with_config(OmegaConf.to_container(base, resolve=True))

    def default_count(self, classes: Sequence[int] | None, grid: bool) -> int:
        """How many images ``sample`` draws without ``--n``: 8 per class for a class grid (``grid``), else 32."""
        return (8 * (len(classes) if classes else self.num_classes) or 32) if grid else 32


def load_run(ckpt: str | Path, device: str = "auto") -> ImageRun:
    """Rebuild codec, EMA model and task from a training checkpoint (``last.pt`` or its run folder)."""
    from kflow.train import load_model_weights
    from kflow.utils import load_checkpoint

    dev = check_device(device)
    path = Path(ckpt)
    if path.is_dir():
        path = path / "last.pt"
    blob = load_checkpoint(path)
    cfg = blob.get("run_config") or {}
    extra = blob.get("extra") or {}
    if "image" not in extra:
        raise InputError(f"{path} is not a kflow-image checkpoint (no image state)")
    check_targets(cfg, str(path))  # checkpoints are shared: build only this package's own classes
    info = extra["image"]
    try:
        codec = make_codec(cfg["data"])
        codec.load_state_dict(info["codec"])
        shape = tuple(int(s) for s in info["event_shape"])
        task = build_task(cfg, shape, int(info["num_classes"]), state_dict=info["task"])
        model = build_model(cfg["model"], shape, int(info["num_classes"]), cfg["task"]["prediction"])
        solver, sampling = solver_config(cfg), SampleConfig.from_dict(cfg.get("sample"))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # missing keys, wrong shapes or types
        raise InputError(f"{path}: damaged checkpoint: its stored config and state do not rebuild a model "
                         f"({type(err).__name__}: {str(err)[:300]})") from None
    load_model_weights(model, path, use_ema=True)
    model.to(dev).eval()
    codec.to(dev).eval()
    task.to(dev)
    return ImageRun(codec, task, model, shape, int(info["num_classes"]), dev, solver, sampling, cfg, path,
                    int(blob.get("step", 0)))


def labels_for(n: int, num_classes: int, classes: Sequence[int] | None, device) -> Tensor | None:
    """``n`` labels cycling over ``classes`` (default: all); ``None`` for an unconditional model."""
    if num_classes == 0:
        return None
    pool = list(classes) if classes else list(range(num_classes))
    bad = [c for c in pool if not 0 <= c < num_classes]
    if bad:
        raise InputError(f"classes {bad} outside 0..{num_classes - 1}")
    return torch.tensor([pool[i % len(pool)] for i in range(n)], device=device)


@torch.no_grad()
def generate(run: ImageRun, labels: Tensor | None, n: int, seed: int, batch_size: int = 64,
             cfg_scale: float = 1.0, class_drop_at: float | None = None, solver: SolverConfig | None = None,
             progress: bool = False) -> Tensor:
    """Generate ``n`` decoded images ``(n, C, H, W)`` in [0, 1] (batched, seeded).

    Args:
        run: the model to sample.
        labels: ``(n,)`` labels or ``None`` (unconditional).
        n: number of images.
        seed: seed of the source noise (drawn on the CPU, so every device gives the same noise).
        batch_size: images per solve.
        cfg_scale: classifier-free guidance scale, applied on the run's ``sampling.cfg_interval``.
        class_drop_at: keep the label only for ``k <`` this.
        solver: the sampler (default: the run's).
        progress: a tqdm bar over the batches.
    """
    solver = solver or run.solver
    g = torch.Generator().manual_seed(seed)
    out = []
    rng = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm
        rng = tqdm(rng, desc="sampling", unit="batch")
    for i in rng:
        m = min(batch_size, n - i)
        y = None if labels is None else labels[i:i + m]
        x_0 = torch.randn((m, *run.event_shape), generator=g)
        sol = run.task.sample(run.model, y, solver, x_0=x_0.to(run.device), cfg_scale=cfg_scale,
                              class_drop_at=class_drop_at, cfg_interval=run.sampling.cfg_interval)
        out.append(run.codec.decode(sol.x_1).cpu())
    return torch.cat(out)


# ------------------------------------------------------------------------------------------ sampling
def save_samples(images: Tensor, labels: Tensor | None, path: str | Path, per_row: int | None = None) -> Path:
    """A PNG grid of generated images: one labelled row per class (``per_row`` images each), or a plain grid
    for unlabelled samples; small images are upscaled x2."""
    from kflow_image.sampling import save_grid, save_labelled_grid

    scale = 2 if images.shape[-1] <= 32 else 1
    if labels is None:
        return save_grid(images, path, nrow=per_row, scale=scale)
    return save_labelled_grid(images, labels.cpu(), path, per_row=per_row, scale=scale)


def sample_grid(run: ImageRun, labels: Tensor | None, n: int, out: str | Path, seed: int = 0,
                nrow: int | None = None, npz: str | Path | None = None, cfg_scale: float = 1.0,
                class_drop_at: float | None = None, solver: SolverConfig | None = None) -> dict:
    """Generate ``n`` images into the grid ``out`` (:func:`save_samples`) and optionally the raw samples
    ``npz``: ``images (N, C, H, W)`` float32 in [0, 1] and ``labels (N,)`` (-1 = unconditional)."""
    imgs = generate(run, labels, n, seed, cfg_scale=cfg_scale, class_drop_at=class_drop_at, solver=solver)
    save_samples(imgs, labels, out, nrow)
    info: dict = {}
    if npz:
        import numpy as np
        lab = labels.cpu().numpy() if labels is not None else np.full(n, -1)
        Path(npz).parent.mkdir(parents=True, exist_ok=True)
        np.savez(npz, images=imgs.float().clamp(0, 1).numpy(), labels=lab.astype(np.int64))
        info["npz"] = str(npz)
    return info


@torch.no_grad()
def split_bands(run: ImageRun, bands: tuple[float, float], n: int, rows: int, out: str | Path,
                labels: Tensor | None = None, seed: int = 0, cfg_scale: float = 1.0,
                class_drop_at: float | None = None, solver: SolverConfig | None = None) -> dict:
    """Noise splitting: ``rows`` rows of ``n // rows`` samples; within a row the source noise of the scales in
    ``bands = (kappa_min, kappa_max)`` is shared (:func:`kflow_image.sampling.split_noise`; for a run without
    bands, the ``identity`` baseline, Fourier scales: :func:`kflow_image.sampling.restoration_bands`).
    Guidance applies on all of k here (the run's ``cfg_interval`` is not used)."""
    from kflow_image.sampling import restoration_bands, save_grid, split_noise

    solver = solver or run.solver
    lo, hi = bands
    g = torch.Generator().manual_seed(seed)
    rows, per = max(1, rows), max(1, n // max(1, rows))
    band_t = restoration_bands(run.task, run.event_shape)
    imgs = []
    for _ in range(rows):
        x_0, _ = split_noise(band_t, per, run.event_shape, lo, hi, generator=g)
        y = None if labels is None else labels[:per]
        sol = run.task.sample(run.model, y, solver, x_0=x_0, cfg_scale=cfg_scale, class_drop_at=class_drop_at)
        imgs.append(run.codec.decode(sol.x_1).cpu())
    save_grid(torch.cat(imgs), out, nrow=per)
    return {"rows": f"{rows} rows; noise of scales in [{lo}, {hi}] shared within a row"}


def restore_inputs(run: ImageRun, spec: str, n: int) -> tuple[Tensor, Tensor | None]:
    """Clean images ``(n, C, H, W)`` and labels (``None`` for user images) to restore: ``"data"`` (the run's
    held-out images), an image file or a folder of images."""
    from kflow_image.data import IMAGE_EXTENSIONS, load_image

    d = run.cfg["data"]
    res, ch = int(d["resolution"]), int(d["channels"])
    if spec == "data":
        data = load_image_sets(d)
        ds = data.heldout_set if len(data.heldout_set) else data.train_set
        items = [ds[i] for i in range(min(n, len(ds)))]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)[:n]
        if not files:
            raise InputError(f"no images in {p}")
    elif p.is_file():
        files = [p]
    else:
        raise InputError(f"--restore: {p} is neither 'data', an image nor a folder")
    return torch.stack([load_image(f, res, ch) for f in files]), None


RESTORE_METHODS = ("bands", "sdedit")


@torch.no_grad()
def restore_images(run: ImageRun, degraded: Tensor, y: Tensor | None = None, method: str = "bands",
                   kappa_max: float = 0.25, k_start: float = 0.5, seed: int = 0, cfg_scale: float = 1.0,
                   solver: SolverConfig | None = None, batch_size: int = 100) -> Tensor:
    """Restore degraded images ``(N, C, H, W)`` in [0, 1] without training; returns them restored (CPU).

    Args:
        method: ``bands`` (the coarse bands ``kappa <= kappa_max`` pinned to the observation,
            :func:`kflow_image.sampling.restore`; Fourier bands for the ``identity`` baseline) or ``sdedit``
            (the observation enters the path at ``k_start``, :func:`kflow_image.sampling.sdedit`).
        y: ``(N,)`` labels, or ``None`` for unconditional restoration (the null class).
        seed: seed of the source noise (drawn on the CPU in batches of ``batch_size``).
    """
    from kflow_image.sampling import restore as restore_bands
    from kflow_image.sampling import sdedit

    if method not in RESTORE_METHODS:
        raise InputError(f"restoration method {method!r}: use one of {RESTORE_METHODS}")
    solver = solver or run.solver
    g = torch.Generator().manual_seed(seed)
    y = None if run.num_classes == 0 else y
    out = []
    for i in range(0, len(degraded), batch_size):
        obs = degraded[i:i + batch_size]
        yy = None if y is None else y[i:i + batch_size].to(run.device)
        if method == "bands":
            img, _ = restore_bands(run.task, run.model, run.codec, obs, y=yy, kappa_max=kappa_max,
                                   cfg_scale=cfg_scale, generator=g, solver=solver)
        else:
            img, _ = sdedit(run.task, run.model, run.codec, obs, k_start=k_start, y=yy, cfg_scale=cfg_scale,
                            generator=g, solver=solver)
        out.append(img.cpu())
    return torch.cat(out)


@torch.no_grad()
def restore(run: ImageRun, spec: str, n: int, out: str | Path, degradation: str = "downsample", factor: int = 4,
            sigma: float = 2.0, kappa_max: float = 0.25, seed: int = 0, cfg_scale: float = 1.0,
            uncond: bool = False, solver: SolverConfig | None = None, method: str = "bands",
            k_start: float = 0.5) -> dict:
    """Training-free restoration of ``n`` degraded images (:func:`restore_inputs`, :func:`restore_images`);
    writes the rows clean / degraded / restored into ``out`` and returns the PSNRs and SSIMs."""
    from kflow_image.metrics import psnr, ssim
    from kflow_image.sampling import degrade, save_grid

    clean, y = restore_inputs(run, spec, n)
    obs = degrade(clean, degradation, factor=factor, sigma=sigma)
    y = None if (uncond or run.num_classes == 0 or y is None) else y
    restored = restore_images(run, obs, y, method=method, kappa_max=kappa_max, k_start=k_start, seed=seed,
                              cfg_scale=cfg_scale, solver=solver)
    recon = run.codec.decode(run.codec.encode(obs.to(run.device))).cpu()
    save_grid(torch.cat([clean, obs, restored]), out, nrow=len(clean))
    how = f"kappa <= {kappa_max}" if method == "bands" else f"SDEdit from k = {k_start}"
    info = {"psnr_observation": float(psnr(obs, clean).mean()), "psnr_restored": float(psnr(restored, clean).mean()),
            "psnr_observation_through_codec": float(psnr(recon, clean).mean()),
            "rows": ["clean", f"degraded ({degradation})", f"restored ({how})"]}
    if min(clean.shape[-2:]) >= 11:
        info["ssim_observation"] = float(ssim(obs, clean).mean())
        info["ssim_restored"] = float(ssim(restored, clean).mean())
    return info


# ------------------------------------------------------------------------------------------ training
@dataclass
class FitResult:
    """What :func:`fit` returns: the trainer (its ``ema_model``, ``step``, ``is_main``), the output of
    :meth:`kflow.train.Trainer.fit` and the wall-clock of training."""

    trainer: Any
    out: dict
    train_s: float


def fit(model: nn.Module, task: nn.Module, latents: Tensor, labels: Tensor, tcfg, *,
        extra_state: dict | None = None, run_config: dict | None = None, resume: bool = False) -> FitResult:
    """Train ``model`` on standardised ``latents`` with the task's loss (the one training loop).

    Args:
        tcfg: a :class:`kflow.train.TrainConfig`.
        extra_state: stored in every checkpoint (the codec and task state that :func:`load_run` needs).
        run_config: the config stored in checkpoints and ``config.json``.
        resume: continue from ``run_dir/last.pt``.
    """
    from torch.utils.data import TensorDataset, default_collate

    from kflow.train import Trainer

    task.to(check_device(tcfg.device))
    trainer = Trainer(model, task.loss, TensorDataset(latents, labels), default_collate, tcfg,
                      extra_state=extra_state, run_config=run_config)
    t0 = time.perf_counter()
    out = trainer.fit(resume=resume)
    return FitResult(trainer, out, time.perf_counter() - t0)


def train(cfg: dict, resume: bool = False, log: Callable[[str], None] | None = None) -> tuple[ImageRun | None, dict]:
    """Train the run described by a composed image config; on the main process sample the end-of-training
    grid ``run_dir/samples.png``.

    Returns:
        ``(run, summary)``: the trained :class:`ImageRun` (EMA model) and a JSON-able summary; ``(None, {})``
        on the non-main processes of a distributed run.
    """
    from kflow.train import TrainConfig
    from kflow.utils import seed_everything

    log = log or (lambda s: print(s, file=sys.stderr))
    tcfg = TrainConfig.from_dict(cfg["trainer"])
    dev = check_device(tcfg.device)  # before the data is encoded: a missing GPU is reported at once
    seed_everything(tcfg.seed)  # the model's initial weights too: identical commands give identical runs
    codec = make_codec(cfg["data"])
    data = load_image_data(cfg["data"], codec, progress=tcfg.progress and sys.stderr.isatty())
    raw, labels = data.train
    z = standardized_latents(codec, raw)
    shape = tuple(z.shape[1:])
    ncls = data.num_classes
    task = build_task(cfg, shape, ncls, fit_data=z)
    model = build_model(cfg["model"], shape, ncls, cfg["task"]["prediction"])
    n_params = sum(p.numel() for p in model.parameters())
    log(f"kflow-image train: {cfg['data']['name']} {len(z)} x {tuple(shape)} latents, {ncls} classes, "
        f"transform={transform_name(cfg['transform'])} window={cfg['schedule'].get('window')}, "
        f"DiT {n_params / 1e6:.2f} M params -> {tcfg.run_dir}")
    task.to(dev)
    extra_state = {"image": {"codec": codec.state_dict(), "task": task.state_dict(), "event_shape": list(shape),
                             "num_classes": ncls}}
    res = fit(model, task, z, labels, tcfg, extra_state=extra_state, run_config=cfg, resume=resume)
    if not res.trainer.is_main:
        return None, {}
    run = ImageRun(codec.to(dev), task, res.trainer.ema_model.eval(), shape, ncls, dev, solver_config(cfg),
                   SampleConfig.from_dict(cfg["sample"]), cfg, Path(tcfg.run_dir) / "last.pt", res.trainer.step)
    per = run.sampling.per_class
    n = per * ncls if ncls else per * 8
    y = None if ncls == 0 else torch.arange(ncls, device=dev).repeat_interleave(per)
    t0 = time.perf_counter()
    imgs = generate(run, y, n, run.sampling.seed, cfg_scale=run.sampling.cfg_scale,
                    class_drop_at=run.sampling.class_drop_at)
    grid = save_samples(imgs, y, Path(tcfg.run_dir) / "samples.png", per)
    summary = {"step": res.out.get("step"), "loss": res.out.get("loss"), "train_s": round(res.train_s, 1),
               "sample_s": round(time.perf_counter() - t0, 1), "samples": str(grid),
               "checkpoint": str(Path(tcfg.run_dir) / "last.pt")}
    return run, summary


# ------------------------------------------------------------------------------------------ metrics
def report_evaluation(res: dict, as_json: bool = False, say: Callable[[str], None] = print) -> None:
    """Print an :func:`evaluate` result: one JSON object, or a table of FID/KID/precision/recall rows."""
    if as_json:
        import numpy as np

        say(json.dumps(res, indent=2, default=lambda o: float(o) if isinstance(o, np.floating) else str(o)))
        return
    say(f"{'':24s} {'FID':>8s} {'KID':>9s} {'prec':>6s} {'recall':>6s}   (n = {res['n']})")
    for k in ("generated", "real_vs_real", "codec_reconstruction"):
        b = res[k]
        say(f"{k:24s} {b['fid']:8.2f} {b['kid']:9.5f} {b['precision']:6.3f} {b['recall']:6.3f}")
    say(f"generation: {res['images_per_s']} images/s")


def metric_block(f_real, f, knn: int = 3, kid_subset: int = 100, exact: bool = False) -> dict:
    """FID, KID, k-NN precision/recall of features ``f`` against ``f_real`` (Inception pool features).

    Args:
        knn: k of the precision/recall manifolds.
        kid_subset: KID subset size (capped at the set sizes).
        exact: FID by :func:`kflow_image.metrics.fid_exact` (eigenvalues; stable at small n), with the
            ``scipy.linalg.sqrtm`` value beside it as ``fid_scipy`` (``None`` where sqrtm fails); else the
            ``sqrtm`` value only.
    """
    from kflow_image.metrics import fid_exact, fid_from_features, kid, precision_recall

    p, r = precision_recall(f_real, f, k=knn)
    km, ks = kid(f_real, f, subset_size=kid_subset)
    if not exact:
        return {"fid": fid_from_features(f_real, f), "kid": km, "kid_std": ks, "precision": p, "recall": r}
    try:
        fid_scipy = fid_from_features(f_real, f)
    except ValueError:  # sqrtm failed (rank-deficient at small n)
        fid_scipy = None
    return {"fid": fid_exact(f_real, f), "fid_scipy": fid_scipy, "kid": km, "kid_std": ks, "precision": p,
            "recall": r}


def evaluate(run: ImageRun, n: int | None = None, seed: int = 0, cfg_scale: float | None = None,
             class_drop_at: float | None = None, solver: SolverConfig | None = None) -> dict:
    """FID/KID/precision/recall of ``n`` generated images against ``n`` held-out ones, beside real-vs-real
    (``n`` training images) and the codec floor (codec reconstructions of those training images).

    Args:
        n: sample size (default: the run's ``evaluate.n``).
        seed: picks the real images and the source noise.
        cfg_scale: guidance (default: the run's ``sample.cfg_scale``).
        class_drop_at: keep the label only for ``k <`` this.
        solver: the sampler (default: the run's).
    """
    from kflow_image.metrics import InceptionFeatures

    solver = solver or run.solver
    if cfg_scale is None:
        cfg_scale = run.sampling.cfg_scale
    ecfg = run.cfg.get("evaluate", {})
    n = n or int(ecfg.get("n", 256))
    data = load_image_sets(run.cfg["data"])
    held, train_set = data.heldout_set, data.train_set
    if len(held) < n or len(train_set) < n:
        raise InputError(f"--n {n} needs {n} held-out and {n} training images "
                         f"(have {len(held)} and {len(train_set)})")
    g = torch.Generator().manual_seed(seed)
    idx_h = torch.randperm(len(held), generator=g)[:n].tolist()
    idx_t = torch.randperm(len(train_set), generator=g)[:n].tolist()
    real = torch.stack([held[i][0] for i in idx_h])
    real_labels = torch.tensor([held[i][1] for i in idx_h])
    real_train = torch.stack([train_set[i][0] for i in idx_t])
    inc = InceptionFeatures(device=run.device)
    feats = lambda x: inc.features(x, batch_size=int(ecfg.get("batch_size", 64)))
    t0 = time.perf_counter()
    labels = None if run.num_classes == 0 else real_labels.to(run.device)  # the real set's class histogram
    gen = generate(run, labels, n, seed, cfg_scale=cfg_scale, class_drop_at=class_drop_at, solver=solver)
    gen_s = time.perf_counter() - t0
    codec = run.codec
    recon = torch.cat([codec.decode(codec.encode(real_train[i:i + 64].to(run.device))).cpu()
                       for i in range(0, n, 64)])
    f_real, f_train, f_gen, f_rec = feats(real), feats(real_train), feats(gen), feats(recon)
    sub = min(int(ecfg.get("kid_subset", 100)), n)
    knn = int(ecfg.get("knn", 3))
    block = lambda f: metric_block(f_real, f, knn=knn, kid_subset=sub)
    return {"checkpoint": str(run.path), "step": run.step, "n": n, "data": run.cfg["data"]["name"],
            "transform": transform_name(run.cfg["transform"]), "window": run.cfg["schedule"].get("window"),
            "cfg_scale": cfg_scale, "class_drop_at": class_drop_at, "steps": solver.steps,
            "solver": solver.to_dict(), "model_calls_per_sample": solver.evaluations,
            "generated": block(f_gen), "real_vs_real": block(f_train), "codec_reconstruction": block(f_rec),
            "generation_s": round(gen_s, 2), "images_per_s": round(n / gen_s, 2)}
