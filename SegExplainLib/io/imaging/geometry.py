"""The grid of a volume (:class:`Geometry`) and the checks of the numbers that describe it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from ...errors import SegExplainError

LPS_FROM_RAS = np.array([-1.0, -1.0, 1.0])

def finite_floats(name: str, values: Any, count: int) -> tuple[float, ...]:
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


def format_values(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def check_tolerance(tolerance: Any) -> None:
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
        spacing = finite_floats("spacing", self.spacing, 3)
        if min(spacing) <= 0:
            msg = f"spacing must be 3 positive numbers (mm), got {self.spacing!r}"
            raise SegExplainError(msg)
        origin = finite_floats("origin", self.origin, 3)
        direction = finite_floats("direction", self.direction, 9)
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
        direction = matrix[:3, :3] / spacing[None, :] * LPS_FROM_RAS[:, None]
        return cls(tuple(spacing), tuple(matrix[:3, 3] * LPS_FROM_RAS), tuple(direction.ravel()), tuple(size))

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """The 4x4 IJK-to-RAS matrix of this grid (Slicer's volume geometry); the inverse of :meth:`from_ijk_to_ras`."""
        matrix = np.eye(4)
        matrix[:3, :3] = LPS_FROM_RAS[:, None] * self._matrix()
        matrix[:3, 3] = LPS_FROM_RAS * np.asarray(self.origin)
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
        check_tolerance(tolerance)
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
        return str(self.size) if name == "size" else format_values(getattr(self, name))

def sitk_image(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    return geometry.apply(sitk.GetImageFromArray(array, isVector=False))
