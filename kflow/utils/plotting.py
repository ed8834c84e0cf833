"""Loss-curve pictures of a run's metrics log (matplotlib's Agg canvas; no global pyplot state)."""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .files import atomic_write
from .logs import read_jsonl

__all__ = ["plot_curves"]


def plot_curves(jsonl_path: str | os.PathLike, png_path: str | os.PathLike,
                keys: Iterable[str] | None = None) -> Path | None:
    """Plot the training loss (and lr, and numeric eval metrics) from a metrics JSONL to a PNG.

    Uses matplotlib's Agg canvas directly, so it never touches the global pyplot backend. The PNG is
    written atomically. Returns None when there is nothing to plot yet.

    Args:
        jsonl_path: metrics written by :class:`JsonlLogger` (records with ``kind`` ``"train"``/``"eval"``).
        png_path: output image.
        keys: extra train-record keys to plot beside the loss (default: none).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_jsonl(jsonl_path)
    train = [r for r in rows if r.get("kind", "train") == "train" and r.get("loss") is not None]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not train and not evals:
        return None
    skip = {"kind", "step", "epoch", "time_s"}
    eval_keys = sorted({k for r in evals for k, v in r.items()
                        if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)})
    extra = list(keys or [])
    panels = 1 + (1 if eval_keys else 0) + len(extra)
    fig = Figure(figsize=(6.5, 3.0 * panels), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, squeeze=False, sharex=True)[:, 0]  # eval points sit under their train steps
    ax = axes[0]
    if train:
        steps = [r["step"] for r in train]
        loss = [r["loss"] for r in train]
        ax.plot(steps, loss, lw=1.2, label="train loss")
        if all(v > 0 for v in loss):
            ax.set_yscale("log")
        ax.set_ylabel("loss")
        lrs = [(r["step"], r["lr"]) for r in train if r.get("lr") is not None]
        if lrs:
            ax2 = ax.twinx()
            ax2.plot(*zip(*lrs), color="tab:gray", lw=0.8, ls="--", label="lr")
            ax2.set_ylabel("lr (dashed)", color="tab:gray")
            ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))  # "1e-3" once, short tick labels
        ax.legend(loc="upper right")
    ax.set_xlabel("step")
    i = 1
    if eval_keys:
        vals = []
        for k in eval_keys:
            pts = [(r["step"], r[k]) for r in evals if isinstance(r.get(k), (int, float))]
            if pts:
                vals += [v for _, v in pts]
                # markers always: a single evaluation is otherwise an invisible zero-length line
                axes[i].plot(*zip(*pts), marker="o", ms=6 if len(pts) == 1 else 3, label=f"{k} (last {pts[-1][1]:.3g})")
        pos = [abs(v) for v in vals if v]
        if pos and max(pos) / min(pos) > 30:  # metrics of very different sizes (Å and degrees) on one axis
            axes[i].set_yscale("symlog", linthresh=1.0)
        axes[i].set_ylabel("eval")
        axes[i].set_xlabel("step")
        axes[i].legend(loc="best", fontsize=8)
        if len({r["step"] for r in evals}) == 1 and not train:
            s0 = evals[0]["step"]
            axes[i].set_xlim(s0 - 1, s0 + 1)
        i += 1
    for k in extra:
        pts = [(r["step"], r[k]) for r in train if isinstance(r.get(k), (int, float))]
        if pts:
            axes[i].plot(*zip(*pts), lw=1.0)
        axes[i].set_ylabel(k)
        axes[i].set_xlabel("step")
        i += 1
    for a in axes[:-1]:
        a.tick_params(labelbottom=True)  # sharex hides inner tick labels; keep them readable on every panel
    # fixed margins: tight_layout costs ~1 s per call on a busy CPU, and this runs at every checkpoint;
    # right=0.82 leaves room for the lr axis ticks and its label
    height = 3.0 * panels
    fig.subplots_adjust(left=0.13, right=0.82, top=1 - 0.3 / height, bottom=0.5 / height, hspace=0.4)
    return atomic_write(png_path, lambda f: fig.savefig(f, format="png"))
