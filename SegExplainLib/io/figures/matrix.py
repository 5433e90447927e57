"""The segment x segment matrix as a heatmap: rows the explained output segments, columns the input segments."""

from __future__ import annotations

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ...engine.segments import SegmentMatrix
from ...errors import SegExplainError
from .drawing import new_figure

# Cells at or above this share get white text: black would not read on the dark end of the colour map.
_WHITE_TEXT_FROM = 0.6


def segment_matrix_title(matrix: SegmentMatrix) -> list[str]:
    """The figure's title lines: method, case and what the values are."""
    composite = matrix.options.get("composite")
    method = f"{matrix.method} ({composite})" if composite else matrix.method
    source = "the predicted segmentation" if matrix.segmentation == "predicted" else "the given label map"
    return [f"Segment matrix: {method}{f', case {matrix.case}' if matrix.case else ''}",
            "Each row: where the positive relevance for finding that output segment lies,",
            "summed over the sequences, in % of the row's total (rows sum to 100 %);",
            f"columns: the segments of {source}"]


def segment_matrix_figure(matrix: SegmentMatrix) -> Figure:
    """A heatmap of ``matrix.shares`` with each value written in its cell, in percent.

    Rows are the explained output segments, columns the input segments (``background`` is everything outside all
    segments), named by the model's class names. A row whose class is predicted nowhere, or whose map has no positive
    relevance, is grey and says so. The colour bar runs from 0 to 100 % of the row's positive relevance.

    Returns:
        A figure with an Agg canvas; the heatmap's axes are labelled ``"segment_matrix"``, its colour bar
        ``"colorbar:segment_matrix"``, and each cell's text has gid ``"cell:<row>:<column>"``.

    Raises:
        SegExplainError: Not a :class:`~SegExplainLib.engine.segments.SegmentMatrix`, or one without rows or columns.
    """
    if not isinstance(matrix, SegmentMatrix):
        raise SegExplainError(f"matrix must be a SegmentMatrix, got {type(matrix).__name__}")
    rows, columns = len(matrix.rows), len(matrix.columns)
    if not rows or not columns:
        raise SegExplainError(f"the segment matrix has {rows} rows and {columns} columns; it needs one of each")
    # room for the four title lines and the colour bar's label even with two rows and two columns
    figure = new_figure(max(7.0, 1.0 * columns + 3.5), max(4.4, 0.6 * rows + 3.0))
    ax = figure.add_subplot()
    ax.set_label("segment_matrix")
    norm, cmap = Normalize(vmin=0.0, vmax=100.0), "Reds"
    percent = 100.0 * matrix.shares
    ax.imshow(np.ma.masked_invalid(percent), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_facecolor("#d9d9d9")  # the grey of rows without shares
    for i, status in enumerate(matrix.status):
        for j in range(columns):
            value = percent[i, j]
            text = status if np.isnan(value) and j == columns // 2 else "" if np.isnan(value) else f"{value:.0f} %"
            colour = "white" if not np.isnan(value) and value >= 100 * _WHITE_TEXT_FROM else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color=colour,
                    gid=f"cell:{matrix.rows[i]}:{matrix.columns[j]}")
    ax.set_xticks(range(columns), matrix.columns, rotation=30 if columns > 4 else 0, ha="right" if columns > 4
                  else "center")
    ax.set_yticks(range(rows), matrix.rows)
    ax.set_xlabel("input segment (where the relevance lies)")
    ax.set_ylabel("explained output segment")
    bar = figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.9)
    bar.ax.set_label("colorbar:segment_matrix")
    bar.set_label("share of the row's positive relevance (%)")
    figure.suptitle("\n".join(segment_matrix_title(matrix)), fontsize=9)
    return figure
