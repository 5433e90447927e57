"""Score-CAM in 3D: a second implementation channel by channel, the weights, a known answer, and the layer's errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from testnets import frozen
from torch import nn

import SegExplainLib as sx
from SegExplainLib.engine.perturbation import ScoreCAM
from SegExplainLib.errors import SegExplainError


def net() -> nn.Module:
    torch.manual_seed(0)
    return frozen(nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
                                nn.Conv3d(3, 2, 3, padding=1), nn.Upsample(scale_factor=2)).double())


def reference_cam(model, x, seed, weights):
    """Score-CAM written out for one batch element and one activation channel at a time."""
    maps = []
    for b in range(x.shape[0]):
        act = model[:3](x[b:b + 1])[0]  # the output of layer "2" (the max pool)
        with torch.no_grad():
            base = float((seed[b] * model(torch.zeros_like(x[b:b + 1]))[0]).sum())
            increases = []
            for k in range(act.shape[0]):
                up = F.interpolate(act[None, k:k + 1], size=x.shape[2:], mode="trilinear", align_corners=False)[0, 0]
                mask = (up - up.min()) / (up.max() - up.min()) if float(up.max() - up.min()) > 0 else up * 0
                increases.append(float((seed[b] * model((x[b] * mask)[None])[0]).sum()) - base)
        w = torch.tensor(increases, dtype=x.dtype)
        w = torch.softmax(w, 0) if weights == "softmax" else w
        cam = torch.relu((w[:, None, None, None] * act).sum(0))
        maps.append(F.interpolate(cam[None, None], size=x.shape[2:], mode="trilinear", align_corners=False)[0, 0])
    return torch.stack(maps)


@pytest.mark.parametrize("weights", ["increase", "softmax"])
def test_matches_a_loop_over_the_channels(weights):
    model = net()
    x = torch.randn(2, 2, 4, 6, 6, dtype=torch.float64)
    seed = torch.rand(2, 2, 4, 6, 6, dtype=torch.float64) * 0.1
    out = ScoreCAM(layer="2", weights=weights, internal_batch_size=3).attribute(model, x, seed)
    with torch.no_grad():
        expected = reference_cam(model, x, seed, weights)
    np.testing.assert_allclose(out.maps.sum(1).numpy(), expected.numpy(), rtol=1e-10, atol=1e-12)
    assert torch.equal(out.maps[:, 0], out.maps[:, 1]) and out.extras["forward_passes"] == 2 * (3 + 2)
    assert float(expected.abs().max()) > 0


def test_one_channel_layer_gives_its_activation_times_its_increase():
    """With a single channel the map is relu(w A), w the score increase of the input masked by A."""
    conv = nn.Conv3d(1, 1, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(2.0)
    model = frozen(nn.Sequential(conv, nn.ReLU()))
    x = torch.rand(1, 1, 3, 4, 4, dtype=torch.float64) + 0.5
    seed = torch.ones(1, 1, 3, 4, 4, dtype=torch.float64)
    act = 2 * x[0, 0]
    mask = (act - act.min()) / (act.max() - act.min())
    increase = float((2 * x[0, 0] * mask).sum())
    out = ScoreCAM(layer="1").attribute(model, x, seed)
    np.testing.assert_allclose(out.maps[0, 0].numpy(), (increase * act).numpy(), rtol=1e-10)


def test_runs_through_explain_and_refuses_torchscript():
    """Score-CAM reads a layer, which TorchScript hides; the forward-only sequence_shapley runs on the same file."""
    model = sx.tiny_unet().eval()
    image = np.random.default_rng(0).normal(size=(2, 6, 8, 8)).astype(np.float32)
    target = sx.BoxTarget((1, 2, 2), (3, 5, 5), class_index=1)
    result = sx.explain(model, image, target, "score_cam", layer="decoder.0")
    assert result.maps.shape == (2, 6, 8, 8) and float(result.maps.min()) >= 0
    traced = torch.jit.trace(net().float(), torch.zeros(1, 2, 4, 6, 6))
    volume = np.random.default_rng(1).normal(size=(2, 4, 6, 6)).astype(np.float32)
    with pytest.raises(SegExplainError, match="score_cam"):
        sx.explain(traced, volume, target, "score_cam", layer="2")
    shapley = sx.explain(traced, volume, target, "sequence_shapley")
    np.testing.assert_allclose(shapley.maps, sx.explain(net().float(), volume, target, "sequence_shapley").maps,
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("options, message", [
    ({"layer": ""}, "layer must be a non-empty module name"),
    ({"layer": "2", "weights": "mean"}, "weights must be one of 'increase', 'softmax', got 'mean'"),
    ({"layer": "2", "baseline": "none"}, "baseline: baseline spec 'none'"),
])
def test_bad_options(options, message):
    with pytest.raises(SegExplainError, match=message):
        ScoreCAM(**options)


def test_a_missing_layer_or_one_without_a_volume_is_named():
    x, seed = torch.randn(1, 2, 4, 6, 6, dtype=torch.float64), torch.ones(1, 2, 4, 6, 6, dtype=torch.float64)
    with pytest.raises(SegExplainError, match="layer 'bottleneck' is not a module of the model"):
        ScoreCAM(layer="bottleneck").attribute(net(), x, seed)

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(2, 2, 1).double()
            self.flat = nn.Flatten()

        def forward(self, z):
            self.flat(z)
            return self.conv(z)

    with pytest.raises(SegExplainError, match=r"layer 'flat' output must be a 5D tensor"):
        ScoreCAM(layer="flat").attribute(frozen(Flat()), x, seed)
