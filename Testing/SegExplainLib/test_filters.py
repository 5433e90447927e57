"""Tests of the amplitude filters against loop-based references written from the definitions of Tjoa et al. 2020."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from SegExplainLib.engine.filters import AmplitudeFilter, clamp_filter, pass_filter
from SegExplainLib.errors import SegExplainError

ALPHAS = [0.4, (0.05, 0.4), (0.5, 1.0), 1.0]


def _bounds(alpha: float | tuple[float, float]) -> tuple[float, float]:
    return (0.0, alpha) if isinstance(alpha, float) else alpha


def reference_filter(r: np.ndarray, kind: str, alpha: float | tuple[float, float]) -> np.ndarray:
    """Filter a (C, D, H, W) map one value at a time: N * P[f / N] with N = max|f| of the value's channel."""
    low, high = _bounds(alpha)
    out = np.zeros(r.shape)
    for c in range(r.shape[0]):
        norm = max(abs(float(v)) for v in r[c].flat)
        if norm == 0:
            continue
        for index in np.ndindex(r.shape[1:]):
            f1 = float(r[c][index]) / norm
            if abs(f1) < low:
                value = 0.0
            elif kind == "pass":
                value = f1 if abs(f1) <= high else 0.0
            else:
                value = math.copysign(high, f1) if abs(f1) > high else f1
            out[c][index] = norm * value
    return out


def random_map(rng: np.random.Generator, shape: tuple[int, ...] = (3, 4, 5, 6)) -> np.ndarray:
    # Very different channel scales, as with relevance of a T1 and a FLAIR sequence, make the per-channel N matter.
    scales = np.array([1.0, 25.0, 0.01])[: shape[0]].reshape(-1, 1, 1, 1)
    return rng.normal(size=shape) * scales


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize(("kind", "function"), [("pass", pass_filter), ("clamp", clamp_filter)])
def test_filter_matches_loop_reference(rng, kind, function, alpha):
    r = random_map(rng)
    np.testing.assert_allclose(function(r, alpha), reference_filter(r, kind, alpha), rtol=1e-12, atol=0)


def test_filters_change_what_they_should(rng):
    r = random_map(rng)
    norm = np.abs(r).max(axis=(1, 2, 3), keepdims=True)
    kept = pass_filter(r, (0.05, 0.4))
    assert np.all((kept == 0) | ((np.abs(r) >= 0.05 * norm) & (np.abs(r) <= 0.4 * norm)))
    assert 0 < np.count_nonzero(kept) < r.size
    clamped = clamp_filter(r, 0.2)
    np.testing.assert_allclose(np.abs(clamped).max(axis=(1, 2, 3), keepdims=True), 0.2 * norm, rtol=1e-12)
    np.testing.assert_array_equal(clamp_filter(r, 1.0), r)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("kind", ["pass", "clamp"])
def test_factor_on_batched_maps_agrees_with_call_per_sample(rng, kind, alpha):
    amplitude_filter = AmplitudeFilter.create(kind, alpha)
    r = torch.from_numpy(np.stack([random_map(rng), 100 * random_map(rng)]))
    filtered = r * amplitude_filter.factor(r)
    for sample in range(2):
        torch.testing.assert_close(filtered[sample], amplitude_filter(r[sample]), rtol=0, atol=0)
        expected = reference_filter(r[sample].numpy(), kind, alpha)
        np.testing.assert_allclose(filtered[sample].numpy(), expected, rtol=1e-12)
    torch.testing.assert_close(amplitude_filter.factor(r, channel_dim=-4), amplitude_filter.factor(r), rtol=0, atol=0)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("kind", ["pass", "clamp"])
def test_factor_on_linear_activations_normalizes_each_sample(rng, kind, alpha):
    amplitude_filter = AmplitudeFilter.create(kind, alpha)
    r = torch.from_numpy(rng.normal(size=(3, 7)) * np.array([[1.0], [30.0], [0.2]]))
    # Each sample of a (B, F) activation is one "channel" whose features play the voxels.
    as_maps = r.reshape(3, 1, 1, 7)
    filtered = r * amplitude_filter.factor(r)
    torch.testing.assert_close(filtered, amplitude_filter(as_maps).reshape(3, 7), rtol=0, atol=0)
    expected = reference_filter(as_maps.numpy(), kind, alpha).reshape(3, 7)
    np.testing.assert_allclose(filtered.numpy(), expected, rtol=1e-12)


