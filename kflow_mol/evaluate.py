"""Evaluate an assembly model on prepared clusters: every metric, beside the do-nothing and oracle floors."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from torch import nn
from tqdm import tqdm

from kflow.solver import SolverConfig

from .metrics import CLASH_FRACTION, evaluate_cluster, intermolecular_clashes, oracle_floors, summarize
from .prepared import PreparedCluster
from .refine import refine_cluster
from .so3 import kabsch_np
from .task import AssemblyTask, make_batch

FLOOR_NAMES = ("do_nothing", "undo_mean_expansion", "per_molecule_bayes", "centroid_oracle", "orientation_oracle",
               "symmetry_blind_oracle")
# the floors a plain verdict compares with, in words
_VERDICT_FLOORS = {"do_nothing": "the loose state", "undo_mean_expansion": "undoing the mean expansion",
                   "per_molecule_bayes": "each centroid's Bayes estimate from its own loose centroid (given the true "
                                         "distances from the centre; nothing collective)",
                   "centroid_oracle": "true centroids with the loose orientations"}
_CLASH_KEYS = ("clashes", "clashing_molecules", "min_contact", "min_vdw_ratio")


def predict_clusters(model: nn.Module, task: AssemblyTask, clusters: list[PreparedCluster],
                     solver: SolverConfig | None = None, batch_size: int = 8, device="cpu",
                     progress: bool = False) -> tuple[list[np.ndarray], float]:
    """Assemble every cluster from its stored loose state with ``solver`` (default: 50 exact uniform steps);
    returns ``(positions (17, n, 3) each, seconds)``."""
    model.eval()
    outs, seconds = [], 0.0
    chunks = range(0, len(clusters), batch_size)
    if progress:
        chunks = tqdm(chunks, desc="assembling", leave=False)
    for i in chunks:
        items = clusters[i:i + batch_size]
        batch = make_batch(items).to(device)
        t0 = time.perf_counter()
        res = task.sample(model, batch, solver)
        seconds += time.perf_counter() - t0
        pos = res.positions.double().cpu().numpy()
        for b, it in enumerate(items):
            outs.append(pos[b, :, :it.num_atoms])
    return outs, seconds


def evaluate(model: nn.Module | None, task: AssemblyTask | None, clusters: list[PreparedCluster],
             solver: SolverConfig | None = None, *, batch_size: int = 8, device="cpu",
             expansion_mean: float | None = 2.0, progress: bool = False, refine=None, noise=None,
             steps: int | None = None, method: str | None = None, grid: str | None = None) -> dict:
    """Metrics of the model (if given) and of the floors, averaged over clusters (AssembleFlow's protocol:
    per cluster, then the mean; validity = finite and <= 100 Å).

    The model samples with ``solver`` (default: 50 exact uniform steps); the older keywords ``steps``,
    ``method`` and ``grid`` override single fields of it. With ``refine`` (a
    :class:`kflow_mol.refine.RefineConfig`) the model's clusters are also refined by the rigid-body pair-energy
    minimisation and scored separately as ``model_refined`` (never folded into ``model``). ``noise``: the
    :class:`kflow_mol.noise.LooseConfig` that drew the loose states, when our noise model did (adds the
    ``per_molecule_bayes`` floor, :func:`kflow_mol.metrics.oracle_floors`)."""
    solver = (solver or SolverConfig()).replace(steps=steps, method=method, grid=grid)
    out: dict = {"num_clusters": len(clusters), "steps": solver.steps, "method": solver.method}
    floors = [oracle_floors(c.initial, c.final, c.species, c.copy_perms(), expansion_mean, noise) for c in clusters]
    for name in FLOOR_NAMES:
        if floors and name in floors[0]:
            out[name] = summarize([f[name] for f in floors])
    orders = [int(len(c.perms)) for c in clusters]  # the central copy's point group
    out["symmetry_orders"] = {str(k): orders.count(k) for k in sorted(set(orders))}
    shapes = [len(c.templates) for c in clusters]  # distinct rigid shapes per cluster
    out["shapes_per_cluster"] = {str(k): shapes.count(k) for k in sorted(set(shapes))}
    if model is not None:
        preds, seconds = predict_clusters(model, task, clusters, solver, batch_size, device, progress)
        per = [_score(p, c) for p, c in zip(preds, clusters)]
        out["model"] = summarize(per)
        out["seconds_per_cluster"] = seconds / max(len(clusters), 1)
        out["per_cluster"] = [{"id": c.id, **{k: v for k, v in r.items()}} for c, r in zip(clusters, per)]
        refs = [intermolecular_clashes(c.final, c.species)["clashes"] for c in clusters]
        out["clashes"] = {"clash_fraction": CLASH_FRACTION,
                          "clusters_with_clashes": sum(r["clashes"] > 0 for r in per),
                          "clashes_total": sum(r["clashes"] for r in per),
                          "min_contact": min((r["min_contact"] for r in per), default=float("nan")),
                          "reference_clusters_with_clashes": sum(n > 0 for n in refs)}
        out["verdict"] = verdict(out["model"], out, out["clashes"])
        out["_predictions"] = preds
        if refine is not None:
            refined = [refine_positions(p, c, refine) for p, c in zip(preds, clusters)]
            per_r = [_score(p, c) for p, c in zip(refined, clusters)]
            out["model_refined"] = summarize(per_r)
            for r, pr in zip(out["per_cluster"], per_r):
                r.update({f"refined_{k}": pr[k] for k in ("pm_atom", "pm_atom_symmetry_aware", "rot_median_deg",
                                                           "clashes")})
            out["_refined"] = refined
    return out


def _score(pred: np.ndarray, cluster: PreparedCluster) -> dict:
    """Every metric of one assembled cluster against its reference, with the clash figures."""
    clash = intermolecular_clashes(pred, cluster.species)
    return {**evaluate_cluster(pred, cluster.final, cluster.species, cluster.copy_perms()),
            **{k: clash[k] for k in _CLASH_KEYS}}


def refine_positions(pred: np.ndarray, cluster: PreparedCluster, cfg) -> np.ndarray:
    """Refine one predicted cluster ``(M, n, 3)`` (rigid poses recovered by Kabsch on each copy's body)."""
    t = cluster.body
    c = pred.mean(1)
    R = np.stack([kabsch_np(b, x)[0] for b, x in zip(t, pred)])
    res = refine_cluster(cluster.species, t, c, R, cfg)
    return np.einsum("mij,mnj->mni", res.R, t) + res.c[:, None]


def verdict(model: dict, floors: dict, clashes: dict) -> list[str]:
    """Plain-language verdict of an assembly (one cluster or the means over a set).

    Args:
        model: metrics of the assembly (``pm_center``, ``pm_atom_symmetry_aware``), per cluster or averaged.
        floors: ``{floor name: metrics}`` with the same keys (any mapping holding some of ``do_nothing``,
            ``undo_mean_expansion``, ``centroid_oracle``; empty when no reference is known).
        clashes: :func:`kflow_mol.metrics.intermolecular_clashes` of one cluster, or the set summary of
            :func:`evaluate` (``clusters_with_clashes``, ``clashes_total``, ...).

    Returns:
        Lines: the clashes and the shortest contact first, then each PM against the floors ("better than" /
        "no better than").
    """
    frac = clashes.get("clash_fraction", CLASH_FRACTION)
    rule = f"atom pairs of different molecules closer than {frac:g} x their van der Waals sum"
    if "clusters_with_clashes" in clashes:
        n = clashes["clusters_with_clashes"]
        lines = [f"clashes: {n} assembled cluster(s) have {rule} ({clashes['clashes_total']} pairs in all; "
                 f"{clashes['reference_clusters_with_clashes']} reference cluster(s) have any); shortest "
                 f"intermolecular contact {clashes['min_contact']:.2f} Å"]
    else:
        n = clashes["clashes"]
        where = f", involving {clashes['clashing_molecules']} of {clashes['molecules']} molecules" if n else ""
        lines = [f"clashes: {n or 'no'} {rule}{where}; shortest intermolecular contact "
                 f"{clashes['min_contact']:.2f} Å ({clashes['min_contact_atoms']})"]
    for key, label in (("pm_center", "centroids (PM-centre)"),
                       ("pm_atom_symmetry_aware", "packing (PM-atom, symmetry-aware)")):
        m = model.get(key)
        parts = [f"{'better' if m < floors[name][key] else 'no better'} than {words} ({floors[name][key]:.2f} Å)"
                 for name, words in _VERDICT_FLOORS.items()
                 if m is not None and floors.get(name, {}).get(key) is not None
                 and (key, name) != ("pm_center", "centroid_oracle")]  # its centroids are the truth
        if parts:
            lines.append(f"{label} {m:.2f} Å: " + ", ".join(parts))
    return lines


def summary_line(name: str, res: dict) -> str:
    """One line of an :func:`evaluate` result: the model's PM-atom, PM-centre, the do-nothing floor, speed."""
    m, d = res.get("model", {}), res.get("do_nothing", {})
    return (f"{name}: {res['num_clusters']} clusters, PM-atom {m.get('pm_atom', float('nan')):.2f} Å "
            f"(symmetry-aware {m.get('pm_atom_symmetry_aware', float('nan')):.2f}), PM-centre "
            f"{m.get('pm_center', float('nan')):.2f} Å; do-nothing PM-atom {d.get('pm_atom', float('nan')):.2f} Å; "
            f"{res.get('seconds_per_cluster', float('nan')):.3f} s/cluster")


def clash_warning(name: str, clashes: dict) -> str | None:
    """The stderr warning for an assembly with clashes (``None`` when there are none)."""
    if "clusters_with_clashes" in clashes:
        n = clashes["clusters_with_clashes"]
        return (f"WARNING: {name}: {n} assembled cluster(s) have intermolecular clashes "
                f"({clashes['clashes_total']} atom pairs): not physically plausible") if n else None
    n = clashes["clashes"]
    return (f"WARNING: {name}: {n} intermolecular clashes (shortest contact {clashes['min_contact']:.2f} Å, "
            f"{clashes['min_contact_atoms']}): the assembled cluster is not physically plausible") if n else None


def pm_histogram(result: dict, png: str | Path) -> list[str]:
    """Histogram of per-cluster PM-atom (published and symmetry-aware) against every floor.

    One vertical line per floor present in ``result`` (mean PM-atom): do-nothing, undo-expansion, centroid
    oracle, orientation oracle and symmetry-blind oracle, plus the model's own mean, so the model is read
    against the strongest reference levels, not only the weakest. Returns the labels of the vertical lines
    drawn (empty when there are no per-cluster results).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # (result key, label, (colour, line style)) of each floor line
    pm_floors = [
        ("do_nothing", "do-nothing (loose state)", ("k", "--")),
        ("undo_mean_expansion", "undo-expansion", ("tab:purple", "--")),
        ("centroid_oracle", "centroid oracle (true centroids)", ("tab:green", "-.")),
        ("orientation_oracle", "orientation oracle (true orientations)", ("tab:brown", ":")),
        ("symmetry_blind_oracle", "symmetry-blind oracle", ("tab:red", ":")),
    ]
    per = result.get("per_cluster", [])
    if not per:
        return []
    floors = [(k, label, style) for k, label, style in pm_floors if result.get(k, {}).get("pm_atom") is not None]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    a = [r["pm_atom"] for r in per]
    s = [r["pm_atom_symmetry_aware"] for r in per]
    top = max(a + s + [result[k]["pm_atom"] for k, _, _ in floors] + [1.0]) * 1.05
    bins = np.linspace(0, top, 30)
    ax.hist(a, bins, alpha=0.55, color="tab:blue", label="model, per cluster: PM-atom (published)")
    ax.hist(s, bins, alpha=0.55, color="tab:orange", label="model, per cluster: PM-atom (symmetry-aware)")
    lines = []
    for k, label, (color, ls) in floors:
        v = result[k]["pm_atom"]
        lines.append(ax.axvline(v, color=color, ls=ls, lw=1.6, label=f"{label}: {v:.2f} Å"))
    m = result.get("model", {}).get("pm_atom")
    if m is not None:
        lines.append(ax.axvline(m, color="tab:blue", ls="-", lw=2.2, label=f"model mean (published): {m:.2f} Å"))
    ax.set_xlim(0, top)
    ax.set_xlabel("PM-atom (Å), lower is better; vertical lines: published PM-atom, mean over the clusters")
    ax.set_ylabel("clusters")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"{len(per)} test clusters: model against the floors", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside, not over, the lines
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [ln.get_label() for ln in lines]


def public(result: dict) -> dict:
    """The JSON-serialisable part of a result."""
    return json.loads(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, default=float))


__all__ = ["clash_warning", "evaluate", "predict_clusters", "pm_histogram", "public", "summary_line", "verdict"]
