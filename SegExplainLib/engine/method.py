"""The contract every attribution method fulfils.

A method explains the scalar score ``sum(seed * logits)`` of each batch element, where ``seed`` has the shape of
the model output ``(B, K, D, H, W)``. Targets (a segment, a box, a clicked voxel, ...) only build seeds, so every
method supports every target, and the normalized aggregation of :func:`SegExplainLib.engine.api.explain` can combine
many seeds in one batch.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

#: The registered methods that attach no rules to the network's modules (``walks_modules`` false): they explain any
#: network the gradient runs on, TorchScript included. Kept here, below the methods and the modules that name them
#: in advice; test_api checks it against :data:`~SegExplainLib.engine.api.METHODS`.
RULE_FREE_METHODS = ("gradient", "gradient_shap", "gradient_x_input", "integrated_gradients", "occlusion", "rise",
                     "sequence_shapley", "smoothgrad", "supervoxel_shapley")


def rule_free_methods() -> str:
    """:data:`RULE_FREE_METHODS` as a list in words, for advice: ``"gradient, ..., occlusion or smoothgrad"``."""
    return f"{', '.join(RULE_FREE_METHODS[:-1])} or {RULE_FREE_METHODS[-1]}"


@dataclass
class AttributionOutput:
    """Raw result of one method call.

    Attributes:
        maps: Relevance per input voxel, shaped like the input ``(B, C, D, H, W)``.
        delta: Per batch element, how far the method is from its own sum rule (LRP conservation, IG completeness):
            ``sum(maps) - expected``. ``None`` for methods without such a rule.
        expected: Per batch element, the value ``sum(maps)`` should reach (score, or score difference to the
            baseline). ``None`` where ``delta`` is ``None``.
        extras: What the call chose or spent, for the record (e.g. IG's internal batch size and gradient passes).
    """

    maps: torch.Tensor
    delta: torch.Tensor | None = None
    expected: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class AttributionMethod(abc.ABC):
    """Base of all methods: options go to the constructor, data to :meth:`attribute`.

    Subclasses set ``name`` (the registry key used by :func:`SegExplainLib.explain`), ``linear_in_seed``: true when
    the map is a linear function of the seed for a fixed input, which allows the exact normalized aggregation in a
    constant number of passes (gradient, LRP without layer-wise filters, IG, ...; Guided Backprop and Deconvolution
    rectify the backward signal and are not linear), and ``walks_modules``: true when the method hooks the network's
    modules (LRP, Guided Backprop, Deconvolution, Grad-CAM), which a TorchScript model does not have.

    ``seed_local`` is true when the map depends on the model only through the output where the seed is non-zero,
    with backward signals that stay exactly zero where they are zero: the score function and its derivatives
    (gradient, IG, SmoothGrad, occlusion) or rules that send zero relevance on as zero (LRP, Guided Backprop,
    Deconvolution). A sliding window may then run only the windows that reach the region: the maps are the same.
    Grad-CAM reads a layer's activation over the whole forward pass and is not seed-local.

    ``per_sequence`` is true when the map holds one value per input channel, spread evenly over its voxels
    (per-sequence Shapley): it orders the sequences, not the voxels, so voxel-level scores do not judge it.
    """

    name: ClassVar[str]
    linear_in_seed: ClassVar[bool] = True
    walks_modules: ClassVar[bool] = False
    seed_local: ClassVar[bool] = False
    per_sequence: ClassVar[bool] = False

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

    def sum_rule_warnings(self, delta: float | None, expected: float | None) -> list[str]:
        """Warnings about a finished map's sum rule (``sum(maps) - expected = delta``); none by default."""
        return []

    def for_target(self, model: torch.nn.Module, inputs: torch.Tensor, seed: torch.Tensor) -> AttributionMethod:
        """This method with every choice that depends on the data made for explaining ``seed`` at ``inputs``.

        Several passes for one target (those of the normalized aggregation) then share one linear map. Only
        Integrated Gradients' adaptive quadrature makes such a choice (its nodes); other methods return themselves.
        """
        return self

    def details(self) -> dict[str, Any]:
        """What the options resolve to, for the record's ``extras`` (e.g. LRP's rule per layer kind); none by
        default. Unlike :meth:`options`, these are not constructor arguments."""
        return {}

    @abc.abstractmethod
    def options(self) -> dict[str, Any]:
        """Every option of this method as JSON-friendly values, enough to rebuild it for the record:
        ``explain(model, image, target, record["method"], **record["options"])`` rebuilds the method."""
