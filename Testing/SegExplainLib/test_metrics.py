"""Tests of the explanation metrics against set arithmetic, loops and curves computed by hand."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from SegExplainLib.engine.filters import AmplitudeFilter
from SegExplainLib.engine.metrics import (
    PerturbationCurve,
    alpha_sweep,
    binarize,
    ground_truth_inclusivity,
    inclusivity,
    input_inclusivity,
    perturbation_curve,
    relevance_mass_in_region,
    relevance_shares,
    shares_by_name,
)
from SegExplainLib.errors import SegExplainError

SHAPE = (3, 4, 5, 6)


def voxel_set(mask: np.ndarray) -> set[tuple[int, ...]]:
    return {index for index in np.ndindex(mask.shape) if mask[index]}


def reference_inclusivity(a: set, b: set, smoothing: float = 0.0) -> float:
    return len(a & b) / (len(b) + smoothing)


def errors(message: str):
    return pytest.raises(SegExplainError, match=re.escape(message))


# ---------------------------------------------------------------------------------------------------- inclusivity


@pytest.mark.parametrize("smoothing", [0.0, 1.5])
def test_inclusivity_is_set_arithmetic(rng, smoothing):
    a, b = rng.random((2, 5, 6, 7)) < 0.5
    expected = reference_inclusivity(voxel_set(a), voxel_set(b), smoothing)
    assert inclusivity(a, b, smoothing=smoothing) == pytest.approx(expected, rel=1e-12)
    from_torch = inclusivity(torch.from_numpy(a), torch.from_numpy(b), smoothing=smoothing)
    assert from_torch == pytest.approx(expected, rel=1e-12)


def test_inclusivity_of_subset_and_disjoint_and_empty_smoothed(rng):
    a = rng.random((4, 4, 4)) < 0.5
    assert inclusivity(a, a & (rng.random(a.shape) < 0.5)) == 1.0
    assert inclusivity(a, ~a) == 0.0
    assert inclusivity(a, np.zeros_like(a), smoothing=1.0) == 0.0


@pytest.mark.parametrize(
    ("a", "b", "options", "message"),
    [
        (np.ones(3, bool), np.zeros(3, bool), {}, "b is empty, so its inclusivity is undefined; pass smoothing > 0"),
        (np.ones((2, 3), bool), np.ones((3, 2), bool), {}, "a shape (2, 3) does not match b shape (3, 2)"),
        (np.ones(3), np.ones(3, bool), {}, "a must be a boolean mask (see binarize), got dtype float64"),
        (np.ones(3, bool), np.ones(3, np.uint8), {}, "b must be a boolean mask (see binarize), got dtype uint8"),
        (np.ones(3, bool), np.array(["x", "y", "z"]), {}, "b must hold real numbers or booleans, got dtype <U1"),
        (np.ones(3, bool), np.ones(3, bool), {"smoothing": -1}, "smoothing must be >= 0.0, got -1"),
        (np.ones(3, bool), np.ones(3, bool), {"smoothing": float("nan")}, "smoothing must be a finite number, got nan"),
    ],
)
def test_inclusivity_rejects_bad_input(a, b, options, message):
    with errors(message):
        inclusivity(a, b, **options)


@pytest.mark.parametrize("threshold", [0.0, 0.5, -1.0])
def test_binarize_is_strictly_above_threshold(rng, threshold):
    x = np.round(rng.normal(size=(3, 4, 5)), 1)
    expected = np.zeros(x.shape, bool)
    for index in np.ndindex(x.shape):
        expected[index] = x[index] > threshold
    np.testing.assert_array_equal(binarize(x, threshold=threshold), expected)
    np.testing.assert_array_equal(binarize(torch.from_numpy(x), threshold=threshold), expected)
    with errors("threshold must be a finite number, got 'high'"):
        binarize(x, threshold="high")


@pytest.mark.parametrize(("image_threshold", "relevance_threshold", "smoothing"), [(None, 0.0, 0.0), (0.7, 0.3, 2.0)])
def test_input_inclusivity_per_channel(rng, image_threshold, relevance_threshold, smoothing):
    relevance, image = rng.normal(size=SHAPE), rng.random(SHAPE)
    got = input_inclusivity(
        torch.from_numpy(relevance),
        image,
        relevance_threshold=relevance_threshold,
        image_threshold=image_threshold,
        smoothing=smoothing,
    )
    assert got.shape == (SHAPE[0],)
    for c in range(SHAPE[0]):
        threshold = image[c].sum() / image[c].size if image_threshold is None else image_threshold
        expected = reference_inclusivity(
            voxel_set(relevance[c] > relevance_threshold), voxel_set(image[c] > threshold), smoothing
        )
        assert got[c] == pytest.approx(expected, rel=1e-12)


def test_input_inclusivity_rejects_bad_input(rng):
    relevance, image = rng.normal(size=SHAPE), rng.random(SHAPE)
    constant = image.copy()
    constant[1] = 3.0
    with errors("the foreground of image channel 1 is empty, so its inclusivity is undefined; pass smoothing > 0"):
        input_inclusivity(relevance, constant)
    assert input_inclusivity(relevance, constant, smoothing=1.0)[1] == 0.0
    with errors("relevance shape (3, 4, 5, 6) does not match image shape (2, 4, 5, 6)"):
        input_inclusivity(relevance, image[:2])
    with errors("image must be shaped (C, D, H, W), got shape (4, 5, 6)"):
        input_inclusivity(relevance, image[0])
    with errors("image_threshold must be a finite number, got inf"):
        input_inclusivity(relevance, image, image_threshold=float("inf"))


def test_ground_truth_inclusivity_per_channel(rng):
    relevance = rng.normal(size=SHAPE)
    lesion = (rng.random(SHAPE[1:]) < 0.3).astype(np.uint8)  # a 0/1 label map as read from a NIfTI file
    got = ground_truth_inclusivity(relevance, lesion, relevance_threshold=0.2)
    expected = [reference_inclusivity(voxel_set(relevance[c] > 0.2), voxel_set(lesion)) for c in range(SHAPE[0])]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_ground_truth_inclusivity_rejects_bad_input(rng):
    relevance = rng.normal(size=SHAPE)
    with errors("ground_truth is empty, so its inclusivity is undefined; pass smoothing > 0"):
        ground_truth_inclusivity(relevance, np.zeros(SHAPE[1:], bool))
    with errors("ground_truth shape (4, 5) does not match the spatial shape (4, 5, 6) of the maps"):
        ground_truth_inclusivity(relevance, np.ones((4, 5), bool))
    with errors("relevance must be shaped (C, D, H, W), got shape (4, 5, 6)"):
        ground_truth_inclusivity(relevance[0], np.ones(SHAPE[1:], bool))


# ------------------------------------------------------------------------------------------ shares and region mass


def part(value: float, kind: str) -> float:
    return {"positive": max(value, 0.0), "negative": max(-value, 0.0), "absolute": abs(value)}[kind]


@pytest.mark.parametrize("kind", ["positive", "negative", "absolute"])
def test_relevance_shares_per_channel(rng, kind):
    maps = (rng.normal(size=SHAPE) * np.array([1.0, 3.0, 0.5]).reshape(-1, 1, 1, 1)).astype(np.float32)
    sums = [sum(part(float(v), kind) for v in maps[c].flat) for c in range(SHAPE[0])]
    got = relevance_shares(torch.from_numpy(maps), kind=kind)
    np.testing.assert_allclose(got, np.array(sums) / sum(sums), rtol=1e-9)
    assert got.sum() == pytest.approx(1.0, rel=1e-12)


def test_shares_by_name_holds_every_kind_per_sequence(rng):
    maps = rng.normal(size=SHAPE)
    names = ["T2", "ADC", "DWI"]
    shares = shares_by_name(maps, names)
    assert list(shares) == ["positive", "negative", "absolute"]
    for kind, by_name in shares.items():
        assert list(by_name) == names
        np.testing.assert_array_equal(list(by_name.values()), relevance_shares(maps, kind=kind))


def test_relevance_shares_without_relevance_are_zero(rng):
    assert np.array_equal(relevance_shares(np.zeros(SHAPE)), np.zeros(SHAPE[0]))
    only_negative = -np.abs(rng.normal(size=SHAPE))
    assert np.array_equal(relevance_shares(only_negative, kind="positive"), np.zeros(SHAPE[0]))
    with errors("kind must be one of 'positive', 'negative', 'absolute', got 'total'"):
        relevance_shares(only_negative, kind="total")


@pytest.mark.parametrize("kind", ["positive", "negative", "absolute"])
def test_relevance_mass_in_region(rng, kind):
    maps = rng.normal(size=SHAPE)
    region = rng.random(SHAPE[1:]) < 0.4
    inside = total = 0.0
    for index in np.ndindex(SHAPE):
        value = part(maps[index], kind)
        total += value
        inside += value if region[index[1:]] else 0.0
    got = relevance_mass_in_region(maps, region.astype(np.float32), kind=kind)
    assert got == pytest.approx(inside / total, rel=1e-12)


def test_relevance_mass_in_region_edge_cases(rng):
    region = rng.random(SHAPE[1:]) < 0.4
    assert relevance_mass_in_region(np.zeros(SHAPE), region) == 0.0
    assert relevance_mass_in_region(rng.normal(size=SHAPE), np.ones(SHAPE[1:], bool)) == pytest.approx(1.0)
    with errors("region shape (5, 4, 6) does not match the spatial shape (4, 5, 6) of the maps"):
        relevance_mass_in_region(np.zeros(SHAPE), np.ones((5, 4, 6), bool))
    with errors("kind must be one of 'positive', 'negative', 'absolute', got 'signed'"):
        relevance_mass_in_region(np.zeros(SHAPE), region, kind="signed")


# ------------------------------------------------------------------------------------------------------ alpha sweep


def filtered_value(f1: float, kind: str, low: float, high: float) -> float:
    """Tjoa's pass and clamp filters on one normalized value (the pair form of the clamp zeroes |f1| < a1)."""
    if abs(f1) < low:
        return 0.0
    if kind == "pass":
        return f1 if abs(f1) <= high else 0.0
    return math.copysign(high, f1) if abs(f1) > high else f1


