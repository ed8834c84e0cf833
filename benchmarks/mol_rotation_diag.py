"""Where does an assembly model learn orientations? Rotation error by k-bin, and after sampling.

For a trained ``model.pt`` and a split of a dataset, prints (and writes as JSON with ``--json``):

* **by k-bin** on path samples (the training distribution): the median angle between the predicted
  endpoint orientation and the target (closest symmetry-equivalent), against the angle still left between
  the current state ``R_k`` and the target ("predict no further turn"); the same in Å at the atom level;
* **after sampling** (the full sampler from the stored loose states): the median angle to the closest
  symmetry-equivalent of the truth, the fraction of molecules within 10 degrees, PM-atom (published and
  symmetry-aware) and PM-centre;
* with ``--force-centroids``, the same sampler with the centroids put back on the true path after every step
  (uses the target: a diagnosis of what off-path centroids cost the orientations, not a method).

    python benchmarks/mol_rotation_diag.py --ckpt runs/mol/model.pt --data cod17-mini --split val
"""
from __future__ import annotations

import argparse
import json

import torch

from kflow_mol.evaluate import evaluate
from kflow_mol.metrics import evaluate_cluster, summarize
from kflow_mol.pipeline import load_data, load_model, solver_config
from kflow_mol.rigid import rotation_error
from kflow_mol.task import make_batch


