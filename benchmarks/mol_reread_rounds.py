"""After the flow, let the network re-read its neighbours: rounds of "predict the endpoint at a late k, keep the
centroids, take the predicted orientations".

The leave-one-out probe (``mol_loo_probe.py``) shows that a network with ``model.neighbour_turns`` reads a
molecule's orientation from neighbours at their true poses. In sampling nothing is at its true pose; these rounds
ask whether the network's own assembled cluster is close enough for re-reading to pull the orientations towards
a consistent packing. Round 0 is the plain sampler; scores use this session's metrics (matched rotation too)::

    python benchmarks/mol_reread_rounds.py --ckpt runs/s10/B9TN --data runs/bench_mol/cifs --split val \\
        --k 0.95 --rounds 0 1 2 4 8
"""
from __future__ import annotations

import argparse
import json

import torch

from kflow_mol import so3
from kflow_mol.metrics import evaluate_cluster, summarize
from kflow_mol.pipeline import load_data, load_model
from kflow_mol.task import make_batch

KEYS = ("pm_atom", "pm_atom_symmetry_aware", "pm_center", "rot_median_deg", "rot_median_deg_symmetry_aware",
        "rot_within_10deg_symmetry_aware")


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True, help="model.pt or run directory")
    ap.add_argument("--data", required=True, help="dataset name or CIF folder")
    ap.add_argument("--split", default="val", choices=["train", "val", "test", "all"])
    ap.add_argument("--limit", type=int, default=16, help="first N clusters of the split (0 = all)")
    ap.add_argument("--k", type=float, default=0.95, help="the k the network is asked at in every round")
    ap.add_argument("--rounds", type=int, nargs="+", default=[0, 1, 2, 4, 8], help="round counts to score")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps of the flow")
    ap.add_argument("--json", default=None, help="write the summaries here")
    a = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model(a.ckpt)
    model, task = loaded.model, loaded.task
    clusters = load_data(a.data, None, loaded.noise, 0, log=lambda _: None).select(a.split, 0, a.limit)
    rows: dict[int, list] = {r: [] for r in a.rounds}
    for i in range(0, len(clusters), 8):
        items = clusters[i:i + 8]
        batch = make_batch(items)
        res = task.sample(model, batch, steps=a.steps)
        src = task.source(batch)  # the rotational source the state is measured from
        transform = task._transform(src)
        s = torch.cat([res.c, so3.log(res.R @ src.R0.transpose(-1, -2))], -1)
        k = torch.full((len(items),), a.k, dtype=s.dtype)
        done = 0
        for r in sorted(a.rounds):
            for _ in range(r - done):
                s = torch.cat([s[..., :3], task.predict(model, transform, s, k, src)[..., 3:]], -1)
            done = r
            pos = src.clusters.positions_padded(*task.path.rigid(s, src.R0)).double().numpy()
            rows[r] += [evaluate_cluster(pos[b, :, :it.num_atoms], it.final, it.species, it.copy_perms())
                        for b, it in enumerate(items)]
    out = {}
    for r in sorted(a.rounds):
        m = summarize(rows[r])
        out[r] = {key: round(m[key], 3) for key in KEYS}
        print(f"rounds {r}: {json.dumps(out[r])}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"ckpt": a.ckpt, "split": a.split, "k": a.k, "clusters": len(clusters), "rounds": out}, f,
                      indent=1)


if __name__ == "__main__":
    main()
