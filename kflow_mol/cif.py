"""CIF -> 17-molecule cluster (COD-Cluster17 style), with explicit rejection reasons.

Pipeline (all deterministic, vectorised over atom pairs):

1. Parse with pymatgen's ``CifParser`` (errors -> ``unparsable``). Reject disorder: any
   ``_atom_site_occupancy`` < 1, two or more alternative ``_atom_site_disorder_group`` values (or a negative,
   symmetry-generated one), a disordered pymatgen structure, or two atoms closer than 0.5 A after symmetry
   expansion (``disorder``). A file that keeps a single disorder group at full occupancy (the alternative
   was removed) is an ordered model and is accepted. Elements are checked first (from
   ``_atom_site_type_symbol`` when present, before the possibly expensive symmetry expansion).
2. Elements: only :data:`ORGANIC_ELEMENTS` (H, B, C, N, O, F, Si, P, S, Cl, Se, Br, I); metals ->
   ``metal``, anything else -> ``element``; no H at all -> ``no_hydrogen``.
3. Bonds by the one bond rule of :mod:`kflow_mol.molecule` (``d < r_i + r_j + 0.4 A``, Cordero radii) across
   periodic images (pymatgen's C neighbour list). Molecules are the connected components; each is unwrapped by a breadth-first walk
   that carries the lattice image of every atom. An edge whose image disagrees with the walk means the
   component is bonded to its own periodic image -> ``polymeric``.
4. All molecules in the cell must have the same composition (else ``multiple_components``), at most
   ``max_atoms`` atoms (``too_many_atoms``) and must not be a single atom or linear (rank of the centred
   coordinates < 2: ``flat_molecule``). Planar molecules (acenes) are accepted: our rigid frames come from
   Kabsch fits, not from the inertia tensor, so they need no third axis (``meta["planar"]`` flags them).
5. The central molecule is the one whose centroid (wrapped into the cell) is closest to the cell centre;
   it is the template and defines the atom order. Every other molecule of the cell is matched to it by a
   *proper* rigid motion: two anchor atoms with the rarest (element, distance-to-centroid) signature give
   candidate rotations, a species-constrained assignment gives the atom correspondence, and Kabsch gives
   the fit. A copy that only fits the template's mirror image is the other enantiomer of a chiral molecule
   (``racemic``: stored as the exact mirror image); one that fits neither is a different conformer of the same
   molecule (``multiple_conformers``; Z' > 1): its atom order is made the template's by bond-graph matching
   (the isomorphism with the best rigid fit) and it becomes a further reference shape that later copies are
   matched to. Both are *facts* in ``meta`` (``racemic``, ``n_conformers``, ``n_mirror_copies``), not
   rejections, unless ``allow_mirror`` / ``allow_conformers`` is off. A copy whose bond graph differs from the
   template's is a different molecule (``multiple_components``). For an achiral molecule, the mirror image *is*
   a proper motion with relabelled atoms, which the assignment finds. Accepted copies are idealised to the
   exact rigid image of their reference (the residual before idealisation, below ``rmsd_tol`` = 0.15 A, is
   kept in ``meta["fit_rmsd_max"]``).
6. Whole molecules are translated by lattice vectors over a range large enough to contain the sphere
   through the 16th neighbour; the 16 nearest centroids to the central one (ties broken by molecule index,
   then lattice translation) complete the cluster. Molecule 0 is the central one; the rest are sorted by
   distance. Positions stay in the crystal's Cartesian frame (Angstrom).
7. Packing sanity: the packing coefficient ``sum of the cell molecules' van der Waals volumes / cell volume``
   (Bondi radii, grid-integrated union of spheres; Kitaigorodskii: 0.65-0.80 for organic crystals) and the
   shortest intermolecular contact of the cluster, absolute and as a fraction of the vdW sum, go in ``meta``.
   With thresholds (the dataset builder's defaults :data:`MIN_PACKING`, :data:`MIN_CONTACT_RATIO`), a cell far
   too loose to be a close-packed crystal (``packing_coefficient < min_packing``: ``loose_packing``) or a
   physically impossible contact (``min_vdw_ratio < min_contact_ratio``: ``impossible_contact``) is rejected.
"""
from __future__ import annotations

import re
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from ase.data import atomic_numbers, chemical_symbols
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order, connected_components
from scipy.spatial.distance import cdist

from .data import MAX_COORDINATE, N_MOLECULES, OVERLAP_DISTANCE, BuildError, ClusterRecord
from .frames import frame_from_vectors
from .limits import CifLimits
from .molecule import BOND_TOLERANCE, assign, bond_cutoff, bond_graph, components, hill_formula, vdw_radii
from .so3 import kabsch_np

#: Elements accepted in a molecule (organic set). Metals and noble gases, As, Te, etc. are rejected.
ORGANIC_ELEMENTS = frozenset({"H", "B", "C", "N", "O", "F", "Si", "P", "S", "Cl", "Se", "Br", "I"})

# A: a copy must be a rigid image of the template within this RMSD. 0.15 A accepts near-achiral molecules
# whose crystal conformation is very slightly chiral (e.g. a pyramidal NH2 on a planar ring: 0.07-0.1 A)
# and Z' = 2 copies of rigid molecules (0.05 A); real conformer differences are >> 0.2 A.
RMSD_TOL = 0.15
# Packing sanity defaults. Organic crystals pack at 0.65-0.80 (Kitaigorodskii); half that is no close-packed
# crystal (e.g. one anthracene in a 970 A^3 P1 cell: 0.17). Real contacts reach ~0.6 of the vdW sum (short
# hydrogen bonds); below half of it atoms overlap.
MIN_PACKING = 0.5
MIN_CONTACT_RATIO = 0.5
# bond-graph isomorphisms tried per conformer (methyl rotors give 3^k of them; any one orders the atoms
# consistently, more only improve the fit) and the time allowed for them
GRAPH_MATCH_CAP, GRAPH_MATCH_SECONDS = 500, 3.0


# --------------------------------------------------------------------------------------------------------
# parsing and chemistry checks
# --------------------------------------------------------------------------------------------------------
def _num(s) -> float:
    """CIF number with optional standard uncertainty, e.g. ``'0.53(2)'`` -> 0.53; '?'/'.' -> nan."""
    s = str(s).strip()
    if s in ("?", "."):
        return float("nan")
    return float(s.split("(")[0])


MIN_CELL_LENGTH = 1.0  # Å: no molecular crystal has a shorter cell edge; smaller values are corrupt numbers
MAX_FRACTIONAL = 10.0  # fractional coordinates are fractions of the cell (COD uses -1..2); 1e8 is a corrupt number

