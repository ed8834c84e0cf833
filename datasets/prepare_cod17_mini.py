#!/usr/bin/env python
"""Rebuild the shipped ``cod17-mini`` data set from the redistributable CIF collections.

Sources (read-only, from the project's ``shared`` folder):

* ``data/crystals/cod``             Crystallography Open Database entries (CC0)
* ``data/crystals/pyxtal_testdb``   CIFs from the ``pyxtal`` wheel's test database (MIT; CSD-derived)
* ``data/crystals/pyxtal_examples`` CIFs from the ``pyxtal`` wheel's examples (MIT)

(``csd_organic_semiconductors`` is deliberately *not* used: it may not be redistributed.)

Every CIF is run through the cluster builder (:func:`kflow_mol.build.build_dataset`, default settings:
racemic crystals and Z' > 1 crystals of different conformers accepted, each copy its own rigid shape; cells
packed looser than ``MIN_PACKING`` (0.5) and contacts below ``MIN_CONTACT_RATIO`` (0.5) of the van der Waals
sum rejected); accepted crystals are de-duplicated (same molecular formula and cell lengths within 0.3 A, or
within 10 % across folders: the pyxtal folders share several structures, e.g. naphthalene / NAPHTA15) with the
priority cod > pyxtal_testdb > pyxtal_examples, and the accepted *source CIFs* are copied to ``<out>/cifs/``
with ``manifest.json`` and ``LICENSES.md``. Per file the manifest records its origin and licence and the
builder's acceptance facts: ``racemic`` (mirror-image copies in the cell), ``n_mirror_copies`` (in the
cluster), ``z_prime`` and ``space_group`` (spglib, symprec 0.1 A, on the file's cell: the pyxtal_testdb files
are written in P1), ``n_conformers`` (distinct conformers: Z' > 1 of different shapes), ``n_cluster_shapes``,
``packing_coefficient``, ``min_contact`` / ``min_contact_atoms`` / ``min_vdw_ratio``. Finally every shipped
file is checked the way training loads it (:func:`kflow_mol.dataset.load_records` with ``min_packing`` None
and 0.5, then :func:`kflow_mol.dataset.prepare`); the script fails if one is rejected. With ``--raw`` the
clusters are also written in the official COD-Cluster17 raw layout (``<out>/raw``, with InitialPositions from
the default loose noise model, seed 0) - not shipped by default because it is ~10 MB of CSV that rebuilds in
about 20 s.

Usage::

    python datasets/prepare_cod17_mini.py --shared ../shared --out datasets/cod17-mini [--raw] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

REBUILD = "python datasets/prepare_cod17_mini.py --shared ../shared"
# per-file acceptance facts copied from the builder's report (kflow_mol.build.REPORT_FACTS)
FACTS = ("racemic", "n_mirror_copies", "n_conformers", "n_cluster_shapes", "packing_coefficient", "min_contact",
         "min_contact_atoms", "min_vdw_ratio")

SOURCES = [  # (folder, licence, origin note), in de-duplication priority order
    ("cod", "CC0-1.0", "Crystallography Open Database (https://www.crystallography.net/), public domain (CC0)"),
    ("pyxtal_testdb", "MIT", ("pyxtal wheel test database (MIT licence; structures derived from the CSD, "
                              "file name = CSD refcode)")),
    ("pyxtal_examples", "MIT", "pyxtal wheel example files (MIT licence)"),
]

PYXTAL_MIT = """MIT License

