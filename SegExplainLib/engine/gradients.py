"""Gradient-family attribution methods: saliency, Gradient x Input, Integrated Gradients, SmoothGrad, Occlusion and
Grad-CAM.

Every method explains, for each batch element ``b``, the scalar score ``sum(seed[b] * model(inputs)[b])`` (see
:mod:`SegExplainLib.engine.method`). Gradients are taken w.r.t. the input only (``torch.autograd.grad(score, inputs)``);
parameter gradients are never computed. When ``seed.requires_grad`` is true, the backward passes are built with
``create_graph=True`` so that the returned maps can be differentiated w.r.t. the seed (used by the exact normalized
aggregation); otherwise the maps are detached.

The multi-pass methods (:class:`IntegratedGradients`, :class:`SmoothGrad`, :class:`Occlusion`) stack their perturbed
inputs along the batch dimension, ``internal_batch_size`` at a time (chosen from a memory budget when ``None``, see
:mod:`SegExplainLib.engine.batching`); batch elements of ``inputs`` are flattened into the same stream, so ``B > 1`` is
supported at no extra cost.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .batching import check_batch_option, choose_internal_batch_size, max_batch_for
from .checks import check_choice, is_int
from .method import AttributionMethod, AttributionOutput
from .baselines import Baseline, BlurredBaseline, make_baseline
from .deployment import check_walkable
from ..errors import SegExplainError
from .kernels import onednn_convolutions
from .quadrature import MAX_NODES, QUADRATURES, AdaptiveResult, adaptive, fixed_rule

__all__ = [
    "Gradient",
    "GradientXInput",
    "IntegratedGradients",
    "SmoothGrad",
    "Occlusion",
    "GradCAM",
]



# ----------------------------------------------------------------------------------------------------------------
# Shared checks and helpers
# ----------------------------------------------------------------------------------------------------------------


def _check_inputs(inputs: Any) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor):
        raise SegExplainError(f"inputs must be a torch.Tensor (B, C, D, H, W), got {type(inputs).__name__}")
    if inputs.dim() != 5:
        raise SegExplainError(f"inputs must have shape (B, C, D, H, W), got shape {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise SegExplainError(f"inputs must be a floating point tensor, got dtype {inputs.dtype}")
    if inputs.numel() == 0:
        raise SegExplainError(f"inputs must not be empty, got shape {tuple(inputs.shape)}")
    return inputs.detach()


def _check_seed(seed: Any, inputs: torch.Tensor) -> torch.Tensor:
    if not isinstance(seed, torch.Tensor):
        raise SegExplainError(f"seed must be a torch.Tensor shaped like the model output, got {type(seed).__name__}")
    if seed.device != inputs.device:
        raise SegExplainError(f"seed is on device {seed.device}, expected the inputs' device {inputs.device}")
    if not seed.is_floating_point():
        seed = seed.to(inputs.dtype)
    return seed


def _check_output(out: Any, seed: torch.Tensor, batch: int) -> torch.Tensor:
    """Check a (chunk of) model output against the seed; ``batch`` is the batch size of the full inputs."""
    if not isinstance(out, torch.Tensor):
        raise SegExplainError(f"model output must be a tensor (B, K, D, H, W), got {type(out).__name__}")
    expected = (batch,) + tuple(out.shape[1:])
    if tuple(seed.shape) != expected:
        raise SegExplainError(
            f"seed shape {tuple(seed.shape)} does not match the model output shape {expected}"
        )
    return out


def _scores(seed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per-row score ``sum(seed * out)`` over all but the batch dimension."""
    return (seed * out).flatten(1).sum(1)


