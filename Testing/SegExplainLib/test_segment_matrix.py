"""The segment x segment matrix: known answers, the slow reference (one explain per class), bad input."""

from __future__ import annotations

import csv
import io
import json
import re

import numpy as np
import pytest
import torch
from testnets import frozen
from torch import nn

import SegExplainLib as sx
from SegExplainLib.engine.segments import segment_matrix
from SegExplainLib.models.protocol import relevance_from_grid

SHAPE = (6, 10, 10)


def _labels() -> np.ndarray:
    """Three segments on a background: label k in a block of its own."""
    labels = np.zeros(SHAPE, np.int64)
    labels[1:3, 1:5, 1:5] = 1
    labels[3:5, 5:9, 1:5] = 2
    labels[1:5, 2:8, 6:9] = 3
    return labels


class SegmentReader(nn.Module):
    """Class k is predicted on segment k (k = 0: the background) and its logits read only the voxels of segment k."""

    def __init__(self, labels: np.ndarray, classes: int) -> None:
        super().__init__()
        masks = np.stack([labels == k for k in range(classes)])
        self.register_buffer("masks", torch.as_tensor(masks, dtype=torch.get_default_dtype()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inside = torch.einsum("bcdhw,kdhw->bk", x, self.masks)  # every sequence's intensities in segment k
        return self.masks[None] * (10.0 + 0.01 * inside[:, :, None, None, None])


def _image(rng: np.random.Generator, channels: int = 2) -> np.ndarray:
    return rng.uniform(0.5, 1.5, size=(channels, *SHAPE))  # positive: gradient x input is positive where read


@pytest.mark.parametrize("method", ["gradient_x_input", "integrated_gradients"])
def test_a_network_reading_only_its_own_segment_gives_the_identity(rng, method):
    net = frozen(SegmentReader(_labels(), 4))
    options = {"baseline": "zero"} if method == "integrated_gradients" else {}
    matrix = segment_matrix(net, _image(rng), method=method, device="cpu", **options)
    assert matrix.rows == matrix.columns == ["background", "label 1", "label 2", "label 3"]
    np.testing.assert_allclose(matrix.shares, np.eye(4), atol=1e-12)
    assert matrix.status == ["explained"] * 4
    assert np.all(matrix.negative == 0)


def test_a_given_label_map_names_its_own_segments_and_the_background(rng):
    labels = _labels()
    net = frozen(SegmentReader(labels, 4))
    given = np.where(labels > 0, labels + 4, 0)  # the same segments under other labels
    matrix = segment_matrix(net, _image(rng), method="gradient", segmentation=given, classes=[1, 3], device="cpu",
                            class_names=["background", "liver", "spleen", "kidney"])
    assert matrix.rows == ["liver", "kidney"]
    assert matrix.columns == ["background", "label 5", "label 6", "label 7"]
    assert matrix.segmentation == "given"
    np.testing.assert_allclose(matrix.shares, [[0, 1, 0, 0], [0, 0, 0, 1]], atol=1e-12)


def test_a_class_predicted_nowhere_gets_a_row_saying_so(rng):
    labels = _labels()
    labels[labels == 2] = 0  # class 2 is the argmax nowhere
    net = frozen(SegmentReader(labels, 4))
    matrix = segment_matrix(net, _image(rng), method="gradient", device="cpu")
    assert matrix.status == ["explained", "explained", "not predicted", "explained"]
    assert np.isnan(matrix.shares[2]).all() and np.all(matrix.positive[2] == 0)
    assert matrix.explanations[2] is None
    np.testing.assert_allclose(matrix.shares[[0, 1, 3]].sum(1), 1.0)
    rows = list(csv.reader(io.StringIO(matrix.to_csv())))
    assert rows[0] == ["output segment \\ input segment", "background", "label 1", "label 2", "label 3",
                       "positive relevance", "negative share", "status"]
    assert rows[3] == ["label 2", "", "", "", "", "0", "", "not predicted"]
    record = json.loads(matrix.to_json())
    assert record["shares"][2] == [None] * 4 and record["status"][2] == "not predicted"


def _three_class_unet() -> nn.Module:
    """A random U-Net with 3 classes, its head's bias set so that each class wins somewhere."""
    net = frozen(sx.tiny_unet(out_channels=3).double())
    image = torch.as_tensor(_image(np.random.default_rng(1)))
    with torch.no_grad():
        net.head.bias -= net(image[None]).mean((0, 2, 3, 4))
    return net


@pytest.mark.parametrize(("method", "options"), [
    ("lrp", {}), ("guided_backprop", {}), ("integrated_gradients", {"n_steps": 8, "quadrature": "gausslegendre"})])
def test_the_batched_matrix_equals_one_explain_per_class(method, options):
    net = _three_class_unet()
    image = np.random.default_rng(1).normal(size=(2, *SHAPE))
    matrix = segment_matrix(net, image, method=method, device="cpu", segment_batch_size=2, **options)
    predicted = net(torch.as_tensor(image)[None])[0].argmax(0).numpy()
    assert sorted(np.unique(predicted)) == [0, 1, 2]
    for k in range(3):  # the slow reference: one explain per class, the sums taken with numpy
        result = sx.explain(net, image, sx.PredictedRegion(class_index=k), method, device="cpu", **options)
        for j in range(3):
            inside = result.maps[:, predicted == j]
            assert matrix.positive[k, j] == pytest.approx(np.clip(inside, 0, None).sum(), rel=1e-9, abs=1e-12)
            assert matrix.negative[k, j] == pytest.approx(np.clip(-inside, 0, None).sum(), rel=1e-9, abs=1e-12)
        record = matrix.explanations[k]
        assert (record["target"], record["options"]) == (result.target, result.options)
        for key in ("target_score", "region_voxels", "expected_sum", "delta"):
            wanted = result.record()[key]  # None for a method without a sum rule
            assert record[key] == (wanted if wanted is None else pytest.approx(wanted, rel=1e-9, abs=1e-12))
    np.testing.assert_allclose(matrix.shares.sum(1), 1.0)
    # IG's adaptive quadrature chooses per target; fixed nodes and the other methods share calls
    assert matrix.passes == 2 and matrix.explanations[0]["extras"]["segment_matrix_passes"] == 2


def test_adaptive_integrated_gradients_runs_one_segment_per_call_as_explain_does():
    net = _three_class_unet()
    image = np.random.default_rng(1).normal(size=(2, *SHAPE))
    matrix = segment_matrix(net, image, method="integrated_gradients", device="cpu", n_steps=8,
                            quadrature="adaptive")
    assert matrix.passes == 3 and matrix.extras["per_target"]
    result = sx.explain(net, image, sx.PredictedRegion(class_index=2), "integrated_gradients", device="cpu",
                        n_steps=8, quadrature="adaptive")
    assert matrix.explanations[2]["expected_sum"] == pytest.approx(result.expected_sum, rel=1e-9)
    assert matrix.explanations[2]["delta"] == pytest.approx(result.delta, rel=1e-9, abs=1e-12)


def test_maps_brought_onto_the_label_maps_grid_are_summed_there(rng):
    labels = _labels()
    net = frozen(SegmentReader(labels, 4))
    image = _image(rng)
    fine = labels.repeat(2, axis=0)  # the label map on a grid twice as fine in depth

    def to_fine(maps):
        return relevance_from_grid(maps, fine.shape)

    matrix = segment_matrix(net, image, method="gradient_x_input", segmentation=fine, maps_to_grid=to_fine,
                            device="cpu")
    np.testing.assert_allclose(matrix.shares, np.eye(4), atol=1e-12)
    coarse = segment_matrix(net, image, method="gradient_x_input", device="cpu")
    np.testing.assert_allclose(matrix.positive, coarse.positive, rtol=1e-9)  # sums are kept on the way back


@pytest.mark.parametrize(("options", "message"), [
    ({"segmentation": np.zeros((6, 10, 9), int)}, "segmentation has shape (6, 10, 9) but the relevance maps' grid "
                                                  "is (6, 10, 10)"),
    ({"segmentation": np.full(SHAPE, 0.5)}, "segmentation must hold integer labels, got dtype float64"),
    ({"segmentation": np.full(SHAPE, -1)}, "segmentation labels must be >= 0 (0: background), got -1"),
    ({"segmentation": [[0]]}, "segmentation must be an integer label array (D, H, W) or None, got list"),
    ({"classes": [1, 4]}, "classes [1, 4] include one out of range for a model with 4 output classes"),
    ({"classes": "1"}, "classes must be a list of non-negative class indices or None, got '1'"),
    ({"class_names": "liver"}, "class_names must be a list of texts or None, got 'liver'"),
    ({"segment_batch_size": 0}, "segment_batch_size must be an integer >= 1, got 0"),
    ({"method": "nope"}, "unknown method 'nope'"),
])
def test_bad_input_is_refused_by_name(rng, options, message):
    net = frozen(SegmentReader(_labels(), 4))
    with pytest.raises(sx.SegExplainError) as error:
        segment_matrix(net, _image(rng), device="cpu", **{"method": "gradient", **options})
    assert message in str(error.value)


def test_through_a_sliding_window_the_matrix_equals_one_explain_per_class():
    from SegExplainLib.models.sliding import SlidingWindow

    window = SlidingWindow(_three_class_unet(), (4, 8, 8), overlap=0.5)
    image = np.random.default_rng(1).normal(size=(2, *SHAPE))
    matrix = segment_matrix(window, image, method="lrp", device="cpu")
    predicted = window(torch.as_tensor(image)[None])[0].argmax(0).numpy()
    for k, status in enumerate(matrix.status):
        if status == "not predicted":
            continue
        maps = sx.explain(window, image, sx.PredictedRegion(class_index=k), "lrp", device="cpu").maps
        expected = [np.clip(maps[:, predicted == j], 0, None).sum() for j in range(3)]
        np.testing.assert_allclose(matrix.positive[k], expected, rtol=1e-9, atol=1e-12)
    assert matrix.status.count("explained") >= 2


class Unrunnable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the network ran")


@pytest.mark.parametrize("maps_to_grid", [None, lambda maps: maps.repeat(2, axis=1)])
def test_a_label_map_off_the_grid_is_refused_before_the_network_runs(rng, maps_to_grid):
    grid = "(12, 10, 10)" if maps_to_grid else "(6, 10, 10)"
    with pytest.raises(sx.SegExplainError, match=re.escape(f"segmentation has shape (6, 10, 9) but the relevance "
                                                           f"maps' grid is {grid}")):
        segment_matrix(Unrunnable(), _image(rng), method="gradient", segmentation=np.zeros((6, 10, 9), int),
                       maps_to_grid=maps_to_grid, device="cpu")
