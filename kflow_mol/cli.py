"""``kflow-mol``: build data, train, evaluate and assemble molecular clusters with K-Flow.

Flags are documented in ``--help``; any ``key=value`` after the flags is a hydra override of
``configs/mol.yaml`` (e.g. ``schedule=flow`` for the baseline, ``trainer.steps=2000``, ``model=mol_tiny``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# nothing heavy at module level (numpy, torch, RDKit, ASE load inside the commands): `--help` and argument
# errors answer at once, and a missing file is reported before any of them loads
from kflow.cli import (InputError, check_device, check_targets, compose, configs_dir, instantiate, run_command,
                       to_container)

DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "default.pt"
MODEL_FORMAT = "kflow-mol-model-v1"

EPILOG = """examples:
  kflow-mol train --data cod17-mini                      # short default run on the shipped crystals
  kflow-mol train --data cod17-10k --data-root DATA      # official COD-Cluster17 10K raw files
  kflow-mol train --data cod17-mini schedule=flow        # the w=1 baseline (linear + geodesic path)
  kflow-mol evaluate --ckpt runs/mol/model.pt --data cod17-mini --split test --json
  kflow-mol assemble crystal.cif --out out/              # cut, loosen, assemble, score, render
  kflow-mol assemble --smiles 'c1ccc2cc3ccccc3cc2c1' --out out/
  kflow-mol build-dataset --cif-dir CIFS --out DATA
  kflow-mol inspect crystal.cif
