"""A tiny regression problem for the trainer tests, and a ``torchrun`` entry point for the DDP test.

Usage (what ``test_train.py`` runs)::

    python -m torch.distributed.run --nproc_per_node=2 tests/kflow/ddp_worker.py RUN_DIR STEPS BATCH

Every rank writes its final parameters to ``RUN_DIR/rank{r}_params.pt`` (a test-only side channel; the
trainer itself writes from rank 0 only).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

if __name__ == "__main__":  # allow running from a checkout before `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kflow.train import TrainConfig, Trainer


@dataclass
class XYBatch:
    """A dataclass batch, to exercise ``to_device`` on dataclasses."""

    x: torch.Tensor  # (B, 4)
    y: torch.Tensor  # (B, 1)


def make_dataset(n: int = 64, seed: int = 123) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` pairs ``(x (4,), y (1,))`` with a smooth nonlinear target."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (torch.sin(x[:, :1] * 1.5) + 0.5 * x[:, 1:2] * x[:, 2:3] - 0.3 * x[:, 3:4])
    return [(x[i], y[i]) for i in range(n)]


def collate(items: list) -> XYBatch:
    return XYBatch(torch.stack([a for a, _ in items]), torch.stack([b for _, b in items]))


def make_model(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 32), nn.SiLU(), nn.Dropout(dropout), nn.LayerNorm(32), nn.Linear(32, 1))


def make_loss_fn(noise: float = 0.0):
    """MSE loss; ``noise > 0`` adds input noise drawn from the global torch RNG (like flow-matching draws)."""

    def loss_fn(model: nn.Module, batch: XYBatch):
        x = batch.x + noise * torch.randn_like(batch.x) if noise > 0 else batch.x
        err = model(x) - batch.y
        return torch.mean(err**2), {"mae": torch.mean(torch.abs(err.detach()))}

    return loss_fn


def ddp_config(run_dir: str, steps: int, batch: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=batch, lr=1e-2, warmup_steps=2, ema_decay=0.9, log_every=2,
                       ckpt_every=0, device="cpu", run_dir=run_dir, progress=False)


def main() -> None:
    run_dir, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    trainer = Trainer(make_model(), make_loss_fn(), make_dataset(), collate, ddp_config(run_dir, steps, batch))
    rank = trainer.dist.rank
    assert trainer.dist.world_size == 2, trainer.dist
    trainer.fit()
    torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
               Path(run_dir) / f"rank{rank}_params.pt")


if __name__ == "__main__":
    main()
