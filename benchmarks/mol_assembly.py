"""Molecular assembly benchmark: K-Flow vs the w = 1 baseline (and labelled targets) at equal budget.

Data: every CIF folder under ``$KFLOW_SHARED/data/crystals`` (or ``--shared``), cut into 17-molecule
clusters by our builder (rejections reported), loose states from our documented noise model, a seeded
80/10/10 split. Each variant is trained by the same ``kflow-mol train`` command users run (a subprocess,
so peak memory is measured per run) with the same network, steps and seed, then evaluated on the test
split with every metric beside the do-nothing, undo-expansion and oracle floors.

Writes ``benchmarks/results/mol_assembly.json`` and the section between the ``mol_assembly`` markers of
``BENCHMARKS.md``. Default budget: about 60 CPU-minutes on 2 cores; ``--steps``/``--variants`` for more.

    python benchmarks/mol_assembly.py --shared ../shared
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from mol_learning_curve import curve, plot as plot_curve  # noqa: E402  (the one checkpoint scorer)
VARIANTS = {
    "kflow": ["schedule=kflow"],
    "baseline_w1": ["schedule=flow"],
    "kflow_labelled_targets": ["schedule=kflow", "symmetric_targets=false"],
    # the first session's default: rotation vectors mixed by the graph, loose orientation kept as source
    "kflow_graph_rotations": ["schedule=kflow", "path.rotation=graph", "path.rot_source=fixed", "lattice_start=false",
                              "path.trans_window=[0,1]", "path.rot_window=[0,1]",
                              "path.kappa_scale=half", "rot_late_weight=false", "model.rot_output=rotvec"],
}
DEFAULT_VARIANTS = "kflow,baseline_w1"


def gather_cifs(shared: Path, out: Path) -> int:
    """Symlink every CIF of every crystal folder into one folder (prefixed by its folder: names are unique)."""
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for folder in sorted((shared / "data" / "crystals").iterdir()):
        if not folder.is_dir():
            continue
        for f in sorted(folder.glob("*.cif")):
            link = out / f"{folder.name}__{f.name}"
            if not link.exists():
                link.symlink_to(f.resolve())
            n += 1
    return n


def start_variant(name: str, overrides: list[str], data: Path, run_dir: Path, steps: int, eval_steps: int,
                  extra: list[str], threads: int) -> tuple[subprocess.Popen, list[str], float]:
    cmd = [sys.executable, "-m", "kflow_mol.cli", "train", "--data", str(data), "--run-dir", str(run_dir),
           "--steps", str(steps), f"solver.steps={eval_steps}", "trainer.progress=false", *overrides, *extra]
    print("$", " ".join(cmd), flush=True)
    # /usr/bin/time -v gives the child's peak RSS; fall back to wall-clock only if it is missing
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen(timer + cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    return proc, cmd, time.time()


def finish_variant(name: str, overrides: list[str], run_dir: Path, started) -> dict:
    proc, cmd, t0 = started
    if proc is None:  # --reuse: the run finished earlier; its peak RSS and wall time were saved then
        saved = json.loads((run_dir / "bench_process.json").read_text()) if (run_dir / "bench_process.json").exists() else {}
        err, wall = saved.get("stderr_tail", ""), saved.get("wall_s")
    else:
        _, err = proc.communicate()
        wall = time.time() - t0
        sys.stderr.write(err[-3000:])
        if proc.returncode != 0:
            raise SystemExit(f"variant {name} failed (exit {proc.returncode})")
        (run_dir / "bench_process.json").write_text(json.dumps({"stderr_tail": err[-3000:], "wall_s": wall}))
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    res = json.loads((run_dir / "test_metrics.json").read_text())
    log = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in log if r.get("kind") == "train"]
    sps = [r["samples_per_s"] for r in train if "samples_per_s" in r]
    res.update(steps_trained=train[-1]["step"] if train else None)
    res.update(variant=name, overrides=overrides, wall_s=wall, peak_rss_gb=int(m.group(1)) / 1e6 if m else None,
               train_clusters_per_s=sum(sps) / len(sps) if sps else None, final_loss=train[-1]["loss"] if train else None,
               command=" ".join(cmd) or res.get("command"))
    res.update(batch1_seconds_per_cluster=batch1_timing(run_dir / "model.pt", run_dir))
    res.pop("per_cluster", None)
    return res


def batch1_timing(model_pt: Path, run_dir: Path, n: int = 3, steps: int = 50) -> float:
    """Seconds per cluster at batch 1 (50 steps), median over ``n`` test clusters, in this process."""
    import torch

    from kflow.solver import SolverConfig
    from kflow_mol.pipeline import load_data, load_model
    from kflow_mol.task import make_batch

    cfg = json.loads((run_dir / "config.json").read_text())["run"]
    model, task, noise, *_ = load_model(model_pt)
    seed = int(cfg["data"]["split_seed"])
    test = load_data(cfg["data"]["name"], cfg["data"].get("root"), noise, seed, log=lambda _: None).select("test", seed, n)
    times = []
    with torch.no_grad():
        for c in test:
            t0 = time.perf_counter()
            task.sample(model, make_batch([c]), SolverConfig(steps=steps))
            times.append(time.perf_counter() - t0)
    return float(sorted(times)[len(times) // 2])


def fmt(x, nd=2):
    return "–" if x is None or x != x else f"{x:.{nd}f}"


def table(results: list[dict]) -> str:
    base = results[0]
    rows = ["| | PM-atom ↓ | PM-atom sym-aware ↓ | PM-centre ↓ | rot. median ° ↓ | within 10° ↑ | valid | "
            "collision inter | cluster RMSD | train clusters/s | s/cluster batch 8 | s/cluster batch 1 | peak RAM GB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("do_nothing", "undo_mean_expansion", "per_molecule_bayes", "centroid_oracle", "orientation_oracle",
                 "symmetry_blind_oracle"):
        m = base.get(name, {})
        rows.append(f"| floor: {name.replace('_', ' ')} | {fmt(m.get('pm_atom'))} | {fmt(m.get('pm_atom_symmetry_aware'))} | "
                    f"{fmt(m.get('pm_center'))} | {fmt(m.get('rot_median_deg'), 1)} | {fmt(m.get('rot_within_10deg'))} | "
                    f"{fmt(m.get('pm_atom_valid_ratio'))} | {fmt(m.get('collision_inter'), 3)} | "
                    f"{fmt(m.get('cluster_rmsd'))} | | | | |")
    for r in results:
        m = r["model"]
        rows.append(f"| **{r['variant']}** | {fmt(m.get('pm_atom'))} | {fmt(m.get('pm_atom_symmetry_aware'))} | "
                    f"{fmt(m.get('pm_center'))} | {fmt(m.get('rot_median_deg'), 1)} | {fmt(m.get('rot_within_10deg'))} | "
                    f"{fmt(m.get('pm_atom_valid_ratio'))} | {fmt(m.get('collision_inter'), 3)} | "
                    f"{fmt(m.get('cluster_rmsd'))} | {fmt(r.get('train_clusters_per_s'), 1)} | "
                    f"{fmt(r.get('seconds_per_cluster'), 3)} | {fmt(r.get('batch1_seconds_per_cluster'), 3)} | "
                    f"{fmt(r.get('peak_rss_gb'), 2)} |")
    return "\n".join(rows)


def update_markdown(section: str, key: str = "mol_assembly") -> None:
    md = ROOT / "BENCHMARKS.md"
    text = md.read_text() if md.exists() else "# Benchmarks\n\nMeasured figures; every table names its command and machine.\n"
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{section}\n{end}"
    text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S) if start in text \
        else text.rstrip() + "\n\n" + block + "\n"
    md.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.environ.get("KFLOW_SHARED", str(ROOT.parent / "shared")))
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_mol"))
    ap.add_argument("--steps", type=int, default=1500, help="training steps per variant")
    ap.add_argument("--eval-steps", type=int, default=50, help="sampling steps at evaluation")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {list(VARIANTS)}")
    ap.add_argument("--time-limit", type=float, default=0, help="per-variant training time limit (s); 0 = none")
    ap.add_argument("--parallel", type=int, default=1,
                    help="variants trained at once (each gets cores / parallel threads); 1 = one after another")
    ap.add_argument("--reuse", action="store_true",
                    help="do not retrain variants whose run folder already holds test_metrics.json")
    ap.add_argument("--curve-every", type=int, default=175,
                    help="keep a checkpoint every N steps and score each on the test split for the learning curve "
                         "(benchmarks/mol_learning_curve.py); 0 = no curve")
    ap.add_argument("--tag", default="", help="suffix of the result file and the BENCHMARKS.md section key")
    ap.add_argument("overrides", nargs="*", help="extra hydra overrides for every variant (e.g. model=mol_tiny)")
    args = ap.parse_args()
    shared = Path(args.shared)
    if not (shared / "data" / "crystals").is_dir():
        print(f"shared data not found at {shared}: pass --shared or set KFLOW_SHARED; nothing to do")
        return
    work = Path(args.work)
    data = work / "cifs"
    n = gather_cifs(shared, data)
    print(f"{n} CIFs gathered in {data}", flush=True)
    extra = list(args.overrides) + ([f"trainer.time_limit_s={args.time_limit}"] if args.time_limit else [])
    if args.curve_every:
        extra += ["trainer.keep_step_ckpts=true", f"trainer.ckpt_every={args.curve_every}"]
    names = args.variants.split(",")
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    threads = max(1, (os.cpu_count() or 2) // max(args.parallel, 1))
    results = []
    for i in range(0, len(names), max(args.parallel, 1)):
        group = names[i:i + max(args.parallel, 1)]
        started = {v: (None, [], 0.0) if args.reuse and (work / v / "test_metrics.json").exists() else
                   start_variant(v, VARIANTS[v], data, work / v, args.steps, args.eval_steps, extra, threads)
                   for v in group}
        results += [finish_variant(v, VARIANTS[v], work / v, started[v]) for v in group]
    cpu = platform.processor() or platform.machine()
    out = {"machine": f"{platform.node()} {cpu}, {os.cpu_count()} cores, torch {__import__('torch').__version__}",
           "cifs": n, "steps": args.steps, "eval_steps": args.eval_steps, "results": results,
           "date": time.strftime("%Y-%m-%d %H:%M")}
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    curve_png = ROOT / "benchmarks" / "results" / f"mol_assembly{tag}_curve.png"
    if args.curve_every:  # the same scoring as the table, on every kept checkpoint
        out["curve"] = [row for v in names for row in curve(work / v, str(data), "test", steps=args.eval_steps)]
        plot_curve(str(curve_png), out["curve"])
    (ROOT / "benchmarks" / "results" / f"mol_assembly{tag}.json").write_text(json.dumps(out, indent=1, default=float))
    r0 = results[0]
    orders = r0.get("symmetry_orders", {})
    section = (f"## Molecular assembly (COD-Cluster17-style clusters cut from `shared/data/crystals`)\n\n"
               f"Command: `python benchmarks/mol_assembly.py --steps {args.steps} --eval-steps {args.eval_steps}"
               f"{f' --time-limit {args.time_limit:g}' if args.time_limit else ''}"
               f"{f' --parallel {args.parallel}' if args.parallel > 1 else ''} --variants {args.variants}"
               f"{f' --tag {args.tag}' if args.tag else ''}"
               f"{' ' + ' '.join(args.overrides) if args.overrides else ''}` — {out['date']}, {out['machine']}; "
               f"{threads} torch thread(s) per variant, {args.parallel} variant(s) at a time.\n\n"
               f"{n} CIFs → {r0['num_clusters']} test clusters (seeded 80/10/10 split, seed 0); molecules per symmetry "
               f"order in the test split: {orders}. Loose states: our noise model (per-molecule random rotation, "
               f"centroids pushed out by U[1.5, 3.0] each (mean 2.25) + 3 Å jitter). Same network, steps and seed for every "
               f"variant; {args.eval_steps} exact-increment steps at test time. PM in Å; `sym-aware` = minimum over "
               f"molecular automorphisms and molecule matching (ours); floors use the known target (diagnosis only).\n\n"
               + table(results) + "\n\n"
               f"Rotation error: per molecule, the angle to the closest symmetry-equivalent of its true orientation "
               f"(labels kept); per cluster the median, then the mean over clusters. "
               + (f"Learning curve (every kept checkpoint's EMA weights scored on the same test clusters, "
                  f"{args.eval_steps} steps): `{curve_png.relative_to(ROOT)}`. " if args.curve_every else "")
               + "Training stopped by "
               + ", ".join(f"{r['variant']}: {r.get('steps_trained', '?')} steps" for r in results) + ".\n")
    update_markdown(section, f"mol_assembly{tag}")
    print(section)


if __name__ == "__main__":
    main()