"""


# --------------------------------------------------------------------------- config and model
def _overrides(args, extra: list[str]) -> list[str]:
    bad = [e for e in extra if "=" not in e]
    if bad:
        raise InputError(f"unrecognised arguments {bad}; hydra overrides look like key=value "
                         f"(see `kflow-mol {args.cmd} --help`)")
    ov = []
    data = getattr(args, "data", None)
    if data:
        ov.append(f"data={data}" if (configs_dir() / "data" / f"{data}.yaml").exists() else f"data.name={data}")
    if getattr(args, "data_root", None):
        ov.append(f"data.root={args.data_root}")
    if getattr(args, "run_dir", None):
        ov.append(f"trainer.run_dir={args.run_dir}")
    if getattr(args, "steps", None) and args.cmd == "train":
        ov.append(f"trainer.steps={args.steps}")
    if getattr(args, "device", None):
        ov.append(f"trainer.device={args.device}")
    if getattr(args, "baseline", False):
        ov.append("schedule=flow")
    return ov + extra


def build_components(cfg) -> tuple:
    """Model, task and noise config from a composed config."""
    from .rigid import NUM_NODE_FEATURES
    from .task import AssemblyTask

    model = instantiate(cfg.model, node_feature_dim=NUM_NODE_FEATURES)
    schedule = instantiate(cfg.schedule)
    path = instantiate(cfg.path)(schedule=schedule)
    task = AssemblyTask(path, symmetric_targets=cfg.symmetric_targets, rot_weight=cfg.rot_weight,
                        rot_late_weight=bool(cfg.get("rot_late_weight", False)))
    return model, task, instantiate(cfg.noise)


def export_model(path: Path, model, cfg: dict, info: dict) -> Path:
    """A self-describing inference file: config (JSON) + weights, loadable with ``weights_only=True``."""
    from kflow.utils import atomic_save

    return atomic_save({"format": MODEL_FORMAT, "config": json.dumps(cfg), "info": json.dumps(info),
                        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)


def load_model(ckpt: str | Path | None, device="cpu"):
    """Load ``model.pt`` (or a run directory holding one); ``None`` = the shipped default model."""
    from hydra.errors import InstantiationException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from kflow.utils import load_checkpoint

    p = Path(ckpt) if ckpt else DEFAULT_MODEL
    if p.is_dir():
        p = p / "model.pt"
    if not p.exists():
        hint = ("the shipped default model is missing from this install; train one with "
                "`kflow-mol train --data cod17-mini`" if ckpt is None else "pass a run's model.pt")
        raise InputError(f"checkpoint {p} not found: {hint}")
    blob = load_checkpoint(p)
    if blob.get("format") != MODEL_FORMAT:
        raise InputError(f"{p} is not a kflow-mol model file (expected model.pt written by `kflow-mol train`)")
    try:
        stored, info = json.loads(blob["config"]), json.loads(blob.get("info") or "{}")
        if not isinstance(stored, dict) or not isinstance(info, dict):
            raise TypeError("config and info must be JSON objects")
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{p}: damaged model file: unreadable config ({type(err).__name__}: {err})") from None
    check_targets(stored, str(p))  # model files are shared: build only this package's own classes
    cfg = OmegaConf.create(stored)
    try:
        model, task, noise = build_components(cfg)
    except (InstantiationException, OmegaConfBaseException, KeyError, TypeError, ValueError) as err:
        raise InputError(f"{p}: its config does not describe a model this version can build "
                         f"({type(err).__name__}: {err})") from None
    try:
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise InputError(f"{p}: damaged model file: the weights do not match the model its config describes "
                         f"({type(err).__name__}: {str(err)[:300]})") from None
    return model.to(device).eval(), task, noise, cfg, info, p


# --------------------------------------------------------------------------- commands
def cmd_train(args, extra) -> int:
    from kflow.train import Trainer, TrainConfig
    from kflow.utils import atomic_write_text, seed_everything

    from .dataset import load_prepared, split_indices
    from .evaluate import evaluate, pm_histogram, public
    from .task import Collator

    cfg = compose("mol", _overrides(args, extra))
    try:
        tcfg = TrainConfig.from_dict({k: v for k, v in to_container(cfg.trainer).items() if k != "_target_"})
    except ValueError as err:
        raise InputError(str(err)) from None
    check_device(tcfg.device)  # before the data is cut: a missing GPU is reported at once
    seed_everything(tcfg.seed)  # the model's initial weights too: identical commands give identical runs
    model, task, noise = build_components(cfg)
    clusters, report = load_prepared(cfg.data.name, cfg.data.root, noise, seed=cfg.data.split_seed)
    split = split_indices(len(clusters), cfg.data.split_seed)
    train = [clusters[i] for i in split["train"]]
    val = [clusters[i] for i in split["val"]][: max(cfg.eval_clusters, 0) or None]
    test = [clusters[i] for i in split["test"]]
    resample = bool(cfg.data.resample_loose) and report.get("kind") == "cif"
    rejected = _report_rejections(cfg.data.name, report)
    print(f"data {cfg.data.name}: {len(clusters)} clusters ({rejected['count']} inputs rejected), "
          f"split train/val/test = {len(train)}/{len(val)}/{len(test)}; model "
          f"{sum(p.numel() for p in model.parameters()):,} parameters; run dir {tcfg.run_dir}", file=sys.stderr)

    solver = _solver(cfg)

    def eval_fn(ema_model, step):
        r = evaluate(ema_model, task, val, steps=min(solver.steps, 20), method=solver.method, grid=solver.grid,
                     device=next(ema_model.parameters()).device)
        m = r["model"]
        return {"val_pm_atom": m["pm_atom"], "val_pm_atom_symmetry_aware": m["pm_atom_symmetry_aware"],
                "val_pm_center": m["pm_center"], "val_rot_median_deg": m["rot_median_deg"],
                "val_rot_within_10deg": m["rot_within_10deg"]}

    trainer = Trainer(model, task.loss, train, Collator(resample, noise), tcfg,
                      eval_fn=eval_fn if val else None, eval_every=int(cfg.eval_every),
                      run_config=to_container(cfg))
    trainer.sample_unit = "clusters"  # progress lines: "... 3.2 clusters/s ..."
    trainer.fit(resume=args.resume)
    if not trainer.is_main:
        return 0
    run = Path(tcfg.run_dir)
    ema = trainer.ema_model
    info = {"data": cfg.data.name, "train_clusters": len(train), "steps": trainer.step,
            "train_ids": [c["id"] for c in train]}
    export_model(run / "model.pt", ema, to_container(cfg), info)
    if test:
        res = evaluate(ema, task, test, steps=solver.steps, method=solver.method, grid=solver.grid,
                       device=trainer.device,
                       expansion_mean=float(cfg.noise.expansion_mean))
        res["rejected"] = rejected
        atomic_write_text(run / "test_metrics.json", json.dumps(public(res), indent=1))
        pm_histogram(res, run / "pm_hist.png")
        print("\n".join([_summary_line("test", res), *res["verdict"]]), file=sys.stderr)
        _warn_clashes(f"{cfg.data.name} test", res)
    print(f"done: {run / 'model.pt'}", file=sys.stderr)
    return 0


def _solver(cfg, **flags):
    """The model's ``solver`` config as one :class:`kflow.solver.SolverConfig`, with the command's flags
    (``--steps``, ``--method``; ``None`` keeps the config's value): every command samples with all of it."""
    from kflow.solver import SolverConfig

    try:
        return SolverConfig.from_dict(dict(cfg.solver), **flags)
    except ValueError as err:
        raise InputError(f"solver: {err}") from None


def _summary_line(name: str, res: dict) -> str:
    m, d = res.get("model", {}), res.get("do_nothing", {})
    return (f"{name}: {res['num_clusters']} clusters, PM-atom {m.get('pm_atom', float('nan')):.2f} Å "
            f"(symmetry-aware {m.get('pm_atom_symmetry_aware', float('nan')):.2f}), PM-centre "
            f"{m.get('pm_center', float('nan')):.2f} Å; do-nothing PM-atom {d.get('pm_atom', float('nan')):.2f} Å; "
            f"{res.get('seconds_per_cluster', float('nan')):.3f} s/cluster")


def cmd_evaluate(args, extra) -> int:
    from .dataset import load_prepared, split_indices
    from .evaluate import evaluate, public

    device = check_device(args.device or "cpu")
    model, task, noise, cfg, info, p = load_model(args.ckpt, device)
    data = args.data or cfg.data.name
    ov = compose("mol", _overrides(args, extra))
    clusters, report = load_prepared(data, args.data_root or ov.data.root, noise, seed=int(ov.data.split_seed))
    rejected = _report_rejections(data, report)
    if args.split != "all":
        clusters = [clusters[i] for i in split_indices(len(clusters), int(ov.data.split_seed))[args.split]]
    if args.limit:
        clusters = clusters[: args.limit]
    solver = _solver(cfg, steps=args.steps, method=args.method)
    res = evaluate(model, task, clusters, steps=solver.steps, method=solver.method, grid=solver.grid, device=device,
                   expansion_mean=float(noise.expansion_mean), progress=not args.json,
                   refine=_refine_config() if args.refine else None)
    res.update(checkpoint=str(p), data=data, split=args.split, trained_on=info.get("data"), rejected=rejected)
    if args.json:
        print(json.dumps(public(res)))
    else:
        print("\n".join([_summary_line(args.split, res), *res["verdict"]]))
        if "model_refined" in res:
            r = res["model_refined"]
            print(f"refined (reported separately): PM-atom {r['pm_atom']:.2f} Å (symmetry-aware "
                  f"{r['pm_atom_symmetry_aware']:.2f}), rotation median {r['rot_median_deg']:.1f}°, "
                  f"clashes {r['clashes']:.1f} per cluster")
    _warn_clashes(f"{data} {args.split}", res)
    return 0


def _refine_config():
    from .refine import RefineConfig

    return RefineConfig()


def _report_rejections(data: str, report: dict) -> dict:
    """Rejected inputs of a dataset: one stderr line (count, reasons, the first message) and the JSON summary."""
    from .dataset import rejection_summary

    rej = rejection_summary(report.get("rejected", []))
    if rej["count"]:
        reasons = ", ".join(f"{k} {v}" for k, v in rej["by_reason"].items())
        print(f"warning: {data}: {rej['count']} input(s) rejected ({reasons}); first: {rej['items'][0]['message']}",
              file=sys.stderr)
    return rej


def _warn_clashes(name: str, res: dict) -> None:
    """A WARNING line on stderr when the result (assemble or evaluate) has intermolecular clashes."""
    from .evaluate import clash_warning

    warning = clash_warning(name, res["clashes"]) if "clashes" in res else None
    if warning:
        print(warning, file=sys.stderr)


INPUT_TYPES = "CIF, official CSV, XYZ/extxyz/PDB cluster, SDF/MOL/XYZ molecule"
_INPUT_SUFFIXES = (".cif", ".csv", ".sdf", ".mol", ".mol2", ".xyz", ".extxyz", ".pdb")


def _input_file(path: str) -> Path:
    """``path`` if it is an existing file of a supported type, else :class:`InputError` (no heavy import)."""
    src = Path(path)
    if src.is_dir():
        raise InputError(f"{src} is a directory: give one file ({INPUT_TYPES}); for a folder of CIFs use "
                         f"`kflow-mol build-dataset --cif-dir {src}` or `--data {src}`")
    if not src.exists():
        raise InputError(f"input {src} does not exist")
    if src.suffix.lower() not in _INPUT_SUFFIXES:
        raise InputError(f"{src}: unsupported input type '{src.suffix}' ({INPUT_TYPES}, or --smiles)")
    return src


def _check_args(args) -> None:
    """Cheap checks of paths and numbers, before anything heavy loads: bad input is reported at once."""
    if args.cmd == "assemble" and bool(args.input) == bool(args.smiles):
        raise InputError("give either an INPUT file or --smiles")
    if getattr(args, "input", None):
        _input_file(args.input)
    ckpt = getattr(args, "ckpt", None)
    if ckpt and not Path(ckpt).exists():
        raise InputError(f"checkpoint {ckpt} not found: pass a run's model.pt or its run directory")
    for flag in ("cif_dir", "data_root"):
        d = getattr(args, flag, None)
        if d and not Path(d).is_dir():
            raise InputError(f"--{flag.replace('_', '-')} {d} is not a directory")
    if args.cmd == "assemble" and Path(args.out).is_file():
        raise InputError(f"--out {args.out} is a file: give a folder")
    for flag, low in (("steps", 1), ("workers", 1), ("max_atoms", 1), ("limit", 0), ("threads", 0), ("timeout", 0),
                      ("max_memory_gb", 0), ("max_cell_volume", 1), ("max_cell_atoms", 1), ("max_symops", 1),
                      ("max_cell_length", 1)):
        v = getattr(args, flag, None)
        if v is not None and v < low:
            raise InputError(f"--{flag.replace('_', '-')} must be >= {low}, got {v}")


def _cif_limits(args):
    """The pre-expansion caps of a CIF from the command's flags (defaults where a command has none)."""
    from .limits import CifLimits

    d = CifLimits()
    return CifLimits(**{k: getattr(args, k, None) or getattr(d, k) for k in
                        ("max_cell_length", "max_cell_volume", "max_cell_atoms", "max_symops")})


def _cluster_input(args):
    """The record to assemble, whether it has a known reference, and a short description."""
    import numpy as np

    from .cif import cluster_from_cif
    from .data import BuildError, ClusterRecord
    from .io import molecule_from_smiles, read_cluster_xyz, read_raw_pair, read_single_molecule

    if args.smiles:
        species, pos = molecule_from_smiles(args.smiles, seed=args.seed)
        return _single(species, pos, "smiles"), False
    src = _input_file(args.input)
    suf = src.suffix.lower()
    if suf == ".cif":
        return cluster_from_cif(src, limits=_cif_limits(args)), True
    if suf == ".csv":
        root = src.parents[2] if src.parent.name in ("FinalPositions", "InitialPositions") else src.parent
        cid = src.name.split("_cluster16")[0]
        return read_raw_pair(root, cid), True
    if suf in (".sdf", ".mol", ".mol2"):
        species, pos = read_single_molecule(src)
        return _single(species, pos, src.stem), False
    try:  # .xyz, .extxyz, .pdb: a 17-molecule cluster, else one molecule
        species, pos = read_cluster_xyz(src)
        rec = ClusterRecord(src.stem, np.asarray(species), np.asarray(pos), np.asarray(pos), {"source": str(src)})
        return rec, "loose-only"
    except BuildError as err:
        if err.reason != "bad_input":  # a 17-molecule cluster whose molecule breaks a rule (metal, ...)
            raise
        species, pos = read_single_molecule(src)
        return _single(species, pos, src.stem), False


def _single(species, pos, name):
    """A single molecule: 17 copies on a loose cubic-ish arrangement to be packed (no reference)."""
    import numpy as np

    from .data import ClusterRecord

    pos = np.asarray(pos, dtype=np.float64)
    pos = pos - pos.mean(0)
    r = np.linalg.norm(pos, axis=1).max() + 1.5
    g = np.array([(i, j, l) for i in (-1, 0, 1) for j in (-1, 0, 1) for l in (-1, 0, 1)], dtype=float)
    g = g[np.argsort(np.linalg.norm(g, axis=1), kind="stable")][:17]
    final = pos[None] + 2 * r * g[:, None]  # a non-overlapping placeholder "packing": only the shapes matter
    return ClusterRecord(name, np.asarray(species, dtype=np.int64), final, None, {"source": name, "single": True})


def cmd_assemble(args, extra) -> int:
    import time

    t_start = time.perf_counter()
    from .build import deadline, run_limited

    device = check_device(args.device or "cpu")
    what = args.input or f"SMILES '{args.smiles}'"
    # a bad input is reported before the model loads; reading it (a CIF's symmetry expansion) runs in a worker
    # that is killed at the time limit and memory-capped, the rest of the command runs under the same deadline
    record, known = run_limited(_cluster_input, args, timeout=args.timeout or None,
                                max_memory_gb=args.max_memory_gb or None, what=what)
    t_read = time.perf_counter() - t_start
    with deadline(max(args.timeout - (time.perf_counter() - t_start), 1e-3) if args.timeout else None, what):
        return _assemble(args, record, known, device, t_start, t_read)


def _assemble(args, record, known, device, t_start, t_read) -> int:
    import time

    import numpy as np

    from kflow.utils import atomic_write_text

    from .dataset import prepare
    from .evaluate import verdict
    from .io import write_cluster_cif, write_xyz
    from .metrics import evaluate_cluster, intermolecular_clashes, oracle_floors
    from .render import render_clusters
    from .shapes import copy_perms
    from .task import make_batch

    model, task, noise, cfg, info, p = load_model(args.ckpt, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare(record, noise, seed=args.seed)  # draws a missing loose state as inspect and the datasets do
    if known == "loose-only":
        prep["initial"] = np.asarray(record.initial)
    batch = make_batch([prep]).to(device)
    solver = _solver(cfg, steps=args.steps)
    res = task.sample(model, batch, steps=solver.steps, method=solver.method, grid=solver.grid,
                      return_trajectory=True)
    n = len(prep["species"])
    pos = res["positions"][0, :, :n].double().cpu().numpy()
    traj = [t[0, :, :n].double().cpu().numpy() for t in res["trajectory"]]
    species = prep["species"]
    write_xyz(out / "assembled.extxyz", species, pos, comment=f"kflow-mol assembled {record.id}")
    write_cluster_cif(out / "assembled.cif", species, pos, name=f"{record.id}_assembled_cluster")
    write_xyz(out / "trajectory.extxyz", species, np.stack(traj), comment="k-trajectory")
    write_xyz(out / "loose.extxyz", species, prep["initial"], comment="loose input")
    metrics = {"id": record.id, "input": args.input or args.smiles, "checkpoint": str(p),
               "model_trained_on": info.get("data"), "steps": solver.steps, "model_calls": res["evaluations"],
               "seconds": res["seconds"],
               "reference_known": known is True, "clashes": intermolecular_clashes(pos, species)}
    panels = {"loose": prep["initial"], "assembled": pos}
    if known is True:
        metrics["model"] = evaluate_cluster(pos, prep["final"], species, copy_perms(prep))
        metrics["floors"] = oracle_floors(prep["initial"], prep["final"], species, copy_perms(prep),
                                          float(noise.expansion_mean))
        metrics["reference_clashes"] = intermolecular_clashes(prep["final"], species)
        panels["reference"] = prep["final"]
    metrics["verdict"] = verdict(metrics.get("model", {}), metrics.get("floors", {}), metrics["clashes"])
    if args.refine:
        from .evaluate import refine_positions

        ref = refine_positions(pos, prep, _refine_config())
        write_xyz(out / "refined.extxyz", species, ref, comment=f"kflow-mol assembled + refined {record.id}")
        write_cluster_cif(out / "refined.cif", species, ref, name=f"{record.id}_refined_cluster")
        metrics["refined"] = {"clashes": intermolecular_clashes(ref, species)}
        if known is True:
            metrics["refined"]["model"] = evaluate_cluster(ref, prep["final"], species, copy_perms(prep))
        panels["refined"] = ref
    from .render import figure_text

    shown = {"loose": intermolecular_clashes(prep["initial"], species), "assembled": metrics["clashes"]}
    shown.update({"reference": metrics["reference_clashes"]} if known is True else {})
    shown.update({"refined": metrics["refined"]["clashes"]} if "refined" in metrics else {})
    pm = {"loose": metrics["floors"]["do_nothing"], "assembled": metrics["model"],
          **({"refined": metrics["refined"]["model"]} if "refined" in metrics else {})} if known is True else {}
    subtitle, notes = figure_text(shown, pm, metrics.get("floors"))
    render_clusters(panels, species, out / "assembled.png", title=f"SMILES {args.smiles}" if args.smiles
                    else record.id, subtitle=subtitle, notes=notes)
    metrics["seconds_total"] = time.perf_counter() - t_start  # reading, model, sampling, scoring, writing
    metrics["seconds_read_input"] = t_read
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1, default=float))
    if known is True:
        print(f"{record.id}: PM-atom {metrics['model']['pm_atom']:.2f} Å (symmetry-aware "
              f"{metrics['model']['pm_atom_symmetry_aware']:.2f}); do-nothing "
              f"{metrics['floors']['do_nothing']['pm_atom']:.2f} Å; {res['seconds']:.2f} s")
    print("\n".join(metrics["verdict"]))
    if "refined" in metrics:
        rm = metrics["refined"].get("model")
        print(f"refined (reported separately): {metrics['refined']['clashes']['clashes']} clashes"
              + (f", PM-atom {rm['pm_atom']:.2f} Å (symmetry-aware {rm['pm_atom_symmetry_aware']:.2f})" if rm else ""))
    _warn_clashes(record.id, metrics)
    print(f"time: sampling {res['seconds']:.2f} s ({res['evaluations']} model evaluations); total "
          f"{metrics['seconds_total']:.2f} s (reading the input {t_read:.2f} s)")
    print(f"wrote {out}/assembled.cif, assembled.extxyz, trajectory.extxyz, assembled.png, metrics.json")
    return 0


