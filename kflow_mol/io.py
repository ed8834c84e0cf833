"""File formats for molecular clusters.

* The official COD-Cluster17 raw layout (read *and* written)::

      <root>/raw/FinalPositions/<id>_cluster16.csv
      <root>/raw/InitialPositions/<id>_cluster16_noised.csv

  Each file: header ``mol_idx,atom_type,x,y,z``, then one row per atom: molecule index, element symbol,
  Cartesian coordinates in Angstrom; no index column. This is what AssembleFlow's loader parses (it splits
  every line on ``,`` and groups rows by ``mol_idx`` in order of first appearance; 17 molecules of equal
  atom count, same atom order in both files). We write ``mol_idx`` 0..16 (molecule 0 = central), floats in
  Python's shortest round-trip ``repr`` (so write -> read -> write is byte-identical and float64-exact),
  ``\\n`` line ends.
* Loose clusters / trajectories as XYZ or extended XYZ (ASE), single molecules from SDF/MOL/XYZ/PDB or
  SMILES (RDKit ETKDG + MMFF), and a boxed P1 CIF of a cluster.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kflow.utils import atomic_write_text

from .cif import check_molecule, match_rigid
from .data import (
    N_MOLECULES,
    BuildError,
    ClusterRecord,
    check_coordinates,
    numbers_to_symbols,
    symbols_to_numbers,
)
from .molecule import components
from .molecule import hill_formula as _hill_formula
from .so3 import kabsch_np

HEADER = "mol_idx,atom_type,x,y,z"
FINAL_DIR, INITIAL_DIR = "FinalPositions", "InitialPositions"
FINAL_SUFFIX, INITIAL_SUFFIX = "_cluster16.csv", "_cluster16_noised.csv"
RIGID_TOL = 1e-3  # A (times max(1, radius of gyration)): initial must be a rigid motion of final


# --------------------------------------------------------------------------------------------------------
# official raw layout
# --------------------------------------------------------------------------------------------------------
def raw_dir(root) -> Path:
    """The ``raw`` folder of a dataset root (``root/raw``), or ``root`` itself if it holds FinalPositions."""
    root = Path(root)
    if (root / "raw" / FINAL_DIR).is_dir() or not (root / FINAL_DIR).is_dir():
        return root / "raw"
    return root


def raw_paths(root, cluster_id: str) -> tuple[Path, Path]:
    """``(final_csv, initial_csv)`` paths of one cluster id under a dataset root.

    Raises:
        BuildError: ``bad_input`` for an id that is not a plain file-name stem (an absolute path or ``..`` in an
            id list must not read files from outside the data root).
    """
    cid = str(cluster_id)
    if not cid or cid in (".", "..") or any(c in cid for c in "/\\\0") or Path(cid).is_absolute():
        raise BuildError(root, "bad_input", f"cluster id {cid!r} is not a plain name: ids are file-name stems "
                         f"under <root>/raw/{FINAL_DIR}")
    r = raw_dir(root)
    return r / FINAL_DIR / f"{cluster_id}{FINAL_SUFFIX}", r / INITIAL_DIR / f"{cluster_id}{INITIAL_SUFFIX}"


def list_raw_ids(root) -> list[str]:
    """Sorted cluster ids that have a FinalPositions file under ``root``.

    Raises:
        BuildError: ``bad_csv`` if ``root`` has no ``raw/FinalPositions`` folder.
    """
    d = raw_dir(root) / FINAL_DIR
    if not d.is_dir():
        raise BuildError(root, "bad_csv", f"no {FINAL_DIR} folder: expected {d} (the official layout is "
                         f"<root>/raw/{FINAL_DIR}/<id>{FINAL_SUFFIX})")
    return sorted(p.name[: -len(FINAL_SUFFIX)] for p in d.iterdir() if p.name.endswith(FINAL_SUFFIX))


def format_csv(species, positions: np.ndarray) -> str:
    """Text of one raw CSV file.

    Args:
        species: ``(n,)`` atomic numbers, shared by all molecules.
        positions: ``(17, n, 3)`` Cartesian coordinates (A).
    """
    pos = np.asarray(positions, dtype=np.float64)
    syms = numbers_to_symbols(species)
    lines = [HEADER]
    for m in range(pos.shape[0]):
        for s, (x, y, z) in zip(syms, pos[m].tolist()):
            lines.append(f"{m},{s},{x!r},{y!r},{z!r}")
    return "\n".join(lines) + "\n"


def read_csv(path, n_molecules: int = N_MOLECULES) -> tuple[np.ndarray, np.ndarray]:
    """Parse one raw CSV file strictly.

    Returns:
        ``(species (n,), positions (n_molecules, n, 3))``; molecules in order of first appearance of their
        ``mol_idx`` (as AssembleFlow's loader does).

    Raises:
        BuildError: ``bad_csv`` naming the file and the line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise BuildError(path, "bad_csv", f"cannot read file: {e}") from None
    except UnicodeDecodeError as e:
        raise BuildError(path, "bad_csv", f"not UTF-8 text (byte {e.start}: {e.reason})") from None
    lines = text.splitlines()
    if not lines or lines[0].strip().lstrip("\ufeff") != HEADER:
        got = lines[0].strip()[:60] if lines else "<empty file>"
        raise BuildError(path, "bad_csv", f"line 1: header must be '{HEADER}', got '{got}'")
    groups: dict[int, tuple[list[str], list[list[float]]]] = {}
    for ln, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.strip().split(",")
        if len(parts) != 5:
            raise BuildError(path, "bad_csv", f"line {ln}: expected 5 comma-separated fields, got {len(parts)}")
        try:
            m = int(parts[0])
        except ValueError:
            raise BuildError(path, "bad_csv", f"line {ln}: mol_idx '{parts[0]}' is not an integer") from None
        sym = parts[1].strip()
        try:
            symbols_to_numbers([sym])
        except KeyError:
            raise BuildError(path, "bad_csv", f"line {ln}: unknown element symbol '{sym}'") from None
        try:
            xyz = [float(v) for v in parts[2:]]
        except ValueError:
            raise BuildError(path, "bad_csv", f"line {ln}: coordinates {parts[2:]} are not numbers") from None
        check_coordinates(path, xyz, f"line {ln}", reason="bad_csv")
        g = groups.setdefault(m, ([], []))
        g[0].append(sym)
        g[1].append(xyz)
    if len(groups) != n_molecules:
        raise BuildError(path, "bad_csv", f"{len(groups)} molecules (distinct mol_idx), expected {n_molecules}")
    keys = list(groups)
    counts = {k: len(groups[k][0]) for k in keys}
    if len(set(counts.values())) != 1:
        raise BuildError(path, "bad_csv", f"molecules have unequal atom counts {sorted(set(counts.values()))} "
                         f"(mol_idx -> count: {counts})")
    ref = groups[keys[0]][0]
    for k in keys[1:]:
        if groups[k][0] != ref:
            i = next(i for i, (a, b) in enumerate(zip(ref, groups[k][0])) if a != b)
            raise BuildError(path, "bad_csv", f"molecule mol_idx={k} has a different atom order than "
                             f"mol_idx={keys[0]} (atom {i}: {groups[k][0][i]} vs {ref[i]})")
    species = symbols_to_numbers(ref)
    pos = np.array([groups[k][1] for k in keys], dtype=np.float64)
    return species, pos


def read_raw_pair(root, cluster_id: str, require_initial: bool = False,
                  rigid_tol: float = RIGID_TOL) -> ClusterRecord:
    """Read one cluster in the official layout.

    Args:
        root: dataset root (holding ``raw/``) or the ``raw`` folder itself.
        cluster_id: the ``<id>`` of ``<id>_cluster16.csv``.
        require_initial: raise if the InitialPositions file is missing (else ``initial=None``).
        rigid_tol: each initial molecule must be a proper rigid motion of its final one within
            ``rigid_tol * max(1, radius of gyration)`` A RMSD.

    Returns:
        :class:`ClusterRecord` (``meta["source"]`` = the FinalPositions path).

    Raises:
        BuildError: ``bad_csv`` naming the file (and line) that breaks the layout, or a reason of
            :func:`kflow_mol.cif.check_molecule` (the molecule rules shared with the CIF route).
    """
    fpath, ipath = raw_paths(root, cluster_id)
    if not fpath.is_file():
        raise BuildError(fpath, "bad_csv", "file not found (official layout: "
                         f"<root>/raw/{FINAL_DIR}/<id>{FINAL_SUFFIX})")
    species, final = read_csv(fpath)
    check_molecule(fpath, species, final[0])  # the CIF rules: elements, H, size, one component, not flat
    initial = None
    if ipath.is_file():
        sp_i, initial = read_csv(ipath)
        if sp_i.shape != species.shape or np.any(sp_i != species):
            raise BuildError(ipath, "bad_csv", f"atoms differ from {fpath.name} (same element order required)")
        rg = np.sqrt(np.mean(np.sum((final - final.mean(1, keepdims=True)) ** 2, -1), -1))  # (17,)
        for m in range(final.shape[0]):
            r = kabsch_np(initial[m], final[m])[1]
            if r > rigid_tol * max(1.0, rg[m]):
                raise BuildError(ipath, "bad_csv", f"molecule {m} is not a proper rigid motion of its final "
                                 f"position in {fpath.name} (Kabsch RMSD {r:.3g} A)")
    elif require_initial:
        raise BuildError(ipath, "bad_csv", "file not found (official layout: "
                         f"<root>/raw/{INITIAL_DIR}/<id>{INITIAL_SUFFIX})")
    return ClusterRecord(id=cluster_id, species=species, final=final, initial=initial,
                         meta={"source": str(fpath)}).validate()


def write_raw_pair(root, record: ClusterRecord) -> tuple[Path, Path | None]:
    """Write a cluster in the official layout under ``root/raw`` (atomic per file).

    Returns:
        ``(final_csv, initial_csv or None)``.
    """
    record.validate()
    fpath, ipath = raw_paths(root, record.id)
    atomic_write_text(fpath, format_csv(record.species, record.final))
    if record.initial is None:
        return fpath, None
    atomic_write_text(ipath, format_csv(record.species, record.initial))
    return fpath, ipath


# --------------------------------------------------------------------------------------------------------
# XYZ / extended XYZ / PDB
# --------------------------------------------------------------------------------------------------------
def write_xyz(path, species, positions, comment: str = "", extended: bool | None = None) -> Path:
    """Write a cluster or a trajectory of clusters.

    Args:
        path: output file; ``.extxyz`` (or ``extended=True``) writes extended XYZ with a per-atom
            ``mol_idx`` array (ASE), otherwise plain XYZ.
        species: ``(n,)`` atomic numbers of one molecule.
        positions: ``(M, n, 3)`` one cluster, or ``(T, M, n, 3)`` a trajectory (one frame per step).
        comment: comment line for plain XYZ frames.
    """
    path = Path(path)
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim == 3:
        pos = pos[None]
    if pos.ndim != 4 or pos.shape[-1] != 3:
        raise ValueError(f"positions must be (M, n, 3) or (T, M, n, 3), got {pos.shape}")
    T, M, n, _ = pos.shape
    species = np.asarray(species)
    extended = path.suffix == ".extxyz" if extended is None else extended
    path.parent.mkdir(parents=True, exist_ok=True)
    if extended:
        from ase import Atoms  # lazy here and below: ase.io takes about a second to import
        from ase.io import write

        frames = []
        for t in range(T):
            at = Atoms(numbers=np.tile(species, M), positions=pos[t].reshape(-1, 3))
            at.arrays["mol_idx"] = np.repeat(np.arange(M), n)
            at.info["frame"] = t
            frames.append(at)
        write(str(path), frames, format="extxyz")
        return path
    syms = np.array(numbers_to_symbols(species) * M)
    out = []
    for t in range(T):
        out.append(str(M * n))
        out.append(comment or f"frame {t}")
        for s, (x, y, z) in zip(syms, pos[t].reshape(-1, 3)):
            out.append(f"{s} {x:.8f} {y:.8f} {z:.8f}")
    path.write_text("\n".join(out) + "\n")
    return path


def read_cluster_xyz(path, n_molecules: int = N_MOLECULES, tol: float = 0.05):
    """Read a loose ``n_molecules`` cluster from XYZ / extended XYZ / PDB (anything ASE reads).

    See :func:`_read_cluster_xyz`; the molecule then passes :func:`kflow_mol.cif.check_molecule` (the CIF rules).
    """
    species, pos = _read_cluster_xyz(path, n_molecules, tol)
    check_molecule(path, species, pos[0])
    return species, pos


def _read_cluster_xyz(path, n_molecules: int = N_MOLECULES, tol: float = 0.05):
    """Read a loose ``n_molecules`` cluster from XYZ / extended XYZ / PDB (anything ASE reads).

    Molecules come from, in order: an extxyz ``mol_idx`` array; an equal split into ``n_molecules``
    consecutive blocks with identical element order; the bonded components (covalent radii), matched to
    the first one by a proper rigid fit so every copy has the same atom order.

    Returns:
        ``(species (n,), positions (n_molecules, n, 3))``.

    Raises:
        BuildError: ``bad_input`` naming the file when no consistent split exists.
    """
    from ase.io import read

    path = Path(path)
    try:
        atoms = read(str(path), index=0)
    except Exception as e:  # noqa: BLE001 - ASE raises many types
        raise BuildError(path, "bad_input", f"cannot read with ASE: {type(e).__name__}: {e}") from None
    Z = atoms.get_atomic_numbers()
    X = check_coordinates(path, atoms.get_positions())
    N = len(Z)
    if "mol_idx" in atoms.arrays:
        mi = atoms.arrays["mol_idx"].astype(int)
        keys = list(dict.fromkeys(mi.tolist()))
        blocks = [np.flatnonzero(mi == k) for k in keys]
        if len(blocks) != n_molecules or len({len(b) for b in blocks}) != 1 or any(
                np.any(Z[b] != Z[blocks[0]]) for b in blocks):
            raise BuildError(path, "bad_input", f"mol_idx defines {len(blocks)} molecules; need {n_molecules} "
                             "with the same element order")
        return Z[blocks[0]].astype(np.int64), np.stack([X[b] for b in blocks])
    if N % n_molecules == 0:
        n = N // n_molecules
        Zb, Xb = Z.reshape(n_molecules, n), X.reshape(n_molecules, n, 3)
        if np.all(Zb == Zb[0]) and all(kabsch_np(Xb[0], Xb[m])[1] < tol for m in range(n_molecules)):
            return Zb[0].astype(np.int64), Xb.copy()
    nc, lab = components(Z, X)
    if nc != n_molecules:
        raise BuildError(path, "bad_input", f"{N} atoms form {nc} bonded molecules, expected {n_molecules} "
                         "(add a mol_idx column via extended XYZ, or order the atoms molecule by molecule)")
    blocks = [np.flatnonzero(lab == c) for c in range(nc)]
    ref = blocks[0]
    out = [X[ref]]
    for b in blocks[1:]:
        if len(b) != len(ref) or sorted(Z[b]) != sorted(Z[ref]):
            raise BuildError(path, "bad_input", "the bonded molecules differ in composition")
        got = match_rigid(X[ref], X[b], Z[ref], Z[b], tol=tol)
        if got is None:
            raise BuildError(path, "bad_input", "a molecule is not a rigid copy of the first one")
        out.append(X[b][got[0]])
    return Z[ref].astype(np.int64), np.stack(out)


# --------------------------------------------------------------------------------------------------------
# single molecules and boxed CIF
# --------------------------------------------------------------------------------------------------------
def read_single_molecule(path, add_hydrogens: bool = True):
    """Read one molecule (SDF/MOL via RDKit, anything else via ASE) that passes the CIF rules
    (:func:`kflow_mol.cif.check_molecule`: organic elements, H present, size cap, one component, not flat).

    Args:
        path: ``.sdf``/``.mol`` (first record) or ``.xyz``/``.pdb``/...
        add_hydrogens: for SDF/MOL without explicit H, add them with 3-D coordinates (RDKit).

    Returns:
        ``(species (n,), positions (n, 3))``.
    """
    path = Path(path)
    if path.suffix.lower() in (".sdf", ".mol", ".mdl"):
        from rdkit import Chem, rdBase  # lazy: RDKit takes seconds to import, only for SDF/MOL files

        with rdBase.BlockLogs():  # a one-line error instead of RDKit's log
            if path.suffix.lower() == ".sdf":
                mol = next(iter(Chem.SDMolSupplier(str(path), removeHs=False)), None)
            else:
                mol = Chem.MolFromMolFile(str(path), removeHs=False)
        if mol is None or mol.GetNumConformers() == 0:
            raise BuildError(path, "bad_input", "RDKit could not read a 3-D molecule from the file")
        if add_hydrogens and not any(a.GetAtomicNum() == 1 for a in mol.GetAtoms()):
            mol = Chem.AddHs(mol, addCoords=True)
        z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
        return _checked(path, z, check_coordinates(path, mol.GetConformer().GetPositions()))
    from ase.io import read

    try:
        atoms = read(str(path), index=0)
    except Exception as e:  # noqa: BLE001
        raise BuildError(path, "bad_input", f"cannot read with ASE: {type(e).__name__}: {e}") from None
    if len(atoms) == 0:
        raise BuildError(path, "bad_input", "no atoms")
    return _checked(path, atoms.get_atomic_numbers().astype(np.int64), check_coordinates(path, atoms.get_positions()))


def _checked(path, species, positions):
    check_molecule(path, species, positions)
    return species, positions


def molecule_from_smiles(smiles: str, seed: int = 0):
    """3-D molecule with explicit H from SMILES: RDKit ETKDGv3 embedding + MMFF94 relaxation.

    Returns:
        ``(species (n,), positions (n, 3))``.

    Raises:
        BuildError: ``bad_input`` for an invalid SMILES or a failed embedding; a reason of
            :func:`kflow_mol.cif.check_molecule` for a molecule the CIF route would reject (``[Na+].[Cl-]``:
            ``metal``).
    """
    from rdkit import Chem, rdBase
    from rdkit.Chem import AllChem

    with rdBase.BlockLogs():  # RDKit's own multi-line parse log would precede our one-line error
        mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise BuildError(f"SMILES '{smiles}'", "bad_input", "RDKit cannot parse the SMILES (check brackets, "
                         "ring-closure digits, element symbols and valences)")
    mol = Chem.AddHs(mol)
    src = f"SMILES '{smiles}'"
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    check_molecule(src, z)  # elements, H, size first: '[Na+].[Cl-]' is rejected before any embedding
    if len(Chem.GetMolFrags(mol)) > 1:
        raise BuildError(src, "multiple_components", f"{len(Chem.GetMolFrags(mol))} disconnected fragments "
                         "('.' in the SMILES); one molecule per copy is required")
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed)
    if AllChem.EmbedMolecule(mol, params) != 0:
        raise BuildError(f"SMILES '{smiles}'", "bad_input", "3-D embedding (ETKDG) failed")
    if AllChem.MMFFHasAllMoleculeParams(mol):
        AllChem.MMFFOptimizeMolecule(mol, maxIters=2000)
    return _checked(src, z, mol.GetConformer().GetPositions().astype(np.float64))


