"""Figures shared by the validation panels and the audit report: one style, readable at 100% zoom.

Figures are matplotlib ``Figure`` objects (not pyplot: no global backend or figure state in the user's process),
drawn at 100 dpi inside `style` (10-11 pt text), and sized in inches so that at 100% zoom a report page of about
1000 pixels shows them unscaled.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

DPI = 100
PANEL_COLUMNS = ["clean", "clean map", "attacked", "attacked map", "top-k clean", "top-k attacked"]


@contextmanager
def style() -> Iterator[None]:
    """Font sizes that stay legible at 100% zoom."""
    with matplotlib.rc_context(
        {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
         "legend.fontsize": 9, "figure.titlesize": 12, "figure.dpi": DPI}
    ):  # fmt: skip
        yield


def figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def grid(count: int, cols: int, width: float, height: float, extra_width: float = 0.0) -> tuple[Figure, list]:
    """A figure of ``count`` panels of ``width`` x ``height`` inches, at most ``cols`` per row; the unused cells of
    the last row are switched off. Returns the figure and the ``count`` axes in order."""
    cols = max(1, min(cols, count))
    rows = (count + cols - 1) // cols
    fig = figure(width * cols + extra_width, height * rows)
    axes = list(fig.subplots(rows, cols, squeeze=False).flatten())
    for ax in axes[count:]:
        ax.axis("off")
    return fig, axes[:count]


def png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def image_array(t: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> an array matplotlib shows: (H, W) for one channel, (H, W, C) otherwise."""
    array = t.detach().float().cpu().clamp(0, 1).numpy()
    return array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)


def heatmap(ax, matrix: Sequence[Sequence[float | None]], rows: Sequence[str], cols: Sequence[str], title: str) -> None:
    m = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    ax.imshow(m, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            text = "n/a" if np.isnan(m[i, j]) else f"{m[i, j]:.2f}"
            ax.text(j, i, text, ha="center", va="center", color="w" if np.isnan(m[i, j]) or m[i, j] < 0.6 else "k")
    ax.set_title(title)


def panel_figure(x, x_adv, clean, adv, masks, values: dict[str, torch.Tensor], title: str) -> Figure:
    """Rows of examples: clean image, its map, attacked image, its map, both top-k masks; metric values below."""
    n = x.shape[0]
    with style():
        fig = figure(1.6 * len(PANEL_COLUMNS), 1.75 * n + 0.6)
        axes = fig.subplots(n, len(PANEL_COLUMNS), squeeze=False)
        for i in range(n):
            panels = [image_array(x[i]), clean[i], image_array(x_adv[i]), adv[i], masks[0][i].float(),
                      masks[1][i].float()]  # fmt: skip
            for j, (ax, panel) in enumerate(zip(axes[i], panels, strict=True)):
                cmap = "gray" if j in (0, 2) and np.ndim(panel) == 2 else ("magma" if j in (1, 3) else "Greens")
                ax.imshow(np.asarray(panel), cmap=cmap)
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(PANEL_COLUMNS[j], fontsize=9)
            summary = ", ".join(f"{name} {v[i]:.2f}" for name, v in values.items() if name != "label kept")
            axes[i][0].set_ylabel(f"#{i}")
            axes[i][3].set_xlabel(summary, fontsize=8)
        fig.suptitle(title)
    return fig
