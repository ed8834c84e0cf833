"""Learning curve of assembly runs: sampled PM-atom and rotation error against the training budget.

Every ``step_XXXXXXX.pt`` a run kept (``trainer.keep_step_ckpts=true``) is scored, with its EMA weights, on a
split of the run's data by the same ``kflow_mol.evaluate.evaluate`` the CLI uses (50 steps by default), then
the run's final ``model.pt``. Writes JSON rows and a two-panel PNG (PM-atom published and symmetry-aware with
the centroid oracle; the median rotation error).

    python benchmarks/mol_learning_curve.py --runs runs/bench_mol/kflow runs/bench_mol/baseline_w1 \\
        --data runs/bench_mol/cifs --json curve.json --png curve.png
    python benchmarks/mol_learning_curve.py --plot curve.png curve.json   # only redraw
"""
from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path

import torch

from kflow.train import load_model_weights
from kflow_mol.evaluate import evaluate
from kflow_mol.pipeline import load_data, load_model, solver_config

KEYS = ("pm_atom", "pm_atom_symmetry_aware", "pm_center", "rot_median_deg", "rot_within_10deg")


def run_steps(run: Path) -> list[tuple[int, Path | None]]:
    """``(step, checkpoint)`` of a run in step order; the final model is ``(steps, None)``."""
    found = sorted((int(m.group(1)), p) for p in run.glob("step_*.pt") if (m := re.fullmatch(r"step_(\d+)\.pt", p.name)))
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]).get("step") if (run / "metrics.jsonl").exists() else None
    steps = [s for s, _ in found]
    out: list[tuple[int, Path | None]] = list(found)
    if final is None or final not in steps:
        out.append((final or (steps[-1] + 1 if steps else 0), None))
    return out


@torch.no_grad()
def curve(run: Path, data: str, split: str = "test", limit: int = 0, steps: int = 50) -> list[dict]:
    """Scores of every kept checkpoint of ``run`` (and its final model) on ``split`` of ``data``."""
    loaded = load_model(run)
    seed = int(loaded.cfg.data.split_seed)
    clusters = load_data(data, None, loaded.noise, seed).select(split, seed, limit)
    batch_size = int(loaded.cfg.trainer.batch_size)  # the sampler's batch too (inference is per cluster)
    model = loaded.model.eval()
    final = copy.deepcopy(model.state_dict())  # model.pt's weights, for the last row
    solver = solver_config(loaded.cfg, steps=steps)
    rows = []
    for step, ckpt in run_steps(run):
        if ckpt is None:
            model.load_state_dict(final)
        else:
            load_model_weights(model, ckpt)
        torch.manual_seed(0)
        res = evaluate(model, loaded.task, clusters, solver,
                       batch_size=batch_size, expansion_mean=float(loaded.noise.expansion_mean), progress=False)
        row = {"run": run.name, "step": step, "clusters_seen": step * batch_size,
               **{k: float(res["model"][k]) for k in KEYS},
               "centroid_oracle": {k: float(res["centroid_oracle"][k]) for k in ("pm_atom", "pm_atom_symmetry_aware")}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def plot(png: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in dict.fromkeys(r["run"] for r in rows):
        rr = sorted((r for r in rows if r["run"] == name), key=lambda r: r["step"])
        x = [r["step"] for r in rr]
        ln, = ax.plot(x, [r["pm_atom"] for r in rr], marker="o", label=f"{name}: PM-atom")
        ax.plot(x, [r["pm_atom_symmetry_aware"] for r in rr], marker="s", ls="--", color=ln.get_color(),
                label=f"{name}: symmetry-aware")
        ax2.plot(x, [r["rot_median_deg"] for r in rr], marker="o", color=ln.get_color(), label=f"{name}: median")
    oracle = rows[0]["centroid_oracle"]
    ax.axhline(oracle["pm_atom"], color="grey", ls=":", label="centroid oracle")
    ax.axhline(oracle["pm_atom_symmetry_aware"], color="grey", ls="-.", label="centroid oracle, sym-aware")
    ax.set(xlabel="training step (batch 8)", ylabel="PM-atom (Å)")
    ax2.set(xlabel="training step (batch 8)", ylabel="median rotation error (°)")
    ax.legend(fontsize=6)
    ax2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=[], help="run directories (each with model.pt and step_*.pt)")
    ap.add_argument("--data", help="dataset name or folder the runs were trained on")
    ap.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    ap.add_argument("--limit", type=int, default=0, help="at most this many clusters (0 = the whole split)")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--png", help="draw the curve here")
    ap.add_argument("--plot", nargs=2, metavar=("OUT.png", "ROWS.json"), help="only redraw from earlier rows")
    args = ap.parse_args()
    if args.plot:
        return plot(args.plot[0], json.loads(Path(args.plot[1]).read_text())["rows"])
    if not args.runs or not args.data:
        ap.error("--runs and --data are needed (or --plot)")
    rows = [r for run in args.runs for r in curve(Path(run), args.data, args.split, args.limit, args.steps)]
    if args.json:
        Path(args.json).write_text(json.dumps({"split": args.split, "data": args.data, "rows": rows}, indent=1))
    if args.png:
        plot(args.png, rows)


if __name__ == "__main__":
    main()
