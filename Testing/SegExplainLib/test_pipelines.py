"""The ways between an image grid and a network grid, against the explicit interpolation matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SegExplainLib.errors import SegExplainError
from SegExplainLib.models.pipelines import open_pipeline, region_to_grid, relevance_from_grid

ORIGINAL, NETWORK = (3, 4, 5), (5, 3, 7)


def _interpolation_matrix(source, target):
    """P with P @ x = x linearly interpolated from ``source`` onto ``target``, built weight by weight: target voxel j
    samples source coordinate (j + 0.5) * n / m - 0.5 (voxel centres over the same extent), clamped at the border."""
    weights = []
    for n, m in zip(source, target):
        axis = np.zeros((m, n))
        for j in range(m):
            x = min(max((j + 0.5) * n / m - 0.5, 0.0), n - 1)
            low = int(np.floor(x))
            high = min(low + 1, n - 1)
            axis[j, low] += 1 - (x - low)
            axis[j, high] += x - low
        weights.append(axis)
    return np.kron(np.kron(weights[0], weights[1]), weights[2])


def test_relevance_goes_back_by_the_transpose_of_interpolation():
    relevance = np.random.default_rng(0).normal(size=(2, *NETWORK))
    back = relevance_from_grid(relevance, ORIGINAL)
    matrix = _interpolation_matrix(ORIGINAL, NETWORK)
    expected = np.stack([(matrix.T @ channel.ravel()).reshape(ORIGINAL) for channel in relevance])
    np.testing.assert_allclose(back, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(back.sum(axis=(1, 2, 3)), relevance.sum(axis=(1, 2, 3)), rtol=1e-12)


def test_the_same_grid_is_a_copy():
    relevance = np.ones((1, *ORIGINAL), np.float32)
    back = relevance_from_grid(relevance, ORIGINAL)
    assert back is not relevance and back.dtype == np.float32
    np.testing.assert_array_equal(back, relevance)


def test_a_region_keeps_the_network_voxels_taking_half_their_value_from_it():
    region = np.zeros(ORIGINAL, bool)
    region[1:, 1:3, 2:] = True
    share = (_interpolation_matrix(ORIGINAL, NETWORK) @ region.ravel()).reshape(NETWORK)
    np.testing.assert_array_equal(region_to_grid(region, NETWORK), share >= 0.5)


def test_a_click_on_a_finer_grid_keeps_the_voxels_taking_most_from_it():
    click = np.zeros((9, 8, 10), bool)
    click[4, 5, 2] = True
    mapped = region_to_grid(click, (3, 4, 5))
    share = (_interpolation_matrix((9, 8, 10), (3, 4, 5)) @ click.ravel()).reshape((3, 4, 5))
    assert mapped.any() and share.max() < 0.5
    np.testing.assert_array_equal(mapped, share == share.max())


def test_unknown_pipeline_kinds_are_named():
    with pytest.raises(SegExplainError,
                       match="unknown pipeline kind 'onnx'; expected one of card, spec, nnunet, bundle"):
        open_pipeline("onnx", "model.onnx")


def test_interpolation_matrix_matches_torch():  # the reference itself, checked once
    x = np.random.default_rng(1).normal(size=ORIGINAL)
    interpolated = torch.nn.functional.interpolate(torch.as_tensor(x)[None, None], size=NETWORK, mode="trilinear",
                                                   align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose((_interpolation_matrix(ORIGINAL, NETWORK) @ x.ravel()).reshape(NETWORK), interpolated,
                               rtol=1e-10, atol=1e-12)