# one CIF 1.1 token: a quoted string (a quote inside it is allowed when not followed by a blank) or a bare word
_TOKEN = re.compile(r"""'(?:[^']|'(?=\S))*'(?=\s|$)|"(?:[^"]|"(?=\S))*"(?=\s|$)|\S+""")


def _check_text(path, text: str) -> None:
    """Reject a truncated file or a broken loop from the raw text (pymatgen would misread or crash on it).

    A file is ``truncated`` when it ends inside a ``;`` text field, inside a quoted string, after a tag without
    its value, with an incomplete last loop row, or without a final newline inside the atom-site loop (a file cut
    mid-line; its last atoms are lost). A loop elsewhere whose values do not fill its rows is ``unparsable``
    (with its line). A file cut exactly at the end of a line of the atom list cannot be told from a complete one.
    """
    if not text.strip():
        raise BuildError(path, "unparsable", "the file is empty")
    lines = text.splitlines()
    state, cols, nval, loop_line = None, [], 0, 0  # state: None | "header" | "body"
    pending = None  # (tag, line) of a tag still waiting for its value
    field_line = 0  # line where an open ;-text field started (0: none)

    def close_loop():
        nonlocal state
        if state in ("header", "body"):
            rest = nval % max(len(cols), 1)
            if state == "header" or rest:
                return f"the loop of {cols[0]} (line {loop_line}) has {nval} values for {len(cols)} columns"
        state = None
        return None

    def value():
        nonlocal state, nval, pending
        if state == "header":
            state = "body"
        if state == "body":
            nval += 1
        pending = None

    for ln, line in enumerate(lines, 1):
        if field_line:
            if line.startswith(";"):
                field_line = 0
                value()
            continue
        if line.startswith(";"):
            field_line = ln
            continue
        for tok in _TOKEN.findall(line):
            if tok.startswith("#"):
                break
            if tok[0] in "'\"" and not (len(tok) > 1 and tok[-1] == tok[0]):
                what = f"an unterminated quoted string on line {ln} ({tok[:30]!r})"
                if ln == len(lines):
                    raise BuildError(path, "truncated", f"the file ends with {what}")
                raise BuildError(path, "unparsable", what)
            low = tok.lower()
            if low == "loop_" or low.startswith(("data_", "global_", "save_")) or tok.startswith("_"):
                if pending is not None and not (tok.startswith("_") and state == "header"):
                    raise BuildError(path, "unparsable", f"tag {pending[0]} (line {pending[1]}) has no value")
                if state == "body" or (state == "header" and not tok.startswith("_")):
                    err = close_loop()
                    if err:
                        raise BuildError(path, "unparsable", err)
                    state = None
                if low == "loop_":
                    state, cols, nval, loop_line = "header", [], 0, ln
                elif tok.startswith("_") and state == "header":
                    cols.append(tok)
                elif tok.startswith("_"):
                    pending = (tok, ln)
            else:
                value()
    if field_line:
        raise BuildError(path, "truncated", f"the text field opened by ';' on line {field_line} is never closed")
    if pending is not None:
        raise BuildError(path, "truncated", f"the file ends after tag {pending[0]} without its value")
    in_loop = state == "body"
    err = close_loop()
    if err:
        raise BuildError(path, "truncated", f"{err}: the last row is incomplete")
    # a cut on a value boundary inside the atom list (the atoms after it lost) leaves only the missing final
    # newline as a trace; a complete file that merely lacks one at the end of another loop (COD 8102326) is fine
    atoms = any(c.lower().startswith("_atom_site_") and not c.lower().startswith("_atom_site_aniso") for c in cols)
    if in_loop and atoms and not text.endswith(("\n", "\r")):
        raise BuildError(path, "truncated", f"the file ends mid-line inside the loop of {cols[0]} (line "
                         f"{loop_line}) without a final newline; if the file is complete, end it with a newline")


def _cell_matrix(a, b, c, al, be, ga) -> np.ndarray:
    """Rows are the lattice vectors (a along x, b in the xy plane), from lengths (Å) and angles (degrees)."""
    ca, cb, cg = np.cos(np.radians([al, be, ga]))
    sg = np.sin(np.radians(ga))
    cx = cb
    cy = (ca - cb * cg) / sg
    cz = np.sqrt(max(1.0 - cx**2 - cy**2, 0.0))
    return np.array([[a, 0, 0], [b * cg, b * sg, 0], [c * cx, c * cy, c * cz]])


def _first(v):
    return v[0] if isinstance(v, list) else v


