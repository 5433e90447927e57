"""A case's figures from what its explanation knows: ``mip.png``, ``montage.png`` and ``shares.png``, and the three
orthogonal views through the region (:func:`region_views`) that the Slicer module's report shows.

Each figure says what it shows: a title with the method (its composite or baseline), the target region, the class
and the target score (a negative or zero score in words), one colour scale shared by all sequences (a scale per
sequence only on request, and then said), a colour bar that says what red and blue mean, and views turned to the
radiological convention with their orientation letters and slice positions in millimetres (:mod:`.views`).
"""

from __future__ import annotations

import math
import numbers
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ...errors import SegExplainError
from ..imaging import Geometry
from .checks import check_bool, check_cmap, check_fraction, image_and_maps
from .panels import DPI, Sheet, colour_table, grey_window, overlay_pixels, resample, tile_size
from .projections import maximum_intensity_projection
from .views import View, case_slices, slice_label, slice_profile, view_of

_MARGIN = 12
_GAP = 6
_LABEL_WIDTH = 90  # a sequence name such as "T1-15min" at 9 points, clear of the first view
_BAR_WIDTH = 150  # the colour bar, its ticks and its two-line label
_LINE = 19  # pixels of a 9-point line at DPI, with its spacing
_SHARE_COLOURS = {"positive": "#b2182b", "negative": "#2166ac"}


def _check_record(record: object) -> dict[str, Any]:
    if not isinstance(record, Mapping):
        raise SegExplainError(f"record must be an explanation's record (Explanation.record()), got {record!r}")
    missing = [key for key in ("method", "options", "target", "target_score") if key not in record]
    if missing:
        raise SegExplainError(f"record lacks {', '.join(map(repr, missing))}; expected Explanation.record()")
    target, score = record["target"], record["target_score"]
    if not isinstance(target, Mapping) or not isinstance(target.get("class_index"), int) or "kind" not in target:
        raise SegExplainError(f"record['target'] must hold the target's kind and class_index, got {target!r}")
    if not isinstance(score, numbers.Real) or isinstance(score, bool) or not math.isfinite(score):
        raise SegExplainError(f"record['target_score'] must be a finite number, got {score!r}")
    return dict(record)


def _check_region(region: object, shape: tuple[int, ...]) -> np.ndarray | None:
    if region is None:
        return None
    array = np.asarray(region)
    if array.dtype != bool or array.shape != shape or not array.any():
        raise SegExplainError(
            f"region must be a non-empty boolean mask shaped {shape} (the maps' grid), got dtype {array.dtype} "
            f"shape {array.shape}")
    return array


def _checked_case(image: object, maps: object, sequence_names: Sequence[str], geometry: object, record: object,
                  region: object) -> tuple[list[str], np.ndarray, np.ndarray, list[str], np.ndarray | None]:
    """What every figure of a case checks first: the title from the record, the image and maps as arrays with their
    names, on ``geometry``'s grid, and the region mask (or None)."""
    if not isinstance(geometry, Geometry):
        raise SegExplainError(f"geometry must be a Geometry (from read_sequences), got {type(geometry).__name__}")
    title = explanation_title(record)
    image_array, maps_array, names = image_and_maps(image, maps, sequence_names)
    if maps_array.shape[1:] != geometry.shape:
        raise SegExplainError(
            f"maps shape {maps_array.shape} does not match the geometry's (D, H, W) {geometry.shape}")
    return title, image_array, maps_array, names, _check_region(region, geometry.shape)


def _region_text(target: Mapping[str, Any]) -> str:
    kind = target["kind"]
    if kind == "box":
        return "box " + "[" + ", ".join(f"{a}:{b}" for a, b in zip(target["start"], target["stop"])) + "]"
    if kind == "mask":
        return f"segment of {target['voxels']} voxels"
    if kind == "voxel":
        radius = f", radius {target['radius']:g}" if target.get("radius") else ""
        return f"voxel {tuple(target['index'])}{radius}"
    return {"predicted": "predicted region", "channel": "whole output channel"}.get(kind, f"{kind} target")


