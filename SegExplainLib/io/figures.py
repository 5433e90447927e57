"""Figures of relevance maps: maximum intensity projections, slice montages, relevance shares and inclusivity.

The figures follow the papers SegExplain builds on: Chatterjee et al. show maximum intensity projections (MIPs) and
slice montages of each MRI sequence with the relevance overlaid in red (positive) and blue (negative); the liver LRP
study shows the share of the relevance that each sequence carries, over 20 test patients; Tjoa et al. (figure 4)
show the inclusivity of filtered relevance as box plots.

Every function returns a :class:`matplotlib.figure.Figure` with its own Agg canvas. Nothing here touches pyplot's
global state, so figures can be made in worker threads and on headless machines; ``fig.canvas.draw()`` followed by
``np.asarray(fig.canvas.buffer_rgba())`` gives the rendered pixels, and :func:`save_figure` writes PNG or PDF.

Overlays: the relevance is drawn with a diverging colour map (``"RdBu_r"`` by default) centred on zero, with the
symmetric limits ``±max|R|`` of each sequence (or of all sequences with ``shared_scale=True``). The opacity of a
pixel grows with ``|R|`` up to ``alpha`` at the limit, so voxels without relevance show the grey image unchanged.

Axes carry labels (``Axes.get_label()``) so that programs and tests can find them: ``"image:<name>"`` for the image
axes of a MIP, ``"image:<name>:<slice>"`` for a montage tile, ``"colorbar:<name>"`` for the colour bar of a sequence,
``"shares"`` and ``"inclusivity"`` for the charts.

Example:
    >>> result = sx.explain(unet, image, sx.PredictedRegion(class_index=1), "lrp")
    >>> names = ["T1", "T1c", "T2", "FLAIR", "DWI", "ADC"]
    >>> save_figure(mip_figure(image, result.maps, sequence_names=names), "mip.png")
    >>> save_figure(montage_figure(image, result.maps, sequence_names=names, placement="relevance"), "montage.pdf")
"""

from __future__ import annotations

import math
import numbers
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ..engine.checks import check_choice
from ..errors import SegExplainError

__all__ = [
    "Placement",
    "ShareKind",
    "inclusivity_figure",
    "maximum_intensity_projection",
    "mip_figure",
    "montage_figure",
    "montage_slices",
    "save_figure",
    "shares_figure",
]

Placement = Literal["even", "relevance"]
ShareKind = Literal["positive", "negative", "absolute"]

AXIS_NAMES = ("D", "H", "W")
_FORMATS = {".png": "png", ".pdf": "pdf"}
# Bar colours of the shares chart: the ends of RdBu_r for positive and negative relevance.
_SHARE_COLOURS = {"positive": "#b2182b", "negative": "#2166ac", "absolute": "#707070"}
_TILE_INCHES = 2.2


# ----------------------------------------------------------------------------------------------------------------
# Validation


