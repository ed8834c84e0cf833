"""In-memory cluster record and the one error type for bad molecular input.

A *cluster* is COD-Cluster17's unit of data: 17 copies of the same molecule (a central one plus its 16
nearest neighbours by centroid distance) with the same atom order in every copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

N_MOLECULES = 17
MAX_COORDINATE = 1e4  # Å: a cluster spans tens of Å; larger values are corrupt numbers (and overflow the maths)
OVERLAP_DISTANCE = 0.5  # Å: atoms this close are alternative (disordered) or duplicated positions

# Element symbols indexed by atomic number (index 0 is a placeholder), from ASE so that every module agrees.
from ase.data import atomic_numbers as _ATOMIC_NUMBERS
from ase.data import chemical_symbols as _CHEMICAL_SYMBOLS

#: Reason codes used by :class:`BuildError`, with what each one means (also the "how to fix" hint).
REASONS: dict[str, str] = {
    "unparsable": "the file could not be parsed as a crystal structure (malformed CIF, no atoms, no cell); "
    "fix the file or re-export it (e.g. from Mercury/VESTA/pymatgen)",
    "truncated": "the file ends too early (inside a loop row, a text field or a quoted string, or mid-line "
    "without a final newline): a truncated download or copy; fetch the file again",
    "bad_cell": "the unit cell is invalid (a missing or non-positive length, an angle outside (0, 180) degrees, "
    "or angles that do not form a cell)",
    "bad_coordinates": "an atom coordinate is not a finite number or is absurd (a fractional coordinate beyond "
    "+-10, a Cartesian one beyond +-1e4 A)",
    "bad_symmetry": "a symmetry operator is not an isometry of the cell, or the operators do not form a group "
    "(an extra, missing or mistyped operator)",
    "too_large": "the file exceeds a size limit checked before the symmetry expansion (file size, cell length, "
    "cell volume, atoms in the cell, symmetry operators); raise the limit (--max-cell-volume, --max-cell-atoms, "
    "--max-symops, --max-cell-length) to accept it",
    "memory": "processing the file needed more memory than the per-file limit (--max-memory-gb)",
    "disorder": "partial occupancy, disorder groups or overlapping atoms (< 0.5 A apart after symmetry "
    "expansion); only fully ordered structures are accepted: keep one disorder component "
    "with occupancy 1",
    "metal": "the structure contains a metal; only organic molecular crystals are accepted "
    "(elements H, B, C, N, O, F, Si, P, S, Cl, Se, Br, I)",
    "element": "an element outside the accepted organic set "
    "(H, B, C, N, O, F, Si, P, S, Cl, Se, Br, I)",
    "no_hydrogen": "no hydrogen atoms: explicit H positions are required (add riding H, e.g. with "
    "Mercury or pymatgen, before building)",
    "polymeric": "a bonded network extends through the periodic boundary (covalent polymer / framework), "
    "so there are no discrete molecules",
    "multiple_components": "the cell holds different molecules (salt, co-crystal or solvate); only "
    "single-component crystals are accepted",
    "multiple_conformers": "the copies of the molecule are not rigid images of one another "
    "(Z' > 1 with different conformers); rejected only with --reject-conformers (by default each conformer "
    "is its own rigid shape)",
    "racemic": "the cell holds both enantiomers of a chiral molecule (copies related only by "
    "inversion/mirror); rejected only with --reject-racemic (by default each enantiomer is its own rigid shape)",
    "loose_packing": "the packing coefficient (van der Waals volume of the cell's molecules / cell volume) is far "
    "below that of a close-packed molecular crystal (0.65-0.80); lower --min-packing to accept it",
    "impossible_contact": "two atoms of different molecules are closer than a physically possible contact "
    "(a fraction of their van der Waals sum below --min-contact-ratio): wrong or missing atoms, or unflagged "
    "disorder",
    "too_many_atoms": "the molecule is larger than max_atoms (raise max_atoms to accept it)",
    "flat_molecule": "the molecule is a single atom or linear (rank of centred coordinates < 2), "
    "so it has no orientation",
    "too_few_molecules": "fewer than 17 molecules could be gathered",
    "bad_csv": "the CSV does not follow the COD-Cluster17 layout: header 'mol_idx,atom_type,x,y,z', "
    "17 molecules (mol_idx 0..16) of equal atom count, element symbols, the same atom order in "
    "FinalPositions and InitialPositions, each initial molecule a rigid motion of its final one",
    "bad_input": "the molecule/cluster file could not be interpreted",
    "timeout": "processing the file took longer than the per-file time limit",
    "error": "unexpected internal error while processing the file (please report it)",
}


class BuildError(ValueError):
    """A bad input file: names the file, a machine-readable reason code and what is accepted.

    Attributes:
        path: the offending file (string).
        reason: short code, one of :data:`REASONS` (e.g. ``"disorder"``, ``"metal"``, ``"bad_csv"``).
        detail: free text with the specifics (which atom, which line, ...).
    """

    def __init__(self, path: str | Path | None, reason: str, detail: str = ""):
        self.path = str(path) if path is not None else "<memory>"
        self.reason = reason
        self.detail = detail
        hint = REASONS.get(reason, "")
        msg = f"{self.path}: rejected ({reason})"
        if detail:
            msg += f": {detail}"
        if hint:
            msg += f". {hint[0].upper()}{hint[1:]}."
        super().__init__(msg)

    def __reduce__(self):  # picklable across multiprocessing workers
        return (BuildError, (self.path, self.reason, self.detail))


def check_coordinates(path, positions, what: str = "coordinates", reason: str = "bad_input") -> np.ndarray:
    """``positions`` as float64 if all are finite and within ``±MAX_COORDINATE`` Å, else :class:`BuildError`.

    Every reader calls it, so a NaN or a 1e300 is reported as bad input instead of failing deep in the maths.
    """
    x = np.asarray(positions, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise BuildError(path, reason, f"{what}: non-finite coordinates")
    big = float(np.abs(x).max(initial=0.0))
    if big > MAX_COORDINATE:
        raise BuildError(path, reason, f"{what}: a coordinate of {big:.3g} Å (limit ±{MAX_COORDINATE:g} Å)")
    return x


def symbols_to_numbers(symbols) -> np.ndarray:
    """Element symbols -> atomic numbers, shape ``(n,)`` int64. Raises ``KeyError`` on an unknown symbol."""
    return np.array([_ATOMIC_NUMBERS[s] for s in symbols], dtype=np.int64)


def numbers_to_symbols(numbers) -> list[str]:
    """Atomic numbers ``(n,)`` -> element symbols."""
    return [_CHEMICAL_SYMBOLS[int(z)] for z in numbers]


@dataclass
class ClusterRecord:
    """One 17-molecule cluster.

    Attributes:
        id: identifier (file stem, e.g. the COD id).
        species: ``(n,)`` int atomic numbers, shared by all 17 copies (same atom order).
        final: ``(17, n, 3)`` float64 packed (crystal) positions in Angstrom; molecule 0 is the central one,
            the others sorted by centroid distance to it.
        initial: ``(17, n, 3)`` float64 loose positions (each molecule a rigid motion of its final copy) or None.
        meta: free-form provenance (source file, cell, fit residuals, ...). JSON-serialisable values.
    """

    id: str
    species: np.ndarray
    final: np.ndarray
    initial: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def symbols(self) -> list[str]:
        """Element symbols of one molecule, ``n`` strings."""
        return numbers_to_symbols(self.species)

    @property
    def n_atoms(self) -> int:
        """Atoms per molecule."""
        return int(np.asarray(self.species).shape[0])

    def validate(self) -> ClusterRecord:
        """Check shapes, dtypes, coordinates (:func:`check_coordinates`) and that no two final molecules overlap;
        raise :class:`BuildError` (reason ``bad_input``) if wrong.

        Returns:
            self (so it can be chained).
        """
        src = self.meta.get("source", self.id)
        sp = np.asarray(self.species)
        if sp.ndim != 1 or sp.shape[0] == 0:
            raise BuildError(src, "bad_input", f"species must have shape (n,) with n >= 1, got {sp.shape}")
        if not np.issubdtype(sp.dtype, np.integer) or sp.min() < 1 or sp.max() >= len(_CHEMICAL_SYMBOLS):
            raise BuildError(src, "bad_input", "species must be atomic numbers 1..118")
        n = sp.shape[0]
        for name in ("final", "initial"):
            x = getattr(self, name)
            if x is None:
                if name == "final":
                    raise BuildError(src, "bad_input", "final positions are missing")
                continue
            x = np.asarray(x)
            if x.shape != (N_MOLECULES, n, 3):
                raise BuildError(src, "bad_input",
                                 f"{name} must have shape ({N_MOLECULES}, {n}, 3), got {x.shape}")
            check_coordinates(src, x, name)
        x = np.asarray(self.final, dtype=np.float64)
        for i in range(N_MOLECULES - 1):  # the reference must be 17 distinct molecules, not stacked copies
            d = np.linalg.norm(x[i][:, None, None] - x[i + 1:][None], axis=-1).min(axis=(0, 2))
            if d.min() < OVERLAP_DISTANCE:
                j = i + 1 + int(d.argmin())
                raise BuildError(src, "bad_input", f"final molecules {i} and {j} overlap (atoms {d.min():.2f} Å "
                                 f"apart, < {OVERLAP_DISTANCE} Å)")
        return self