def cmd_build(args, extra) -> int:
    from .build import LooseNoise, build_dataset

    noise_cfg = instantiate(compose("mol", extra).noise)
    summary = build_dataset(args.cif_dir, args.out, workers=args.workers,
                            noise_fn=None if args.no_noise else LooseNoise(noise_cfg), seed=args.seed,
                            max_atoms=args.max_atoms, progress=True, limits=_cif_limits(args),
                            timeout=args.timeout or None, max_memory_gb=args.max_memory_gb or None,
                            allow_mirror=not args.reject_racemic, allow_conformers=not args.reject_conformers,
                            min_packing=args.min_packing or None, min_contact_ratio=args.min_contact_ratio or None)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("ids",)}, indent=1, default=str))
    return 0


def cmd_inspect(args, extra) -> int:
    import numpy as np

    from .dataset import prepare
    from .metrics import oracle_floors
    from .render import render_clusters
    from .shapes import copy_perms

    args.smiles = None
    noise = instantiate(compose("mol", extra).noise)
    record, known = _cluster_input(args)
    prep = prepare(record, noise, seed=args.seed)
    x = prep["final"]
    c = x.mean(1)
    info = {"id": record.id, "molecules": int(x.shape[0]), "atoms_per_molecule": int(x.shape[1]),
            "formula": "".join(f"{s}{record.symbols.count(s)}" for s in sorted(set(record.symbols))),
            "cluster_radius_A": float(np.linalg.norm(c - c[0], axis=1).max()),
            "symmetry_order": int(len(prep["perms"])), "rigid_shapes": int(len(prep["templates"]))}
    if known is True:
        fl = oracle_floors(prep["initial"], prep["final"], prep["species"], copy_perms(prep),
                           float(noise.expansion_mean))
        info["do_nothing_pm_atom"] = fl["do_nothing"]["pm_atom"]
        info["do_nothing_pm_center"] = fl["do_nothing"]["pm_center"]
        info["undo_mean_expansion_pm_center"] = fl["undo_mean_expansion"]["pm_center"]
    png = Path(args.png or f"{record.id}_cluster.png")
    from .metrics import intermolecular_clashes
    from .render import figure_text

    subtitle, notes = figure_text(
        {"loose": intermolecular_clashes(prep["initial"], prep["species"]),
         "packed": intermolecular_clashes(prep["final"], prep["species"])},
        {"loose": fl["do_nothing"]} if known is True else None, fl if known is True else None)
    render_clusters({"loose": prep["initial"], "packed": prep["final"]}, prep["species"], png, title=record.id,
                    subtitle=subtitle, notes=notes)
    info["picture"] = str(png)
    print(json.dumps(info, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kflow-mol", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch default; 1 is faster for small models on a busy machine)")
    overrides = " [key=value ...]"  # hydra overrides of configs/mol.yaml after the flags

    def command(name, help_, fn, takes_overrides=True, **kw):
        usage = f"%(prog)s [options]{' [input]' if name in ('assemble', 'inspect') else ''}"
        p = sub.add_parser(name, help=help_, parents=[common], usage=usage + (overrides if takes_overrides else ""),
                           description=help_ + ("; trailing key=value pairs override configs/mol.yaml (e.g. "
                                                "model=mol_tiny trainer.steps=100)" if takes_overrides else ""),
                           **kw)
        p.set_defaults(fn=fn, takes_overrides=takes_overrides)
        return p

    def limit_flags(p, timeout_help):
        from .limits import CifLimits  # no heavy import: --help stays fast

        d = CifLimits()
        p.add_argument("--timeout", type=float, default=60.0 if p.prog.endswith("build-dataset") else 300.0,
                       help=f"time limit in seconds, {timeout_help} (0 = none; default: %(default)g)")
        p.add_argument("--max-memory-gb", type=float, default=4.0,
                       help="memory a worker may add to its start size (RLIMIT_AS; 0 = none; default: %(default)g)")
        p.add_argument("--max-cell-volume", type=float, default=d.max_cell_volume,
                       help="largest CIF cell volume in Å^3, checked before expanding (default: %(default)g)")
        p.add_argument("--max-cell-atoms", type=int, default=d.max_cell_atoms,
                       help="most atoms a CIF cell may expand to, sites x symmetry operators (default: %(default)d)")
        p.add_argument("--max-symops", type=int, default=d.max_symops,
                       help="most symmetry operators in a CIF (default: %(default)d)")
        p.add_argument("--max-cell-length", type=float, default=d.max_cell_length,
                       help="longest CIF cell edge in Å (default: %(default)g)")

    def data_flags(p, device_default):
        p.add_argument("--data", help="cod17-mini (shipped), cod17-5k / cod17-10k / cod17-all (official raw files "
                                      "under --data-root), or a folder of CIFs / of raw/ CSVs")
        p.add_argument("--data-root", help="root of the official raw files (default: $KFLOW_DATA)")
        p.add_argument("--device", help=f"cpu | cuda | cuda:N | auto (default: {device_default})")

    p = command("train", "train an assembly model", cmd_train, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    data_flags(p, "auto = CUDA when present")
    p.add_argument("--run-dir", help="output folder (config, metrics.jsonl, loss.png, checkpoints, model.pt)")
    p.add_argument("--steps", type=int, help="training steps (trainer.steps)")
    p.add_argument("--baseline", action="store_true", help="train the w=1 baseline (same as schedule=flow)")
    p.add_argument("--resume", action="store_true", help="continue from run-dir/last.pt exactly")

    p = command("evaluate", "metrics of a model on a dataset split, beside the floors, with a clash verdict",
                cmd_evaluate)
    data_flags(p, "cpu")
    p.add_argument("--ckpt", help="model.pt or run dir (default: the shipped model)")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"],
                   help="which part of the seeded 80/10/10 split (data.split_seed) to evaluate (default: test)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's solver config)")
    p.add_argument("--method", choices=["exact"],
                   help="sampler along k: exact increments (the rigid path's only method)")
    p.add_argument("--refine", action="store_true",
                   help="also refine every assembled cluster by a short rigid-body UFF pair-energy minimisation "
                        "with restrained centroids, scored separately as model_refined")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N clusters (0 = all)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary lines")

    p = command("assemble", "assemble one cluster (CIF, official CSV, XYZ/PDB cluster, molecule, SMILES)",
                cmd_assemble, takes_overrides=False)
    p.add_argument("input", nargs="?", help="crystal CIF | raw/FinalPositions/<id>_cluster16.csv | 17-molecule "
                                            "XYZ/extxyz/PDB | single molecule SDF/MOL/XYZ")
    p.add_argument("--smiles", help="assemble 17 copies of this molecule (RDKit conformer)")
    p.add_argument("--out", default="assembled", help="output folder (default: assembled)")
    p.add_argument("--ckpt", help="model.pt (default: the shipped model trained on cod17-mini)")
    p.add_argument("--steps", type=int, help="sampling steps along k (default: the model's solver config)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the loose state drawn for a CIF or molecule (same default as inspect, same draw "
                        "as the datasets)")
    p.add_argument("--device", help="cpu | cuda | cuda:N | auto (default: cpu)")
    p.add_argument("--refine", action="store_true",
                   help="also write a refined cluster (rigid-body UFF pair-energy minimisation with restrained "
                        "centroids): refined.cif/.extxyz, its metrics beside the unrefined ones")

    limit_flags(p, "for the whole command; reading the input runs in a worker that is killed")

    p = command("build-dataset", "cut 17-molecule clusters from a folder of CIFs (official layout)", cmd_build)
    p.add_argument("--cif-dir", required=True, help="folder of crystal CIFs (*.cif)")
    p.add_argument("--out", required=True, help="output root: raw/FinalPositions, raw/InitialPositions, report.jsonl")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (default: 2; 1 = in this process)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the loose states (per file: seed and file id)")
    p.add_argument("--max-atoms", type=int, default=200, help="largest accepted molecule, in atoms (default: 200)")
    p.add_argument("--no-noise", action="store_true", help="write FinalPositions only")
    p.add_argument("--reject-racemic", action="store_true",
                   help="reject crystals holding both enantiomers (default: accept; each enantiomer is its own "
                        "rigid shape and the report says racemic: true)")
    p.add_argument("--reject-conformers", action="store_true",
                   help="reject Z' > 1 crystals of different conformers (default: accept; atom order by bond-graph "
                        "matching, n_conformers in the report)")
    p.add_argument("--min-packing", type=float, default=0.5,
                   help="reject cells whose packing coefficient (vdW volume x Z / cell volume; organic crystals "
                        "0.65-0.80) is below this (reason loose_packing; 0 = never; default: %(default)g)")
    p.add_argument("--min-contact-ratio", type=float, default=0.5,
                   help="reject clusters with an intermolecular contact shorter than this fraction of the van der "
                        "Waals sum (reason impossible_contact; 0 = never; default: %(default)g)")
    limit_flags(p, "per file: an alarm, then the file's worker process is killed")

    p = command("inspect", "describe a cluster and render loose vs packed", cmd_inspect)
    p.add_argument("input", help="CIF, official CSV, or XYZ cluster")
    p.add_argument("--png", help="picture path (default: <id>_cluster.png)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the loose state drawn for a CIF (same default as assemble)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit codes: 0 ok, 2 bad input (one ``error:`` line on stderr), 1 internal failure
    (see :mod:`kflow.cli`)."""
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    return run_command(_run, args, extra, bad_input=("kflow_mol.data.BuildError",))


def _run(args, extra) -> int:
    if extra and not args.takes_overrides:
        raise InputError(f"unrecognised arguments {extra} (see `kflow-mol {args.cmd} --help`)")
    _check_args(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args.fn(args, extra)


if __name__ == "__main__":
    sys.exit(main())