def _as_array(x: object, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.dtype == torch.bfloat16 else x  # numpy has no bfloat16
        array = x.numpy()
    else:
        try:
            array = np.asarray(x)
        except (TypeError, ValueError) as error:  # ragged lists
            raise SegExplainError(f"{name} must be an array of real numbers, got {type(x).__name__}") from error
    if array.dtype.kind not in "biuf":
        raise SegExplainError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise SegExplainError(f"{name} contains NaN or infinite values; expected finite numbers")
    return array


def _check_axis(axis: object) -> int:
    if not isinstance(axis, numbers.Integral) or isinstance(axis, bool) or not 0 <= axis <= 2:
        raise SegExplainError(f"axis must be 0, 1 or 2 (a spatial axis of (D, H, W)), got {axis!r}")
    return int(axis)


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise SegExplainError(f"{name} must be True or False, got {value!r}")
    return value


def _check_fraction(value: object, name: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise SegExplainError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_title(title: object) -> str | None:
    if title is not None and not isinstance(title, str):
        raise SegExplainError(f"title must be a string or None, got {title!r}")
    return title


def _check_cmap(cmap: object) -> matplotlib.colors.Colormap:
    if not isinstance(cmap, str) or cmap not in matplotlib.colormaps:
        raise SegExplainError(f"cmap must be the name of a matplotlib colour map such as 'RdBu_r', got {cmap!r}")
    return matplotlib.colormaps[cmap]


def _check_spacing(spacing: object) -> tuple[float, float, float] | None:
    if spacing is None:
        return None
    ok = isinstance(spacing, Sequence) and not isinstance(spacing, str) and len(spacing) == 3
    ok = ok and all(
        isinstance(s, numbers.Real) and not isinstance(s, bool) and math.isfinite(s) and s > 0 for s in spacing
    )
    if not ok:
        raise SegExplainError(f"spacing must be three positive voxel sizes (D, H, W), got {spacing!r}")
    return tuple(float(s) for s in spacing)  # type: ignore[return-value]


def _check_names(names: object, count: int) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise SegExplainError(f"sequence_names must be a list of {count} strings, got {names!r}")
    if len(names) != count:
        raise SegExplainError(f"sequence_names has {len(names)} names for {count} sequences; expected one per channel")
    for name in names:
        if not isinstance(name, str):
            raise SegExplainError(f"sequence_names must hold strings, got {name!r}")
    return list(names)


def _image_and_maps(image: object, maps: object, names: object) -> tuple[np.ndarray, np.ndarray, list[str]]:
    image_array = _as_array(image, "image")
    maps_array = _as_array(maps, "maps")
    if maps_array.ndim != 4:
        raise SegExplainError(f"maps must be shaped (C, D, H, W), got shape {maps_array.shape}")
    if image_array.shape != maps_array.shape:
        raise SegExplainError(
            f"image shape {image_array.shape} does not match maps shape {maps_array.shape}; expected the same (C, D, H, W)"
        )
    if maps_array.size == 0:
        raise SegExplainError(f"maps shape {maps_array.shape} is empty; expected at least one voxel per channel")
    return image_array, maps_array, _check_names(names, maps_array.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# Projections and slice choice


def maximum_intensity_projection(volume: object, *, axis: int = 0, signed: bool = True) -> np.ndarray:
    """Maximum intensity projection of a volume ``(D, H, W)`` along one spatial axis.

    Args:
        volume: Array or tensor ``(D, H, W)``.
        axis: The spatial axis projected away: 0 (D), 1 (H) or 2 (W).
        signed: For relevance: the value of largest ``|v|`` along the axis, with its sign, so that a strongly
            negative voxel is not hidden behind weak positive ones. At a tie between ``+a`` and ``-a`` the first
            along the axis wins. ``False`` gives the plain maximum (for images).

    Returns:
        The projection, shaped like the volume without ``axis`` (``(H, W)`` for ``axis=0``), in the volume's dtype.

    Raises:
        SegExplainError: The volume is not 3-D or not finite, the axis is not 0..2, or ``signed`` is not a bool.

    Example:
        >>> v = np.array([[[1.0]], [[-3.0]], [[2.0]]])          # (3, 1, 1)
        >>> maximum_intensity_projection(v)                     # signed: largest |v| keeps its sign
        array([[-3.]])
        >>> maximum_intensity_projection(v, signed=False)
        array([[2.]])
    """
    axis = _check_axis(axis)
    signed = _check_bool(signed, "signed")
    array = _as_array(volume, "volume")
    if array.ndim != 3:
        raise SegExplainError(f"volume must be shaped (D, H, W), got shape {array.shape}")
    if array.shape[axis] == 0:
        raise SegExplainError(f"volume shape {array.shape} is empty along axis {axis}; expected at least one slice")
    if not signed:
        return array.max(axis=axis)
    index = np.expand_dims(np.abs(array).argmax(axis=axis), axis)
    return np.take_along_axis(array, index, axis=axis).squeeze(axis)


def montage_slices(maps: object, *, axis: int = 0, slices: int = 8, placement: Placement = "even") -> list[int]:
    """The slice indices that :func:`montage_figure` shows.

    Args:
        maps: Relevance ``(C, D, H, W)``.
        axis: The spatial axis that is sliced: 0 (D), 1 (H) or 2 (W).
        slices: How many slices; more than the volume has gives every slice.
        placement: ``"even"``: the centres of ``slices`` equal bins along the axis. ``"relevance"``: the run of
            ``slices`` consecutive slices that holds the most ``|R|`` summed over all sequences (the first such
            run at a tie), i.e. the slices through the region of largest relevance.

    Returns:
        Increasing, distinct slice indices.

    Raises:
        SegExplainError: Bad maps, axis, count or placement.

    Example:
        >>> montage_slices(np.zeros((2, 20, 4, 4)), slices=4)
        [2, 7, 12, 17]
    """
    axis = _check_axis(axis)
    if not isinstance(slices, numbers.Integral) or isinstance(slices, bool) or slices < 1:
        raise SegExplainError(f"slices must be an integer >= 1, got {slices!r}")
    placement = check_choice(placement, "placement", Placement)
    array = _as_array(maps, "maps")
    if array.ndim != 4:
        raise SegExplainError(f"maps must be shaped (C, D, H, W), got shape {array.shape}")
    n = array.shape[axis + 1]
    if n == 0:
        raise SegExplainError(f"maps shape {array.shape} has no slices along axis {axis}; expected at least one")
    count = min(int(slices), n)
    if placement == "even":
        return [int((i + 0.5) * n / count) for i in range(count)]
    other = tuple(a for a in range(4) if a != axis + 1)
    per_slice = np.abs(array).astype(np.float64).sum(axis=other)
    window = np.convolve(per_slice, np.ones(count), mode="valid")
    start = int(np.argmax(window))
    return list(range(start, start + count))


# ----------------------------------------------------------------------------------------------------------------
# Drawing helpers


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # its own Agg canvas: no pyplot, no global backend
    return figure


def _limits(maps: np.ndarray, shared_scale: bool) -> list[float]:
    per_channel = np.abs(maps).reshape(maps.shape[0], -1).max(axis=1).astype(np.float64)
    if shared_scale:
        per_channel[:] = per_channel.max()
    # An all-zero channel gets limits ±1: nothing is overlaid and the colour bar stays readable.
    return [float(v) if v > 0 else 1.0 for v in per_channel]


def _draw_tile(
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


def _colorbar(figure: Figure, ax: object, *, limit: float, cmap: matplotlib.colors.Colormap, name: str) -> None:
    mappable = ScalarMappable(norm=Normalize(vmin=-limit, vmax=limit), cmap=cmap)
    bar = figure.colorbar(mappable, ax=ax, shrink=0.85)
    bar.ax.set_label(f"colorbar:{name}")
    bar.ax.tick_params(labelsize=7)


def _aspect(spacing: tuple[float, float, float] | None, axis: int) -> float:
    """Display height / width of one pixel of a 2-D view with ``axis`` removed."""
    if spacing is None:
        return 1.0
    rows, cols = (a for a in range(3) if a != axis)
    return spacing[rows] / spacing[cols]


def _grey_range(values: np.ndarray) -> tuple[float, float]:
    low, high = float(values.min()), float(values.max())
    return (low, high) if high > low else (low - 0.5, high + 0.5)


# ----------------------------------------------------------------------------------------------------------------
# Figures


def _overlay_inputs(image: Any, maps: Any, sequence_names: Any, axis: Any, alpha: Any, shared_scale: Any, cmap: Any,
                    title: Any, spacing: Any) -> tuple:
    """Validated options and arrays of the overlay figures, in the order they are unpacked."""
    axis = _check_axis(axis)
    alpha = _check_fraction(alpha, "alpha")
    shared_scale = _check_bool(shared_scale, "shared_scale")
    colours = _check_cmap(cmap)
    title = _check_title(title)
    voxel = _check_spacing(spacing)
    image_array, maps_array, names = _image_and_maps(image, maps, sequence_names)
    return axis, alpha, colours, title, voxel, image_array, maps_array, names, _limits(maps_array, shared_scale)


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

    figure = _new_figure(_TILE_INCHES * 1.3 * len(names), _TILE_INCHES + (0.6 if title else 0.3))
    axes = figure.subplots(1, len(names), squeeze=False)[0]
    for c, (ax, name) in enumerate(zip(axes, names)):
        grey = maximum_intensity_projection(image_array[c], axis=axis, signed=False)
        relevance = maximum_intensity_projection(maps_array[c], axis=axis, signed=True)
        _draw_tile(
            ax,
            grey,
            relevance,
            grey_range=_grey_range(grey),
            limit=limits[c],
            cmap=colours,
            alpha=alpha,
            aspect=_aspect(voxel, axis),
        )
        ax.set_title(name)
        ax.set_label(f"image:{name}")
        _colorbar(figure, ax, limit=limits[c], cmap=colours, name=name)
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

    figure = _new_figure(
        _TILE_INCHES * 0.8 * len(columns) + 1.2, _TILE_INCHES * 0.8 * len(names) + (0.6 if title else 0.3)
    )
    grid = figure.subplots(len(names), len(columns), squeeze=False)
    for c, name in enumerate(names):
        grey_range = _grey_range(image_array[c])
        for j, index in enumerate(columns):
            ax = grid[c, j]
            _draw_tile(
                ax,
                np.take(image_array[c], index, axis=axis),
                np.take(maps_array[c], index, axis=axis),
                grey_range=grey_range,
                limit=limits[c],
                cmap=colours,
                alpha=alpha,
                aspect=_aspect(voxel, axis),
            )
            ax.set_label(f"image:{name}:{index}")
            if c == 0:
                ax.set_title(f"{AXIS_NAMES[axis]}={index}", fontsize=9)
        grid[c, 0].set_ylabel(name)
        _colorbar(figure, list(grid[c]), limit=limits[c], cmap=colours, name=name)
    if title:
        figure.suptitle(title)
    return figure


def _jitter(count: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(-0.12, 0.12, size=count)


def _box_plot(ax: matplotlib.axes.Axes, columns: list[np.ndarray], labels: list[str], colour: str) -> None:
    """Box plots at x = 1..n with the individual values as jittered points; median lines get gid ``median:<label>``."""
    parts = ax.boxplot(
        columns,
        positions=np.arange(1, len(columns) + 1),
        widths=0.6,
        patch_artist=True,
        showfliers=False,
        medianprops={"color": "black", "linewidth": 2.0},
    )
    for box in parts["boxes"]:
        box.set_facecolor(colour)
        box.set_alpha(0.45)
    for line, label in zip(parts["medians"], labels):
        line.set_gid(f"median:{label}")
    rng = np.random.default_rng(0)  # fixed jitter: the same data give the same picture
    for x, values in enumerate(columns, start=1):
        ax.scatter(x + _jitter(values.size, rng), values, s=12, color="black", alpha=0.7, zorder=3, linewidths=0)
    ax.set_xticks(np.arange(1, len(columns) + 1))
    ax.set_xticklabels(labels)


def shares_figure(
    shares: object,
    *,
    sequence_names: Sequence[str],
    kind: ShareKind = "positive",
    title: str | None = None,
) -> Figure:
    """Share of the relevance per sequence: a bar chart for one case, box plots with points for several.

    For several cases this is the per-sequence distribution of the liver LRP study's "20 test patients" figure.
    Bars and boxes are red for ``kind="positive"``, blue for ``"negative"`` and grey for ``"absolute"``.

    Args:
        shares: ``(C,)`` for one case or ``(n_cases, C)``, e.g. from ``relevance_shares(maps, kind=kind)``.
        sequence_names: One name per channel.
        kind: Which relevance the shares are of; sets the colour and the axis label.
        title: Figure title, or None.

    Returns:
        A figure with an Agg canvas and one axes labelled ``"shares"``. Bar patches carry gid ``"share:<name>"``,
        median lines of the box plots ``"median:<name>"``.

    Raises:
        SegExplainError: Empty or non-finite shares, not 1-D or 2-D, wrong number of names, bad kind.

    Example:
        >>> per_case = np.stack([relevance_shares(e.maps) for e in explanations])     # (20, 6)
        >>> fig = shares_figure(per_case, sequence_names=names)
    """
    kind = check_choice(kind, "kind", ShareKind)
    title = _check_title(title)
    array = _as_array(shares, "shares").astype(np.float64)
    if array.ndim not in (1, 2):
        raise SegExplainError(f"shares must be shaped (C,) or (n_cases, C), got shape {array.shape}")
    if array.size == 0:
        raise SegExplainError(f"shares shape {array.shape} is empty; expected at least one case and one sequence")
    names = _check_names(sequence_names, array.shape[-1])

    figure = _new_figure(max(3.0, 0.8 * len(names) + 1.5), 3.2)
    ax = figure.add_subplot()
    ax.set_label("shares")
    colour = _SHARE_COLOURS[kind]
    positions = np.arange(1, len(names) + 1)
    if array.ndim == 1:
        bars = ax.bar(positions, array, width=0.6, color=colour)
        for bar, name in zip(bars, names):
            bar.set_gid(f"share:{name}")
        ax.set_xticks(positions)
        ax.set_xticklabels(names)
    else:
        _box_plot(ax, [array[:, c] for c in range(len(names))], names, colour)
        ax.set_xlabel(f"{array.shape[0]} cases")
    ax.set_xlim(0.4, len(names) + 0.6)
    ax.set_ylabel(f"share of {kind} relevance")
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    return figure


def inclusivity_figure(
    values: Mapping[str, object],
    *,
    title: str | None = None,
    ylabel: str = "inclusivity",
) -> Figure:
    """Box plots of per-case values over filters (Tjoa et al., figure 4), with the individual values as points.

    Args:
        values: Filter label (e.g. ``"pass:0.4"``) to a 1-D array of per-case values, in display order.
        title: Figure title, or None.
        ylabel: Label of the value axis.

    Returns:
        A figure with an Agg canvas and one axes labelled ``"inclusivity"``; box ``i`` (at x = i + 1) shows the
        ``i``-th label, and its median line carries gid ``"median:<label>"``.

    Raises:
        SegExplainError: Not a mapping, no filters, a label that is not a string, or values that are not a
            non-empty, finite 1-D array.

    Example:
        >>> fig = inclusivity_figure({"none": base, "pass:0.4": passed, "clamp:0.2": clamped}, title="FLAIR")
    """
    title = _check_title(title)
    if not isinstance(ylabel, str):
        raise SegExplainError(f"ylabel must be a string, got {ylabel!r}")
    if not isinstance(values, Mapping):
        raise SegExplainError(
            f"values must map filter labels to arrays of per-case values, got {type(values).__name__}"
        )
    if not values:
        raise SegExplainError("values is empty; expected at least one filter label with its per-case values")
    labels: list[str] = []
    columns: list[np.ndarray] = []
    for label, column in values.items():
        if not isinstance(label, str):
            raise SegExplainError(f"values keys must be filter labels (strings), got {label!r}")
        array = _as_array(column, f"values[{label!r}]").astype(np.float64)
        if array.ndim != 1 or array.size == 0:
            raise SegExplainError(
                f"values[{label!r}] must be a non-empty 1-D array of per-case values, got shape {array.shape}"
            )
        labels.append(label)
        columns.append(array)

    figure = _new_figure(max(3.0, 0.9 * len(labels) + 1.5), 3.2)
    ax = figure.add_subplot()
    ax.set_label("inclusivity")
    _box_plot(ax, columns, labels, "#9ecae1")
    ax.set_xlim(0.4, len(labels) + 0.6)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if len(labels) > 4:
        for tick in ax.get_xticklabels():
            tick.set_rotation(30)
            tick.set_horizontalalignment("right")
    if title:
        ax.set_title(title)
    return figure


# ----------------------------------------------------------------------------------------------------------------
# Saving


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: float = 120, close: bool = True) -> Path:
    """Write a figure as PNG or PDF (by the suffix of ``path``) atomically.

    The figure is written to a hidden temporary file in the target folder, which then replaces ``path`` with
    ``os.replace``: a reader never sees a half-written file, and no temporary file is left behind, also when
    writing fails.

    Args:
        fig: The figure, e.g. from :func:`mip_figure`.
        path: Target file ending in ``.png`` or ``.pdf`` (any case); its folder must exist.
        dpi: Resolution in dots per inch (for PDF, of embedded raster images).
        close: Close the figure afterwards, whether or not writing succeeded: a pyplot-managed figure is closed
            through pyplot, any other figure is cleared to free its artists.

    Returns:
        The path written.

    Raises:
        SegExplainError: Not a figure, an unknown suffix, a missing folder, a path that is a folder, or bad dpi.

    Example:
        >>> save_figure(mip_figure(image, maps, sequence_names=names), "out/mip.png", dpi=150)
    """
    if not isinstance(fig, Figure):
        raise SegExplainError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    if not isinstance(dpi, numbers.Real) or isinstance(dpi, bool) or not math.isfinite(dpi) or dpi <= 0:
        raise SegExplainError(f"dpi must be a positive number, got {dpi!r}")
    close = _check_bool(close, "close")
    if not isinstance(path, (str, os.PathLike)):
        raise SegExplainError(f"path must be a file path ending in .png or .pdf, got {path!r}")
    target = Path(path)
    file_format = _FORMATS.get(target.suffix.lower())
    if file_format is None:
        raise SegExplainError(f"path {str(target)!r} has suffix {target.suffix!r}; expected .png or .pdf")
    folder = target.parent
    if not folder.is_dir():
        raise SegExplainError(
            f"folder {str(folder)!r} of path {str(target)!r} does not exist; expected an existing folder"
        )
    if target.is_dir():
        raise SegExplainError(f"path {str(target)!r} is a folder; expected a file path ending in .png or .pdf")

    temporary = folder / f".{target.name}.{secrets.token_hex(6)}.tmp"
    try:
        # 0o666 under the process umask, like an ordinary new file (mkstemp would leave 0o600).
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, "wb") as stream:
            fig.savefig(stream, format=file_format, dpi=float(dpi))
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        if close:
            _close(fig)
    return target


def _close(fig: Figure) -> None:
    manager = getattr(fig.canvas, "manager", None)
    if manager is not None:  # made through pyplot: let pyplot forget it
        from matplotlib import pyplot

        pyplot.close(fig)
    else:
        fig.clear()
