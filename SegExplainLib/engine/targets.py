"""Targets: which output voxels of which class an explanation is about.

Segmentation is voxel-wise classification, so "why did the network segment this?" must name a region of the output
grid and a class. Every target resolves, for given logits, to a boolean region; the explanation then either sums the
class logits over the region (``aggregation="sum"``) or averages the per-voxel explanations normalized to unit sum
(``aggregation="normalized"``: every output voxel contributes equally, as in the liver-tumour LRP study).

Example:
    >>> import numpy as np
    >>> lesion = np.zeros((19, 48, 48), bool); lesion[8:11, 20:26, 20:26] = True
    >>> target = MaskTarget(lesion, class_index=1)           # a segment
    >>> click = VoxelTarget((9, 24, 24), radius=2, class_index=1)  # one click, a small ball around it
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ..errors import SegExplainError

Aggregation = Literal["sum", "normalized"]
AGGREGATIONS = ("sum", "normalized")


@dataclass(frozen=True)
class Target(abc.ABC):
    """Base of all targets.

    Attributes:
        class_index: Output channel (class) to explain, e.g. 1 for "lesion" in a background/lesion network.
        aggregation: ``"sum"`` explains the sum of the class logits over the region; ``"normalized"`` explains each
            voxel separately, normalizes each map to unit sum and adds them up.
    """

    class_index: int = field(default=1, kw_only=True)
    aggregation: Aggregation = field(default="sum", kw_only=True)

    def __post_init__(self) -> None:
        if isinstance(self.class_index, bool) or not isinstance(self.class_index, (int, np.integer)) or (
                self.class_index < 0):
            msg = f"class_index must be a non-negative integer, got {self.class_index!r}"
            raise SegExplainError(msg)
        if self.aggregation not in AGGREGATIONS:
            msg = f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}"
            raise SegExplainError(msg)

    @abc.abstractmethod
    def grid_region(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """The boolean region on an output grid of spatial ``shape`` when it follows from the shape alone, or
        ``None`` when it depends on the logits (:class:`PredictedRegion`).

        Known before any forward pass, it lets a sliding window run only the windows that reach the region.
        """

    def _region(self, logits: torch.Tensor) -> np.ndarray:
        """Boolean region over the spatial grid of ``logits`` (K, *spatial)."""
        return self.grid_region(tuple(logits.shape[1:]))

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """The target as JSON-friendly values (kind, class, aggregation and geometry), for the record."""

    def region(self, logits: torch.Tensor) -> np.ndarray:
        """The non-empty boolean region of this target on the output grid of ``logits`` shaped (K, *spatial)."""
        classes = logits.shape[0]
        if self.class_index >= classes:
            msg = f"class_index {self.class_index} is out of range for a model with {classes} output classes"
            raise SegExplainError(msg)
        region = self._region(logits)
        if not region.any():
            msg = f"the target region is empty ({self.describe()['kind']} target of class {self.class_index})"
            raise SegExplainError(msg)
        return region

    def seed(self, logits: torch.Tensor) -> torch.Tensor:
        """The seed of the ``"sum"`` aggregation: one on the region in the class channel, zero elsewhere."""
        seed = torch.zeros_like(logits)
        seed[self.class_index] = torch.as_tensor(self.region(logits), device=logits.device, dtype=logits.dtype)
        return seed

    def _base(self, kind: str, **geometry: Any) -> dict[str, Any]:
        return {"kind": kind, "class_index": int(self.class_index), "aggregation": self.aggregation, **geometry}


def _check_spatial(name: str, value: Sequence[int], shape: tuple[int, ...]) -> None:
    if len(value) != len(shape):
        msg = f"{name} {tuple(value)} has {len(value)} coordinates but the output grid {shape} has {len(shape)} axes"
        raise SegExplainError(msg)


@dataclass(frozen=True)
class MaskTarget(Target):
    """A segment: a boolean mask on the output grid (e.g. the lesion segment drawn in Slicer)."""

    mask: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "mask", np.asarray(self.mask).astype(bool))

    def grid_region(self, shape):
        if self.mask.shape != tuple(shape):
            msg = f"mask has shape {self.mask.shape} but the output grid is {shape}"
            raise SegExplainError(msg)
        return self.mask

    def describe(self):
        return self._base("mask", voxels=int(self.mask.sum()), bounds=bounds_of(self.mask))


def bounds_of(mask: np.ndarray) -> list[list[int]] | None:
    """The bounding box of a boolean mask, ``[start, stop)`` per axis; ``None`` when the mask is empty."""
    if not mask.any():
        return None
    idx = np.nonzero(mask)
    return [[int(i.min()), int(i.max()) + 1] for i in idx]


@dataclass(frozen=True)
class BoxTarget(Target):
    """A box ``[start, stop)`` in voxel indices of the output grid (a markups ROI)."""

    start: tuple[int, ...]
    stop: tuple[int, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "start", tuple(int(v) for v in self.start))
        object.__setattr__(self, "stop", tuple(int(v) for v in self.stop))
        if len(self.start) != len(self.stop) or any(a >= b for a, b in zip(self.start, self.stop)):
            msg = f"box needs start < stop on every axis, got start={self.start}, stop={self.stop}"
            raise SegExplainError(msg)

    def grid_region(self, shape):
        _check_spatial("box start", self.start, shape)
        if any(a < 0 or b > n for a, b, n in zip(self.start, self.stop, shape)):
            msg = f"box {self.start}..{self.stop} lies outside the output grid {shape}"
            raise SegExplainError(msg)
        region = np.zeros(shape, bool)
        region[tuple(slice(a, b) for a, b in zip(self.start, self.stop))] = True
        return region

    def describe(self):
        return self._base("box", start=list(self.start), stop=list(self.stop))


@dataclass(frozen=True)
class VoxelTarget(Target):
    """One clicked voxel, optionally with the ball of output voxels within ``radius`` around it.

    Attributes:
        index: Voxel index on the output grid.
        radius: Ball radius; in voxels, or in millimetres when ``spacing`` is given.
        spacing: Voxel size per axis (same order as ``index``), to make the ball round in physical space.
    """

    index: tuple[int, ...]
    radius: float = 0.0
    spacing: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "index", tuple(int(v) for v in self.index))
        if not self.radius >= 0:
            msg = f"radius must be >= 0, got {self.radius!r}"
            raise SegExplainError(msg)
        if self.spacing is not None:
            spacing = tuple(float(v) for v in self.spacing)
            if len(spacing) != len(self.index) or min(spacing) <= 0:
                msg = f"spacing must hold one positive size per axis of index {self.index}, got {self.spacing!r}"
                raise SegExplainError(msg)
            object.__setattr__(self, "spacing", spacing)

    def grid_region(self, shape):
        _check_spatial("voxel index", self.index, shape)
        if any(i < 0 or i >= n for i, n in zip(self.index, shape)):
            msg = f"voxel {self.index} lies outside the output grid {shape}"
            raise SegExplainError(msg)
        spacing = np.ones(len(shape)) if self.spacing is None else np.asarray(self.spacing)
        grids = np.meshgrid(*[(np.arange(n) - i) * s for n, i, s in zip(shape, self.index, spacing)], indexing="ij")
        return sum(g ** 2 for g in grids) <= self.radius ** 2 + 1e-9

    def describe(self):
        return self._base("voxel", index=list(self.index), radius=self.radius,
                          spacing=None if self.spacing is None else list(self.spacing))


@dataclass(frozen=True)
class PredictedRegion(Target):
    """The voxels the network assigns to ``class_index`` (argmax over classes, held fixed): Chatterjee et al."""

    def grid_region(self, shape):
        return None

    def _region(self, logits):
        return (logits.argmax(dim=0) == self.class_index).cpu().numpy()

    def describe(self):
        return self._base("predicted")


@dataclass(frozen=True)
class ClassChannel(Target):
    """The whole output channel of ``class_index``, every voxel of the grid."""

    def grid_region(self, shape):
        return np.ones(tuple(shape), bool)

    def describe(self):
        return self._base("channel")
