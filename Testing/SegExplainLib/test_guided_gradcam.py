"""Guided Grad-CAM: a slow layer-by-layer reference, captum's GuidedGradCam as oracle, flags and options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from testnets import frozen
from torch import nn

import SegExplainLib as sx
from SegExplainLib.engine.gradients import GuidedGradCAM
from SegExplainLib.errors import SegExplainError

captum_attr = pytest.importorskip("captum.attr")


def small_net() -> nn.Module:
    """Layer "2" (strided conv) is at half resolution."""
    torch.manual_seed(0)
    return frozen(nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 5, 3, stride=2, padding=1),
                                nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest"),
                                nn.Conv3d(5, 2, 3, padding=1)).double())


def _data():
    x = torch.randn(2, 3, 4, 6, 8, dtype=torch.float64)
    seed = torch.zeros(2, 2, 4, 6, 8, dtype=torch.float64)
    seed[:, 1, 1:3, 2:5, 3:6] = 1.0
    return x, seed


def slow_guided_gradcam(model: nn.Sequential, x: torch.Tensor, seed: torch.Tensor, layer: int,
                        mode: str) -> torch.Tensor:
    """Layer by layer: the activations forward, then the signal backward, rectified (positive part, through
    units that were on) at each ReLU and the vector-Jacobian product elsewhere; Grad-CAM from the plain gradient
    at the layer's output, its channel means as weights."""
    activations = [x]
    for module in model:
        activations.append(module(activations[-1]))
    guided, plain = seed, seed
    cam = None
    for index in reversed(range(len(model))):
        if index == layer:  # plain gradient at the layer's output
            weights = plain.mean(dim=(2, 3, 4), keepdim=True)
            cam = F.relu((weights * activations[index + 1]).sum(1, keepdim=True))
        module, a = model[index], activations[index]
        _, plain = torch.autograd.functional.vjp(module, a, plain)
        if isinstance(module, nn.ReLU):
            guided = (a > 0) * guided.clamp(min=0)
        else:
            _, guided = torch.autograd.functional.vjp(module, a, guided)
    cam = F.interpolate(cam, size=tuple(x.shape[2:]), mode=mode, **({} if mode == "nearest" else
                                                                   {"align_corners": False}))
    return guided * cam


@pytest.mark.parametrize("upsample", ["trilinear", "nearest"])
@pytest.mark.parametrize("layer", [0, 2, 3])
def test_matches_the_slow_reference(layer, upsample):
    model, (x, seed) = small_net(), _data()
    out = GuidedGradCAM(layer=str(layer), upsample=upsample).attribute(model, x, seed)
    expected = slow_guided_gradcam(model, x, seed, layer, upsample)
    assert float(expected.abs().max()) > 0
    np.testing.assert_allclose(out.maps.numpy(), expected.numpy(), rtol=1e-10, atol=1e-13)
    assert out.delta is None


class Scored(nn.Module):
    def __init__(self, net: nn.Module, seed: torch.Tensor) -> None:
        super().__init__()
        self.net, self.seed = net, seed

    def forward(self, x):
        return (self.seed * self.net(x)).flatten(1).sum(1, keepdim=True)


@pytest.mark.parametrize("layer", [0, 2])
def test_matches_captum_guided_gradcam(layer):
    model, (x, seed) = small_net(), _data()
    scored = Scored(model, seed)
    ref = captum_attr.GuidedGradCam(scored, model[layer]).attribute(x.clone().requires_grad_(True), target=0)
    out = GuidedGradCAM(layer=str(layer), upsample="nearest").attribute(model, x, seed)
    np.testing.assert_allclose(out.maps.numpy(), ref.detach().numpy(), rtol=1e-10, atol=1e-13)


def test_not_linear_not_seed_local_and_the_record_rebuilds_it():
    assert not GuidedGradCAM.linear_in_seed and not GuidedGradCAM.seed_local and GuidedGradCAM.walks_modules
    model = small_net().float()
    image = np.random.default_rng(0).normal(size=(3, 4, 6, 8)).astype(np.float32)
    target = sx.BoxTarget((1, 2, 3), (3, 5, 6), class_index=1)
    result = sx.explain(model, image, target, "guided_gradcam", layer="2")
    record = json.loads(result.to_json())
    assert record["options"] == {"layer": "2", "upsample": "trilinear"}
    np.testing.assert_array_equal(sx.explain(model, image, target, "guided_gradcam", **record["options"]).maps,
                                  result.maps)


@pytest.mark.parametrize("kwargs, message", [
    ({"layer": ""}, "layer must be a non-empty module name"),
    ({"layer": "2", "upsample": "cubic"}, "upsample 'cubic' is not valid"),
])
def test_options_are_checked_at_once(kwargs, message):
    with pytest.raises(SegExplainError, match=message):
        GuidedGradCAM(**kwargs)


def test_an_unknown_layer_is_named():
    model, (x, seed) = small_net(), _data()
    with pytest.raises(SegExplainError, match="layer 'decoder' is not a module of the model"):
        GuidedGradCAM(layer="decoder").attribute(model, x, seed)
