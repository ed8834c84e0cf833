"""Pictures of clusters: loose / assembled / reference side by side (matplotlib, no display needed).

Each panel is an orthographic ball-and-stick drawing: atoms in Jmol element colours (ASE's ``jmol_colors``),
bonds from the project's one bond rule (:func:`kflow_mol.molecule.bond_graph`) drawn as half-sticks in the
colours of their two atoms, everything painted back to front with far atoms faded (a depth cue). Every panel
uses the same view direction and the same scale, so a loose cluster looks as spread out as it is; a scale
bar in Å sits in each panel's corner.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from ase.data import chemical_symbols
from ase.data.colors import jmol_colors

from kflow_mol.molecule import bond_graph, covalent_radii, hill_formula

PANEL_W, PANEL_H, DPI = 4.4, 5.4, 100  # inches per panel, dots per inch: the PNG is (440 k) x 540 pixels
FOG = 0.5  # how far the farthest atoms are blended towards white
STICK = 0.09  # half-width of a bond stick (Å)


def atom_colors(species: np.ndarray) -> np.ndarray:
    """Jmol element colours ``(n, 3)`` (RGB in [0, 1]) for atomic numbers ``(n,)``: C grey, H white,
    N blue, O red, S yellow, Cl green, ..."""
    return np.asarray(jmol_colors, dtype=float)[np.asarray(species, dtype=np.int64)]


def atom_radii(species: np.ndarray) -> np.ndarray:
    """Drawn ball radii (Å): half the covalent radius, at least 0.2 Å (so H stays visible)."""
    return np.maximum(0.5 * covalent_radii(species), 0.2)


def _view_rotation(pos: np.ndarray) -> np.ndarray:
    """Rows: screen x, screen y, depth (towards the viewer). Looks along the cluster's axis of least spread
    (principal axes of the atom cloud), so the drawing shows as much of the packing as possible."""
    x = pos.reshape(-1, 3) - pos.reshape(-1, 3).mean(0)
    _, vecs = np.linalg.eigh(x.T @ x)  # ascending eigenvalues
    rot = vecs[:, ::-1].T.copy()
    if np.linalg.det(rot) < 0:
        rot[2] *= -1
    return rot


def _nice_length(span: float) -> float:
    """The largest round scale-bar length (Å) not above a fifth of ``span``."""
    return float(max([L for L in (1, 2, 5, 10, 20, 50, 100) if L <= span / 5] or [1]))


def _panel_extents(half: list[float], ratio: float = 1.5) -> list[float]:
    """Half-widths (Å) of the panels' views. Panels of similar size (within ``ratio`` of the smallest, e.g.
    assembled and reference) share one scale so they compare directly; a much larger panel (a loose cluster)
    gets its own, and every panel's scale bar has the same length in Å, so the difference shows."""
    lo = min(half)
    group = max(h for h in half if h <= ratio * lo)
    return [group if h <= ratio * lo else h for h in half]


