"""The preprocessing transforms of a MONAI bundle that move voxels, followed and transposed exactly.

A transform's move is read from the change of the image's affine and shape (:func:`transform_step`) and checked by
reproducing its output from its input. A signed permutation with whole-voxel offsets (reorientation, flip, crop, zero
pad) moves values unchanged; anything else must be bilinear resampling, whose transpose brings relevance back
keeping its total.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import SegExplainError

__all__ = ["TransformStep", "affine_ras", "transform_step"]


@dataclass(frozen=True)
class TransformStep:
    """A preprocessing transform that moved voxels: output voxel index ``o`` reads input index ``matrix @ o``."""

    transform: str
    matrix: np.ndarray
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @functools.cached_property
    def exact(self) -> bool:
        """A signed permutation with whole-voxel offsets (reorientation, flip, crop, pad): values move unchanged."""
        linear, offset = self.matrix[:3, :3], self.matrix[:3, 3]
        signs = np.rint(linear)
        return bool(np.allclose(linear, signs, atol=1e-6) and (np.abs(signs).sum(0) == 1).all()
                    and (np.abs(signs).sum(1) == 1).all() and np.allclose(offset, np.rint(offset), atol=1e-4))

    @functools.cached_property
    def _index(self) -> tuple[list[int], tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Input axis per output axis, and per axis the output and input indices that meet inside both grids."""
        signs, offset = np.rint(self.matrix[:3, :3]).astype(int), np.rint(self.matrix[:3, 3]).astype(int)
        axes, outputs, inputs = [], [], []
        for a, size in enumerate(self.out_shape):
            j = int(np.flatnonzero(signs[:, a])[0])
            read = signs[j, a] * np.arange(size) + offset[j]
            inside = (read >= 0) & (read < self.in_shape[j])
            axes.append(j)
            outputs.append(torch.as_tensor(np.flatnonzero(inside)))
            inputs.append(torch.as_tensor(read[inside]))
        return axes, tuple(outputs), tuple(inputs)

    @functools.cached_property
    def _grid(self) -> torch.Tensor:
        """Where each output voxel samples the input, in ``grid_sample``'s coordinates (align_corners=True)."""
        indices = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in self.out_shape), indexing="ij")
        matrix = torch.as_tensor(self.matrix, dtype=torch.float64)
        source = torch.stack(indices, -1) @ matrix[:3, :3].T + matrix[:3, 3]
        scale = torch.tensor([2 / (n - 1) if n > 1 else 0.0 for n in self.in_shape], dtype=torch.float64)
        return (source * scale - 1).flip(-1)[None]  # grid_sample wants (x, y, z) = the last axis first

    @staticmethod
    def _mesh(indices: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return indices[0][:, None, None], indices[1][None, :, None], indices[2][None, None, :]

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        """``field`` (C, *in_shape) as the transform moves it: (C, *out_shape); zeros where nothing is read."""
        if not self.exact:
            return nn.functional.grid_sample(field[None], self._grid.to(field.dtype), mode="bilinear",
                                             padding_mode="border", align_corners=True)[0]
        axes, outputs, inputs = self._index
        moved = field.permute(0, *(1 + j for j in axes))
        result = field.new_zeros((field.shape[0], *self.out_shape))
        result[(slice(None), *self._mesh(outputs))] = moved[(slice(None), *self._mesh(inputs))]
        return result

    def transpose(self, maps: torch.Tensor) -> torch.Tensor:
        """Relevance (C, *out_shape) back onto the input grid (C, *in_shape): the transpose of :meth:`forward`."""
        if not self.exact:
            source = maps.new_zeros((maps.shape[0], *self.in_shape), requires_grad=True)
            (back,) = torch.autograd.grad(self.forward(source), source, maps)
            return back
        axes, outputs, inputs = self._index
        moved = maps.new_zeros((maps.shape[0], *(self.in_shape[j] for j in axes)))
        moved[(slice(None), *self._mesh(inputs))] = maps[(slice(None), *self._mesh(outputs))]
        return moved.permute(0, *(1 + int(a) for a in np.argsort(axes)))

    def describe(self) -> dict[str, Any]:
        return {"transform": self.transform, "kind": "moved" if self.exact else "resampled (bilinear)",
                "from_shape": list(self.in_shape), "to_shape": list(self.out_shape)}


def affine_ras(geometry: Any) -> np.ndarray:
    """The RAS affine of the (x, y, z)-ordered array of ``geometry`` (ITK, LPS), as MONAI's image readers make it."""
    affine = np.eye(4)
    affine[:3, :3] = np.reshape(geometry.direction, (3, 3)) * np.asarray(geometry.spacing)[None, :]
    affine[:3, 3] = geometry.origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def transform_step(name: str, before: Any, after: Any) -> TransformStep | None:
    """The voxel move that transform ``name`` made from ``before`` to ``after``, checked; None when it moved none."""
    matrix = np.linalg.solve(before.affine.numpy().astype(np.float64), after.affine.numpy().astype(np.float64))
    in_shape, out_shape = tuple(before.shape[1:]), tuple(after.shape[1:])
    if in_shape == out_shape and np.allclose(matrix, np.eye(4), atol=1e-6):
        return None
    if len(out_shape) != 3:
        raise SegExplainError(f"the bundle's {name} made an image of shape {tuple(after.shape)}; expected (C, x, y, z)")
    step = TransformStep(name, matrix, in_shape, out_shape)
    source = before.as_tensor().detach().to(torch.float64)
    difference = float((step.forward(source) - after.as_tensor().detach().to(torch.float64)).abs().max())
    scale = max(float(source.abs().max()), 1e-12)
    if difference > 1e-3 * scale:
        raise SegExplainError(
            f"the bundle's {name} moves voxels in a way SegExplain cannot bring relevance back through exactly "
            f"(it differs from a permutation, crop, zero pad or bilinear resampling by {difference / scale:.2g} of "
            "the image's range); supported: Orientationd, Flipd, crops, zero pads and Spacingd with mode='bilinear'")
    return step