def _method_text(record: Mapping[str, Any]) -> str:
    options = record["options"] if isinstance(record["options"], Mapping) else {}
    details = []
    if options.get("composite"):
        details.append(f"composite {options['composite']}")
    baseline = options.get("baseline")
    if baseline is not None:
        details.append(f"baseline {baseline.get('type', baseline) if isinstance(baseline, Mapping) else baseline}")
    method = str(record["method"]).replace("_", " ")
    return f"{method} ({', '.join(details)})" if details else method


def explanation_title(record: Mapping[str, Any]) -> list[str]:
    """The lines of a case figure's title: method, region, class and target score, and, for a target score that
    is not positive, what that means for the colours and the shares.

    Example:
        >>> explanation_title(explanation.record())[0]
        'lrp (composite epsilon_plus_flat) | box [10:14, 8:20, 8:20], class 1 | target score -3596'
    """
    record = _check_record(record)
    target, score = record["target"], float(record["target_score"])
    lines = [f"{_method_text(record)} | {_region_text(target)}, class {target['class_index']} | "
             f"target score {score:.4g}"]
    if score < 0:
        lines.append(f"The target score is negative: the class {target['class_index']} logits over this region sum "
                     f"below zero (the model sees mostly not class {target['class_index']} there). Red marks evidence "
                     f"for the class, blue against it; the red and the blue shares are each of their own sign, "
                     f"not shares of the score.")
    elif score == 0:
        lines.append("The target score is zero: the evidence for the class (red) and against it (blue) cancel; the "
                     "shares are each of their own sign, not shares of the score.")
    return lines


def _bar_label(class_index: int) -> str:
    return f"relevance\nred: for, blue: against class {class_index}"


def _scale_line(limits: np.ndarray, per_panel: bool) -> str:
    if per_panel:
        return ("Colour scale per sequence (on request): each is scaled to its own max |R|, given beside its name; "
                "colours do not compare across sequences.")
    return f"One colour scale for all sequences: ±{limits[0]:.3g} (the largest |R| of any sequence)."


def _title(sheet: Sheet, lines: list[str]) -> None:
    sheet.text(_MARGIN, _MARGIN, "\n".join(lines), fontsize=9, ha="left", va="top", gid="title")


def _wrapped(lines: list[str], width: int) -> list[str]:
    characters = max(40, int((width - 2 * _MARGIN) / 8.5))  # a 9-point character is about 8.5 pixels wide at DPI
    return [part for line in lines for part in textwrap.wrap(line, characters)]


def _pixel_mm(geometry: Geometry, view: View) -> tuple[float, float]:
    """The displayed (height, width) in mm of one voxel of a view."""
    rows, cols = (a for a in range(3) if a != view.axis)
    spacing = geometry.spacing[::-1]  # (D, H, W) order
    return (spacing[cols], spacing[rows]) if view.transpose else (spacing[rows], spacing[cols])


@dataclass(frozen=True)
class _Statistics:
    """What the figures need of the maps, per sequence: ``max|R|``, the positive and the negative sum; and ``|R|``
    per slice along the first axis, over all sequences."""

    largest: np.ndarray
    positive: np.ndarray
    negative: np.ndarray
    profile: np.ndarray


def _statistics(maps: np.ndarray) -> _Statistics:
    # One sequence at a time through one buffer: a temporary the size of all the maps costs more in fresh memory
    # pages than the arithmetic (half a second for 6 x 155 x 240 x 240).
    buffer = np.empty(maps.shape[1:], dtype=maps.dtype)
    largest, positive, negative = (np.zeros(len(maps)) for _ in range(3))
    profile = np.zeros(maps.shape[1])
    for c, channel in enumerate(maps):
        np.abs(channel, out=buffer)
        largest[c] = buffer.max()
        profile += slice_profile(buffer, 0)
        positive[c] = np.maximum(channel, 0, out=buffer).sum(dtype=np.float64)
        negative[c] = -np.minimum(channel, 0, out=buffer).sum(dtype=np.float64)
    return _Statistics(largest, positive, negative, profile)


