"""Saliency, Gradient x Input and SmoothGrad; for every gradient-family method: differentiability w.r.t. the seed,
shared input validation, options."""

from __future__ import annotations

import json

import pytest
import torch
from testnets import frozen
from torch import nn

from SegExplainLib.engine.gradients import (
    GradCAM,
    Gradient,
    GradientXInput,
    IntegratedGradients,
    Occlusion,
    SmoothGrad,
)
from SegExplainLib.engine.method import AttributionMethod
from SegExplainLib.errors import SegExplainError

captum_attr = pytest.importorskip("captum.attr")


def small_net(c_in: int = 2, k: int = 2) -> nn.Module:
    """Conv -> ReLU -> strided conv -> ReLU -> upsample -> conv, float64; layer "3" is at half resolution."""
    return frozen(
        nn.Sequential(
            nn.Conv3d(c_in, 3, 3, padding=1),
            nn.ReLU(),
            nn.Conv3d(3, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
            nn.Conv3d(4, k, 3, padding=1),
        ).double()
    )


def _captum_forward(model, seed):
    def forward(z: torch.Tensor) -> torch.Tensor:
        rows = seed.repeat((z.shape[0] // seed.shape[0], 1, 1, 1, 1))
        return (rows * model(z)).flatten(1).sum(1)

    return forward


def _data(b: int = 2, c: int = 2, k: int = 2, spatial=(4, 4, 4)):
    x = torch.randn((b, c) + spatial, dtype=torch.float64)
    seed = torch.randn((b, k) + spatial, dtype=torch.float64)
    return x, seed


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-8) -> bool:
    scale = max(b.abs().max().item(), 1e-300)
    return bool(((a - b).abs() <= rtol * scale).all())


# ---------------------------------------------------------------------------------------------------------------
# Saliency and Gradient x Input against captum
# ---------------------------------------------------------------------------------------------------------------


def test_gradient_matches_captum_saliency():
    model = small_net()
    x, seed = _data()
    ref = captum_attr.Saliency(_captum_forward(model, seed)).attribute(x.clone().requires_grad_(True), abs=False)
    out = Gradient().attribute(model, x, seed)
    assert out.delta is None and out.expected is None
    assert _close(out.maps, ref, 1e-12)
    assert not out.maps.requires_grad


def test_gradient_x_input_matches_captum():
    model = small_net()
    x, seed = _data()
    ref = captum_attr.InputXGradient(_captum_forward(model, seed)).attribute(x.clone().requires_grad_(True))
    out = GradientXInput().attribute(model, x, seed)
    assert _close(out.maps, ref, 1e-12)


def test_gradient_of_voxel_linear_model_is_the_weight():
    w = torch.randn(1, 3, 2, 3, 4, dtype=torch.float64)

    class Linear(nn.Module):
        def forward(self, x):
            return (w * x).sum(1, keepdim=True)

    x = torch.randn(2, 3, 2, 3, 4, dtype=torch.float64)
    seed = torch.ones(2, 1, 2, 3, 4, dtype=torch.float64)
    assert torch.allclose(Gradient().attribute(Linear(), x, seed).maps, w.expand(2, -1, -1, -1, -1), atol=0)
    assert torch.allclose(GradientXInput().attribute(Linear(), x, seed).maps, w * x, atol=1e-15)


def test_gradient_works_under_no_grad_and_with_grad_inputs():
    model = small_net()
    x, seed = _data(b=1)
    ref = Gradient().attribute(model, x, seed).maps
    with torch.no_grad():
        assert torch.equal(Gradient().attribute(model, x, seed).maps, ref)
    xg = x.clone().requires_grad_(True)
    assert torch.equal(Gradient().attribute(model, xg, seed).maps, ref)
    assert xg.grad is None


def test_parameters_get_no_grad():
    model = small_net()
    x, seed = _data(b=1)
    for method in (Gradient(), IntegratedGradients(n_steps=2), SmoothGrad(n_samples=2)):
        method.attribute(model, x, seed)
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# SmoothGrad
# ---------------------------------------------------------------------------------------------------------------


def test_smoothgrad_reproducible_and_seed_dependent():
    model = small_net()
    x, seed = _data()
    a = SmoothGrad(n_samples=4, seed=3).attribute(model, x, seed).maps
    b = SmoothGrad(n_samples=4, seed=3).attribute(model, x, seed).maps
    c = SmoothGrad(n_samples=4, seed=4).attribute(model, x, seed).maps
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # The noise is drawn sample by sample, so the internal batch size does not change it.
    d = SmoothGrad(n_samples=4, seed=3, internal_batch_size=3).attribute(model, x, seed).maps
    assert torch.allclose(a, d, rtol=1e-12, atol=1e-14)


def test_smoothgrad_without_noise_is_the_gradient_and_multiplies_by_inputs():
    model = small_net()
    x, seed = _data()
    grad = Gradient().attribute(model, x, seed).maps
    assert _close(SmoothGrad(n_samples=3, noise_level=0.0).attribute(model, x, seed).maps, grad, 1e-12)
    sg = SmoothGrad(n_samples=3, seed=1).attribute(model, x, seed).maps
    sgx = SmoothGrad(n_samples=3, seed=1, multiply_by_inputs=True).attribute(model, x, seed).maps
    assert torch.allclose(sgx, x * sg, rtol=1e-14, atol=0)


def test_smoothgrad_noise_is_a_fraction_of_each_channel_range():
    class HalfSquare(nn.Module):  # score 0.5 * sum(x^2): the gradient is the (noisy) input itself
        def forward(self, x):
            return 0.5 * (x**2).sum(1, keepdim=True)

    x = torch.rand(1, 2, 20, 20, 20, dtype=torch.float64)
    x[:, 1] = 10 * x[:, 1] - 3  # range about 10 in channel 1, about 1 in channel 0
    seed = torch.ones(1, 1, 20, 20, 20, dtype=torch.float64)
    noise = SmoothGrad(n_samples=1, noise_level=0.2).attribute(HalfSquare(), x, seed).maps - x
    for c in range(2):
        expected_std = 0.2 * (x[0, c].max() - x[0, c].min()).item()
        assert abs(noise[0, c].std().item() / expected_std - 1) < 0.05
        assert abs(noise[0, c].mean().item()) < 0.05 * expected_std


def test_smoothgrad_options_and_errors():
    sg = SmoothGrad(n_samples=2, noise_level=0.3, seed=7, multiply_by_inputs=True, internal_batch_size=2)
    assert json.loads(json.dumps(sg.options())) == {
        "n_samples": 2,
        "noise_level": 0.3,
        "seed": 7,
        "multiply_by_inputs": True,
        "internal_batch_size": 2,
        "memory_budget_bytes": None,
    }
    cases = [
        ({"n_samples": 0}, r"n_samples must be an integer >= 1, got 0"),
        ({"noise_level": -0.1}, r"noise_level must be a finite number >= 0, got -0.1"),
        ({"noise_level": float("nan")}, r"noise_level must be a finite number >= 0, got nan"),
        ({"seed": 1.5}, r"seed must be an integer, got 1.5"),
        ({"multiply_by_inputs": 1}, r"multiply_by_inputs must be a bool, got 1"),
        ({"internal_batch_size": -1}, r"internal_batch_size must be None or an integer >= 1, got -1"),
        ({"memory_budget_bytes": 1.5}, r"memory_budget_bytes must be None or an integer >= 1, got 1.5"),
    ]
    for kwargs, match in cases:
        with pytest.raises(SegExplainError, match=match):
            SmoothGrad(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# All methods: differentiability w.r.t. the seed, validation, options
# ---------------------------------------------------------------------------------------------------------------


def _linear_methods() -> list[AttributionMethod]:
    return [
        Gradient(),
        GradientXInput(),
        IntegratedGradients(n_steps=3, internal_batch_size=2),
        IntegratedGradients(n_steps=3, quadrature="riemann_trapezoid", baseline="blur:1"),
        SmoothGrad(n_samples=3, internal_batch_size=2),
        SmoothGrad(n_samples=2, multiply_by_inputs=True),
        Occlusion(window=2, internal_batch_size=5),
        Occlusion(window=3, stride=2, per_channel=False, baseline="min"),
        GradCAM(layer="3", relu=False),
    ]


@pytest.mark.parametrize("method", _linear_methods(), ids=lambda m: m.name)
def test_seed_gradient_equals_one_hot_maps(method):
    assert method.linear_in_seed
    model = small_net()
    x, _ = _data(b=2, spatial=(4, 4, 4))
    seed = torch.randn(2, 2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    out = method.attribute(model, x, seed)
    assert out.maps.shape == x.shape and out.maps.requires_grad
    (dseed,) = torch.autograd.grad(out.maps.sum(), seed)
    voxels = [(0, 0, 0, 0, 0), (0, 1, 2, 3, 1), (1, 0, 3, 3, 3), (1, 1, 1, 0, 2)]
    fixed = method.for_target(model, x, seed.detach())  # IG's adaptive nodes are chosen for the seed, then linear
    for a in voxels:
        one_hot = torch.zeros_like(seed, requires_grad=False)
        one_hot[a] = 1.0
        ref = fixed.attribute(model, x, one_hot)
        assert not ref.maps.requires_grad
        assert abs(dseed[a].item() - ref.maps.sum().item()) <= 1e-10 * max(1.0, abs(ref.maps.sum().item()))
    # Linearity: the map of the seed is the map of its parts.
    plain = method.attribute(model, x, seed.detach())
    assert torch.allclose(out.maps.detach(), plain.maps, rtol=1e-10, atol=1e-12)
    if out.delta is not None:
        assert out.delta.requires_grad and torch.allclose(out.delta.detach(), plain.delta, rtol=1e-8, atol=1e-12)


def _all_methods() -> list[AttributionMethod]:
    return [
        Gradient(),
        GradientXInput(),
        IntegratedGradients(n_steps=2),
        SmoothGrad(n_samples=2),
        Occlusion(window=4),
        GradCAM(layer="3"),
    ]


@pytest.mark.parametrize("method", _all_methods(), ids=lambda m: m.name)
def test_input_and_seed_validation(method):
    model = small_net()
    x, seed = _data(b=1)
    with pytest.raises(SegExplainError, match=r"inputs must be a torch.Tensor \(B, C, D, H, W\), got ndarray"):
        method.attribute(model, x.numpy(), seed)
    with pytest.raises(SegExplainError, match=r"inputs must have shape \(B, C, D, H, W\), got shape \(2, 4, 4, 4\)"):
        method.attribute(model, x[0], seed)
    with pytest.raises(SegExplainError, match=r"inputs must be a floating point tensor, got dtype torch.int64"):
        method.attribute(model, x.long(), seed)
    with pytest.raises(SegExplainError, match=r"inputs must not be empty, got shape \(0, 2, 4, 4, 4\)"):
        method.attribute(model, x[:0], seed)
    with pytest.raises(SegExplainError, match=r"seed must be a torch.Tensor shaped like the model output, got list"):
        method.attribute(model, x, [1.0])
    with pytest.raises(SegExplainError, match=r"seed is on device meta, expected the inputs' device cpu"):
        method.attribute(model, x, torch.ones(1, 2, 4, 4, 4, device="meta"))
    with pytest.raises(
        SegExplainError,
        match=r"seed shape \(1, 3, 4, 4, 4\) does not match the model output shape \(1, 2, 4, 4, 4\)",
    ):
        method.attribute(model, x, torch.ones(1, 3, 4, 4, 4, dtype=torch.float64))
    with pytest.raises(
        SegExplainError,
        match=r"seed shape \(2, 2, 4, 4, 4\) does not match the model output shape \(1, 2, 4, 4, 4\)",
    ):
        method.attribute(model, x, torch.ones(2, 2, 4, 4, 4, dtype=torch.float64))

    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, z):
            return (self.net(z), self.net(z))

    wrapped = TupleOut()
    if isinstance(method, GradCAM):
        method = GradCAM(layer="net.3")
    with pytest.raises(SegExplainError, match=r"model output must be a tensor \(B, K, D, H, W\), got tuple"):
        method.attribute(wrapped, x, seed)


@pytest.mark.parametrize("method", _all_methods(), ids=lambda m: m.name)
def test_integer_seed_is_accepted_and_options_are_json(method):
    model = small_net()
    x, _ = _data(b=1)
    seed = torch.zeros(1, 2, 4, 4, 4, dtype=torch.long)
    seed[:, 1] = 1
    out = method.attribute(model, x, seed)
    ref = method.attribute(model, x, seed.double())
    assert torch.equal(out.maps, ref.maps)
    assert out.maps.dtype == torch.float64
    json.dumps(method.options())
    assert isinstance(method.name, str)


def test_names():
    assert [m.name for m in _all_methods()] == [
        "gradient",
        "gradient_x_input",
        "integrated_gradients",
        "smoothgrad",
        "occlusion",
        "gradcam",
    ]
