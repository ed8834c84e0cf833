"""Resource limits of the molecule readers and the cheap checks of a request, made before anything heavy
loads (no heavy imports: ``kflow-mol`` builds its flags from these defaults and reports bad input at once).

See ``docs/LIMITS.md`` for every limit, its default and the flag that changes it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from kflow.cli import InputError  # no heavy import

INPUT_TYPES = "CIF, official CSV, XYZ/extxyz/PDB cluster, SDF/MOL/XYZ molecule"
INPUT_SUFFIXES = (".cif", ".csv", ".sdf", ".mol", ".mol2", ".xyz", ".extxyz", ".pdb")

#: the smallest value each numeric option accepts (``None``: not given)
MINIMUMS = {"steps": 1, "workers": 1, "max_atoms": 1, "limit": 0, "threads": 0, "timeout": 0, "max_memory_gb": 0,
            "max_cell_volume": 1, "max_cell_atoms": 1, "max_symops": 1, "max_cell_length": 1}


@dataclass(frozen=True)
class CifLimits:
    """Caps checked on the CIF text *before* pymatgen expands the symmetry (so a huge or absurd cell is
    rejected in milliseconds, with reason ``too_large``, instead of filling the memory).

    Attributes:
        max_file_mb: largest file read.
        max_cell_length: largest cell length (Å); real organic crystals stay below ~100 Å.
        max_cell_volume: largest cell volume (Å^3); ~10 Å^3 per atom in organic crystals.
        max_cell_atoms: largest number of atoms the expansion may produce, counted as sites x operators (an
            upper bound: atoms on special positions are counted once per operator).
        max_symops: most symmetry operators (a space group has at most 192 in a centred setting).
    """

    max_file_mb: float = 50.0
    max_cell_length: float = 500.0
    max_cell_volume: float = 1e5
    max_cell_atoms: int = 10_000
    max_symops: int = 192

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> CifLimits:
        """The pre-expansion caps named in ``flags`` (``max_cell_length``, ...; the defaults where one is
        missing, None or 0); ``max_file_mb`` stays the default."""
        return cls(**{f.name: flags.get(f.name) or f.default for f in fields(cls) if f.name != "max_file_mb"})

    @staticmethod
    def add_flags(add, timeout: float, timeout_help: str) -> None:
        """Declare the flags :meth:`from_flags` reads, plus ``--timeout`` and ``--max-memory-gb``, with
        ``add`` an ``argparse`` ``add_argument``."""
        d = CifLimits()
        add("--timeout", type=float, default=timeout,
            help=f"time limit in seconds, {timeout_help} (0 = none; default: %(default)g)")
        add("--max-memory-gb", type=float, default=4.0,
            help="memory a worker may add to its start size (RLIMIT_AS; 0 = none; default: %(default)g)")
        add("--max-cell-volume", type=float, default=d.max_cell_volume,
            help="largest CIF cell volume in Å^3, checked before expanding (default: %(default)g)")
        add("--max-cell-atoms", type=int, default=d.max_cell_atoms,
            help="most atoms a CIF cell may expand to, sites x symmetry operators (default: %(default)d)")
        add("--max-symops", type=int, default=d.max_symops,
            help="most symmetry operators in a CIF (default: %(default)d)")
        add("--max-cell-length", type=float, default=d.max_cell_length,
            help="longest CIF cell edge in Å (default: %(default)g)")


def check_input_file(path: str | Path) -> Path:
    """``path`` if it is an existing file of a supported type (:data:`INPUT_TYPES`), else :class:`InputError`."""
    src = Path(path)
    if src.is_dir():
        raise InputError(f"{src} is a directory: give one file ({INPUT_TYPES}); for a folder of CIFs use "
                         f"`kflow-mol build-dataset --cif-dir {src}` or `--data {src}`")
    if not src.exists():
        raise InputError(f"input {src} does not exist")
    if src.suffix.lower() not in INPUT_SUFFIXES:
        raise InputError(f"{src}: unsupported input type '{src.suffix}' ({INPUT_TYPES}, or --smiles)")
    return src


def check_request(cmd: str, options: Mapping[str, Any]) -> None:
    """Cheap checks of one ``kflow-mol`` command's paths and numbers (``options``: its flags by name, e.g.
    ``vars(args)``), before anything heavy loads: bad input is reported at once, as :class:`InputError`."""
    if cmd == "assemble" and bool(options.get("input")) == bool(options.get("smiles")):
        raise InputError("give either an INPUT file or --smiles")
    if options.get("input"):
        check_input_file(options["input"])
    ckpt = options.get("ckpt")
    if ckpt and not Path(ckpt).exists():
        raise InputError(f"checkpoint {ckpt} not found: pass a run's model.pt or its run directory")
    for flag in ("cif_dir", "data_root"):
        d = options.get(flag)
        if d and not Path(d).is_dir():
            raise InputError(f"--{flag.replace('_', '-')} {d} is not a directory")
    if cmd == "assemble" and Path(options["out"]).is_file():
        raise InputError(f"--out {options['out']} is a file: give a folder")
    for flag, low in MINIMUMS.items():
        v = options.get(flag)
        if v is not None and v < low:
            raise InputError(f"--{flag.replace('_', '-')} must be >= {low}, got {v}")