def _limits(largest: np.ndarray, per_panel: bool) -> np.ndarray:
    per_channel = largest.copy() if per_panel else np.full_like(largest, largest.max())
    # An all-zero map gets limits ±1: nothing is overlaid and the colour bar stays readable.
    return np.where(per_channel > 0, per_channel, 1.0)


def _mip_figure(image, maps, names, geometry, title, limits, per_panel, table, alpha, cmap, class_index) -> Figure:
    view = view_of(geometry, 0)
    shown = [view.show(maximum_intensity_projection(m, axis=0)) for m in maps]
    height, width = tile_size(shown[0].shape, _pixel_mm(geometry, view), 240)
    sheet_width = max(640, 2 * _MARGIN + len(names) * (width + _GAP) + _BAR_WIDTH)
    lines = _wrapped(title + [f"Maximum intensity projections along {view.through}. {_scale_line(limits, per_panel)}"],
                     sheet_width)
    top = _MARGIN + _LINE * len(lines) + _LINE + 4
    sheet = Sheet(sheet_width, top + height + _LINE + _MARGIN)
    _title(sheet, lines)
    for c, name in enumerate(names):
        left = _MARGIN + c * (width + _GAP)
        grey = view.show(maximum_intensity_projection(image[c], axis=0, signed=False))
        rgb = overlay_pixels(grey, shown[c], grey_range=grey_window(grey), limit=limits[c], table=table, alpha=alpha)
        sheet.paste(top, left, resample(rgb, height, width))
        caption = f"{name} (±{limits[c]:.2g})" if per_panel else name
        sheet.text(left + width / 2, top - 4, caption, fontsize=9, ha="center", va="bottom", gid=f"name:{name}")
        sheet.edge_letters(view.letters, top, left, height, width)
    bar_left = _MARGIN + len(names) * (width + _GAP) + 8
    sheet.colour_bar = (bar_left, top, 12, height, 1.0 if per_panel else float(limits[0]), cmap,
                        _bar_label(class_index))
    return sheet.figure()


def _montage_figure(image, maps, profile, names, geometry, region, title, limits, per_panel, table, alpha, cmap,
                    class_index, slices) -> Figure:
    view = view_of(geometry, 0)
    columns = case_slices(profile, region, axis=0, count=slices)
    height, width = tile_size(view.show(maps[0, 0]).shape, _pixel_mm(geometry, view), 150)
    sheet_width = max(640, _MARGIN + _LABEL_WIDTH + len(columns) * (width + _GAP) + _BAR_WIDTH)
    lines = _wrapped(title + [f"Slices through the region and the relevance, along {view.through}. "
                              f"{_scale_line(limits, per_panel)}"], sheet_width)
    top = _MARGIN + _LINE * len(lines) + _LINE + 4
    sheet = Sheet(sheet_width, top + len(names) * (height + _GAP) + _MARGIN)
    _title(sheet, lines)
    for j, index in enumerate(columns):
        left = _MARGIN + _LABEL_WIDTH + j * (width + _GAP)
        sheet.text(left + width / 2, top - 4, slice_label(geometry, 0, index), fontsize=8, ha="center",
                   va="bottom", gid=f"slice:{index}")
    for c, name in enumerate(names):
        row_top = top + c * (height + _GAP)
        grey_range = grey_window(image[c])
        caption = f"{name}\n±{limits[c]:.2g}" if per_panel else name
        sheet.text(_MARGIN, row_top + height / 2, caption, fontsize=9, ha="left", va="center", gid=f"name:{name}")
        for j, index in enumerate(columns):
            left = _MARGIN + _LABEL_WIDTH + j * (width + _GAP)
            rgb = overlay_pixels(view.show(image[c, index]), view.show(maps[c, index]), grey_range=grey_range,
                                 limit=limits[c], table=table, alpha=alpha)
            sheet.paste(row_top, left, resample(rgb, height, width))
            sheet.edge_letters(view.letters, row_top, left, height, width)
    bar_left = _MARGIN + _LABEL_WIDTH + len(columns) * (width + _GAP) + 8
    sheet.colour_bar = (bar_left, top, 12, min(len(names) * (height + _GAP) - _GAP, 320),
                        1.0 if per_panel else float(limits[0]), cmap, _bar_label(class_index))
    return sheet.figure()


