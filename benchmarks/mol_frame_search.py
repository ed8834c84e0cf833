"""Sample from each of the four proper sign variants of the lattice-start frame and select one per cluster.

``lattice_start`` puts every molecule on the principal-axes frame of the loose centroids. Real clusters are
nearly centrosymmetric, so the frame's axis signs are set by the noise (``mol_frame_stability.py``): the start
is one of four frames ``F diag(s)``, ``s`` in {(1,1,1), (-1,-1,1), (-1,1,-1), (1,-1,-1)}. This samples a
trained model from all four and reports, beside each variant alone, three per-cluster selections:

* ``oracle``: the variant with the lowest symmetry-aware PM-atom (uses the target: a ceiling, not a method);
* ``energy``: the lowest UFF 12-6 intermolecular pair energy (``kflow_mol.refine.pair_energy``; no target);
* ``clashes``: the fewest intermolecular clashes (no target).

    python benchmarks/mol_frame_search.py --ckpt runs/B9/model.pt --data runs/bench_mol/cifs --split val \\
        --limit 16 --json benchmarks/results/orientation/frame_search_B9_val.json
"""
from __future__ import annotations

import argparse
import copy
import json
from dataclasses import replace

import numpy as np
import torch
from mol_frame_stability import SIGNS  # the four proper sign patterns (this folder is on sys.path)

from kflow_mol.evaluate import evaluate, predict_clusters
from kflow_mol.metrics import evaluate_cluster, intermolecular_clashes, summarize
from kflow_mol.pipeline import load_data, load_model, solver_config
from kflow_mol.refine import pair_energy, uff_vdw

KEYS = ("pm_atom", "pm_atom_symmetry_aware", "pm_center", "rot_median_deg", "rot_within_10deg")


def with_signs(task, signs):
    """A copy of a ``lattice_start`` task whose start frame is ``F diag(signs)``, ``signs (3,)`` (a proper
    rotation of it)."""
    if not task.lattice_start:
        raise SystemExit("the model was not trained with lattice_start=true: there is no frame to flip")
    flipped, base = copy.copy(task), task.source

    def source(batch):
        b = base(batch)
        return replace(b, R0=(b.R0 * signs.to(b.R0)).contiguous())  # scales the frame's columns (axes)

    flipped.source = source
    return flipped


def energy(pred: np.ndarray, species: np.ndarray, cutoff: float = 8.0) -> float:
    x, d = (torch.from_numpy(a) for a in uff_vdw(np.asarray(species)))
    return float(pair_energy(torch.from_numpy(np.asarray(pred, dtype=np.float64)), x, d, cutoff))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="model.pt (or its run folder) trained with lattice_start=true")
    ap.add_argument("--data", required=True, help="dataset name or folder (as for kflow-mol train)")
    ap.add_argument("--split", default="val", choices=["train", "val", "test", "all"])
    ap.add_argument("--limit", type=int, default=16, help="the first N clusters of the split (0 = all)")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    loaded = load_model(args.ckpt)
    seed = int(loaded.cfg.data.split_seed)
    clusters = load_data(args.data, None, loaded.noise, seed).select(args.split, seed, args.limit)
    solver = solver_config(loaded.cfg, steps=args.steps)
    scores = []  # [variant][cluster] -> metrics with energy
    names = [tuple(int(x) for x in s) for s in SIGNS]
    for s, name in zip(SIGNS, names):
        torch.manual_seed(0)
        preds, _ = predict_clusters(loaded.model, with_signs(loaded.task, s), clusters, solver)
        rows = []
        for p, c in zip(preds, clusters):
            r = evaluate_cluster(p, c.final, c.species, c.copy_perms())
            r.update(energy=energy(p, c.species), clashes=intermolecular_clashes(p, c.species)["clashes"])
            rows.append(r)
        scores.append(rows)
        print(f"signs {name}: " + "  ".join(f"{k} {summarize(rows)[k]:.3f}" for k in KEYS), flush=True)
    out = {"ckpt": str(args.ckpt), "data": args.data, "split": args.split, "clusters": len(clusters),
           "steps": args.steps, "variants": {str(n): {k: float(summarize(r)[k]) for k in KEYS}
                                             for n, r in zip(names, scores)}}
    pick = {"oracle": lambda rs: min(range(4), key=lambda v: rs[v]["pm_atom_symmetry_aware"]),
            "energy": lambda rs: min(range(4), key=lambda v: rs[v]["energy"]),
            "clashes": lambda rs: min(range(4), key=lambda v: (rs[v]["clashes"], rs[v]["energy"]))}
    for name, rule in pick.items():
        chosen = [rule([scores[v][i] for v in range(4)]) for i in range(len(clusters))]
        rows = [scores[v][i] for i, v in enumerate(chosen)]
        out[f"select_{name}"] = {**{k: float(summarize(rows)[k]) for k in KEYS},
                                 "chosen": [names[v] for v in chosen]}
        print(f"select by {name}: " + "  ".join(f"{k} {out[f'select_{name}'][k]:.3f}" for k in KEYS), flush=True)
    floor = evaluate(None, None, clusters, expansion_mean=float(loaded.noise.expansion_mean))["centroid_oracle"]
    out["centroid_oracle"] = {k: float(floor[k]) for k in KEYS}
    print("centroid oracle: " + "  ".join(f"{k} {out['centroid_oracle'][k]:.3f}" for k in KEYS))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
