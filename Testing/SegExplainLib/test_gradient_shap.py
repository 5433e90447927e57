"""GradientSHAP: a slow one-sample-at-a-time reference, captum as oracle on the same draws, completeness in
expectation with its standard error, options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from testnets import frozen
from torch import nn

import SegExplainLib as sx
from SegExplainLib.engine.gradients import GradientShap
from SegExplainLib.errors import SegExplainError

captum_attr = pytest.importorskip("captum.attr")


def net() -> nn.Module:
    torch.manual_seed(0)
    return frozen(nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.Softplus(), nn.Conv3d(4, 4, 3, padding=1),
                                nn.LeakyReLU(0.1, inplace=True), nn.Conv3d(4, 2, 1))).double()


def _data(batch: int = 1):
    x = torch.randn(batch, 2, 4, 6, 6, dtype=torch.float64)
    seed = torch.zeros(batch, 2, 4, 6, 6, dtype=torch.float64)
    seed[:, 1, 1:3, 2:4, 2:5] = 1.0
    return x, seed


def slow_gradient_shap(model, x, seed, method: GradientShap) -> torch.Tensor:
    """One sample at a time, from the documented draws: ``(x' - r) * grad(r + alpha (x' - r))`` averaged."""
    references, chosen, alphas, generator = method.draws(x)
    spatial = (2, 3, 4)
    std = method.stdevs * (x.amax(dim=spatial, keepdim=True) - x.amin(dim=spatial, keepdim=True))
    total = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for s in range(method.n_samples):
            noisy = x[b]
            if method.stdevs:
                noisy = noisy + std[b] * torch.randn(x.shape[1:], generator=generator, dtype=x.dtype)
            r = references[chosen[b, s], b]
            point = (r + alphas[b, s] * (noisy - r)).requires_grad_(True)
            score = (seed[b] * model(point[None])[0]).sum()
            (grad,) = torch.autograd.grad(score, point)
            total[b] += (noisy - r) * grad / method.n_samples
    return total


@pytest.mark.parametrize("stdevs", [0.0, 0.1])
def test_matches_the_slow_reference_whatever_the_batch(stdevs):
    model, (x, seed) = net(), _data(2)
    for k in (1, 3, None):
        method = GradientShap(n_samples=5, n_baselines=3, stdevs=stdevs, seed=3, internal_batch_size=k)
        expected = slow_gradient_shap(model, x, seed, method)
        np.testing.assert_allclose(method.attribute(model, x, seed).maps.numpy(), expected.numpy(), rtol=1e-10,
                                   atol=1e-13)


def test_matches_captum_gradient_shap_on_the_same_draws(monkeypatch):
    """One reference (no noise), so captum's only draws are the points on the path, which it takes from
    ``np.random.uniform``: they are handed our alphas."""
    model, (x, seed) = net(), _data()
    method = GradientShap(baseline="zero", n_baselines=1, noise_level=0.0, n_samples=6, seed=5)
    references, _, alphas, _ = method.draws(x)
    monkeypatch.setattr(np.random, "uniform", lambda low, high, size: alphas[0].numpy()[:size])

    def forward(inputs):
        return (seed * model(inputs)).flatten(1).sum(1, keepdim=True)

    ref = captum_attr.GradientShap(forward).attribute(x, baselines=references[:, 0], n_samples=6, target=0)
    np.testing.assert_allclose(method.attribute(model, x, seed).maps.numpy(), ref.detach().numpy(), rtol=1e-10,
                               atol=1e-13)


def test_completeness_holds_in_expectation_within_its_standard_error():
    model, (x, seed) = net(), _data()
    errors = []
    for n in (8, 128):
        result = GradientShap(n_samples=n, n_baselines=4, stdevs=0.05).attribute(model, x, seed)
        error = result.extras["completeness_standard_error"][0]
        assert abs(float(result.delta)) < 4 * error  # zero in expectation, not for one draw
        errors.append(error)
    assert errors[1] < errors[0] / 2  # the error falls as 1/sqrt(n): 4 times fewer at 16 times the samples
    with torch.no_grad():  # expected: the mean score change from the drawn reference, here of the inputs' mean
        method = GradientShap(n_samples=128, n_baselines=4, stdevs=0.0)
        references, chosen, _, _ = method.draws(x)
        change = (seed * (model(x) - model(references[chosen[0], 0]))).flatten(1).sum(1).mean()
    assert float(method.attribute(model, x, seed).expected) == pytest.approx(float(change), rel=1e-12)


def test_linear_in_the_seed_and_reproducible():
    model, (x, seed) = net(), _data()
    other = torch.randn_like(seed)
    method = GradientShap(n_samples=4)
    combined = method.attribute(model, x, seed + 2.0 * other).maps
    parts = method.attribute(model, x, seed).maps + 2.0 * method.attribute(model, x, other).maps
    np.testing.assert_allclose(combined.numpy(), parts.numpy(), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(GradientShap(n_samples=4, seed=1).attribute(model, x, seed).maps,
                              method.attribute(model, x, seed).maps)
    assert GradientShap.linear_in_seed and GradientShap.seed_local and not GradientShap.walks_modules


def test_through_explain_on_a_torchscript_model_and_the_record_rebuilds_it():
    model = torch.jit.script(net().float())
    image = np.random.default_rng(0).normal(size=(2, 4, 6, 6)).astype(np.float32)
    target = sx.BoxTarget((1, 2, 2), (3, 4, 5), class_index=1, aggregation="normalized")
    result = sx.explain(model, image, target, "gradient_shap", n_samples=3, n_baselines=2, stdevs=0.1)
    record = json.loads(result.to_json())
    assert record["options"]["n_samples"] == 3 and record["options"]["stdevs"] == 0.1
    again = sx.explain(model, image, target, record["method"], **record["options"])
    np.testing.assert_array_equal(result.maps, again.maps)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_samples": 0}, "n_samples must be an integer >= 1, got 0"),
    ({"n_baselines": True}, "n_baselines must be an integer >= 1, got True"),
    ({"stdevs": -1.0}, r"stdevs must be a finite number >= 0 .*got -1.0"),
    ({"noise_level": "0.1"}, r"noise_level must be a finite number >= 0 .*got '0.1'"),
    ({"seed": 1.5}, "seed must be an integer, got 1.5"),
    ({"baseline": "blur:-1"}, "baseline: "),
    ({"memory_budget_bytes": -5}, "memory_budget_bytes"),
])
def test_constructor_errors_name_the_value(kwargs, message):
    with pytest.raises(SegExplainError, match=message):
        GradientShap(**kwargs)


@pytest.mark.parametrize("target", [
    sx.MaskTarget(np.pad(np.ones((2, 2, 2), bool), ((1, 1), (2, 2), (2, 2))), class_index=1),
    sx.VoxelTarget((2, 3, 3), class_index=1, radius=1.0),
    sx.PredictedRegion(class_index=1, aggregation="normalized"),
    sx.ClassChannel(class_index=0),
], ids=lambda t: type(t).__name__)
def test_every_target_through_explain_reports_its_expected_change(target):
    model = net()
    image = np.random.default_rng(0).normal(size=(2, 4, 6, 6))
    result = sx.explain(model, image, target, "gradient_shap", dtype=torch.float64, n_samples=4, n_baselines=2)
    assert result.maps.shape == image.shape and np.isfinite(result.maps).all()
    assert result.delta == pytest.approx(float(result.maps.sum()) - result.expected_sum, abs=1e-9)
    assert len(result.record()["extras"]["completeness_standard_error"]) == 1