def _shares_figure(statistics: _Statistics, names: list[str], title: list[str], class_index: int) -> Figure:
    # As metrics.relevance_shares gives them, from the sums at hand.
    shares = {kind: 100.0 * part / part.sum() if part.sum() > 0 else np.zeros_like(part)
              for kind, part in (("positive", statistics.positive), ("negative", statistics.negative))}
    width = max(640, 110 * len(names) + 120)
    lines = _wrapped(title + ["Share of each sequence in the relevance for and against the class score"], width)
    height = 300 + _LINE * len(lines)
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(figure)  # its own Agg canvas: no pyplot, no global backend
    figure.text(_MARGIN / width, 1.0 - _MARGIN / height, "\n".join(lines), fontsize=9, ha="left", va="top",
                gid="title")
    ax = figure.add_axes((70 / width, 40 / height, 1.0 - 90 / width, (height - 70 - _LINE * len(lines)) / height))
    ax.set_label("shares")
    positions = np.arange(len(names))
    for offset, (kind, label) in zip((-0.2, 0.2), (("positive", f"for class {class_index} (red)"),
                                                   ("negative", f"against class {class_index} (blue)"))):
        bars = ax.bar(positions + offset, shares[kind], width=0.38, color=_SHARE_COLOURS[kind], label=label)
        for bar, name, value in zip(bars, names, shares[kind]):
            bar.set_gid(f"share:{kind}:{name}")
            ax.text(bar.get_x() + bar.get_width() / 2, value + 1, f"{value:.0f}%", ha="center", va="bottom",
                    fontsize=7)
    ax.set_xticks(positions, names)
    ax.set_ylim(0, 110)
    ax.set_ylabel("share of the relevance (%)")
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return figure


def explanation_figures(
    image: object,
    maps: object,
    *,
    sequence_names: Sequence[str],
    geometry: Geometry,
    record: Mapping[str, Any],
    region: np.ndarray | None = None,
    per_panel_scale: bool = False,
    slices: int = 6,
    alpha: float = 0.7,
    cmap: str = "RdBu_r",
) -> dict[str, Figure]:
    """A case's figures: the MIPs, a slice montage and the shares, each saying what it shows.

    The views cut or project along the arrays' first axis (D), turned to the radiological convention with
    orientation letters (:func:`~.views.view_of`); montage slices are labelled with their RAS position in mm and
    chosen through the region and where the relevance is (:func:`~.views.case_slices`). The relevance is
    overlaid on the image in ``cmap`` with the opacity ``alpha * |R| / limit``.

    Args:
        image: The case ``(C, D, H, W)``, one channel per sequence, on ``geometry``.
        maps: Its relevance ``(C, D, H, W)`` on the same grid (``Explanation.maps``).
        sequence_names: One name per channel.
        geometry: The case's grid (spacing, origin, direction), e.g. from ``read_sequences``.
        record: The explanation's record, ``Explanation.record()``: method, options, target (kind, class_index
            and its geometry) and target_score are used.
        region: The target region as a boolean mask ``(D, H, W)`` on the maps' grid, or None: the montage then
            follows the relevance alone.
        per_panel_scale: One colour scale per sequence instead of one for all (colours then do not compare
            across sequences; the figures say so and give each sequence's limit).
        slices: The most slices the montage shows.
        alpha: Opacity of the overlay at the colour limit, in [0, 1].
        cmap: A diverging matplotlib colour map.

    Returns:
        ``{"mip.png": ..., "montage.png": ..., "shares.png": ...}``, figures with their own Agg canvas, for
        :func:`save_figure`.

    Raises:
        SegExplainError: Shapes that do not match each other or the geometry, a bad record, region or option.

    Example:
        >>> figures = explanation_figures(image, result.maps, sequence_names=names, geometry=geometry,
        ...                               record=result.record())
        >>> for filename, figure in figures.items():
        ...     save_figure(figure, folder / filename)
    """
    per_panel = check_bool(per_panel_scale, "per_panel_scale")
    alpha = check_fraction(alpha, "alpha")
    colours = check_cmap(cmap)
    if not isinstance(slices, numbers.Integral) or isinstance(slices, bool) or slices < 1:
        raise SegExplainError(f"slices must be an integer >= 1, got {slices!r}")
    title, image_array, maps_array, names, region_mask = _checked_case(image, maps, sequence_names, geometry, record,
                                                                        region)
    class_index = record["target"]["class_index"]
    statistics = _statistics(maps_array)
    limits = _limits(statistics.largest, per_panel)
    table = colour_table(colours)
    return {
        "mip.png": _mip_figure(image_array, maps_array, names, geometry, title, limits, per_panel, table, alpha,
                               colours, class_index),
        "montage.png": _montage_figure(image_array, maps_array, statistics.profile, names, geometry, region_mask,
                                       title, limits, per_panel, table, alpha, colours, class_index, int(slices)),
        "shares.png": _shares_figure(statistics, names, title, class_index),
    }


