"""Occlusion: captum as oracle, the definition on a linear model, forward-only passes, errors."""

from __future__ import annotations

import json

import pytest
import torch
from testnets import frozen
from torch import nn

from SegExplainLib.engine.baselines import ChannelMinimumBaseline, ConstantBaseline
from SegExplainLib.engine.gradients import Occlusion
from SegExplainLib.errors import SegExplainError

captum_attr = pytest.importorskip("captum.attr")


def relu_net(c_in: int = 3, k: int = 2) -> nn.Module:
    return frozen(
        nn.Sequential(nn.Conv3d(c_in, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, k, 3, padding=1)).double()
    )


def _captum_forward(model, seed):
    def forward(z: torch.Tensor) -> torch.Tensor:
        rows = seed.repeat((z.shape[0] // seed.shape[0], 1, 1, 1, 1))
        return (rows * model(z)).flatten(1).sum(1)

    return forward


@pytest.mark.parametrize(
    "window, stride, per_channel",
    [
        ((2, 2, 2), (2, 2, 2), True),  # tiles exactly
        ((3, 2, 2), (2, 1, 2), True),  # overlapping windows, last ones cut at the border
        ((2, 3, 2), (1, 2, 2), False),  # all channels at once
    ],
)
def test_matches_captum(window, stride, per_channel):
    model = relu_net()
    x = torch.randn(2, 3, 5, 4, 5, dtype=torch.float64)
    seed = torch.randn(2, 2, 5, 4, 5, dtype=torch.float64)
    c = 1 if per_channel else 3
    # captum builds its window masks and weights in the default dtype: run it in float64. It still divides
    # `single_attrib.float() / weight` (feature_ablation.py), i.e. rounds the summed drops to float32, hence the
    # float32-level tolerance here; the exact checks are the two tests below.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref = captum_attr.Occlusion(_captum_forward(model, seed)).attribute(
            x, sliding_window_shapes=(c,) + window, strides=(1,) + stride, baselines=0.5, perturbations_per_eval=16
        )
    finally:
        torch.set_default_dtype(old)
    assert ref.dtype == torch.float64
    out = Occlusion(window=window, stride=stride, baseline=0.5, per_channel=per_channel, internal_batch_size=12)
    maps = out.attribute(model, x, seed).maps
    scale = ref.abs().max().item()
    assert torch.allclose(maps, ref, rtol=1e-6, atol=1e-7 * scale)
    assert not torch.allclose(maps, ref.flip(-1), rtol=1e-3)


def test_single_voxel_window_on_voxel_linear_model_is_exact():
    w = torch.randn(2, 3, 3, 4, 5, dtype=torch.float64)

    class VoxelLinear(nn.Module):
        def forward(self, x):
            return torch.einsum("kcdhw,bcdhw->bkdhw", w, x) + 1.0

    x = torch.randn(2, 3, 3, 4, 5, dtype=torch.float64)
    seed = torch.randn(2, 2, 3, 4, 5, dtype=torch.float64)
    x0 = ChannelMinimumBaseline()(x)
    maps = Occlusion(window=1, baseline="min").attribute(VoxelLinear(), x, seed).maps
    expected = (x - x0) * torch.einsum("kcdhw,bkdhw->bcdhw", w, seed)
    assert torch.allclose(maps, expected, rtol=0, atol=1e-12)


def test_mean_over_covering_windows_by_brute_force():
    model = relu_net(c_in=1, k=1)
    x = torch.randn(1, 1, 3, 3, 4, dtype=torch.float64)
    seed = torch.randn(1, 1, 3, 3, 4, dtype=torch.float64)
    window, stride = (2, 2, 3), (1, 1, 2)

    def score(z):
        with torch.no_grad():
            return (seed * model(z)).sum().item()

    total = torch.zeros_like(x)
    count = torch.zeros_like(x)
    for d in (0, 1):
        for h in (0, 1):
            for w0 in (0, 2):  # captum's convention: 0, 2 (the second one cut to 2 voxels)
                z = x.clone()
                z[..., d : d + 2, h : h + 2, w0 : w0 + 3] = -1.0
                total[..., d : d + 2, h : h + 2, w0 : w0 + 3] += score(x) - score(z)
                count[..., d : d + 2, h : h + 2, w0 : w0 + 3] += 1
    maps = Occlusion(window=window, stride=stride, baseline=-1.0).attribute(model, x, seed).maps
    assert torch.allclose(maps, total / count, rtol=1e-12, atol=1e-14)


def test_forward_passes_only_without_grad():
    calls = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = relu_net()

        def forward(self, z):
            calls.append((torch.is_grad_enabled(), z.shape[0]))
            return self.net(z)

    x = torch.randn(1, 3, 4, 4, 4, dtype=torch.float64)
    seed = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    Occlusion(window=2, internal_batch_size=6).attribute(Spy(), x, seed)
    assert calls and not any(grad for grad, _ in calls)
    # 1 reference pass + 3 channels * 8 windows in balanced chunks of at most 6.
    assert sum(n for _, n in calls) == 1 + 24 and max(n for _, n in calls[1:]) <= 6


def test_batch_and_internal_batch_size_invariance():
    model = relu_net()
    x = torch.randn(3, 3, 4, 4, 4, dtype=torch.float64)
    seed = torch.randn(3, 2, 4, 4, 4, dtype=torch.float64)
    full = Occlusion(window=2, internal_batch_size=7).attribute(model, x, seed).maps
    assert torch.allclose(Occlusion(window=2, internal_batch_size=1).attribute(model, x, seed).maps, full,
                          rtol=1e-12, atol=1e-14)
    for b in range(3):
        single = Occlusion(window=2).attribute(model, x[b : b + 1], seed[b : b + 1]).maps
        assert torch.allclose(single, full[b : b + 1], rtol=1e-12, atol=1e-14)


def test_all_channels_repeat_the_value_and_large_windows_are_clipped():
    model = relu_net()
    x = torch.randn(1, 3, 2, 3, 4, dtype=torch.float64)
    seed = torch.randn(1, 2, 2, 3, 4, dtype=torch.float64)
    maps = Occlusion(window=2, per_channel=False).attribute(model, x, seed).maps
    assert torch.equal(maps[:, 0], maps[:, 1]) and torch.equal(maps[:, 0], maps[:, 2])
    # A window larger than the volume occludes everything: every voxel gets score(x) - score(baseline).
    whole = Occlusion(window=10, per_channel=False).attribute(model, x, seed).maps
    with torch.no_grad():
        drop = (seed * model(x)).sum() - (seed * model(torch.zeros_like(x))).sum()
    assert torch.allclose(whole, drop.expand_as(whole), rtol=1e-12)


def test_options_and_baselines():
    occ = Occlusion(window=(2, 3, 4), stride=(1, 2, 3), baseline="min", per_channel=False, internal_batch_size=5)
    assert json.loads(json.dumps(occ.options())) == {
        "window": [2, 3, 4],
        "stride": [1, 2, 3],
        "baseline": {"type": "min"},
        "per_channel": False,
        "internal_batch_size": 5,
        "memory_budget_bytes": None,
    }
    assert Occlusion().options()["window"] == [4, 4, 4] and Occlusion().options()["stride"] == [4, 4, 4]
    assert Occlusion(baseline=ConstantBaseline(2.0)).baseline == ConstantBaseline(2.0)
    assert Occlusion.name == "occlusion" and Occlusion.linear_in_seed


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"window": 0}, r"window must be >= 1 along every axis, got 0"),
        ({"window": (2, 2)}, r"window must be an integer or 3 integers \(D, H, W\), got \(2, 2\)"),
        ({"window": 2.5}, r"window must be an integer or 3 integers \(D, H, W\), got 2.5"),
        ({"window": 2, "stride": 3}, r"stride \(3, 3, 3\) must not exceed window \(2, 2, 2\)"),
        ({"stride": (1, 0, 1)}, r"stride must be >= 1 along every axis, got \(1, 0, 1\)"),
        ({"per_channel": "yes"}, r"per_channel must be a bool, got 'yes'"),
        ({"baseline": "foo"}, r"baseline: baseline spec 'foo' is not valid"),
        ({"internal_batch_size": 0}, r"internal_batch_size must be None or an integer >= 1, got 0"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(SegExplainError, match=match):
        Occlusion(**kwargs)
