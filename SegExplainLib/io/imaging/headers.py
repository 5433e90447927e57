"""Image file headers, read and checked before any voxel is decoded: size, NaN/Inf voxels, and whether
a file holds its own voxels."""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ...errors import SegExplainError

#: The most voxels an image file may hold (counting every channel or pixel component), checked from its header
#: before decoding: 2**28, e.g. a 512 x 512 x 1024 CT, 1 GiB as float32. Pass ``max_voxels`` to read larger files.
MAX_VOXELS = 2**28

def one_line(text: object) -> str:
    """ITK's exception text spans several lines; the user sees its last meaningful line."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"

def existing_file(path: Any, what: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        msg = f"{what} must be a file path, got {path!r}"
        raise SegExplainError(msg)
    path = Path(path)
    if not path.is_file():
        msg = f"{what} '{path}' does not exist or is not a file"
        raise SegExplainError(msg)
    return path


def check_max_voxels(max_voxels: Any) -> None:
    if isinstance(max_voxels, bool) or not isinstance(max_voxels, int) or max_voxels < 1:
        msg = f"max_voxels must be a positive integer, got {max_voxels!r}"
        raise SegExplainError(msg)


def read_header(path: Path, what: str, max_voxels: int) -> sitk.ImageFileReader:
    """A reader of ``path`` that has read the header only, refusing a file of more than ``max_voxels`` voxels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        msg = f"could not read {what} '{path}' as an image: {one_line(error)}"
        raise SegExplainError(msg) from None
    extent = [*reader.GetSize(), *([reader.GetNumberOfComponents()] if reader.GetNumberOfComponents() > 1 else [])]
    if math.prod(extent) > max_voxels:
        msg = (f"{what} '{path}' holds {math.prod(extent)} voxels ({' x '.join(str(n) for n in extent)}); the limit "
               f"is max_voxels={max_voxels}")
        raise SegExplainError(msg)
    return reader


def decode_image(reader: sitk.ImageFileReader, path: Path, what: str) -> sitk.Image:
    """The decoded image, refused when it holds NaN or infinite voxels (NIfTI's are counted in the file's raw data)."""
    try:
        image = reader.Execute()
    except RuntimeError as error:
        msg = f"could not read {what} '{path}' as an image: {one_line(error)}"
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
    path = existing_file(path, "image file")
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
