"""What can be known about each packed centroid from its own loose centroid alone? A per-molecule Bayes floor.

The loose state (:mod:`kflow_mol.noise`) moves each centroid out from the cluster centre by its own factor
``f ~ U[mean - spread, mean + spread]`` and adds isotropic Gaussian jitter ``sigma``. A model that uses nothing
collective (no neighbours, no lattice) can at best return the posterior mean of each centroid given its own loose
centroid (:func:`kflow_mol.noise.posterior_centroids`, in closed form over the direction). Here the prior of
distances from the centre is the training clusters' (``evaluate``'s ``per_molecule_bayes`` floor uses each
cluster's own distances instead).

PM-centre of that estimate on a split (beside undoing the mean expansion) is the level a network reaches if it
learns only each molecule's own noise and nothing of the packing::

    python benchmarks/mol_centroid_floor.py --data runs/bench_mol/cifs --split test \\
        --json benchmarks/results/orientation/S9_centroid_floor.json
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from kflow_mol.metrics import pm_center
from kflow_mol.noise import LooseConfig, posterior_centroids, undo_mean_expansion
from kflow_mol.pipeline import load_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="dataset name or folder of CIFs")
    ap.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cfg = LooseConfig()  # the default noise model, as every benchmark run here uses
    data = load_data(args.data, None, cfg, args.split_seed, log=lambda _: None)
    rho = np.concatenate([np.linalg.norm(c.c1 - c.c1.mean(0), axis=1) for c in data.select("train", args.split_seed)])
    rows = []
    for c in data.select(args.split, args.split_seed):
        est = posterior_centroids(c.initial, cfg, rho).mean(1)
        undo = undo_mean_expansion(c.initial, cfg).mean(1)
        rows.append({"id": c.id, "bayes_pm_center": pm_center(est[:, None], c.c1[:, None]),
                     "undo_pm_center": pm_center(undo[:, None], c.c1[:, None])})
    summary = {"clusters": len(rows), "split": args.split, "prior_distances": len(rho),
               "bayes_pm_center": float(np.mean([r["bayes_pm_center"] for r in rows])),
               "undo_mean_expansion_pm_center": float(np.mean([r["undo_pm_center"] for r in rows]))}
    print(f"{args.split}: {len(rows)} clusters; PM-centre of the per-molecule Bayes estimate "
          f"{summary['bayes_pm_center']:.3f} Å, undoing the mean expansion {summary['undo_mean_expansion_pm_center']:.3f} Å")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"summary": summary, "clusters": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
