"""Layer-wise attribution (Chatterjee et al.'s per-layer figure): relevance / GBP signal at named layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import SegExplainLib as sx
from SegExplainLib.engine.api import explain_layers
from SegExplainLib.errors import SegExplainError


def positive_chain() -> nn.Sequential:
    # bias-free with non-negative weights after the first layer: LRP-0 conserves relevance layer by layer
    model = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool3d(2),
                          nn.Conv3d(3, 3, 3, padding=1, bias=False), nn.ReLU(),
                          nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(3, 2, 1, bias=False)).double()
    with torch.no_grad():
        model[3].weight.abs_()
        model[6].weight.abs_()
    return model


def test_relevance_is_conserved_at_every_layer():
    model = positive_chain()
    x = torch.rand(1, 2, 4, 6, 6, dtype=torch.float64)
    seed = torch.zeros(1, 2, 4, 6, 6, dtype=torch.float64)
    seed[0, 1, 1:3, 2:4, 2:4] = 1.0
    lrp = sx.LRP(composite="zero")
    signals = lrp.attribute_layers(model, x, seed, ["1", "4", "5"])
    with torch.no_grad():
        total = float((seed * model(x)).sum())
    for name, relevance in signals.items():
        assert float(relevance.sum()) == pytest.approx(total, rel=1e-9), name
    assert signals["1"].shape == (1, 3, 4, 6, 6) and signals["4"].shape == (1, 3, 2, 3, 3)


def test_guided_backprop_at_a_layer_is_the_input_signal_of_the_rest_of_the_network():
    model = positive_chain()
    x = torch.randn(1, 2, 4, 6, 6, dtype=torch.float64)
    seed = torch.randn(1, 2, 4, 6, 6, dtype=torch.float64)
    at_layer = sx.GuidedBackprop().attribute_layers(model, x, seed, ["2"])["2"]
    # the tail of the network, explained at its own input, gives the same guided signal
    head, tail = model[:3], model[3:]
    expected = sx.GuidedBackprop().attribute(tail, head(x).detach(), seed).maps
    torch.testing.assert_close(at_layer, expected)


def test_explain_layers_returns_maps_on_the_image_grid():
    model = sx.tiny_unet()
    image = np.random.default_rng(0).normal(size=(2, 6, 8, 8)).astype(np.float32)
    target = sx.PredictedRegion(class_index=1)
    maps = explain_layers(model, image, target, ["encoder.0", "bottleneck", "decoder.0"], "lrp")
    assert list(maps) == ["encoder.0", "bottleneck", "decoder.0"]
    for name, layer_map in maps.items():
        assert layer_map.shape == (6, 8, 8), name
        assert np.isfinite(layer_map).all()
    gbp = explain_layers(model, image, target, ["bottleneck"], "guided_backprop")
    assert gbp["bottleneck"].shape == (6, 8, 8)


def test_layer_attribution_errors():
    model = sx.tiny_unet().eval()  # eval: its BatchNorm layers are merged into the convolutions
    image = np.zeros((2, 6, 8, 8), np.float32)
    target = sx.ClassChannel(class_index=1)
    with pytest.raises(SegExplainError, match=r"unknown layer name\(s\) \['nope'\]"):
        explain_layers(model, image, target, ["nope"])
    with pytest.raises(SegExplainError, match="needs 'lrp', 'guided_backprop' or 'deconvolution'"):
        explain_layers(model, image, target, ["bottleneck"], "integrated_gradients")
    with pytest.raises(SegExplainError, match="did not run in the forward pass"):
        explain_layers(model, image, target, ["encoder.0.1"])  # a BatchNorm merged into its convolution