def _check_block(path, parser, block, limits: CifLimits) -> None:
    """Cell, coordinates, symmetry operators and sizes of a data block, checked before any expansion.

    Raises:
        BuildError: ``bad_cell`` (missing/non-positive lengths, angles outside (0, 180) or not forming a cell),
            ``bad_coordinates`` (non-numbers, non-finite or absurd values), ``bad_symmetry`` (an operator that is
            not an isometry of the cell, or operators that do not form a group), ``too_large`` (a limit of
            :class:`CifLimits`).
    """
    d = block.data
    cell = []
    for tag in ("_cell_length_a", "_cell_length_b", "_cell_length_c",
                "_cell_angle_alpha", "_cell_angle_beta", "_cell_angle_gamma"):
        raw = d.get(tag)
        if raw is None:
            raise BuildError(path, "bad_cell", f"{tag} is missing")
        try:
            x = _num(_first(raw))
        except ValueError:
            raise BuildError(path, "bad_cell", f"{tag} = {_first(raw)!r} is not a number") from None
        if not np.isfinite(x):
            raise BuildError(path, "bad_cell", f"{tag} = {_first(raw)!r} is not a finite number")
        if "length" in tag:
            if x < MIN_CELL_LENGTH:
                raise BuildError(path, "bad_cell", f"{tag} = {x:g} Å: cell lengths must be >= {MIN_CELL_LENGTH:g} Å")
            if x > limits.max_cell_length:
                raise BuildError(path, "too_large", f"{tag} = {x:g} Å > max_cell_length {limits.max_cell_length:g} Å")
        elif not 0.0 < x < 180.0:
            raise BuildError(path, "bad_cell", f"{tag} = {x:g}°: cell angles must lie strictly between 0 and 180°")
        cell.append(x)
    ca, cb, cg = np.cos(np.radians(cell[3:]))
    r = 1 - ca**2 - cb**2 - cg**2 + 2 * ca * cb * cg
    if r <= 1e-6:  # each angle must be smaller than the sum of the other two, and their sum < 360
        raise BuildError(path, "bad_cell", f"the angles {cell[3]:g}, {cell[4]:g}, {cell[5]:g}° do not form a cell "
                         "(zero or imaginary volume)")
    volume = cell[0] * cell[1] * cell[2] * np.sqrt(r)
    if volume > limits.max_cell_volume:
        raise BuildError(path, "too_large", f"cell volume {volume:.4g} Å^3 > max_cell_volume "
                         f"{limits.max_cell_volume:g} Å^3")

    labels = d.get("_atom_site_label")
    frac = all(f"_atom_site_fract_{k}" in d for k in "xyz")
    cols = [d.get(f"_atom_site_{'fract' if frac else 'Cartn'}_{k}") for k in "xyz"]
    if any(c is None for c in cols):
        raise BuildError(path, "bad_coordinates", "the atom sites lack fract_x/y/z (or Cartn_x/y/z) coordinates")
    cols = [c if isinstance(c, list) else [c] for c in cols]
    n_sites = len(cols[0])
    bound = MAX_FRACTIONAL if frac else MAX_COORDINATE
    for k, col in zip("xyz", cols):
        for i, v in enumerate(col):
            name = labels[i] if isinstance(labels, list) and i < len(labels) else f"#{i + 1}"
            try:
                x = _num(v)
            except ValueError:
                raise BuildError(path, "bad_coordinates", f"atom {name}: {k} = {v!r} is not a number") from None
            if not np.isfinite(x):
                raise BuildError(path, "bad_coordinates", f"atom {name}: {k} = {v!r} is not a finite number")
            if abs(x) > bound:
                raise BuildError(path, "bad_coordinates", f"atom {name}: {k} = {x:.4g} is absurd (|{k}| <= {bound:g} "
                                 f"{'for a fractional coordinate' if frac else 'Å'})")

    ops = None
    for tag in ("_symmetry_equiv_pos_as_xyz", "_space_group_symop_operation_xyz",
                "_symmetry_equiv_pos_as_xyz_", "_space_group_symop_operation_xyz_"):
        if d.get(tag):  # read strictly: pymatgen reads '2*x' as 'x+2' and drops a list it cannot read
            ops = [_parse_xyz(path, str(x), tag) for x in (d[tag] if isinstance(d[tag], list) else [d[tag]])]
            _check_centring(path, d, ops)
            break
    if ops is None:  # operators from the space-group symbol (pymatgen's tables)
        try:
            ops = [(np.asarray(o.rotation_matrix), np.asarray(o.translation_vector), o.as_xyz_str())
                   for o in parser.get_symops(block)]
        except Exception:  # noqa: BLE001 - pymatgen reports an unusable space group itself when it expands
            return
    if len(ops) > limits.max_symops:
        raise BuildError(path, "too_large", f"{len(ops)} symmetry operators > max_symops {limits.max_symops}")
    if n_sites * max(len(ops), 1) > limits.max_cell_atoms:
        raise BuildError(path, "too_large", f"{n_sites} sites x {len(ops)} operators = up to "
                         f"{n_sites * len(ops)} atoms in the cell > max_cell_atoms {limits.max_cell_atoms}")
    _check_symops(path, ops, _cell_matrix(*cell))


_CENTRING = {"P": 1, "A": 2, "B": 2, "C": 2, "I": 2, "F": 4}  # lattice points per cell of each centring letter


def _check_centring(path, d: dict, ops) -> None:
    """The pure translations in an explicit operator list must match the centring letter of the space-group
    symbol (an added ``x+1/2, y, z`` turns a primitive crystal into another one)."""
    sym = None
    for tag in ("_symmetry_space_group_name_H-M", "_space_group_name_H-M_alt"):
        if d.get(tag):
            sym = str(_first(d[tag])).strip().strip("'\"").strip()
            break
    if not sym or sym[0].upper() not in _CENTRING:
        return
    shifts = []
    for W, t, _ in ops:
        if np.array_equal(W, np.eye(3)):
            t = t % 1.0
            if not any(np.all(np.abs((t - u + 0.5) % 1.0 - 0.5) < 1e-3) for u in shifts):
                shifts.append(t)
    want = _CENTRING[sym[0].upper()]
    if len(shifts) != want:
        raise BuildError(path, "bad_symmetry", f"the operator list has {len(shifts)} pure translation(s) "
                         f"(x+t, y+t, z+t) but space group '{sym}' has {want} lattice point(s) per cell")


_XYZ_TERM = re.compile(r"\s*([+-]?)\s*(\d+\.?\d*(?:/\d+)?|\.\d+)?\s*(\*?)\s*([xyz]?)\s*", re.IGNORECASE)


def _parse_xyz(path, text: str, tag: str) -> tuple[np.ndarray, np.ndarray, str]:
    """``'-x+1/2, y, z'`` -> ``(W (3, 3), t (3,), text)`` with ``x' = W x + t`` (fractional), read strictly."""
    s = text.strip().strip("'\"")
    parts = s.split(",")
    if len(parts) != 3:
        raise BuildError(path, "bad_symmetry", f"operator {text[:40]!r} ({tag}) does not have 3 components")
    W, t = np.zeros((3, 3)), np.zeros(3)
    for i, part in enumerate(parts):
        pos, terms = 0, 0
        part = part.strip()
        while pos < len(part):
            m = _XYZ_TERM.match(part, pos)
            sign, num, star, var = m.groups() if m else (None,) * 4
            if not m or m.end() == pos or not (num or var) or (star and not (num and var)) \
                    or (terms and not sign):
                raise BuildError(path, "bad_symmetry", f"operator {text[:40]!r} ({tag}) cannot be read")
            try:
                val = float(_fraction(num)) if num else 1.0
            except (ValueError, ZeroDivisionError):
                raise BuildError(path, "bad_symmetry", f"operator {text[:40]!r} ({tag}) cannot be read") from None
            val = -val if sign == "-" else val
            if var:
                W[i, "xyz".index(var.lower())] += val
            else:
                t[i] += val
            pos, terms = m.end(), terms + 1
        if not terms:
            raise BuildError(path, "bad_symmetry", f"operator {text[:40]!r} ({tag}) has an empty component")
    return W, t, s


def _fraction(num: str) -> float:
    """``'1/2'`` -> 0.5, ``'0.25'`` -> 0.25."""
    a, _, b = num.partition("/")
    return float(a) / float(b) if b else float(a)


