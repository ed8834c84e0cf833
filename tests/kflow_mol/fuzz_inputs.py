"""Seeded fuzzing of the CIF and CSV readers (used by ``test_fuzz.py``; also a script that prints the counts).

Each base file (small crafted CIFs of ``tests/kflow_mol/data``, a real COD CIF of ``cod17-mini`` and COD 2001925, a
loose 'P 1' file kept in ``tests/kflow_mol/data`` (CC0) since ``cod17-mini`` rejects it as ``loose_packing``; a
cluster written in the official CSV layout) is mutated by one of a fixed list of mutations, chosen with a seeded
generator. Every mutation says what a correct reader must do: ``accept`` (the file is still valid: unchanged,
a byte-order mark, CRLF line ends), ``reject`` (the file is broken: truncated, a negative cell length, a
coordinate of 1e300, an extra symmetry operator, ...) or ``any`` (a random byte flip may or may not break it).

Counts:
    tried: files given to the reader.
    handled: files reported (accepted, or rejected with a reason code and a message) without an internal error.
    crashed: files with no report, an exception out of the batch, or the ``error`` reason (a bug).
    lost: files that must be accepted but were not (a good file lost).
    wrong_accept: files that must be rejected but were accepted (silently turned into another cluster).
    misdiagnosed: truncated files rejected as ``no_hydrogen`` (the H atoms were in the lost half).

Run as a script: ``python tests/kflow_mol/fuzz_inputs.py [--seed 0] [--n-cif 80] [--n-csv 40]``.
"""
from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[2]
CIF_BASES = [DATA / "ok_methanol_p21c.cif", DATA / "ok_chiral_p21.cif",
             REPO / "datasets" / "cod17-mini" / "cifs" / "2000724.cif",
             DATA / "2001925.cif"]


# --------------------------------------------------------------------------------------------------------
# CIF mutations: name -> (expectation, fn(text, rng) -> bytes)
# --------------------------------------------------------------------------------------------------------
def _sub_tag(text: str, tag: str, value: str) -> str:
    return re.sub(rf"(?m)^(\s*{re.escape(tag)}\s+)\S+", lambda m: m.group(1) + value, text, count=1)


def _atom_rows(lines: list[str]) -> list[int]:
    """Line indices of the rows of the loop holding ``_atom_site_fract_x``."""
    i = next(k for k, ln in enumerate(lines) if ln.strip().startswith("_atom_site_fract_x"))
    while i < len(lines) and lines[i].strip().startswith("_"):
        i += 1
    rows = []
    while i < len(lines) and lines[i].strip() and not lines[i].strip().startswith(("loop_", "_", "#")):
        rows.append(i)
        i += 1
    return rows


def _coord(text: str, rng, value: str) -> str:
    lines = text.splitlines()
    rows = _atom_rows(lines)
    k = rows[int(rng.integers(len(rows)))]
    parts = lines[k].split()
    # the fract_x column is the first numeric-looking field after the label
    j = next(j for j, p in enumerate(parts[1:], 1) if re.match(r"^[-+.\d]", p))
    parts[j + int(rng.integers(3))] = value
    lines[k] = " ".join(parts)
    return "\n".join(lines) + "\n"


def _insert_op(text: str, op: str) -> str:
    lines = text.splitlines()
    # a tag at the start of a line (an indented one sits in a text field, e.g. a COD comment)
    i = next((k for k, ln in enumerate(lines) if ln.startswith(("_symmetry_equiv_pos_as_xyz",
                                                                "_space_group_symop_operation_xyz"))), None)
    if i is None:  # no operator loop (space group by name only): add one with the identity and the extra op
        return text + f"loop_\n_symmetry_equiv_pos_as_xyz\n'x, y, z'\n'{op}'\n"
    j = i + 1
    while j < len(lines) and lines[j].strip().startswith("_"):
        j += 1
    lines.insert(j, f"'{op}'")
    return "\n".join(lines) + "\n"


def _truncate_in_atoms(text: str, rng) -> str:
    lines = text.splitlines(keepends=True)
    rows = _atom_rows([ln.rstrip("\r\n") for ln in lines])
    k = rows[int(rng.integers(len(rows)))]
    cut = int(rng.integers(1, max(2, len(lines[k]) - 1)))
    return "".join(lines[:k]) + lines[k][:cut]


