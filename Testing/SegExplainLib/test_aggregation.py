"""The normalized aggregation M_A = sum_a M_a / sum(M_a) against the slow reference: one explanation per voxel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from SegExplainLib.engine.api import explain, make_method
from SegExplainLib.engine.targets import BoxTarget, VoxelTarget
from SegExplainLib.models.networks import tiny_unet

SHAPE = (2, 6, 8, 8)


@pytest.fixture
def model():
    return tiny_unet(norm="instance", activation="leaky_relu").double()


@pytest.fixture
def image():
    return torch.randn(*SHAPE, dtype=torch.float64)


def per_voxel_reference(model, image, target, method, **options) -> np.ndarray:
    """One attribution per region voxel, each divided by its own sum, added up. Data-dependent choices (IG's adaptive
    nodes) are made once for the region's summed seed, so that every voxel's map is on the same footing."""
    x = image[None]
    logits = model.eval()(x)
    region = target.region(logits[0].detach())
    region_seed = torch.zeros_like(logits)
    region_seed[0, target.class_index][torch.as_tensor(region)] = 1.0
    attribution = make_method(method, **options).for_target(model, x, region_seed)
    total = torch.zeros_like(x)
    for index in zip(*np.nonzero(region)):
        seed = torch.zeros_like(logits)
        seed[(0, target.class_index, *index)] = 1.0
        maps = attribution.attribute(model, x, seed).maps.detach()
        total += maps / maps.sum()
    return total[0].numpy()


@pytest.mark.parametrize("method, options", [
    ("lrp", {"composite": "epsilon_plus_flat"}),
    ("lrp", {"composite": "epsilon"}),
    ("gradient_x_input", {}),
    ("integrated_gradients", {"n_steps": 8, "quadrature": "gausslegendre"}),
    ("integrated_gradients", {"n_steps": 16, "baseline": "zero"}),  # adaptive: its nodes chosen for the region
    ("integrated_gradients", {"n_steps": 16, "baseline": "zero", "quadrature": "adaptive_simpson"}),
    ("guided_backprop", {}),  # not linear in the seed: explained voxel by voxel in batches
])
def test_normalized_aggregation_matches_per_voxel_reference(model, image, method, options):
    target = BoxTarget((1, 2, 2), (3, 4, 5), class_index=1, aggregation="normalized")
    expected = per_voxel_reference(model, image, target, method, **options)
    result = explain(model, image, target, method, dtype=torch.float64, **options)
    np.testing.assert_allclose(result.maps, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    # every voxel contributes a map of unit sum
    assert result.expected_sum == pytest.approx(12.0)
    assert abs(result.maps.sum() - 12.0) < 1e-3


def test_exact_aggregation_uses_a_constant_number_of_passes(model, image):
    small = explain(model, image, VoxelTarget((1, 3, 3), radius=1, class_index=1, aggregation="normalized"),
                    dtype=torch.float64)
    large = explain(model, image, BoxTarget((0, 0, 0), (2, 6, 8), class_index=1, aggregation="normalized"),
                    dtype=torch.float64)
    assert small.extras["passes"] == large.extras["passes"] == 2
    assert large.region_voxels == 96 > small.region_voxels


def test_sampling_every_voxel_reproduces_the_exact_result(model, image):
    target = BoxTarget((0, 2, 2), (2, 5, 5), class_index=1, aggregation="normalized")
    exact = explain(model, image, target, dtype=torch.float64)
    sampled = explain(model, image, target, dtype=torch.float64, samples=18, voxel_batch_size=5)
    np.testing.assert_allclose(sampled.maps, exact.maps, rtol=1e-4, atol=1e-6 * np.abs(exact.maps).max())
    assert float(np.abs(sampled.standard_error).max()) == 0.0


def test_sampled_estimate_is_unbiased_within_its_standard_error(model, image):
    target = BoxTarget((0, 0, 0), (2, 4, 6), class_index=1, aggregation="normalized")
    options = {"dtype": torch.float64, "composite": "epsilon", "voxel_batch_size": 16}
    exact = explain(model, image, target, **options).maps
    estimates = [explain(model, image, target, samples=16, sampling_seed=s, **options) for s in range(4)]
    first = estimates[0]
    assert 0 < first.extras["relative_standard_error"] < 1
    assert first.extras["samples"] == 16 and first.extras["population"] == 48
    # z-scores of the single estimate: most voxels lie within 3 standard errors of the exact value
    z = np.abs(first.maps - exact) / np.maximum(first.standard_error, 1e-12)
    assert np.mean(z < 3) > 0.95
    # averaging independent draws approaches the exact map
    mean = np.mean([e.maps for e in estimates], axis=0)
    assert np.linalg.norm(mean - exact) < np.linalg.norm(first.maps - exact)
    # another seed draws other voxels
    assert not np.allclose(estimates[0].maps, estimates[1].maps)


def test_voxels_whose_map_sums_to_zero_are_left_out_with_a_warning():
    # a 1x1 convolution: each output voxel sees only its own input voxel; a zero input there gives a zero map
    model = nn.Sequential(nn.Conv3d(2, 2, 1, bias=False)).double()
    image = torch.randn(*SHAPE, dtype=torch.float64)
    image[:, :, :4] = 0.0
    target = BoxTarget((0, 2, 2), (2, 6, 6), class_index=1, aggregation="normalized")
    with pytest.warns(UserWarning, match="16 of 32 target voxels"):
        result = explain(model, image, target, "gradient_x_input", dtype=torch.float64)
    assert result.extras["excluded_voxels"] == 16
    assert result.expected_sum == 16.0
    assert np.isfinite(result.maps).all()
