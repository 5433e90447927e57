"""The base of every rule: how a layer's backward pass is replaced, and what a rule is told.

The engine propagates a *modified gradient* ``g`` rather than relevance itself: at every tensor ``t`` of the
network the relevance is ``R_t = t * g_t``. Propagating ``g`` instead of ``R`` has two consequences that make LRP as
cheap as a gradient:

* Operations that are positively homogeneous (ReLU, LeakyReLU, PReLU, max pooling, concatenation, slicing, padding,
  nearest upsampling) pass ``g`` exactly like the gradient does, so the plain autograd backward is already the LRP
  identity rule there and no hook is needed.
* For a linear layer ``z = W x + b`` the epsilon rule ``R_x = x * W^T (R_z / (z + eps))`` becomes
  ``g_x = W^T (g_z * z / (z + eps))``: one element-wise factor on the incoming gradient, then the layer's own
  backward. A residual addition is the LRP-0 rule (relevance split in proportion to the two contributions).

Rules that change the weights (z-plus, alpha-beta, gamma, flat, w-square, z-box) run a modified forward of the layer
in the backward pass and return ``g`` (or, for rules of the first layer, the input relevance itself).

For a small target, z-plus and epsilon run a convolution's backward on the box of its output voxels that receive
relevance (:class:`RelevanceWindow`); outside that box the relevance is exactly zero.
"""


from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import SegExplainError

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONVOLUTIONS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
WEIGHTED_LINEAR = (*CONVOLUTIONS, *TRANSPOSED_CONVOLUTIONS, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
         nn.GroupNorm)


