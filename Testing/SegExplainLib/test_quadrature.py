"""The adaptive quadrature on scalar paths whose integral is known in closed form."""

from __future__ import annotations

import numpy as np
import pytest

from SegExplainLib.engine.quadrature import MAX_NODES, SCAN, adaptive, adaptive_simpson, fixed_rule


class Path:
    """``F`` and ``F'`` of a scalar path; ``integrate`` returns the rule's estimate of the change of ``F`` twice (the
    "gradient tensor" and the completeness estimate are the same number for a scalar path)."""

    def __init__(self, f, df) -> None:
        self.f, self.df = f, df
        self.gradient_calls = 0

    def score_at(self, alphas: np.ndarray) -> np.ndarray:
        return self.f(np.asarray(alphas, dtype=np.float64))[:, None]

    def integrate(self, nodes: np.ndarray, weights: np.ndarray):
        self.gradient_calls += len(nodes)
        value = float(np.sum(weights * self.df(nodes)))
        return value, np.array([value])


def sliver(width: float) -> Path:
    """``F = tanh(alpha / width)``: the whole change in ``[0, ~3 width]``, as from a constant baseline into an
    instance-normalized network."""
    return Path(lambda a: np.tanh(a / width), lambda a: (1 - np.tanh(a / width) ** 2) / width)


@pytest.mark.parametrize("width", [1e-7, 1e-5, 1e-3, 0.3])
def test_a_sliver_anywhere_converges_within_64_passes(width):
    path = sliver(width)
    exact = np.tanh(1 / width)
    result = adaptive(path.score_at, path.integrate, max_passes=64, tolerance=0.01)
    error = abs(result.contribution - exact) / exact
    assert error < 0.01, (width, error)
    assert result.gradient_passes == path.gradient_calls <= 64
    assert result.error_bound >= error - 1e-12  # the panels' errors bound the completeness error
    assert result.forward_passes >= len(SCAN)


def test_fixed_gauss_legendre_misses_the_same_sliver():
    # the failure the adaptive rule exists for: 64 Gauss-Legendre nodes put none inside [0, 3e-5]
    nodes, weights = fixed_rule("gausslegendre", 64)
    path = sliver(1e-5)
    assert abs(np.sum(weights * path.df(nodes)) - 1) > 0.5


def test_a_smooth_path_meets_a_tight_tolerance():
    path = Path(lambda a: a**3 - 2 * a, lambda a: 3 * a**2 - 2)
    result = adaptive(path.score_at, path.integrate, max_passes=64, tolerance=1e-6)
    assert abs(result.contribution + 1.0) <= result.error_bound <= 1e-6
    # the nodes and weights it reports are the rule it used: reapplied, they give the same number
    assert np.sum(result.weights * path.df(result.nodes)) == pytest.approx(result.contribution, abs=1e-12)
    assert np.all(np.diff(result.nodes) > 0) and 0 <= result.nodes.min() and result.nodes.max() <= 1


def test_a_path_smooth_near_zero_gets_no_panels_at_the_decades():
    # as from a blurred baseline: F crosses the decades below 0.1 in a straight line, so they are no panels' edges
    # (with them, 7 panels of 4 nodes: 28 passes to reach the tolerance, against 16)
    path = Path(lambda a: a + np.sin(6 * a), lambda a: 1 + 6 * np.cos(6 * a))
    result = adaptive(path.score_at, path.integrate, max_passes=16, tolerance=1e-3)
    assert result.error_bound <= 1e-3 and result.gradient_passes == path.gradient_calls <= 16
    assert abs(result.contribution - (1 + np.sin(6))) <= 1e-3 * abs(1 + np.sin(6))


def test_a_flat_path_stops_at_once():
    path = Path(lambda a: np.full_like(a, 2.0), lambda a: np.zeros_like(a))
    result = adaptive(path.score_at, path.integrate, max_passes=64, tolerance=0.01)
    assert result.panels == 1 and result.gradient_passes <= 4


def test_a_small_budget_is_respected():
    path = sliver(1e-6)
    for budget in (1, 3, 8):
        result = adaptive(path.score_at, path.integrate, max_passes=budget, tolerance=1e-9)
        assert path.gradient_calls == result.gradient_passes <= budget
        path.gradient_calls = 0


def test_splitting_reduces_the_error_bound():
    path = Path(lambda a: np.sqrt(a), lambda a: 0.5 / np.sqrt(a))  # an integrable singularity at 0
    bounds = [adaptive(path.score_at, path.integrate, max_passes=n, tolerance=1e-9).error_bound for n in (8, 32, 128)]
    assert bounds[0] > bounds[1] > bounds[2]
    assert bounds[2] < 1e-3


def test_fixed_rules_sum_to_one_and_stay_in_the_interval():
    for rule in ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"):
        nodes, weights = fixed_rule(rule, 9)
        assert weights.sum() == pytest.approx(1.0, abs=1e-14)
        assert nodes.min() >= 0 and nodes.max() <= 1
    assert MAX_NODES == 4096


