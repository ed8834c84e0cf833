"""``kflow-mol``: build data, train, evaluate and assemble molecular clusters with K-Flow.

Flags are documented in ``--help``; any ``key=value`` after the flags is a hydra override of
``configs/mol.yaml`` (e.g. ``schedule=flow`` for the baseline, ``trainer.steps=2000``, ``model=mol_tiny``).

This module only parses arguments and prints: the work is done by :mod:`kflow_mol.pipeline`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# nothing heavy at module level (numpy, torch, RDKit, ASE and kflow_mol.pipeline load inside the commands):
# `--help` and argument errors answer at once, and a missing file is reported before any of them loads
from kflow.cli import InputError, check_device, compose, configs_dir, instantiate, run_command

from .limits import CifLimits  # no heavy import: --help stays fast

_PIPELINE_NAMES = ("DEFAULT_MODEL", "build_components", "load_model")  # kept importable from here


def __getattr__(name: str):
    """``from kflow_mol.cli import load_model`` (older callers) still works, without loading the pipeline
    with this module; new code imports :mod:`kflow_mol.pipeline`."""
    if name in _PIPELINE_NAMES:
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


# --------------------------------------------------------------------------- arguments
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
    d = CifLimits()
    return CifLimits(**{k: getattr(args, k, None) or getattr(d, k) for k in
                        ("max_cell_length", "max_cell_volume", "max_cell_atoms", "max_symops")})


# --------------------------------------------------------------------------- commands
def cmd_train(args, extra) -> int:
    from . import pipeline

    cfg = compose("mol", _overrides(args, extra))
    result = pipeline.train(cfg, resume=args.resume)
    if result.model_path is None:  # a non-main process of a distributed run
        return 0
    if result.test is not None:
        from .evaluate import summary_line

        print("\n".join([summary_line("test", result.test), *result.test["verdict"]]), file=sys.stderr)
        _warn_clashes(f"{cfg.data.name} test", result.test)
    print(f"done: {result.model_path}", file=sys.stderr)
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
    from .evaluate import public, summary_line

    if args.json:
        print(json.dumps(public(res)))
    else:
        print("\n".join([summary_line(args.split, res), *res["verdict"]]))
        if "model_refined" in res:
            r = res["model_refined"]
            print(f"refined (reported separately): PM-atom {r['pm_atom']:.2f} Å (symmetry-aware "
                  f"{r['pm_atom_symmetry_aware']:.2f}), rotation median {r['rot_median_deg']:.1f}°, "
                  f"clashes {r['clashes']:.1f} per cluster")
    _warn_clashes(f"{res['data']} {args.split}", res)
    return 0


def _warn_clashes(name: str, res: dict) -> None:
    """A WARNING line on stderr when the result (assemble or evaluate) has intermolecular clashes."""
    from .evaluate import clash_warning

    warning = clash_warning(name, res["clashes"]) if "clashes" in res else None
    if warning:
        print(warning, file=sys.stderr)


def cmd_assemble(args, extra) -> int:
    t_start = time.perf_counter()
    from . import pipeline

    inp, m = pipeline.assemble_file(args.input, args.out, smiles=args.smiles, ckpt=args.ckpt, steps=args.steps,
                                    seed=args.seed, refine=args.refine, device=check_device(args.device or "cpu"),
                                    limits=_cif_limits(args), timeout=args.timeout,
                                    max_memory_gb=args.max_memory_gb, started=t_start)
    if inp.known:
        print(f"{m['id']}: PM-atom {m['model']['pm_atom']:.2f} Å (symmetry-aware "
              f"{m['model']['pm_atom_symmetry_aware']:.2f}); do-nothing "
              f"{m['floors']['do_nothing']['pm_atom']:.2f} Å; {m['seconds']:.2f} s")
    print("\n".join(m["verdict"]))
    if "refined" in m:
        rm = m["refined"].get("model")
        print(f"refined (reported separately): {m['refined']['clashes']['clashes']} clashes"
              + (f", PM-atom {rm['pm_atom']:.2f} Å (symmetry-aware {rm['pm_atom_symmetry_aware']:.2f})" if rm else ""))
    _warn_clashes(m["id"], m)
    print(f"time: sampling {m['seconds']:.2f} s ({m['model_calls']} model evaluations); total "
          f"{m['seconds_total']:.2f} s (reading the input {m['seconds_read_input']:.2f} s)")
    print(f"wrote {Path(args.out)}/assembled.cif, assembled.extxyz, trajectory.extxyz, assembled.png, metrics.json")
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
    from . import pipeline

    noise = instantiate(compose("mol", extra).noise)
    inp = pipeline.read_input(args.input, seed=args.seed, limits=_cif_limits(args))
    info = pipeline.inspect(inp, noise, Path(args.png or f"{inp.record.id}_cluster.png"), seed=args.seed)
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
