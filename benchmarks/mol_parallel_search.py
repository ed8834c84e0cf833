"""Orientation by energy with every copy of a shape parallel: a 3-D global search per cluster.

`benchmarks/mol_orientation_classes.py` shows that most molecules of a real cluster share the orientation of
the largest class of their shape (translation-related copies are parallel). This tests whether a pair energy
finds that one orientation when the search is reduced to it. For single-shape clusters (``--one-class``: only
those whose copies are all parallel), at the true centroids (optionally with Gaussian noise of ``--sigma`` Å on
them), :func:`kflow_mol.lattice.scan_orientation` scans ``--candidates`` uniform rotations ``G`` (seeded by
``--seed``; every copy placed as ``c_i + template @ G^T``) by the UFF 12-6 energy on heavy atoms (6 Å), relaxes
the ``--keep`` best on all atoms (8 Å, L-BFGS, float64) and keeps the lowest. ``--energy central`` scores only the
pairs of the molecule nearest the mean centroid (its shell of neighbours); ``cluster`` every pair of the vacuum
cluster. Reports per cluster the angle from ``G*`` to each copy's true orientation (closest symmetry-equivalent),
PM-atom beside the centroid oracle, the largest-class ceiling and the energy of the true largest class::

    python benchmarks/mol_parallel_search.py --data runs/bench_mol/cifs --limit 12 --one-class --energy central \
        --candidates 8192 --keep 20 --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from mol_orientation_classes import _angle  # the benchmark beside this one (scripts run from benchmarks/)

from kflow_mol.dataset import load_prepared
from kflow_mol.evaluate import _score
from kflow_mol.lattice import SearchConfig, central_index, scan_orientation
from kflow_mol.metrics import oracle_floors
from kflow_mol.refine import pair_energy, uff_vdw


def _classes(cl) -> np.ndarray:
    """``(M, M)`` angle (degrees) between the orientations of every two copies, up to the shape's symmetry."""
    R1, S = cl.R1, cl.symmetries
    return np.array([[min(_angle(R1[a] @ s, R1[b]) for s in S) for b in range(len(R1))] for a in range(len(R1))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=10, help="single-shape clusters, drawn with seed 0")
    ap.add_argument("--candidates", type=int, default=1024)
    ap.add_argument("--sigma", type=float, default=0.0, help="Gaussian noise on the true centroids (Å)")
    ap.add_argument("--energy", choices=["cluster", "central"], default="cluster",
                    help="cluster: every intermolecular pair (a vacuum cluster); central: only the pairs of the molecule "
                         "nearest the mean centroid (its shell of neighbours, bulk-like)")
    ap.add_argument("--one-class", action="store_true",
                    help="only clusters whose copies are all parallel (one orientation class within 5 degrees)")
    ap.add_argument("--keep", type=int, default=5, help="best scanned candidates refined by L-BFGS")
    ap.add_argument("--seed", type=int, default=0, help="seed of the scanned candidate orientations")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    clusters, _ = load_prepared(args.data, progress=False)
    picked = [c for c in clusters if len(np.unique(c.copy_shape)) == 1]
    if args.one_class:
        picked = [c for c in picked if (_classes(c) < 5).all()]
    print(f"{len(picked)} of {len(clusters)} clusters have one shape{' and one orientation class' * args.one_class}; "
          f"sigma {args.sigma} Å; energy {args.energy}", flush=True)
    rows = []
    for i in np.random.default_rng(0).permutation(len(picked))[: args.limit]:
        cl, t0 = picked[i], time.time()
        c = torch.tensor(cl.c1, dtype=torch.float64)
        if args.sigma:
            c = c + args.sigma * torch.randn(c.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(int(i)))
        focus = central_index(c.numpy()) if args.energy == "central" else None
        g, e_best = scan_orientation(cl.species, cl.templates[0], c, focus,
                                     SearchConfig(candidates=args.candidates, keep=args.keep, seed=args.seed))
        R1, S = cl.R1, cl.symmetries
        err = np.array([min(_angle(g @ s, R1[j]) for s in S) for j in range(len(R1))])
        same = _classes(cl)
        major = int((same < 5).sum(1).argmax())
        T = torch.tensor(cl.templates[0], dtype=torch.float64)
        x, d = (torch.from_numpy(a) for a in uff_vdw(np.asarray(cl.species)))
        e_true = float(pair_energy(c[:, None] + (T @ torch.tensor(R1[major]).T)[None], x, d, 8.0, focus))
        pm = _score(np.asarray(c)[:, None] + cl.templates[0] @ g.T, cl)
        floor = oracle_floors(cl.initial, cl.final, cl.species, cl.copy_perms())["centroid_oracle"]
        rows.append({"id": cl.id, "median_deg": float(np.median(err)), "within_10deg": float((err < 10).mean()),
                     "pm_atom": pm["pm_atom"], "pm_atom_sym": pm["pm_atom_symmetry_aware"],
                     "oracle_pm_atom": floor["pm_atom"], "oracle_pm_atom_sym": floor["pm_atom_symmetry_aware"],
                     "largest_class": float((same[major] < 5).mean()), "energy_found": e_best,
                     "energy_true_largest_class": e_true, "seconds": time.time() - t0})
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[-1].items()}), flush=True)
    w = np.array([r["within_10deg"] for r in rows])
    ceil = np.array([r["largest_class"] for r in rows])
    summary = {"clusters": len(rows), "candidates": args.candidates, "sigma": args.sigma, "energy": args.energy,
               "seed": args.seed, "one_class": args.one_class, "keep": args.keep,
               **{k: float(np.mean([r[k] for r in rows])) for k in ("pm_atom", "pm_atom_sym", "oracle_pm_atom",
                                                                    "oracle_pm_atom_sym")},
               "within_10deg": float(w.mean()), "largest_class_ceiling": float(ceil.mean()),
               "clusters_found": int((w >= 0.9 * ceil).sum()),
               "clusters_true_lower": int(sum(r["energy_true_largest_class"] < r["energy_found"] - 1 for r in rows))}
    print(f"{len(rows)} clusters: molecules within 10 deg {summary['within_10deg']:.2f} (ceiling with one orientation "
          f"{summary['largest_class_ceiling']:.2f}); largest class found in {summary['clusters_found']}; the true "
          f"largest class has a lower energy than the one found in {summary['clusters_true_lower']}; PM-atom "
          f"{summary['pm_atom']:.2f} Å (symmetry-aware {summary['pm_atom_sym']:.2f}) against the centroid oracle "
          f"{summary['oracle_pm_atom']:.2f} ({summary['oracle_pm_atom_sym']:.2f})", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"summary": summary, "clusters": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