Copyright (c) the PyXtal authors (Qiang Zhu and contributors), https://github.com/MaterSim/PyXtal

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction, including without limitation
the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and to
permit persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions of
the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE
WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR
COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def _default_shared() -> Path:
    env = os.environ.get("KFLOW_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=_default_shared(), help="the shared folder (KFLOW_SHARED)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "cod17-mini")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--raw", action="store_true", help="also write <out>/raw (official CSV layout, seed 0)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kflow_mol.build import LooseNoise, build_dataset
    from kflow_mol.cif import MIN_CONTACT_RATIO, MIN_PACKING, cluster_from_cif

    crystals = args.shared / "data" / "crystals"
    if not crystals.is_dir():
        print(f"error: {crystals} not found; pass --shared or set KFLOW_SHARED", file=sys.stderr)
        return 2
    out = args.out
    cif_out = out / "cifs"
    if cif_out.exists():
        shutil.rmtree(cif_out)
    cif_out.mkdir(parents=True)
    manifest, seen, skipped = [], [], []
    stats = {}
    with tempfile.TemporaryDirectory() as tmp:
        for folder, licence, origin in SOURCES:
            summary = build_dataset(crystals / folder, Path(tmp) / folder, workers=args.workers, progress=True)
            stats[folder] = {k: summary[k] for k in ("n_files", "accepted", "reasons", "seconds_total")}
            rows = [json.loads(x) for x in (Path(tmp) / folder / "report.jsonl").read_text().splitlines()]
            for r in rows:
                if r["status"] != "accepted":
                    continue
                rec = cluster_from_cif(r["file"])
                abc = sorted(rec.meta["cell"][:3])
                dup = next((m for m, (f, c) in zip(manifest, seen) if _same(f, c, m["source"],
                                                                             rec.meta["formula"], abc, folder)), None)
                if dup is not None or any(m["id"] == r["id"] for m in manifest):
                    skipped.append({"file": f"{folder}/{Path(r['file']).name}",
                                    "duplicate_of": dup["id"] if dup else r["id"]})
                    continue
                shutil.copyfile(r["file"], cif_out / Path(r["file"]).name)
                seen.append((rec.meta["formula"], abc))
                sg, z_prime = _z_prime(Path(r["file"]), rec.meta["n_cell_molecules"])
                manifest.append({"id": r["id"], "file": f"cifs/{Path(r['file']).name}", "source": folder,
                                 "licence": licence, "formula": rec.meta["formula"], "n_atoms": rec.n_atoms,
                                 "n_cell_molecules": rec.meta["n_cell_molecules"], "space_group": sg,
                                 "z_prime": z_prime, **{k: r[k] for k in FACTS}})
    manifest.sort(key=lambda m: m["id"])
    for folder, s in stats.items():
        mine = [m for m in manifest if m["source"] == folder]
        s["shipped"] = len(mine)
        s["shipped_facts"] = _fact_counts(mine)
    settings = {"allow_mirror": True, "allow_conformers": True, "min_packing": MIN_PACKING,
                "min_contact_ratio": MIN_CONTACT_RATIO}
    (out / "manifest.json").write_text(json.dumps({
        "name": "cod17-mini", "n_clusters": len(manifest), "rebuild": REBUILD,
        "build_settings": settings, "facts": _fact_counts(manifest), "build_stats": stats,
        "duplicates_skipped": skipped, "clusters": manifest}, indent=1) + "\n")
    _write_licences(out, manifest)
    bad = _check_loader(out)
    if bad:
        print(f"error: the loader rejects {len(bad)} shipped file(s), e.g. {bad[:3]}", file=sys.stderr)
        return 1
    if args.raw:
        summary = build_dataset(cif_out, out, workers=args.workers, noise_fn=LooseNoise(), seed=args.seed)
        print(f"raw layout: {summary['accepted']} clusters in {out / 'raw'}")
    print(f"cod17-mini: {len(manifest)} clusters -> {out} ({len(skipped)} duplicates skipped)")
    for folder, s in stats.items():
        print(f"  {folder}: {s['accepted']}/{s['n_files']} accepted, {s['shipped']} shipped, "
              f"rejected: {s['reasons']}; shipped facts: {s['shipped_facts']}")
    return 0


def _z_prime(path: Path, n_cell_molecules: int) -> tuple[str | None, float | None]:
    """Space group and Z' (molecules per cell / symmetry operations of the cell) found by spglib with a
    0.1 A tolerance on the structure as written (the pyxtal_testdb files list their atoms in P1)."""
    from pymatgen.io.cif import CifParser
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = CifParser(str(path), check_cif=False).parse_structures(primitive=False)[0]
            sga = SpacegroupAnalyzer(structure, symprec=0.1)
            return sga.get_space_group_symbol(), n_cell_molecules / len(sga.get_symmetry_operations())
    except Exception:  # noqa: BLE001 - a fact for the manifest only
        return None, None


