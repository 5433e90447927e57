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

:func:`adaptive_simpson` (``quadrature="adaptive_simpson"``) does the same with Simpson's rule on each panel (both ends
and the middle, in ``log alpha`` for wide panels). A split keeps the panel's three nodes, which its halves share, and
costs the two new middles (their passes also give ``F`` there): two gradient passes where splitting a panel of 4
Gauss-Legendre nodes costs eight and drops its four. Where the score swings or kinks (ReLU-type layers, a click whose
score changes little overall) that reaches the tolerance with fewer passes; on a smooth path Simpson's lower order
needs more (docs/engine.md has both, measured). Each node's gradient is kept until the end, when its final weight is
known: at most ``max_stored`` of them, beyond which the open panel with the smallest error is closed.

Either result is a composite rule: the map is linear in the explained seed for its nodes, which
:meth:`SegExplainLib.engine.gradients.integrated_gradients.IntegratedGradients.for_target` fixes once for every pass
of one target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import SegExplainError

__all__ = ["ADAPTIVE_RULES", "FIXED_RULES", "MAX_NODES", "QUADRATURES", "AdaptiveResult", "adaptive",
           "adaptive_simpson", "fixed_rule"]

FIXED_RULES = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")
ADAPTIVE_RULES = ("adaptive", "adaptive_simpson")
QUADRATURES = (*ADAPTIVE_RULES, *FIXED_RULES)
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


def _scale(f: np.ndarray) -> float:
    """What the tolerance is a share of: the score's change ``|F(1) - F(0)|`` over the scan ``f`` (summed over the
    batch), kept above zero for a path whose ends score alike."""
    return max(float(np.abs(f[-1] - f[0]).sum()), 1e-12 * float(np.abs(f).max()), 1e-30)


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
    scale = _scale(f)
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


def _weighted_sum(terms: Any) -> Any:
    """``sum(tensor * weight)`` over ``(tensor, weight)`` pairs; ``None`` for none."""
    total = None
    for tensor, weight in terms:
        total = tensor * weight if total is None else total + tensor * weight
    return total


