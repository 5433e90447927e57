"""Image files and physical coordinates: the file layer of the command line ``segexplain explain``.

MRI sequences and label maps are read with SimpleITK (NIfTI ``.nii``/``.nii.gz``, NRRD ``.nrrd``, MetaImage
``.mha``/``.mhd`` and whatever else it reads) into arrays shaped like the engine's input, (C, D, H, W) = (channel,
z, y, x), together with the :class:`Geometry` of the grid (spacing, origin, direction, size in ITK's x, y, z order).
Relevance maps are written back with exactly that geometry, so that they overlay the images in Slicer or ITK-SNAP.

Nothing is resampled unless ``resample=True`` is passed; a sequence on another grid is an error that names the file
and the field that differs. Every file's header is read and checked first: its size against :data:`MAX_VOXELS` and
its grid against the others', before any voxel is decoded (a gzip-compressed file of 1 MB can hold 1000^3 voxels,
gigabytes once decoded). Physical points can be given in LPS (ITK, DICOM) or RAS (Slicer, NIfTI viewers); RAS is
LPS with the first two coordinates negated.

Example:
    >>> image, geometry = read_sequences(["t1.nii.gz", "t1ce.nii.gz", "t2.nii.gz", "flair.nii.gz"])
    >>> image.shape                                   # (C, D, H, W)
    (4, 155, 240, 240)
    >>> lesion = read_label("seg.nii.gz", geometry)   # (D, H, W) integer labels on the same grid
    >>> index = physical_to_index((-12.5, 30.0, 8.0), geometry, frame="ras")   # a point clicked in Slicer
    >>> write_maps(result.maps, geometry, "out", ["t1", "t1ce", "t2", "flair"])  # out/relevance_t1.nii.gz, ...
"""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

from ..errors import GridMismatchError, SegExplainError

Frame = Literal["ras", "lps"]
FRAMES = ("ras", "lps")
#: Extensions that ``write_volume`` accepts: single-file formats, so that the file can be replaced atomically.
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
#: The most voxels an image file may hold (counting every channel or pixel component), checked from its header
#: before decoding: 2**28, e.g. a 512 x 512 x 1024 CT, 1 GiB as float32. Pass ``max_voxels`` to read larger files.
MAX_VOXELS = 2**28
_LPS_FROM_RAS = np.array([-1.0, -1.0, 1.0])


