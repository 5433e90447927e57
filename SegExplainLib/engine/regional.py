"""What the engine asks of a model that can run only the part of its output a region needs.

A sliding window (:class:`SegExplainLib.models.sliding.SlidingWindow`) is such a model: the logits inside a region
come only from the windows that overlap it. :func:`~SegExplainLib.explain` restricts every pass of an explanation to
those windows when its method allows it; the engine knows the protocol, not the sliding window.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

#: Per spatial axis, ``(start, stop)`` voxel indices of a box on the output grid.
Bounds = Sequence[tuple[int, int]]


@runtime_checkable
class RegionalModel(Protocol):
    """A whole-volume model (output grid = input grid) that can run only what a region of its output depends on.

    :func:`~SegExplainLib.explain` uses these two methods when the model has them.
    """

    def restricted_to(self, bounds: Bounds | None) -> contextlib.AbstractContextManager[dict[str, int]]:
        """Within the block, forward passes compute the output exactly inside ``bounds`` (``None``: everywhere);
        elsewhere the output is meaningless. Yields a record of what the passes ran, for the explanation's extras."""

    def whole_volume(self, x: torch.Tensor) -> torch.Tensor:
        """The unrestricted output for ``x``, possibly a stored one (never one for another input or state)."""
