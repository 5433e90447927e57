"""Maximum intensity projections and the choice of a montage's slices."""

from __future__ import annotations

import numbers
from typing import Literal

import numpy as np

from ...engine.checks import check_choice
from ...errors import SegExplainError
from .checks import as_array, check_axis, check_bool

Placement = Literal["even", "relevance"]

AXIS_NAMES = ("D", "H", "W")

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
    axis = check_axis(axis)
    signed = check_bool(signed, "signed")
    array = as_array(volume, "volume")
    if array.ndim != 3:
        raise SegExplainError(f"volume must be shaped (D, H, W), got shape {array.shape}")
    if array.shape[axis] == 0:
        raise SegExplainError(f"volume shape {array.shape} is empty along axis {axis}; expected at least one slice")
    if not signed or array.dtype.kind in "bu":  # no negative values: the largest |v| is the maximum
        return array.max(axis=axis)
    # The largest and the smallest value along the axis: two fast reductions instead of an argmax of |v|.
    high, low = array.max(axis=axis), array.min(axis=axis)
    projection = np.where(high >= -low, high, low)
    tie = (high == -low) & (high != 0)
    if tie.any():  # +a and -a on one line: the first along the axis wins
        index = np.expand_dims(np.abs(array).argmax(axis=axis), axis)
        projection[tie] = np.take_along_axis(array, index, axis=axis).squeeze(axis)[tie]
    return projection


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
    axis = check_axis(axis)
    if not isinstance(slices, numbers.Integral) or isinstance(slices, bool) or slices < 1:
        raise SegExplainError(f"slices must be an integer >= 1, got {slices!r}")
    placement = check_choice(placement, "placement", Placement)
    array = as_array(maps, "maps")
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
