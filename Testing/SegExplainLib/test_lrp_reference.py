"""LRP rules against a slow, obviously correct matrix-form reference on tiny 3D conv nets (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lrp_reference import as_matrix, reference_layer
from torch import nn

from SegExplainLib.engine.composites import composite_names
from SegExplainLib.engine.filters import AmplitudeFilter
from SegExplainLib.engine.lrp import LRP


def chain_net(activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    # a strided convolution keeps receptive fields distinct from the flat rule's all-ones weights
    return nn.Sequential(
        nn.Conv3d(2, 3, 3, padding=1), activation(),
        nn.Conv3d(3, 4, 3, padding=1, stride=2), activation(),
        nn.Conv3d(4, 2, 1),
    ).double()


def reference_chain(model: nn.Sequential, x: torch.Tensor, seed: torch.Tensor, rules: list[str]) -> np.ndarray:
    """Forward through the chain collecting activations, then propagate relevance back layer by layer.

    Activations pass relevance unchanged (the LRP identity rule for ReLU and LeakyReLU).
    """
    activations, shapes, layers = [x[0].numpy().ravel()], [tuple(x.shape[1:])], []
    h = x
    for module in model:
        h = module(h)
        if isinstance(module, nn.Conv3d):
            layers.append((module, shapes[-1]))
        activations.append(h[0].detach().numpy().ravel())
        shapes.append(tuple(h.shape[1:]))
    R = (seed[0].numpy() * h[0].detach().numpy()).ravel()
    conv_inputs = [a for a, m in zip(activations, model) if isinstance(m, nn.Conv3d)]
    for (module, in_shape), x_in, rule in reversed(list(zip(layers, conv_inputs, rules))):
        W, b = as_matrix(module, in_shape)
        R = reference_layer(rule, W, b, x_in, R)
    return R.reshape(shapes[0])


COMPOSITES = {
    "epsilon": ["epsilon", "epsilon", "epsilon"],
    "z_plus": ["z_plus", "z_plus", "z_plus"],
    "epsilon_plus": ["z_plus", "z_plus", "z_plus"],
    "epsilon_plus_flat": ["flat", "z_plus", "z_plus"],
    "epsilon_plus_w_square": ["w_square", "z_plus", "z_plus"],
    "epsilon_alpha2_beta1": ["alpha2_beta1", "alpha2_beta1", "alpha2_beta1"],
    "gamma": ["gamma", "gamma", "gamma"],
    "epsilon_gamma_z_box": ["z_box", "gamma", "gamma"],
}


@pytest.mark.parametrize("activation", [nn.ReLU, lambda: nn.LeakyReLU(0.1)], ids=["relu", "leaky_relu"])
@pytest.mark.parametrize("composite", sorted(COMPOSITES))
def test_composite_matches_matrix_reference(composite, activation):
    model = chain_net(activation)
    x = torch.randn(1, 2, 4, 6, 6, dtype=torch.float64)
    seed = torch.zeros(1, 2, 2, 3, 3, dtype=torch.float64)
    seed[0, 1, :, 1:, 1:] = 1.0
    expected = reference_chain(model, x, seed, COMPOSITES[composite])
    maps = LRP(composite=composite).attribute(model, x, seed).maps[0].numpy()
    np.testing.assert_allclose(maps, expected, rtol=1e-7, atol=1e-9 * np.abs(expected).max())


@pytest.mark.parametrize("activation", [nn.ReLU, lambda: nn.LeakyReLU(0.1)], ids=["relu", "leaky_relu"])
@pytest.mark.parametrize("composite", ["z_plus", "epsilon_plus_flat", "epsilon_plus_w_square", "epsilon"])
def test_small_target_matches_matrix_reference(composite, activation):
    """A few output voxels: z+ and epsilon run on the box of each layer's output that receives relevance."""
    torch.manual_seed(5)
    model = chain_net(activation)
    x = torch.randn(1, 2, 8, 10, 10, dtype=torch.float64)
    seed = torch.zeros(1, 2, 4, 5, 5, dtype=torch.float64)
    seed[0, 1, 0, 1:3, 4] = 1.0  # 2 of 100 output voxels, at the border
    expected = reference_chain(model, x, seed, COMPOSITES[composite])
    maps = LRP(composite=composite).attribute(model, x, seed).maps[0].numpy()
    np.testing.assert_allclose(maps, expected, rtol=1e-7, atol=1e-9 * np.abs(expected).max())


