"""Targets resolve to the right regions and seeds, and reject what cannot be explained with a clear message."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from SegExplainLib.engine.targets import BoxTarget, ClassChannel, MaskTarget, PredictedRegion, VoxelTarget
from SegExplainLib.errors import SegExplainError

LOGITS = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(1))


def test_mask_target_region_and_seed():
    mask = np.zeros((4, 5, 6), bool)
    mask[1:3, 2, 0:4] = True
    target = MaskTarget(mask, class_index=2)
    seed = target.seed(LOGITS)
    assert seed[2].numpy().astype(bool).tolist() == mask.tolist()
    assert float(seed[:2].abs().sum()) == 0.0
    assert target.describe()["voxels"] == 8


def test_box_target_is_half_open():
    region = BoxTarget((1, 0, 2), (3, 2, 3), class_index=0).region(LOGITS)
    expected = {(d, h, w) for d in (1, 2) for h in (0, 1) for w in (2,)}
    assert set(zip(*np.nonzero(region))) == expected


@pytest.mark.parametrize("radius, spacing", [(0.0, None), (1.0, None), (1.5, None), (2.0, (2.0, 1.0, 1.0))])
def test_voxel_target_ball(radius, spacing):
    centre = (2, 2, 3)
    region = VoxelTarget(centre, radius=radius, spacing=spacing, class_index=1).region(LOGITS)
    step = np.ones(3) if spacing is None else np.asarray(spacing)
    expected = {idx for idx in itertools.product(range(4), range(5), range(6))
                if sum(((i - c) * s) ** 2 for i, c, s in zip(idx, centre, step)) <= radius ** 2 + 1e-9}
    assert set(zip(*np.nonzero(region))) == expected


def test_predicted_region_is_the_argmax_of_the_class():
    region = PredictedRegion(class_index=1).region(LOGITS)
    expected = np.array([[[int(np.argmax(LOGITS[:, d, h, w].numpy())) == 1 for w in range(6)]
                          for h in range(5)] for d in range(4)])
    assert region.tolist() == expected.tolist()


def test_class_channel_covers_the_grid():
    assert ClassChannel(class_index=0).region(LOGITS).all()


@pytest.mark.parametrize("make, message", [
    (lambda: MaskTarget(np.zeros((4, 5, 6), bool), class_index=1), "region is empty"),
    (lambda: MaskTarget(np.ones((4, 5, 7), bool), class_index=1), r"mask has shape \(4, 5, 7\)"),
    (lambda: BoxTarget((0, 0, 0), (5, 2, 2), class_index=1), "outside the output grid"),
    (lambda: BoxTarget((0, 0), (2, 2), class_index=1), "2 coordinates"),
    (lambda: VoxelTarget((4, 0, 0), class_index=1), r"voxel \(4, 0, 0\) lies outside"),
    (lambda: VoxelTarget((0, 0, 0), class_index=3), "class_index 3 is out of range for a model with 3"),
])
def test_unresolvable_targets_name_the_problem(make, message):
    with pytest.raises(SegExplainError, match=message):
        make().region(LOGITS)


@pytest.mark.parametrize("make, message", [
    (lambda: ClassChannel(class_index=-1), "non-negative integer, got -1"),
    (lambda: ClassChannel(class_index=1.5), "non-negative integer, got 1.5"),
    (lambda: ClassChannel(class_index=1, aggregation="mean"), "aggregation must be one of"),
    (lambda: BoxTarget((2, 0, 0), (1, 2, 2)), "start < stop"),
    (lambda: VoxelTarget((1, 1, 1), radius=-1), "radius must be >= 0"),
    (lambda: VoxelTarget((1, 1, 1), spacing=(1.0, 0.0, 1.0)), "spacing must hold one positive size"),
])
def test_invalid_targets_are_rejected_at_construction(make, message):
    with pytest.raises(SegExplainError, match=message):
        make()


def test_predicted_region_of_an_absent_class_is_empty():
    logits = torch.zeros(2, 2, 2, 2)
    logits[0] = 1.0
    with pytest.raises(SegExplainError, match="empty"):
        PredictedRegion(class_index=1).region(logits)