def test_factor_values_follow_their_formula():
    r = torch.tensor([[4.0, -2.0, 1.0, 0.1, 0.0]])
    norm = 4.0
    clamp = AmplitudeFilter.create("clamp", (0.05, 0.3)).factor(r)
    expected_clamp = [
        0.0 if abs(v) / norm < 0.05 else (1.0 if v == 0 else min(1.0, 0.3 * norm / abs(v))) for v in r[0].tolist()
    ]
    torch.testing.assert_close(clamp, torch.tensor([expected_clamp]))
    # With a1 == 0 a zero value keeps the factor 1, which leaves it at zero.
    torch.testing.assert_close(AmplitudeFilter.create("clamp", 0.3).factor(r)[0, -1], torch.tensor(1.0))
    passed = AmplitudeFilter.create("pass", (0.25, 0.5)).factor(r)
    torch.testing.assert_close(passed, torch.tensor([[float(0.25 <= abs(v) / norm <= 0.5) for v in r[0].tolist()]]))


@pytest.mark.parametrize("amplitude_filter", ["pass:0.4", "pass:0.05,0.4", "clamp:0.2", "clamp:0.1,0.5"])
def test_zero_channel_stays_zero_without_nan(rng, amplitude_filter):
    r = random_map(rng)
    r[1] = 0.0
    amplitude_filter = AmplitudeFilter.parse(amplitude_filter)
    out = amplitude_filter(r)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[1], 0.0)
    factor = amplitude_filter.factor(torch.from_numpy(r)[None])
    assert torch.isfinite(factor).all()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_in_numpy_out_with_same_dtype(rng, dtype):
    r = random_map(rng).astype(dtype)
    before = r.copy()
    out = clamp_filter(r, (0.1, 0.6))
    assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == r.shape
    np.testing.assert_array_equal(r, before)
    np.testing.assert_allclose(out, reference_filter(r.astype(np.float64), "clamp", (0.1, 0.6)), rtol=2e-3, atol=1e-3)


def test_numpy_view_with_negative_strides_is_filtered(rng):
    r = random_map(rng)[:, ::-1]
    np.testing.assert_allclose(pass_filter(r, 0.5), reference_filter(r, "pass", 0.5), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_torch_in_torch_out_with_same_dtype_and_gradient(rng, dtype):
    r = torch.from_numpy(random_map(rng)).to(dtype).requires_grad_()
    amplitude_filter = AmplitudeFilter.create("pass", (0.1, 0.7))
    out = amplitude_filter(r)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == r.shape
    out.sum().backward()
    factor = amplitude_filter.factor(r, channel_dim=0)
    assert not factor.requires_grad
    torch.testing.assert_close(r.grad, factor)


def test_text_dict_and_create_forms_round_trip():
    for text, kind, alpha in [
        ("pass:0.4", "pass", (0.0, 0.4)),
        ("clamp:0.2", "clamp", (0.0, 0.2)),
        ("pass:0.05,0.4", "pass", (0.05, 0.4)),
        ("clamp:1.0", "clamp", (0.0, 1.0)),
    ]:
        amplitude_filter = AmplitudeFilter.parse(text)
        assert amplitude_filter == AmplitudeFilter(kind, alpha)
        assert str(amplitude_filter) == text
        assert AmplitudeFilter.create(**json.loads(json.dumps(amplitude_filter.to_dict()))) == amplitude_filter
    assert AmplitudeFilter.parse(" clamp : 0.1 , 0.9 ") == AmplitudeFilter.create("clamp", [0.1, 0.9])
    assert AmplitudeFilter.create("pass", np.float32(0.5)).alpha == (0.0, 0.5)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: AmplitudeFilter.create("pass", -0.1), "alpha must lie in (0, 1], got -0.1"),
        (lambda: AmplitudeFilter.create("pass", 0), "alpha must lie in (0, 1], got 0"),
        (lambda: AmplitudeFilter.create("clamp", 1.5), "alpha must lie in (0, 1], got 1.5"),
        (lambda: AmplitudeFilter.create("pass", (0.4, 0.2)), "0 <= a1 < a2 <= 1, got (0.4, 0.2)"),
        (lambda: AmplitudeFilter.create("pass", (0.3, 0.3)), "0 <= a1 < a2 <= 1, got (0.3, 0.3)"),
        (lambda: AmplitudeFilter.create("pass", (-0.1, 0.5)), "0 <= a1 < a2 <= 1, got (-0.1, 0.5)"),
        (lambda: AmplitudeFilter.create("clamp", (0.1, 1.2)), "0 <= a1 < a2 <= 1, got (0.1, 1.2)"),
        (lambda: AmplitudeFilter.create("pass", (0.1, float("nan"))), "0 <= a1 < a2 <= 1, got (0.1, nan)"),
        (lambda: AmplitudeFilter.create("pass", (0.1, 0.2, 0.3)), "pair of numbers (a1, a2), got (0.1, 0.2, 0.3)"),
        (lambda: AmplitudeFilter.create("pass", True), "pair of numbers (a1, a2), got True"),
        (lambda: AmplitudeFilter("pass", 0.4), "pair of numbers (a1, a2), got 0.4"),
        (lambda: AmplitudeFilter.create("band", 0.4), "kind must be one of 'pass', 'clamp', got 'band'"),
        (lambda: AmplitudeFilter.parse("band:0.4"), "kind must be one of 'pass', 'clamp', got 'band'"),
        (lambda: AmplitudeFilter.parse("pass:1.5"), "alpha must lie in (0, 1], got 1.5"),
        (lambda: AmplitudeFilter.parse("pass:0.5,0.1"), "0 <= a1 < a2 <= 1, got (0.5, 0.1)"),
    ],
)
def test_bad_options_raise(make, message):
    with pytest.raises(SegExplainError, match=re.escape(message)):
        make()