def _chunks(total: int, size: int) -> Iterator[range]:
    """Split ``range(total)`` into ``ceil(total / size)`` consecutive chunks of nearly equal length (<= ``size``).

    Balanced rather than ``size, size, ..., rest``: a small last chunk (batch 1 in the worst case) would run the
    slow batch-1 CPU convolution kernels.
    """
    n_chunks = -(-total // size)
    base, extra = divmod(total, n_chunks) if n_chunks else (0, 0)
    start = 0
    for i in range(n_chunks):
        stop = start + base + (1 if i < extra else 0)
        yield range(start, stop)
        start = stop


def _forward_no_grad(model: torch.nn.Module, batch: torch.Tensor, size: int) -> torch.Tensor:
    with torch.no_grad(), onednn_convolutions():
        outs = [model(batch[r.start : r.stop]) for r in _chunks(batch.shape[0], size)]
    if not all(isinstance(o, torch.Tensor) for o in outs):
        bad = next(o for o in outs if not isinstance(o, torch.Tensor))
        raise SegExplainError(f"model output must be a tensor (B, K, D, H, W), got {type(bad).__name__}")
    return torch.cat(outs, dim=0)


def _input_gradient(
    model: torch.nn.Module,
    x: torch.Tensor,
    seed: torch.Tensor,
    b_idx: torch.Tensor | None,
    batch: int,
    create_graph: bool,
) -> torch.Tensor:
    """d/dx of sum(seed[b_idx] * model(x)) for a batch of rows ``x`` (``b_idx``: the batch element of each row,
    ``None`` when ``x`` is the whole input batch); checks the full ``seed`` against the output shape."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), onednn_convolutions():
        out = _check_output(model(x), seed, batch)
        rows = seed if b_idx is None else seed[b_idx]
        score = (rows * out).sum()
        (grad,) = torch.autograd.grad(score, x, create_graph=create_graph)
    return grad if create_graph else grad.detach()


def _set_batching(method: Any, internal_batch_size: Any, memory_budget_bytes: Any) -> None:
    """Validate and store the batching options shared by the multi-pass methods."""
    check_batch_option("internal_batch_size", internal_batch_size)
    check_batch_option("memory_budget_bytes", memory_budget_bytes)
    method.internal_batch_size = internal_batch_size
    method.memory_budget_bytes = memory_budget_bytes
    method.last_internal_batch_size = None
    method._probed = None  # (model, sample shape, dtype, device) and the batch the memory probe chose for them


def _resolve_batch(
    method: Any, model: torch.nn.Module, inputs: torch.Tensor, total: int
) -> int:
    """Internal batch size for ``total`` passes: the option, or the memory-budget choice; never above ``total``.

    The choice runs a forward and backward pass of one sample; it is made once per model and sample shape and
    reused by the later calls of the same method (the passes of a normalized aggregation, the voxel batches).
    """
    k = method.internal_batch_size
    if k is None:
        if total <= 1:
            k = 1
        else:
            key = (weakref.ref(model), tuple(inputs.shape[1:]), inputs.dtype, inputs.device)
            if method._probed is None or method._probed[0] != key:
                budget = method.memory_budget_bytes
                method._probed = (key, choose_internal_batch_size(
                    model, inputs[:1], memory_budget_bytes=budget, max_batch=max_batch_for(budget, inputs.device)))
            k = method._probed[1]
    k = max(1, min(int(k), total))
    method.last_internal_batch_size = k
    return k


def _coerce_baseline(value: Any, option: str = "baseline") -> Baseline:
    try:
        return make_baseline(value)
    except SegExplainError as exc:
        raise SegExplainError(f"{option}: {exc}") from None


def _accumulate(acc: torch.Tensor, index: torch.Tensor, values: torch.Tensor, create_graph: bool) -> torch.Tensor:
    if create_graph:
        return acc.index_add(0, index, values)
    return acc.index_add_(0, index, values.detach())


# ----------------------------------------------------------------------------------------------------------------
# Saliency and Gradient x Input
# ----------------------------------------------------------------------------------------------------------------


class Gradient(AttributionMethod):
    """Saliency: ``maps = d score / d inputs``, signed.

    Taking the absolute value (as in the original saliency maps) is a display choice left to the caller; the signed
    map keeps the direction in which each voxel moves the score. One forward and one backward pass.
    """

    name = "gradient"
    seed_local = True
    linear_in_seed = True
    multiply_by_inputs = False

    def attribute(self, model: torch.nn.Module, inputs: torch.Tensor, seed: torch.Tensor) -> AttributionOutput:
        x = _check_inputs(inputs)
        seed = _check_seed(seed, x)
        grad = _input_gradient(model, x, seed, None, x.shape[0], seed.requires_grad)
        return AttributionOutput(maps=x * grad if self.multiply_by_inputs else grad)

    def options(self) -> dict[str, Any]:
        return {}


class GradientXInput(Gradient):
    """Gradient x Input: ``maps = inputs * d score / d inputs``.

    For a bias-free piecewise linear network this sums to the score, but there is no such rule in general, so
    ``delta`` is ``None``.
    """

    name = "gradient_x_input"
    multiply_by_inputs = True


# ----------------------------------------------------------------------------------------------------------------
# Integrated Gradients
# ----------------------------------------------------------------------------------------------------------------


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
        n_steps: Fixed rules: the number of nodes (>= 1; >= 2 for ``riemann_trapezoid``). ``"adaptive"``: the most
            gradient passes per input it may spend.
        quadrature: ``"adaptive"``, ``"gausslegendre"``, ``"riemann_trapezoid"``, ``"riemann_left"``,
            ``"riemann_right"`` or ``"riemann_middle"``.
        tolerance: ``"adaptive"`` only: the relative completeness it aims for.
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
        _set_batching(self, internal_batch_size, memory_budget_bytes)
        self.n_steps = int(n_steps)
        self.quadrature = quadrature
        self.tolerance = float(tolerance)
        self.baseline = BlurredBaseline(5.0) if baseline is None else _coerce_baseline(baseline)
        self._nodes: tuple[np.ndarray, np.ndarray] | None = None  # fixed by for_target

    def attribute(self, model: torch.nn.Module, inputs: torch.Tensor, seed: torch.Tensor) -> AttributionOutput:
        adaptive = self.quadrature == "adaptive" and self._nodes is None
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
        """For ``"adaptive"``: this method with the nodes the adaptive scheme chooses for ``seed`` at ``inputs``."""
        if self.quadrature != "adaptive" or self._nodes is not None:
            return self
        plan = _Path(self, model, inputs, seed.detach()).adaptive()
        fixed = copy.copy(self)
        fixed._nodes = (plan.nodes, plan.weights)
        return fixed

    def sum_rule_warnings(self, delta: float | None, expected: float | None) -> list[str]:
        if delta is None or not expected or abs(delta) <= self.WARN_DELTA * abs(expected):
            return []
        return [f"Integrated Gradients misses completeness by {100 * abs(delta) / abs(expected):.0f} % (maps sum to "
                f"{expected + delta:.4g}, the score changes by {expected:.4g} from the baseline): the quadrature "
                f"missed where the score changes; {self._advice()}"]

    def _advice(self) -> str:
        """What to change, from what was used: only options that differ from this call's and can still help."""
        steps = min(4 * self.n_steps, MAX_NODES)
        if self.quadrature != "adaptive":
            tips = [f"quadrature='adaptive', which puts its nodes where the score changes (with n_steps={steps} "
                    "gradient passes at most)"]
        elif self.tolerance > self.WARN_DELTA:
            tips = [f"a tolerance below {self.WARN_DELTA:g} (it was {self.tolerance:g}, so the adaptive rule stopped "
                    "early)"]
        elif self.n_steps < MAX_NODES:
            tips = [f"a larger budget, n_steps={steps} (the adaptive rule spent all {self.n_steps} gradient passes "
                    "before reaching its tolerance)"]
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
        self.x = _check_inputs(inputs)
        self.seed = _check_seed(seed, self.x)
        self.create_graph = self.seed.requires_grad
        self.x0 = method.baseline(self.x).to(dtype=self.x.dtype, device=self.x.device)
        if self.x0.shape != self.x.shape:
            raise SegExplainError(f"baseline shape {tuple(self.x0.shape)} does not match the inputs shape "
                                  f"{tuple(self.x.shape)}")
        self.diff = self.x - self.x0
        self.batch = self.x.shape[0]
        self.k = _resolve_batch(method, model, self.x, self.batch * method.n_steps)
        self.extras = {"internal_batch_size": self.k}

    def scores(self, alphas: np.ndarray) -> np.ndarray:
        """``F(alpha)`` per node and batch element, ``(nodes, batch)``, from forward passes."""
        a = torch.as_tensor(alphas, dtype=self.x.dtype, device=self.x.device)
        scores = []
        for rows in _chunks(len(alphas) * self.batch, max(self.k, 2)):
            idx = torch.arange(rows.start, rows.stop, device=self.x.device)
            a_idx, b_idx = idx // self.batch, idx % self.batch
            with torch.no_grad(), onednn_convolutions():
                out = self.model(self.x0[b_idx] + a[a_idx].view(-1, 1, 1, 1, 1) * self.diff[b_idx])
            _check_output(out, self.seed, self.batch)
            scores.append(_scores(self.seed[b_idx].detach(), out))
        return torch.cat(scores).view(len(alphas), self.batch).double().cpu().numpy()

    def integrate(self, nodes: np.ndarray, weights: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """``sum_i w_i grad(x0 + alpha_i diff)`` per batch element, and its estimate of the change of ``F``."""
        n = len(nodes)
        alphas = torch.as_tensor(nodes, dtype=self.x.dtype, device=self.x.device)
        w = torch.as_tensor(weights, dtype=self.x.dtype, device=self.x.device)
        acc = torch.zeros_like(self.x)
        shape = (-1, 1, 1, 1, 1)
        for rows in _chunks(self.batch * n, self.k):
            idx = torch.arange(rows.start, rows.stop, device=self.x.device)
            b_idx, s_idx = idx // n, idx % n
            xi = self.x0[b_idx] + alphas[s_idx].view(shape) * self.diff[b_idx]
            grad = _input_gradient(self.model, xi, self.seed, b_idx, self.batch, self.create_graph)
            acc = _accumulate(acc, b_idx, grad * w[s_idx].view(shape), self.create_graph)
        estimate = (self.diff * acc).detach().flatten(1).sum(1).double().cpu().numpy()
        return acc, estimate

    def adaptive(self) -> AdaptiveResult:
        return adaptive(self.scores, self.integrate, max_passes=self.method.n_steps,
                        tolerance=self.method.tolerance)

    def output(self, acc: torch.Tensor, extras: dict[str, Any]) -> AttributionOutput:
        # scores at both ends of the path (forward only), which also checks the seed against the output shape
        ends = _forward_no_grad(self.model, torch.cat([self.x, self.x0], dim=0), max(self.k, 2))
        _check_output(ends, self.seed, self.batch)
        expected = _scores(self.seed, ends[:self.batch]) - _scores(self.seed, ends[self.batch:])
        if not self.create_graph:
            expected = expected.detach()
        maps = self.diff * acc
        delta = maps.flatten(1).sum(1) - expected
        return AttributionOutput(maps=maps, delta=delta, expected=expected, extras=extras)


# ----------------------------------------------------------------------------------------------------------------
# SmoothGrad
# ----------------------------------------------------------------------------------------------------------------


class SmoothGrad(AttributionMethod):
    """SmoothGrad (Smilkov et al. 2017): the gradient averaged over noisy copies of the input.

    The noise is Gaussian with standard deviation ``noise_level * (max - min)`` of each channel of each sample, i.e.
    a fraction of that MRI sequence's intensity range (a constant channel gets no noise). The noise is drawn from a
    ``torch.Generator`` seeded with ``seed``, one sample at a time, so results are reproducible and do not depend on
    ``internal_batch_size``. With ``multiply_by_inputs`` the averaged gradient is multiplied by the (noise-free)
    input, giving a smoothed Gradient x Input.

    Args:
        n_samples: Number of noisy copies per input (>= 1).
        noise_level: Noise standard deviation as a fraction of each channel's intensity range (>= 0).
        seed: Seed of the noise generator.
        multiply_by_inputs: Return ``inputs * mean gradient`` instead of the mean gradient.
        internal_batch_size, memory_budget_bytes: As for :class:`IntegratedGradients`.
    """

    name = "smoothgrad"
    seed_local = True
    linear_in_seed = True

    def __init__(
        self,
        *,
        n_samples: int = 16,
        noise_level: float = 0.1,
        seed: int = 0,
        multiply_by_inputs: bool = False,
        internal_batch_size: int | None = None,
        memory_budget_bytes: int | None = None,
    ) -> None:
        if not is_int(n_samples) or n_samples < 1:
            raise SegExplainError(f"n_samples must be an integer >= 1, got {n_samples!r}")
        if (
            isinstance(noise_level, bool)
            or not isinstance(noise_level, (int, float))
            or not math.isfinite(noise_level)
            or noise_level < 0
        ):
            raise SegExplainError(f"noise_level must be a finite number >= 0, got {noise_level!r}")
        if not is_int(seed):
            raise SegExplainError(f"seed must be an integer, got {seed!r}")
        if not isinstance(multiply_by_inputs, bool):
            raise SegExplainError(f"multiply_by_inputs must be a bool, got {multiply_by_inputs!r}")
        _set_batching(self, internal_batch_size, memory_budget_bytes)
        self.n_samples = int(n_samples)
        self.noise_level = float(noise_level)
        self.seed = int(seed)
        self.multiply_by_inputs = multiply_by_inputs

    def attribute(self, model: torch.nn.Module, inputs: torch.Tensor, seed: torch.Tensor) -> AttributionOutput:
        x = _check_inputs(inputs)
        seed = _check_seed(seed, x)
        create_graph = seed.requires_grad
        batch = x.shape[0]
        n = self.n_samples
        total = batch * n
        k = _resolve_batch(self, model, x, total)
        spatial = (2, 3, 4)
        std = self.noise_level * (x.amax(dim=spatial, keepdim=True) - x.amin(dim=spatial, keepdim=True))
        generator = torch.Generator(device=x.device)
        generator.manual_seed(self.seed)
        acc = torch.zeros_like(x)
        for rows in _chunks(total, k):
            idx = torch.arange(rows.start, rows.stop, device=x.device)
            b_idx = idx // n
            noise = torch.stack(
                [torch.randn(x.shape[1:], generator=generator, dtype=x.dtype, device=x.device) for _ in rows]
            )
            xi = x[b_idx] + std[b_idx] * noise
            grad = _input_gradient(model, xi, seed, b_idx, batch, create_graph)
            acc = _accumulate(acc, b_idx, grad, create_graph)
        maps = acc / n
        if self.multiply_by_inputs:
            maps = x * maps
        return AttributionOutput(maps=maps, extras={"internal_batch_size": k})

    def options(self) -> dict[str, Any]:
        return {
            "n_samples": self.n_samples,
            "noise_level": self.noise_level,
            "seed": self.seed,
            "multiply_by_inputs": self.multiply_by_inputs,
            "internal_batch_size": self.internal_batch_size,
            "memory_budget_bytes": self.memory_budget_bytes,
        }


# ----------------------------------------------------------------------------------------------------------------
# Occlusion
# ----------------------------------------------------------------------------------------------------------------


def _triple(value: Any, option: str) -> tuple[int, int, int]:
    if is_int(value):
        values = (int(value),) * 3
    elif isinstance(value, (tuple, list)) and len(value) == 3 and all(is_int(v) for v in value):
        values = tuple(int(v) for v in value)
    else:
        raise SegExplainError(f"{option} must be an integer or 3 integers (D, H, W), got {value!r}")
    if min(values) < 1:
        raise SegExplainError(f"{option} must be >= 1 along every axis, got {value!r}")
    return values  # type: ignore[return-value]


def _window_positions(size: int, window: int, stride: int) -> tuple[list[int], int]:
    """Start positions along one axis (captum's convention) and the window length clipped to the axis."""
    window = min(window, size)
    count = -(-(size - window) // stride) + 1  # ceil((size - window) / stride) + 1
    return [i * stride for i in range(count)], window


def _coverage(size: int, starts: Sequence[int], window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    matrix = torch.zeros(len(starts), size, dtype=dtype, device=device)
    for i, s in enumerate(starts):
        matrix[i, s : s + window] = 1
    return matrix


class Occlusion(AttributionMethod):
    """Occlusion (Zeiler & Fergus 2014) with a sliding 3D window; model-agnostic (forward passes only).

    For each window position (and each input channel when ``per_channel``), the window is replaced by the baseline
    and the score drop ``score(x) - score(x occluded)`` is recorded; a voxel's map value is the mean drop over the
    windows that cover it. Windows start at ``0, stride, 2*stride, ...`` until the last one reaches the end of the
    axis; that last one may be cut at the border (same convention as captum's ``Occlusion``). A window larger than
    an axis is clipped to it.

    With ``per_channel`` (default) each MRI sequence is occluded separately and the maps separate the sequences
    (``C`` times more passes). Otherwise all channels are occluded together and the same value is repeated over
    the channels.

    Forward passes run under ``torch.no_grad``. When ``seed.requires_grad`` the score differences are formed
    differentiably from the stored outputs (the score is linear in the seed), so the maps are differentiable
    w.r.t. the seed; this keeps every forward output alive until the backward pass.

    Args:
        window: Window size in voxels, an int or ``(D, H, W)``.
        stride: Step between windows, an int or ``(D, H, W)``, at most the window (default: the window).
        baseline: Occlusion value: a number, a Baseline or a baseline spec (default 0).
        per_channel: Occlude one input channel at a time.
        internal_batch_size, memory_budget_bytes: As for :class:`IntegratedGradients`.
    """

    name = "occlusion"
    seed_local = True
    linear_in_seed = True

    def __init__(
        self,
        *,
        window: int | Sequence[int] = 4,
        stride: int | Sequence[int] | None = None,
        baseline: Baseline | str | float = 0.0,
        per_channel: bool = True,
        internal_batch_size: int | None = None,
        memory_budget_bytes: int | None = None,
    ) -> None:
        self.window = _triple(window, "window")
        self.stride = self.window if stride is None else _triple(stride, "stride")
        if any(s > w for s, w in zip(self.stride, self.window)):
            raise SegExplainError(
                f"stride {self.stride} must not exceed window {self.window} along any axis (voxels would be skipped)"
            )
        if not isinstance(per_channel, bool):
            raise SegExplainError(f"per_channel must be a bool, got {per_channel!r}")
        _set_batching(self, internal_batch_size, memory_budget_bytes)
        self.baseline = _coerce_baseline(baseline)
        self.per_channel = per_channel

    def attribute(self, model: torch.nn.Module, inputs: torch.Tensor, seed: torch.Tensor) -> AttributionOutput:
        x = _check_inputs(inputs)
        seed = _check_seed(seed, x)
        batch, channels = x.shape[:2]
        x0 = self.baseline(x).to(dtype=x.dtype, device=x.device)
        if x0.shape != x.shape:
            raise SegExplainError(f"baseline shape {tuple(x0.shape)} does not match the inputs shape {tuple(x.shape)}")
        axes = [_window_positions(size, w, s) for size, w, s in zip(x.shape[2:], self.window, self.stride)]
        (pd, wd), (ph, wh), (pw, ww) = axes
        groups = channels if self.per_channel else 1
        per_sample = groups * len(pd) * len(ph) * len(pw)
        total = batch * per_sample
        k = _resolve_batch(self, model, x, total)

        ref = _forward_no_grad(model, x, max(k, 1))
        _check_output(ref, seed, batch)
        ref_scores = _scores(seed, ref)
        del ref

        diffs = []
        for rows in _chunks(total, k):
            b_list = []
            xs = torch.empty((len(rows),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
            for r, j in enumerate(rows):
                b, rem = divmod(j, per_sample)
                g, rem = divmod(rem, len(pd) * len(ph) * len(pw))
                i_d, rem = divmod(rem, len(ph) * len(pw))
                i_h, i_w = divmod(rem, len(pw))
                c = slice(g, g + 1) if self.per_channel else slice(None)
                region = (c, slice(pd[i_d], pd[i_d] + wd), slice(ph[i_h], ph[i_h] + wh), slice(pw[i_w], pw[i_w] + ww))
                xs[r] = x[b]
                xs[r][region] = x0[b][region]
                b_list.append(b)
            b_idx = torch.tensor(b_list, device=x.device)
            with torch.no_grad(), onednn_convolutions():
                out = model(xs)
            diffs.append(ref_scores[b_idx] - _scores(seed[b_idx], out))
        grid = torch.cat(diffs).reshape(batch, groups, len(pd), len(ph), len(pw))
        md, mh, mw = (
            _coverage(size, starts, w, x.dtype, x.device)
            for size, (starts, w) in zip(x.shape[2:], axes)
        )
        summed = torch.einsum("bgpqr,pd,qh,rw->bgdhw", grid, md, mh, mw)
        count = torch.einsum("d,h,w->dhw", md.sum(0), mh.sum(0), mw.sum(0))
        maps = summed / count.clamp(min=1)
        if not self.per_channel:
            maps = maps.expand(-1, channels, -1, -1, -1)
        maps = maps.contiguous()
        if not seed.requires_grad:
            maps = maps.detach()
        return AttributionOutput(maps=maps, extras={"internal_batch_size": k})

    def options(self) -> dict[str, Any]:
        return {
            "window": list(self.window),
            "stride": list(self.stride),
            "baseline": self.baseline.to_dict(),
            "per_channel": self.per_channel,
            "internal_batch_size": self.internal_batch_size,
            "memory_budget_bytes": self.memory_budget_bytes,
        }


# ----------------------------------------------------------------------------------------------------------------
# Grad-CAM
# ----------------------------------------------------------------------------------------------------------------


class GradCAM(AttributionMethod):
    """3D Grad-CAM (Selvaraju et al. 2017) on the output of a named layer.

    With ``A`` the layer's activation ``(B, Ck, d, h, w)``, ``w_c = mean over (d, h, w) of d score / d A_c`` and
    ``cam = relu(sum_c w_c A_c)``, upsampled (trilinear, ``align_corners=False``) to the input grid. Grad-CAM has one
    map for all input channels: it is not per MRI sequence. The returned map repeats ``cam / C`` over the ``C`` input
    channels, so that summing over channels gives ``cam``.

    The map is linear in the seed only without the ReLU, so ``linear_in_seed`` is ``not relu`` on instances.
    The hook that captures the activation is removed in a ``finally`` block, even when the forward pass fails.

    Args:
        layer: Name of a module as listed by ``model.named_modules()``; its output must be a 5D tensor and the
            module must run once per forward pass.
        relu: Apply the ReLU of the original method.
        upsample: Interpolation to the input grid, ``"trilinear"`` (default) or ``"nearest"``.
    """

    name = "gradcam"
    linear_in_seed = False
    walks_modules = True

    def __init__(self, *, layer: str, relu: bool = True, upsample: str = "trilinear") -> None:
        if not isinstance(layer, str) or not layer:
            raise SegExplainError(f"layer must be a non-empty module name from model.named_modules(), got {layer!r}")
        if not isinstance(relu, bool):
            raise SegExplainError(f"relu must be a bool, got {relu!r}")
        if upsample not in ("trilinear", "nearest"):
            raise SegExplainError(f"upsample {upsample!r} is not valid; expected 'trilinear' or 'nearest'")
        self.layer = layer
        self.relu = relu
        self.upsample = upsample
        self.linear_in_seed = not relu  # type: ignore[misc]

    def _module(self, model: torch.nn.Module) -> torch.nn.Module:
        modules = dict(model.named_modules())
        if self.layer not in modules or not self.layer:
            names = [n for n in modules if n]
            shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
            raise SegExplainError(
                f"layer {self.layer!r} is not a module of the model; expected one of {len(names)} names such as {shown}"
            )
        return modules[self.layer]

    def attribute(self, model: torch.nn.Module, inputs: torch.Tensor, seed: torch.Tensor) -> AttributionOutput:
        x = _check_inputs(inputs)
        seed = _check_seed(seed, x)
        create_graph = seed.requires_grad
        check_walkable(model, self.name)
        module = self._module(model)
        captured: list[torch.Tensor] = []
        layer = self.layer

        def hook(_mod: torch.nn.Module, _args: Any, output: Any) -> torch.Tensor:
            if not isinstance(output, torch.Tensor) or output.dim() != 5:
                kind = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise SegExplainError(f"layer {layer!r} output must be a 5D tensor (B, C, d, h, w), got {kind}")
            # A leaf of its own: the backward pass stops at the layer. The clone keeps in-place ops downstream
            # (e.g. ReLU(inplace=True)) off the captured activation.
            act = output.detach().requires_grad_(True)
            captured.append(act)
            return act.clone()

        handle = module.register_forward_hook(hook)
        try:
            with torch.enable_grad(), onednn_convolutions():
                out = model(x)
        finally:
            handle.remove()
        _check_output(out, seed, x.shape[0])
        if len(captured) != 1:
            raise SegExplainError(
                f"layer {layer!r} ran {len(captured)} times in one forward pass; expected exactly once"
            )
        act = captured[0]
        with torch.enable_grad():
            score = _scores(seed, out).sum()
            grad = None
            if score.requires_grad:
                (grad,) = torch.autograd.grad(score, act, create_graph=create_graph, allow_unused=True)
        if grad is None:
            raise SegExplainError(f"layer {layer!r} does not influence the model output; choose another layer")
        if not create_graph:
            grad, act = grad.detach(), act.detach()
        weights = grad.mean(dim=(2, 3, 4), keepdim=True)
        cam = (weights * act).sum(dim=1, keepdim=True)
        if self.relu:
            cam = F.relu(cam)
        if self.upsample == "trilinear":
            cam = F.interpolate(cam, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)
        else:
            cam = F.interpolate(cam, size=tuple(x.shape[2:]), mode="nearest")
        channels = x.shape[1]
        maps = (cam / channels).expand(-1, channels, -1, -1, -1).contiguous()
        if not create_graph:
            maps = maps.detach()
        return AttributionOutput(maps=maps)

    def options(self) -> dict[str, Any]:
        return {"layer": self.layer, "relu": self.relu, "upsample": self.upsample}