def _truncate_at_row(text: str, rng) -> str:
    """Cut at the end of an atom row, before the H rows when there are any (the file then has no H)."""
    lines = text.splitlines()
    rows = _atom_rows(lines)
    first_h = next((k for k in rows if re.match(r"^\s*(H|D)[^a-z]", lines[k])), None)
    k = first_h - 1 if first_h is not None and first_h > rows[0] else rows[int(rng.integers(len(rows)))]
    return "\n".join(lines[: k + 1])  # no final newline: the cut fell on a line end


def _strip_comments(text: str) -> str:
    lines = text.splitlines()
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        lines.pop(0)
    return "\n".join(lines) + "\n"


CIF_MUTATIONS = {
    "control": ("accept", lambda t, r: t.encode()),
    "bom": ("accept", lambda t, r: b"\xef\xbb\xbf" + t.encode()),
    "bom_before_data": ("accept", lambda t, r: b"\xef\xbb\xbf" + _strip_comments(t).encode()),
    "truncate_at_row": ("reject", lambda t, r: _truncate_at_row(t, r).encode()),
    "missing_cell_length": ("reject", lambda t, r: re.sub(r"(?m)^_cell_length_b.*\n", "", t).encode()),
    "angles_no_cell": ("reject", lambda t, r: _sub_tag(_sub_tag(_sub_tag(t, "_cell_angle_alpha", "120"),
                                                                "_cell_angle_beta", "120"),
                                                       "_cell_angle_gamma", "120").encode()),
    "crlf": ("accept", lambda t, r: t.replace("\n", "\r\n").encode()),
    "truncate_bytes": ("reject", lambda t, r: t.encode()[: int(len(t) * r.uniform(0.3, 0.95))]),
    "truncate_in_atoms": ("reject", lambda t, r: _truncate_in_atoms(t, r).encode()),
    "negative_length": ("reject", lambda t, r: _sub_tag(t, f"_cell_length_{'abc'[int(r.integers(3))]}",
                                                        "-" + str(r.uniform(5, 12))[:6]).encode()),
    "bad_angle": ("reject", lambda t, r: _sub_tag(t, f"_cell_angle_{['alpha', 'beta', 'gamma'][int(r.integers(3))]}",
                                                  str(r.choice([-90, 0, 180, 270]))).encode()),
    "huge_length": ("reject", lambda t, r: _sub_tag(t, "_cell_length_c", str(r.choice(["1e6", "1e5", "1e300"])))
                    .encode()),
    "coordinate_huge": ("reject", lambda t, r: _coord(t, r, str(r.choice(["1e300", "123456789", "-4e7"]))).encode()),
    "coordinate_nonfinite": ("reject", lambda t, r: _coord(t, r, str(r.choice(["nan", "inf"]))).encode()),
    "extra_translation_op": ("reject", lambda t, r: _insert_op(t, str(r.choice(["x+1/2, y, z", "x, y+1/3, z"])))
                             .encode()),
    "non_isometry_op": ("reject", lambda t, r: _insert_op(t, str(r.choice(["2*x, y, z", "x, y, z+y", "x+y, y, z"])))
                        .encode()),
    "delete_line": ("any", lambda t, r: _delete_line(t, r).encode()),
    "duplicate_line": ("any", lambda t, r: _duplicate_line(t, r).encode()),
    "byte_flip": ("any", lambda t, r: _byte_flip(t.encode(), r)),
    "digit_change": ("any", lambda t, r: _digit_change(t, r).encode()),
    "latin1_comment": ("accept", lambda t, r: b"# caf\xe9 \xff\n" + t.encode()),
    "binary": ("reject", lambda t, r: bytes(r.integers(0, 256, size=int(r.integers(1, 2000))).astype(np.uint8))),
    "empty": ("reject", lambda t, r: b""),
}


def _delete_line(t, r):
    lines = t.splitlines()
    del lines[int(r.integers(len(lines)))]
    return "\n".join(lines) + "\n"


def _duplicate_line(t, r):
    lines = t.splitlines()
    k = int(r.integers(len(lines)))
    lines.insert(k, lines[k])
    return "\n".join(lines) + "\n"


def _byte_flip(b: bytes, r) -> bytes:
    b = bytearray(b)
    for _ in range(int(r.integers(1, 4))):
        b[int(r.integers(len(b)))] = int(r.integers(0, 256))
    return bytes(b)


def _digit_change(t, r):
    idx = [m.start() for m in re.finditer(r"\d", t)]
    k = idx[int(r.integers(len(idx)))]
    return t[:k] + str(int(r.integers(10))) + t[k + 1:]


