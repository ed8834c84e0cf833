"""``kflow-mol``: build data, train, evaluate and assemble molecular clusters with K-Flow.

Flags are documented in ``--help``; any ``key=value`` after the flags is a hydra override of
``configs/mol.yaml`` (e.g. ``schedule=flow`` for the baseline, ``trainer.steps=2000``, ``model=mol_tiny``).

This module only parses arguments and composes the config: the cheap input checks are
:mod:`kflow_mol.limits`, the work and what each command prints :mod:`kflow_mol.pipeline`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

# nothing heavy at module level (numpy, torch, RDKit, ASE and kflow_mol.pipeline load inside the commands):
# `--help` and argument errors answer at once, and a missing file is reported before any of them loads
from kflow.cli import InputError, check_device, check_overrides, compose, instantiate, run_command

from .limits import CifLimits, check_request  # no heavy import


def __getattr__(name: str):
    """``from kflow_mol.cli import load_model`` (older callers: ``DEFAULT_MODEL``, ``build_components``,
    ``load_model``) still works without loading the pipeline with this module; new code imports the pipeline."""
    if name in ("DEFAULT_MODEL", "build_components", "load_model"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _overrides(args, extra: list[str]) -> list[str]:
    """The hydra overrides of ``configs/mol.yaml`` the flags stand for, then the trailing ``key=value`` ones."""
    from kflow.cli import configs_dir

    check_overrides(extra, f" (see `kflow-mol {args.cmd} --help`)")
    data = getattr(args, "data", None)
    known = data and (configs_dir() / "data" / f"{data}.yaml").exists()
    ov = [f"data={data}" if known else f"data.name={data}"] if data else []
    keys = {"data_root": "data.root", "run_dir": "trainer.run_dir", "steps": "trainer.steps", "device": "trainer.device"}
    ov += [f"{key}={getattr(args, flag)}" for flag, key in keys.items()
           if getattr(args, flag, None) and (flag != "steps" or args.cmd == "train")]  # evaluate: sampling steps
    return ov + (["schedule=flow"] if getattr(args, "baseline", False) else []) + extra


def cmd_train(args, extra) -> int:
    from . import pipeline

    cfg = compose("mol", _overrides(args, extra))
    pipeline.report_train(pipeline.train(cfg, resume=args.resume), cfg.data.name)
    return 0


def cmd_evaluate(args, extra) -> int:
    from . import pipeline

    device = check_device(args.device or "cpu")
    loaded = pipeline.load_model(args.ckpt, device)
    ov = compose("mol", _overrides(args, extra))
    res = pipeline.evaluate(loaded, args.data or loaded.cfg.data.name, args.data_root or ov.data.root,
                            int(ov.data.split_seed), split=args.split, limit=args.limit,
                            solver=pipeline.solver_config(loaded.cfg, steps=args.steps, method=args.method),
                            refine=args.refine, device=device, progress=not args.json,
                            min_packing=ov.data.get("min_packing"))
    pipeline.report_evaluation(res, args.split, f"{res['data']} {args.split}", as_json=args.json)
    return 0


def cmd_assemble(args, extra) -> int:
    t_start = time.perf_counter()
    from . import pipeline

    inp, m = pipeline.assemble_file(args.input, args.out, smiles=args.smiles, ckpt=args.ckpt, steps=args.steps,
                                    seed=args.seed, refine=args.refine, device=check_device(args.device or "cpu"),
                                    limits=CifLimits.from_flags(vars(args)), timeout=args.timeout,
                                    max_memory_gb=args.max_memory_gb, started=t_start)
    pipeline.report_assembly(inp, m, args.out)
    return 0


def cmd_build(args, extra) -> int:
    from . import pipeline

    noise = instantiate(compose("mol", extra).noise)
    summary = pipeline.build_dataset(
        args.cif_dir, args.out, noise=None if args.no_noise else noise, workers=args.workers, seed=args.seed,
        max_atoms=args.max_atoms, limits=CifLimits.from_flags(vars(args)), timeout=args.timeout,
        max_memory_gb=args.max_memory_gb, allow_mirror=not args.reject_racemic,
        allow_conformers=not args.reject_conformers, min_packing=args.min_packing,
        min_contact_ratio=args.min_contact_ratio)
    print(json.dumps(summary, indent=1, default=str))
    return 0


def cmd_inspect(args, extra) -> int:
    from . import pipeline

    noise = instantiate(compose("mol", extra).noise)
    inp = pipeline.read_input(args.input, seed=args.seed, limits=CifLimits.from_flags(vars(args)))
    print(json.dumps(pipeline.inspect(inp, noise, args.png, seed=args.seed), indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kflow-mol", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default; 1 is "
                        "faster for small models on a busy machine)")

    def command(name, help_, fn, takes_overrides=True, **kw):
        usage = "%(prog)s [options]" + (" [input]" if name in ("assemble", "inspect") else "")
        more = "; trailing key=value pairs override configs/mol.yaml (e.g. model=mol_tiny trainer.steps=100)"
        p = sub.add_parser(name, help=help_, parents=[common], description=help_ + (more if takes_overrides else ""),
                           usage=usage + (" [key=value ...]" if takes_overrides else ""), **kw)
        p.set_defaults(fn=fn, takes_overrides=takes_overrides)
        return p.add_argument

    def data_flags(a, device_default):
        a("--data", help="cod17-mini (shipped), cod17-5k / cod17-10k / cod17-all (official raw files under "
                         "--data-root), or a folder of CIFs / of raw/ CSVs")
        a("--data-root", help="root of the official raw files (default: $KFLOW_DATA)")
        a("--device", help=f"cpu | cuda | cuda:N | auto (default: {device_default})")

    a = command("train", "train an assembly model", cmd_train, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    data_flags(a, "auto = CUDA when present")
    a("--run-dir", help="output folder (config, metrics.jsonl, loss.png, checkpoints, model.pt)")
    a("--steps", type=int, help="training steps (trainer.steps)")
    a("--baseline", action="store_true", help="train the w=1 baseline (same as schedule=flow)")
    a("--resume", action="store_true", help="continue from run-dir/last.pt exactly")

    a = command("evaluate", "metrics of a model on a dataset split, beside the floors, with a clash verdict",
                cmd_evaluate)
    data_flags(a, "cpu")
    a("--ckpt", help="model.pt or run dir (default: the shipped model)")
    a("--split", default="test", choices=["train", "val", "test", "all"],
      help="which part of the seeded 80/10/10 split (data.split_seed) to evaluate (default: test)")
    a("--steps", type=int, help="sampling steps (default: the model's solver config)")
    a("--method", choices=["exact"], help="sampler along k: exact increments (the rigid path's only method)")
    a("--refine", action="store_true", help="also refine every assembled cluster by a short rigid-body UFF "
      "pair-energy minimisation with restrained centroids, scored separately as model_refined")
    a("--limit", type=int, default=0, help="evaluate only the first N clusters (0 = all)")
    a("--json", action="store_true", help="print one JSON object instead of the summary lines")

    a = command("assemble", "assemble one cluster (CIF, official CSV, XYZ/PDB cluster, molecule, SMILES)",
                cmd_assemble, takes_overrides=False)
    a("input", nargs="?", help="crystal CIF | raw/FinalPositions/<id>_cluster16.csv | 17-molecule "
                               "XYZ/extxyz/PDB | single molecule SDF/MOL/XYZ")
    a("--smiles", help="assemble 17 copies of this molecule (RDKit conformer)")
    a("--out", default="assembled", help="output folder (default: assembled)")
    a("--ckpt", help="model.pt (default: the shipped model trained on cod17-mini)")
    a("--steps", type=int, help="sampling steps along k (default: the model's solver config)")
    a("--seed", type=int, default=0, help="seed of the loose state drawn for a CIF or molecule (same default "
      "as inspect, same draw as the datasets)")
    a("--device", help="cpu | cuda | cuda:N | auto (default: cpu)")
    a("--refine", action="store_true", help="also write a refined cluster (rigid-body UFF pair-energy "
      "minimisation with restrained centroids): refined.cif/.extxyz, its metrics beside the unrefined ones")
    CifLimits.add_flags(a, 300.0, "for the whole command; reading the input runs in a worker that is killed")

    a = command("build-dataset", "cut 17-molecule clusters from a folder of CIFs (official layout)", cmd_build)
    a("--cif-dir", required=True, help="folder of crystal CIFs (*.cif)")
    a("--out", required=True, help="output root: raw/FinalPositions, raw/InitialPositions, report.jsonl")
    a("--workers", type=int, default=2, help="parallel processes (default: 2; 1 = in this process)")
    a("--seed", type=int, default=0, help="base seed of the loose states (per file: seed and file id)")
    a("--max-atoms", type=int, default=200, help="largest accepted molecule, in atoms (default: 200)")
    a("--no-noise", action="store_true", help="write FinalPositions only")
    a("--reject-racemic", action="store_true", help="reject crystals holding both enantiomers (default: "
      "accept; each enantiomer is its own rigid shape and the report says racemic: true)")
    a("--reject-conformers", action="store_true", help="reject Z' > 1 crystals of different conformers "
      "(default: accept; atom order by bond-graph matching, n_conformers in the report)")
    a("--min-packing", type=float, default=0.5, help="reject cells whose packing coefficient (vdW volume x Z / "
      "cell volume; organic crystals 0.65-0.80) is below this (reason loose_packing; 0 = never; default: "
      "%(default)g)")
    a("--min-contact-ratio", type=float, default=0.5, help="reject clusters with an intermolecular contact "
      "shorter than this fraction of the van der Waals sum (reason impossible_contact; 0 = never; default: "
      "%(default)g)")
    CifLimits.add_flags(a, 60.0, "per file: an alarm, then the file's worker process is killed")

    a = command("inspect", "describe a cluster and render loose vs packed", cmd_inspect)
    a("input", help="CIF, official CSV, or XYZ cluster")
    a("--png", help="picture path (default: <id>_cluster.png)")
    a("--seed", type=int, default=0, help="seed of the loose state drawn for a CIF (same default as assemble)")
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
    check_request(args.cmd, vars(args))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args.fn(args, extra)


if __name__ == "__main__":
    sys.exit(main())
