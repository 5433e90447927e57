"""The contract every attribution method fulfils.

A method explains the scalar score ``sum(seed * logits)`` of each batch element, where ``seed`` has the shape of
the model output ``(B, K, D, H, W)``. Targets (a segment, a box, a clicked voxel, ...) only build seeds, so every
method supports every target, and the normalized aggregation of :mod:`SegExplainLib.aggregation` can combine many
seeds in one batch.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass
class AttributionOutput:
    """Raw result of one method call.

    Attributes:
        maps: Relevance per input voxel, shaped like the input ``(B, C, D, H, W)``.
        delta: Per batch element, how far the method is from its own sum rule (LRP conservation, IG completeness):
            ``sum(maps) - expected``. ``None`` for methods without such a rule.
        expected: Per batch element, the value ``sum(maps)`` should reach (score, or score difference to the
            baseline). ``None`` where ``delta`` is ``None``.
    """

    maps: torch.Tensor
    delta: torch.Tensor | None = None
    expected: torch.Tensor | None = None


class AttributionMethod(abc.ABC):
    """Base of all methods: options go to the constructor, data to :meth:`attribute`.

    Subclasses set ``name`` (the registry key used by :func:`SegExplainLib.explain`) and ``linear_in_seed``: true when
    the map is a linear function of the seed for a fixed input, which allows the exact normalized aggregation in a
    constant number of passes (gradient, LRP without layer-wise filters, IG, ...). Guided Backprop and Deconvolution
    rectify the backward signal and are not linear.
    """

    name: ClassVar[str]
    linear_in_seed: ClassVar[bool] = True

    @abc.abstractmethod
    def attribute(self, model: torch.nn.Module, inputs: torch.Tensor, seed: torch.Tensor) -> AttributionOutput:
        """Explain ``sum(seed * model(inputs))`` for each batch element.

        Args:
            model: Network in eval mode whose parameters do not require grad; returns logits ``(B, K, D, H, W)``.
            inputs: Float tensor ``(B, C, D, H, W)`` on the model's device.
            seed: Tensor shaped like the logits. When ``seed.requires_grad`` is true the method must build the graph
                of its backward pass (``create_graph=True``) so that the map can be differentiated w.r.t. the seed.

        Returns:
            The maps (same shape as ``inputs``) and, where the method has a sum rule, its delta.
        """

    @abc.abstractmethod
    def options(self) -> dict[str, Any]:
        """Every option of this method as JSON-friendly values, enough to rebuild it for the record."""
