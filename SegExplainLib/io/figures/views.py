"""Views of a volume in the patient frame: how a slice is turned for display, its orientation letters, its position
in millimetres, and which slices a case's montage shows.

A view of the arrays ``(D, H, W)`` with one axis removed is turned (transposed and flipped, never resampled) to the
radiological convention a clinician reads: the axis closest to the patient's left-right runs across the screen
with the patient's left on the right (L), else the anterior-posterior axis with posterior on the right (P); the
other axis runs down towards posterior (P) or inferior (I). An oblique axis is named by its largest component.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..imaging import Geometry, index_to_physical

# LPS axis (x, y, z) to the letter of its positive and of its negative direction.
_POSITIVE_LETTERS = ("L", "P", "S")
_NEGATIVE_LETTERS = ("R", "A", "I")
# Screen-down runs towards +x (L), +y (P) or -z (I): sagittal and coronal views show superior at the top.
_DOWN_SIGN = (1.0, 1.0, -1.0)
# Slicer names a slice by its RAS coordinate along the axis it cuts: R, A or S.
_RAS_LETTERS = ("R", "A", "S")
# RAS axis (x, y, z) to the letter of its negative direction.
_RAS_NEGATIVE_LETTERS = ("L", "P", "I")


@dataclass(frozen=True)
class View:
    """How a 2-D slice (rows: the first remaining array axis, columns: the second) is shown.

    Attributes:
        axis: The array axis (0 D, 1 H, 2 W) that is sliced or projected away.
        transpose: Swap rows and columns first.
        flip_rows: Then reverse the rows.
        flip_cols: Then reverse the columns.
        letters: The patient directions at the ``"left"``, ``"right"``, ``"top"`` and ``"bottom"`` edges.
        through: The patient axis the view cuts or projects along, ``"R-L"``, ``"A-P"`` or ``"S-I"``.
    """

    axis: int
    transpose: bool
    flip_rows: bool
    flip_cols: bool
    letters: dict[str, str]
    through: str

    def show(self, plane: np.ndarray) -> np.ndarray:
        """The slice as it is displayed (a view of ``plane``, no copy)."""
        shown = plane.T if self.transpose else plane
        return shown[::-1 if self.flip_rows else 1, ::-1 if self.flip_cols else 1]


def _lps_direction(geometry: Geometry, array_axis: int) -> np.ndarray:
    """The LPS unit vector of an array axis: (D, H, W) are the index axes (z, y, x)."""
    return np.reshape(geometry.direction, (3, 3))[:, 2 - array_axis]


def view_of(geometry: Geometry, axis: int) -> View:
    """The display of the views of ``geometry``'s arrays with array ``axis`` removed.

    Example:
        >>> view_of(Geometry((1, 1, 3), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (64, 64, 20)), 0).letters
        {'left': 'R', 'right': 'L', 'top': 'A', 'bottom': 'P'}
    """
    rows, cols = (a for a in range(3) if a != axis)
    vectors = {a: _lps_direction(geometry, a) for a in (rows, cols)}
    dominant = {a: int(np.argmax(np.abs(vectors[a]))) for a in (rows, cols)}
    # Across the screen goes the axis closest to x (L), else to y (P); at a tie the array's column axis.
    across, down = (rows, cols) if dominant[rows] < dominant[cols] else (cols, rows)
    across_patient, down_patient = dominant[across], dominant[down]
    flip_cols = vectors[across][across_patient] < 0
    flip_rows = vectors[down][down_patient] * _DOWN_SIGN[down_patient] < 0
    down_letters = (_POSITIVE_LETTERS if _DOWN_SIGN[down_patient] > 0 else _NEGATIVE_LETTERS)[down_patient]
    up_letters = (_NEGATIVE_LETTERS if _DOWN_SIGN[down_patient] > 0 else _POSITIVE_LETTERS)[down_patient]
    normal = int(np.argmax(np.abs(_lps_direction(geometry, axis))))
    return View(
        axis=axis,
        transpose=across == rows,
        flip_rows=bool(flip_rows),
        flip_cols=bool(flip_cols),
        letters={"left": _NEGATIVE_LETTERS[across_patient], "right": _POSITIVE_LETTERS[across_patient],
                 "top": up_letters, "bottom": down_letters},
        through=("R-L", "A-P", "S-I")[normal],
    )


def slice_label(geometry: Geometry, axis: int, index: int) -> str:
    """The position of slice ``index`` along array ``axis`` as Slicer names it: its RAS coordinate (mm) along the
    patient axis the slice cuts, at the slice's centre, e.g. ``"S: 12.5 mm"``."""
    centre = [(n - 1) / 2.0 for n in geometry.shape]
    centre[axis] = float(index)
    ras = index_to_physical(centre, geometry, frame="ras")
    return position_label(_lps_direction(geometry, axis), ras)


