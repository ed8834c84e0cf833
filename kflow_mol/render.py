"""Pictures of clusters: loose / assembled / reference side by side (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def render_clusters(panels: dict[str, np.ndarray], species: np.ndarray, png: str | Path, title: str = "") -> Path:
    """Render each ``(17, n, 3)`` cluster as a 3-D scatter, one colour per molecule, bonds as lines.

    Args:
        panels: ``{"loose": pos, "assembled": pos, "reference": pos}`` (any names, in order).
        species: ``(n,)`` atomic numbers (H drawn small).
        png: output path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    species = np.asarray(species)
    n = len(species)
    fig = plt.figure(figsize=(4.2 * len(panels), 4.4))
    cmap = plt.get_cmap("tab20")
    size = np.where(species == 1, 4, 14)
    # one scale for every panel, so a loose cluster looks as spread out as it is
    r = max(np.abs(np.asarray(v, dtype=float) - np.asarray(v, dtype=float).reshape(-1, 3).mean(0)).max()
            for v in panels.values())
    for p, (name, pos) in enumerate(panels.items()):
        pos = np.asarray(pos, dtype=float)
        ax = fig.add_subplot(1, len(panels), p + 1, projection="3d")
        centre = pos.reshape(-1, 3).mean(0)
        x = pos - centre
        d = np.linalg.norm(pos[0][:, None] - pos[0][None], axis=-1)
        bonds = np.argwhere(np.triu((d < 1.7) & (d > 0.1)))
        for m in range(pos.shape[0]):
            col = cmap(m % 20)
            ax.scatter(x[m, :, 0], x[m, :, 1], x[m, :, 2], s=size, color=col, depthshade=False)
            for a, b in bonds[:4 * n]:
                ax.plot(*zip(x[m, a], x[m, b]), color=col, lw=0.6)
        for setter in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
            setter(-r, r)
        ax.set_box_aspect(None, zoom=1.5)
        ax.set_title(name)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)