def _one_line(text: object) -> str:
    """ITK's exception text spans several lines; the user sees its last meaningful line."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def _floats(name: str, values: Any, count: int) -> tuple[float, ...]:
    try:
        result = tuple(float(v) for v in np.asarray(values, dtype=float).reshape(-1))
    except (TypeError, ValueError):
        result = ()
    if len(result) != count or not all(math.isfinite(v) for v in result):
        msg = f"{name} must be {count} finite numbers, got {values!r}"
        raise SegExplainError(msg)
    return result


def _close(a: Sequence[float], b: Sequence[float], tolerance: float, *, relative: bool) -> bool:
    """Element-wise |a - b| <= tolerance, scaled by max(1, |a|, |b|) when ``relative``."""
    for x, y in zip(a, b):
        scale = max(1.0, abs(x), abs(y)) if relative else 1.0
        if abs(x - y) > tolerance * scale:
            return False
    return True


def _format(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _check_tolerance(tolerance: Any) -> None:
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not tolerance >= 0:
        msg = f"tolerance must be a non-negative number, got {tolerance!r}"
        raise SegExplainError(msg)


@dataclass(frozen=True)
class Geometry:
    """The grid of a 3D volume, in ITK's conventions (LPS physical space, x, y, z axis order).

    The physical (LPS) position of voxel index (x, y, z) is ``origin + direction @ (spacing * (x, y, z))``. Arrays
    on this grid are shaped (D, H, W) = ``size`` reversed.

    Attributes:
        spacing: Voxel size in mm along x, y, z, e.g. ``(0.8, 0.8, 3.0)`` for an axial T2 with 3 mm slices.
        origin: LPS position in mm of the centre of voxel (0, 0, 0).
        direction: The 3x3 direction cosine matrix, row-major (9 floats); column j is the LPS direction of axis j.
        size: Number of voxels along x, y, z, e.g. ``(240, 240, 155)`` for a BraTS volume.

    Example:
        >>> geometry = Geometry.of(sitk.ReadImage("t2.nii.gz"))
        >>> geometry.shape                 # the (D, H, W) of the arrays on this grid
        (155, 240, 240)
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    size: tuple[int, int, int]

    def __post_init__(self) -> None:
        spacing = _floats("spacing", self.spacing, 3)
        if min(spacing) <= 0:
            msg = f"spacing must be 3 positive numbers (mm), got {self.spacing!r}"
            raise SegExplainError(msg)
        origin = _floats("origin", self.origin, 3)
        direction = _floats("direction", self.direction, 9)
        if abs(np.linalg.det(np.reshape(direction, (3, 3)))) < 1e-6:
            msg = f"direction must be an invertible 3x3 matrix (9 numbers, row-major), got {self.direction!r}"
            raise SegExplainError(msg)
        size = tuple(self.size) if isinstance(self.size, (Sequence, np.ndarray)) else ()
        if len(size) != 3 or not all(
                isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 for n in size):
            msg = f"size must be 3 positive integers (x, y, z), got {self.size!r}"
            raise SegExplainError(msg)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "size", tuple(int(n) for n in size))

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        """The geometry of a 3D SimpleITK image (scalar or vector pixels).

        Example:
            >>> Geometry.of(sitk.ReadImage("flair.nrrd")).spacing
            (0.9375, 0.9375, 3.0)
        """
        if not isinstance(image, sitk.Image):
            msg = f"expected a SimpleITK image, got {type(image).__name__}"
            raise SegExplainError(msg)
        if image.GetDimension() != 3:
            msg = f"expected a 3D image, got a {image.GetDimension()}D image of size {image.GetSize()}"
            raise SegExplainError(msg)
        return cls(image.GetSpacing(), image.GetOrigin(), image.GetDirection(), image.GetSize())

    @classmethod
    def from_ijk_to_ras(cls, ijk_to_ras: Any, size: Sequence[int]) -> Geometry:
        """The grid of a 4x4 IJK-to-RAS matrix (Slicer's volume geometry) and a size (x, y, z), in ITK's LPS terms.

        Example:
            >>> Geometry.from_ijk_to_ras(np.diag([-0.8, -0.8, 3.0, 1.0]), (240, 240, 40)).direction[:2]
            (1.0, 0.0)
        """
        matrix = np.asarray(ijk_to_ras, dtype=float)
        if matrix.shape != (4, 4):
            msg = f"ijk_to_ras must be a 4x4 matrix, got shape {matrix.shape}"
            raise SegExplainError(msg)
        spacing = np.linalg.norm(matrix[:3, :3], axis=0)
        direction = matrix[:3, :3] / spacing[None, :] * _LPS_FROM_RAS[:, None]
        return cls(tuple(spacing), tuple(matrix[:3, 3] * _LPS_FROM_RAS), tuple(direction.ravel()), tuple(size))

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """The 4x4 IJK-to-RAS matrix of this grid (Slicer's volume geometry); the inverse of :meth:`from_ijk_to_ras`."""
        matrix = np.eye(4)
        matrix[:3, :3] = _LPS_FROM_RAS[:, None] * self._matrix()
        matrix[:3, 3] = _LPS_FROM_RAS * np.asarray(self.origin)
        return matrix

    @property
    def shape(self) -> tuple[int, int, int]:
        """The (D, H, W) shape of arrays on this grid: ``size`` reversed."""
        return self.size[2], self.size[1], self.size[0]

    def apply(self, image: sitk.Image) -> sitk.Image:
        """Copy spacing, origin and direction onto ``image`` (in place) and return it; the sizes must agree.

        Example:
            >>> image = geometry.apply(sitk.GetImageFromArray(relevance[0]))   # a map onto the T1's grid
        """
        if not isinstance(image, sitk.Image) or image.GetDimension() != 3:
            got = f"a {image.GetDimension()}D image" if isinstance(image, sitk.Image) else type(image).__name__
            msg = f"expected a 3D SimpleITK image, got {got}"
            raise SegExplainError(msg)
        if tuple(image.GetSize()) != self.size:
            msg = f"image size {tuple(image.GetSize())} does not match the geometry's size {self.size} (x, y, z)"
            raise SegExplainError(msg)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def differences(self, other: Geometry, *, tolerance: float = 1e-5) -> list[str]:
        """The fields (``size``, ``spacing``, ``origin``, ``direction``) in which ``other`` differs from this grid.

        Spacing and origin are compared to ``tolerance`` relative to their magnitude (at least 1 mm), the direction
        cosines to ``tolerance`` absolute; NIfTI stores them as float32, so exact equality would be too strict.

        Example:
            >>> t1.differences(dwi)            # a DWI with 2 mm voxels on the 1 mm T1 grid
            ['size', 'spacing']
        """
        if not isinstance(other, Geometry):
            msg = f"expected a Geometry to compare with, got {type(other).__name__}"
            raise SegExplainError(msg)
        _check_tolerance(tolerance)
        fields = []
        if self.size != other.size:
            fields.append("size")
        if not _close(self.spacing, other.spacing, tolerance, relative=True):
            fields.append("spacing")
        if not _close(self.origin, other.origin, tolerance, relative=True):
            fields.append("origin")
        if not _close(self.direction, other.direction, tolerance, relative=False):
            fields.append("direction")
        return fields

    def matches(self, other: Geometry, *, tolerance: float = 1e-5) -> bool:
        """Whether ``other`` is the same grid within ``tolerance`` (see :meth:`differences`).

        Example:
            >>> Geometry.of(t1).matches(Geometry.of(flair))
            True
        """
        return not self.differences(other, tolerance=tolerance)

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        """JSON-friendly lists, for the record of an explanation.

        Example:
            >>> geometry.to_dict()["spacing"]
            [0.8, 0.8, 3.0]
        """
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction),
                "size": list(self.size)}

    def _matrix(self) -> np.ndarray:
        """The 3x3 matrix M with LPS point = origin + M @ (x, y, z)."""
        return np.reshape(self.direction, (3, 3)) * np.asarray(self.spacing)[None, :]

    def _field_text(self, name: str) -> str:
        return str(self.size) if name == "size" else _format(getattr(self, name))


