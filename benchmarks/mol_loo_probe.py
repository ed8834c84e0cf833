"""Leave-one-out orientation probe: can the network read a molecule's orientation from its neighbours' atoms?

Every sample is a packed cluster at the true centroids with 16 molecules at their true orientations and one
(``j``, drawn per cluster) at its loose, random orientation; ``k ~ U[--k]`` (late in the rotation window, where
training sees nearly packed clusters). The network (the default config, trained from scratch here) is trained on
the training split with the loss on molecule ``j`` only (its atom-level rotational error). Every ``--eval-every``
steps it is scored on held-out clusters (the val split, molecules 1-4 of each in turn), beside two references:
"no turn" (the loose orientation) and "copy the nearest copy of the same shape" (its true orientation, up to the
shape's symmetry: the answer when translation-related neighbours are parallel, 74 % of molecules in these data).
It is the easiest orientation problem the task has (16 exact neighbours), so it says whether the encoder can learn
orientation from contacts across crystals at all::

    python benchmarks/mol_loo_probe.py --data runs/bench_mol/cifs --steps 1500 \\
        --out benchmarks/results/orientation/S9_loo_probe.jsonl [--j-start identity]
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from kflow.cli import compose
from kflow_mol import so3
from kflow_mol.pipeline import build_components, load_data
from kflow_mol.rigid import rotation_error
from kflow_mol.task import Collator


def with_start(batch, j: torch.Tensor, start: str):
    """``batch`` with molecule ``j[b]``'s loose orientation replaced: ``loose`` keeps it, ``identity`` puts it at
    the identity (the probe of session 5: no random current orientation in the input; not equivariant)."""
    if start == "loose":
        return batch
    R0 = batch.R0.clone()
    R0[torch.arange(len(j)), j] = torch.eye(3, dtype=R0.dtype)
    return replace(batch, R0=R0)


def loo_state(batch, R1: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """State ``(B, M, 6)``: true centroids; true orientations except molecule ``j[b]`` (its loose one)."""
    b = torch.arange(len(j))
    R = R1.clone()
    R[b, j] = batch.R0[b, j]
    return torch.cat([batch.c1, so3.log(R @ batch.R0.transpose(-1, -2))], -1)


def predict(model, task, batch, s, k) -> tuple[torch.Tensor, torch.Tensor]:
    """The endpoint state ``s1 (B, M, 6)`` and its orientations ``(B, M, 3, 3)``."""
    s1 = task.predict(model, task._transform(batch), s, k, batch)
    return s1, task.path.rigid(s1, batch.R0)[1]


def neighbour_copy(batch, R1: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Angle (degrees) from molecule ``j``'s true orientation to its nearest same-shape copy's, per cluster."""
    out = []
    for bi, jj in enumerate(j.tolist()):
        shape = batch.clusters.mol_shape[bi]
        d = (batch.c1[bi] - batch.c1[bi, jj]).norm(dim=-1)
        d[jj] = float("inf")
        d[shape != shape[jj]] = float("inf")
        nb = int(d.argmin())
        Rn = R1[bi, nb][None, None].expand(1, R1.shape[1], 3, 3).clone()
        err = rotation_error(Rn, R1[bi:bi + 1], batch.symmetries[bi:bi + 1], batch.sym_mask[bi:bi + 1])
        out.append(float(err[0, jj]))
    return torch.tensor(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset name or CIF folder")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--k", type=float, nargs=2, default=[0.85, 0.95], help="k range of the samples")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--j-start", choices=["loose", "identity"], default="loose",
                   help="the held-out molecule's input orientation: its loose one, or the identity")
    p.add_argument("--out", required=True, help="JSON lines written here")
    p.add_argument("overrides", nargs="*", help="hydra overrides of configs/mol.yaml")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    cfg = compose("mol", a.overrides)
    model, task, noise = build_components(cfg)
    data = load_data(a.data, None, noise, 0)
    train, val = data.select("train", 0), data.select("val", 0)
    collate = Collator(True, noise)
    fixed = Collator(False, noise)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    gen = torch.Generator().manual_seed(a.seed)
    t0 = time.time()

    def evaluate() -> dict:
        model.eval()
        pred, no_turn, copy = [], [], []
        with torch.no_grad():
            for i in range(0, len(val), a.batch):
                batch0 = fixed(val[i:i + a.batch])
                k = torch.full((len(batch0.c0),), sum(a.k) / 2, dtype=batch0.c0.dtype)
                for jj in range(1, 5):
                    j = torch.full((len(batch0.c0),), jj)
                    batch = with_start(batch0, j, a.j_start)
                    R1 = task.targets(batch)
                    _, R_hat = predict(model, task, batch, loo_state(batch, R1, j), k)
                    b = torch.arange(len(j))
                    pred += rotation_error(R_hat, R1, batch.symmetries, batch.sym_mask)[b, j].tolist()
                    no_turn += rotation_error(batch.R0, R1, batch.symmetries, batch.sym_mask)[b, j].tolist()
                    copy += neighbour_copy(batch, R1, j).tolist()
        model.train()
        med = lambda v: float(torch.tensor(v).median())
        return {"val_pred_deg": med(pred), "val_no_turn_deg": med(no_turn), "val_copy_neighbour_deg": med(copy),
                "val_pred_within_30deg": float((torch.tensor(pred) < 30).float().mean()),
                "val_copy_within_30deg": float((torch.tensor(copy) < 30).float().mean()), "val_cases": len(pred)}

    with open(a.out, "w") as log:
        for step in range(1, a.steps + 1):
            idx = torch.randint(0, len(train), (a.batch,), generator=gen).tolist()
            batch = collate([train[i] for i in idx])
            j = torch.randint(0, batch.c0.shape[1], (a.batch,), generator=gen)
            batch = with_start(batch, j, a.j_start)
            R1 = task.targets(batch)
            k = a.k[0] + (a.k[1] - a.k[0]) * torch.rand(a.batch, generator=gen, dtype=batch.c0.dtype)
            s1, R_hat = predict(model, task, batch, loo_state(batch, R1, j), k)
            _, rot = task.atom_error(s1, batch.c1, R_hat, R1, batch.gyration)
            b = torch.arange(a.batch)
            loss = rot[b, j].mean()
            opt.zero_grad()
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.trainer.grad_clip))
            opt.step()
            rec = None
            if step % 25 == 0:
                with torch.no_grad():
                    err = rotation_error(R_hat, R1, batch.symmetries, batch.sym_mask)[b, j]
                rec = {"step": step, "loss": loss.item(), "train_pred_deg": float(err.median()),
                       "grad_norm": float(gn), "seconds": time.time() - t0}
            if step % a.eval_every == 0 or step == a.steps:
                rec = {**(rec or {"step": step}), **evaluate()}
            if rec:
                print(json.dumps(rec), file=log, flush=True)
                print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)


if __name__ == "__main__":
    main()
