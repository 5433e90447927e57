"""Integrated Gradients, on a fixed rule or the adaptive quadrature."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ...errors import SegExplainError
from ..baselines import Baseline, BlurredBaseline
from ..batching import default_memory_budget
from ..checks import check_choice, is_int
from ..kernels import onednn_convolutions
from ..method import AttributionMethod, AttributionOutput
from ..quadrature import ADAPTIVE_RULES, MAX_NODES, QUADRATURES, AdaptiveResult, adaptive, adaptive_simpson, fixed_rule
from .passes import (
    accumulate,
    check_inputs,
    check_output,
    check_seed,
    chunks,
    coerce_baseline,
    forward_no_grad,
    input_gradient,
    resolve_batch,
    seed_scores,
    set_batching,
)


class IntegratedGradients(AttributionMethod):
    """Integrated Gradients (Sundararajan et al. 2017) along the straight path from a baseline to the input.

    ``maps = (x - x0) * sum_i w_i * grad(x0 + alpha_i (x - x0))``. ``delta = sum(maps) - (score(x) - score(x0))``
    measures the quadrature error (completeness); ``expected`` is ``score(x) - score(x0)``.

    The default quadrature, ``"adaptive"``, puts its nodes where the score changes along the path and stops once
    completeness is within ``tolerance`` (:mod:`SegExplainLib.engine.quadrature`). That matters on networks with instance
    norm after the first convolution, where from a constant baseline the whole change happens in a sliver near
    ``alpha = 0`` that fixed rules miss. The default baseline is the input blurred by a Gaussian of 5 voxels: a
    constant baseline (zeros, the minimum) looks to such a network like an image without any contrast, so the
    path from it first passes through inputs the network never saw; see docs/engine.md.

    Args:
        n_steps: Fixed rules: the number of nodes (>= 1; >= 2 for ``riemann_trapezoid``). The adaptive rules: the
            most gradient passes per input they may spend.
        quadrature: ``"adaptive"`` (panels of 4 Gauss-Legendre nodes), ``"adaptive_simpson"`` (Simpson's panels,
            whose splits reuse their passes: fewer passes where the score swings, as for a click on a trained
            nnU-Net; more on a smooth path), ``"gausslegendre"``, ``"riemann_trapezoid"``, ``"riemann_left"``,
            ``"riemann_right"`` or ``"riemann_middle"``.
        tolerance: The adaptive rules only: the relative completeness they aim for.
        baseline: A :class:`~SegExplainLib.engine.baselines.Baseline` or a spec for
            :func:`~SegExplainLib.engine.baselines.make_baseline` (default ``"blur:5"``).
        internal_batch_size: Interpolated inputs per forward/backward pass; ``None`` chooses from the memory budget.
        memory_budget_bytes: Budget for that choice; ``None`` uses the device default (see ``_batching``).

    Example:
        >>> ig = IntegratedGradients(baseline="blur:5")               # adaptive, at most 64 gradient passes
        >>> ig = IntegratedGradients(quadrature="gausslegendre", n_steps=32, baseline="zero")  # captum's default
    """

    name = "integrated_gradients"
    seed_local = True
    linear_in_seed = True
    #: Above this relative completeness delta the explanation carries a warning.
    WARN_DELTA = 0.05

    def __init__(
        self,
        *,
        n_steps: int = 64,
        quadrature: str = "adaptive",
        tolerance: float = 0.01,
        baseline: Baseline | str | float | None = None,
        internal_batch_size: int | None = None,
        memory_budget_bytes: int | None = None,
    ) -> None:
        check_choice(quadrature, "quadrature", QUADRATURES)
        minimum = 2 if quadrature == "riemann_trapezoid" else 1
        if not is_int(n_steps) or not minimum <= n_steps <= MAX_NODES:
            raise SegExplainError(f"n_steps must be an integer from {minimum} to {MAX_NODES} for quadrature "
                                  f"{quadrature!r}, got {n_steps!r}")
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
            raise SegExplainError(f"tolerance must be a number between 0 and 1 (a share of the score change), "
                                  f"got {tolerance!r}")
        set_batching(self, internal_batch_size, memory_budget_bytes)
        self.n_steps = int(n_steps)
        self.quadrature = quadrature
        self.tolerance = float(tolerance)
        self.baseline = BlurredBaseline(5.0) if baseline is None else coerce_baseline(baseline)
        self._nodes: tuple[np.ndarray, np.ndarray] | None = None  # fixed by for_target

    def attribute(self, model: torch.nn.Module, inputs: torch.Tensor, seed: torch.Tensor) -> AttributionOutput:
        adaptive = self.quadrature in ADAPTIVE_RULES and self._nodes is None
        if adaptive and isinstance(seed, torch.Tensor) and seed.requires_grad:
            # the graph is built over nodes chosen without it
            return self.for_target(model, inputs, seed.detach()).attribute(model, inputs, seed)
        path = _Path(self, model, inputs, seed)
        if adaptive:
            plan = path.adaptive()
            return path.output(plan.contribution, {**path.extras, **_plan_extras(plan)})
        nodes, weights = self._nodes or fixed_rule(self.quadrature, self.n_steps)
        acc, _ = path.integrate(nodes, weights)
        return path.output(acc, {**path.extras, "gradient_passes": len(nodes)})

    def for_target(self, model: torch.nn.Module, inputs: torch.Tensor, seed: torch.Tensor) -> IntegratedGradients:
        """For an adaptive rule: this method with the nodes the rule chooses for ``seed`` at ``inputs``."""
        if self.quadrature not in ADAPTIVE_RULES or self._nodes is not None:
            return self
        plan = _Path(self, model, inputs, seed.detach()).adaptive()
        fixed = copy.copy(self)
        fixed._nodes = (plan.nodes, plan.weights)
        return fixed

    def sum_rule_warnings(self, delta: float | None, expected: float | None) -> list[str]:
        if delta is None or not expected or abs(delta) <= self.WARN_DELTA * abs(expected):
            return []
        relative = abs(delta) / abs(expected)
        return [f"Integrated Gradients misses completeness by {100 * relative:.0f} % (maps sum to "
                f"{expected + delta:.4g}, the score changes by {expected:.4g} from the baseline): the quadrature "
                f"missed where the score changes; {self._advice(relative)}"]

    def passes_needed(self, relative_delta: float) -> int:
        """Gradient passes estimated to bring ``relative_delta`` (reached with ``n_steps``) within ``tolerance``.

        The adaptive rule's delta falls at least as fast as ``1 / passes`` on nnU-Net-style networks (measured:
        docs/engine.md), so ``n_steps * relative_delta / tolerance``, rounded up to a power of two and at least
        ``4 * n_steps`` (the delta does not fall monotonically with the budget). It may exceed :data:`MAX_NODES`.
        """
        estimate = self.n_steps * relative_delta / self.tolerance
        return max(4 * self.n_steps, 2 ** int(np.ceil(np.log2(max(estimate, 1.0)))))

    def _advice(self, relative_delta: float) -> str:
        """What to change, from what was used: only options that differ from this call's and can still help."""
        steps = min(4 * self.n_steps, MAX_NODES)
        if self.quadrature not in ADAPTIVE_RULES:
            tips = [f"quadrature='adaptive', which puts its nodes where the score changes (with n_steps={steps} "
                    "gradient passes at most)"]
        elif self.tolerance > self.WARN_DELTA:
            tips = [f"a tolerance below {self.WARN_DELTA:g} (it was {self.tolerance:g}, so the adaptive rule stopped "
                    "early)"]
        elif self.n_steps < MAX_NODES:
            needed = self.passes_needed(relative_delta)
            spent = (f"the adaptive rule spent all {self.n_steps} gradient passes before reaching its tolerance; "
                     f"about {needed} are estimated to reach it")
            tips = [f"a larger budget, n_steps={needed} ({spent})" if needed <= MAX_NODES else
                    f"the largest budget, n_steps={MAX_NODES}, which may still miss ({spent})"]
            if self.quadrature == "adaptive":  # measured to converge with fewer passes where the score swings
                tips.insert(0, f"quadrature='adaptive_simpson' with the same n_steps={self.n_steps}, whose "
                               "splits reuse their gradient passes")
        else:
            tips = []
        if not isinstance(self.baseline, BlurredBaseline):
            tips.append("a baseline that is not constant, such as 'blur:5' (see docs/engine.md on baselines for "
                        "instance-normalized networks)")
        if not tips:
            return "no option of this method can do better here; the map sums to the value above, not to the score"
        return "use " + ", or ".join(tips)

    def options(self) -> dict[str, Any]:
        return {
            "n_steps": self.n_steps,
            "quadrature": self.quadrature,
            "tolerance": self.tolerance,
            "baseline": self.baseline.to_dict(),
            "internal_batch_size": self.internal_batch_size,
            "memory_budget_bytes": self.memory_budget_bytes,
        }