def _check_symops(path, ops, lattice: np.ndarray, tol: float = 1e-3) -> None:
    """Every operator ``(W, t, text)`` must be an isometry of the cell (integer rotation part ``W`` with
    ``W^T G W = G`` for the metric ``G``) and together they must form a group modulo lattice translations (so an
    extra ``x+1/2,y,z`` or a mistyped operator is caught before it builds a different crystal)."""
    G = lattice @ lattice.T
    Ws, ts = [], []
    for W, t, xyz in ops:
        W, t = np.asarray(W, dtype=float), np.asarray(t, dtype=float)
        if not (np.all(np.isfinite(W)) and np.all(np.isfinite(t))):
            raise BuildError(path, "bad_symmetry", f"operator '{xyz}' has non-finite entries")
        Wi = np.rint(W)
        if np.abs(W - Wi).max() > 1e-6 or abs(abs(np.linalg.det(Wi)) - 1) > 1e-6 or \
                np.abs(Wi.T @ G @ Wi - G).max() > 1e-2 * np.abs(G).max():
            raise BuildError(path, "bad_symmetry", f"operator '{xyz}' is not an isometry of the cell (it changes "
                             "lengths or angles; a mistyped operator, or a space group that does not fit the cell)")
        Ws.append(Wi)
        ts.append(t % 1.0)
    # closure: W_a W_b must be one of the rotation parts, with W_a t_b + t_a = its translation mod 1; a dict on
    # the integer rotation part keeps this O(n^2) (192 operators: 37k products) instead of O(n^3)
    by_w: dict[bytes, list[np.ndarray]] = {}
    for W, t in zip(Ws, ts):
        by_w.setdefault(W.astype(np.int8).tobytes(), []).append(t)
    by_w = {k: np.stack(v) for k, v in by_w.items()}
    W, t = np.stack(Ws), np.stack(ts)
    for a in range(len(Ws)):
        W2 = np.rint(np.einsum("ij,bjk->bik", W[a], W)).astype(np.int8)  # W_a W_b for every b
        t2 = t @ W[a].T + t[a]
        for b in range(len(Ws)):
            cand = by_w.get(W2[b].tobytes())
            ok = False
            if cand is not None:
                dt = cand - t2[b]
                ok = bool(np.any(np.all(np.abs(dt - np.rint(dt)) < 10 * tol, axis=1)))
            if not ok:
                raise BuildError(path, "bad_symmetry", f"the {len(Ws)} symmetry operators do not form a group: "
                                 f"'{ops[b][2]}' followed by '{ops[a][2]}' is not in the list (an extra, missing or "
                                 "mistyped operator)")


def _raw_disorder(block_data: dict) -> str | None:
    """Disorder visible in the CIF text itself (before pymatgen merges or drops anything)."""
    occ = block_data.get("_atom_site_occupancy")
    if occ is not None:
        vals = []
        for o in occ:
            try:
                vals.append(_num(o))
            except ValueError:
                continue
        vals = np.asarray(vals, dtype=float)
        bad = vals[np.isfinite(vals) & (vals < 0.99)]
        if bad.size:
            return f"{bad.size} site(s) with partial occupancy (min {bad.min():.3g})"
    grp = block_data.get("_atom_site_disorder_group")
    if grp is not None:
        groups = sorted({str(g).strip() for g in grp} - {".", "?", "0", ""})
        # several alternative groups (1 and 2 ...) or a symmetry-generated one (negative) coexist in the file;
        # a single remaining group at full occupancy is an ordered model whose alternative was removed
        if len(groups) > 1 or any(g.startswith("-") for g in groups):
            n = sum(str(g).strip() in groups for g in grp)
            return f"{n} atom(s) in alternative disorder groups {groups[:4]}"
    return None


def _raw_elements(block_data: dict) -> list[str] | None:
    """Element symbols from ``_atom_site_type_symbol`` (e.g. ``'Fe2+'`` -> ``'Fe'``), or None if absent.

    Lets us reject metal complexes before pymatgen expands (possibly huge, disordered) cells.
    """
    col = block_data.get("_atom_site_type_symbol")
    if col is None:
        return None
    out = set()
    for t in col:
        m = re.match(r"([A-Z][a-z]?)", str(t).strip())
        if m is None:
            return None
        sym = m.group(1)
        if sym not in atomic_numbers:
            sym = sym[0]
        if sym not in atomic_numbers:
            return None
        out.add("H" if sym == "D" else sym)
    return sorted(out)


