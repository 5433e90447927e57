"""The box of a layer's output voxels that receive relevance, on which z-plus and epsilon run their backward."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .affine import zero_padded
from .base import CONVOLUTIONS, PropagationContext


def occupied_box(t: torch.Tensor) -> list[tuple[int, int]] | None:
    """``(start, stop)`` per spatial dim of the box around the voxels of ``t`` (B, C, *spatial) that are not zero.

    ``None`` when ``t`` is zero everywhere. A voxel counts when any batch element or channel is non-zero there.
    """
    values = t.detach().flatten(0, 1)
    occupied = (values.amax(0) != 0) | (values.amin(0) != 0)  # far cheaper than ne() and any() over all channels
    axes = range(occupied.dim())
    box = []
    for axis in axes:
        profile = occupied.any(dim=[d for d in axes if d != axis]) if occupied.dim() > 1 else occupied
        hits = torch.nonzero(profile).flatten()
        if not len(hits):
            return None
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return box


def box_share(t: torch.Tensor) -> float:
    """Share of the spatial voxels of ``t`` inside :func:`occupied_box` (0 for an all-zero tensor)."""
    box = occupied_box(t)
    return 0.0 if box is None else math.prod(stop - start for start, stop in box) / math.prod(t.shape[2:])


@dataclass
class RelevanceWindow:
    """The box of a layer's output voxels that receive relevance, and the part of its input that box reads.

    Outside the box the incoming relevance is exactly zero, so a rule's modified forward and its transposed pass
    need only be computed inside it. The input part carries explicit zero padding where the box reaches the image
    border, so the layer runs on it without padding of its own.

    Attributes:
        outputs: Index of the output box (all batch elements and channels), or ``None`` for the whole output.
        pads: ``F.pad`` widths that take the input to the part the box reads (negative widths crop), or ``None``.
        padding: The padding to run the layer with: its own for the whole output, zero for a box.
    """

    outputs: tuple[slice, ...] | None
    pads: list[int] | None
    padding: Any

    # above this share of the output voxels a box is not worth its copies
    MAX_SHARE: ClassVar[float] = 0.5

    @classmethod
    def whole(cls) -> RelevanceWindow:
        return cls(None, None, None)

    @classmethod
    def propagate(cls, module: nn.Module, x: torch.Tensor, grad: torch.Tensor, saved: torch.Tensor,
                  on_part: Callable, ctx: PropagationContext) -> torch.Tensor:
        """A rule's backward pass on the window of ``grad``: ``on_part(window, x_part, grad, saved)`` returns the
        input gradient of the part, which goes back into a zero tensor shaped like ``x``.

        Without ``ctx.sparse_relevance`` the window is the whole output, without looking at ``grad``. So it is when
        a graph of this backward pass is built (the normalized aggregation differentiates it w.r.t. the seed): the
        graph needs every output voxel, also those whose relevance happens to be zero.
        """
        sparse = ctx.sparse_relevance and not torch.is_grad_enabled()
        window = cls.of(module, x, grad) if sparse else cls.whole()
        if window is None:
            return torch.zeros_like(x)
        return window.scatter(on_part(window, window.input(x), grad, saved))

    @classmethod
    def of(cls, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> RelevanceWindow | None:
        """The window of the non-zero voxels of ``grad``, the output gradient of ``module`` on input ``x``.

        ``None`` when ``grad`` is zero everywhere; the whole output for layers other than convolutions, and when the
        box holds more than half of the output voxels.
        """
        if not isinstance(module, CONVOLUTIONS) or not zero_padded(module):
            return cls.whole() if bool(grad.any()) else None
        box = occupied_box(grad)
        if box is None:
            return None
        if math.prod(stop - start for start, stop in box) > cls.MAX_SHARE * math.prod(grad.shape[2:]):
            return cls.whole()
        pads = []  # F.pad lists the last dim first
        for (start, stop), size, kernel, stride, padding, dilation in reversed(list(zip(
                box, x.shape[2:], module.kernel_size, module.stride, module.padding, module.dilation))):
            first = start * stride - padding  # the input voxels the box reads, in unpadded coordinates
            last = (stop - 1) * stride - padding + dilation * (kernel - 1)
            pads += [-first, last + 1 - size]
        return cls((slice(None), slice(None), *(slice(start, stop) for start, stop in box)), pads, (0,) * len(box))

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.pads is None else F.pad(x, self.pads)

    def output(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.outputs is None else y[self.outputs]

    def scatter(self, grad_part: torch.Tensor) -> torch.Tensor:
        """The input gradient of the part, placed back into a zero tensor shaped like the layer input."""
        return grad_part if self.pads is None else F.pad(grad_part, [-width for width in self.pads])