def _region_peak(record: Mapping[str, Any], magnitude: np.ndarray, region: np.ndarray | None) -> tuple[int, ...]:
    """The voxel the orthogonal views go through: the clicked voxel, else the region's voxel of most ``|R|``."""
    target = record["target"]
    if target["kind"] == "voxel":
        return tuple(int(i) for i in target["index"])
    inside = np.zeros(magnitude.shape, dtype=bool) if region is None else region.copy()
    if target["kind"] == "box":
        inside[tuple(slice(a, b) for a, b in zip(target["start"], target["stop"]))] = True
    elif region is None and target["kind"] == "mask" and target.get("bounds"):
        inside[tuple(slice(a, b) for a, b in target["bounds"])] = True  # the segment's bounding box
    if not inside.any():  # no region known (a segment, the predicted region or the channel): all voxels
        inside[...] = True
    return tuple(int(i) for i in np.unravel_index(np.argmax(np.where(inside, magnitude, -1.0)), magnitude.shape))


def region_views(
    image: object,
    maps: object,
    *,
    sequence_names: Sequence[str],
    geometry: Geometry,
    record: Mapping[str, Any],
    region: np.ndarray | None = None,
    heading: Sequence[str] = (),
    notes: Sequence[str] = (),
    width: int = 992,
    alpha: float = 0.7,
    cmap: str = "RdBu_r",
) -> Figure:
    """The three orthogonal views through the region, one row per sequence, on one colour scale for all sequences.

    The views cross at the clicked voxel, or at the region's voxel of most ``|R|`` summed over the sequences (a box
    or a segment's bounding box from the record, ``region`` if given, else the whole volume). Each is turned to the
    radiological convention with its orientation letters (:func:`~.views.view_of`) and headed by its position in mm
    (:func:`~.views.slice_label`); the title is :func:`explanation_title`, the colour bar says what red and blue
    mean, and ``notes`` (e.g. the shares and the warnings in words) follow the views as text.

    Args:
        image: The case ``(C, D, H, W)``, one channel per sequence, on ``geometry``.
        maps: Its relevance ``(C, D, H, W)`` on the same grid.
        sequence_names: One name per channel.
        geometry: The case's grid.
        record: The explanation's record (method, options, target, target_score).
        region: The target region as a boolean mask ``(D, H, W)``, or None.
        heading: Lines of text written above the title (e.g. a report's name and date).
        notes: Lines of text written under the views (wrapped to the width).
        width: The figure's width in pixels at 120 dpi (992: an A4 page's).
        alpha: Opacity of the overlay at the colour limit, in [0, 1].
        cmap: A diverging matplotlib colour map.

    Returns:
        The figure, with its own Agg canvas (texts, letters and colour bar as for :func:`explanation_figures`).

    Raises:
        SegExplainError: Shapes that do not match each other or the geometry, a bad record, region or option.

    Example:
        >>> save_figure(region_views(image, result.maps, sequence_names=names, geometry=geometry,
        ...                          record=result.record(), notes=["T2 carries 27 % of the positive relevance"]),
        ...             "views.pdf")
    """
    alpha = check_fraction(alpha, "alpha")
    colours = check_cmap(cmap)
    if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 480:
        raise SegExplainError(f"width must be an integer of at least 480 pixels, got {width!r}")
    for name, lines in (("heading", heading), ("notes", notes)):
        if isinstance(lines, str) or not all(isinstance(line, str) for line in lines):
            raise SegExplainError(f"{name} must be a sequence of lines of text, got {lines!r}")
    title, image_array, maps_array, names, region_mask = _checked_case(image, maps, sequence_names, geometry, record,
                                                                        region)
    statistics = _statistics(maps_array)
    limit = float(_limits(statistics.largest, False)[0])
    peak = _region_peak(record, np.abs(maps_array).sum(axis=0), region_mask)
    views = [view_of(geometry, axis) for axis in range(3)]
    tile = (width - 2 * _MARGIN - _LABEL_WIDTH - _BAR_WIDTH) // 3 - _GAP
    sizes = [tile_size(view.show(maps_array[0].take(peak[view.axis], axis=view.axis)).shape,
                      _pixel_mm(geometry, view), tile) for view in views]
    row_height = max(height for height, _ in sizes)
    lines = _wrapped(list(heading) + title + [f"Orthogonal views through voxel {peak} (index (k, j, i)). "
                              f"{_scale_line(np.array([limit]), False)}"], width)
    top = _MARGIN + _LINE * len(lines) + _LINE + 4
    notes_top = top + len(names) * (row_height + _GAP) + _LINE
    note_lines = _wrapped(list(notes), width)
    sheet = Sheet(int(width), notes_top + _LINE * len(note_lines) + _MARGIN)
    _title(sheet, lines)
    table = colour_table(colours)
    for j, view in enumerate(views):
        left = _MARGIN + _LABEL_WIDTH + j * (tile + _GAP)
        sheet.text(left + tile / 2, top - 4, f"{slice_label(geometry, view.axis, peak[view.axis])} "
                   f"(through {view.through})", fontsize=8, ha="center", va="bottom", gid=f"slice:{view.axis}")
    for c, name in enumerate(names):
        row_top = top + c * (row_height + _GAP)
        grey_range = grey_window(image_array[c])
        sheet.text(_MARGIN, row_top + row_height / 2, name, fontsize=9, ha="left", va="center", gid=f"name:{name}")
        for j, (view, (height, tile_width)) in enumerate(zip(views, sizes)):
            left = _MARGIN + _LABEL_WIDTH + j * (tile + _GAP)
            rgb = overlay_pixels(view.show(image_array[c].take(peak[view.axis], axis=view.axis)),
                                 view.show(maps_array[c].take(peak[view.axis], axis=view.axis)),
                                 grey_range=grey_range, limit=limit, table=table, alpha=alpha)
            sheet.paste(row_top, left, resample(rgb, height, tile_width))
            sheet.edge_letters(view.letters, row_top, left, height, tile_width)
    bar_left = _MARGIN + _LABEL_WIDTH + 3 * (tile + _GAP) + 8
    sheet.colour_bar = (bar_left, top, 12, min(len(names) * (row_height + _GAP) - _GAP, 320), limit, colours,
                        _bar_label(record["target"]["class_index"]))
    if note_lines:
        sheet.text(_MARGIN, notes_top, "\n".join(note_lines), fontsize=9, ha="left", va="top", gid="notes")
    return sheet.figure()


