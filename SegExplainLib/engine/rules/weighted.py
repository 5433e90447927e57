"""The base of rules that run modified forwards of a weighted layer, as groups of terms."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import SegExplainError
from .affine import affine_forward
from .base import PropagationContext, Rule, check_non_negative, replace_backward, stabilize


@dataclass
class Term:
    """One modified forward ``sign * layer(input; weight, bias)`` inside a rule.

    ``gate`` marks terms whose input is the layer input restricted to a sign (``x * gate``); their contribution to
    the propagated ``g`` is ``gate * vjp``. Rules of the first layer ignore it and collect ``input * vjp``.
    """

    input: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    sign: float = 1.0


class WeightRule(Rule):
    """Base of rules that run modified forwards of a weighted layer (conv, transposed conv, linear).

    A subclass returns groups of :class:`Term`; each group ``(coefficient, terms)`` gets the denominator
    ``z_g = sum(sign * layer(input; weight, bias))`` and passes ``coefficient * R / z_g`` back through its terms.
    """

    categories = frozenset({"convolution", "dense"})

    def __init__(self, *, epsilon: float = 1e-6) -> None:
        self.epsilon = check_non_negative("epsilon", epsilon)

    @abc.abstractmethod
    def groups(self, module: nn.Module, x: torch.Tensor) -> list[tuple[float, list[Term]]]:
        """The modified forwards of this rule for layer input ``x``."""

    def options(self) -> dict[str, Any]:
        return {"rule": self.name, "epsilon": self.epsilon}

    def _check_reads_input(self, module: nn.Module, x: torch.Tensor, ctx: PropagationContext) -> None:
        if self.first_layer_only and not ctx.reads_input(x):
            msg = (f"rule {self.name!r} applies to a layer that reads the network input, but "
                   f"{type(module).__name__} receives an intermediate tensor")
            raise SegExplainError(msg)

    def wrap(self, module, x, y, ctx):
        self._check_reads_input(module, x, ctx)

        def propagate(x_in, y_out, grad):
            relevance = ctx.filtered(y_out * grad)
            create_graph = torch.is_grad_enabled()
            total = torch.zeros_like(x_in)
            for coefficient, terms in self.groups(module, x_in):
                with torch.enable_grad():
                    leaves = [term.input.detach().requires_grad_(True) for term in terms]
                    z = sum(term.sign * affine_forward(module, leaf, term.weight, term.bias)
                            for term, leaf in zip(terms, leaves))
                ratio = coefficient * relevance / stabilize(z, self.epsilon)
                vjps = torch.autograd.grad(z, leaves, grad_outputs=ratio, create_graph=create_graph)
                for term, vjp in zip(terms, vjps):
                    if self.first_layer_only:
                        total = total + term.input * vjp
                    else:
                        total = total + (vjp if term.gate is None else term.gate * vjp)
            return ctx.to_input(x, total) if self.first_layer_only else total

        sink = ctx.input_sink if self.first_layer_only else None
        return replace_backward(x, y, propagate, sink)

def signed_parts(x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    """``(x_part, gate, positive)`` for the positive part and, if present, the negative part of ``x``."""
    parts = [(x.clamp(min=0), (x > 0).to(x.dtype), True)]
    if bool((x < 0).any()):
        parts.append((x.clamp(max=0), (x < 0).to(x.dtype), False))
    return parts
