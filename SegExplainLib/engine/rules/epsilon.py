"""LRP-epsilon and LRP-0: one factor on the gradient, on linear and norm layers."""

from __future__ import annotations

from typing import Any

import torch

from .affine import affine_forward, affine_vjp, frozen_norm_scale, zero_padded
from .base import (
    CONVOLUTIONS,
    NORMS,
    PropagationContext,
    Rule,
    check_non_negative,
    epsilon_factor,
    replace_backward,
    stabilize,
    transform_grad,
)
from .window import RelevanceWindow


class Epsilon(Rule):
    """LRP-epsilon: ``R_x = x * W^T (R_z / (z + eps sign z))``; biases absorb part of the relevance.

    On a norm layer the rule treats the layer as the affine map it is for the current input (statistics frozen).

    Args:
        epsilon: Stabilizer added to every denominator. ``epsilon=0`` is LRP-0 (the rule :class:`Zero`).
    """

    name = "epsilon"
    categories = frozenset({"convolution", "dense", "parameter_free", "norm"})

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = check_non_negative("epsilon", epsilon)

    def options(self) -> dict[str, Any]:
        return {"rule": self.name, "epsilon": self.epsilon}

    def _ratio(self, y: torch.Tensor, grad: torch.Tensor, ctx: PropagationContext) -> torch.Tensor:
        """``R_y / (y + eps)`` with ``R_y = y * grad`` after the layer-wise filter."""
        relevance = ctx.filtered(y * grad)
        if self.epsilon == 0.0:
            return torch.where(y == 0, torch.zeros_like(y), relevance / torch.where(y == 0, 1.0, y))
        return relevance / stabilize(y, self.epsilon)

    def forward(self, module, x, original, ctx):
        if not isinstance(module, CONVOLUTIONS) or not zero_padded(module) or ctx.layer_filter is not None:
            return super().forward(module, x, original, ctx)
        # A convolution and its transpose run through affine_forward / affine_vjp (oneDNN on CPU), the transpose
        # on the part of the output that receives relevance; the rule is one factor on the gradient.
        weight = module.weight.detach()
        with torch.no_grad():
            y = affine_forward(module, x, weight, None if module.bias is None else module.bias.detach())
            factor = epsilon_factor(y, self.epsilon)

        def transpose_part(window, x_part, grad, saved):
            return affine_vjp(module, x_part, weight, window.output(grad) * window.output(saved), window.padding)

        return replace_backward(x, y, lambda x_in, saved, grad: RelevanceWindow.propagate(
            module, x_in, grad, saved, transpose_part, ctx), saved=factor)

    def wrap(self, module, x, y, ctx):
        norm = isinstance(module, NORMS)
        scale = frozen_norm_scale(module, x) if norm else None
        if ctx.layer_filter is None:
            # the rule is one factor on the gradient, computed now: the backward pass is a single product
            with torch.no_grad():
                factor = epsilon_factor(y, self.epsilon)
                if norm:
                    factor = factor * scale
            if norm:
                return replace_backward(x, y, lambda x_in, saved, grad: grad * saved, saved=factor)
            return transform_grad(y, lambda saved, grad: grad * saved, saved=factor)
        if norm:
            return replace_backward(x, y, lambda x_in, y_out, grad: self._ratio(y_out, grad, ctx) * scale)
        return transform_grad(y, lambda y_out, grad: self._ratio(y_out, grad, ctx))


class Zero(Epsilon):
    """LRP-0: the epsilon rule without stabilizer (gradient x input on ReLU networks without biases)."""

    name = "zero"

    def __init__(self) -> None:
        super().__init__(epsilon=0.0)

    def options(self) -> dict[str, Any]:
        return {"rule": self.name}
