"""GradientSHAP: expected gradients from a distribution of references."""

from __future__ import annotations

import math
from typing import Any

import torch

from ...errors import SegExplainError
from ..baselines import Baseline, BlurredBaseline
from ..checks import is_int
from ..method import AttributionMethod, AttributionOutput
from .deeplift import check_noise_level, reference_samples
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


class GradientShap(AttributionMethod):
    """GradientSHAP (Lundberg & Lee 2017; expected gradients, Erion et al. 2021), as captum's ``GradientShap``.

    Each of ``n_samples`` samples per input draws a reference ``r`` from a distribution (the baseline plus Gaussian
    noise of ``noise_level`` times each channel's intensity range, ``n_baselines`` of them), a point ``alpha`` uniform
    on ``[0, 1]`` and, with ``stdevs > 0``, noise on the input ``x' = x + eps``; it contributes
    ``(x' - r) * grad(r + alpha (x' - r))``, and the map is the mean. In expectation over ``alpha`` a sample sums to
    ``score(x') - score(r)`` (Integrated Gradients with one random node), so ``expected`` is the mean of these
    differences over the samples and ``delta`` the mean completeness gap, zero only in expectation; ``extras`` has
    the gap's standard error per input (``completeness_standard_error``).

    Every draw comes from one generator seeded with ``seed``, in this order: the references (one call), the
    reference and ``alpha`` of each sample, then the input noise sample by sample (:meth:`draws`), so the map does
    not depend on ``internal_batch_size`` and, for fixed draws, is linear in the seed.

    Args:
        baseline: The centre of the references (default ``"blur:5"``, as Integrated Gradients').
        n_baselines: Number of references (>= 1).
        noise_level: Their noise, as a fraction of each channel's intensity range (>= 0).
        n_samples: Samples per input (>= 1).
        stdevs: Noise on the input, as a fraction of each channel's intensity range (>= 0; captum's ``stdevs`` is
            absolute).
        seed: Seed of the generator.
        internal_batch_size, memory_budget_bytes: As for Integrated Gradients.
    """

    name = "gradient_shap"
    seed_local = True
    linear_in_seed = True

    def __init__(self, *, baseline: Baseline | str | float | None = None, n_baselines: int = 8,
                 noise_level: float = 0.1, n_samples: int = 16, stdevs: float = 0.0, seed: int = 0,
                 internal_batch_size: int | None = None, memory_budget_bytes: int | None = None) -> None:
        for option, value in (("n_baselines", n_baselines), ("n_samples", n_samples)):
            if not is_int(value) or value < 1:
                raise SegExplainError(f"{option} must be an integer >= 1, got {value!r}")
        check_noise_level(noise_level)
        check_noise_level(stdevs, "stdevs")
        if not is_int(seed):
            raise SegExplainError(f"seed must be an integer, got {seed!r}")
        set_batching(self, internal_batch_size, memory_budget_bytes)
        self.baseline = BlurredBaseline(5.0) if baseline is None else coerce_baseline(baseline)
        self.n_baselines = int(n_baselines)
        self.noise_level = float(noise_level)
        self.n_samples = int(n_samples)
        self.stdevs = float(stdevs)
        self.seed = int(seed)

    def draws(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator]:
        """The references ``(n_baselines, B, C, D, H, W)``, the reference index and ``alpha`` of each sample
        ``(B, n_samples)``, and the generator, which then draws the input noise sample by sample."""
        generator = torch.Generator(device=x.device)
        generator.manual_seed(self.seed)
        references = reference_samples(x, self.baseline, self.n_baselines, self.noise_level, generator)
        shape = (x.shape[0], self.n_samples)
        chosen = torch.randint(self.n_baselines, shape, generator=generator, device=x.device)
        alphas = torch.rand(shape, generator=generator, dtype=x.dtype, device=x.device)
        return references, chosen, alphas, generator

    def attribute(self, model: torch.nn.Module, inputs: torch.Tensor, seed: torch.Tensor) -> AttributionOutput:
        x = check_inputs(inputs)
        seed = check_seed(seed, x)
        create_graph = seed.requires_grad
        batch, n = x.shape[0], self.n_samples
        references, chosen, alphas, generator = self.draws(x)
        k = resolve_batch(self, model, x, batch * n)
        spatial = (2, 3, 4)
        std = self.stdevs * (x.amax(dim=spatial, keepdim=True) - x.amin(dim=spatial, keepdim=True))
        maps = torch.zeros_like(x)
        sums = torch.zeros(batch * n, dtype=x.dtype, device=x.device)  # sum of each sample's map
        noisy = []
        for rows in chunks(batch * n, k):
            idx = torch.arange(rows.start, rows.stop, device=x.device)
            b_idx, s_idx = idx // n, idx % n
            xs = x[b_idx]
            if self.stdevs:
                noise = torch.stack([torch.randn(x.shape[1:], generator=generator, dtype=x.dtype, device=x.device)
                                     for _ in rows])
                xs = xs + std[b_idx] * noise
                noisy.append(xs)
            r = references[chosen[b_idx, s_idx], b_idx]
            diff = xs - r
            point = r + alphas[b_idx, s_idx].view(-1, 1, 1, 1, 1) * diff
            sample = diff * input_gradient(model, point, seed, b_idx, batch, create_graph)
            maps = accumulate(maps, b_idx, sample / n, create_graph)
            sums[rows.start:rows.stop] = sample.detach().flatten(1).sum(1)
        ends = self._score_changes(model, x, noisy, references, chosen, seed, k)
        expected = ends.mean(1)
        gaps = sums.view(batch, n).double() - ends.detach().double()
        error = gaps.std(1) / math.sqrt(n) if n > 1 else torch.full((batch,), math.nan, dtype=torch.float64)
        return AttributionOutput(maps=maps, delta=maps.flatten(1).sum(1) - expected, expected=expected,
                                 extras={"internal_batch_size": k, "gradient_passes": n,
                                         "completeness_standard_error": [float(e) for e in error]})

    def _score_changes(self, model, x, noisy, references, chosen, seed, k) -> torch.Tensor:
        """``score(x') - score(r)`` of each sample, ``(B, n_samples)``, from forward passes of the distinct inputs
        and references only."""
        batch, n = x.shape[0], self.n_samples
        ends = torch.cat([torch.cat(noisy) if noisy else x, references.flatten(0, 1)])
        out = forward_no_grad(model, ends, max(k, 2))
        check_output(out[:batch], seed, batch)
        if noisy:  # the noisy inputs in sample order: row b * n + s
            at_x = seed_scores(seed.repeat_interleave(n, 0), out[:batch * n]).view(batch, n)
            rest = out[batch * n:]
        else:
            at_x = seed_scores(seed, out[:batch])[:, None].expand(batch, n)
            rest = out[batch:]
        at_r = seed_scores(seed.repeat(self.n_baselines, 1, 1, 1, 1), rest).view(self.n_baselines, batch)
        return at_x - at_r.T.gather(1, chosen)

    def options(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline.to_dict(),
            "n_baselines": self.n_baselines,
            "noise_level": self.noise_level,
            "n_samples": self.n_samples,
            "stdevs": self.stdevs,
            "seed": self.seed,
            "internal_batch_size": self.internal_batch_size,
            "memory_budget_bytes": self.memory_budget_bytes,
        }
