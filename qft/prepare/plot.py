"""A heat map of the bits chosen per layer and matrix, drawn from a prepare report."""

from __future__ import annotations

import re
from pathlib import Path


def bits_heatmap(report, path: str | Path, title: str | None = None) -> Path:
    """Write a PNG: rows are layers, columns matrix kinds (q_proj, ...), colour the real bits/param."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the heat map needs matplotlib: pip install 'qft[plot]'") from err
    import numpy as np

    cells = {}
    for m in report.matrices:
        found = re.search(r"\.(\d+)\.", m.name)
        layer = int(found.group(1)) if found else 0
        cells[(layer, m.name.rsplit(".", 1)[-1])] = m.bits
    layers = sorted({layer for layer, _ in cells})
    kinds = list(dict.fromkeys(kind for _, kind in cells))
    grid = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), bits in cells.items():
        grid[layers.index(layer), kinds.index(kind)] = bits

    fig, ax = plt.subplots(figsize=(1.1 * len(kinds) + 2, 0.22 * len(layers) + 1.5))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), layers)
    ax.set_ylabel("layer")
    ax.set_title(title or f"bits per parameter (budget {report.budget}, average {report.bits:.3f})")
    fig.colorbar(image, ax=ax, label="bits / parameter")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