def test_alpha_sweep_against_written_out_filters(rng):
    maps = rng.normal(size=(3, 3, 4, 5)) * np.array([2.0, 0.1, 0.0]).reshape(-1, 1, 1, 1)  # last channel all zero
    filters = [AmplitudeFilter.parse(text) for text in ["pass:0.2", "pass:0.2,0.6", "clamp:0.3", "clamp:0.1,0.5"]]
    got = alpha_sweep(maps, filters)
    assert got.shape == (len(filters), 3)
    for i, amplitude_filter in enumerate(filters):
        low, high = amplitude_filter.alpha
        for c in range(3):
            norm = max(abs(v) for v in maps[c].flat)
            values = [filtered_value(v / norm, amplitude_filter.kind, low, high) if norm else 0.0 for v in maps[c].flat]
            assert got[i, c] == pytest.approx(sum(values) / len(values), rel=1e-12, abs=1e-15)


def test_alpha_sweep_input_checks(rng):
    maps = rng.normal(size=SHAPE)
    assert alpha_sweep(maps, []).shape == (0, SHAPE[0])
    with errors("filters[1] must be an AmplitudeFilter, got str"):
        alpha_sweep(maps, [AmplitudeFilter.parse("pass:0.5"), "pass:0.4"])
    with errors("filters must be a sequence of AmplitudeFilter, got AmplitudeFilter"):
        alpha_sweep(maps, AmplitudeFilter.parse("pass:0.5"))


