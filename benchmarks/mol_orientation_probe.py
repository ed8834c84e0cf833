"""Can the network learn where a packed molecule points, when the current orientations are noise?

A training probe on the first ``--clusters`` training clusters of a dataset, the loose states redrawn every
batch. Every sample is drawn at ``k`` in ``--k`` (default 0.5-0.6) of the centroids-first path
(``path.trans_window=[0,0.5] path.rot_window=[0.5,1]``): the centroids are packed and the orientations are
still the random loose ones, so the target orientations are a fixed function of the lattice. It logs, every
10 steps, the median angle between the predicted and the target orientation of the training batch beside the
angle of "no turn", the atom-level rotational RMSD (Å) and the gradient norm, as JSON lines.

``--lattice-weight W`` adds the task's direct loss on the lattice stream's targets.
``--identity`` feeds every molecule at the identity orientation instead of its current one (the output
is then the absolute orientation): the same learning problem without the noise of random orientations.

    python benchmarks/mol_orientation_probe.py --data DIR --clusters 1 --out probe.jsonl [--identity] \\
        [hydra overrides, e.g. model.lattice_layers=2]
    python benchmarks/mol_orientation_probe.py --plot probe.png LOG.jsonl [LOG.jsonl ...]
"""
from __future__ import annotations

import argparse
import json
import time

import roma
import torch

from kflow.cli import compose
from kflow_mol.batch import RigidState
from kflow_mol.pipeline import build_components, load_data
from kflow_mol.rigid import rotation_error
from kflow_mol.task import Collator


def plot(png: str, logs: list[str]) -> None:
    """Median angle of the prediction against the training step, one line per probe log (mean of a sliding
    window of 3 log points; the dotted grey line is "no turn", averaged over all logs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    no_turn = []
    for f in logs:
        with open(f) as fh:
            rows = [json.loads(line) for line in fh]
        step = np.array([r["step"] for r in rows])
        pred = np.convolve([r["pred_deg"] for r in rows], np.ones(3) / 3, mode="same")
        ax.plot(step[1:-1], pred[1:-1], label=f.rsplit("/", 1)[-1].removeprefix("probe_").removesuffix(".jsonl"))
        if "identity" not in f:
            no_turn += [r["no_turn_deg"] for r in rows]
    ax.axhline(float(np.mean(no_turn)), color="grey", ls=":", label="no turn (mean)")
    ax.set_xlabel("training step (batch 8, k in [0.5, 0.6])")
    ax.set_ylabel("median angle to target (deg)")
    ax.set_ylim(0, 140)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="dataset name or CIF folder")
    p.add_argument("--clusters", type=int, default=1, help="first N training clusters")
    p.add_argument("--k", type=float, nargs=2, default=[0.5, 0.6], help="k range of the samples")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--identity", action="store_true", help="feed identity orientations (no noise)")
    p.add_argument("--lattice-weight", type=float, default=0.0,
                   help="add the direct loss on the lattice stream's targets (needs model.lattice_layers > 0)")
    p.add_argument("--out", help="JSON lines written here")
    p.add_argument("--plot", metavar="PNG", help="instead of training: plot the probe logs given as arguments")
    p.add_argument("overrides", nargs="*", help="hydra overrides of configs/mol.yaml (with --plot: the logs)")
    a = p.parse_args()
    if a.plot:
        return plot(a.plot, a.overrides)
    if not (a.data and a.out):
        p.error("--data and --out are required to train a probe")
    torch.manual_seed(a.seed)
    cfg = compose("mol", ["path.trans_window=[0,0.5]", "path.rot_window=[0.5,1]", "model.rot_output=anchor",
                          *a.overrides])
    model, task, noise = build_components(cfg)
    train = load_data(a.data, None, noise, 0).split(0)["train"][: a.clusters]
    collate = Collator(True, noise)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    t0 = time.time()
    with open(a.out, "w") as log:
        for step in range(1, a.steps + 1):
            batch = collate([train[i % len(train)] for i in range(a.batch)])
            R1 = task.targets(batch)
            k = a.k[0] + (a.k[1] - a.k[0]) * torch.rand(a.batch)
            tr = task._transform(batch)
            ps = task.path.sample(tr, batch.c0, batch.R0, batch.c1, R1, k)
            if a.identity:  # the molecules shown unturned: the output turn is the absolute orientation
                c_k, R_k = task.path.rigid(ps.s_k, batch.R0)
                feats = task.path.node_features(tr, k).to(ps.s_k.dtype)
                res = model(RigidState(c_k, torch.eye(3).expand_as(R_k)), k, batch=batch.clusters,
                            node_features=feats)
                R1_hat, s1 = roma.rotvec_to_rotmat(res[..., 3:]), torch.cat([c_k + res[..., :3], res[..., 3:]], -1)
            else:
                s1 = task.predict(model, tr, ps.s_k, k, batch)
                R1_hat = task.path.rigid(s1, batch.R0)[1]
            dc, rot = task.atom_error(s1, batch.c1, R1_hat, R1, batch.gyration)
            loss = (dc + rot).mean()
            if a.lattice_weight:  # the task's direct loss on the lattice stream (AssemblyTask.lattice_weight)
                loss = loss + a.lattice_weight * task.lattice_error(model, tr, ps.s_k, k, batch, R1).mean()
            opt.zero_grad()
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.trainer.grad_clip))
            opt.step()
            if step % 10 == 0 or step == 1:
                with torch.no_grad():
                    pred = rotation_error(R1_hat, R1, batch.symmetries, batch.sym_mask).median().item()
                    left = rotation_error(ps.R_k, R1, batch.symmetries, batch.sym_mask).median().item()
                rec = {"step": step, "loss": loss.item(), "rot_rmsd": rot.mean().sqrt().item(), "pred_deg": pred,
                       "no_turn_deg": left, "grad_norm": float(gn), "seconds": time.time() - t0}
                print(json.dumps(rec), file=log, flush=True)
                print(f"step {step}: pred {pred:.1f} deg, no turn {left:.1f} deg, rot RMSD {rec['rot_rmsd']:.2f} A",
                      flush=True)


if __name__ == "__main__":
    main()
