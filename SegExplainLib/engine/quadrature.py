"""Quadrature of the Integrated Gradients path integral: fixed rules and an adaptive scheme.

IG integrates ``g(alpha) = grad f(x0 + alpha (x - x0))`` over ``alpha`` in [0, 1]. Its sum over the voxels times
``x - x0`` is the derivative of the scalar ``F(alpha) = f(x0 + alpha (x - x0))``, so completeness ties the map to
``F(1) - F(0)``. Fixed rules put their nodes without looking at ``F``. That fails on networks with instance norm
after the first convolution (nnU-Net's layout): such a network cannot see the input's scale, so along the path from
a zero or constant baseline the score is constant except in a sliver near ``alpha = 0`` whose width depends on the
norms' epsilon and the input's contrast. On the demo network it spans 1e-8 to 1e-2, where Gauss-Legendre with 32
nodes has two nodes.

:func:`adaptive` puts the nodes where ``F`` changes:

1. ``F`` is evaluated (forward passes only) at the scan points ``0, 1e-8, 1e-7, ..., 0.1, 0.5, 1``. A scan point
   where ``F`` lies on the straight line between its neighbours is dropped (flat runs, and the decades near 0 that a
   path which is smooth there, as from a blurred baseline, crosses in a line); the intervals between the points kept
   become panels with a Gauss-Legendre rule of a few nodes.
2. Each panel's completeness is known exactly: its gradient estimate must equal ``F(b) - F(a)``. The panel with the
   largest error is split (at the geometric mean when it spans a factor of 4 or more, else in the middle; ``F`` at
   the split point costs one forward pass) until the errors add up to at most ``tolerance`` times the score change,
   or the next split would exceed the budget of gradient passes.

The result is a composite Gauss-Legendre rule: the map is linear in the explained seed for its nodes, which
:meth:`SegExplainLib.engine.gradients.integrated_gradients.IntegratedGradients.for_target` fixes once for every pass
of one target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import SegExplainError

__all__ = ["FIXED_RULES", "MAX_NODES", "QUADRATURES", "AdaptiveResult", "adaptive", "fixed_rule"]

FIXED_RULES = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")
QUADRATURES = ("adaptive", *FIXED_RULES)
#: The most nodes a rule may have (Gauss-Legendre's nodes come from an n x n eigenproblem).
MAX_NODES = 4096
#: Where F is scanned first: each decade down to 1e-8, where instance-normalized networks change, and the middle.
SCAN = (0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0)
#: Gauss-Legendre nodes per panel.
ORDER = 4
#: A panel ``[a, b]`` with ``b >= GEOMETRIC * a`` spreads its nodes in ``log(alpha)`` and is split at ``sqrt(a b)``.
GEOMETRIC = 4.0


def fixed_rule(rule: str, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``alpha`` in [0, 1] and weights (summing to one) of a fixed rule, in float64.

    ``gausslegendre`` maps ``numpy.polynomial.legendre.leggauss`` from [-1, 1] to [0, 1]. The Riemann rules use
    ``n_steps`` equal intervals of [0, 1] (left/right end points or mid points); ``riemann_trapezoid`` evaluates
    ``linspace(0, 1, n_steps)`` with weights ``1/(n_steps-1)``, halved at both ends (the proper trapezoid rule;
    captum 0.9 uses ``1/n_steps`` there, so its weights sum to ``(n_steps-1)/n_steps``).
    """
    n = n_steps
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return 0.5 * (nodes + 1.0), 0.5 * weights
    if rule == "riemann_trapezoid":
        alphas = np.linspace(0.0, 1.0, n)
        weights = np.full(n, 1.0 / (n - 1))
        weights[0] /= 2
        weights[-1] /= 2
        return alphas, weights
    weights = np.full(n, 1.0 / n)
    if rule == "riemann_left":
        return np.arange(n) / n, weights
    if rule == "riemann_right":
        return np.arange(1, n + 1) / n, weights
    if rule == "riemann_middle":
        return (np.arange(n) + 0.5) / n, weights
    raise SegExplainError(f"quadrature {rule!r} is not valid; expected one of {', '.join(QUADRATURES)}")


@dataclass
class _Panel:
    """One interval ``[a, b]`` of the path with its Gauss-Legendre estimate."""

    a: float
    b: float
    f_a: np.ndarray  # F at a, per batch element
    f_b: np.ndarray
    nodes: np.ndarray = field(default_factory=lambda: np.zeros(0))
    weights: np.ndarray = field(default_factory=lambda: np.zeros(0))
    estimate: np.ndarray | None = None  # the gradient estimate of F(b) - F(a), per batch element
    contribution: Any = None  # the panel's share of the integrated gradient (a tensor of the caller's)

    @property
    def error(self) -> float:
        return float(np.abs(self.estimate - (self.f_b - self.f_a)).sum())

    def split_point(self) -> float:
        return float(np.sqrt(self.a * self.b)) if self.a > 0 and self.b >= GEOMETRIC * self.a else (
            self.b / 10 if self.a == 0 else 0.5 * (self.a + self.b))