def position_label(normal: np.ndarray, ras: np.ndarray) -> str:
    """The position of a slice through the RAS point ``ras`` with ``normal`` (any frame's axis order x, y, z; only
    its largest component counts) as Slicer names it, e.g. ``"S: 12.5 mm"``."""
    axis = int(np.argmax(np.abs(normal)))
    return f"{_RAS_LETTERS[axis]}: {ras[axis]:.1f} mm"


def direction_letter(ras_direction: np.ndarray) -> str:
    """The patient direction a RAS vector points to, named by its largest component: ``(-1, 0.1, 0)`` is ``"L"``."""
    lps = np.asarray(ras_direction, dtype=float) * (-1.0, -1.0, 1.0)
    axis = int(np.argmax(np.abs(lps)))
    return (_POSITIVE_LETTERS if lps[axis] > 0 else _NEGATIVE_LETTERS)[axis]


def _ras_letter(vector: np.ndarray) -> str:
    """The patient direction a RAS vector points to most (an oblique one is named by its largest component)."""
    axis = int(np.argmax(np.abs(vector)))
    return (_RAS_LETTERS if vector[axis] > 0 else _RAS_NEGATIVE_LETTERS)[axis]


def slice_view_letters(slice_to_ras: np.ndarray) -> dict[str, str]:
    """The patient directions at the ``"left"``, ``"right"``, ``"top"`` and ``"bottom"`` edges of a slice view
    whose slice-to-RAS matrix (4 x 4; columns: the screen's right, up and normal in RAS) is ``slice_to_ras``, as
    Slicer's slice nodes give it.

    Example:
        >>> slice_view_letters(np.diag([-1.0, 1.0, 1.0, 1.0]))  # Slicer's axial view
        {'left': 'R', 'right': 'L', 'top': 'A', 'bottom': 'P'}
    """
    right, up = np.asarray(slice_to_ras, dtype=float)[:3, 0], np.asarray(slice_to_ras, dtype=float)[:3, 1]
    return {"left": _ras_letter(-right), "right": _ras_letter(right), "top": _ras_letter(up),
            "bottom": _ras_letter(-up)}


def slice_view_label(slice_to_ras: np.ndarray) -> str:
    """The position of a slice view's slice as :func:`slice_label` writes it: the RAS coordinate (mm) of the slice's
    centre along the patient axis closest to its normal, e.g. ``"S: 12.0 mm"`` for an axial slice."""
    matrix = np.asarray(slice_to_ras, dtype=float)
    normal = int(np.argmax(np.abs(matrix[:3, 2])))
    return f"{_RAS_LETTERS[normal]}: {matrix[normal, 3]:.1f} mm"


def slice_profile(magnitude: np.ndarray, axis: int) -> np.ndarray:
    """``|R|`` of each slice along array ``axis`` of a volume ``(D, H, W)`` of magnitudes, in float64."""
    return magnitude.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.float64)


def case_slices(profile: np.ndarray, region: np.ndarray | None, *, axis: int, count: int) -> list[int]:
    """Slices of a case's montage: ``count`` evenly spaced slices over the span of the region and of the slices
    where the relevance stands out, the one nearest the slice of most ``|R|`` moved onto it.

    A slice's relevance stands out when its ``|R|`` (summed over the slice and all sequences) exceeds the median
    slice's by at least a tenth of the most any slice does; weak relevance spread over the whole volume does not
    widen the span, so slices of noise before and after the region and the relevance are left out, and the slice
    where relevance peaks is always shown.

    Args:
        profile: The relevance's magnitude ``|R|`` of each slice along ``axis``, summed over the slice and all
            sequences (:func:`slice_profile`).
        region: The target region ``(D, H, W)`` (boolean, not empty) on the maps' grid, or None.
        axis: The array axis that is sliced.
        count: How many slices at most.

    Returns:
        Increasing, distinct slice indices.
    """
    excess = profile - np.median(profile)
    standing_out = np.flatnonzero(excess >= 0.1 * excess.max()) if excess.max() > 0 else np.array([], int)
    peak = int(np.argmax(profile)) if profile.max() > 0 else None
    ends = [int(standing_out[0]), int(standing_out[-1])] if standing_out.size else []
    if region is not None:
        hit = np.flatnonzero(region.any(axis=tuple(a for a in range(3) if a != axis)))
        ends += [int(hit[0]), int(hit[-1])]
    low, high = (min(ends), max(ends)) if ends else (0, profile.size - 1)  # nothing stands out: the whole axis
    span = high - low + 1
    shown = min(count, span)
    chosen = sorted({low + int(round(i * (span - 1) / max(shown - 1, 1))) for i in range(shown)})
    if peak is not None and low <= peak <= high and peak not in chosen:
        nearest = min(range(len(chosen)), key=lambda i: abs(chosen[i] - peak))
        chosen[nearest] = peak
    return sorted(set(chosen))
