"""Max-sensitivity against a loop and captum's sensitivity_max on the same noisy inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from evaluation_nets import blob_image
from testnets import frozen

import SegExplainLib as sx
from SegExplainLib.engine.evaluation import robustness

TARGET = sx.BoxTarget((2, 4, 4), (6, 8, 8))


def test_noise_is_seeded_and_within_the_radius_of_the_intensity_range():
    x = blob_image()[None]
    first, again = robustness.noisy_inputs(x, 3, 0.05, seed=4), robustness.noisy_inputs(x, 3, 0.05, seed=4)
    span = float(x.max() - x.min())
    for a, b in zip(first, again):
        assert torch.equal(a, b)
        assert float((a - x).abs().max()) <= 0.05 * span and float((a - x).abs().max()) > 0.04 * span
    assert not torch.equal(first[0], first[1])


def test_max_sensitivity_matches_captum():
    metrics = pytest.importorskip("captum.metrics")
    model = frozen(sx.tiny_unet().double())
    x = blob_image()[None]
    noisy = robustness.noisy_inputs(x, 3, 0.02, seed=0)

    def explained(at: torch.Tensor) -> np.ndarray:
        return sx.explain(model, at[0], TARGET, "gradient_x_input", device="cpu").maps

    maps = explained(x)
    ours = robustness.max_sensitivity(explained, maps, noisy)
    loop = max(np.linalg.norm(explained(n) - maps) / np.linalg.norm(maps) for n in noisy)
    draws = iter(noisy)

    def batch_explained(inputs: torch.Tensor | tuple) -> tuple[torch.Tensor]:
        inputs = inputs[0] if isinstance(inputs, tuple) else inputs  # captum passes its inputs as a tuple at first
        # a tuple back: captum iterates over a bare tensor's batch axis as if it were the tuple of inputs
        return (torch.stack([torch.as_tensor(explained(i[None])) for i in inputs]),)

    theirs = metrics.sensitivity_max(batch_explained, x,
        perturb_func=lambda inputs, radius: next(draws), n_perturb_samples=3, max_examples_per_batch=1)
    assert ours == pytest.approx(loop, rel=1e-12)
    assert ours == pytest.approx(float(theirs), rel=1e-9)
    assert ours > 0