def _parse(path: Path, allowed_elements=None, limits: CifLimits | None = None):
    """Parse the first structure of a CIF, after the text and cell checks (:func:`_check_text`,
    :func:`_check_block`) that keep a broken or oversized file from being expanded.

    Returns:
        ``(structure, warnings, disorder)``: pymatgen Structure (possibly disordered), the parser's warning
        messages, and a description of the disorder visible in the CIF text (or None).

    Raises:
        BuildError: ``unparsable`` (or ``disorder`` when a disordered file also fails to parse), ``truncated``,
            ``bad_cell``, ``bad_coordinates``, ``bad_symmetry``, ``too_large``.
    """
    from pymatgen.io.cif import CifParser  # lazy: pymatgen takes seconds to import

    limits = limits or CifLimits()
    try:
        size = path.stat().st_size
        if size > limits.max_file_mb * 2**20:
            raise BuildError(path, "too_large", f"the file has {size / 2**20:.1f} MB > {limits.max_file_mb:g} MB "
                             "(max_file_mb)")
        # a UTF-8 byte-order mark (some Windows editors write one) is not part of the CIF
        text = path.read_bytes().decode("utf-8", errors="replace").removeprefix("\ufeff")
    except OSError as e:
        raise BuildError(path, "unparsable", f"cannot read file: {e}") from None
    _check_text(path, text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parser = CifParser.from_str(text, check_cif=False)
        except Exception as e:  # noqa: BLE001 - pymatgen raises many types on malformed text
            raise BuildError(path, "unparsable", f"{type(e).__name__}: {str(e)[:200]}") from None
        blocks = [b for b in parser._cif.data.values()
                  if "_atom_site_fract_x" in b.data or "_atom_site_Cartn_x" in b.data]
        if not blocks:
            raise BuildError(path, "unparsable", "no atom sites (_atom_site_fract_x) in any data block")
        disorder = _raw_disorder(blocks[0].data)
        raw_el = _raw_elements(blocks[0].data) if allowed_elements is not None else None
        if raw_el is not None and set(raw_el) - set(allowed_elements):
            _check_elements(path, raw_el, allowed_elements)
        _check_block(path, parser, blocks[0], limits)  # cell, coordinates, operators, sizes: before expanding
        try:
            structures = parser.parse_structures(primitive=False, on_error="raise")
        except Exception as e:  # noqa: BLE001
            if disorder:
                raise BuildError(path, "disorder", disorder) from None
            detail = f"{type(e).__name__}: {str(e)[:160]}"
            extra = [str(w.message).replace("\n", " ")[:160] for w in caught
                     if "exceeded tolerance" in str(w.message) or "sum to > 1" in str(w.message)]
            if extra:  # the usual cause: atoms that coincide after applying the symmetry operations
                detail += f" ({extra[0]}; atoms coincide after symmetry expansion)"
            raise BuildError(path, "unparsable", detail) from None
    if not structures or len(structures[0]) == 0:
        raise BuildError(path, "unparsable", "no structure could be built from the file")
    msgs = sorted({str(w.message)[:160] for w in caught})
    return structures[0], msgs, disorder


def _check_elements(path, symbols: list[str], allowed) -> None:
    bad = sorted(set(symbols) - set(allowed))
    if bad:
        from pymatgen.core.periodic_table import Element  # lazy: only to name metals

        metals = []
        for s in bad:
            try:
                if Element(s).is_metal:
                    metals.append(s)
            except ValueError:
                pass
        ok = ", ".join(sorted(allowed, key=lambda s: atomic_numbers[s]))
        if metals:
            raise BuildError(path, "metal", f"contains {', '.join(metals)} (accepted elements: {ok})")
        raise BuildError(path, "element", f"contains {', '.join(bad)} (accepted elements: {ok})")
    if "H" not in symbols:
        raise BuildError(path, "no_hydrogen", "the structure has no H atoms")


def check_molecule(path, species, positions=None, max_atoms: int = 200, allowed_elements=ORGANIC_ELEMENTS,
                   bond_tolerance: float = BOND_TOLERANCE) -> None:
    """The CIF route's rules for one molecule that comes from anywhere else (SMILES, SDF/MOL/XYZ, official CSV,
    XYZ cluster), with the same reason codes: accepted elements (``metal``/``element``), H present
    (``no_hydrogen``), at most ``max_atoms`` atoms (``too_many_atoms``), not a single atom or linear
    (``flat_molecule``) and one bonded component (``multiple_components``: a salt, a co-crystal, two molecules).

    Args:
        path: the source named in the error (file or ``"SMILES '...'"``).
        species: ``(n,)`` atomic numbers.
        positions: ``(n, 3)`` Cartesian coordinates (Å); ``None`` checks only composition and size.

    Raises:
        BuildError: with the reason of the first rule broken.
    """
    z = np.asarray(species, dtype=np.int64).reshape(-1)
    _check_elements(path, sorted({chemical_symbols[int(k)] for k in z}), allowed_elements)
    n = len(z)
    if n > max_atoms:
        raise BuildError(path, "too_many_atoms", f"{n} atoms per molecule > max_atoms={max_atoms}")
    if n < 3:
        raise BuildError(path, "flat_molecule", f"a molecule of {n} atom(s) has no orientation")
    if positions is None:
        return
    x = np.asarray(positions, dtype=np.float64).reshape(n, 3)
    sv = np.linalg.svd(x - x.mean(0), compute_uv=False) / np.sqrt(n)
    if sv[1] < 0.1:
        raise BuildError(path, "flat_molecule",
                         f"molecule with {n} atoms is linear (extents {np.round(sv, 3).tolist()} A)")
    n_comp, labels = components(z, x, bond_tolerance)
    if n_comp > 1:
        forms = [hill_formula(z[labels == c]) for c in range(n_comp)]
        raise BuildError(path, "multiple_components", f"the molecule falls apart into {n_comp} bonded "
                         f"components ({', '.join(forms[:6])}); one molecule per copy is required")


# --------------------------------------------------------------------------------------------------------
# molecules
# --------------------------------------------------------------------------------------------------------
def _molecules(path, structure, numbers: np.ndarray, bond_tolerance: float):
    """Split the cell into whole molecules.

    Returns:
        labels: ``(N,)`` component index per cell atom.
        shifts: ``(N, 3)`` int lattice image that makes every component whole.
    """
    labels_ = [getattr(site, "label", None) or f"#{i}" for i, site in enumerate(structure)]
    rmax = bond_cutoff(numbers, numbers, bond_tolerance).max()  # the longest possible bond
    ci, pi, img, d = structure.get_neighbor_list(r=float(rmax), numerical_tol=1e-8, exclude_self=True)
    img = np.rint(img).astype(np.int64)
    close = d < OVERLAP_DISTANCE
    if np.any(close):
        k = int(np.argmin(d))
        raise BuildError(path, "disorder",
                         f"atoms {labels_[ci[k]]} and {labels_[pi[k]]} are {d[k]:.2f} A apart after symmetry expansion "
                         "(overlapping/alternative positions)")
    bonded = d < bond_cutoff(numbers[ci], numbers[pi], bond_tolerance)
    ci, pi, img = ci[bonded], pi[bonded], img[bonded]
    n = len(numbers)
    if np.any(ci == pi):
        raise BuildError(path, "polymeric", "an atom is bonded to its own periodic image")
    graph = coo_matrix((np.ones(len(ci)), (ci, pi)), shape=(n, n)).tocsr()
    n_comp, labels = connected_components(graph, directed=False)
    # image of one edge per ordered pair (i -> j): j sits at frac_j + img when bonded to i
    edge_img = {}
    for a, b, m in zip(ci.tolist(), pi.tolist(), img.tolist()):
        edge_img.setdefault((a, b), m)
    shifts = np.zeros((n, 3), dtype=np.int64)
    for c in range(n_comp):
        root = int(np.flatnonzero(labels == c)[0])
        order, pred = breadth_first_order(graph, root, directed=False, return_predecessors=True)
        for j in order[1:].tolist():
            p = int(pred[j])
            shifts[j] = shifts[p] + np.asarray(edge_img[(p, j)])
    # every bond must be consistent with the unwrapping; otherwise a cycle wraps through the cell
    bad = np.any(shifts[pi] - shifts[ci] - img != 0, axis=1)
    if np.any(bad):
        k = int(np.flatnonzero(bad)[0])
        raise BuildError(path, "polymeric",
                         f"the bonded network through atoms {labels_[ci[k]]}-{labels_[pi[k]]} connects to its own "
                         "periodic image (covalent polymer or framework)")
    return labels, shifts


def _anchors(X: np.ndarray, species: np.ndarray, dtol: float) -> tuple[int, int]:
    """Two template atoms with rare (element, |x|) signatures and well separated directions."""
    r = np.linalg.norm(X, axis=1)
    same = (species[:, None] == species[None, :]) & (np.abs(r[:, None] - r[None, :]) < dtol)
    orbit = same.sum(1)
    far = r > min(0.5, 0.5 * r.max())
    # rarest signature first, then the farthest from the centroid (best conditioned rotation)
    cand = np.flatnonzero(far)
    a = int(cand[np.lexsort((-r[cand], orbit[cand]))[0]])
    ua = X[a] / r[a]
    sin = np.linalg.norm(np.cross(ua[None, :], X), axis=1)  # = |x| sin(angle)
    ok = np.flatnonzero((sin > 0.3 * sin.max()) & (np.arange(len(X)) != a))
    b = int(ok[np.lexsort((-sin[ok], orbit[ok]))[0]])
    return a, b


def match_rigid(X: np.ndarray, Y: np.ndarray, species: np.ndarray, species_y: np.ndarray | None = None,
                tol: float = RMSD_TOL):
    """Find an atom correspondence making ``Y`` a *proper* rigid motion of the template ``X``.

    Args:
        X: ``(n, 3)`` template coordinates.
        Y: ``(n, 3)`` copy coordinates with the same species multiset, any atom order.
        species: ``(n,)`` atomic numbers of ``X``.
        species_y: ``(n,)`` atomic numbers of ``Y`` (default: ``species``).
        tol: maximum RMSD (A) of the fit.

    Returns:
        ``(perm, R, rmsd)`` with ``Y[perm] ~ (X - X.mean(0)) @ R.T + Y.mean(0)`` and ``det R = +1``, or
        ``None`` if no correspondence fits within ``tol``. Pass ``-Y`` to test for a mirror image.
    """
    species = np.asarray(species)
    species_y = species if species_y is None else np.asarray(species_y)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    dtol = max(4 * tol, 0.1)
    a, b = _anchors(Xc, species, dtol)
    ry = np.linalg.norm(Yc, axis=1)
    rx = np.linalg.norm(Xc, axis=1)
    ca = np.flatnonzero((species_y == species[a]) & (np.abs(ry - rx[a]) < dtol))
    cb = np.flatnonzero((species_y == species[b]) & (np.abs(ry - rx[b]) < dtol))
    dab = np.linalg.norm(Xc[a] - Xc[b])
    pair_d = np.linalg.norm(Yc[ca][:, None] - Yc[cb][None, :], axis=-1)
    ia, ib = np.nonzero((np.abs(pair_d - dab) < 2 * dtol) & (ca[:, None] != cb[None, :]))
    Fx = frame_from_vectors(Xc[a], Xc[b])
    best = None
    # each anchor pair gives one candidate proper rotation; candidates ~ the molecule's point-group order
    for i, j in zip(ca[ia].tolist(), cb[ib].tolist()):
        R0 = frame_from_vectors(Yc[i], Yc[j]) @ Fx.T
        perm = assign(Xc @ R0.T, Yc, species, species_y)
        R, rmsd = kabsch_np(Xc, Yc[perm])
        if best is None or rmsd < best[2] - 1e-9:
            best = (perm, R, rmsd)
            if rmsd < 1e-6:  # exact symmetry image: no better candidate exists
                break
    if best is None or best[2] > tol:
        return None
    return best


def match_graph(X: np.ndarray, Y: np.ndarray, species: np.ndarray, species_y: np.ndarray,
                bond_tolerance: float = BOND_TOLERANCE, cap: int = GRAPH_MATCH_CAP):
    """Atom correspondence between two conformers of the same molecule by bond-graph matching.

    A different conformer is not a rigid image, so the rigid matcher cannot order its atoms. Candidates: the
    species-constrained nearest assignment after aligning the inertial frames (4 proper and 4 improper
    sign choices), refined by alternating Kabsch fits and assignments (cheap, right for most conformers)
    and, if none preserves the bond graph, up to ``cap`` graph isomorphisms (networkx VF2, at most
    :data:`GRAPH_MATCH_SECONDS`). Among those preserving every bond, the one with the smallest rigid-fit
    RMSD (proper or improper) wins.

    Returns:
        ``(perm, rmsd)`` with ``Y[perm]`` in the atom order of ``X``, or ``None`` when the bond graphs are not
        isomorphic (different molecules).
    """
    species, species_y = np.asarray(species), np.asarray(species_y)
    ax, ay = bond_graph(species, X, bond_tolerance), bond_graph(species_y, Y, bond_tolerance)
    if ax.sum() != ay.sum():
        return None
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)

    def fit(perm):
        Yp = Yc[perm]
        return min(kabsch_np(Xc, Yp)[1], kabsch_np(Xc, Yp, proper=False)[1])

    def ok(perm):
        return len(set(perm.tolist())) == len(perm) and np.array_equal(ay[np.ix_(perm, perm)], ax)

    best = None
    _, Ux = np.linalg.eigh(Xc.T @ Xc)
    _, Uy = np.linalg.eigh(Yc.T @ Yc)
    for signs in np.array(np.meshgrid([1, -1], [1, -1], [1, -1])).T.reshape(-1, 3):
        perm = assign(Xc @ Ux * signs, Yc @ Uy, species, species_y)
        for _ in range(4):  # alternate fit and assignment (ICP): side chains that moved find their atoms
            if ok(perm):
                r = fit(perm)
                if best is None or r < best[1]:
                    best = (perm, r)
                break
            R = kabsch_np(Xc, Yc[perm], proper=bool(np.prod(signs) > 0))[0]
            perm = assign(Xc @ R.T, Yc, species, species_y)
    if best is not None:
        return best
    import networkx as nx  # lazy: about a second to import, only for Z' > 1 conformers no cheap match fits
    from networkx.algorithms import isomorphism

    gx, gy = nx.from_numpy_array(ax.astype(int)), nx.from_numpy_array(ay.astype(int))
    nx.set_node_attributes(gx, {i: int(z) for i, z in enumerate(species)}, "z")
    nx.set_node_attributes(gy, {i: int(z) for i, z in enumerate(species_y)}, "z")
    gm = isomorphism.GraphMatcher(gx, gy, node_match=lambda a, b: a["z"] == b["z"])
    t0 = time.perf_counter()
    for k, mapping in enumerate(gm.isomorphisms_iter()):
        if k >= cap or (best is not None and time.perf_counter() - t0 > GRAPH_MATCH_SECONDS):
            break
        perm = np.array([mapping[i] for i in range(len(X))])
        r = fit(perm)
        if best is None or r < best[1]:
            best = (perm, r)
    return best


