"""RISE in 3D: a second implementation mask by mask, the masks' statistics, a known answer, the seed, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from testnets import frozen
from torch import nn

import SegExplainLib as sx
from SegExplainLib.engine.perturbation import Rise
from SegExplainLib.errors import SegExplainError


def relu_net(c_in: int = 2, k: int = 2) -> nn.Module:
    return frozen(nn.Sequential(nn.Conv3d(c_in, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, k, 3, padding=1)).double())


def test_matches_a_loop_over_the_masks():
    """saliency = sum_i score(x0 + M_i (x - x0)) M_i / (N p), one mask at a time with plain forward passes."""
    model = relu_net()
    x = torch.randn(2, 2, 4, 6, 5, dtype=torch.float64)
    seed = torch.randn(2, 2, 4, 6, 5, dtype=torch.float64)
    rise = Rise(n_masks=20, mask_resolution=(2, 3, 2), keep_probability=0.4, seed=7, baseline=-1.0,
                internal_batch_size=7)
    out = rise.attribute(model, x, seed)
    masks = rise.masks(x.shape[2:], x.dtype, x.device)
    expected = torch.zeros(2, 4, 6, 5, dtype=torch.float64)
    for b in range(2):
        for i in range(20):
            mask = masks(torch.tensor([i]))[0, 0]
            with torch.no_grad():
                score = (seed[b] * model((-1.0 + mask * (x[b] + 1.0))[None])[0]).sum()
            expected[b] += score * mask
    expected /= 20 * 0.4
    np.testing.assert_allclose(out.maps.sum(1).numpy(), expected.numpy(), rtol=1e-10, atol=1e-12)
    assert torch.equal(out.maps[:, 0], out.maps[:, 1])  # one map for all channels, split in equal parts
    assert out.delta is None and out.extras["forward_passes"] == 40


def test_the_masks_keep_about_p_and_are_shifted_smooth_grids():
    rise = Rise(n_masks=400, mask_resolution=4, keep_probability=0.3, seed=2)
    masks = rise.masks((12, 12, 12), torch.float64, torch.device("cpu"))(torch.arange(400))
    assert masks.shape == (400, 1, 12, 12, 12)
    assert float(masks.min()) >= 0 and float(masks.max()) <= 1
    assert float(masks.mean()) == pytest.approx(0.3, abs=0.03)
    # blended between cells (trilinear), and the random shifts put the cell borders at different voxels
    assert bool(((masks > 0.01) & (masks < 0.99)).any())
    first_border = [int(torch.nonzero((m[0, :, 0, 0] - m[0, 0, 0, 0]).abs() > 1e-9)[0]) if
                    bool(((m[0, :, 0, 0] - m[0, 0, 0, 0]).abs() > 1e-9).any()) else -1 for m in masks[:50]]
    assert len(set(first_border)) > 2


def test_a_network_that_reads_one_corner_is_salient_there():
    """The score reads only the corner block [0:4, 0:4, 0:4]: masks keeping it score, the others do not."""
    weight = torch.zeros(1, 1, 8, 8, 8, dtype=torch.float64)
    weight[..., :4, :4, :4] = 1.0

    class Corner(nn.Module):
        def forward(self, z):
            return (z * weight).sum((1, 2, 3, 4), keepdim=True).expand(-1, 1, 8, 8, 8) / 512

    x = torch.ones(1, 1, 8, 8, 8, dtype=torch.float64)
    seed = torch.ones(1, 1, 8, 8, 8, dtype=torch.float64)
    saliency = Rise(n_masks=300, mask_resolution=2, seed=0).attribute(Corner(), x, seed).maps[0, 0]
    assert float(saliency[:4, :4, :4].mean()) > 1.2 * float(saliency[4:, 4:, 4:].mean())
    assert all(int(i) < 4 for i in np.unravel_index(int(saliency.argmax()), saliency.shape))


def test_the_seed_reproduces_and_explain_runs_it():
    model = sx.tiny_unet().eval()
    image = np.random.default_rng(0).normal(size=(2, 6, 8, 8)).astype(np.float32)
    target = sx.BoxTarget((1, 2, 2), (3, 5, 5), class_index=1)
    first = sx.explain(model, image, target, "rise", n_masks=12, mask_resolution=2, seed=4)
    again = sx.explain(model, image, target, "rise", n_masks=12, mask_resolution=2, seed=4)
    other = sx.explain(model, image, target, "rise", n_masks=12, mask_resolution=2, seed=5)
    np.testing.assert_array_equal(first.maps, again.maps)
    assert not np.array_equal(first.maps, other.maps)
    assert first.record()["options"]["n_masks"] == 12


@pytest.mark.parametrize("options, message", [
    ({"n_masks": 0}, "n_masks must be an integer >= 1, got 0"),
    ({"keep_probability": 1.0}, r"keep_probability must be a number in \(0, 1\), got 1.0"),
    ({"keep_probability": True}, r"keep_probability must be a number in \(0, 1\), got True"),
    ({"mask_resolution": (2, 2)}, r"mask_resolution must be an integer or 3 integers \(D, H, W\), got \(2, 2\)"),
    ({"seed": 1.5}, "seed must be an integer >= 0, got 1.5"),
])
def test_bad_options(options, message):
    with pytest.raises(SegExplainError, match=message):
        Rise(**options)


def test_a_grid_finer_than_the_image_is_refused():
    with pytest.raises(SegExplainError, match=r"mask_resolution \[6, 6, 6\] must not exceed the image's size"):
        Rise().attribute(relu_net(), torch.zeros(1, 2, 4, 8, 8, dtype=torch.float64),
                         torch.ones(1, 2, 4, 8, 8, dtype=torch.float64))
