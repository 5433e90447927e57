"""Rules: how one layer passes relevance back, and their registry.

Each rule lives in a module of its kind (:mod:`.base` says how rules work); this package names them all.
"""

from __future__ import annotations

from typing import Any

from ...errors import SegExplainError
from .alpha_beta import AlphaBeta, Gamma
from .base import Rule
from .elementwise import Deconvolution, GuidedBackprop, Pass
from .epsilon import Epsilon, Zero
from .first_layer import Flat, WSquare, ZBox
from .z_plus import ZPlus

__all__ = ["RULES", "AlphaBeta", "Deconvolution", "Epsilon", "Flat", "Gamma", "GuidedBackprop", "Pass", "Rule",
           "WSquare", "ZBox", "ZPlus", "Zero", "make_rule"]

RULES: dict[str, type[Rule]] = {
    rule.name: rule for rule in (Epsilon, Zero, Pass, ZPlus, AlphaBeta, Gamma, Flat, WSquare, ZBox,
                                 GuidedBackprop, Deconvolution)
}


def make_rule(spec: str | Rule, **options: Any) -> Rule:
    """A rule from its registry name (``"epsilon"``, ``"z_plus"``, ...) and options, or a rule as it is."""
    if isinstance(spec, Rule):
        return spec
    if spec not in RULES:
        msg = f"unknown LRP rule {spec!r}; expected one of {sorted(RULES)}"
        raise SegExplainError(msg)
    try:
        return RULES[spec](**options)
    except TypeError as error:
        msg = f"rule {spec!r} does not take options {sorted(options)}: {error}"
        raise SegExplainError(msg) from None