# --------------------------------------------------------------------------------------------------------
# CSV mutations (applied to the FinalPositions or the InitialPositions file)
# --------------------------------------------------------------------------------------------------------
def _csv_line(t, r, fn):
    lines = t.splitlines()
    k = int(r.integers(1, len(lines)))
    parts = lines[k].split(",")
    lines[k] = ",".join(fn(parts, r))
    return "\n".join(lines) + "\n"


CSV_MUTATIONS = {
    "control": ("accept", lambda t, r: t.encode()),
    "bom": ("accept", lambda t, r: b"\xef\xbb\xbf" + t.encode()),
    "crlf": ("accept", lambda t, r: t.replace("\n", "\r\n").encode()),
    "truncate_bytes": ("reject", lambda t, r: t.encode()[: int(len(t) * r.uniform(0.2, 0.95))]),
    "coordinate_huge": ("reject", lambda t, r: _csv_line(t, r, lambda p, r: p[:2] + ["1e300"] + p[3:]).encode()),
    "coordinate_nonfinite": ("reject", lambda t, r: _csv_line(t, r, lambda p, r: p[:3] + ["nan"] + p[4:]).encode()),
    "metal": ("reject", lambda t, r: t.replace(",C,", ",Na,").encode()),
    # the same change in both files: a consistent cluster that the CIF rules reject
    "metal_both": ("reject", lambda t, r: t.replace(",C,", ",Na,").encode()),
    "no_hydrogen_both": ("reject", lambda t, r: t.replace(",H,", ",F,").encode()),
    "single_atom_both": ("reject", lambda t, r: "\n".join(t.splitlines()[:1] + t.splitlines()[1::6]).encode()
                         + b"\n"),
    "unknown_element": ("reject", lambda t, r: _csv_line(t, r, lambda p, r: p[:1] + ["Xx"] + p[2:]).encode()),
    "delete_line": ("reject", lambda t, r: _delete_line_csv(t, r).encode()),
    "duplicate_line": ("reject", lambda t, r: _duplicate_line_csv(t, r).encode()),
    "mol_idx": ("reject", lambda t, r: _csv_line(t, r, lambda p, r: ["99"] + p[1:]).encode()),
    "byte_flip": ("any", lambda t, r: _byte_flip(t.encode(), r)),
    "latin1": ("reject", lambda t, r: t.encode() + b"0,C,1.0,2.0,3.0 \xe9\n"),
    "binary": ("reject", lambda t, r: bytes(r.integers(0, 256, size=int(r.integers(1, 2000))).astype(np.uint8))),
    "empty": ("reject", lambda t, r: b""),
}


def _delete_line_csv(t, r):
    lines = t.splitlines()
    del lines[int(r.integers(1, len(lines)))]
    return "\n".join(lines) + "\n"


def _duplicate_line_csv(t, r):
    lines = t.splitlines()
    k = int(r.integers(1, len(lines)))
    lines.insert(k, lines[k])
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------------
def _counts(items: list[dict]) -> dict:
    c = {"tried": len(items), "handled": 0, "crashed": 0, "lost": 0, "wrong_accept": 0, "misdiagnosed": 0,
         "no_reason": 0}
    for it in items:
        row = it.get("row")
        if row is None or row.get("reason") == "error":
            c["crashed"] += 1
            continue
        if row["status"] == "rejected" and not (row.get("reason") and row.get("message")):
            c["no_reason"] += 1
            continue
        c["handled"] += 1
        if it["expect"] == "accept" and row["status"] != "accepted":
            c["lost"] += 1
        if it["expect"] == "reject" and row["status"] == "accepted":
            c["wrong_accept"] += 1
        if it["mutation"].startswith("truncate") and row.get("reason") == "no_hydrogen":
            c["misdiagnosed"] += 1
    return c