class SimpsonPath(Path):
    """The same path as ``adaptive_simpson`` reads it: per node its "gradient", its estimate of ``F'`` and ``F``."""

    def gradients(self, nodes: np.ndarray):
        self.gradient_calls += len(nodes)
        values = self.df(np.asarray(nodes, dtype=np.float64))
        return list(values), values[:, None], self.score_at(nodes)


def swings(alphas: np.ndarray) -> np.ndarray:
    """A score that swings in three decades near 0, as from a zero baseline into an nnU-Net (docs/engine.md)."""
    widths, heights = np.array([1e-6, 1e-4, 1e-2]), np.array([1.0, -0.6, 0.3])
    return (heights * np.tanh(np.asarray(alphas, dtype=np.float64)[:, None] / widths)).sum(1)


def swings_slope(alphas: np.ndarray) -> np.ndarray:
    widths, heights = np.array([1e-6, 1e-4, 1e-2]), np.array([1.0, -0.6, 0.3])
    return (heights / widths / np.cosh(np.asarray(alphas, dtype=np.float64)[:, None] / widths) ** 2).sum(1)


@pytest.mark.parametrize("width", [1e-7, 1e-5, 1e-3, 0.3])
def test_simpson_panels_converge_on_a_sliver_anywhere(width):
    path = SimpsonPath(sliver(width).f, sliver(width).df)
    exact = np.tanh(1 / width)
    result = adaptive_simpson(path.score_at, path.gradients, max_passes=64, tolerance=0.01)
    error = abs(result.contribution - exact) / exact
    assert error < 0.01 and result.error_bound >= error - 1e-12, (width, error)
    assert result.gradient_passes == path.gradient_calls <= 64
    assert result.forward_passes == len(SCAN)  # F at a split point comes with its gradient's pass
    assert np.sum(result.weights * path.df(result.nodes)) == pytest.approx(result.contribution, rel=1e-12)


def test_every_simpson_pass_is_a_node_of_the_rule():
    # a split keeps its panel's nodes (Simpson's halves share them): no gradient pass is thrown away, where a split
    # of the Gauss-Legendre rule drops its panel's nodes
    path, old = SimpsonPath(swings, swings_slope), Path(swings, swings_slope)
    result = adaptive_simpson(path.score_at, path.gradients, max_passes=64, tolerance=1e-6)
    assert result.gradient_passes == path.gradient_calls == len(result.nodes) > 32
    assert result.panels == (len(result.nodes) - 1) // 2
    gauss = adaptive(old.score_at, old.integrate, max_passes=64, tolerance=1e-6)
    assert gauss.gradient_passes > len(gauss.nodes)


def test_simpson_keeps_its_gradients_within_max_stored():
    # each node's gradient is an array here, whose live copies are counted at every gradient pass
    import weakref

    live: list[weakref.ref] = []
    most = [0]

    def gradients(nodes):
        most[0] = max(most[0], sum(ref() is not None for ref in live))
        values = [np.array([value]) for value in swings_slope(nodes)]
        live.extend(weakref.ref(value) for value in values)
        return values, np.array([value.copy() for value in values]), swings(nodes)[:, None]

    def score_at(alphas):
        return swings(alphas)[:, None]

    exact = float(swings(np.array([1.0]))[0] - swings(np.array([0.0]))[0])
    free = adaptive_simpson(score_at, gradients, max_passes=64, tolerance=1e-4)
    assert most[0] > 11
    live.clear()
    most[0] = 0
    bounded = adaptive_simpson(score_at, gradients, max_passes=64, tolerance=1e-4, max_stored=9)
    assert most[0] <= 9 + 8  # a round of splits adds up to 8 before panels are closed
    for result in (free, bounded):  # the closed panels' shares are in the result, and the rule reported is the one used
        assert float(np.sum(result.weights * swings_slope(result.nodes))) == pytest.approx(
            float(result.contribution[0]), rel=1e-12)
        assert abs(float(result.contribution[0]) - exact) <= result.error_bound * abs(exact) + 1e-12


def test_simpson_panels_need_more_passes_on_a_smooth_path():
    # the trade: exact for cubics only, where 4 Gauss-Legendre nodes are for degree 7 (docs/engine.md)
    f, df = (lambda a: a + np.sin(6 * a)), (lambda a: 1 + 6 * np.cos(6 * a))
    simpson, gauss = SimpsonPath(f, df), Path(f, df)
    fast = adaptive(gauss.score_at, gauss.integrate, max_passes=64, tolerance=1e-3)
    slow = adaptive_simpson(simpson.score_at, simpson.gradients, max_passes=64, tolerance=1e-3)
    assert fast.error_bound <= 1e-3 and slow.error_bound <= 1e-3
    assert fast.gradient_passes < slow.gradient_passes