# ----------------------------------------------------------------------------------------------------------- reading

def _existing_file(path: Any, what: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        msg = f"{what} must be a file path, got {path!r}"
        raise SegExplainError(msg)
    path = Path(path)
    if not path.is_file():
        msg = f"{what} '{path}' does not exist or is not a file"
        raise SegExplainError(msg)
    return path


def _check_max_voxels(max_voxels: Any) -> None:
    if isinstance(max_voxels, bool) or not isinstance(max_voxels, int) or max_voxels < 1:
        msg = f"max_voxels must be a positive integer, got {max_voxels!r}"
        raise SegExplainError(msg)


def _header(path: Path, what: str, max_voxels: int) -> sitk.ImageFileReader:
    """A reader of ``path`` that has read the header only, refusing a file of more than ``max_voxels`` voxels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        msg = f"could not read {what} '{path}' as an image: {_one_line(error)}"
        raise SegExplainError(msg) from None
    extent = [*reader.GetSize(), *([reader.GetNumberOfComponents()] if reader.GetNumberOfComponents() > 1 else [])]
    if math.prod(extent) > max_voxels:
        msg = (f"{what} '{path}' holds {math.prod(extent)} voxels ({' x '.join(str(n) for n in extent)}); the limit "
               f"is max_voxels={max_voxels}")
        raise SegExplainError(msg)
    return reader


def _decode(reader: sitk.ImageFileReader, path: Path, what: str) -> sitk.Image:
    """The decoded image, refused when it holds NaN or infinite voxels (NIfTI's are counted in the file's raw data)."""
    try:
        image = reader.Execute()
    except RuntimeError as error:
        msg = f"could not read {what} '{path}' as an image: {_one_line(error)}"
        raise SegExplainError(msg) from None
    if image.GetPixelID() in _FLOAT_PIXELS:
        layout = _nifti_layout(_leading_bytes(path, _NIFTI2_HEADER_BYTES))
        bad = (_nifti_non_finite(path, layout) if layout is not None
               else int(np.count_nonzero(~np.isfinite(sitk.GetArrayViewFromImage(image)))))
        if bad:
            msg = f"{what} '{path}' has {bad} NaN/Inf voxels; expected finite values (clean or mask them first)"
            raise SegExplainError(msg)
    return image


# NIfTI's reader (nifticlib) turns NaN and Inf voxels into 0 as it reads, so they are counted in the file itself.
_FLOAT_PIXELS = (sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64)
_NIFTI1_HEADER_BYTES, _NIFTI2_HEADER_BYTES = 348, 540
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIFTI_TYPE_FLOAT32, NIFTI_TYPE_FLOAT64
_GZIP_MAGIC = b"\x1f\x8b"
_SCAN_BYTES = 2**24


@dataclass(frozen=True)
class _NiftiLayout:
    byte_order: str
    datatype: int
    data_offset: int
    voxels: int
    single_file: bool  # data after the header (n+1, n+2), not in a separate .img (ni1, ni2)


def _open_decompressed(path: Path) -> Any:
    """A binary file object of ``path``, decompressing it when it is gzip (as ``.nii.gz`` is)."""
    with open(path, "rb") as file:
        gzipped = file.read(2) == _GZIP_MAGIC
    return gzip.open(path, "rb") if gzipped else open(path, "rb")  # noqa: SIM115 - the caller closes it


def _leading_bytes(path: Path, count: int) -> bytes:
    """The first ``count`` bytes of a file, decompressed; empty for a broken gzip stream (ITK then says why)."""
    with _open_decompressed(path) as file:
        try:
            return file.read(count)
        except (OSError, EOFError):
            return b""


def _nifti_layout(header: bytes) -> _NiftiLayout | None:
    """The data layout from a NIfTI-1 or NIfTI-2 header, None for another format."""
    for order in "<>":
        size = struct.unpack(f"{order}i", header[:4])[0] if len(header) >= 4 else 0
        if size == _NIFTI1_HEADER_BYTES and len(header) >= size:
            dims = struct.unpack(f"{order}8h", header[40:56])
            datatype = struct.unpack(f"{order}h", header[70:72])[0]
            offset = struct.unpack(f"{order}f", header[108:112])[0]
            magic = header[344:348]
        elif size == _NIFTI2_HEADER_BYTES and len(header) >= size:
            dims = struct.unpack(f"{order}8q", header[16:80])
            datatype = struct.unpack(f"{order}h", header[12:14])[0]
            offset = struct.unpack(f"{order}q", header[168:176])[0]
            magic = header[4:8]
        else:
            continue
        count = min(max(int(dims[0]), 0), 7)
        voxels = math.prod(max(int(n), 1) for n in dims[1:count + 1])
        return _NiftiLayout(order, int(datatype), int(offset), voxels, magic[:3] in (b"n+1", b"n+2"))
    return None


def _nifti_non_finite(path: Path, layout: _NiftiLayout) -> int:
    """The number of NaN and infinite voxels in a single-file NIfTI's float data (0 for other data types)."""
    kind = _NIFTI_FLOAT_TYPES.get(layout.datatype)
    if kind is None or not layout.single_file:
        return 0
    dtype = np.dtype(layout.byte_order + kind)
    remaining, bad = layout.voxels * dtype.itemsize, 0
    with _open_decompressed(path) as file:
        file.seek(layout.data_offset)
        while remaining > 0:
            chunk = file.read(min(remaining, _SCAN_BYTES))
            if not chunk:
                break
            usable = len(chunk) - len(chunk) % dtype.itemsize
            bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(chunk[:usable], dtype=dtype))))
            remaining -= len(chunk)
    return bad


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
    _check_max_voxels(max_voxels)
    path = _existing_file(path, "image file")
    return _sequence_geometry(_header(path, "image file", max_voxels), path, "image file")