def stabilize(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``z + epsilon * sign(z)`` with ``sign(0) = 1``, so that no denominator is zero."""
    return torch.where(z >= 0, z + epsilon, z - epsilon)


def epsilon_factor(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``z / (z + epsilon * sign(z))``, which is ``|z| / (|z| + epsilon)``: the epsilon rule as a gradient factor."""
    if epsilon == 0.0:
        return (z != 0).to(z.dtype)
    # as 1 - eps / (|z| + eps): one new tensor and four in-place passes, a third faster than |z| / (|z| + eps);
    # the two forms differ by one rounding of a number below 1
    return z.abs().add_(epsilon).reciprocal_().mul_(-epsilon).add_(1.0)


@dataclass
class PropagationContext:
    """What a rule needs to know besides its own layer.

    Attributes:
        network_input: The input tensor of the explained forward pass (rules of the first layer check it).
        input_sink: A zero tensor shaped like the input: rules of the first layer send the input relevance to it as
            its gradient, because relevance such as the flat rule's cannot be written as ``input * g``.
        layer_filter: An amplitude filter applied to the relevance entering every linear layer and norm layer
            (Tjoa et al.'s layer-wise mode), or ``None``.
        sparse_relevance: Whether the explained outputs are a small box of the output grid (a click, a box, a
            small segment): rules then compute what they need in the backward pass, and only over the part of each
            layer that receives relevance. ``None`` while the forward pass runs before the seed is known (the
            seed is read off its logits); the seed decides it before the backward pass.
    """

    network_input: torch.Tensor
    input_sink: torch.Tensor
    layer_filter: Any = None
    sparse_relevance: bool | None = False

    def filtered(self, relevance: torch.Tensor) -> torch.Tensor:
        if self.layer_filter is None:
            return relevance
        return relevance * self.layer_filter.factor(relevance)

    def reads_input(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is the network input or a copy of it (padded, cropped, reshaped): a first layer's input."""
        if x is self.network_input:
            return True
        node = x.grad_fn
        while node is not None and type(node).__name__ in _COPY_NODES:
            parents = [parent for parent, _ in node.next_functions if parent is not None]
            if len(parents) != 1:
                return False
            node = parents[0]
        return type(node).__name__ == "AccumulateGrad" and node.variable is self.network_input

    def to_input(self, x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        """Relevance of a first layer's input ``x`` carried back to the network input through the copies.

        A copy passes relevance like a gradient: each input voxel gets the relevance of all its copies, and padding
        voxels, which are no input voxels, drop theirs.
        """
        if x is self.network_input:
            return relevance
        (carried,) = torch.autograd.grad(x, self.network_input, grad_outputs=relevance, retain_graph=True,
                                         create_graph=torch.is_grad_enabled())
        return carried


_COPY_NODES = frozenset({
    "ConstantPadNdBackward0", "ReplicationPad1DBackward0", "ReplicationPad2DBackward0", "ReplicationPad3DBackward0",
    "ReflectionPad1DBackward0", "ReflectionPad2DBackward0", "ReflectionPad3DBackward0", "SliceBackward0",
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "UnsqueezeBackward0", "SqueezeBackward0",
    "SqueezeBackward1", "PermuteBackward0", "TransposeBackward0", "CloneBackward0", "AliasBackward0",
    "ToCopyBackward0", "ExpandBackward0",
})


class _ReplaceBackward(torch.autograd.Function):
    """Identity on the layer output whose backward is ``propagate(x, saved, grad)`` instead of the layer's own."""

    @staticmethod
    def forward(ctx, x, y, sink, saved, propagate):  # noqa: D102 - autograd protocol
        ctx.propagate = propagate
        ctx.save_for_backward(x, saved)
        ctx.has_sink = sink is not None
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 - autograd protocol
        x, saved = ctx.saved_tensors
        grad_x = ctx.propagate(x, saved, grad)
        if ctx.has_sink:
            return None, None, grad_x, None, None
        return grad_x, None, None, None, None


class _TransformGrad(torch.autograd.Function):
    """Identity whose backward replaces the gradient by ``transform(saved, grad)``; the layer's backward follows."""

    @staticmethod
    def forward(ctx, y, saved, transform):  # noqa: D102 - autograd protocol
        ctx.transform = transform
        ctx.save_for_backward(saved)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 - autograd protocol
        (saved,) = ctx.saved_tensors
        return ctx.transform(saved, grad), None, None


def replace_backward(x: torch.Tensor, y: torch.Tensor, propagate: Callable, sink: torch.Tensor | None = None,
                     saved: torch.Tensor | None = None):
    """Return ``y`` cut from its own graph, reconnected to ``x`` (or to ``sink``) through ``propagate``.

    ``propagate(x, saved, grad)`` receives what the rule saved in the forward pass: by default the output ``y``;
    rules that can fold their denominators into one tensor save that instead, to keep memory at the gradient's.
    """
    y = y.detach()
    return _ReplaceBackward.apply(x, y, sink, y if saved is None else saved, propagate)


def transform_grad(y: torch.Tensor, transform: Callable, saved: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``y`` unchanged; on the way back its gradient becomes ``transform(saved, grad)`` (``saved``: ``y``)."""
    return _TransformGrad.apply(y, y.detach() if saved is None else saved, transform)


class Rule(abc.ABC):
    """How one module passes relevance back.

    ``categories`` lists the kinds of module the rule can be attached to (see
    :data:`SegExplainLib.engine.composites.CATEGORIES`); ``first_layer_only`` rules need the network input as the layer's
    input, because their relevance does not factor as ``input * g``.
    """

    name: ClassVar[str]
    categories: ClassVar[frozenset[str]]
    first_layer_only: ClassVar[bool] = False

    @abc.abstractmethod
    def wrap(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: PropagationContext) -> torch.Tensor:
        """Return the module output ``y`` wired so that the backward pass applies this rule."""

    def forward(self, module: nn.Module, x: torch.Tensor, original: Callable, ctx: PropagationContext):
        """Run the module on ``x`` (its own ``forward`` is ``original``) and wire the output for this rule.

        Rules may compute what their backward pass needs in the same call as the output (see :class:`ZPlus`).
        """
        return self.wrap(module, x, original(x), ctx)

    def options(self) -> dict[str, Any]:
        """The rule's name and parameters, for the explanation record."""
        return {"rule": self.name}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.options().items() if k != "rule")
        return f"{type(self).__name__}({params})"


def check_non_negative(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or value < 0 or value != value:
        msg = f"{name} must be a non-negative number, got {value!r}"
        raise SegExplainError(msg)
    return float(value)