def _simpson(a: float, b: float) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Nodes and weights of Simpson's rule on ``[a, b]``: in ``log(alpha)`` when the panel spans a factor of
    :data:`GEOMETRIC` or more (``d alpha = alpha d log(alpha)``), its middle then the geometric mean."""
    if a > 0 and b >= GEOMETRIC * a:
        span = float(np.log(b / a))
        middle = float(np.sqrt(a * b))
        return (a, middle, b), (span * a / 6, 4 * span * middle / 6, span * b / 6)
    middle = 0.5 * (a + b)
    return (a, middle, b), ((b - a) / 6, 4 * (b - a) / 6, (b - a) / 6)


def adaptive_simpson(score_at: Callable[[np.ndarray], np.ndarray],
                     gradients: Callable[[np.ndarray], tuple[list[Any], np.ndarray, np.ndarray]], *, max_passes: int,
                     tolerance: float, max_stored: int | None = None) -> AdaptiveResult:
    """:func:`adaptive` with Simpson's panels, whose splits reuse their nodes (see the module docstring).

    Args:
        score_at: ``F`` at the given nodes, shaped ``(nodes, batch)`` (forward passes only).
        gradients: For nodes, the gradient at each (a list of tensors, in one batched evaluation), its estimate of
            ``F'`` there and ``F`` there (which the gradient's pass computes), each shaped ``(nodes, batch)``. Each
            node's gradient is kept and reweighted as panels split.
        max_passes: Most gradient evaluations (nodes) to spend.
        tolerance: Stop once the panels' errors add up to at most this share of ``|F(1) - F(0)|``.
        max_stored: Most node gradients kept at once (memory); beyond it the open panel with the smallest error is
            closed: its share is summed and the gradients of nodes that no open panel uses are freed. ``None``: all.
    """
    scan = np.asarray(SCAN)
    f = np.asarray(score_at(scan), dtype=np.float64)  # the only forward passes: F at a split comes with its pass
    scale = _scale(f)
    if max_passes < 3:  # no room for one Simpson panel: Gauss-Legendre on [0, 1]
        nodes, weights = fixed_rule("gausslegendre", max(max_passes, 1))
        tensors, slopes_at, _ = gradients(nodes)
        contribution = _weighted_sum(zip(tensors, weights))
        bound = float(np.abs(weights @ slopes_at - (f[-1] - f[0])).sum()) / scale
        return AdaptiveResult(contribution, nodes, weights, len(nodes), len(scan), bound, 1)
    scores = {float(alpha): row for alpha, row in zip(scan, f)}
    slopes: dict[float, np.ndarray] = {}  # per node: the gradient's estimate of F' there
    stored: dict[float, Any] = {}  # per node of an open panel: its gradient
    closed: list[tuple[float, float]] = []
    summed = None  # the closed panels' share

    def share(panel: tuple[float, float]) -> Any:
        nodes, weights = _simpson(*panel)
        return _weighted_sum((stored[node], w) for node, w in zip(nodes, weights))

    def evaluated(*new_panels: tuple[float, float]) -> list[tuple[float, float]]:
        """The panels, their nodes' gradients evaluated in one batched call (those not known yet)."""
        new = sorted({node for panel in new_panels for node in _simpson(*panel)[0]} - slopes.keys())
        if new:
            tensors, slopes_at, scores_at = gradients(np.array(new))
            for node, tensor, slope, score in zip(new, tensors, slopes_at, scores_at):
                stored[node], slopes[node] = tensor, slope
                scores.setdefault(node, score)  # a scan point keeps its forward pass's value
        return list(new_panels)

    def error(panel: tuple[float, float]) -> float:
        nodes, weights = _simpson(*panel)
        estimate = sum(w * slopes[node] for node, w in zip(nodes, weights))
        return float(np.abs(estimate - (scores[panel[1]] - scores[panel[0]])).sum())

    def close_beyond_max_stored(keep: float | None = None) -> None:
        """Close open panels while more gradients are kept than ``max_stored`` (``keep``: a node still to be used)."""
        nonlocal summed
        while max_stored is not None and len(stored) > max_stored and len(panels) > 1:
            panel = panels.pop(int(np.argmin([error(panel) for panel in panels])))
            summed = share(panel) if summed is None else summed + share(panel)
            closed.append(panel)
            still_used = {keep, *(node for open_panel in panels for node in _simpson(*open_panel)[0])}
            for node in [node for node in stored if node not in still_used]:
                del stored[node]

    edges = _initial_panels(f, max_panels=(max_passes - 1) // 2, tolerance=tolerance)
    initial = [(float(scan[i]), float(scan[j])) for i, j in zip(edges, edges[1:])]
    panels: list[tuple[float, float]] = []
    if max_stored is None or 2 * len(initial) + 1 <= max_stored:
        panels = evaluated(*initial)  # one batch
    else:  # panel by panel, closing as they come
        for panel in initial:
            panels += evaluated(panel)
            close_beyond_max_stored(keep=panel[1])  # the next panel's first node
    while len(slopes) + 2 <= max_passes:
        errors = [error(panel) for panel in panels]
        if sum(errors) + sum(error(panel) for panel in closed) <= tolerance * scale:
            break
        worst = int(np.argmax(errors))
        a, b = panels.pop(worst)
        middle = _simpson(a, b)[0][1]  # its gradient and F are known: the split costs its halves' middles
        panels[worst:worst] = evaluated((a, middle), (middle, b))
        close_beyond_max_stored()
    shares = [share(panel) for panel in panels] + ([] if summed is None else [summed])
    contribution = sum(shares[1:], shares[0])
    weight_of: dict[float, float] = {}
    for panel in panels + closed:
        for node, w in zip(*_simpson(*panel)):
            weight_of[node] = weight_of.get(node, 0.0) + w
    nodes = np.array(sorted(weight_of))
    bound = sum(error(panel) for panel in panels + closed) / scale
    return AdaptiveResult(contribution, nodes, np.array([weight_of[node] for node in nodes]), len(slopes),
                          len(scan), bound, len(panels) + len(closed))
