"""How close must the centroids be for the lattice orientation search, and how close are the flow's?

For every cluster of a split, beside the flow's own result (a trained ``model.pt``):

* ``orient_oracle_at_model``: the flow's centroids (superposed on the true ones) with every true orientation, the
  ceiling of any orientation fix that keeps the flow's centroids;
* ``search_true``: :func:`kflow_mol.lattice.search_orientation` at the true centroids (single-shape clusters whose
  centroids are one lattice), and the same with Gaussian noise of ``--sigma`` Å on them (``search_noisy``);
* ``search_model``: the same search at the flow's centroids (applied only where they fit one lattice);
* the lattice-fit residual (RMS Å) of the true, noisy and flow centroids.

PM-atom is reported symmetry-aware and published (symmetry-blind)::

    python benchmarks/mol_lattice_search.py --ckpt runs/s9/B9/model.pt --data runs/bench_mol/cifs --split test \\
        --json benchmarks/results/orientation/S9_lattice_search_test.json
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from kflow.solver import SolverConfig
from kflow_mol.evaluate import _score, predict_clusters
from kflow_mol.lattice import fit_lattice, search_orientation
from kflow_mol.metrics import oracle_floors
from kflow_mol.pipeline import load_data, load_model
from kflow_mol.so3 import kabsch_np


def _pm(pos: np.ndarray | None, cluster) -> dict:
    if pos is None:
        return {"sym": None, "pub": None, "within_10deg": None}
    s = _score(pos, cluster)
    return {"sym": s["pm_atom_symmetry_aware"], "pub": s["pm_atom"], "within_10deg": s["rot_within_10deg"]}


def _search(cluster, c: np.ndarray) -> tuple[np.ndarray | None, float | None]:
    """The searched positions (``None``: not one shape, or not one lattice) and the lattice-fit residual."""
    res = search_orientation(cluster.species, cluster.templates[0], c) if len(cluster.templates) == 1 else None
    if res is not None:  # the search fitted the lattice already
        return res.positions(cluster.templates[0]), res.lattice.residual
    fit = fit_lattice(c)
    return None, None if fit is None else fit.residual


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True, help="a trained model.pt")
    ap.add_argument("--data", required=True, help="dataset name or folder of CIFs (the model's training data)")
    ap.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="first N clusters of the split (0: all)")
    ap.add_argument("--sigma", type=float, default=0.3, help="Gaussian noise (Å per coordinate) on the true centroids")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(args.ckpt)
    clusters = load_data(args.data, None, loaded.noise, args.split_seed, log=lambda _: None).select(
        args.split, args.split_seed, args.limit)
    preds, _ = predict_clusters(loaded.model, loaded.task, clusters, SolverConfig(), 8, "cpu", False)
    rng = np.random.default_rng(0)
    rows = []
    for c, p in zip(clusters, preds):
        t0 = time.time()
        cp = p.mean(1)
        R, _ = kabsch_np(cp - cp.mean(0), c.c1 - c.c1.mean(0))  # the flow's centroids in the true frame
        cpa = (cp - cp.mean(0)) @ R.T + c.c1.mean(0)
        noisy = c.c1 + args.sigma * rng.standard_normal(c.c1.shape)
        s_true, r_true = _search(c, c.c1)
        s_noisy, r_noisy = _search(c, noisy)
        s_model, r_model = _search(c, cpa)
        floor = oracle_floors(c.initial, c.final, c.species, c.copy_perms())["centroid_oracle"]
        rows.append({"id": c.id, "shapes": len(c.templates),
                     "centroid_rmsd_model": float(np.sqrt(((cpa - c.c1) ** 2).sum(1).mean())),
                     "fit_residual": {"true": r_true, "noisy": r_noisy, "model": r_model},
                     "flow": _pm(p, c), "centroid_oracle": {"sym": floor["pm_atom_symmetry_aware"], "pub": floor["pm_atom"]},
                     "orient_oracle_at_model": _pm(cpa[:, None] + c.body @ np.transpose(c.R1, (0, 2, 1)), c),
                     "search_true": _pm(s_true, c), "search_noisy": _pm(s_noisy, c), "search_model": _pm(s_model, c),
                     "seconds": time.time() - t0})
        r = rows[-1]
        print(f"{c.id[-24:]:>24}  flow {r['flow']['sym']:.2f}  oracle {r['centroid_oracle']['sym']:.2f}  "
              f"orient@model {r['orient_oracle_at_model']['sym']:.2f}  search@true {r['search_true']['sym'] or float('nan'):.2f}  "
              f"@noisy {r['search_noisy']['sym'] or float('nan'):.2f}  @model {r['search_model']['sym'] or float('nan'):.2f}  "
              f"fit residual true/noisy/model {r_true or float('nan'):.2f}/{r_noisy or float('nan'):.2f}/"
              f"{r_model or float('nan'):.2f}  {r['seconds']:.0f}s", flush=True)

    def mean(key, sub, where=None):
        v = [r[key][sub] for r in rows if (where is None or r[where]["sym"] is not None)]
        return float(np.mean(v)) if v else None

    summary = {"clusters": len(rows), "sigma": args.sigma,
               "centroid_rmsd_model": float(np.mean([r["centroid_rmsd_model"] for r in rows]))}
    for key in ("flow", "centroid_oracle", "orient_oracle_at_model"):
        summary[key] = {"sym": mean(key, "sym"), "pub": mean(key, "pub")}
    for key in ("search_true", "search_noisy", "search_model"):
        n = sum(r[key]["sym"] is not None for r in rows)
        summary[key] = {"applied": n, "sym": mean(key, "sym", key), "pub": mean(key, "pub", key),
                        "oracle_sym_same_clusters": mean("centroid_oracle", "sym", key),
                        "solved_below_0.5A": sum(1 for r in rows if r[key]["sym"] is not None and r[key]["sym"] < 0.5)}
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"summary": summary, "clusters": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