def fuzz_cifs(work: Path, seed: int = 0, n: int = 80, **build_kw) -> tuple[dict, list[dict]]:
    """Mutate ``n`` CIFs into ``work/cifs`` and run ``build_dataset`` on them (one process by default)."""
    from kflow_mol.build import build_dataset

    rng = np.random.default_rng(seed)
    src = work / "cifs"
    src.mkdir(parents=True, exist_ok=True)
    texts = [p.read_text() for p in CIF_BASES]
    names = list(CIF_MUTATIONS)
    items = []
    for i in range(n):
        # every mutation appears at least once, on every base in turn; the rest drawn at random
        mut = names[i] if i < len(names) else names[int(rng.integers(len(names)))]
        b = i % len(texts)
        expect, fn = CIF_MUTATIONS[mut]
        try:
            data = fn(texts[b], rng)
        except (StopIteration, ValueError):  # the mutation does not apply to this base: use it unchanged
            mut, expect, data = "control", "accept", texts[b].encode()
        name = f"f{i:03d}_{mut}_{CIF_BASES[b].stem}"
        (src / f"{name}.cif").write_bytes(data)
        items.append({"id": name, "mutation": mut, "expect": expect})
    # the toy bases are not close-packed (packing ~0.2, 2001925 lacks its symmetry copies): no packing threshold
    kw = {"workers": 1, "progress": False, "timeout": 20.0, "min_packing": None, **build_kw}
    try:
        build_dataset(src, work / "out", **kw)
        rows = {json.loads(line)["id"]: json.loads(line)
                for line in (work / "out" / "report.jsonl").read_text().splitlines()}
    except Exception as err:  # noqa: BLE001 - counted as crashes of every file
        print(f"build_dataset raised {type(err).__name__}: {err}", file=sys.stderr)
        rows = {}
    for it in items:
        it["row"] = rows.get(it["id"])
    return _counts(items), items


def fuzz_csvs(work: Path, seed: int = 0, n: int = 40) -> tuple[dict, list[dict]]:
    """Mutate ``n`` official-layout clusters under ``work/csv`` and read them with ``load_records``."""
    from kflow_mol.cif import cluster_from_cif
    from kflow_mol.dataset import DataSource, load_records
    from kflow_mol.io import FINAL_SUFFIX, INITIAL_SUFFIX, format_csv, raw_paths

    rng = np.random.default_rng(seed + 1)
    root = work / "csv"
    rec = cluster_from_cif(CIF_BASES[0])
    initial = rec.final + np.random.default_rng(0).normal(size=(17, 1, 3)) * 3.0
    texts = {"final": format_csv(rec.species, rec.final), "initial": format_csv(rec.species, initial)}
    names = list(CSV_MUTATIONS)
    items = []
    for i in range(n):
        mut = names[i] if i < len(names) else names[int(rng.integers(len(names)))]
        which = "final" if i % 2 == 0 else "initial"
        expect, fn = CSV_MUTATIONS[mut]
        cid = f"f{i:03d}_{mut}_{which}"
        fpath, ipath = raw_paths(root, cid)
        fpath.parent.mkdir(parents=True, exist_ok=True)
        ipath.parent.mkdir(parents=True, exist_ok=True)
        data = {k: v.encode() for k, v in texts.items()}
        if mut.endswith("_both"):
            data = {k: fn(v, np.random.default_rng(i)) for k, v in texts.items()}
        else:
            data[which] = fn(texts[which], rng)
        fpath.write_bytes(data["final"])
        ipath.write_bytes(data["initial"])
        items.append({"id": cid, "mutation": mut, "expect": expect})
    assert fpath.name.endswith(FINAL_SUFFIX) and ipath.name.endswith(INITIAL_SUFFIX)
    try:
        records, rejected = load_records(DataSource("fuzz", "raw", root), progress=False)
    except Exception as err:  # noqa: BLE001
        print(f"load_records raised {type(err).__name__}: {err}", file=sys.stderr)
        records, rejected = [], []
    rows = {r.id: {"status": "accepted", "reason": None, "message": None} for r in records}
    rows.update({r["id"]: {"status": "rejected", **r} for r in rejected})
    for it in items:
        it["row"] = rows.get(it["id"])
    return _counts(items), items


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-cif", type=int, default=80)
    ap.add_argument("--n-csv", type=int, default=40)
    ap.add_argument("--details", action="store_true", help="print every file's mutation and report")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        cif_counts, cif_items = fuzz_cifs(Path(d), args.seed, args.n_cif)
        csv_counts, csv_items = fuzz_csvs(Path(d), args.seed, args.n_csv)
    if args.details:
        for it in cif_items + csv_items:
            row = it["row"] or {}
            print(f"{it['id']:48s} expect={it['expect']:6s} -> {row.get('status')} {row.get('reason')}: "
                  f"{str(row.get('message'))[-150:]}")
    print(json.dumps({"cif": cif_counts, "csv": csv_counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