#: How far into a file :func:`check_self_contained` looks for the end of an NRRD or MetaImage header.
SELF_CONTAINED_HEADER_BYTES = 2**16
_NRRD_DATA_FILE = re.compile(rb"^data ?file\s*:", re.IGNORECASE | re.MULTILINE)
_META_DATA_FILE = re.compile(rb"^[ \t]*ElementDataFile[ \t]*=[ \t]*(\S*)", re.IGNORECASE | re.MULTILINE)


def check_self_contained(path: str | Path) -> None:
    """Refuse an image file whose voxels are, or may be, in another file: only its own bytes may be read.

    Allowed are a single-file NIfTI (``n+1``/``n+2``, also gzip-compressed), an NRRD file without a ``data file``
    field and a MetaImage file with ``ElementDataFile = LOCAL``, judged from the content, not the name. A detached
    header (``.nhdr``, ``.mhd``, a NIfTI ``.hdr``) names another file, which ITK would open wherever it is, even
    ``/etc/...``, and whose absence its error would report; anything else is refused too. Nothing is decoded.

    Args:
        path: A file to read that someone else supplied, e.g. an upload to the review app.

    Raises:
        SegExplainError: A missing file, or one that is not one of the self-contained kinds above.

    Example:
        >>> check_self_contained("upload.mha")   # with ElementDataFile = /etc/passwd
        SegExplainError: image file 'upload.mha' is not a single file holding its voxels ...
    """
    path = _existing_file(path, "image file")
    head = _leading_bytes(path, SELF_CONTAINED_HEADER_BYTES)
    nifti = _nifti_layout(head)
    if nifti is not None:
        contained = nifti.single_file
    elif head.startswith(b"NRRD"):
        header = re.split(rb"\r?\n\r?\n", head, maxsplit=1)
        contained = len(header) == 2 and not _NRRD_DATA_FILE.search(header[0])
    else:
        data_file = _META_DATA_FILE.search(head)
        contained = data_file is not None and data_file.group(1).upper() == b"LOCAL"
    if not contained:
        msg = (f"image file '{path}' is not a single file holding its voxels (its header names another file, or its "
               f"format is not known); expected NIfTI, NRRD or MetaImage with the voxels inside")
        raise SegExplainError(msg)


