"""Physical points and boxes (RAS or LPS) to voxel indices, and back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from ...errors import SegExplainError
from .geometry import LPS_FROM_RAS, Geometry, finite_floats, format_values

Frame = Literal["ras", "lps"]
FRAMES = ("ras", "lps")

def _check_frame(frame: Any) -> None:
    if frame not in FRAMES:
        msg = f"frame must be one of {FRAMES} (Slicer shows RAS, ITK uses LPS), got {frame!r}"
        raise SegExplainError(msg)


def _check_geometry(geometry: Any) -> None:
    if not isinstance(geometry, Geometry):
        msg = f"geometry must be a Geometry (from read_sequences), got {type(geometry).__name__}"
        raise SegExplainError(msg)


def _continuous_index(point: Any, geometry: Geometry, frame: str, what: str) -> np.ndarray:
    """The continuous (x, y, z) index of a physical point, checked to lie inside the volume."""
    lps = np.asarray(finite_floats(what, point, 3))
    if frame == "ras":
        lps = lps * LPS_FROM_RAS
    index = np.linalg.solve(geometry._matrix(), lps - np.asarray(geometry.origin))
    if np.any(index < -0.5) or np.any(np.floor(index + 0.5) > np.asarray(geometry.size) - 1):
        msg = (f"{what} {format_values(point)} ({frame.upper()}) lies outside the volume: voxel (x, y, z) "
               f"{format_values(index)} is not within {geometry.size}")
        raise SegExplainError(msg)
    return index


def physical_to_index(point: Sequence[float], geometry: Geometry, *, frame: Frame) -> tuple[int, int, int]:
    """The (d, h, w) index of the voxel that contains a physical point (mm).

    Rounds like ITK's ``TransformPhysicalPointToIndex`` (half-way up), so in LPS it returns that index reversed.

    Args:
        point: Three coordinates in mm, e.g. the position of a point clicked in Slicer (RAS).
        geometry: The grid of the images.
        frame: ``"ras"`` (Slicer, NIfTI viewers) or ``"lps"`` (ITK, DICOM). RAS = LPS with x and y negated.

    Raises:
        SegExplainError: The point lies outside the volume.

    Example:
        >>> d, h, w = physical_to_index((-12.5, 30.0, 8.0), geometry, frame="ras")
        >>> target = VoxelTarget((d, h, w), radius=2)
    """
    _check_geometry(geometry)
    _check_frame(frame)
    x, y, z = (int(v) for v in np.floor(_continuous_index(point, geometry, frame, "point") + 0.5))
    return z, y, x


def index_to_physical(index_dhw: Sequence[float], geometry: Geometry, *, frame: Frame) -> tuple[float, float, float]:
    """The physical position (mm) of the centre of voxel (d, h, w); continuous indices are allowed.

    Args:
        index_dhw: Voxel index in array order (d, h, w), e.g. the argmax of a relevance map.
        geometry: The grid of the images.
        frame: ``"ras"`` or ``"lps"``, the frame of the returned point.

    Raises:
        SegExplainError: The index lies outside the volume (beyond half a voxel from the edge voxels' centres).

    Example:
        >>> d, h, w = np.unravel_index(np.argmax(result.maps[0]), result.maps[0].shape)
        >>> index_to_physical((d, h, w), geometry, frame="ras")        # where to jump to in Slicer
        (-14.2, 28.8, 9.0)
    """
    _check_geometry(geometry)
    _check_frame(frame)
    d, h, w = finite_floats("index_dhw", index_dhw, 3)
    xyz = np.array([w, h, d])
    if np.any(xyz < -0.5) or np.any(np.floor(xyz + 0.5) > np.asarray(geometry.size) - 1):
        msg = f"index (d, h, w) {format_values((d, h, w))} lies outside the volume of shape {geometry.shape}"
        raise SegExplainError(msg)
    lps = np.asarray(geometry.origin) + geometry._matrix() @ xyz
    if frame == "ras":
        lps = lps * LPS_FROM_RAS
    return tuple(float(v) for v in lps)


def box_to_index(corner_a: Sequence[float], corner_b: Sequence[float], geometry: Geometry, *,
                 frame: Frame) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The voxel box [start, stop) in (d, h, w) that covers a physical box given by two opposite corners.

    The physical box is aligned with the axes of ``frame`` (as a Slicer ROI is with RAS). On an oblique grid its
    eight corners are mapped to voxels, and the result is the smallest voxel box holding all of them; on an
    axis-aligned grid this is simply the voxels from one corner's voxel to the other's, both included.

    Args:
        corner_a: One corner in mm.
        corner_b: The opposite corner in mm.
        geometry: The grid of the images.
        frame: ``"ras"`` or ``"lps"``.

    Returns:
        ``(start, stop)`` for ``BoxTarget(start, stop)``.

    Raises:
        SegExplainError: A corner of the box lies outside the volume (the box is not clipped).

    Example:
        >>> start, stop = box_to_index((-30, 10, -5), (5, 40, 20), geometry, frame="ras")
        >>> target = BoxTarget(start, stop, class_index=1)
    """
    _check_geometry(geometry)
    _check_frame(frame)
    a, b = np.asarray(finite_floats("corner_a", corner_a, 3)), np.asarray(finite_floats("corner_b", corner_b, 3))
    _continuous_index(a, geometry, frame, "corner_a")      # the corners the user gave are checked (and named) first
    _continuous_index(b, geometry, frame, "corner_b")
    corners = [np.where(np.array([i, j, k], bool), b, a) for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    voxels = np.array([np.floor(_continuous_index(c, geometry, frame, "box corner") + 0.5) for c in corners])
    low, high = voxels.min(axis=0).astype(int), voxels.max(axis=0).astype(int) + 1
    return (int(low[2]), int(low[1]), int(low[0])), (int(high[2]), int(high[1]), int(high[0]))