def _fact_counts(rows: list[dict]) -> dict:
    pc = [m["packing_coefficient"] for m in rows]
    vr = [m["min_vdw_ratio"] for m in rows]
    return {"racemic": sum(m["racemic"] for m in rows),
            "z_prime_above_1": sum((m["z_prime"] or 0) > 1 for m in rows),
            "multiple_conformers": sum(m["n_conformers"] > 1 for m in rows),
            "several_shapes_in_cluster": sum(m["n_cluster_shapes"] > 1 for m in rows),
            "packing_coefficient_min": min(pc, default=None), "packing_coefficient_max": max(pc, default=None),
            "min_vdw_ratio_min": min(vr, default=None)}


def _check_loader(out: Path) -> list:
    """Load the shipped files as training does, without and with ``data.min_packing=0.5``; returns the
    rejections (must be none)."""
    from kflow_mol.dataset import DataSource, load_records, prepare

    src = DataSource(name="cod17-mini", kind="cif", path=out / "cifs")
    bad = []
    for min_packing in (None, 0.5):
        records, rejected = load_records(src, progress=False, min_packing=min_packing)
        bad += [(r["id"], r["reason"], min_packing) for r in rejected]
    for rec in records:
        try:
            prepare(rec)
        except Exception as err:  # noqa: BLE001
            bad.append((rec.id, f"prepare_failed: {type(err).__name__}: {err}", None))
    return bad


def _same(f1, abc1, src1, f2, abc2, src2) -> bool:
    """Same crystal? Same formula and cell lengths within 0.3 A; across source folders (the same compound
    measured at another temperature, e.g. naphthalene.cif vs NAPHTA15) within 10 %. Polymorphs inside one
    folder (BOQQUT / BOQQUT01) are kept."""
    if f1 != f2:
        return False
    if all(abs(x - y) < 0.3 for x, y in zip(abc1, abc2)):
        return True
    return src1 != src2 and all(abs(x - y) < 0.1 * max(x, y) for x, y in zip(abc1, abc2))


def _write_licences(out: Path, manifest: list[dict]) -> None:
    lines = ["# cod17-mini: licences and origin of the shipped CIFs", "",
             "The clusters of `cod17-mini` are built at load time (or by `prepare_cod17_mini.py --raw`) from the",
             "source CIFs in `cifs/`. Each file keeps its original name; its origin and licence are listed below.",
             f"The folder is rebuilt from the project's `shared` folder with `{REBUILD}`;",
             "`manifest.json` holds each file's acceptance facts (racemic, Z', packing coefficient, shortest contact).",
             "", "## Sources", ""]
    for folder, licence, origin in SOURCES:
        n = sum(m["source"] == folder for m in manifest)
        lines.append(f"- **{folder}** ({n} files): {origin}. Licence: {licence}.")
    lines += ["", "COD entries are public domain (CC0 1.0: https://creativecommons.org/publicdomain/zero/1.0/);",
              "please cite the COD (Gražulis et al., Nucleic Acids Res. 2012) and the original publication named",
              "inside each CIF. The pyxtal files are distributed with the `pyxtal` package under the MIT licence",
              "reproduced below; the `pyxtal_testdb` structures were derived by pyxtal from entries of the",
              "Cambridge Structural Database (the file name is the CSD refcode).", "",
              "## Files", "", "| file | source | licence | formula | atoms/molecule |", "|---|---|---|---|---|"]
    for m in manifest:
        lines.append(f"| `{m['file']}` | {m['source']} | {m['licence']} | {m['formula']} | {m['n_atoms']} |")
    lines += ["", "## pyxtal licence", "", "```", PYXTAL_MIT.strip(), "```", ""]
    (out / "LICENSES.md").write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