class SkipNet(nn.Module):
    """A residual addition and a concatenation skip, the two merges of U-Nets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv3d(2, 3, 3, padding=1, bias=False), nn.ReLU()
        self.conv2, self.act2 = nn.Conv3d(3, 3, 3, padding=1, bias=False), nn.ReLU()
        self.head = nn.Conv3d(6, 2, 1, bias=False)

    def forward(self, x):
        h1 = self.act1(self.conv1(x))
        h2 = self.act2(self.conv2(h1)) + h1
        return self.head(torch.cat([h1, h2], dim=1))


def test_skips_split_relevance_and_conserve_it():
    torch.manual_seed(3)
    model = SkipNet().double()
    with torch.no_grad():  # positive activations: LRP-0 conserves exactly and has a closed form below
        for conv in (model.conv1, model.conv2, model.head):
            conv.weight.abs_()
    x = torch.rand(1, 2, 3, 4, 4, dtype=torch.float64)
    seed = torch.zeros(1, 2, 3, 4, 4, dtype=torch.float64)
    seed[0, 0, 1, 1:3, 1:3] = 1.0
    out = LRP(composite="zero").attribute(model, x, seed)

    # reference: relevance of the concat input is split into its two parts, the addition splits in proportion
    shape = (3, 3, 4, 4)
    h1 = model.act1(model.conv1(x))
    a = model.act2(model.conv2(h1))
    h2 = a + h1
    cat = torch.cat([h1, h2], 1)[0].detach().numpy().ravel()
    W, b = as_matrix(model.head, (6, 3, 4, 4))
    R_cat = reference_layer("epsilon", W, b, cat, (seed[0].numpy() * model(x)[0].detach().numpy()).ravel(), eps=0)
    R_cat = R_cat.reshape(6, 3, 4, 4)
    R_h1_skip, R_h2 = R_cat[:3].ravel(), R_cat[3:].ravel()
    a_np, h1_np, h2_np = (t[0].detach().numpy().ravel() for t in (a, h1, h2))
    R_a, R_h1_res = a_np / h2_np * R_h2, h1_np / h2_np * R_h2
    W2, b2 = as_matrix(model.conv2, shape)
    R_h1 = R_h1_skip + R_h1_res + reference_layer("epsilon", W2, b2, h1_np, R_a, eps=0)
    W1, b1 = as_matrix(model.conv1, (2, 3, 4, 4))
    expected = reference_layer("epsilon", W1, b1, x[0].numpy().ravel(), R_h1, eps=0).reshape(2, 3, 4, 4)

    np.testing.assert_allclose(out.maps[0].numpy(), expected, rtol=1e-8, atol=1e-12)
    assert abs(float(out.delta[0])) < 1e-8 * abs(float(out.expected[0]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_epsilon_without_biases_equals_gradient_times_input(dtype):
    # float32 runs the convolutions and their transposes on oneDNN directly, float64 through torch
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1, bias=False), nn.LeakyReLU(0.1),
        nn.Conv3d(4, 4, 3, padding=2, dilation=2, groups=2, bias=False), nn.ReLU(),
        nn.Conv3d(4, 4, 3, padding="same", bias=False), nn.ReLU(),
        nn.Conv3d(4, 4, 3, padding=1, padding_mode="reflect", bias=False), nn.ReLU(),
        nn.Conv3d(4, 6, 3, stride=2, padding=1, bias=False), nn.MaxPool3d(2),
        nn.ConvTranspose3d(6, 4, 2, stride=2, bias=False), nn.ReLU(),
        nn.Conv3d(4, 2, 1, bias=False)).to(dtype)
    x = torch.randn(1, 2, 8, 8, 8, dtype=dtype, requires_grad=True)
    seed = torch.randn(1, 2, 4, 4, 4, dtype=dtype)
    (grad,) = torch.autograd.grad((model(x) * seed).sum(), x)
    maps = LRP(composite="zero").attribute(model, x, seed).maps
    tolerance = {"rtol": 1e-4, "atol": 1e-5 * float(grad.abs().max())} if dtype == torch.float32 else {}
    torch.testing.assert_close(maps, grad * x.detach(), **tolerance)


@pytest.mark.parametrize("spec", ["pass:0.4", "clamp:0.2", "pass:0.05,0.6"])
@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus_flat"])
def test_layer_wise_filter_matches_reference(composite, spec):
    """Tjoa et al.'s filters inside the propagation: applied to the relevance entering every layer."""
    amplitude_filter = AmplitudeFilter.parse(spec)
    model = chain_net()
    x = torch.randn(1, 2, 4, 6, 6, dtype=torch.float64)
    seed = torch.zeros(1, 2, 2, 3, 3, dtype=torch.float64)
    seed[0, 1] = 1.0

    convs = [m for m in model if isinstance(m, nn.Conv3d)]
    inputs, outputs, h = [], [], x
    for module in model:
        if isinstance(module, nn.Conv3d):
            inputs.append(h[0].detach().numpy().ravel())
        h = module(h)
        if isinstance(module, nn.Conv3d):
            outputs.append(tuple(h.shape[1:]))
    in_shapes = [tuple(x.shape[1:])] + outputs[:-1]
    R = (seed[0] * h[0].detach()).numpy()
    for conv, x_in, in_shape, out_shape, rule in reversed(list(zip(convs, inputs, in_shapes, outputs,
                                                                    COMPOSITES[composite]))):
        R = amplitude_filter(R.reshape(out_shape))  # per-channel normalization by max|R|, filter, scale back
        W, b = as_matrix(conv, in_shape)
        R = reference_layer(rule, W, b, x_in, R.ravel())
    expected = R.reshape(x.shape[1:])

    result = LRP(composite=composite, layer_filter=amplitude_filter).attribute(model, x, seed)
    np.testing.assert_allclose(result.maps[0].numpy(), expected, rtol=1e-7, atol=1e-9 * np.abs(expected).max())
    plain = LRP(composite=composite).attribute(model, x, seed).maps
    assert not torch.allclose(plain, result.maps)  # the filter changed something


