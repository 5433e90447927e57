"""Faithfulness curves: against the project's own perturbation_curve, a loop over blocks, captum's infidelity, and the
known answers (a random order scores about 0, a map that follows the network scores well above it)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from evaluation_nets import blob_image, one_sequence_net

from SegExplainLib.engine.evaluation import faithfulness
from SegExplainLib.engine.metrics import perturbation_curve
from SegExplainLib.errors import SegExplainError


def region_score(model, box=(slice(2, 6), slice(4, 8), slice(4, 8))):
    seed = torch.zeros((1, 2, 8, 12, 12), dtype=torch.float64)
    seed[(0, 1, *box)] = 1.0
    return seed, lambda batch: (model(batch) * seed).flatten(1).sum(1)


def test_block_sums_match_a_loop_over_blocks(rng):
    maps = rng.normal(size=(2, 5, 7, 9))
    sums = faithfulness.block_sums(maps, 3)
    assert sums.shape == (2, 2, 3, 3)
    for c, d, h, w in np.ndindex(sums.shape):
        block = maps[c, 3 * d:3 * d + 3, 3 * h:3 * h + 3, 3 * w:3 * w + 3]
        assert sums[c, d, h, w] == pytest.approx(block.sum())


def test_voxel_blocks_give_the_projects_perturbation_curve(rng):
    """With blocks of one voxel, the deletion and insertion curves are perturbation_curve's with the reference as
    baseline (the same order, ties and counts)."""
    model = one_sequence_net()
    x = blob_image()[None]
    maps = rng.normal(size=x.shape[1:])
    reference = faithfulness.reference_image(x, "blur:2")
    _, score = region_score(model)
    with torch.no_grad():
        (ours,) = faithfulness.curves(score, x, reference, [faithfulness.order_of(maps)], block_size=1, steps=5,
                                      batch_size=3)
        for mode in ("deletion", "insertion"):
            theirs = perturbation_curve(lambda b: score(torch.as_tensor(b)), x[0].numpy(), maps, mode=mode, steps=5,
                                        baseline=reference[0].numpy())
            np.testing.assert_allclose(getattr(ours, mode), theirs.scores, rtol=1e-12)


def test_blocks_are_removed_in_the_order_of_their_sums(rng):
    """A slow loop: at each step, the top blocks by summed relevance replaced by the reference, one image at a time."""
    model = one_sequence_net()
    x = blob_image()[None]
    maps = rng.normal(size=x.shape[1:])
    reference = faithfulness.reference_image(x, "min")
    _, score = region_score(model)
    with torch.no_grad():
        (ours,) = faithfulness.curves(score, x, reference, [faithfulness.order_of(faithfulness.block_sums(maps, 4))],
                                      block_size=4, steps=4, batch_size=7)
        sums = faithfulness.block_sums(maps, 4)
        ranked = sorted(np.ndindex(sums.shape), key=lambda i: -sums[i])
        for step in range(5):
            image = x[0].clone()
            for c, d, h, w in ranked[:step * len(ranked) // 4]:
                part = (c, slice(4 * d, 4 * d + 4), slice(4 * h, 4 * h + 4), slice(4 * w, 4 * w + 4))
                image[part] = reference[0][part]
            assert float(score(image[None])[0]) == pytest.approx(ours.deletion[step], rel=1e-12)


def test_deletion_drops_agree_with_captum_infidelity():
    """captum's infidelity with zero attributions is E[(f(x) - f(x - I))^2]: with I taking the image to a step of
    the deletion curve, it is the square of that step's drop, computed by captum's own forward passes."""
    metrics = pytest.importorskip("captum.metrics")
    model = one_sequence_net()
    x = blob_image()[None]
    _, score = region_score(model)
    reference = faithfulness.reference_image(x, "blur:2")
    maps = x[0].numpy()  # brightest first
    order = faithfulness.order_of(faithfulness.block_sums(maps, 2))
    with torch.no_grad():
        (curve,) = faithfulness.curves(score, x, reference, [order], block_size=2, steps=4, batch_size=5)
    for step in (1, 2, 4):
        removed = faithfulness._entry_mask(torch.as_tensor(order), step * order.size // 4,
                                           (2, 4, 6, 6), (2, 8, 12, 12), 2)
        image = torch.where(removed, reference[0], x[0])[None]
        value = metrics.infidelity(score, lambda inputs, image=image: (inputs - image, image), x, torch.zeros_like(x),
                                   n_perturb_samples=1)
        assert float(value) == pytest.approx((curve.deletion[0] - curve.deletion[step]) ** 2, rel=1e-9)


def test_a_random_order_scores_about_zero_and_the_network_s_own_input_well_above():
    model = one_sequence_net()
    x = blob_image()[None]
    seed, score = region_score(model)
    reference = faithfulness.reference_image(x, "blur:2")
    good = x[0].numpy() * (seed[0, 1] > 0).numpy()  # the read sequence inside the region: what the score sums
    random_map = np.random.default_rng(7).random(x.shape[1:])
    orders = [faithfulness.order_of(faithfulness.block_sums(m, 2)) for m in (good, random_map)]
    orders += faithfulness.random_orders(orders[0].size, 8, seed=0)
    with torch.no_grad():
        computed = faithfulness.curves(score, x, reference, orders, block_size=2, steps=8, batch_size=16)
    baseline = computed[2:]
    low, high = faithfulness.score_range(computed)
    for mode in ("deletion", "insertion"):
        good_values = faithfulness.normalized_area(computed[0], baseline, mode, low=low, high=high)
        random_values = faithfulness.normalized_area(computed[1], baseline, mode, low=low, high=high)
        spread = np.std([faithfulness.normalized_area(c, baseline, mode, low=low, high=high).mean()
                         for c in baseline])
        assert good_values.max() <= 1.0
        assert abs(random_values.mean()) < 3 * spread, mode
        assert good_values.mean() > 0.5 and good_values.mean() > 5 * spread, mode


def test_road_imputes_removed_voxels_from_their_neighbours():
    """Without noise, a removed voxel inside a linear ramp is filled with the ramp (the mean of its neighbours)."""
    ramp = torch.arange(10, dtype=torch.float64).reshape(1, 1, 1, 1, 10).expand(1, 1, 3, 3, 10).clone()
    removed = torch.zeros_like(ramp, dtype=torch.bool)
    removed[..., 4:6] = True
    filled = faithfulness.impute(ramp, removed, noise=0.0, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(filled.numpy(), ramp.numpy(), atol=1e-3)
    noisy = faithfulness.impute(ramp, removed, noise=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy[~removed], ramp[~removed]) and not torch.allclose(noisy[removed], ramp[removed])


def test_a_reference_that_does_not_lower_the_score_is_refused():
    x = blob_image()[None]
    with torch.no_grad():
        computed = faithfulness.curves(lambda b: torch.zeros(len(b), dtype=b.dtype), x, x * 0,
                                       [np.arange(2 * 2 * 3 * 3)] * 3, block_size=4, steps=2, batch_size=4)
    with pytest.raises(SegExplainError, match=re.escape("the reference does not lower the target score")):
        faithfulness.normalized_area(computed[0], computed[1:], "deletion", low=0.0, high=0.0)