def render_clusters(panels: dict[str, np.ndarray], species: np.ndarray, png: str | Path, title: str = "",
                    subtitle: str = "", notes: dict[str, str] | None = None) -> Path:
    """Render each ``(M, n, 3)`` cluster as a ball-and-stick drawing in element colours.

    Args:
        panels: ``{"loose": pos, "assembled": pos, "reference": pos}`` (any names, in order); all panels share
            the view direction (from the last panel) and the scale.
        species: ``(n,)`` atomic numbers of one molecule.
        png: output path; the image is ``440 * len(panels)`` x 540 pixels.
        title: a readable name of the system (the formula and molecule count are added).
        subtitle: a second title line, e.g. PM-atom and clash figures.
        notes: per-panel text shown under each panel's name (e.g. ``{"assembled": "27 clashes"}``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.lines import Line2D
    from matplotlib.patches import Circle, Polygon

    species = np.asarray(species, dtype=np.int64)
    notes = notes or {}
    cols, radii = atom_colors(species), atom_radii(species)
    items = [(name, np.asarray(pos, dtype=float)) for name, pos in panels.items()]
    rot = _view_rotation(items[-1][1])
    proj = [(name, (pos - pos.reshape(-1, 3).mean(0)) @ rot.T) for name, pos in items]
    extents = _panel_extents([float(np.abs(x[..., :2]).max()) + 1.0 for _, x in proj])
    L = _nice_length(2 * min(extents))  # one scale-bar length for every panel
    fig = plt.figure(figsize=(PANEL_W * len(items), PANEL_H), dpi=DPI)
    for p, (name, x) in enumerate(proj):
        r = extents[p]
        ax = fig.add_axes((p / len(items) + 0.01, 0.065, 1 / len(items) - 0.02, 0.735))
        bonds = np.argwhere(np.triu(bond_graph(species, x[0]) if len(x) else np.zeros((0, 0), bool)))
        z = x[..., 2]
        zlo, zhi = z.min(), z.max()

        def fade(c, depth, zlo=zlo, zhi=zhi):
            f = FOG * (zhi - depth) / max(zhi - zlo, 1e-9)  # 0 at the front, FOG at the back
            return tuple(np.asarray(c) * (1 - f) + f)

        shapes = []  # (depth, patch, face colour, edge colour)
        for m in range(x.shape[0]):
            for a in range(len(species)):
                shapes.append((z[m, a], Circle(x[m, a, :2], radii[a]), fade(cols[a], z[m, a]),
                               fade((0.15, 0.15, 0.15), z[m, a])))
            for a, b in bonds:
                pa, pb = x[m, a], x[m, b]
                d = pb[:2] - pa[:2]
                ln = np.linalg.norm(d)
                if ln < 1e-6:
                    continue
                nrm = np.array([-d[1], d[0]]) / ln * STICK
                mid = (pa[:2] + pb[:2]) / 2
                for end, atom in ((pa, a), (pb, b)):  # half-sticks, each in its atom's colour
                    depth = (end[2] + (pa[2] + pb[2]) / 2) / 2 - 1e-3  # just behind the atom it meets
                    quad = np.array([end[:2] + nrm, mid + nrm, mid - nrm, end[:2] - nrm])
                    shapes.append((depth, Polygon(quad, closed=True), fade(cols[atom], depth),
                                   fade((0.25, 0.25, 0.25), depth)))
        shapes.sort(key=lambda s: s[0])
        coll = PatchCollection([s[1] for s in shapes], facecolors=[s[2] for s in shapes],
                               edgecolors=[s[3] for s in shapes], linewidths=0.3)
        ax.add_collection(coll)
        ax.set_xlim(-r, r)
        ax.set_ylim(-r, r)
        ax.set_aspect("equal")
        ax.set_axis_off()
        # scale bar, bottom left
        x0, y0 = -r + 0.05 * r, -r + 0.05 * r
        ax.plot([x0, x0 + L], [y0, y0], color="k", lw=2.5, solid_capstyle="butt")
        ax.text(x0 + L / 2, y0 + 0.03 * r, f"{L:g} Å", ha="center", va="bottom", fontsize=9)
        zoom = r / min(extents)
        head = name + (f" (zoomed out ×{zoom:.1f})" if zoom > 1.01 else "") + (f"\n{notes[name]}" if notes.get(name) else "")
        ax.set_title(head, fontsize=9.5)
    # element key

    present = sorted(set(species.tolist()), key=lambda z_: (z_ != 6, z_ != 1, z_))
    handles = [Line2D([], [], ls="", marker="o", ms=8, markerfacecolor=atom_colors(np.array([z_]))[0],
                      markeredgecolor="0.15", label=chemical_symbols[z_]) for z_ in present]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False,
               handletextpad=0.2, columnspacing=1.0)
    n_mol = proj[0][1].shape[0]
    head = f"{title}: {hill_formula(species)} × {n_mol} molecules" if title else \
        f"{hill_formula(species)} × {n_mol} molecules"
    fig.suptitle(head + (f"\n{subtitle}" if subtitle else ""), fontsize=10, y=0.985, va="top")
    fig.savefig(png, dpi=DPI)
    plt.close(fig)
    return Path(png)


FLOOR_NAMES = {"do_nothing": "do-nothing", "undo_mean_expansion": "undo-expansion",
               "centroid_oracle": "centroid oracle", "symmetry_blind_oracle": "symmetry-blind oracle"}


def clash_text(c: dict | None) -> str:
    """``"27 clashes (8 molecules), shortest 0.31 Å"`` from :func:`kflow_mol.metrics.intermolecular_clashes`."""
    if not c:
        return ""
    n = int(c.get("clashes", 0))
    txt = f"{n} clash{'es' if n != 1 else ''}"
    if n:
        txt += f" ({int(c.get('clashing_molecules', 0))} molecules)"
    d = c.get("min_contact")
    if d is not None and np.isfinite(d):
        txt += f", shortest {d:.2f} Å"
    return txt


def figure_text(clashes: dict[str, dict], pm: dict[str, dict] | None = None,
                floors: dict[str, dict] | None = None) -> tuple[str, dict[str, str]]:
    """The subtitle and per-panel notes for :func:`render_clusters`.

    Args:
        clashes: panel name -> :func:`~kflow_mol.metrics.intermolecular_clashes` result.
        pm: panel name -> metrics with ``pm_atom`` (and ``pm_atom_symmetry_aware``) against the reference.
        floors: :func:`~kflow_mol.metrics.oracle_floors` result; every floor's PM-atom goes in the subtitle.

    Returns:
        ``(subtitle, notes)``.
    """
    pm, floors = pm or {}, floors or {}
    notes = {}
    for name in dict.fromkeys([*clashes, *pm]):
        parts = []
        if name in pm and pm[name].get("pm_atom") is not None:
            m = pm[name]
            parts.append(f"PM-atom {m['pm_atom']:.2f} Å"
                         + (f" (sym.-aware {m['pm_atom_symmetry_aware']:.2f})"
                            if m.get("pm_atom_symmetry_aware") is not None else ""))
        if name in clashes:
            parts.append(clash_text(clashes[name]))
        notes[name] = "\n".join(p for p in parts if p)
    fl = [f"{label} {floors[k]['pm_atom']:.2f}" for k, label in FLOOR_NAMES.items() if k in floors]
    sub = ("PM-atom floors (Å): " + ", ".join(fl)) if fl else "no reference: PM-atom unknown"
    return sub, notes
