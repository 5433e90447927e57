"""DeepLIFT with the rescale rule, and DeepLIFT-SHAP: the score's change from a reference input, split by
multipliers."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import SegExplainError, UnsupportedLayerError
from ..baselines import Baseline, BlurredBaseline
from ..checks import is_int
from ..composites import Composite
from ..deployment import check_walkable, norm_statistics
from ..functional import LAYERS, LINEAR, MOVES, NORM_FUNCTIONS
from ..kernels import onednn_convolutions
from ..method import AttributionMethod, AttributionOutput
from ..quadrature import fixed_rule
from ..rules.affine import unwired
from ..rules.base import PropagationContext, Rule, replace_backward
from .passes import (
    accumulate,
    baseline_of,
    check_inputs,
    check_output,
    check_seed,
    chunks,
    coerce_baseline,
    resolve_batch,
    seed_scores,
    set_batching,
)

#: Functional operations that are linear in the activations, through which the multipliers are the gradient:
#: copies, parameter-free linear maps and functional convolutions or dense layers (scaling by a constant is let
#: through by :func:`~SegExplainLib.engine.functional.passes` itself). Rectifiers, max pooling, norms and products
#: of two activations are not linear and have no rule here.
DEEPLIFT_FUNCTIONS = MOVES | LINEAR | frozenset(
    f for f in LAYERS - NORM_FUNCTIONS if getattr(f, "__name__", "").startswith(("conv", "linear")))

_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
              nn.AdaptiveMaxPool3d)


class Rescale(Rule):
    """DeepLIFT's rescale rule on an element-wise nonlinearity ``y = f(x)``: the multiplier ``(y - y0) / (x - x0)``
    between the input's and the reference's activations replaces the derivative.

    The layer runs on the input and the reference stacked along the batch (input rows first, then as many reference
    rows); both halves get the same multiplier. Where ``x - x0`` is within rounding of zero the quotient is rounding
    noise, and the rule takes the derivative ``f'(x)``, its limit.
    """

    name = "rescale"
    categories = frozenset({"rectifier", "activation"})

    def wrap(self, module, x, y, ctx):
        if x.shape[0] % 2:
            msg = (f"the rescale rule needs the input and the reference stacked along the batch, got a batch of "
                   f"{x.shape[0]} at {type(module).__name__}; the network must not change the batch size")
            raise SegExplainError(msg)
        half = x.shape[0] // 2
        with torch.no_grad():
            dx, dy = x[:half] - x[half:], y[:half] - y[half:]
            tiny = _tiny(dx, x[:half], x[half:])
            slope = dy / torch.where(tiny, torch.ones_like(dx), dx)
            if bool(tiny.any()):
                slope = torch.where(tiny, _derivative(module, x[:half]), slope)
            factor = torch.cat([slope, slope])
        return replace_backward(x, y, lambda x_in, saved, grad: grad * saved, saved=factor)


def _derivative(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``f'(x)`` of an element-wise layer, from autograd."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(unwired(module)(leaf).sum(), leaf)
    return grad


def _tiny(dx: torch.Tensor, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Where ``dx = x - x0`` is within rounding of zero, so that a quotient by it is rounding noise."""
    return dx.abs() <= math.sqrt(torch.finfo(dx.dtype).eps) * (x.abs() + x0.abs())


