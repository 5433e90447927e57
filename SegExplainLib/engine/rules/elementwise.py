"""Rules of element-wise layers: pass (activations, norm layers), Guided Backprop and Deconvolution."""

from __future__ import annotations

from typing import Any

import torch

from .affine import unwired
from .base import NORMS, Rule, check_non_negative, replace_backward, stabilize


class Pass(Rule):
    """Relevance passes through unchanged: ``R_x = R_y`` (element-wise activations, norm layers).

    On a norm layer this equals merging the layer, with its statistics frozen, into the preceding convolution under
    the z-plus rule (for a positive scale), which keeps relevance conserved; it is the default for norm layers that a
    canonizer cannot merge (InstanceNorm, GroupNorm).
    """

    name = "pass"
    categories = frozenset({"norm", "activation"})

    def __init__(self, epsilon: float = 1e-12) -> None:
        self.epsilon = check_non_negative("epsilon", epsilon)

    def options(self) -> dict[str, Any]:
        return {"rule": self.name, "epsilon": self.epsilon}

    def wrap(self, module, x, y, ctx):
        if ctx.layer_filter is None or not isinstance(module, NORMS):
            # the rule is one factor y / x on the gradient, computed now: the backward pass is a single product
            with torch.no_grad():
                factor = y / stabilize(x, self.epsilon)
            return replace_backward(x, y, lambda x_in, saved, grad: grad * saved, saved=factor)

        def propagate(x_in, y_out, grad):
            return ctx.filtered(y_out * grad) / stabilize(x_in, self.epsilon)

        return replace_backward(x, y, propagate)

class GuidedBackprop(Rule):
    """Guided Backprop on a rectifier: ``g_x = f'(x) * max(g_y, 0)``; f' is LeakyReLU's or PReLU's slope too."""

    name = "guided_backprop"
    categories = frozenset({"rectifier", "activation"})

    def wrap(self, module, x, y, ctx):
        def propagate(x_in, y_out, grad):
            with torch.enable_grad():
                leaf = x_in.detach().requires_grad_(True)
                out = unwired(module)(leaf)
            return torch.autograd.grad(out, leaf, grad_outputs=grad.clamp(min=0),
                                       create_graph=torch.is_grad_enabled())[0]

        return replace_backward(x, y, propagate)


class Deconvolution(Rule):
    """Deconvolution (Zeiler & Fergus): the backward signal goes through the rectifier itself, ``g_x = f(g_y)``.

    ReLU gives ``max(g, 0)``; LeakyReLU and PReLU keep their negative slope, as their forward does.
    """

    name = "deconvolution"
    categories = frozenset({"rectifier"})

    def wrap(self, module, x, y, ctx):
        return replace_backward(x, y, lambda x_in, y_out, grad: unwired(module)(grad))
