"""Evaluate an assembly model on prepared clusters: every metric, beside the do-nothing and oracle floors."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from torch import nn

from .metrics import evaluate_cluster, oracle_floors, summarize
from .task import AssemblyTask, make_batch

FLOOR_NAMES = ("do_nothing", "undo_mean_expansion", "centroid_oracle", "orientation_oracle", "symmetry_blind_oracle")


def predict_clusters(model: nn.Module, task: AssemblyTask, clusters: list[dict], steps: int = 50,
                     method: str = "exact", grid: str = "uniform", batch_size: int = 8, device="cpu",
                     progress: bool = False) -> tuple[list[np.ndarray], float]:
    """Assemble every cluster from its stored loose state; returns ``(positions (17, n, 3) each, seconds)``."""
    model.eval()
    outs, seconds = [], 0.0
    chunks = range(0, len(clusters), batch_size)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="assembling", leave=False)
    for i in chunks:
        items = clusters[i:i + batch_size]
        batch = make_batch(items).to(device)
        t0 = time.perf_counter()
        res = task.sample(model, batch, steps=steps, method=method, grid=grid)
        seconds += time.perf_counter() - t0
        pos = res["positions"].double().cpu().numpy()
        for b, it in enumerate(items):
            outs.append(pos[b, :, :len(it["species"])])
    return outs, seconds


def evaluate(model: nn.Module | None, task: AssemblyTask | None, clusters: list[dict], steps: int = 50,
             method: str = "exact", grid: str = "uniform", batch_size: int = 8, device="cpu",
             expansion_mean: float | None = 2.0, progress: bool = False) -> dict:
    """Metrics of the model (if given) and of the floors, averaged over clusters (AssembleFlow's protocol:
    per cluster, then the mean; validity = finite and <= 100 Å)."""
    out: dict = {"num_clusters": len(clusters), "steps": steps, "method": method}
    floors = [oracle_floors(c["initial"], c["final"], c["species"], c["perms"], expansion_mean) for c in clusters]
    for name in FLOOR_NAMES:
        if floors and name in floors[0]:
            out[name] = summarize([f[name] for f in floors])
    orders = [int(len(c["perms"])) for c in clusters]
    out["symmetry_orders"] = {str(k): orders.count(k) for k in sorted(set(orders))}
    if model is not None:
        preds, seconds = predict_clusters(model, task, clusters, steps, method, grid, batch_size, device, progress)
        per = [evaluate_cluster(p, c["final"], c["species"], c["perms"]) for p, c in zip(preds, clusters)]
        out["model"] = summarize(per)
        out["seconds_per_cluster"] = seconds / max(len(clusters), 1)
        out["per_cluster"] = [{"id": c["id"], **{k: v for k, v in r.items()}} for c, r in zip(clusters, per)]
        out["_predictions"] = preds
    return out


def pm_histogram(result: dict, png: str | Path) -> None:
    """Histogram of per-cluster PM-atom (published and symmetry-aware) against the do-nothing level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = result.get("per_cluster", [])
    if not per:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    a = [r["pm_atom"] for r in per]
    s = [r["pm_atom_symmetry_aware"] for r in per]
    bins = np.linspace(0, max(a + s + [1.0]) * 1.05, 25)
    ax.hist(a, bins, alpha=0.6, label="PM-atom (published)")
    ax.hist(s, bins, alpha=0.6, label="PM-atom (symmetry-aware)")
    dn = result.get("do_nothing", {}).get("pm_atom")
    if dn is not None:
        ax.axvline(dn, color="k", ls="--", label=f"do-nothing mean {dn:.1f} Å")
    ax.set_xlabel("Å")
    ax.set_ylabel("clusters")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def public(result: dict) -> dict:
    """The JSON-serialisable part of a result."""
    return json.loads(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, default=float))


__all__ = ["evaluate", "predict_clusters", "pm_histogram", "public"]