def test_inputs_known_non_negative_skip_the_scan_and_others_are_scanned():
    from SegExplainLib.engine.rules.z_plus import _signed_channels, known_non_negative

    x = torch.randn(1, 3, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    rectified = torch.relu(x)
    pooled = nn.functional.max_pool3d(rectified, 2)
    assert known_non_negative(rectified) and known_non_negative(pooled)
    mixed = torch.cat([rectified, x * 1.0], dim=1)  # the second half is signed: found by the scan
    assert not known_non_negative(mixed)
    assert _signed_channels(mixed) == slice(3, 6)
    shifted = rectified - 1.0  # not a rectifier: scanned
    assert not known_non_negative(shifted)
    assert _signed_channels(shifted) == slice(0, 3)
    assert _signed_channels(rectified) is None


@pytest.mark.parametrize("composite", composite_names())
def test_float32_on_onednn_agrees_with_float64(composite):
    """float32 runs the rules' convolutions on oneDNN directly; float64 runs them through torch."""
    from SegExplainLib.models.networks import tiny_unet

    torch.manual_seed(0)
    model = tiny_unet(activation="leaky_relu").eval().requires_grad_(False)
    x = torch.randn(1, 2, 8, 16, 16)
    seed = torch.zeros(1, 2, 8, 16, 16)
    seed[0, 1, 2:4, 3:6, 4:8] = 1.0
    single = LRP(composite=composite).attribute(model, x, seed).maps
    double = LRP(composite=composite).attribute(model.double(), x.double(), seed.double()).maps
    assert float(double.abs().max()) > 0
    torch.testing.assert_close(single.double(), double, rtol=0, atol=1e-4 * float(double.abs().max()))
