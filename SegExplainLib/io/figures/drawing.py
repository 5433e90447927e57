"""The primitives of the overlays: a figure on its own canvas, colour limits, tiles and colour bars."""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

TILE_INCHES = 2.2

def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # its own Agg canvas: no pyplot, no global backend
    return figure


def colour_limits(maps: np.ndarray, shared_scale: bool) -> list[float]:
    per_channel = np.abs(maps).reshape(maps.shape[0], -1).max(axis=1).astype(np.float64)
    if shared_scale:
        per_channel[:] = per_channel.max()
    # An all-zero channel gets limits ±1: nothing is overlaid and the colour bar stays readable.
    return [float(v) if v > 0 else 1.0 for v in per_channel]


def draw_tile(
    ax: matplotlib.axes.Axes,
    grey: np.ndarray,
    relevance: np.ndarray,
    *,
    grey_range: tuple[float, float],
    limit: float,
    cmap: matplotlib.colors.Colormap,
    alpha: float,
    aspect: float,
) -> None:
    """Grey image with the relevance overlaid; the overlay's opacity is ``alpha * |R| / limit``."""
    ax.imshow(grey, cmap="gray", vmin=grey_range[0], vmax=grey_range[1], interpolation="nearest", aspect=aspect)
    norm = Normalize(vmin=-limit, vmax=limit)
    rgba = cmap(norm(relevance.astype(np.float64)))
    rgba[..., 3] = alpha * np.clip(np.abs(relevance) / limit, 0.0, 1.0)
    ax.imshow(rgba, interpolation="nearest", aspect=aspect)
    ax.set_xticks([])
    ax.set_yticks([])


def add_colorbar(figure: Figure, ax: object, *, limit: float, cmap: matplotlib.colors.Colormap, name: str) -> None:
    mappable = ScalarMappable(norm=Normalize(vmin=-limit, vmax=limit), cmap=cmap)
    bar = figure.colorbar(mappable, ax=ax, shrink=0.85)
    bar.ax.set_label(f"colorbar:{name}")
    bar.ax.tick_params(labelsize=7)


def display_aspect(spacing: tuple[float, float, float] | None, axis: int) -> float:
    """Display height / width of one pixel of a 2-D view with ``axis`` removed."""
    if spacing is None:
        return 1.0
    rows, cols = (a for a in range(3) if a != axis)
    return spacing[rows] / spacing[cols]


def grey_limits(values: np.ndarray) -> tuple[float, float]:
    low, high = float(values.min()), float(values.max())
    return (low, high) if high > low else (low - 0.5, high + 0.5)