@dataclass
class AdaptiveResult:
    """The chosen rule and what it cost.

    Attributes:
        contribution: Sum of the panels' contributions (the integrated gradient, before the ``x - x0`` factor).
        nodes, weights: The composite rule, sorted by node.
        gradient_passes: Gradient evaluations (one per node and batch element).
        forward_passes: Evaluations of ``F`` alone.
        error_bound: Sum over panels of ``|estimate - (F(b) - F(a))|``, relative to ``|F(1) - F(0)|``: an upper
            bound of the relative completeness delta.
        panels: Number of panels.
    """

    contribution: Any
    nodes: np.ndarray
    weights: np.ndarray
    gradient_passes: int
    forward_passes: int
    error_bound: float
    panels: int


def _initial_panels(f: np.ndarray, max_panels: int, tolerance: float) -> list[int]:
    """Indices into :data:`SCAN` of the initial panels' edges, at most ``max_panels``.

    A scan point is dropped where ``F`` at it and at the points dropped beside it is within ``tolerance / 4`` times
    ``F``'s variation over the scan of the straight line between the kept points around them: flat runs, and the
    decades near 0 that a path which is smooth there (as from a blurred baseline) crosses in a line.
    """
    scan = np.asarray(SCAN)
    slack = 0.25 * tolerance * np.abs(np.diff(f, axis=0)).sum()
    edges = list(range(len(SCAN)))
    i = 1
    while i < len(edges) - 1:
        lo, hi = edges[i - 1], edges[i + 1]
        t = (scan[lo + 1:hi] - scan[lo]) / (scan[hi] - scan[lo])
        if np.abs(f[lo + 1:hi] - f[lo] - t[:, None] * (f[hi] - f[lo])).sum(axis=1).max() <= slack:
            del edges[i]
        else:
            i += 1
    while len(edges) - 1 > max_panels:  # a small budget: merge the pair of panels that changes least
        pairs = [abs(f[edges[i + 1]] - f[edges[i - 1]]).sum() for i in range(1, len(edges) - 1)]
        del edges[1 + int(np.argmin(pairs))]
    return edges


def adaptive(score_at: Callable[[np.ndarray], np.ndarray],
             integrate: Callable[[np.ndarray, np.ndarray], tuple[Any, np.ndarray]], *, max_passes: int,
             tolerance: float) -> AdaptiveResult:
    """Integrate along the path with nodes where ``F`` changes (see the module docstring).

    Args:
        score_at: ``F`` at the given nodes, shaped ``(nodes, batch)`` (forward passes only).
        integrate: For nodes and weights, the weighted sum of the gradients (a tensor) and its estimate of the change
            of ``F``, shaped ``(batch,)``.
        max_passes: Most gradient evaluations (nodes) to spend.
        tolerance: Stop once the panels' errors add up to at most this share of ``|F(1) - F(0)|``.
    """
    scan = np.asarray(SCAN)
    f = np.asarray(score_at(scan), dtype=np.float64)
    forward_passes = len(scan)
    edges = _initial_panels(f, max_panels=max_passes, tolerance=tolerance)
    order = max(1, min(ORDER, max_passes // (len(edges) - 1)))
    base_nodes, base_weights = fixed_rule("gausslegendre", order)
    passes = 0

    def evaluated(a: float, b: float, f_a: np.ndarray, f_b: np.ndarray) -> _Panel:
        nonlocal passes
        if a > 0 and b >= GEOMETRIC * a:  # nodes evenly spread in log(alpha): d alpha = alpha d log(alpha)
            span = np.log(b / a)
            nodes = a * np.exp(span * base_nodes)
            panel = _Panel(a, b, f_a, f_b, nodes, span * base_weights * nodes)
        else:
            panel = _Panel(a, b, f_a, f_b, a + (b - a) * base_nodes, (b - a) * base_weights)
        panel.contribution, panel.estimate = integrate(panel.nodes, panel.weights)
        passes += order
        return panel

    panels = [evaluated(scan[i], scan[j], f[i], f[j]) for i, j in zip(edges, edges[1:])]
    scale = max(float(np.abs(f[-1] - f[0]).sum()), 1e-12 * float(np.abs(f).max()), 1e-30)
    while passes + 2 * order <= max_passes:
        errors = [panel.error for panel in panels]
        if sum(errors) <= tolerance * scale:
            break
        worst = panels.pop(int(np.argmax(errors)))
        middle = worst.split_point()
        f_middle = np.asarray(score_at(np.array([middle])), dtype=np.float64)[0]
        forward_passes += 1
        panels += [evaluated(worst.a, middle, worst.f_a, f_middle), evaluated(middle, worst.b, f_middle, worst.f_b)]
    panels.sort(key=lambda panel: panel.a)
    contribution = panels[0].contribution
    for panel in panels[1:]:
        contribution = contribution + panel.contribution
    return AdaptiveResult(contribution, np.concatenate([p.nodes for p in panels]),
                          np.concatenate([p.weights for p in panels]), passes, forward_passes,
                          sum(panel.error for panel in panels) / scale, len(panels))