class RescaleMax(Rule):
    """DeepLIFT on max pooling, as captum's: the change ``y - y0`` of each output goes to the maximum of the input
    where ``y >= y0`` and to the maximum of the reference otherwise, and a voxel's multiplier is the change it
    receives divided by its own ``x - x0`` (the gradient where that is within rounding of zero). Summed over a
    window, the contributions give ``y - y0``. Other pass-through layers (identity, padding, dropout) keep the
    gradient, which is exact for them.
    """

    name = "rescale_max"
    categories = frozenset({"passthrough"})

    def wrap(self, module, x, y, ctx):
        if not isinstance(module, _MAX_POOLS):
            return y
        if not isinstance(y, torch.Tensor):
            msg = f"{type(module).__name__} returns {type(y).__name__}; DeepLIFT needs max pooling without indices"
            raise UnsupportedLayerError(msg)

        def propagate(x_in, _saved, grad):
            half = x_in.shape[0] // 2
            create_graph = torch.is_grad_enabled()
            g = grad[:half]
            with torch.enable_grad():
                leaf = x_in.detach().requires_grad_(True)
                out = unwired(module)(leaf)
                y_x, y_0 = out[:half].detach(), out[half:].detach()
                top = torch.maximum(y_x, y_0)
                # the change to the input's maximum (first half) and to the reference's (second half)
                change = torch.cat([g * (top - y_0), g * (y_x - top)])
                (routed,) = torch.autograd.grad(out, leaf, change, retain_graph=True, create_graph=create_graph)
                (gradient,) = torch.autograd.grad(out, leaf, torch.cat([g, torch.zeros_like(g)]),
                                                  create_graph=create_graph)
            dx = x_in[:half] - x_in[half:]
            tiny = _tiny(dx, x_in[:half], x_in[half:])
            share = (routed[:half] + routed[half:]) / torch.where(tiny, torch.ones_like(dx), dx)
            multiplier = torch.where(tiny, gradient[:half], share)
            return torch.cat([multiplier, multiplier])

        return replace_backward(x, y, propagate)


class NormPath(Rule):
    """DeepLIFT on a norm that normalizes with the statistics of its input (InstanceNorm, GroupNorm, a norm in train
    mode): the norm's Jacobian averaged along the straight line from the reference's activation to the input's.

    For an element-wise function that average is exactly the rescale multiplier, ``(f(z) - f(z0)) / (z - z0)``; for
    a norm, whose outputs each depend on the whole group, it is the one linear map that sends ``z - z0`` to
    ``y - y0`` by construction, so summation-to-delta holds through it. Along the line ``z0 + t (z - z0)`` the
    centred activation is ``a + t d`` and the variance a quadratic ``A + 2 B t + C t^2``, so the averaged backward is
    ``gamma`` times ``(g - mean g) I0 - a (p I30 + q I31) - d (p I31 + q I32)`` with ``p = mean(g a)``,
    ``q = mean(g d)`` and the scalar integrals ``I0 = int 1/s``, ``I3k = int t^k / s^3`` over ``t`` in ``[0, 1]``
    (``s^2`` the variance plus ``eps``), taken per sample and group by a 128-node Gauss-Legendre rule in float64
    (:func:`_path_integrals`). A norm on running statistics is a fixed affine map and keeps its gradient.
    """

    name = "norm_path"
    categories = frozenset({"norm"})

    def wrap(self, module, x, y, ctx):
        return y  # only forward() knows the deployed norm function

    def forward(self, module, x, original, ctx):
        y = original(x)
        if norm_statistics(module) == "running":
            return y
        groups = module.num_groups if isinstance(module, nn.GroupNorm) else x.shape[1]
        return replace_backward(x, y, lambda x_in, _saved, grad: _norm_multipliers(module, groups, x_in, grad))


_NORM_NODES = 128


@functools.lru_cache(maxsize=1)
def _norm_rule() -> tuple[np.ndarray, np.ndarray]:
    return fixed_rule("gausslegendre", _NORM_NODES)


