"""Supervoxel Shapley values by permutation sampling: exact on two blocks, within its standard error of the exact
values (captum's ShapleyValues) on three, the sum rule, the seed and bad options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from testnets import frozen
from torch import nn

import SegExplainLib as sx
from SegExplainLib.engine.perturbation import SupervoxelShapley
from SegExplainLib.engine.perturbation.supervoxel_shapley import block_labels
from SegExplainLib.errors import SegExplainError

captum_attr = pytest.importorskip("captum.attr")


def relu_net(c_in: int = 2, k: int = 2) -> nn.Module:
    return frozen(nn.Sequential(nn.Conv3d(c_in, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, 6, 1), nn.ReLU(),
                                nn.Conv3d(6, k, 3, padding=1)).double())


def exact_block_values(model, x, seed, block):
    """The exact Shapley values of the blocks, from captum's ShapleyValues (every order enumerated)."""
    labels = block_labels(x.shape[2:], block, x.device)
    mask = labels[None, None].expand(1, x.shape[1], *labels.shape).contiguous()

    def forward(z):
        return (seed.repeat(z.shape[0] // seed.shape[0], 1, 1, 1, 1) * model(z)).flatten(1).sum(1)

    attributions = captum_attr.ShapleyValues(forward).attribute(x, baselines=0.0, feature_mask=mask)
    players = int(labels.max()) + 1
    return torch.stack([attributions[:, 0][:, labels == p][:, 0] for p in range(players)], dim=1).double()


def block_values(maps, block):
    labels = block_labels(maps.shape[2:], block, maps.device)
    return torch.stack([maps[:, :, labels == p].sum((1, 2)) for p in range(int(labels.max()) + 1)], dim=1)


def test_two_blocks_are_exact_with_antithetic_orders():
    """An order of two blocks and its reverse are all the orders there are: the estimate is the Shapley value."""
    model = relu_net()
    x = torch.randn(1, 2, 2, 4, 4, dtype=torch.float64)
    seed = torch.randn(1, 2, 2, 4, 4, dtype=torch.float64)
    out = SupervoxelShapley(block_size=(1, 4, 4), n_permutations=4).attribute(model, x, seed)
    exact = exact_block_values(model, x, seed, (1, 4, 4))
    np.testing.assert_allclose(block_values(out.maps, (1, 4, 4)).numpy(), exact.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out.extras["standard_errors"], [[0.0, 0.0]], atol=1e-12)


@pytest.mark.parametrize("antithetic", [True, False])
def test_three_blocks_within_the_reported_error_of_the_exact_values(antithetic):
    model = relu_net()
    torch.manual_seed(4)
    x = torch.randn(2, 2, 3, 4, 4, dtype=torch.float64)
    seed = torch.randn(2, 2, 3, 4, 4, dtype=torch.float64)
    # enough orders for the standard error to be estimated (with 3 pairs, every pair may put a block in the
    # middle: its error reads 0 though its estimate is off)
    out = SupervoxelShapley(block_size=(1, 4, 4), n_permutations=40, antithetic=antithetic,
                            seed=1).attribute(model, x, seed)
    exact = exact_block_values(model, x, seed, (1, 4, 4))
    estimate = block_values(out.maps, (1, 4, 4))
    error = torch.tensor(out.extras["standard_errors"], dtype=torch.float64)
    assert out.extras["blocks"] == 3 and out.extras["forward_passes"] == 2 * (2 + 40 * 2)
    assert bool((error > 0).any())
    assert bool(((estimate - exact).abs() <= 4 * error + 1e-6).all()), (estimate, exact, error)
    # efficiency holds for every order, so for the estimate: float rounding only
    assert float(out.delta.abs().max()) < 1e-10
    with torch.no_grad():
        change = (seed * (model(x) - model(torch.zeros_like(x)))).flatten(1).sum(1)
    np.testing.assert_allclose(out.expected.numpy(), change.numpy(), rtol=1e-12)


def test_the_error_shrinks_with_more_orders_and_the_seed_reproduces():
    model = relu_net()
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    seed = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    few = SupervoxelShapley(block_size=2, n_permutations=4, seed=5).attribute(model, x, seed)
    many = SupervoxelShapley(block_size=2, n_permutations=64, seed=5).attribute(model, x, seed)
    again = SupervoxelShapley(block_size=2, n_permutations=4, seed=5).attribute(model, x, seed)
    other = SupervoxelShapley(block_size=2, n_permutations=4, seed=6).attribute(model, x, seed)
    assert np.mean(many.extras["standard_errors"]) < 0.5 * np.mean(few.extras["standard_errors"])
    assert torch.equal(few.maps, again.maps) and not torch.equal(few.maps, other.maps)
    # a block's value is spread in equal parts over its voxels in every channel
    assert torch.allclose(few.maps[0, :, :2, :2, :2], few.maps[0, 0, 0, 0, 0].expand(2, 2, 2, 2))


def test_runs_through_explain_with_the_normalized_aggregation():
    model = sx.tiny_unet().eval()
    image = np.random.default_rng(0).normal(size=(2, 6, 8, 8)).astype(np.float32)
    target = sx.BoxTarget((1, 2, 2), (3, 4, 5), class_index=1, aggregation="normalized")
    options = {"block_size": [3, 4, 4], "n_permutations": 4}
    exact = sx.explain(model, image, target, "supervoxel_shapley", dtype=torch.float64, **options)
    every = sx.explain(model, image, target, "supervoxel_shapley", dtype=torch.float64, samples=12, **options)
    np.testing.assert_allclose(exact.maps, every.maps, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("options, message", [
    ({"n_permutations": 5}, "n_permutations must be an even integer >= 4 .*got 5"),
    ({"n_permutations": 2}, "n_permutations must be an even integer >= 4 .*got 2"),
    ({"n_permutations": 1, "antithetic": False}, "n_permutations must be an integer >= 2 .*got 1"),
    ({"antithetic": "yes"}, "antithetic must be a bool, got 'yes'"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"block_size": 0}, "block_size must be >= 1 along every axis, got 0"),
    ({"baseline": "zeroes"}, "baseline: baseline spec 'zeroes'"),
])
def test_bad_options(options, message):
    with pytest.raises(SegExplainError, match=message):
        SupervoxelShapley(**options)


def test_one_block_is_refused():
    model = relu_net()
    with pytest.raises(SegExplainError, match=r"block_size \[8, 8, 8\] makes one block .*expected at least 2"):
        SupervoxelShapley().attribute(model, torch.zeros(1, 2, 4, 4, 4, dtype=torch.float64),
                                      torch.ones(1, 2, 4, 4, 4, dtype=torch.float64))
