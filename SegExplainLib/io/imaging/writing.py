"""Writing volumes and relevance maps with their grid, replacing a file in one step."""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ...errors import SegExplainError
from .geometry import Geometry, sitk_image
from .headers import one_line

#: Extensions that ``write_volume`` accepts: single-file formats, so that the file can be replaced atomically.
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")

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
    image = sitk_image(np.ascontiguousarray(array, dtype=np.float32), geometry)
    temporary = path.with_name(f".{path.name[:-len(suffix)]}.{uuid.uuid4().hex[:12]}.tmp{suffix}")
    try:
        sitk.WriteImage(image, str(temporary))
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except (RuntimeError, OSError) as error:
        msg = f"could not write '{path}': {one_line(error)}"
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
        msg = f"cannot create the output folder '{folder}': {one_line(error)}"
        raise SegExplainError(msg) from None
    return [write_volume(channel, geometry, folder / f"{prefix}{name}{suffix}") for channel, name in zip(maps, names)]
