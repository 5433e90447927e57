"""Saliency, Gradient x Input and SmoothGrad: the input gradient, once or averaged over noisy inputs."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ...errors import SegExplainError
from ..checks import is_int
from ..kernels import onednn_convolutions
from ..method import AttributionMethod, AttributionOutput
from .passes import (
    accumulate,
    check_inputs,
    check_output,
    check_seed,
    chunks,
    input_gradient,
    resolve_batch,
    set_batching,
)


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
        x = check_inputs(inputs)
        seed = check_seed(seed, x)
        grad = input_gradient(model, x, seed, None, x.shape[0], seed.requires_grad)
        return AttributionOutput(maps=x * grad if self.multiply_by_inputs else grad)

    @contextlib.contextmanager
    def seeded_by_output(self, model: torch.nn.Module, inputs: torch.Tensor,
                         ) -> Iterator[tuple[torch.Tensor, Callable[[torch.Tensor], AttributionOutput]]]:
        """Run the forward pass with its graph, yield its logits (detached) and ``finish(seed)``, which explains a seed.

        A seed read off the prediction (a predicted region) then needs no forward pass of its own: the gradient
        costs one forward and one backward pass, finding the region included, as for LRP.
        """
        x = check_inputs(inputs).detach().requires_grad_(True)
        with torch.enable_grad(), onednn_convolutions():
            out = model(x)

        def finish(seed: torch.Tensor) -> AttributionOutput:
            seed = check_seed(seed, x)
            (grad,) = torch.autograd.grad(check_output(out, seed, x.shape[0]), x, seed,
                                          create_graph=seed.requires_grad)
            grad = grad if seed.requires_grad else grad.detach()
            return AttributionOutput(maps=x.detach() * grad if self.multiply_by_inputs else grad)

        # a model that returns no tensor is left to the caller's check, which names what it returned
        yield (out.detach() if isinstance(out, torch.Tensor) else out), finish

    def options(self) -> dict[str, Any]:
        return {}


class GradientXInput(Gradient):
    """Gradient x Input: ``maps = inputs * d score / d inputs``.

    For a bias-free piecewise linear network this sums to the score, but there is no such rule in general, so
    ``delta`` is ``None``.
    """

    name = "gradient_x_input"
    multiply_by_inputs = True


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
        set_batching(self, internal_batch_size, memory_budget_bytes)
        self.n_samples = int(n_samples)
        self.noise_level = float(noise_level)
        self.seed = int(seed)
        self.multiply_by_inputs = multiply_by_inputs

    def attribute(self, model: torch.nn.Module, inputs: torch.Tensor, seed: torch.Tensor) -> AttributionOutput:
        x = check_inputs(inputs)
        seed = check_seed(seed, x)
        create_graph = seed.requires_grad
        batch = x.shape[0]
        n = self.n_samples
        total = batch * n
        k = resolve_batch(self, model, x, total)
        spatial = (2, 3, 4)
        std = self.noise_level * (x.amax(dim=spatial, keepdim=True) - x.amin(dim=spatial, keepdim=True))
        generator = torch.Generator(device=x.device)
        generator.manual_seed(self.seed)
        acc = torch.zeros_like(x)
        for rows in chunks(total, k):
            idx = torch.arange(rows.start, rows.stop, device=x.device)
            b_idx = idx // n
            noise = torch.stack(
                [torch.randn(x.shape[1:], generator=generator, dtype=x.dtype, device=x.device) for _ in rows]
            )
            xi = x[b_idx] + std[b_idx] * noise
            grad = input_gradient(model, xi, seed, b_idx, batch, create_graph)
            acc = accumulate(acc, b_idx, grad, create_graph)
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
