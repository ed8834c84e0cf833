"""The one training loop shared by the molecule and image tasks.

A task supplies a model, a ``loss_fn(model, batch) -> (loss, metrics)``, a map-style dataset and a
``collate`` function; :class:`Trainer` does the rest: AdamW with warmup + cosine/constant LR, gradient
clipping, EMA weights, CUDA autocast (bf16/fp16), DDP under ``torchrun``, a tqdm bar, a JSONL metric log,
a loss-curve PNG, the resolved config in the run folder and atomic checkpoints that resume *exactly*.

Run folder (written by rank 0 only)::

    run_dir/config.json     {"train": TrainConfig as dict, "run": the caller's resolved config}
    run_dir/metrics.jsonl   one JSON object per log step ({"kind": "train", "step", "loss", "lr", ...})
                            and per evaluation ({"kind": "eval", "step", ...})
    run_dir/loss.png        loss / lr / eval curves (refreshed at every checkpoint and at the end)
    run_dir/last.pt         latest checkpoint; optionally step_0000500.pt etc.

Exact resume. Training ``N`` steps straight gives bitwise the same parameters, EMA and optimizer state as
training ``N/2``, stopping and resuming (on CPU; CUDA kernels with atomics are not bitwise deterministic).
Two mechanisms make this hold without relying on saved generator states:

* data order: :class:`InfiniteBatchSampler` concatenates seeded permutations whose order depends only on
  ``(seed, epoch)`` and can start at any step; rank ``r`` of ``W`` takes ``batch[r::W]``;
* randomness inside a step: every step reseeds python/numpy/torch from ``step_seed(seed, rank, step)``,
  so the noise and flow times drawn by ``loss_fn`` (and dropout) depend only on the step, not on history.

Randomness in ``dataset.__getitem__`` is covered with ``num_workers=0``; with worker processes, draw it in
``loss_fn`` or seed it from the item index to keep resume exact.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from kflow.utils import (
    CheckpointError,
    JsonlLogger,
    atomic_write_text,
    distributed_setup,
    distributed_teardown,
    load_checkpoint,
    plot_curves,
    resolve_device,
    save_checkpoint,
    seed_everything,
    step_seed,
    to_device,
)

__all__ = [
    "CKPT_FORMAT",
    "EMA",
    "InfiniteBatchSampler",
    "TrainConfig",
    "Trainer",
    "load_checkpoint",
    "load_model_weights",
    "lr_at",
    "save_checkpoint",
    "unwrap_model",
]

CKPT_FORMAT = "kflow-train-v1"

LossFn = Callable[[nn.Module, Any], "tuple[Tensor, dict[str, float | Tensor]]"]


# --------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Hyper-parameters of the training loop (the ``trainer`` hydra group maps onto it 1:1).

    Attributes:
        steps: total optimizer steps (a resumed run continues up to this number).
        batch_size: *global* batch size; under DDP each of the ``W`` ranks gets ``batch_size / W``.
        lr: peak learning rate of AdamW.
        weight_decay: decoupled weight decay, applied to tensors with ``ndim >= 2`` only (not to biases,
            norms, embeddings' scalars).
        betas: AdamW betas.
        warmup_steps: linear warmup from ``lr / warmup_steps`` to ``lr``.
        lr_schedule: ``"cosine"`` (decay to ``min_lr_ratio * lr`` at ``steps``) or ``"constant"``.
        min_lr_ratio: final LR of the cosine schedule as a fraction of ``lr``.
        ema_decay: EMA decay per step; ``0`` disables the EMA (``ema_model`` is then the model).
        ema_warmup: use ``min(ema_decay, (1 + n) / (10 + n))`` so short runs still get a useful EMA.
        grad_clip: max global grad norm; ``0`` disables clipping (the norm is still logged).
        amp: autocast on CUDA (ignored on CPU); ``amp_dtype`` ``"bf16"`` or ``"fp16"`` (with a GradScaler).
        log_every: log (JSONL + bar) every this many steps.
        ckpt_every: write ``last.pt`` every this many steps (``0``: only at the end).
        keep_step_ckpts: also keep ``step_XXXXXXX.pt`` at each checkpoint.
        eval_every: call ``eval_fn`` every this many steps (``0``: only at the end, if given).
        seed: seeds data order and every step's random draws.
        device: ``"auto" | "cpu" | "cuda" | "cuda:N"``.
        run_dir: output folder.
        progress: on rank 0, a tqdm bar when stderr is a terminal, else a progress line (step, loss,
            samples/s, elapsed, ETA) at the first and last log step and at most every ``progress_every_s``.
        num_workers: DataLoader worker processes (0 = load in the main process).
        time_limit_s: stop early (with a checkpoint) after this many seconds of training; ``0``: no limit.
        ddp_find_unused: passed to DistributedDataParallel (needed when some parameters get no gradient).
    """

    steps: int = 1000
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    grad_clip: float = 1.0
    amp: bool = True
    amp_dtype: str = "bf16"
    log_every: int = 10
    ckpt_every: int = 500
    keep_step_ckpts: bool = False
    eval_every: int = 0
    seed: int = 0
    device: str = "auto"
    run_dir: str = "runs/default"
    progress: bool = True
    num_workers: int = 0
    time_limit_s: float = 0.0
    ddp_find_unused: bool = False

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # hydra/json give lists
        checks = [
            (self.steps >= 1, "steps must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas must be two numbers in [0, 1)"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.lr_schedule in ("cosine", "constant"), "lr_schedule must be 'cosine' or 'constant'"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)"),
            (self.grad_clip >= 0, "grad_clip must be >= 0"),
            (self.amp_dtype in ("bf16", "fp16"), "amp_dtype must be 'bf16' or 'fp16'"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (self.ckpt_every >= 0, "ckpt_every must be >= 0"),
            (self.eval_every >= 0, "eval_every must be >= 0"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
            (self.time_limit_s >= 0, "time_limit_s must be >= 0"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError("invalid TrainConfig: " + "; ".join(bad))

    @classmethod
    def from_dict(cls, d: dict | None = None, **overrides: Any) -> TrainConfig:
        """Build from a plain dict (e.g. ``OmegaConf.to_container(cfg.trainer)``); unknown keys are an error."""
        d = {**(d or {}), **overrides}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown trainer option(s) {unknown}; valid: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        """Plain JSON/checkpoint-safe dict."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate used for optimizer step ``step`` (0-based): linear warmup then cosine or constant."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(cfg.steps - cfg.warmup_steps, 1)
    t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


# --------------------------------------------------------------------------------------------- data order
class InfiniteBatchSampler(Sampler[list[int]]):
    """Endless, resumable, rank-sharded batches of dataset indices.

    The global index stream is ``perm(seed, 0) ++ perm(seed, 1) ++ ...`` (one permutation of
    ``range(n)`` per epoch, from ``numpy.random.default_rng([seed, epoch])``); global batch ``s`` is
    ``stream[s*B:(s+1)*B]`` (batches may straddle epochs, and ``n < B`` is fine). Rank ``r`` of ``W`` yields
    ``batch[r::W]``. Iteration starts at ``start_step``, so a resumed run sees exactly the batches the
    uninterrupted run would have seen.

    Args:
        n: dataset length.
        batch_size: global batch size ``B`` (divisible by ``world_size``).
        seed: data-order seed.
        rank, world_size: DDP shard.
        start_step: first global batch to yield.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_step: int = 0):
        if n < 1:
            raise ValueError("cannot train on an empty dataset")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} is not divisible by the world size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self._cache: tuple[int, np.ndarray] | None = None

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """The index order of ``epoch`` (same on every rank)."""
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, np.random.default_rng([int(self.seed) % 2**63, epoch]).permutation(self.n))
        return self._cache[1]

    def global_batch(self, step: int) -> list[int]:
        """All ``B`` indices of global batch ``step`` (before sharding)."""
        pos, out = step * self.batch_size, []
        while len(out) < self.batch_size:
            epoch, off = divmod(pos, self.n)
            take = self.epoch_permutation(epoch)[off:off + self.batch_size - len(out)]
            out.extend(int(i) for i in take)
            pos += len(take)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.global_batch(step)[self.rank::self.world_size]
            step += 1


# --------------------------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of a model's weights, kept in a frozen deep copy.

    Floating-point parameters are averaged; buffers (e.g. norm statistics) and integer tensors are copied.

    Args:
        model: the (unwrapped) model being trained.
        decay: target decay per update.
        warmup: use ``min(decay, (1 + n) / (10 + n))`` for update ``n``.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        try:
            self.module = copy.deepcopy(model)
        except Exception as err:
            raise TypeError(f"cannot deep-copy {type(model).__name__} for the EMA ({err}); "
                            "set ema_decay=0 to train without EMA") from err
        # deep copies of fx-compiled modules (e3nn tensor products) register their constants as buffers
        # that the original does not persist: keep the copy's state_dict keys identical to the model's
        persistent = set(model.state_dict())
        for name in set(self.module.state_dict()) - persistent:
            owner, _, attr = name.rpartition(".")
            self.module.get_submodule(owner)._non_persistent_buffers_set.add(attr)
        self.module.eval().requires_grad_(False)
        self.decay, self.warmup, self.num_updates = float(decay), bool(warmup), 0

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current weights."""
        d = self.current_decay()
        ema_f, src_f = [], []
        for e, p in zip(self.module.parameters(), model.parameters(), strict=True):
            if e.is_floating_point():
                ema_f.append(e)
                src_f.append(p.detach())
            else:
                e.copy_(p)
        if ema_f:
            torch._foreach_lerp_(ema_f, src_f, 1.0 - d)
        ema_buffers = dict(self.module.named_buffers())
        for name, b in model.named_buffers():  # by name: the copy may hold extra (non-persistent) buffers
            ema_buffers[name].copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "model": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])


# --------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Train ``model`` by minimising ``loss_fn`` over ``dataset``; one loop for every task.

    Args:
        model: the network (moved to the resolved device here).
        loss_fn: ``loss_fn(model, batch) -> (loss, metrics)``; ``model`` may be DDP-wrapped: call it for
            the forward pass that carries gradients (only that all-reduces them) and use
            :func:`unwrap_model` for helper methods; ``loss`` is a scalar tensor; ``metrics`` maps names to
            floats or scalar tensors (averaged over the log window and over ranks; every rank must return
            the same keys). Runs under autocast on CUDA when ``cfg.amp``; its random draws should use the
            global torch RNG (reseeded per step, which keeps resume exact).
        dataset: map-style dataset (``len`` and ``__getitem__``).
        collate: turns a list of items into a batch; the batch is moved with :func:`kflow.utils.to_device`.
        cfg: loop hyper-parameters.
        eval_fn: optional ``eval_fn(ema_model, step) -> dict`` run on rank 0 (model in eval mode, no grad).
        eval_every: overrides ``cfg.eval_every`` when given (> 0).
        extra_state: task state saved in (and restored from) every checkpoint under ``"extra"`` (e.g.
            latent statistics); tensors and plain containers only.
        run_config: the caller's full resolved config (plain dict) for ``config.json`` and the checkpoint.
        param_groups: optional custom optimizer parameter groups (default: decay on ``ndim >= 2`` only).

    Attributes:
        model, optimizer, ema, device, step (completed steps), extra_state.
        sample_unit: what one dataset item is, for the progress lines (``"clusters"``, ``"images"``).
        progress_every_s: least seconds between two progress lines when stderr is not a terminal (the first
            and the last log step always print one).
    """

    sample_unit = "samples"
    progress_every_s = 30.0

    def __init__(self, model: nn.Module, loss_fn: LossFn, dataset: Sequence, collate: Callable[[list], Any],
                 cfg: TrainConfig, eval_fn: Callable[[nn.Module, int], dict] | None = None,
                 eval_every: int = 0, extra_state: dict | None = None, run_config: dict | None = None,
                 param_groups: list[dict] | None = None):
        if len(dataset) == 0:
            raise ValueError("cannot train on an empty dataset")
        self.cfg = cfg
        self.loss_fn, self.dataset, self.collate, self.eval_fn = loss_fn, dataset, collate, eval_fn
        self.eval_every = eval_every or cfg.eval_every
        self.extra_state = dict(extra_state or {})
        self.run_config = dict(run_config or {})
        self.run_dir = Path(cfg.run_dir)
        self.device = resolve_device(cfg.device)  # cuda -> cuda:$LOCAL_RANK under torchrun
        self.dist = distributed_setup(self.device)
        self.model = model.to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups or self._default_groups(), lr=cfg.lr,
                                           betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16
        if self.use_amp and self.amp_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            warnings.warn("bf16 autocast unsupported on this GPU; using fp16 with a GradScaler", stacklevel=2)
            self.amp_dtype = torch.float16
        self.scaler = (torch.amp.GradScaler("cuda") if self.use_amp and self.amp_dtype == torch.float16
                       else None)
        self.step = 0
        self.last_metrics: dict = {}

    # ------------------------------------------------------------------ helpers
    def _default_groups(self) -> list[dict]:
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        if not decay and not no_decay:
            raise ValueError("the model has no trainable parameters")
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    @property
    def ema_model(self) -> nn.Module:
        """The EMA copy of the model (the model itself when ``ema_decay == 0``), for sampling/eval."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    def state_dict(self) -> dict:
        """Everything needed to resume; ``weights_only``-loadable."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": CKPT_FORMAT,
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng,
            "config": self.cfg.to_dict(),
            "run_config": self.run_config,
            "extra": self.extra_state,
            "world_size": self.dist.world_size,
        }

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        """Restore from :meth:`state_dict` output; errors name ``source`` (the file)."""
        if state.get("format") != CKPT_FORMAT:
            raise CheckpointError(f"{source} is not a kflow training checkpoint "
                                  f"(format={state.get('format')!r}, expected {CKPT_FORMAT!r})")
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None:
                if state.get("ema") is None:
                    warnings.warn(f"{source} has no EMA state; the EMA restarts from the model", stacklevel=2)
                    self.ema.module.load_state_dict(self.model.state_dict())
                else:
                    self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{source} does not match this model/optimizer: {err}") from err
        rng = state.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.extra_state.update(state.get("extra") or {})
        self.step = int(state["step"])
        old = state.get("config") or {}
        keys = ["batch_size", "seed", "lr", "lr_schedule", "warmup_steps", "ema_decay", "min_lr_ratio"]
        if self.cfg.lr_schedule == "cosine":  # the cosine decay is stretched over `steps`
            keys.append("steps")
        changed = [k for k in keys if k in old and old[k] != getattr(self.cfg, k)]
        if changed or state.get("world_size", 1) != self.dist.world_size:
            warnings.warn(f"resuming from {source} with changed {changed or ['world_size']}: the run will not "
                          "be identical to an uninterrupted one", stacklevel=2)

    def save(self, path: str | Path | None = None) -> Path:
        """Write a checkpoint (rank 0 only; other ranks return the path without writing)."""
        path = Path(path) if path is not None else self.run_dir / "last.pt"
        if self.is_main:
            save_checkpoint(path, self.state_dict())
        return path

    def _reduce_mean(self, values: list[Tensor]) -> list[float]:
        vec = torch.stack([v.detach().float().reshape(()) for v in values])
        if self.dist.world_size > 1:
            dist.all_reduce(vec, op=dist.ReduceOp.SUM)
            vec /= self.dist.world_size
        return vec.tolist()

    def _run_eval(self, logger: JsonlLogger) -> dict:
        out: dict = {}
        if self.is_main and self.eval_fn is not None:
            model = self.ema_model
            was_training = model.training
            model.eval()
            with torch.no_grad():
                out = dict(self.eval_fn(model, self.step) or {})
            model.train(was_training)
            logger.log({"kind": "eval", "step": self.step, **out})
        if self.dist.world_size > 1:
            dist.barrier()
        return out

    def _checkpoint(self) -> None:
        if not self.is_main:
            return
        self.save()
        if self.cfg.keep_step_ckpts:
            self.save(self.run_dir / f"step_{self.step:07d}.pt")
        try:
            plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        except Exception as err:  # noqa: BLE001 -- a plotting failure must never kill a training run
            warnings.warn(f"could not plot {self.run_dir / 'loss.png'}: {err}", stacklevel=2)

    # ------------------------------------------------------------------ loop
    def fit(self, resume: bool | str | Path = False) -> dict:
        """Train up to ``cfg.steps`` steps.

        Args:
            resume: ``False`` start fresh; ``True`` load ``run_dir/last.pt`` (error if missing); ``"auto"``
                load it if present; a path: load that checkpoint.

        Returns:
            The last logged train metrics (``step``, ``loss``, ``lr``, ...) merged with the last eval metrics.
        """
        cfg = self.cfg
        # bitwise-reproducible runs: with several CPU threads some kernels (scatter/index_add) otherwise sum in
        # a varying order (weights differing by ~1e-5 after a few steps); kernels without a deterministic
        # version only warn
        torch.use_deterministic_algorithms(True, warn_only=True)
        self.dist = distributed_setup(self.device)
        rank, world = self.dist.rank, self.dist.world_size
        loaded = False
        if resume:
            path = self.run_dir / "last.pt" if resume in (True, "auto") else Path(resume)
            if resume != "auto" or path.is_file():
                self.load_state_dict(load_checkpoint(path), source=str(path))
                loaded = True
        if not loaded and self.step == 0 and self.is_main and (self.run_dir / "last.pt").is_file():
            warnings.warn(f"starting a fresh run in {self.run_dir}, which holds last.pt: it will be overwritten "
                          "(pass resume=True or 'auto' to continue it)", stacklevel=2)
        if not loaded and self.step == 0 and self.ema is not None:
            # the model may have been changed (e.g. pretrained weights loaded) after __init__
            self.ema.module.load_state_dict(self.model.state_dict())
        start = self.step
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.json",
                              json.dumps({"train": cfg.to_dict(), "run": self.run_config}, indent=2, default=str))
        logger = JsonlLogger(self.run_dir / "metrics.jsonl", truncate_after_step=start, enabled=self.is_main)

        net: nn.Module = self.model
        if world > 1:
            net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.ddp_find_unused)
        sampler = InfiniteBatchSampler(len(self.dataset), cfg.batch_size, cfg.seed, rank, world, start)
        # an explicit generator keeps DataLoader from drawing its worker seed from the global RNG
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, rank, start))
        loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collate,
                            num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda", generator=gen)
        batches = iter(loader)
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")

        bar = None
        if cfg.progress and self.is_main and sys.stderr.isatty():
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)
        # without a terminal (output redirected to a file or a pipe) a bar is invisible: plain progress lines
        lines = cfg.progress and self.is_main and bar is None
        t_line = -math.inf

        win_loss = torch.zeros((), device=self.device)
        win_gn = torch.zeros((), device=self.device)
        win_metrics: dict[str, Tensor] = {}
        win_n, win_skipped = 0, 0
        t_start = t_win = time.perf_counter()
        eval_out: dict = {}
        self.model.train()
        try:
            while self.step < cfg.steps:
                step = self.step
                seed_everything(step_seed(cfg.seed, rank, step))
                batch = to_device(next(batches), self.device, non_blocking=True)
                lr = lr_at(step, cfg)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                    out = self.loss_fn(net, batch)
                loss, metrics = out if isinstance(out, tuple) else (out, {})
                if not isinstance(loss, Tensor) or loss.ndim != 0:
                    raise TypeError("loss_fn must return (scalar loss tensor, metrics dict)")
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                    self.scaler.unscale_(self.optimizer)
                else:
                    loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(params, clip)
                # grads are all-reduced, so every rank takes the same decision
                finite = bool(torch.isfinite(gn))
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)  # skips the step itself on inf/nan
                    self.scaler.update()
                elif finite:
                    self.optimizer.step()
                if finite:
                    if self.ema is not None:
                        self.ema.update(self.model)
                    win_gn += gn.detach().float()
                else:
                    win_skipped += 1
                self.step += 1
                win_loss += loss.detach().float()
                for k, v in (metrics or {}).items():
                    v = torch.as_tensor(v, device=self.device).detach().float().reshape(())
                    win_metrics[k] = win_metrics.get(k, torch.zeros((), device=self.device)) + v
                win_n += 1

                last = self.step == cfg.steps
                if self.step % cfg.log_every == 0 or last:
                    keys = sorted(win_metrics)
                    vals = self._reduce_mean([win_loss / win_n, win_gn / max(win_n - win_skipped, 1)]
                                             + [win_metrics[k] / win_n for k in keys])
                    now = time.perf_counter()
                    rec = {"kind": "train", "step": self.step,
                           "epoch": self.step * cfg.batch_size / len(self.dataset),
                           "loss": vals[0], "lr": lr, "grad_norm": vals[1],
                           "samples_per_s": win_n * cfg.batch_size / max(now - t_win, 1e-9),
                           "time_s": now - t_start, "skipped": win_skipped,
                           **dict(zip(keys, vals[2:], strict=True))}
                    if self.device.type == "cuda":
                        rec["max_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    if not math.isfinite(vals[0]) and win_skipped == win_n:
                        raise FloatingPointError(f"loss is {vals[0]} for all of steps {self.step - win_n + 1}.."
                                                 f"{self.step}; lower lr or check the data")
                    logger.log(rec)
                    self.last_metrics = rec
                    if bar is not None:
                        bar.set_postfix(loss=f"{vals[0]:.4g}", lr=f"{lr:.2e}", refresh=False)
                    if lines and (last or now - t_line >= self.progress_every_s):
                        t_line = now
                        self._progress_line(rec, start, now - t_start)
                    win_loss.zero_()
                    win_gn.zero_()
                    win_metrics, win_n, win_skipped, t_win = {}, 0, 0, now
                if bar is not None:
                    bar.update(1)
                if self.eval_fn is not None and (last or (self.eval_every and self.step % self.eval_every == 0)):
                    eval_out = self._run_eval(logger)
                stop = self._time_up(t_start) if (cfg.time_limit_s and self.step % cfg.log_every == 0) else False
                if last or stop or (cfg.ckpt_every and self.step % cfg.ckpt_every == 0):
                    self._checkpoint()
                if stop:
                    break
        finally:
            if bar is not None:
                bar.close()
            del batches, loader
        if self.dist.world_size > 1:
            dist.barrier()
            if self.dist.initialized_here:
                distributed_teardown()
        return {**self.last_metrics, **eval_out, "step": self.step}

    def _progress_line(self, rec: dict, start: int, elapsed: float) -> None:
        """One line on stderr: step, loss, throughput, elapsed time and ETA (only when stderr is no terminal)."""
        done = rec["step"] - start
        eta = (self.cfg.steps - rec["step"]) * elapsed / max(done, 1)
        print(f"train step {rec['step']}/{self.cfg.steps} ({100 * rec['step'] / self.cfg.steps:.0f}%): loss "
              f"{rec['loss']:.4g}, {rec['samples_per_s']:.1f} {self.sample_unit}/s, elapsed {_hms(elapsed)}, "
              f"ETA {_hms(eta)}", file=sys.stderr, flush=True)

    def _time_up(self, t_start: float) -> bool:
        up = torch.tensor(float(time.perf_counter() - t_start >= self.cfg.time_limit_s), device=self.device)
        if self.dist.world_size > 1:
            dist.broadcast(up, src=0)  # rank 0 decides so all ranks stop at the same step
        return bool(up)


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying module of a DDP-wrapped model (for calling its helper methods in ``loss_fn``).

    Only the wrapper's own ``forward`` (``model(...)``) triggers the gradient all-reduce, so the
    gradient-carrying forward pass must go through the wrapper.
    """
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def load_model_weights(model: nn.Module, path: str | Path, use_ema: bool = True,
                       map_location: str | torch.device = "cpu") -> dict:
    """Load trained weights from a :class:`Trainer` checkpoint into ``model`` (for inference).

    Args:
        model: a model of the same architecture.
        path: checkpoint file (e.g. ``run_dir/last.pt``).
        use_ema: take the EMA weights when the checkpoint has them.

    Returns:
        The checkpoint dict (for ``extra``/``config``).

    Raises:
        FileNotFoundError / CheckpointError: missing, unreadable or mismatching file (named in the message).
    """
    ckpt = load_checkpoint(path, map_location=map_location)
    if ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not a kflow training checkpoint")
    state = ckpt["ema"]["model"] if use_ema and ckpt.get("ema") else ckpt["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not match {type(model).__name__}: {err}") from err
    return ckpt