def vdw_volume(species: np.ndarray, X: np.ndarray, spacing: float = 0.15) -> float:
    """Van der Waals volume (A^3) of one molecule: the union of Bondi spheres, counted on a grid."""
    r = vdw_radii(species)
    lo = X.min(0) - r.max() - spacing
    shape = np.ceil((X.max(0) + r.max() + spacing - lo) / spacing).astype(int) + 1
    inside = np.zeros(shape, dtype=bool)
    for x, ri in zip(X, r):  # each atom marks the grid points of its own small box
        i0 = np.floor((x - ri - lo) / spacing).astype(int)
        i1 = np.ceil((x + ri - lo) / spacing).astype(int) + 1
        axes = [lo[d] + spacing * np.arange(i0[d], i1[d]) - x[d] for d in range(3)]
        d2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
        inside[i0[0]:i1[0], i0[1]:i1[1], i0[2]:i1[2]] |= d2 <= ri * ri
    return float(inside.sum() * spacing**3)


def shortest_contact(species: np.ndarray, final: np.ndarray) -> dict:
    """Shortest intermolecular contact of a cluster: distance (A), atoms and the fraction of the vdW sum."""
    z = np.asarray(species, dtype=np.int64)
    r = vdw_radii(z)
    vsum = r[:, None] + r[None]
    best_d, best_ratio, pair = np.inf, np.inf, (0, 0)
    M, n, _ = final.shape
    for i in range(M - 1):
        d = cdist(final[i], final[i + 1:].reshape(-1, 3)).reshape(n, M - i - 1, n)
        k = np.unravel_index(np.argmin(d), d.shape)
        if d[k] < best_d:
            best_d, pair = float(d[k]), (int(k[0]), int(k[2]))
        best_ratio = min(best_ratio, float((d / vsum[:, None, :]).min()))
    return {"min_contact": round(best_d, 4), "min_contact_atoms":
            f"{chemical_symbols[z[pair[0]]]}...{chemical_symbols[z[pair[1]]]}", "min_vdw_ratio": round(best_ratio, 4)}