def hill_formula(species) -> str:
    """Hill-order formula with CIF spacing (``"C6 H6"``; :func:`kflow_mol.molecule.hill_formula`)."""
    return _hill_formula(species, " ")


def write_cluster_cif(path, species, positions, padding: float = 10.0, name: str = "cluster") -> Path:
    """Write a cluster as a P1 CIF in an orthorhombic vacuum box (``padding`` Å on each side), atomically.

    The file says in its header that it is a finite cluster, not a crystal (the box is only a frame for
    viewers), and gives the formula of one molecule and of the cluster (``_chemical_formula_moiety``
    ``"17(C6 H6)"``, ``_chemical_formula_sum``). Atom labels carry the molecule: ``C3_m5`` is the third carbon
    of molecule 5 (molecule 0 is the central one).

    Args:
        species: ``(n,)`` atomic numbers of one molecule.
        positions: ``(M, n, 3)`` cluster.
        name: the data block name (letters, digits, ``_`` and ``-`` are kept).
    """
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 3:
        raise ValueError(f"write_cluster_cif: positions must be (M, n, 3), got {pos.shape}")
    M, n, _ = pos.shape
    symbols = numbers_to_symbols(species)
    lo, hi = pos.reshape(-1, 3).min(0), pos.reshape(-1, 3).max(0)
    box = hi - lo + 2 * padding
    frac = (pos - lo + padding) / box
    block = "".join(c if c.isalnum() or c in "_-" else "_" for c in str(name)) or "cluster"
    one = hill_formula(species)
    total = hill_formula(np.tile(np.asarray(species), M))
    lines = [
        f"# kflow-mol: a finite cluster of {M} molecules (molecule 0 and its {M - 1} nearest neighbours), NOT a",
        "# crystal structure: the P1 box below is only a frame for viewers, not a unit cell, and there are no",
        "# periodic images. Atom labels <element><k>_m<molecule>.",
        f"data_{block}",
        f"_chemical_formula_moiety          '{M}({one})'",
        f"_chemical_formula_sum             '{total}'",
        f"_cell_length_a                    {box[0]:.4f}",
        f"_cell_length_b                    {box[1]:.4f}",
        f"_cell_length_c                    {box[2]:.4f}",
        "_cell_angle_alpha                 90",
        "_cell_angle_beta                  90",
        "_cell_angle_gamma                 90",
        "_symmetry_space_group_name_H-M    'P 1'",
        "_symmetry_Int_Tables_number       1",
        "loop_",
        "_symmetry_equiv_pos_as_xyz",
        "'x, y, z'",
        "loop_",
        "_atom_site_label",
        "_atom_site_type_symbol",
        "_atom_site_fract_x",
        "_atom_site_fract_y",
        "_atom_site_fract_z",
        "_atom_site_occupancy",
    ]
    for m in range(M):
        seen: dict[str, int] = {}
        for a, sym in enumerate(symbols):
            seen[sym] = seen.get(sym, 0) + 1
            x, y, z = frac[m, a]
            lines.append(f"{sym}{seen[sym]}_m{m} {sym} {x:.6f} {y:.6f} {z:.6f} 1")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
