"""Regenerate the small hand-made CIFs used by tests/kflow_mol/test_cif.py (run from anywhere).

Each file is a minimal, deliberately constructed crystal that exercises one acceptance path or one
rejection reason of ``kflow_mol.cif.cluster_from_cif``. Geometry is idealised (not experimental data).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# methanol with a mirror plane (z = 0): achiral, Cs
METHANOL = [("C", (0.0, 0.0, 0.0)), ("O", (1.43, 0.0, 0.0)), ("H", (1.75, 0.90, 0.0)),
            ("H", (-0.36, -1.03, 0.0)), ("H", (-0.36, 0.51, 0.89)), ("H", (-0.36, 0.51, -0.89))]
# the same with the O-H rotated out of the mirror plane: a different conformer
METHANOL_TWIST = METHANOL[:2] + [("H", (1.75, 0.45, 0.78))] + METHANOL[3:]
_T = np.array([(1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)]) / np.sqrt(3)
# bromochlorofluoromethane: chiral
CHFCLBR = [("C", (0, 0, 0)), ("H", tuple(1.09 * _T[0])), ("F", tuple(1.35 * _T[1])),
           ("Cl", tuple(1.77 * _T[2])), ("Br", tuple(1.94 * _T[3]))]
ACETYLENE = [("H", (-1.66, 0, 0)), ("C", (-0.60, 0, 0)), ("C", (0.60, 0, 0)), ("H", (1.66, 0, 0))]
CF4 = [("C", (0, 0, 0))] + [("F", tuple(1.33 * t)) for t in _T]
WATER = [("O", (0, 0, 0)), ("H", (0.96, 0, 0)), ("H", (-0.24, 0.93, 0))]

P1 = ["x, y, z"]
PM1 = ["x, y, z", "-x, -y, -z"]
P21 = ["x, y, z", "-x, y+1/2, -z"]
P21C = ["x, y, z", "-x, y+1/2, -z+1/2", "-x, -y, -z", "x, -y+1/2, z+1/2"]


def place(mol, frac_centre, abc):
    """Molecule (Cartesian, A) centred at a fractional position of an orthogonal cell."""
    xyz = np.array([p for _, p in mol], dtype=float)
    xyz = xyz - xyz.mean(0) + np.asarray(frac_centre) * np.asarray(abc)
    return [(s, tuple(x / np.asarray(abc))) for (s, _), x in zip(mol, xyz)]


def write(name, abc, ops, atoms, occupancy=None, comment=""):
    lines = [f"# {comment}" if comment else "# test structure", f"data_{Path(name).stem}",
             f"_cell_length_a {abc[0]:.4f}", f"_cell_length_b {abc[1]:.4f}", f"_cell_length_c {abc[2]:.4f}",
             "_cell_angle_alpha 90", "_cell_angle_beta 90", "_cell_angle_gamma 90",
             "loop_", "_symmetry_equiv_pos_as_xyz"] + [f"'{o}'" for o in ops]
    lines += ["loop_", "_atom_site_label", "_atom_site_type_symbol", "_atom_site_fract_x",
              "_atom_site_fract_y", "_atom_site_fract_z", "_atom_site_occupancy"]
    for i, (s, f) in enumerate(atoms):
        occ = 1.0 if occupancy is None else occupancy[i]
        lines.append(f"{s}{i + 1} {s} {f[0]:.6f} {f[1]:.6f} {f[2]:.6f} {occ:.3f}")
    (HERE / name).write_text("\n".join(lines) + "\n")


def main():
    abc = (8.0, 9.0, 10.0)
    write("ok_methanol_p21c.cif", abc, P21C, place(METHANOL, (0.23, 0.2, 0.15), abc),
          comment="achiral methanol in P2_1/c: inversion copies are proper motions after relabelling")
    write("ok_chiral_p21.cif", abc, P21, place(CHFCLBR, (0.25, 0.2, 0.25), abc),
          comment="chiral CHFClBr in P2_1: one enantiomer, all copies proper")
    write("racemic_p-1.cif", abc, PM1, place(CHFCLBR, (0.25, 0.2, 0.25), abc),
          comment="chiral CHFClBr in P-1: both enantiomers")
    box = (8.0, 8.0, 8.0)
    write("multiple_conformers_p1.cif", box, P1,
          place(METHANOL, (0.25, 0.25, 0.25), box) + place(METHANOL_TWIST, (0.75, 0.75, 0.75), box),
          comment="two methanol conformers (Z'=2)")
    write("multiple_components_p1.cif", box, P1,
          place(METHANOL, (0.25, 0.25, 0.25), box) + place(WATER, (0.75, 0.75, 0.75), box),
          comment="methanol + water")
    m = place(METHANOL, (0.5, 0.5, 0.5), box)
    write("disorder_occupancy_p1.cif", box, P1, m, occupancy=[1, 1, 0.5, 1, 1, 1],
          comment="partial occupancy")
    o = np.array(m[1][1]) * box
    write("disorder_overlap_p1.cif", box, P1, m + [("H", tuple((o + [0.0, 0.0, 0.3]) / box))],
          comment="an extra H 0.3 A from O (alternative position without occupancy)")
    write("metal_p1.cif", box, P1, m + [("Na", (0.0, 0.0, 0.0))], comment="methanol + Na")
    write("element_p1.cif", box, P1, m + [("As", (0.0, 0.0, 0.0))], comment="methanol + As")
    write("no_hydrogen_p1.cif", box, P1, place(CF4, (0.5, 0.5, 0.5), box), comment="CF4, no H")
    write("flat_molecule_p1.cif", box, P1, place(ACETYLENE, (0.5, 0.5, 0.5), box),
          comment="acetylene (linear)")
    chain = (3.0, 8.0, 8.0)  # -CH2-CH2- chain along a: C-C 1.5 A through the cell boundary
    atoms = [("C", (0.0, 0.5, 0.5)), ("C", (0.5, 0.5, 0.5)),
             ("H", (0.0, 0.5 + 1.09 / 8, 0.5)), ("H", (0.0, 0.5, 0.5 + 1.09 / 8)),
             ("H", (0.5, 0.5 - 1.09 / 8, 0.5)), ("H", (0.5, 0.5, 0.5 - 1.09 / 8))]
    write("polymeric_p1.cif", chain, P1, atoms, comment="infinite CH2 chain")
    (HERE / "unparsable.cif").write_text("data_broken\n_cell_length_a twelve\nloop_\n_atom_site_label\n"
                                         "C1 0.1 0.2\n")


if __name__ == "__main__":
    main()
