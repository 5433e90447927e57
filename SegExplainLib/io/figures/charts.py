"""Charts over cases: the relevance shares of the sequences and the inclusivity of filtered relevance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from ...engine.checks import check_choice
from ...errors import SegExplainError
from .checks import as_array, check_names, check_title
from .drawing import new_figure

ShareKind = Literal["positive", "negative", "absolute"]

# Bar colours of the shares chart: the ends of RdBu_r for positive and negative relevance.
_SHARE_COLOURS = {"positive": "#b2182b", "negative": "#2166ac", "absolute": "#707070"}

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
    title = check_title(title)
    array = as_array(shares, "shares").astype(np.float64)
    if array.ndim not in (1, 2):
        raise SegExplainError(f"shares must be shaped (C,) or (n_cases, C), got shape {array.shape}")
    if array.size == 0:
        raise SegExplainError(f"shares shape {array.shape} is empty; expected at least one case and one sequence")
    names = check_names(sequence_names, array.shape[-1])

    figure = new_figure(max(3.0, 0.8 * len(names) + 1.5), 3.2)
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
    title = check_title(title)
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
        array = as_array(column, f"values[{label!r}]").astype(np.float64)
        if array.ndim != 1 or array.size == 0:
            raise SegExplainError(
                f"values[{label!r}] must be a non-empty 1-D array of per-case values, got shape {array.shape}"
            )
        labels.append(label)
        columns.append(array)

    figure = new_figure(max(3.0, 0.9 * len(labels) + 1.5), 3.2)
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
