"""PNG of the embedding spectra over training: eigenvalues per step and effective rank per step.

Uses matplotlib's object API on an Agg canvas rather than pyplot, so it neither needs a display
nor changes the process-wide backend of a caller that plots too.
"""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import numpy as np

from clipjax import paths
from clipjax.metrics.embedding import MODALITIES

_TITLES = {"img": "image", "txt": "text"}


def plot_spectrum_history(records: Sequence[Mapping[str, Any]], path: str) -> str:
    """Write `path` from records holding `step`, `{img,txt}_spectrum`, `{img,txt}_effective_rank`.

    Top row: the eigenvalue spectrum (log-log) of each modality, one curve per record, coloured
    by step. Bottom: effective rank against step for both modalities. Returns `path`.
    """
    import matplotlib
    from matplotlib import cm, colors
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = sorted(records, key=lambda r: int(r["step"]))
    if not records:
        raise ValueError("plot_spectrum_history: no records to plot")
    steps = np.array([int(r["step"]) for r in records])
    norm = colors.Normalize(vmin=steps.min(), vmax=max(steps.max(), steps.min() + 1))
    cmap = matplotlib.colormaps["viridis"]

    fig = Figure(figsize=(11, 8), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, len(MODALITIES))
    for col, modality in enumerate(MODALITIES):
        ax = fig.add_subplot(grid[0, col])
        for step, record in zip(steps, records):
            eigs = np.asarray(record.get(f"{modality}_spectrum", ()), dtype=np.float64)
            k = np.arange(1, eigs.size + 1)
            # Exact zeros (clipped null space) have no logarithm; leave them off the curve.
            keep = eigs > 0
            if keep.any():
                ax.plot(k[keep], eigs[keep], color=cmap(norm(step)), linewidth=1.0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("eigenvalue index k")
        ax.set_ylabel("eigenvalue of the covariance")
        ax.set_title(f"{_TITLES[modality]} embedding spectrum")
        fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="step")

    ax = fig.add_subplot(grid[1, :])
    for modality in MODALITIES:
        key = f"{modality}_effective_rank"
        pts = [(int(r["step"]), float(r[key])) for r in records if key in r]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, marker="o", markersize=3, label=_TITLES[modality])
    ax.set_xlabel("step")
    ax.set_ylabel("effective rank (RankMe)")
    ax.grid(alpha=0.3)
    ax.legend()

    # Rendered in memory and written whole: the path may be a bucket, and a reader never sees
    # half a PNG.
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    paths.write_atomic(path, png.getvalue())
    return path