# --------------------------------------------------------------------------------------------------------
# main entry
# --------------------------------------------------------------------------------------------------------
def cluster_from_cif(path, n_molecules: int = N_MOLECULES, max_atoms: int = 200,
                     allowed_elements=ORGANIC_ELEMENTS, rmsd_tol: float = RMSD_TOL,
                     bond_tolerance: float = BOND_TOLERANCE, allow_mirror: bool = True,
                     limits: CifLimits | None = None, allow_conformers: bool = True,
                     min_packing: float | None = None,
                     min_contact_ratio: float | None = None) -> ClusterRecord:
    """Cut a ``n_molecules`` cluster (central molecule + nearest by centroid) out of a molecular crystal.

    Args:
        path: CIF file.
        n_molecules: cluster size (17 for COD-Cluster17).
        max_atoms: largest accepted molecule (atoms, H included).
        allowed_elements: accepted element symbols (default :data:`ORGANIC_ELEMENTS`).
        rmsd_tol: maximum RMSD (A) between a copy and the rigid image of the template.
        bond_tolerance: A added to the covalent-radius sum to call a bond.
        allow_mirror: accept copies that are mirror images of a reference copy (racemic crystals of chiral
            molecules/conformers); they are stored as exact *improper* images in template atom order, counted
            in ``meta["n_mirror_copies"]`` and ``meta["racemic"]`` is true. ``False`` rejects them
            (``racemic``), as before per-copy rigid bodies.
        limits: size caps checked before the symmetry expansion (default :class:`CifLimits`).
        allow_conformers: accept Z' > 1 crystals whose copies are different conformers of the same molecule
            (atom order made consistent by bond-graph matching; ``meta["n_conformers"]``). ``False`` rejects
            them (``multiple_conformers``).
        min_packing: reject a cell whose packing coefficient is below this (``loose_packing``; None: never,
            the value is still in ``meta``). The dataset builder uses :data:`MIN_PACKING`.
        min_contact_ratio: reject a cluster with an intermolecular contact shorter than this fraction of the
            van der Waals sum (``impossible_contact``; None: never). The builder uses :data:`MIN_CONTACT_RATIO`.

    Returns:
        :class:`ClusterRecord` with ``final`` of shape ``(n_molecules, n, 3)`` and ``initial=None``.

    Raises:
        BuildError: with ``reason`` one of unparsable, truncated, bad_cell, bad_coordinates, bad_symmetry,
            too_large, disorder, metal, element, no_hydrogen, polymeric, multiple_components, too_many_atoms,
            flat_molecule, multiple_conformers, racemic, too_few_molecules, loose_packing, impossible_contact.
    """
    path = Path(path)
    structure, msgs, disorder = _parse(path, allowed_elements, limits)
    # chemistry first (a metal complex is rejected as "metal" even when it is also disordered)
    elements = sorted({el.symbol for el in structure.composition.elements})
    _check_elements(path, elements, allowed_elements)
    if disorder:
        raise BuildError(path, "disorder", disorder)
    if not structure.is_ordered:
        raise BuildError(path, "disorder", "pymatgen reports a disordered (partially occupied) structure")
    numbers = np.array([sp.Z for sp in structure.species], dtype=np.int64)
    lattice = structure.lattice.matrix.copy()  # rows are lattice vectors
    frac = structure.frac_coords

    labels, shifts = _molecules(path, structure, numbers, bond_tolerance)
    n_comp = int(labels.max()) + 1
    members = [np.flatnonzero(labels == c) for c in range(n_comp)]  # CIF atom order within a molecule
    comps = {tuple(np.sort(numbers[m]).tolist()) for m in members}
    if len(comps) > 1:
        forms = Counter(hill_formula(numbers[m]) for m in members)
        raise BuildError(path, "multiple_components",
                         f"{len(comps)} different molecules in the cell: "
                         + ", ".join(f"{k} x{v}" for k, v in sorted(forms.items())))
    n = len(members[0])
    if n > max_atoms:
        raise BuildError(path, "too_many_atoms", f"{n} atoms per molecule > max_atoms={max_atoms}")

    # whole molecules, centroids wrapped into the cell
    ufrac = [frac[m] + shifts[m] for m in members]
    cfrac = np.stack([u.mean(0) for u in ufrac])
    cell_shift = np.floor(cfrac + 1e-9)
    mols = [(u - s) @ lattice for u, s in zip(ufrac, cell_shift)]  # (n,3) Cartesian each
    cents = np.stack([m.mean(0) for m in mols])

    template0 = mols[0] - cents[0]
    sv = np.linalg.svd(template0, compute_uv=False) / np.sqrt(n)
    if n < 3 or sv[1] < 0.1:
        raise BuildError(path, "flat_molecule",
                         f"molecule with {n} atoms is a single atom or linear (extents {np.round(sv, 3).tolist()} A)")

    centre = 0.5 * lattice.sum(0)
    dc = np.linalg.norm(cents - centre, axis=1)
    central = int(np.lexsort((np.arange(n_comp), np.round(dc, 6)))[0])
    t_idx = members[central]
    species = numbers[t_idx]
    X = mols[central] - cents[central]

    # each cell molecule as the exact rigid (or mirror) image of a reference conformer, in template atom order;
    # the references are the central molecule and each further conformer (Z' > 1) met in the cell
    copies = np.empty((n_comp, n, 3))
    is_mirror = np.zeros(n_comp, dtype=bool)
    conformer = np.zeros(n_comp, dtype=np.int64)
    refs = [X]
    fit_max = 0.0
    for c in sorted(range(n_comp), key=lambda c: c != central):  # the central molecule first
        if c == central:
            copies[c] = mols[c]
            continue
        Y = mols[c] - cents[c]
        sy = numbers[members[c]]
        placed = False
        for k, ref in enumerate(refs):
            got = match_rigid(ref, Y, species, sy, rmsd_tol)
            if got is not None:
                _, R, rmsd = got
                copies[c] = ref @ R.T + cents[c]
            else:
                got = match_rigid(ref, -Y, species, sy, rmsd_tol)
                if got is None:
                    continue
                if not allow_mirror:
                    raise BuildError(path, "racemic",
                                     f"molecule {c} of the cell is the mirror image of molecule {central} "
                                     "(chiral molecule, both enantiomers in the cell)")
                _, R, rmsd = got
                is_mirror[c] = True
                copies[c] = -(ref @ R.T) + cents[c]  # -Y[perm] ~ ref R^T
            fit_max = max(fit_max, rmsd)
            conformer[c], placed = k, True
            break
        if placed:
            continue
        if not allow_conformers:
            raise BuildError(path, "multiple_conformers",
                             f"molecule {c} of the cell is not a rigid image of molecule {central} "
                             f"within {rmsd_tol} A RMSD")
        got = match_graph(X, Y, species, sy, bond_tolerance)
        if got is None:
            raise BuildError(path, "multiple_components",
                             f"molecule {c} of the cell has the composition of molecule {central} but a different "
                             "bond graph (isomer or tautomer)")
        refs.append(Y[got[0]])  # a new conformer, in template atom order, kept exactly as it is
        conformer[c] = len(refs) - 1
        copies[c] = refs[-1] + cents[c]

    # translate whole molecules by lattice vectors until the sphere through the 16th neighbour is covered
    Z = n_comp
    recip = np.linalg.norm(np.linalg.inv(lattice).T, axis=1)  # |b_k| without 2*pi
    vol = abs(np.linalg.det(lattice))
    radius = (3.0 * (n_molecules + 3) * vol / (4 * np.pi * Z)) ** (1 / 3)
    need = n_molecules - 1
    for _ in range(8):
        nk = np.ceil(radius * recip).astype(int) + 1
        grid = np.stack(np.meshgrid(*[np.arange(-k, k + 1) for k in nk], indexing="ij"), -1).reshape(-1, 3)
        pos = cents[:, None, :] + (grid @ lattice)[None, :, :]  # (Z, G, 3)
        dist = np.linalg.norm(pos - cents[central], axis=-1)
        mol_i = np.repeat(np.arange(Z), len(grid))
        g_i = np.tile(np.arange(len(grid)), Z)
        dflat = dist.reshape(-1)
        keep = dflat > 1e-6  # the central molecule itself
        mol_i, g_i, dflat = mol_i[keep], g_i[keep], dflat[keep]
        gl = grid[g_i]
        order = np.lexsort((gl[:, 2], gl[:, 1], gl[:, 0], mol_i, np.round(dflat, 6)))
        if len(order) < need:
            radius *= 1.5
            continue
        d_need = dflat[order[need - 1]]
        if d_need <= radius:
            break
        radius = d_need * 1.01
    else:  # pragma: no cover - geometric impossibility for a valid lattice
        raise BuildError(path, "too_few_molecules", f"could not gather {n_molecules} molecules")
    sel = order[:need]
    final = np.empty((n_molecules, n, 3))
    final[0] = copies[central]
    final[1:] = copies[mol_i[sel]] + (gl[sel] @ lattice)[:, None, :]
    dsel = dflat[order]
    planar = bool(sv[2] < 0.1)
    cell_mols = [central] + mol_i[sel].tolist()
    volumes = [vdw_volume(species, ref) for ref in refs]  # a mirror image has its reference's volume
    packing = float(sum(volumes[k] for k in conformer) / vol)
    declared_z = _declared_z(path)
    if min_packing is not None and packing < min_packing:
        hint = (f"; the CIF declares Z = {declared_z}: symmetry copies missing?"
                if declared_z is not None and declared_z > Z else "")
        raise BuildError(path, "loose_packing", f"packing coefficient {packing:.2f} < {min_packing:g} "
                         f"({Z} molecule(s) of {np.mean(volumes):.0f} A^3 van der Waals volume in a "
                         f"{vol:.0f} A^3 cell{hint})")
    contact = shortest_contact(species, final)
    if min_contact_ratio is not None and contact["min_vdw_ratio"] < min_contact_ratio:
        raise BuildError(path, "impossible_contact",
                         f"intermolecular contact {contact['min_contact_atoms']} of {contact['min_contact']:.2f} A "
                         f"= {contact['min_vdw_ratio']:.2f} x the van der Waals sum (< {min_contact_ratio:g})")
    a, b, cc = structure.lattice.abc
    al, be, ga = structure.lattice.angles
    meta = {
        "source": str(path),
        "formula": hill_formula(species),
        "n_cell_molecules": int(Z),
        "declared_z": declared_z,
        "cell": [float(a), float(b), float(cc), float(al), float(be), float(ga)],
        "fit_rmsd_max": float(fit_max),
        "planar": planar,
        "n_mirror_copies": int(is_mirror[mol_i[sel]].sum()),
        "racemic": bool(is_mirror.any()),
        "n_conformers": len(refs),
        "multiple_conformers": len(refs) > 1,
        "n_cluster_shapes": len({(int(conformer[m]), bool(is_mirror[m])) for m in cell_mols}),
        "packing_coefficient": round(packing, 4),
        "cell_volume": round(float(vol), 3),
        "vdw_volume": round(float(np.mean(volumes)), 3),
        **contact,
        "shell_gap": float(dsel[need] - dsel[need - 1]) if len(dsel) > need else None,
        "neighbour_distances": [round(float(x), 4) for x in dsel[:need]],
        "parser_warnings": msgs[:5],
    }
    return ClusterRecord(id=path.stem, species=species.astype(np.int64), final=final, initial=None,
                         meta=meta).validate()


def _declared_z(path: Path) -> int | None:
    """``_cell_formula_units_Z`` as the file states it (None when absent or not a number): a cell with fewer
    molecules than that lacks symmetry copies (e.g. a 'P 1' export of the asymmetric unit)."""
    try:
        m = re.search(r"(?mi)^\s*_cell_formula_units_Z\s+(\d+)", path.read_text(errors="replace"))
    except OSError:
        return None
    return int(m.group(1)) if m else None
