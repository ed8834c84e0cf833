"""How much do the *true* packed centroids say about a molecule's orientation, without learning?

Two measurements on a prepared dataset (no model):

* **Axes against the neighbour tensor.** For every copy, the axes of its gyration tensor in the packed cluster
  (small / mid / long) against the axes of its centroid-neighbour tensor ``sum_j d_ij^-p u_ij u_ij^T`` (directions
  with few / mid / many close neighbours). Each cell is the median angle between the two lines; for random
  orientations every cell is 60 degrees. The best one-to-one pairing of the axes is reported as a frame: the
  median of its worst axis angle, and the fraction under 30 degrees (random: 75.5 degrees, 0.03).
* **The Voronoi cell.** For the central copy, penalise atoms that cross the mid-plane to any other centroid
  (``x_a . u_j + 0.8 r_vdW(a) > d_j / 2``): where the truth ranks among random orientations, and the angle to
  the truth (closest symmetry-equivalent) of the best of the random orientations.
* **Near-symmetries**: the point-group order of each cluster's central shape at automorphism tolerances of
  0.1 (the library's) to 1.0 Å RMSD: would a looser notion of "the same pose" make the targets less ambiguous?
* **The lattice-frame floor** (``--floor-split``): the true centroids with every molecule on the principal-axes
  frame of the loose centroids, the rotational start of ``lattice_start: true``. The rotation median of a model
  that samples from that start and turns nothing: compare a model's test ``rot_median_deg`` with it.

    python benchmarks/mol_orientation_signal.py --data runs/bench_mol/cifs --json benchmarks/results/orientation/signal.json
"""
from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
from scipy.spatial.transform import Rotation

from kflow_mol.dataset import load_prepared, split_indices
from kflow_mol.molecule import vdw_radii


def angle_deg(R: np.ndarray, Rt: np.ndarray, syms: np.ndarray) -> float:
    """Angle between ``R`` and the closest of ``Rt S_g`` (degrees)."""
    tr = np.einsum("ij,ik,gkj->g", R, Rt, syms)
    return float(np.degrees(np.arccos(np.clip((tr.max() - 1) / 2, -1, 1))))


def axes_table(clusters, power: float) -> dict:
    cells = []
    for c in clusters:
        u = c.c1[None] - c.c1[:, None]  # u[i, j] = c_j - c_i
        d = np.linalg.norm(u, axis=-1)
        np.fill_diagonal(d, np.inf)
        w = d ** -power
        T = np.einsum("ij,ija,ijb->iab", w, u / np.where(np.isinf(d), 1, d)[..., None],
                      u / np.where(np.isinf(d), 1, d)[..., None])
        G = np.einsum("mij,mnj,mnk,mlk->mil", c.R1, c.body, c.body, c.R1)  # lab-frame gyration (unnormalised)
        vm, ve = np.linalg.eigh(G)[1], np.linalg.eigh(T)[1]
        cells.append(np.abs(np.einsum("mai,maj->mij", vm, ve)))
    ang = np.degrees(np.arccos(np.clip(np.concatenate(cells), 0, 1)))  # (copies, mol axis, env axis)
    best = min(((float(np.median(ang[:, [0, 1, 2], list(p)].max(1))), p) for p in itertools.permutations(range(3))))
    worst = ang[:, [0, 1, 2], list(best[1])].max(1)
    return {"power": power, "copies": int(ang.shape[0]), "median_deg": np.round(np.median(ang, 0), 1).tolist(),
            "best_pairing": list(best[1]), "best_worst_axis_median_deg": round(best[0], 1),
            "best_fraction_under_30deg": round(float((worst < 30).mean()), 3)}


def voronoi(clusters, n_rot: int, seed: int) -> dict:
    Q = Rotation.random(n_rot, random_state=seed).as_matrix()
    ranks, best_err = [], []
    for c in clusters:
        i = int(np.argmin(np.linalg.norm(c.c1 - c.c1.mean(0), axis=1)))
        u = np.delete(c.c1 - c.c1[i], i, 0)
        d = np.linalg.norm(u, axis=1)
        r = vdw_radii(c.species)

        def penalty(Rs):
            x = np.einsum("qab,nb->qna", Rs, c.body[i])
            over = np.einsum("qna,ja->qnj", x, u / d[:, None]) + 0.8 * r[None, :, None] - d / 2
            return (np.clip(over, 0, None) ** 2).sum((1, 2))

        p = penalty(Q)
        ranks.append(float((p < penalty(c.R1[i][None])[0]).mean()))
        s = c.copy_shape[i]
        best_err.append(angle_deg(Q[np.argmin(p)], c.R1[i], c.shape_symmetries[s, : c.shape_orders[s]]))
    e = np.asarray(best_err)
    return {"clusters": len(clusters), "rotations": n_rot,
            "truth_rank_median": round(float(np.median(ranks)), 3), "truth_rank_mean": round(float(np.mean(ranks)), 3),
            "best_fit_error_median_deg": round(float(np.median(e)), 1),
            "best_fit_under_30deg": round(float((e < 30).mean()), 3)}


def near_symmetry(clusters, tols=(0.1, 0.25, 0.5, 1.0)) -> dict:
    from kflow_mol.symmetry import automorphisms

    out = {}
    for tol in tols:
        orders = [int(automorphisms(c.species, c.template, tol=tol)[0].shape[0]) for c in clusters]
        out[str(tol)] = {str(g): orders.count(g) for g in sorted(set(orders))}
    return {"clusters": len(clusters), "orders_by_tolerance": out}


def lattice_floor(clusters) -> dict:
    import torch

    from kflow_mol.frames import inertial_frame
    from kflow_mol.metrics import rotation_errors

    med = []
    for c in clusters:  # the task's lattice start: the frame of the loose centroids
        F = inertial_frame(torch.from_numpy(c.initial.mean(1))[None])[0][0].numpy()
        pos = np.einsum("ij,mnj->mni", F, c.body) + c.c1[:, None]
        med.append(float(np.median(rotation_errors(pos, c.final, c.copy_perms()))))
    return {"clusters": len(clusters), "rot_median_deg_mean": round(float(np.mean(med)), 2),
            "per_cluster": [round(m, 1) for m in med]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="cod17-mini", help="dataset name or folder (as for kflow-mol train)")
    ap.add_argument("--voronoi-clusters", type=int, default=80, help="clusters for the Voronoi fit (slow part)")
    ap.add_argument("--rotations", type=int, default=4000, help="random orientations searched per molecule")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--floor-split", default="test", choices=["train", "val", "test", "all"],
                    help="split (seeded 80/10/10, seed 0) of the lattice-frame floor")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args()
    clusters, _ = load_prepared(args.data, progress=False)
    out = {"data": args.data, "axes": [axes_table(clusters, p) for p in (2.0, 4.0, 8.0)],
           "voronoi": voronoi(clusters[: args.voronoi_clusters], args.rotations, args.seed)}
    out["near_symmetry"] = near_symmetry(clusters[:120])
    picked = clusters if args.floor_split == "all" else \
        [clusters[i] for i in split_indices(len(clusters), 0)[args.floor_split]]
    out["lattice_floor"] = {"split": args.floor_split, **lattice_floor(picked)}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
