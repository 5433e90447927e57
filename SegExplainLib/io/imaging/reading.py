"""Reading MRI sequences and label maps into arrays on one grid, resampled only when asked."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ...errors import GridMismatchError, SegExplainError
from .geometry import Geometry, check_tolerance, sitk_image
from .headers import MAX_VOXELS, check_max_voxels, decode_image, existing_file, read_header


def _sequence_geometry(reader: sitk.ImageFileReader, path: Path, what: str) -> Geometry:
    """The grid of a 3D scalar, 3D vector or 4D (x, y, z, channel) image file, from its header."""
    dimension, components = reader.GetDimension(), reader.GetNumberOfComponents()
    if reader.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        msg = f"{what} '{path}' has complex pixels; expected real intensities"
        raise SegExplainError(msg)
    if dimension == 3:
        return Geometry(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(), reader.GetSize())
    if dimension == 4 and components == 1:
        direction = np.reshape(reader.GetDirection(), (4, 4))[:3, :3]
        return Geometry(reader.GetSpacing()[:3], reader.GetOrigin()[:3], direction, reader.GetSize()[:3])
    kind = f"{dimension}D image with {components}-component pixels" if components > 1 else f"{dimension}D image"
    msg = (f"{what} '{path}' is a {kind} of size {reader.GetSize()}; expected a 3D volume, a 3D vector "
           f"image or a 4D (x, y, z, channel) stack")
    raise SegExplainError(msg)


def _channels(image: sitk.Image) -> list[np.ndarray]:
    """Split a 3D scalar, 3D vector or 4D (x, y, z, channel) image into float32 (D, H, W) arrays."""
    array = sitk.GetArrayViewFromImage(image)              # (z, y, x[, c]) or (c, z, y, x)
    if image.GetDimension() == 4:
        channels = list(array)
    else:
        components = image.GetNumberOfComponentsPerPixel()
        channels = [array] if components == 1 else [array[..., c] for c in range(components)]
    return [np.array(c, dtype=np.float32) for c in channels]


def read_geometry(path: str | Path, *, max_voxels: int = MAX_VOXELS) -> Geometry:
    """The grid of an image file, from its header only: nothing is decoded.

    A 4D (x, y, z, channel) file gives the grid of its first three axes.

    Args:
        path: An image file, e.g. an upload to check against the case's grid before reading it.
        max_voxels: Refuse a file that holds more voxels (see :data:`MAX_VOXELS`).

    Raises:
        SegExplainError: A missing or unreadable file, one that is not a 3D or 4D image, or one over the limit.

    Example:
        >>> read_geometry("t2.nii.gz").differences(Geometry.of(sitk.ReadImage("t1.nii.gz")))
        []
    """
    check_max_voxels(max_voxels)
    path = existing_file(path, "image file")
    return _sequence_geometry(read_header(path, "image file", max_voxels), path, "image file")

def _reference(geometry: Geometry, pixel: int) -> sitk.Image:
    return geometry.apply(sitk.Image(list(geometry.size), pixel))


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        msg = f"{name} must be True or False, got {value!r}"
        raise SegExplainError(msg)

def read_sequences(paths: Sequence[str | Path], *, resample: bool = False, tolerance: float = 1e-5,
                   max_voxels: int = MAX_VOXELS) -> tuple[np.ndarray, Geometry]:
    """Read MRI sequences into one float32 array (C, D, H, W) on the grid of the first sequence.

    Each file gives one channel (a 3D volume) or several: a 4D (x, y, z, c) file is split along its 4th axis and a
    vector-pixel image along its components, in order. Every channel must lie on the first file's grid (size,
    spacing, origin and direction within ``tolerance``, see :meth:`Geometry.differences`). With ``resample=True``
    the other files are instead resampled onto that grid with linear interpolation (0 outside their extent), and
    a ``UserWarning`` names each resampled file. Each file's size and grid are checked from its header, before its
    voxels are decoded.

    Args:
        paths: One file per sequence, e.g. ``["t1.nii.gz", "t2.nrrd"]``, or a single 4D file.
        resample: Resample sequences on another grid onto the first one's grid instead of raising.
        tolerance: Grid comparison tolerance (relative for spacing and origin, absolute for direction cosines).
        max_voxels: Refuse a file that holds more voxels, channels included (see :data:`MAX_VOXELS`).

    Returns:
        The image (C, D, H, W) as float32 and the geometry of the first sequence.

    Raises:
        SegExplainError: A file is missing or unreadable, is not 3D/4D, or holds more than ``max_voxels`` voxels.
        GridMismatchError: A file lies on another grid, without ``resample=True``.

    Example:
        >>> image, geometry = read_sequences(["t1.nii.gz", "t1ce.nii.gz", "t2.nii.gz", "flair.nii.gz"])
        >>> image.shape, geometry.spacing
        ((4, 155, 240, 240), (1.0, 1.0, 1.0))
        >>> image, _ = read_sequences(["t2_axial.nrrd", "adc.mha"], resample=True)   # ADC on a 2 mm grid
    """
    if isinstance(paths, (str, os.PathLike)) or not isinstance(paths, Sequence) or len(paths) == 0:
        msg = f"paths must be a non-empty list of image files (one per sequence), got {paths!r}"
        raise SegExplainError(msg)
    _check_bool("resample", resample)
    check_tolerance(tolerance)
    check_max_voxels(max_voxels)
    files = [existing_file(p, "sequence file") for p in paths]
    channels: list[np.ndarray] = []
    reference: Geometry | None = None
    for path in files:
        reader = read_header(path, "sequence file", max_voxels)
        geometry = _sequence_geometry(reader, path, "sequence file")
        reference = reference or geometry
        fields = reference.differences(geometry, tolerance=tolerance)
        if fields and not resample:
            detail = ", ".join(f"{f} {geometry._field_text(f)} instead of {reference._field_text(f)}" for f in fields)
            raise GridMismatchError(f"sequence file '{path}' is not on the grid of '{files[0]}': {detail}")
        arrays = _channels(decode_image(reader, path, "sequence file"))
        if fields:
            warnings.warn(f"resampled '{path}' onto the grid of '{files[0]}' (linear; {', '.join(fields)} differed)",
                          stacklevel=2)
            target = _reference(reference, sitk.sitkFloat32)
            arrays = [sitk.GetArrayFromImage(sitk.Resample(sitk_image(a, geometry), target, sitk.Transform(),
                                                           sitk.sitkLinear, 0.0, sitk.sitkFloat32))
                      for a in arrays]
        channels.extend(arrays)
    return np.stack(channels).astype(np.float32, copy=False), reference


def read_label(path: str | Path, geometry: Geometry, *, resample: bool = False, tolerance: float = 1e-5,
               max_voxels: int = MAX_VOXELS) -> np.ndarray:
    """Read a label map (D, H, W) of integer labels on the grid ``geometry``.

    Args:
        path: A 3D scalar label file, e.g. a Slicer segmentation exported as ``seg.nii.gz`` (0 background,
            1 necrosis, 2 oedema, ...). Float files are accepted when every value is an integer.
        geometry: The grid of the images, from :func:`read_sequences`.
        resample: Resample a label map on another grid onto ``geometry`` with nearest-neighbour interpolation
            (0 outside its extent) instead of raising a ``GridMismatchError``; a ``UserWarning`` says so.
        tolerance: Grid comparison tolerance, as in :func:`read_sequences`.
        max_voxels: Refuse a file that holds more voxels (see :data:`MAX_VOXELS`).

    Returns:
        The labels as an int64 array (D, H, W).

    Raises:
        SegExplainError: The file is missing or unreadable, is not a 3D scalar image, holds more than
            ``max_voxels`` voxels, lies on another grid without ``resample=True`` (all checked from its header,
            before its voxels are decoded) or holds non-integer values.

    Example:
        >>> image, geometry = read_sequences(["t1.nii.gz", "flair.nii.gz"])
        >>> lesion = read_label("seg.nii.gz", geometry) == 1
    """
    path = existing_file(path, "label file")
    if not isinstance(geometry, Geometry):
        msg = f"geometry must be a Geometry (from read_sequences), got {type(geometry).__name__}"
        raise SegExplainError(msg)
    _check_bool("resample", resample)
    check_tolerance(tolerance)
    check_max_voxels(max_voxels)
    reader = read_header(path, "label file", max_voxels)
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        msg = (f"label file '{path}' is a {reader.GetDimension()}D image with {reader.GetNumberOfComponents()}"
               f" component(s) per pixel; expected a 3D scalar label map")
        raise SegExplainError(msg)
    labels = Geometry(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(), reader.GetSize())
    fields = geometry.differences(labels, tolerance=tolerance)
    if fields and not resample:
        detail = ", ".join(f"{f} {labels._field_text(f)} instead of {geometry._field_text(f)}" for f in fields)
        raise GridMismatchError(f"label file '{path}' is not on the image grid: {detail}")
    image = decode_image(reader, path, "label file")
    array = sitk.GetArrayFromImage(image)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            msg = f"label file '{path}' holds non-integer values (pixel type {image.GetPixelIDTypeAsString()}); " \
                  f"expected integer labels"
            raise SegExplainError(msg)
    if fields:
        warnings.warn(f"resampled label file '{path}' onto the image grid (nearest neighbour; {', '.join(fields)} "
                      f"differed)", stacklevel=2)
        image = sitk.Resample(image, _reference(geometry, image.GetPixelID()), sitk.Transform(),
                              sitk.sitkNearestNeighbor, 0, image.GetPixelID())
        array = sitk.GetArrayFromImage(image)
    return array.astype(np.int64)