# --------------------------------------------------------------------------------------------- perturbation curves


def test_deletion_curve_computed_by_hand():
    image = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    maps = np.array([0.1, 0.4, 0.3, 0.2]).reshape(1, 1, 1, 4)
    # Deleting in relevance order removes 2, then 3, then 4, then 1 from the sum 10.
    curve = perturbation_curve(lambda x: x.sum(axis=(1, 2, 3, 4)), image, maps, steps=4)
    np.testing.assert_allclose(curve.scores, [10.0, 8.0, 5.0, 1.0, 0.0])
    np.testing.assert_allclose(curve.fractions, [0.0, 0.25, 0.5, 0.75, 1.0])
    assert curve.mode == "deletion"
    assert curve.area == pytest.approx(0.25 * (10 + 8 + 8 + 5 + 5 + 1 + 1 + 0) / 2)


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
@pytest.mark.parametrize("steps", [1, 5, 7])
def test_curve_of_linear_score_with_ties_and_channel_baseline(rng, mode, steps):
    shape = (2, 2, 3, 4)
    image, weights = rng.normal(size=shape), rng.normal(size=shape)
    maps = rng.integers(0, 4, size=shape).astype(np.float32)  # many ties: their flat order must decide
    baseline = image.min(axis=(1, 2, 3), keepdims=True)
    batches = []

    def score_fn(batch: np.ndarray) -> torch.Tensor:
        batches.append(len(batch))
        return torch.from_numpy((batch * weights).sum(axis=(1, 2, 3, 4)))

    curve = perturbation_curve(score_fn, torch.from_numpy(image), maps, mode=mode, steps=steps, baseline=baseline)

    flat_maps, flat_image = maps.ravel().tolist(), image.ravel()
    flat_weights, flat_baseline = weights.ravel(), np.broadcast_to(baseline, shape).ravel()
    ranked = sorted(range(len(flat_maps)), key=lambda j: -flat_maps[j])  # sorted() is stable
    n = len(ranked)
    expected = []
    for i in range(steps + 1):
        top = set(ranked[: i * n // steps])
        # Deletion puts the baseline on the top entries; insertion puts it everywhere else.
        perturbed = [flat_baseline[j] if (j in top) == (mode == "deletion") else flat_image[j] for j in range(n)]
        expected.append(sum(w * x for w, x in zip(flat_weights, perturbed)))
    np.testing.assert_allclose(curve.scores, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(curve.fractions, [i / steps for i in range(steps + 1)])
    assert batches == [min(4, steps + 1 - first) for first in range(0, steps + 1, 4)]
    trapezoids = sum((expected[i] + expected[i + 1]) / 2 / steps for i in range(steps))
    assert curve.area == pytest.approx(trapezoids, rel=1e-10, abs=1e-12)
    assert isinstance(curve, PerturbationCurve) and curve.mode == mode


def test_perturbation_curve_rejects_bad_input(rng):
    image = rng.normal(size=(2, 3, 3, 3))

    def score_fn(batch: np.ndarray) -> np.ndarray:
        return batch.sum(axis=(1, 2, 3, 4))

    cases = [
        ({"steps": 0}, "steps must be an integer >= 1, got 0"),
        ({"steps": 2.5}, "steps must be an integer >= 1, got 2.5"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"mode": "erase"}, "mode must be one of 'deletion', 'insertion', got 'erase'"),
        (
            {"baseline": np.zeros((3, 1, 1, 1))},
            "baseline shape (3, 1, 1, 1) does not broadcast to the image shape (2, 3, 3, 3)",
        ),
    ]
    for options, message in cases:
        with errors(message):
            perturbation_curve(score_fn, image, image, **options)
    with errors("maps shape (1, 3, 3, 3) does not match image shape (2, 3, 3, 3)"):
        perturbation_curve(score_fn, image, image[:1])
    with errors("score_fn must return shape (4,) for a batch of 4, got (4, 1)"):
        perturbation_curve(lambda batch: score_fn(batch)[:, None], image, image)
    with errors("score_fn must be callable, got str"):
        perturbation_curve("dice", image, image)
