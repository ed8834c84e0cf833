"""How often is the labelled orientation a coin toss? Symmetries of the packed centroid sets, per split.

A loose state is the packed cluster with its centroids blurred and its orientations redrawn, so it cannot tell
the labelled packing ``X`` from ``Q X`` when an isometry ``Q`` maps the 17 packed centroids onto themselves
(:func:`kflow_mol.symmetry.centroid_symmetries`). Where ``Q`` is not a symmetry of the crystal, the labelled
orientations are one of several equally likely answers. This script counts, per split and tolerance:

- clusters whose centroid set has any such isometry (proper or improper), and those where it moves the packing
  (the atoms of ``Q X`` are not those of ``X`` up to each copy's automorphisms: the ambiguous ones);
- clusters with an *equivalent packing* the rigid-body state can represent
  (:func:`kflow_mol.symmetry.equivalent_packings`: rotations, or reflections of planar copies);
- what the metrics say about those equivalent packings: the labelled PM-atom and rotation error (what a
  perfect but unlucky prediction scores) and the symmetry-aware ones (0 by construction since session 10).

::

    python benchmarks/mol_packing_symmetry.py --data runs/bench_mol/cifs --tol 0.3 \\
        --json benchmarks/results/orientation/S10_packing_symmetry.json
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from kflow_mol.metrics import evaluate_cluster
from kflow_mol.noise import LooseConfig
from kflow_mol.pipeline import load_data
from kflow_mol.symmetry import centroid_symmetries, equivalent_packings


def moves_packing(pc, Q: np.ndarray, pi: np.ndarray, atol: float = 0.5) -> bool:
    """Whether ``Q`` (about the centroid mean) puts some copy's atoms elsewhere than the copy on its image site,
    up to that copy's automorphisms (RMSD above ``atol``)."""
    o = pc.c1.mean(0)
    moved = (pc.final - o) @ Q.T + o
    for i, j in enumerate(pi):
        perms = pc.copy_perms()[j]  # identity-padded: the padding repeats the identity
        if min(np.sqrt(((moved[i][p] - pc.final[j]) ** 2).sum(-1).mean()) for p in perms) > atol:
            return True
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="dataset name or folder of CIFs")
    ap.add_argument("--tol", type=float, nargs="+", default=[0.3], help="centroid tolerances (Å)")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    data = load_data(args.data, None, LooseConfig(), args.split_seed, log=lambda _: None)
    out = {}
    for tol in args.tol:
        for split in ("train", "test"):
            clusters = data.select(split, args.split_seed)
            any_op = ambiguous = proper = with_packing = 0
            scores = []
            for pc in clusters:
                ops = centroid_symmetries(pc.c1, tol)
                any_op += bool(ops)
                proper += any(np.linalg.det(Q) > 0 for Q, _ in ops)
                ambiguous += any(moves_packing(pc, Q, pi) for Q, pi in ops)
                c, R = equivalent_packings(pc.c1, pc.R1, pc.body, pc.copy_shape, tol)
                with_packing += len(c) > 1
                for p in range(1, len(c)):
                    pos = np.einsum("mab,mnb->mna", R[p], pc.body) + c[p][:, None]
                    e = evaluate_cluster(pos, pc.final, pc.species, pc.copy_perms())
                    scores.append([e["pm_atom"], e["pm_atom_symmetry_aware"], e["rot_median_deg"],
                                   e["rot_median_deg_symmetry_aware"]])
            s = np.array(scores).reshape(-1, 4)
            row = {"clusters": len(clusters), "with_centroid_symmetry": any_op, "with_proper_rotation": proper,
                   "ambiguous": ambiguous, "with_equivalent_packing": with_packing, "equivalent_packings": len(s),
                   "median_over_equivalent_packings": dict(zip(
                       ["pm_atom", "pm_atom_symmetry_aware", "rot_median_deg", "rot_median_deg_symmetry_aware"],
                       np.median(s, 0).round(3).tolist() if len(s) else [None] * 4))}
            out[f"tol={tol}/{split}"] = row
            print(f"tol {tol} Å, {split}: {json.dumps(row)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