def rendered_montage(
    tiles: Sequence[np.ndarray],
    *,
    captions: Sequence[str],
    letters: Sequence[Mapping[str, str]],
    record: Mapping[str, Any],
    sequence_name: str,
    limit: float,
    cmap: matplotlib.colors.Colormap,
    columns: int = 4,
    note: str = "",
) -> Figure:
    """Views drawn elsewhere (e.g. by Slicer's slice views) laid out as a case figure that says what it shows.

    The title is :func:`explanation_title`; a line under it names the sequence, ``note`` and the colour scale. Each
    view is headed by its caption (its position in mm) and carries its orientation letters inside its edges; the
    colour bar gives the scale the views were drawn with and says what red and blue mean.

    Args:
        tiles: The views, uint8 RGB or RGBA images of one size, rows top to bottom.
        captions: One caption per view, e.g. ``"S: 12.0 mm"`` (:func:`~.views.slice_view_label`).
        letters: The patient directions at the ``"left"``, ``"right"``, ``"top"`` and ``"bottom"`` edges of each
            view (:func:`~.views.slice_view_letters`).
        record: The explanation's record (method, options, target, target_score).
        sequence_name: The sequence shown.
        limit: The views' colour limit, the scale shared by all sequences: ``±limit`` (positive).
        cmap: The colour map the overlay was drawn with, ``-limit`` to ``+limit``.
        columns: Views per row.
        note: Said after the sequence's name, e.g. how the views were drawn.

    Returns:
        The figure, with its own Agg canvas; texts with gids ``"title"``, ``"name:<sequence_name>"`` and
        ``"slice:<i>"`` for view ``i``, the letters and the colour bar as for :func:`explanation_figures`.

    Raises:
        SegExplainError: Views of different sizes or not uint8 images, captions or letters not one per view, a bad
            record, limit or option.
    """
    title = explanation_title(record)
    shapes = {np.shape(tile) for tile in tiles}
    if not tiles or len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[2] not in (3, 4) or any(
            np.asarray(tile).dtype != np.uint8 for tile in tiles):
        raise SegExplainError(f"tiles must be uint8 RGB or RGBA images of one size, got shapes {sorted(shapes)}")
    if len(captions) != len(tiles) or len(letters) != len(tiles):
        raise SegExplainError(f"captions and letters must be one per tile ({len(tiles)}), got {len(captions)} and "
                              f"{len(letters)}")
    if isinstance(limit, bool) or not isinstance(limit, numbers.Real) or not math.isfinite(limit) or limit <= 0:
        raise SegExplainError(f"limit must be a positive number, got {limit!r}")
    if isinstance(columns, bool) or not isinstance(columns, numbers.Integral) or columns < 1:
        raise SegExplainError(f"columns must be an integer >= 1, got {columns!r}")
    if not isinstance(cmap, matplotlib.colors.Colormap):
        raise SegExplainError(f"cmap must be a matplotlib Colormap, got {cmap!r}")
    height, width = next(iter(shapes))[:2]
    shown = min(int(columns), len(tiles))
    sheet_width = max(640, 2 * _MARGIN + shown * (width + _GAP) + _BAR_WIDTH)
    lines = _wrapped(title, sheet_width)
    name_top = _MARGIN + _LINE * len(lines)
    name_lines = _wrapped([f"{sequence_name}{': ' + note if note else ''}. {_scale_line(np.array([limit]), False)}"],
                          sheet_width)
    top = name_top + _LINE * len(name_lines) + _LINE + 4
    rows = -(-len(tiles) // shown)
    sheet = Sheet(sheet_width, top + rows * (height + _GAP + _LINE) + _MARGIN)
    _title(sheet, lines)
    sheet.text(_MARGIN, name_top, "\n".join(name_lines), fontsize=9, ha="left", va="top", gid=f"name:{sequence_name}")
    for i, (tile, caption, edges) in enumerate(zip(tiles, captions, letters)):
        row, column = divmod(i, shown)
        tile_top, left = top + row * (height + _GAP + _LINE), _MARGIN + column * (width + _GAP)
        sheet.paste(tile_top, left, np.asarray(tile)[..., :3])
        sheet.text(left + width / 2, tile_top - 4, caption, fontsize=8, ha="center", va="bottom", gid=f"slice:{i}")
        sheet.edge_letters(dict(edges), tile_top, left, height, width)
    sheet.colour_bar = (_MARGIN + shown * (width + _GAP) + 8, top, 12, min(rows * (height + _GAP + _LINE) - _GAP
                                                                           - _LINE, 320),
                        float(limit), cmap, _bar_label(record["target"]["class_index"]))
    return sheet.figure()