def _path_integrals(a: torch.Tensor, d: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """``I0 = int 1/s``, ``I3k = int t^k / s^3`` over ``t`` in ``[0, 1]``, ``s^2 = A + 2 B t + C t^2 + eps`` the
    variance of ``a + t d`` plus ``eps``, per sample and group (float64, last axis kept).

    ``s`` is smallest at ``t* = -B / C``, in a sliver of width ``w = sqrt(A C + eps C - B^2) / C`` that is tiny from a
    constant reference (``A = 0``, ``t* = 0``). Where ``w < 1`` the rule runs in ``u`` with
    ``t = t* + w sinh(u)``, in which the integrands are smooth bumps of unit width; elsewhere in ``t`` itself.
    """
    var_a, cov, var_d = ((u * v).mean(-1, keepdim=True) for u, v in ((a, a), (a, d), (d, d)))
    q0 = var_a + eps
    nodes, weights = (torch.as_tensor(v, device=a.device) for v in _norm_rule())
    positive = var_d.clamp(min=torch.finfo(a.dtype).tiny)
    width = (q0 * var_d - cov**2).clamp(min=0).sqrt() / positive
    sharp = (var_d > 0) & (width < 1)
    centre = torch.where(sharp, -cov / positive, torch.zeros_like(cov))
    width = torch.where(sharp, width, torch.ones_like(width))
    u0, u1 = torch.asinh(-centre / width), torch.asinh((1 - centre) / width)
    u = u0 + (u1 - u0) * nodes
    t = torch.where(sharp, centre + width * torch.sinh(u), nodes.expand_as(u))
    w = torch.where(sharp, weights * (u1 - u0) * width * torch.cosh(u), weights.expand_as(u))
    variance = q0 + 2 * cov * t + var_d * t**2
    inverse = w / variance.sqrt()
    cubed = inverse / variance
    return tuple(v.sum(-1, keepdim=True) for v in (inverse, cubed, cubed * t, cubed * t**2))


def _norm_multipliers(module: nn.Module, groups: int, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The averaged backward of :class:`NormPath` for both halves of the stacked batch."""
    half = x.shape[0] // 2
    shape = (half, groups, -1)
    with torch.no_grad():
        a = x[half:].reshape(shape).double()
        d = x[:half].reshape(shape).double() - a
        a, d = a - a.mean(-1, keepdim=True), d - d.mean(-1, keepdim=True)
        i0, i30, i31, i32 = (v.to(x.dtype) for v in _path_integrals(a, d, module.eps))
        a, d = a.to(x.dtype), d.to(x.dtype)
    g = grad[:half]
    if getattr(module, "weight", None) is not None:
        g = g * module.weight.view(1, -1, *([1] * (g.dim() - 2)))
    g = g.reshape(shape)
    p, q = (g * a).mean(-1, keepdim=True), (g * d).mean(-1, keepdim=True)
    multiplier = (g - g.mean(-1, keepdim=True)) * i0 - a * (p * i30 + q * i31) - d * (p * i31 + q * i32)
    multiplier = multiplier.reshape(x[:half].shape)
    return torch.cat([multiplier, multiplier])


#: Rescale on every element-wise nonlinearity and max pooling, the averaged Jacobian on norms on input statistics;
#: linear layers, norms on running statistics and the functional operations of :data:`DEEPLIFT_FUNCTIONS` keep their
#: gradient, which is exact for a linear map.
DEEPLIFT = Composite(rules={"rectifier": Rescale(), "activation": Rescale(), "passthrough": RescaleMax(),
                            "norm": NormPath()},
                     canonizers=(), required=frozenset({"rectifier", "activation", "norm"}),
                     passed_functions=DEEPLIFT_FUNCTIONS, name="deeplift")


def reference_samples(x: torch.Tensor, baseline: Baseline, n: int, noise_level: float,
                      generator: torch.Generator) -> torch.Tensor:
    """``n`` references per input, ``(n, B, C, D, H, W)``: the baseline plus Gaussian noise of ``noise_level`` times
    each channel's intensity range (as SmoothGrad's), drawn from ``generator`` in one call."""
    x0 = baseline_of(x, baseline)
    spatial = (2, 3, 4)
    std = noise_level * (x.amax(dim=spatial, keepdim=True) - x.amin(dim=spatial, keepdim=True))
    noise = torch.randn((n, *x.shape), generator=generator, dtype=x.dtype, device=x.device)
    return x0 + std * noise


class DeepLift(AttributionMethod):
    """DeepLIFT with the rescale rule (Shrikumar et al. 2017): explains ``score(x) - score(x0)`` for a reference
    input ``x0``.

    Each element-wise nonlinearity passes the backward signal times its multiplier ``(f(x) - f(x0)) / (x - x0)``
    (:class:`Rescale`); linear layers pass the gradient. ``maps = (x - x0) * m`` with ``m`` the multipliers of the
    input voxels, so the maps sum to ``score(x) - score(x0)`` (summation-to-delta); ``delta`` records the rounding
    that is left. One forward pass of input and reference stacked along the batch, and one backward pass.

    The map is linear in the seed: for a fixed input and reference every multiplier is a constant, so the backward
    pass is a fixed linear map of the seed. Max pooling (:class:`RescaleMax`) and norms on their input's statistics
    (:class:`NormPath`) have rules of their own; an operation without one (a functional nonlinearity such as
    ``F.relu``, a gate, attention) is an error naming it.

    Args:
        baseline: The reference, a :class:`~SegExplainLib.engine.baselines.Baseline` or a spec for
            :func:`~SegExplainLib.engine.baselines.make_baseline` (default ``"blur:5"``, as Integrated Gradients').
        internal_batch_size: Input-reference pairs per pass; ``None`` chooses from the memory budget.
        memory_budget_bytes: Budget for that choice; ``None`` uses the device default.
    """

    name = "deeplift"
    seed_local = True
    linear_in_seed = True
    walks_modules = True
    #: Above this relative delta the explanation carries a warning (summation-to-delta is exact up to rounding).
    WARN_DELTA = 1e-3

    def __init__(self, *, baseline: Baseline | str | float | None = None, internal_batch_size: int | None = None,
                 memory_budget_bytes: int | None = None) -> None:
        set_batching(self, internal_batch_size, memory_budget_bytes)
        self.baseline = BlurredBaseline(5.0) if baseline is None else coerce_baseline(baseline)

    def references(self, x: torch.Tensor) -> torch.Tensor:
        """The references of ``x`` as ``(n, B, C, D, H, W)``; one for DeepLIFT."""
        return baseline_of(x, self.baseline)[None]

    def attribute(self, model: torch.nn.Module, inputs: torch.Tensor, seed: torch.Tensor) -> AttributionOutput:
        x = check_inputs(inputs)
        seed = check_seed(seed, x)
        check_walkable(model, self.name)
        references = self.references(x)
        create_graph = seed.requires_grad
        n, batch = references.shape[:2]
        pairs = resolve_batch(self, model, x, 2 * n * batch) // 2 or 1
        maps = torch.zeros_like(x)
        expected = torch.zeros(batch, dtype=x.dtype, device=x.device)
        for rows in chunks(n * batch, pairs):
            idx = torch.arange(rows.start, rows.stop, device=x.device)
            b_idx, r_idx = idx % batch, idx // batch
            x0 = references[r_idx, b_idx]
            grad, scores = self._pass(model, x[b_idx], x0, seed, b_idx, batch, create_graph)
            maps = accumulate(maps, b_idx, (x[b_idx] - x0) * grad / n, create_graph)
            expected = accumulate(expected, b_idx, scores / n, create_graph)
        delta = maps.flatten(1).sum(1) - expected
        return AttributionOutput(maps=maps, delta=delta, expected=expected,
                                 extras={"internal_batch_size": 2 * pairs, "references": n})

    def _pass(self, model, x, x0, seed, b_idx, batch, create_graph) -> tuple[torch.Tensor, torch.Tensor]:
        """The multipliers of the input voxels of each row, and ``score(x) - score(x0)`` per row."""
        stacked = torch.cat([x, x0]).requires_grad_(True)
        ctx = PropagationContext(network_input=stacked, input_sink=torch.zeros_like(stacked))
        rows = seed[b_idx]
        with torch.enable_grad(), onednn_convolutions(), DEEPLIFT.attached(model, ctx) as forward:
            out = check_output(forward(stacked), seed, batch)
            (grad,) = torch.autograd.grad(out, stacked, grad_outputs=torch.cat([rows, torch.zeros_like(rows)]),
                                          create_graph=create_graph)
        logits = out.detach()
        scores = seed_scores(rows, logits[:len(x)]) - seed_scores(rows, logits[len(x):])
        return grad[:len(x)] if create_graph else grad[:len(x)].detach(), scores

    def sum_rule_warnings(self, delta: float | None, expected: float | None) -> list[str]:
        if delta is None or not expected or abs(delta) <= self.WARN_DELTA * abs(expected):
            return []
        return [f"{self.name} misses summation-to-delta by {100 * abs(delta) / abs(expected):.2g} % (maps sum to "
                f"{expected + delta:.4g}, the score changes by {expected:.4g} from the reference): rounding in "
                "float32; compute in float64 (dtype=torch.float64) for exact sums"]

    def options(self) -> dict[str, Any]:
        return {"baseline": self.baseline.to_dict(), "internal_batch_size": self.internal_batch_size,
                "memory_budget_bytes": self.memory_budget_bytes}


class DeepLiftShap(DeepLift):
    """DeepLIFT-SHAP (Lundberg & Lee 2017, as captum's ``DeepLiftShap``): DeepLIFT averaged over a distribution of
    references, the baseline plus Gaussian noise of ``noise_level`` times each channel's intensity range.

    The maps sum to the mean of ``score(x) - score(x0_j)`` over the references, which is ``expected``. The references
    are drawn from a generator seeded with ``baseline_seed``, so the map is reproducible and, for fixed references,
    linear in the seed. All input-reference pairs are stacked along the batch, ``internal_batch_size`` rows at a time.

    Args:
        baseline: The centre of the references (default ``"blur:5"``).
        n_baselines: Number of references (>= 1).
        noise_level: Noise standard deviation as a fraction of each channel's intensity range (>= 0); 0 gives
            ``n_baselines`` copies of the baseline, i.e. DeepLIFT.
        baseline_seed: Seed of the references' noise.
        internal_batch_size, memory_budget_bytes: As for :class:`DeepLift`.
    """

    name = "deeplift_shap"

    def __init__(self, *, baseline: Baseline | str | float | None = None, n_baselines: int = 8,
                 noise_level: float = 0.1, baseline_seed: int = 0, internal_batch_size: int | None = None,
                 memory_budget_bytes: int | None = None) -> None:
        if not is_int(n_baselines) or n_baselines < 1:
            raise SegExplainError(f"n_baselines must be an integer >= 1, got {n_baselines!r}")
        check_noise_level(noise_level)
        if not is_int(baseline_seed):
            raise SegExplainError(f"baseline_seed must be an integer, got {baseline_seed!r}")
        super().__init__(baseline=baseline, internal_batch_size=internal_batch_size,
                         memory_budget_bytes=memory_budget_bytes)
        self.n_baselines = int(n_baselines)
        self.noise_level = float(noise_level)
        self.baseline_seed = int(baseline_seed)

    def references(self, x: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(self.baseline_seed)
        return reference_samples(x, self.baseline, self.n_baselines, self.noise_level, generator)

    def options(self) -> dict[str, Any]:
        return {"baseline": self.baseline.to_dict(), "n_baselines": self.n_baselines, "noise_level": self.noise_level,
                "baseline_seed": self.baseline_seed, "internal_batch_size": self.internal_batch_size,
                "memory_budget_bytes": self.memory_budget_bytes}


def check_noise_level(noise_level: Any, option: str = "noise_level") -> None:
    """A share of the intensity range: a finite number >= 0."""
    if (isinstance(noise_level, bool) or not isinstance(noise_level, (int, float)) or not math.isfinite(noise_level)
            or noise_level < 0):
        raise SegExplainError(f"{option} must be a finite number >= 0 (a share of each channel's intensity range), "
                              f"got {noise_level!r}")
