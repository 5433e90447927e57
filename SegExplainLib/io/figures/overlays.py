"""Relevance over the images: the MIP figure and the slice montage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .checks import check_axis, check_bool, check_cmap, check_fraction, check_spacing, check_title, image_and_maps
from .drawing import TILE_INCHES, add_colorbar, colour_limits, display_aspect, draw_tile, grey_limits, new_figure
from .projections import AXIS_NAMES, Placement, maximum_intensity_projection, montage_slices


def _overlay_inputs(image: Any, maps: Any, sequence_names: Any, axis: Any, alpha: Any, shared_scale: Any, cmap: Any,
                    title: Any, spacing: Any) -> tuple:
    """Validated options and arrays of the overlay figures, in the order they are unpacked."""
    axis = check_axis(axis)
    alpha = check_fraction(alpha, "alpha")
    shared_scale = check_bool(shared_scale, "shared_scale")
    colours = check_cmap(cmap)
    title = check_title(title)
    voxel = check_spacing(spacing)
    image_array, maps_array, names = image_and_maps(image, maps, sequence_names)
    return axis, alpha, colours, title, voxel, image_array, maps_array, names, colour_limits(maps_array, shared_scale)


def mip_figure(
    image: object,
    maps: object,
    *,
    sequence_names: Sequence[str],
    axis: int = 0,
    title: str | None = None,
    alpha: float = 0.6,
    shared_scale: bool = False,
    cmap: str = "RdBu_r",
    spacing: Sequence[float] | None = None,
) -> Figure:
    """Maximum intensity projections of each sequence with its relevance overlaid (Chatterjee et al.).

    One column per sequence: the image MIP (:func:`maximum_intensity_projection`, unsigned) in grey, the signed
    relevance MIP overlaid with a diverging colour map centred on zero, a colour bar, and the sequence name as
    the title. The rows of each view are the first remaining spatial axis, drawn top to bottom.

    Args:
        image: Image ``(C, D, H, W)``, one channel per MRI sequence.
        maps: Relevance ``(C, D, H, W)`` on the same grid, e.g. ``Explanation.maps``.
        sequence_names: One name per channel.
        axis: The spatial axis projected away: 0 (D), 1 (H) or 2 (W).
        title: Figure title, or None.
        alpha: Opacity of the overlay at ``|R| = limit``, in [0, 1]; it falls linearly to 0 at ``R = 0``.
        shared_scale: Use one colour limit, ``max|R|`` over all sequences, instead of one per sequence, so that
            colours compare across sequences.
        cmap: Diverging matplotlib colour map for the relevance.
        spacing: Voxel size ``(D, H, W)`` (e.g. in mm) for the displayed aspect ratio, or None for square pixels.

    Returns:
        A figure with an Agg canvas and ``2 * C`` axes: the views (labelled ``"image:<name>"``) and the colour bars
        (``"colorbar:<name>"``).

    Raises:
        SegExplainError: Shape mismatch, wrong number of names, bad axis, alpha, cmap or spacing.

    Example:
        >>> fig = mip_figure(image, result.maps, sequence_names=["T1", "T2", "FLAIR"], axis=0)
    """
    axis, alpha, colours, title, voxel, image_array, maps_array, names, limits = _overlay_inputs(
        image, maps, sequence_names, axis, alpha, shared_scale, cmap, title, spacing)

    figure = new_figure(TILE_INCHES * 1.3 * len(names), TILE_INCHES + (0.6 if title else 0.3))
    axes = figure.subplots(1, len(names), squeeze=False)[0]
    for c, (ax, name) in enumerate(zip(axes, names)):
        grey = maximum_intensity_projection(image_array[c], axis=axis, signed=False)
        relevance = maximum_intensity_projection(maps_array[c], axis=axis, signed=True)
        draw_tile(
            ax,
            grey,
            relevance,
            grey_range=grey_limits(grey),
            limit=limits[c],
            cmap=colours,
            alpha=alpha,
            aspect=display_aspect(voxel, axis),
        )
        ax.set_title(name)
        ax.set_label(f"image:{name}")
        add_colorbar(figure, ax, limit=limits[c], cmap=colours, name=name)
    if title:
        figure.suptitle(title)
    return figure


def montage_figure(
    image: object,
    maps: object,
    *,
    sequence_names: Sequence[str],
    axis: int = 0,
    slices: int = 8,
    placement: Placement = "even",
    title: str | None = None,
    alpha: float = 0.6,
    shared_scale: bool = False,
    cmap: str = "RdBu_r",
    spacing: Sequence[float] | None = None,
) -> Figure:
    """Slice montage: rows are sequences, columns are slices, with the relevance overlaid (Chatterjee et al.).

    The grey range and the colour limit of a row come from the whole 3-D channel, not from the slices shown, so
    that tiles of one row compare.

    Args:
        image: Image ``(C, D, H, W)``.
        maps: Relevance ``(C, D, H, W)`` on the same grid.
        sequence_names: One name per channel; each row is labelled with its name.
        axis: The spatial axis that is sliced: 0 (D), 1 (H) or 2 (W).
        slices: Number of columns (at most the number of slices along ``axis``).
        placement: ``"even"`` or ``"relevance"``; see :func:`montage_slices`.
        title: Figure title, or None.
        alpha: Opacity of the overlay at ``|R| = limit``, in [0, 1].
        shared_scale: One colour limit for all sequences instead of one per sequence.
        cmap: Diverging matplotlib colour map for the relevance.
        spacing: Voxel size ``(D, H, W)`` for the displayed aspect ratio, or None.

    Returns:
        A figure with an Agg canvas: ``C * len(columns)`` tiles labelled ``"image:<name>:<slice>"``, column titles
        ``"<axis letter>=<slice>"`` on the first row, and one colour bar per row (``"colorbar:<name>"``).

    Raises:
        SegExplainError: Shape mismatch, wrong number of names, bad axis, slices < 1, bad placement or option.

    Example:
        >>> fig = montage_figure(image, result.maps, sequence_names=names, slices=6, placement="relevance")
    """
    axis, alpha, colours, title, voxel, image_array, maps_array, names, limits = _overlay_inputs(
        image, maps, sequence_names, axis, alpha, shared_scale, cmap, title, spacing)
    columns = montage_slices(maps_array, axis=axis, slices=slices, placement=placement)

    figure = new_figure(
        TILE_INCHES * 0.8 * len(columns) + 1.2, TILE_INCHES * 0.8 * len(names) + (0.6 if title else 0.3)
    )
    grid = figure.subplots(len(names), len(columns), squeeze=False)
    for c, name in enumerate(names):
        grey_range = grey_limits(image_array[c])
        for j, index in enumerate(columns):
            ax = grid[c, j]
            draw_tile(
                ax,
                np.take(image_array[c], index, axis=axis),
                np.take(maps_array[c], index, axis=axis),
                grey_range=grey_range,
                limit=limits[c],
                cmap=colours,
                alpha=alpha,
                aspect=display_aspect(voxel, axis),
            )
            ax.set_label(f"image:{name}:{index}")
            if c == 0:
                ax.set_title(f"{AXIS_NAMES[axis]}={index}", fontsize=9)
        grid[c, 0].set_ylabel(name)
        add_colorbar(figure, list(grid[c]), limit=limits[c], cmap=colours, name=name)
    if title:
        figure.suptitle(title)
    return figure
