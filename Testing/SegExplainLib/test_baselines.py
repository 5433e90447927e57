"""Baselines: values, Gaussian blur against scipy, specs and errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from SegExplainLib.engine.baselines import (
    Baseline,
    BlurredBaseline,
    ChannelMinimumBaseline,
    ConstantBaseline,
    ZeroBaseline,
    make_baseline,
)
from SegExplainLib.errors import SegExplainError


@pytest.fixture
def volume() -> torch.Tensor:
    return torch.randn(2, 3, 9, 10, 11, dtype=torch.float64)


def test_zero_and_constant(volume):
    assert torch.equal(ZeroBaseline()(volume), torch.zeros_like(volume))
    out = ConstantBaseline(-1.5)(volume)
    assert out.shape == volume.shape and out.dtype == volume.dtype
    assert torch.all(out == -1.5)


def test_channel_minimum_is_per_sample_per_channel(volume):
    out = ChannelMinimumBaseline()(volume)
    assert out.shape == volume.shape
    for b in range(2):
        for c in range(3):
            assert torch.all(out[b, c] == volume[b, c].min())


@pytest.mark.parametrize("sigma", [0.4, 0.7, 1.0, 1.5])
def test_blur_matches_scipy_gaussian_filter(volume, sigma):
    out = BlurredBaseline(sigma)(volume)
    # torch's "reflect" padding (d c b | a b c d) is scipy's "mirror"; both truncate at int(3 sigma + 0.5).
    for b in range(2):
        for c in range(3):
            ref = ndimage.gaussian_filter(volume[b, c].numpy(), sigma=sigma, mode="mirror", truncate=3.0)
            np.testing.assert_allclose(out[b, c].numpy(), ref, rtol=0, atol=1e-12)


def test_blur_keeps_constants_and_handles_short_axes():
    x = torch.full((1, 2, 1, 2, 30), 3.25, dtype=torch.float64)  # axis of size 1 and 2, sigma 5 -> radius 15
    out = BlurredBaseline(5.0)(x)
    assert torch.allclose(out, x, atol=1e-12)
    y = torch.randn(1, 1, 1, 3, 3, dtype=torch.float64)
    out = BlurredBaseline(5.0)(y)
    assert out.shape == y.shape
    # Blur preserves the mean only approximately at borders, but stays within the input range.
    assert out.min() >= y.min() - 1e-12 and out.max() <= y.max() + 1e-12


def test_blur_float32_and_no_grad(volume):
    x = volume.float().requires_grad_(True)
    out = BlurredBaseline(2.0)(x)
    assert out.dtype == torch.float32 and not out.requires_grad


def test_frozen_and_hashable():
    b = ConstantBaseline(2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.value = 3.0  # type: ignore[misc]
    assert hash(b) == hash(ConstantBaseline(2.0)) and b == ConstantBaseline(2)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("zero", ZeroBaseline()),
        ("Zeros", ZeroBaseline()),
        ("constant:-2.5", ConstantBaseline(-2.5)),
        ("min", ChannelMinimumBaseline()),
        ("blur", BlurredBaseline(5.0)),
        ("blur:2", BlurredBaseline(2.0)),
        (0.5, ConstantBaseline(0.5)),
        (3, ConstantBaseline(3.0)),
    ],
)
def test_make_baseline_specs(spec, expected):
    assert make_baseline(spec) == expected


@pytest.mark.parametrize(
    "baseline", [ZeroBaseline(), ConstantBaseline(1.25), ChannelMinimumBaseline(), BlurredBaseline(3.0)]
)
def test_to_dict_round_trip(baseline):
    d = baseline.to_dict()
    json.dumps(d)
    assert make_baseline(d) == baseline
    assert make_baseline(baseline) is baseline
    assert isinstance(baseline, Baseline)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("foo", r"baseline spec 'foo' is not valid; expected 'zero'"),
        ("constant", r"baseline spec 'constant' is not valid"),
        ("constant:abc", r"baseline spec 'constant:abc' has no valid number"),
        ("blur:-1", r"sigma_voxels must be a finite number > 0, got -1.0"),
        ("zero:1", r"baseline spec 'zero:1' is not valid"),
        (None, r"baseline spec None of type NoneType is not valid"),
        (True, r"baseline spec True of type bool is not valid"),
        ({"type": "nope"}, r"baseline dict .* is not valid"),
    ],
)
def test_make_baseline_errors(spec, match):
    with pytest.raises(SegExplainError, match=match):
        make_baseline(spec)


def test_constructor_errors():
    with pytest.raises(SegExplainError, match=r"sigma_voxels must be a finite number > 0, got 0"):
        BlurredBaseline(0)
    with pytest.raises(SegExplainError, match=r"sigma_voxels must be a finite number > 0, got inf"):
        BlurredBaseline(float("inf"))
    with pytest.raises(SegExplainError, match=r"ConstantBaseline value must be a finite number, got nan"):
        ConstantBaseline(float("nan"))
    with pytest.raises(SegExplainError, match=r"ConstantBaseline value must be a finite number, got '1'"):
        ConstantBaseline("1")  # type: ignore[arg-type]


def test_input_errors():
    with pytest.raises(SegExplainError, match=r"baseline input must be a torch.Tensor, got list"):
        ZeroBaseline()([1.0])  # type: ignore[arg-type]
    with pytest.raises(SegExplainError, match=r"baseline input must have shape \(B, C, \*spatial\), got shape \(3,\)"):
        ZeroBaseline()(torch.zeros(3))
    with pytest.raises(SegExplainError, match=r"floating point tensor, got dtype torch.int64"):
        ChannelMinimumBaseline()(torch.zeros(1, 1, 2, 2, 2, dtype=torch.long))
    with pytest.raises(SegExplainError, match=r"BlurredBaseline supports 1 to 3 spatial dimensions"):
        BlurredBaseline(1.0)(torch.zeros(1, 1, 2, 2, 2, 2))