def _image(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    return geometry.apply(sitk.GetImageFromArray(array, isVector=False))


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
    _check_tolerance(tolerance)
    _check_max_voxels(max_voxels)
    files = [_existing_file(p, "sequence file") for p in paths]
    channels: list[np.ndarray] = []
    reference: Geometry | None = None
    for path in files:
        reader = _header(path, "sequence file", max_voxels)
        geometry = _sequence_geometry(reader, path, "sequence file")
        reference = reference or geometry
        fields = reference.differences(geometry, tolerance=tolerance)
        if fields and not resample:
            detail = ", ".join(f"{f} {geometry._field_text(f)} instead of {reference._field_text(f)}" for f in fields)
            raise GridMismatchError(f"sequence file '{path}' is not on the grid of '{files[0]}': {detail}")
        arrays = _channels(_decode(reader, path, "sequence file"))
        if fields:
            warnings.warn(f"resampled '{path}' onto the grid of '{files[0]}' (linear; {', '.join(fields)} differed)",
                          stacklevel=2)
            target = _reference(reference, sitk.sitkFloat32)
            arrays = [sitk.GetArrayFromImage(sitk.Resample(_image(a, geometry), target, sitk.Transform(),
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
    path = _existing_file(path, "label file")
    if not isinstance(geometry, Geometry):
        msg = f"geometry must be a Geometry (from read_sequences), got {type(geometry).__name__}"
        raise SegExplainError(msg)
    _check_bool("resample", resample)
    _check_tolerance(tolerance)
    _check_max_voxels(max_voxels)
    reader = _header(path, "label file", max_voxels)
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        msg = (f"label file '{path}' is a {reader.GetDimension()}D image with {reader.GetNumberOfComponents()}"
               f" component(s) per pixel; expected a 3D scalar label map")
        raise SegExplainError(msg)
    labels = Geometry(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(), reader.GetSize())
    fields = geometry.differences(labels, tolerance=tolerance)
    if fields and not resample:
        detail = ", ".join(f"{f} {labels._field_text(f)} instead of {geometry._field_text(f)}" for f in fields)
        raise GridMismatchError(f"label file '{path}' is not on the image grid: {detail}")
    image = _decode(reader, path, "label file")
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


def image_stem(name: str) -> str | None:
    """A file name without its image ending (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``), or None without one.

    Case folders name their files after the sequences, so the stem is the sequence name.

    Example:
        >>> image_stem("T1-20s.nii.gz"), image_stem("notes.txt")
        ('T1-20s', None)
    """
    return next((name[:-len(s)] for s in WRITE_SUFFIXES if name.endswith(s)), None)


# ----------------------------------------------------------------------------------------------------------- writing

def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in WRITE_SUFFIXES if name.endswith(s) and len(name) > len(s)), None)


def write_volume(array: Any, geometry: Geometry, path: str | Path) -> Path:
    """Write one float32 volume (D, H, W) with exactly the geometry ``geometry``, atomically.

    The volume goes to a hidden temporary file in the same folder, which then replaces ``path`` in one step
    (``os.replace``): an interrupted or failed run leaves either the old file or the complete new one, and no
    temporary file. Only single-file formats can be replaced atomically: ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``.

    Args:
        array: Numpy array or torch tensor (D, H, W), e.g. one channel of ``Explanation.maps``.
        geometry: The grid of the images the map belongs to.
        path: The file to write; its folder must exist.

    Returns:
        ``path`` as a ``Path``.

    Example:
        >>> write_volume(result.maps[3], geometry, "out/relevance_flair.nii.gz")
    """
    if not isinstance(geometry, Geometry):
        msg = f"geometry must be a Geometry (from read_sequences), got {type(geometry).__name__}"
        raise SegExplainError(msg)
    if not isinstance(path, (str, os.PathLike)):
        msg = f"path must be a file path, got {path!r}"
        raise SegExplainError(msg)
    path = Path(path)
    suffix = _suffix(path)
    if suffix is None:
        msg = f"cannot write '{path}': expected a file name ending in one of {', '.join(WRITE_SUFFIXES)}"
        raise SegExplainError(msg)
    if not path.parent.is_dir():
        msg = f"cannot write '{path}': the folder '{path.parent}' does not exist"
        raise SegExplainError(msg)
    if hasattr(array, "detach"):                      # a torch tensor
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        msg = f"cannot write '{path}': expected a real-valued array, got dtype {array.dtype}"
        raise SegExplainError(msg)
    if array.shape != geometry.shape:
        hint = "; write one file per channel with write_maps" if array.ndim == 4 else ""
        msg = f"cannot write '{path}': array shape {array.shape} is not the grid's (D, H, W) {geometry.shape}{hint}"
        raise SegExplainError(msg)
    image = _image(np.ascontiguousarray(array, dtype=np.float32), geometry)
    temporary = path.with_name(f".{path.name[:-len(suffix)]}.{uuid.uuid4().hex[:12]}.tmp{suffix}")
    try:
        sitk.WriteImage(image, str(temporary))
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except (RuntimeError, OSError) as error:
        msg = f"could not write '{path}': {_one_line(error)}"
        raise SegExplainError(msg) from None
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def write_maps(maps: Any, geometry: Geometry, folder: str | Path, names: Sequence[str], *,
               prefix: str = "relevance_", suffix: str = ".nii.gz") -> list[Path]:
    """Write one volume per channel of ``maps`` (C, D, H, W), named ``<prefix><name><suffix>``, atomically each.

    Args:
        maps: Numpy array or torch tensor (C, D, H, W), e.g. ``Explanation.maps``.
        geometry: The grid of the images, from :func:`read_sequences`.
        folder: Output folder; created if missing.
        names: One file-name part per channel, e.g. the sequence names ``["t1", "t1ce", "t2", "flair"]``.
        prefix: Start of every file name.
        suffix: File type, one of ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``.

    Returns:
        The paths written, in channel order.

    Example:
        >>> write_maps(result.maps, geometry, "out", ["t1", "flair"])
        [PosixPath('out/relevance_t1.nii.gz'), PosixPath('out/relevance_flair.nii.gz')]
    """
    if hasattr(maps, "detach"):
        maps = maps.detach().cpu().numpy()
    maps = np.asarray(maps)
    if maps.ndim != 4:
        msg = f"maps must be an array (C, D, H, W), got shape {maps.shape}"
        raise SegExplainError(msg)
    if isinstance(names, str) or not isinstance(names, Sequence) or len(names) != maps.shape[0]:
        msg = f"names must be a list of {maps.shape[0]} names, one per channel of maps, got {names!r}"
        raise SegExplainError(msg)
    for name in names:
        if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0"):
            msg = f"channel name {name!r} cannot be part of a file name; expected a non-empty name without / or \\"
            raise SegExplainError(msg)
    if len(set(names)) != len(names):
        msg = f"channel names must be unique, got {list(names)!r}"
        raise SegExplainError(msg)
    if not isinstance(prefix, str) or any(c in prefix for c in "/\\\0"):
        msg = f"prefix must be a string without / or \\, got {prefix!r}"
        raise SegExplainError(msg)
    if suffix not in WRITE_SUFFIXES:
        msg = f"suffix must be one of {WRITE_SUFFIXES}, got {suffix!r}"
        raise SegExplainError(msg)
    if not isinstance(folder, (str, os.PathLike)):
        msg = f"folder must be a folder path, got {folder!r}"
        raise SegExplainError(msg)
    if not isinstance(geometry, Geometry):
        msg = f"geometry must be a Geometry (from read_sequences), got {type(geometry).__name__}"
        raise SegExplainError(msg)
    if maps.shape[1:] != geometry.shape:
        msg = f"maps shape {maps.shape} does not fit the grid's (D, H, W) {geometry.shape}"
        raise SegExplainError(msg)
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        msg = f"cannot create the output folder '{folder}': {_one_line(error)}"
        raise SegExplainError(msg) from None
    return [write_volume(channel, geometry, folder / f"{prefix}{name}{suffix}") for channel, name in zip(maps, names)]


# ------------------------------------------------------------------------------------------------------ coordinates

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
    lps = np.asarray(_floats(what, point, 3))
    if frame == "ras":
        lps = lps * _LPS_FROM_RAS
    index = np.linalg.solve(geometry._matrix(), lps - np.asarray(geometry.origin))
    if np.any(index < -0.5) or np.any(np.floor(index + 0.5) > np.asarray(geometry.size) - 1):
        msg = (f"{what} {_format(point)} ({frame.upper()}) lies outside the volume: voxel (x, y, z) "
               f"{_format(index)} is not within {geometry.size}")
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
    d, h, w = _floats("index_dhw", index_dhw, 3)
    xyz = np.array([w, h, d])
    if np.any(xyz < -0.5) or np.any(np.floor(xyz + 0.5) > np.asarray(geometry.size) - 1):
        msg = f"index (d, h, w) {_format((d, h, w))} lies outside the volume of shape {geometry.shape}"
        raise SegExplainError(msg)
    lps = np.asarray(geometry.origin) + geometry._matrix() @ xyz
    if frame == "ras":
        lps = lps * _LPS_FROM_RAS
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
    a, b = np.asarray(_floats("corner_a", corner_a, 3)), np.asarray(_floats("corner_b", corner_b, 3))
    _continuous_index(a, geometry, frame, "corner_a")      # the corners the user gave are checked (and named) first
    _continuous_index(b, geometry, frame, "corner_b")
    corners = [np.where(np.array([i, j, k], bool), b, a) for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    voxels = np.array([np.floor(_continuous_index(c, geometry, frame, "box corner") + 0.5) for c in corners])
    low, high = voxels.min(axis=0).astype(int), voxels.max(axis=0).astype(int) + 1
    return (int(low[2]), int(low[1]), int(low[0])), (int(high[2]), int(high[1]), int(high[0]))


def _name_key(text: str) -> str:
    return text.strip(" _-:.").lower()


def match_names(candidates: Sequence[str], wanted: Sequence[str]) -> list[int | None]:
    """Which candidate (a file stem, a volume name) holds each wanted sequence name; each candidate is used once.

    A candidate equal to the name wins (case and surrounding ``" _-:."`` ignored); then one that ends with the name
    after a separator, so ``case7_T2`` holds ``T2`` while ``case7_T1-20s`` does not hold ``T1``.

    Args:
        candidates: For example the stems of a case folder's files, ``["case7_T1", "case7_T2", "case7_label"]``.
        wanted: The model card's sequence names in channel order, e.g. ``["T2", "T1"]``.

    Returns:
        For each wanted name, the index of its candidate, or None where none matches.

    Example:
        >>> match_names(["4: T2", "case7_T1-20s", "case7_T1"], ["T1", "T2", "ADC"])
        [2, 0, None]
    """
    keys = [_name_key(c) for c in candidates]

    def same(key: str, name: str) -> bool:
        return key == name

    def ends_with(key: str, name: str) -> bool:
        return key.endswith(name) and not key[:-len(name)][-1:].isalnum()

    chosen: list[int | None] = [None] * len(wanted)
    for matches in (same, ends_with):
        for index, name in enumerate(wanted):
            if chosen[index] is None:
                chosen[index] = next((i for i, key in enumerate(keys)
                                      if i not in chosen and matches(key, _name_key(name))), None)
    return chosen
