"""How stable is a cluster frame made from the 17 centroids? (the rotational source of ``lattice_start``)

``lattice_start`` puts every molecule on the principal-axes frame of its cluster's centroids. That start carries
information only if the frame is a stable function of the crystal. For each cluster this measures the angle
between the frame of the packed centroids and

* the frame of the loose centroids (what ``lattice_start=true`` uses: one loose draw of the noise model each),
* the frame of the packed centroids with isotropic Gaussian noise of ``sigma`` Å on every centroid (a sampler
  that packs the centroids first lands within ~2 Å, ``pm_center``),

and reports the relative third moment along the least skewed principal axis (0 for a centrosymmetric set, where
no sign rule on odd moments exists) and the smallest relative gap between principal moments.

``--sign-rule fourth`` replaces the library's third-moment signs by a choice among the four proper sign patterns
that also scores the fourth-order mixed moments ``sum x^3 y``, ``sum x^3 z``, ``sum y^3 z`` (these survive
inversion). Neither rule is stable under a few tenths of an Å (BENCHMARKS.md, session 6).

    python benchmarks/mol_frame_stability.py --data runs/bench_mol/cifs --clusters 80 --json out.json
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from kflow_mol import so3
from kflow_mol.dataset import load_prepared
from kflow_mol.frames import inertial_frame
from kflow_mol.noise import make_loose

SIGNS = torch.tensor([[1, 1, 1], [-1, -1, 1], [-1, 1, -1], [1, -1, -1]], dtype=torch.float64)


def frame_fourth(p: torch.Tensor) -> torch.Tensor:
    """Principal axes of ``p (M, 3)`` with the proper sign pattern that maximises the normalised third moments
    plus the normalised mixed fourth moments."""
    r = p - p.mean(0)
    axes = inertial_frame(p)[0]
    best, score = axes, -np.inf
    for s in SIGNS:
        q = r @ (axes * s)
        x, y, z = q.unbind(-1)
        third = (q**3).sum(0) / (q.abs() ** 3).sum(0).clamp_min(1e-12)
        mixed = torch.stack([(x**3 * y).sum(), (x**3 * z).sum(), (y**3 * z).sum()])
        scale = torch.stack([(x.abs() ** 3 * y.abs()).sum(), (x.abs() ** 3 * z.abs()).sum(),
                             (y.abs() ** 3 * z.abs()).sum()]).clamp_min(1e-12)
        sc = float(third.sum() + (mixed / scale).sum())
        if sc > score:
            best, score = axes * s, sc
    return best


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.rad2deg(so3.geodesic_distance(a, b)))


def stats(v: list[float]) -> dict:
    a = np.asarray(v)
    return {"median": float(np.median(a)), "frac_below_0.05": float((a < 0.05).mean()), "q25": float(np.quantile(a, 0.25)), "q75": float(np.quantile(a, 0.75)),
            "frac_below_20deg": float((a < 20).mean()), "n": int(a.size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset name or folder (as for kflow-mol train)")
    ap.add_argument("--clusters", type=int, default=80, help="the first N prepared clusters")
    ap.add_argument("--draws", type=int, default=4, help="loose draws / noise draws per cluster")
    ap.add_argument("--sigmas", default="0.25,0.5,1,2", help="centroid noise levels (Å)")
    ap.add_argument("--sign-rule", choices=["third", "fourth"], default="third")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    frame = (lambda p: inertial_frame(p)[0]) if args.sign_rule == "third" else frame_fourth
    clusters = load_prepared(args.data, progress=False)[0][: args.clusters]
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    res: dict[str, list[float]] = {"loose": [], **{f"packed_noise_{s:g}": [] for s in sigmas}}
    skew, gap = [], []
    for cl in clusters:
        final = np.asarray(cl.final, dtype=np.float64)
        c1 = torch.from_numpy(final.mean(1))
        F1 = frame(c1)
        q = (c1 - c1.mean(0)) @ F1
        skew.append(float(((q**3).sum(0).abs() / (q.abs() ** 3).sum(0).clamp_min(1e-12)).min()))
        ev = torch.linalg.eigvalsh((c1 - c1.mean(0)).T @ (c1 - c1.mean(0)))
        gap.append(float(((ev[1:] - ev[:-1]) / ev[-1]).min()))
        for _ in range(args.draws):
            res["loose"].append(angle(frame(torch.from_numpy(make_loose(final, rng).mean(1))), F1))
            for s in sigmas:
                noisy = c1 + s * torch.randn(c1.shape, generator=gen, dtype=c1.dtype)
                res[f"packed_noise_{s:g}"].append(angle(frame(noisy), F1))
    out = {"data": args.data, "clusters": len(clusters), "sign_rule": args.sign_rule,
           "angle_to_packed_frame_deg": {k: stats(v) for k, v in res.items()},
           "min_rel_third_moment": stats(skew), "min_rel_moment_gap": stats(gap)}
    print(f"{len(clusters)} clusters, sign rule '{args.sign_rule}': angle (deg) to the packed centroids' frame")
    for k, v in out["angle_to_packed_frame_deg"].items():
        print(f"  {k:20s} median {v['median']:6.1f}  q25 {v['q25']:6.1f}  q75 {v['q75']:6.1f}  "
              f"below 20 deg {v['frac_below_20deg']:.2f}")
    print(f"  least skewed axis, |third moment| / abs. third moment: median {out['min_rel_third_moment']['median']:.3f} "
          f"(below 0.05: {out['min_rel_third_moment']['frac_below_0.05']:.2f}); "
          f"smallest moment gap / largest: median {out['min_rel_moment_gap']['median']:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
