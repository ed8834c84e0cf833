"""How many distinct orientations do the molecules of a real 17-molecule cluster take?

In a crystal, copies related by a lattice translation have the same orientation, so a cluster of 17 holds only
a few *orientation classes* per distinct shape (a molecule and its mirror image are two shapes). For every
cluster of a dataset this prints and records:

* the classes of each shape (copies whose orientations agree within ``--tol`` degrees, up to the shape's own
  symmetry), and the fraction of molecules in the largest class of their shape;
* the **consensus oracle**: true centroids, and every copy turned to the orientation of the largest class of its
  shape (one orientation per shape, the best one) — PM-atom (published and symmetry-aware) beside the
  centroid oracle (true centroids, loose orientations) and the fraction of molecules within 10 degrees.

It measures how much of the orientation problem is one decision per shape::

    python benchmarks/mol_orientation_classes.py --data runs/bench_mol/cifs --json benchmarks/results/orientation/classes.json
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from kflow_mol.dataset import load_prepared
from kflow_mol.evaluate import _score
from kflow_mol.metrics import oracle_floors


def _angle(Ra: np.ndarray, Rb: np.ndarray) -> np.ndarray:
    """Geodesic angle (degrees) between rotation stacks, broadcast over leading dims."""
    c = (np.einsum("...ij,...ij->...", Ra, Rb) - 1) / 2
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))


def classes(cluster: dict, tol: float) -> dict:
    """Orientation classes of every shape and the consensus-oracle positions ``(M, n, 3)``."""
    R1, cs = np.asarray(cluster.R1), np.asarray(cluster.copy_shape)
    body, c1 = np.asarray(cluster.body), np.asarray(cluster.c1)
    pred = np.empty_like(np.asarray(cluster.final))
    sizes, err = [], np.zeros(len(cs))
    for s in np.unique(cs):
        idx = np.where(cs == s)[0]
        S = np.asarray(cluster.shape_symmetries[s][: cluster.shape_orders[s]])
        # equivalents of every copy's orientation: R_i S_g, (I, G, 3, 3); distance to R_j up to the symmetry
        eq = np.einsum("iab,gbc->igac", R1[idx], S)
        D = _angle(eq[:, None], R1[idx][None, :, None]).min(-1)  # (I, J)
        left, groups = set(range(len(idx))), []
        while left:  # greedy: the first unassigned copy and every copy within tol of it
            i = min(left)
            g = {j for j in left if D[i, j] < tol}
            groups.append(g)
            left -= g
        sizes.append(sorted((len(g) for g in groups), reverse=True))
        rep = min(max(groups, key=len))
        for i in idx:  # the equivalent of the representative closest to copy i (labels kept)
            Rc = eq[rep, int(np.argmin(_angle(eq[rep], R1[i])))]
            err[i] = _angle(Rc, R1[i])
            pred[i] = body[i] @ Rc.T + c1[i]
    return {"sizes": sizes, "pred": pred, "err": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="dataset name or folder of CIFs (as for kflow-mol train)")
    ap.add_argument("--tol", type=float, default=5.0, help="degrees within which two copies share a class")
    ap.add_argument("--json", default=None, help="write per-cluster results and the summary here")
    args = ap.parse_args()
    clusters, _ = load_prepared(args.data, progress=False)
    rows = []
    for c in clusters:
        r = classes(c, args.tol)
        cons = _score(r["pred"], c)
        floor = oracle_floors(c.initial, c.final, c.species, c.copy_perms(), 2.0)["centroid_oracle"]
        M = len(c.copy_shape)
        rows.append({"id": c.id, "shapes": len(r["sizes"]), "class_sizes": r["sizes"],
                     "classes": sum(len(s) for s in r["sizes"]), "frac_largest": sum(s[0] for s in r["sizes"]) / M,
                     "consensus_within_10deg": float((r["err"] < 10).mean()),
                     "consensus_pm_atom": cons["pm_atom"], "consensus_pm_atom_sym": cons["pm_atom_symmetry_aware"],
                     "centroid_oracle_pm_atom": floor["pm_atom"],
                     "centroid_oracle_pm_atom_sym": floor["pm_atom_symmetry_aware"]})
    n = np.array([r["classes"] for r in rows])
    mean = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    summary = {"clusters": len(rows), "tol_deg": args.tol,
               "classes_histogram": {str(k): int((n == k).sum()) for k in sorted(set(n.tolist()))},
               "one_shape_clusters": sum(r["shapes"] == 1 for r in rows),
               "frac_in_largest_class": mean("frac_largest"),
               "consensus_within_10deg": mean("consensus_within_10deg"),
               "consensus_pm_atom": mean("consensus_pm_atom"), "consensus_pm_atom_sym": mean("consensus_pm_atom_sym"),
               "centroid_oracle_pm_atom": mean("centroid_oracle_pm_atom"),
               "centroid_oracle_pm_atom_sym": mean("centroid_oracle_pm_atom_sym")}
    print(f"{len(rows)} clusters ({summary['one_shape_clusters']} with one shape); orientation classes per "
          f"cluster (all shapes, {args.tol:g} deg): {summary['classes_histogram']}")
    print(f"molecules in the largest class of their shape: {summary['frac_in_largest_class']:.3f}")
    print(f"consensus oracle (true centroids, one orientation per shape): within 10 deg "
          f"{summary['consensus_within_10deg']:.3f}; PM-atom {summary['consensus_pm_atom']:.2f} Å "
          f"(symmetry-aware {summary['consensus_pm_atom_sym']:.2f}) against the centroid oracle "
          f"{summary['centroid_oracle_pm_atom']:.2f} Å ({summary['centroid_oracle_pm_atom_sym']:.2f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"summary": summary, "clusters": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
