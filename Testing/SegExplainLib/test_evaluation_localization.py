"""The structural receptive field against networks whose field is known, and the leakage shares against a loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from testnets import frozen
from torch import nn

from SegExplainLib.engine.evaluation import localization

SHAPE = (1, 2, 8, 10, 10)


def field_of(model: nn.Module, voxel: tuple[int, int, int]) -> np.ndarray:
    x = torch.zeros(SHAPE, dtype=torch.float64)
    seed = torch.zeros((1, 1, *SHAPE[2:]), dtype=torch.float64)
    seed[(0, 0, *voxel)] = 1.0
    return localization.receptive_field(model, x, seed)


def cube(centre: tuple[int, int, int], half: int, step: int = 1) -> np.ndarray:
    mask = np.zeros(SHAPE[1:], bool)
    d, h, w = centre
    mask[:, d - half:d + half + 1:step, h - half:h + half + 1:step, w - half:w + half + 1:step] = True
    return mask


def test_two_3x3x3_convolutions_see_a_5x5x5_cube_whatever_the_weights_signs():
    torch.manual_seed(3)
    model = frozen(nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv3d(3, 1, 3, padding=1)).double())
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # dead ReLUs in the trained network: the structure still reaches the cube
    np.testing.assert_array_equal(field_of(model, (4, 5, 5)), cube((4, 5, 5), 2))


def test_a_dilated_convolution_sees_its_taps_only():
    model = frozen(nn.Sequential(nn.Conv3d(2, 1, 3, padding=2, dilation=2)).double())
    np.testing.assert_array_equal(field_of(model, (4, 5, 5)), cube((4, 5, 5), 2, step=2))


def test_max_pooling_counts_its_whole_window_and_norms_do_not_spread_the_field():
    """An all-ones input makes every max-pooling window a tie, whose gradient goes to one voxel: averaging instead
    finds the whole 2 x 2 x 2 window; instance normalisation's global statistics are left out."""
    model = frozen(nn.Sequential(nn.InstanceNorm3d(2, affine=True), nn.MaxPool3d(2),
                                 nn.Upsample(scale_factor=2), nn.Conv3d(2, 1, 1)).double())
    expected = np.zeros(SHAPE[1:], bool)
    expected[:, 2:4, 4:6, 4:6] = True
    np.testing.assert_array_equal(field_of(model, (3, 5, 4)), expected)


def test_a_sequence_with_zero_weights_is_outside_the_field():
    model = frozen(nn.Sequential(nn.Conv3d(2, 1, 1)).double())
    with torch.no_grad():
        model[0].weight[:, 1] = 0.0
    found = field_of(model, (4, 5, 5))
    assert found[0].sum() == 1 and not found[1].any()


def test_the_user_model_is_left_as_it_was():
    model = frozen(nn.Sequential(nn.Conv3d(2, 1, 3, padding=1), nn.MaxPool3d(1)).double())
    before = [p.clone() for p in model.parameters()]
    field_of(model, (4, 5, 5))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not model[1]._forward_hooks


def test_leakage_is_the_positive_relevance_outside_over_all_positive_relevance(rng):
    maps = rng.normal(size=(2, 3, 4, 5))
    inside = rng.random((3, 4, 5)) > 0.5
    outside = sum(max(v, 0.0) for (c, d, h, w), v in np.ndenumerate(maps) if not inside[d, h, w])
    total = sum(max(v, 0.0) for v in maps.ravel())
    assert localization.leakage(maps, inside) == pytest.approx(outside / total, rel=1e-12)
    assert localization.leakage(-np.abs(maps), inside) == 0.0