def _plan_extras(plan: AdaptiveResult) -> dict[str, Any]:
    return {"gradient_passes": plan.gradient_passes, "forward_passes": plan.forward_passes,
            "panels": plan.panels, "error_bound": plan.error_bound}


class _Path:
    """The straight path from the baseline to the inputs of one IG call, and the passes along it."""

    def __init__(self, method: IntegratedGradients, model: torch.nn.Module, inputs: torch.Tensor,
                 seed: torch.Tensor) -> None:
        self.method, self.model = method, model
        self.x = check_inputs(inputs)
        self.seed = check_seed(seed, self.x)
        self.create_graph = self.seed.requires_grad
        self.x0 = method.baseline(self.x).to(dtype=self.x.dtype, device=self.x.device)
        if self.x0.shape != self.x.shape:
            raise SegExplainError(f"baseline shape {tuple(self.x0.shape)} does not match the inputs shape "
                                  f"{tuple(self.x.shape)}")
        self.diff = self.x - self.x0
        self.batch = self.x.shape[0]
        self.k = resolve_batch(method, model, self.x, self.batch * method.n_steps)
        self.extras = {"internal_batch_size": self.k}

    def scores(self, alphas: np.ndarray) -> np.ndarray:
        """``F(alpha)`` per node and batch element, ``(nodes, batch)``, from forward passes."""
        a = torch.as_tensor(alphas, dtype=self.x.dtype, device=self.x.device)
        scores = []
        for rows in chunks(len(alphas) * self.batch, max(self.k, 2)):
            idx = torch.arange(rows.start, rows.stop, device=self.x.device)
            a_idx, b_idx = idx // self.batch, idx % self.batch
            with torch.no_grad(), onednn_convolutions():
                out = self.model(self.x0[b_idx] + a[a_idx].view(-1, 1, 1, 1, 1) * self.diff[b_idx])
            check_output(out, self.seed, self.batch)
            scores.append(seed_scores(self.seed[b_idx].detach(), out))
        return torch.cat(scores).view(len(alphas), self.batch).double().cpu().numpy()

    def _interpolated(self, nodes: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The points ``x0 + alpha diff`` for every node and batch element, in batches of the internal batch size:
        yields each batch's batch-element and node indices and its points."""
        n = len(nodes)
        alphas = torch.as_tensor(nodes, dtype=self.x.dtype, device=self.x.device)
        for rows in chunks(self.batch * n, self.k):
            idx = torch.arange(rows.start, rows.stop, device=self.x.device)
            b_idx, s_idx = idx // n, idx % n
            yield b_idx, s_idx, self.x0[b_idx] + alphas[s_idx].view(-1, 1, 1, 1, 1) * self.diff[b_idx]

    def integrate(self, nodes: np.ndarray, weights: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """``sum_i w_i grad(x0 + alpha_i diff)`` per batch element, and its estimate of the change of ``F``."""
        w = torch.as_tensor(weights, dtype=self.x.dtype, device=self.x.device)
        acc = torch.zeros_like(self.x)
        for b_idx, s_idx, xi in self._interpolated(nodes):
            grad = input_gradient(self.model, xi, self.seed, b_idx, self.batch, self.create_graph)
            acc = accumulate(acc, b_idx, grad * w[s_idx].view(-1, 1, 1, 1, 1), self.create_graph)
        estimate = (self.diff * acc).detach().flatten(1).sum(1).double().cpu().numpy()
        return acc, estimate

    def gradients(self, nodes: np.ndarray) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray]:
        """The gradient at each node (shaped like the inputs), its estimate of ``F'`` there and ``F`` there (from
        the same pass), each ``(nodes, batch)``; the nodes' passes batched as :meth:`integrate` batches them."""
        per_node = [torch.empty_like(self.x) for _ in nodes]
        scores = np.zeros((len(nodes), self.batch))
        for b_idx, s_idx, xi in self._interpolated(nodes):
            grad, row_scores = input_gradient(self.model, xi, self.seed, b_idx, self.batch, False, with_scores=True)
            for row, (b, s) in enumerate(zip(b_idx.tolist(), s_idx.tolist())):
                per_node[s][b] = grad[row]
                scores[s, b] = float(row_scores[row])
        slopes = [(self.diff * g).flatten(1).sum(1).double().cpu().numpy() for g in per_node]
        return per_node, np.stack(slopes), scores

    def adaptive(self) -> AdaptiveResult:
        if self.method.quadrature == "adaptive":
            return adaptive(self.scores, self.integrate, max_passes=self.method.n_steps,
                            tolerance=self.method.tolerance)
        # adaptive_simpson keeps one gradient per node of its open panels: at most half the memory budget, at least 8
        budget = self.method.memory_budget_bytes or default_memory_budget(self.x.device)
        per_node = self.x.numel() * self.x.element_size()
        return adaptive_simpson(self.scores, self.gradients, max_passes=self.method.n_steps,
                                tolerance=self.method.tolerance, max_stored=max(8, budget // (2 * per_node)))

    def output(self, acc: torch.Tensor, extras: dict[str, Any]) -> AttributionOutput:
        # scores at both ends of the path (forward only), which also checks the seed against the output shape
        ends = forward_no_grad(self.model, torch.cat([self.x, self.x0], dim=0), max(self.k, 2))
        check_output(ends, self.seed, self.batch)
        expected = seed_scores(self.seed, ends[:self.batch]) - seed_scores(self.seed, ends[self.batch:])
        if not self.create_graph:
            expected = expected.detach()
        maps = self.diff * acc
        delta = maps.flatten(1).sum(1) - expected
        return AttributionOutput(maps=maps, delta=delta, expected=expected, extras=extras)
