"""Resource limits of the molecule readers (no heavy imports: the CLI builds its flags from these defaults).

See ``docs/LIMITS.md`` for every limit, its default and the flag that changes it.
"""
from __future__ import annotations

from dataclasses import dataclass


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