@pytest.mark.parametrize("text", ["pass0.4", "pass:", "pass:a", "pass:0.1,", "pass:0.1,0.2,0.3", "pass:0.1:0.2", 0.4])
def test_malformed_text_raises(text):
    message = re.escape("amplitude filter must look like") + ".*" + re.escape(f"got {text!r}")
    with pytest.raises(SegExplainError, match=message):
        AmplitudeFilter.parse(text)


@pytest.mark.parametrize(
    ("r", "message"),
    [
        (np.zeros((4, 4, 4)), "r must be one map shaped (C, D, H, W), got shape (4, 4, 4)"),
        (torch.zeros(1, 2, 4, 4, 4), "r must be one map shaped (C, D, H, W), got shape (1, 2, 4, 4, 4)"),
        (np.zeros((2, 4, 4, 4), dtype=np.int64), "r must have dtype float16, float32 or float64, got int64"),
        ([[[[0.5]]]], "r must be a numpy array or a torch tensor, got list"),
    ],
)
def test_call_rejects_bad_maps(r, message):
    with pytest.raises(SegExplainError, match=re.escape(message)):
        AmplitudeFilter.create("pass", 0.4)(r)


@pytest.mark.parametrize(
    ("r", "channel_dim", "message"),
    [
        (torch.zeros(5), 0, "rank >= 2, got a torch.float32 tensor of rank 1"),
        (torch.zeros(2, 3, dtype=torch.int64), 1, "rank >= 2, got a torch.int64 tensor of rank 2"),
        (np.zeros((2, 3)), 1, "rank >= 2, got a ndarray"),
        (torch.zeros(1, 2, 3, 3, 3), 5, "channel_dim must be an int in [-5, 4] for r of rank 5, got 5"),
        (torch.zeros(1, 2, 3, 3, 3), -6, "channel_dim must be an int in [-5, 4] for r of rank 5, got -6"),
        (torch.zeros(2, 3), True, "channel_dim must be an int in [-2, 1] for r of rank 2, got True"),
    ],
)
def test_factor_rejects_bad_input(r, channel_dim, message):
    with pytest.raises(SegExplainError, match=re.escape(message)):
        AmplitudeFilter.create("clamp", 0.4).factor(r, channel_dim=channel_dim)
