"""Rules that weigh positive against negative contributions: alpha-beta and gamma."""

from __future__ import annotations

from typing import Any

from ...errors import SegExplainError
from .base import check_non_negative
from .weighted import Term, WeightRule, signed_parts


class AlphaBeta(WeightRule):
    """Alpha-beta: ``alpha`` times the positive contributions minus ``beta`` times the negative ones.

    ``alpha - beta = 1`` keeps relevance conserved; presets: alpha1-beta0 (equals z-plus) and alpha2-beta1.

    Args:
        alpha: Weight of positive contributions.
        beta: Weight of negative contributions.
    """

    name = "alpha_beta"

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, *, epsilon: float = 1e-6) -> None:
        super().__init__(epsilon=epsilon)
        self.alpha = check_non_negative("alpha", alpha)
        self.beta = check_non_negative("beta", beta)
        if abs(self.alpha - self.beta - 1.0) > 1e-9:
            msg = f"alpha - beta must equal 1 to conserve relevance, got alpha={alpha!r}, beta={beta!r}"
            raise SegExplainError(msg)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "alpha": self.alpha, "beta": self.beta}

    def groups(self, module, x):
        weight = module.weight.detach()
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        parts = signed_parts(x)
        positive = [Term(p, w_pos if pos else w_neg, None, g) for p, g, pos in parts]
        negative = [Term(p, w_neg if pos else w_pos, None, g) for p, g, pos in parts]
        groups = [(self.alpha, positive)]
        if self.beta:
            groups.append((-self.beta, negative))
        return groups


class Gamma(WeightRule):
    """Gamma: weights ``w + gamma * w+`` (for negative inputs ``w + gamma * w-``), favouring positive evidence.

    Args:
        gamma: How much positive contributions are boosted (0 gives LRP-epsilon without biases' absorption).
    """

    name = "gamma"

    def __init__(self, gamma: float = 0.25, *, epsilon: float = 1e-6) -> None:
        super().__init__(epsilon=epsilon)
        self.gamma = check_non_negative("gamma", gamma)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "gamma": self.gamma}

    def groups(self, module, x):
        weight = module.weight.detach()
        bias = None if module.bias is None else module.bias.detach()
        terms = []
        for part, gate, positive in signed_parts(x):
            boost = weight.clamp(min=0) if positive else weight.clamp(max=0)
            bias_part = None if bias is None or not positive else bias + self.gamma * bias.clamp(min=0)
            terms.append(Term(part, weight + self.gamma * boost, bias_part, gate))
        return [(1.0, terms)]