@torch.no_grad()
def by_k(model, task, clusters, bins: int = 10, draws: int = 2, seed: int = 0) -> list[dict]:
    """Median rotation errors of the endpoint prediction on path samples, per k-bin."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(bins):
        pred, left, pred_a, left_a = [], [], [], []
        for i in range(0, len(clusters), 8):
            batch = make_batch(clusters[i:i + 8], with_packings=task.packing_targets)
            for _ in range(draws):
                n = batch.c0.shape[0]
                k = (b + torch.rand(n, generator=gen, dtype=batch.c0.dtype)) / bins
                out = task.predict_path_sample(model, batch, k)
                ang_p = rotation_error(out["R1_hat"], out["R1"], batch.symmetries, batch.sym_mask)
                ang_l = rotation_error(out["R_k"], out["R1"], batch.symmetries, batch.sym_mask)
                pred.append(ang_p.flatten())
                left.append(ang_l.flatten())
                pred_a.append(out["rot_rmsd_hat"].flatten())
                left_a.append(out["rot_rmsd_k"].flatten())
        cat = lambda x: torch.cat(x).double()  # noqa: E731
        rows.append({"k": (b + 0.5) / bins, "pred_deg": float(cat(pred).median()),
                     "left_deg": float(cat(left).median()), "pred_A": float(cat(pred_a).pow(2).mean().sqrt()),
                     "left_A": float(cat(left_a).pow(2).mean().sqrt())})
    return rows


@torch.no_grad()
def sample_centroids_forced(model, task, clusters, solver) -> dict:
    """Summary metrics of the task's sampler with the centroids reset to the true path after every step
    (``on_step``); orientations come from the sampler alone."""

    def force(batch, s, k_next):
        batch = task.align(batch)  # the packing the model was trained towards (packing_targets), else the labelled
        on_path = task.path.sample(task._transform(batch), batch.c0, batch.R0, batch.c1, task.targets(batch), k_next)
        return torch.cat([on_path.s_k[..., :3], s[..., 3:]], -1)

    rows = []
    for i in range(0, len(clusters), 8):
        items = clusters[i:i + 8]
        batch = make_batch(items, with_packings=task.packing_targets)
        pos = task.sample(model, batch, solver, on_step=force).positions.double().numpy()
        rows += [evaluate_cluster(pos[b, :, :it.num_atoms], it.final, it.species, it.copy_perms())
                 for b, it in enumerate(items)]
    return summarize(rows)


def plot(out: str, files: list[str]) -> None:
    """Median angle of the endpoint prediction (solid) and of 'no further turn' (dashed) against k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for f in files:
        with open(f) as fh:
            r = json.load(fh)
        k = [x["k"] for x in r["by_k"]]
        name = r.get("label") or f
        ln, = ax.plot(k, [x["pred_deg"] for x in r["by_k"]], marker="o", label=f"{name}: prediction")
        ax.plot(k, [x["left_deg"] for x in r["by_k"]], ls="--", color=ln.get_color(), label=f"{name}: no turn")
        ax2.plot(k, [x["pred_deg"] / max(x["left_deg"], 1e-9) for x in r["by_k"]], marker="o",
                 color=ln.get_color(), label=name)
    ax.set(xlabel="k", ylabel="median angle to target (°)")
    ax2.axhline(1.0, color="grey", lw=1, ls=":")
    ax2.set(xlabel="k", ylabel="prediction / no turn (1 = nothing learned)")
    ax.legend(fontsize=6)
    ax2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plot", nargs="+", metavar=("OUT.png", "RESULT.json"),
                    help="only plot: OUT.png then the --json files of earlier runs")
    ap.add_argument("--label", default=None, help="name of this run in plots")
    ap.add_argument("--ckpt", help="model.pt or run directory")
    ap.add_argument("--data", help="dataset name or folder (as for kflow-mol train)")
    ap.add_argument("--split", default="val", choices=["train", "val", "test", "all"])
    ap.add_argument("--limit", type=int, default=16, help="at most this many clusters (0 = all)")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps")
    ap.add_argument("--bins", type=int, default=10, help="k-bins")
    ap.add_argument("--rot-source", choices=["fixed", "estimate"], default=None,
                    help="override the sampler's rotation source (default: the model's config)")
    ap.add_argument("--force-centroids", action="store_true",
                    help="also sample with the centroids reset to the true path after every step (diagnosis)")
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args()
    if args.plot:
        return plot(args.plot[0], args.plot[1:])
    if not args.ckpt or not args.data:
        ap.error("--ckpt and --data are needed (or --plot)")
    torch.manual_seed(0)
    model, task, noise, cfg, info, _ = load_model(args.ckpt)
    if args.rot_source:
        task.path.rot_source = args.rot_source
    seed = int(cfg.data.split_seed)
    clusters = load_data(args.data, None, noise, seed).select(args.split, seed, args.limit)
    rows = by_k(model, task, clusters, args.bins)
    print(f"{len(clusters)} {args.split} clusters; endpoint prediction on path samples (median angle to the "
          f"closest equivalent target; atom-level rotation RMSD):")
    print("   k   pred deg   left deg   pred Å   left Å")
    for r in rows:
        print(f"{r['k']:5.2f}  {r['pred_deg']:8.1f}  {r['left_deg']:9.1f}  {r['pred_A']:7.2f}  {r['left_A']:7.2f}")
    solver = solver_config(cfg, steps=args.steps)
    res = evaluate(model, task, clusters, solver, expansion_mean=float(noise.expansion_mean))
    m, co = res["model"], res["centroid_oracle"]
    print(f"sampled ({args.steps} steps): rotation median {m['rot_median_deg']:.1f} deg, within 10 deg "
          f"{m['rot_within_10deg']:.2f}; PM-atom {m['pm_atom']:.2f} (sym-aware {m['pm_atom_symmetry_aware']:.2f}), "
          f"PM-centre {m['pm_center']:.2f}; centroid oracle {co['pm_atom']:.2f} "
          f"(sym-aware {co['pm_atom_symmetry_aware']:.2f}); loose-state rotation median "
          f"{res['do_nothing']['rot_median_deg']:.1f} deg")
    out = {"label": args.label, "by_k": rows, "model": m, "floors": {k: res[k] for k in ("do_nothing", "centroid_oracle")},
           "clusters": len(clusters), "split": args.split, "ckpt": args.ckpt}
    if args.force_centroids:
        f = out["centroids_forced"] = sample_centroids_forced(model, task, clusters, solver)
        print(f"sampled with the centroids forced on the true path: rotation median {f['rot_median_deg']:.1f} deg, "
              f"within 10 deg {f['rot_within_10deg']:.2f}; PM-atom {f['pm_atom']:.2f} "
              f"(sym-aware {f['pm_atom_symmetry_aware']:.2f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=float)


if __name__ == "__main__":
    main()
