"""Sliding-window inference as a module: the blend is right and explanations pass through it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import SegExplainLib as sx
from SegExplainLib.errors import SegExplainError
from SegExplainLib.sliding import SlidingWindow


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv3d(2, 3, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv3d(3, 2, 1, bias=False)).double().eval()


def test_one_patch_covering_the_volume_is_the_network_itself():
    net = small_net()
    x = torch.randn(1, 2, 6, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(SlidingWindow(net, (8, 8, 8))(x), net(x))


def test_overlapping_patches_blend_like_a_loop():
    net = small_net()
    x = torch.randn(1, 2, 6, 10, 9, dtype=torch.float64)
    window = SlidingWindow(net, (4, 6, 5), overlap=0.5)
    # reference: every patch start, the same Gaussian weight, accumulated voxel by voxel
    weight = window._weight((4, 6, 5), x)
    starts = [sorted(set(list(range(0, s - p, max(1, p // 2))) + [s - p])) for s, p in zip((6, 10, 9), (4, 6, 5))]
    out = torch.zeros(1, 2, 6, 10, 9, dtype=torch.float64)
    total = torch.zeros(6, 10, 9, dtype=torch.float64)
    with torch.no_grad():
        for d, h, w in itertools.product(*starts):
            patch = net(x[:, :, d:d + 4, h:h + 6, w:w + 5])
            out[:, :, d:d + 4, h:h + 6, w:w + 5] += patch * weight
            total[d:d + 4, h:h + 6, w:w + 5] += weight
        torch.testing.assert_close(window(x), out / total)


def test_lrp_through_the_window_conserves_and_explain_runs():
    net = small_net()
    with torch.no_grad():
        net[2].weight.abs_()
    x = torch.rand(1, 2, 6, 10, 9, dtype=torch.float64)
    window = SlidingWindow(net, (4, 6, 5), overlap=0.5)
    seed = torch.zeros(1, 2, 6, 10, 9, dtype=torch.float64)
    seed[0, 1, 2:4, 3:7, 3:6] = 1.0
    out = sx.LRP(composite="zero").attribute(window, x, seed)
    assert abs(float(out.delta[0])) < 1e-9 * abs(float(out.expected[0]))
    # the same map as the gradient x input of the blended network (LRP-0 on a bias-free ReLU net)
    xx = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((window(xx) * seed).sum(), xx)
    torch.testing.assert_close(out.maps, grad * x)
    result = sx.explain(window, x[0].numpy(), sx.PredictedRegion(class_index=1), "lrp", composite="epsilon_plus")
    assert result.maps.shape == (2, 6, 10, 9) and np.isfinite(result.maps).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"patch_size": (4, 4)}, "three positive integers"),
    ({"patch_size": (4, 0, 4)}, "three positive integers"),
    ({"patch_size": (4, 4, 4), "overlap": 1.0}, r"overlap must lie in \[0, 1\)"),
    ({"patch_size": (4, 4, 4), "sigma_scale": 0}, "sigma_scale must be positive"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(SegExplainError, match=message):
        SlidingWindow(small_net(), **kwargs)
