"""Pictures: the assembly render (element colours, bonds, size) and the PM histogram (one line per floor)."""

import numpy as np
import pytest

pytest.importorskip("matplotlib")


def _water_cluster(m=3, spacing=6.0):
    species = np.array([8, 1, 1])
    mol = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    return species, np.stack([mol + [spacing * i, 0.3 * i, 0.1 * i] for i in range(m)])


def test_render_size_element_colours_and_bonds(tmp_path):
    import matplotlib.image as mpimg

    from kflow_mol.render import atom_colors, hill_formula, render_clusters

    species, pos = _water_cluster()
    png = render_clusters({"loose": pos * 2, "assembled": pos}, species, tmp_path / "r.png", title="water",
                          subtitle="PM-atom floors", notes={"assembled": "0 clashes"})
    img = mpimg.imread(png)
    assert img.shape[:2] == (540, 880)
    assert hill_formula(species) == "H2O" and hill_formula(np.array([6, 1, 1, 1, 1, 17])) == "CH4Cl"
    red = atom_colors(np.array([8]))[0]  # Jmol oxygen red
    assert red[0] > 0.9 and red[1] < 0.2
    rgb = img[..., :3]
    is_red = (rgb[..., 0] > 0.85) & (rgb[..., 1] < 0.25) & (rgb[..., 2] < 0.25)
    assert is_red[:, 440:].sum() > 30  # O atoms drawn in red in the assembled panel (not a per-molecule colour)


def test_render_draws_bonds_from_the_bond_rule(tmp_path, monkeypatch):
    import matplotlib.collections as mc

    from kflow_mol import render

    species, pos = _water_cluster(m=2)
    seen = []
    orig = mc.PatchCollection.__init__

    def spy(self, patches, *a, **k):
        seen.append(list(patches))
        orig(self, patches, *a, **k)

    monkeypatch.setattr(mc.PatchCollection, "__init__", spy)
    render.render_clusters({"c": pos}, species, tmp_path / "b.png")
    kinds = [type(p).__name__ for p in seen[0]]
    # 2 molecules x (3 atoms, 2 O-H bonds drawn as 2 half-sticks each)
    assert kinds.count("Circle") == 6 and kinds.count("Polygon") == 8


def test_figure_text_lists_every_floor_and_clashes():
    from kflow_mol.render import figure_text

    floors = {k: {"pm_atom": v} for k, v in
              [("do_nothing", 15.0), ("undo_mean_expansion", 4.0), ("centroid_oracle", 3.5),
               ("symmetry_blind_oracle", 1.7)]}
    clash = {"clashes": 27, "clashing_molecules": 8, "min_contact": 0.31}
    sub, notes = figure_text({"assembled": clash}, {"assembled": {"pm_atom": 3.77}}, floors)
    for word in ("do-nothing 15.00", "undo-expansion 4.00", "centroid oracle 3.50", "symmetry-blind oracle 1.70"):
        assert word in sub
    assert notes["assembled"] == "PM-atom 3.77 Å\n27 clashes (8 molecules), shortest 0.31 Å"


def test_pm_histogram_draws_one_line_per_floor(tmp_path):
    from kflow_mol.evaluate import pm_histogram

    per = [{"pm_atom": 3.0 + i, "pm_atom_symmetry_aware": 2.5 + i} for i in range(4)]
    keys = ["do_nothing", "undo_mean_expansion", "centroid_oracle", "orientation_oracle", "symmetry_blind_oracle"]
    result = {"per_cluster": per, "model": {"pm_atom": 4.5}, **{k: {"pm_atom": 1.0 + j} for j, k in enumerate(keys)}}
    labels = pm_histogram(result, tmp_path / "h.png")
    assert len(labels) == 6 and labels[-1].startswith("model mean")
    for word in ("do-nothing", "undo-expansion", "centroid oracle", "orientation oracle", "symmetry-blind oracle"):
        assert sum(word in lab for lab in labels) == 1
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    assert pm_histogram({"per_cluster": []}, tmp_path / "none.png") == [] and not (tmp_path / "none.png").exists()
