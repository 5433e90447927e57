"""explain(): the record, the user's model left as it was, and one clear error per kind of bad input."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import SegExplainLib as sx
from SegExplainLib.engine.api import resolve_device
from SegExplainLib.engine.deployment import deployed
from SegExplainLib.engine.method import RULE_FREE_METHODS
from SegExplainLib.errors import SegExplainError

SHAPE = (2, 6, 8, 8)


@pytest.fixture
def model():
    return sx.tiny_unet()


@pytest.fixture
def image():
    return np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)


TARGET = sx.BoxTarget((1, 2, 2), (3, 5, 5), class_index=1)


def test_explanation_record_is_complete_and_json(model, image):
    result = sx.explain(model, image, TARGET, "lrp", composite="epsilon")
    assert result.maps.shape == SHAPE and result.maps.dtype == np.float32
    record = json.loads(result.to_json())
    assert record["method"] == "lrp"
    assert record["options"]["composite"] == "epsilon"
    assert record["target"] == {"kind": "box", "class_index": 1, "aggregation": "sum", "start": [1, 2, 2],
                                "stop": [3, 5, 5]}
    assert record["region_voxels"] == 18
    assert record["device"] == "cpu" and record["dtype"] == "float32"
    assert record["software"]["torch"] == torch.__version__
    assert model.training and record["norm_statistics"] == {"BatchNorm3d": "instance"}
    with torch.no_grad():  # explanations are of the model as the user runs it: a fresh model is in train mode
        logits = copy.deepcopy(model)(torch.as_tensor(image)[None])
    assert record["target_score"] == pytest.approx(float(logits[0, 1, 1:3, 2:5, 2:5].sum()), rel=1e-5)
    assert record["expected_sum"] == pytest.approx(record["target_score"], rel=1e-5)
    assert record["delta"] == pytest.approx(float(result.maps.sum()) - record["expected_sum"], abs=1e-3)
    assert record["seconds"] > 0


ROUND_TRIPS = {  # every registered method, with options other than its defaults
    "lrp": {"composite": "epsilon", "epsilon": 1e-3, "layer_filter": "pass:0.1"},
    "integrated_gradients": {"n_steps": 12, "quadrature": "riemann_left", "baseline": "blur:2"},
    "gradient": {},
    "gradient_x_input": {},
    "smoothgrad": {"n_samples": 3, "noise_level": 0.2, "seed": 7},
    "guided_backprop": {},
    "deconvolution": {},
    "occlusion": {"window": 2, "baseline": "min"},
    "gradcam": {"layer": "decoder.0", "relu": False},
    "deeplift": {"baseline": "zero"},
    "deeplift_shap": {"n_baselines": 2, "noise_level": 0.2, "baseline_seed": 3},
    "gradient_shap": {"n_samples": 3, "n_baselines": 2, "stdevs": 0.1, "seed": 5},
    "guided_gradcam": {"layer": "decoder.0", "upsample": "nearest"},
    "sequence_shapley": {"baseline": "min", "internal_batch_size": 3},
    "supervoxel_shapley": {"block_size": [2, 4, 4], "n_permutations": 4, "seed": 3},
    "rise": {"n_masks": 8, "mask_resolution": [2, 3, 3], "keep_probability": 0.3, "seed": 1},
    "score_cam": {"layer": "decoder.0", "weights": "softmax", "baseline": "blur:2"},
}


def test_the_rule_free_methods_are_the_registered_ones_that_walk_no_modules():
    assert set(RULE_FREE_METHODS) == {name for name, cls in sx.METHODS.items() if not cls.walks_modules}
    assert list(RULE_FREE_METHODS) == sorted(RULE_FREE_METHODS)


def test_cuda_resolves_to_the_index_a_model_there_reports(monkeypatch):
    """A model on the GPU reports cuda:0; unless "auto" and "cuda" resolve to that, explain() copies the model for
    every explanation, and a warm sliding window's stored prediction with it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for device in ("auto", "cuda", torch.device("cuda")):
        assert resolve_device(device) == torch.device("cuda:0")
    assert (resolve_device("cuda:1"), resolve_device("cpu")) == (torch.device("cuda:1"), torch.device("cpu"))


def test_every_method_has_a_round_trip_case():
    assert set(ROUND_TRIPS) == set(sx.METHODS)


@pytest.mark.parametrize("method", sorted(ROUND_TRIPS))
def test_the_record_rebuilds_the_same_explanation(model, image, method):
    model.eval()
    first = sx.explain(model, image, TARGET, method, **ROUND_TRIPS[method])
    record = json.loads(first.to_json())  # as summary.json stores it
    again = sx.explain(model, image, TARGET, record["method"], **record["options"])
    np.testing.assert_array_equal(first.maps, again.maps)
    assert json.loads(again.to_json())["options"] == record["options"]


def test_lrp_records_its_rules_apart_from_its_options(model, image):
    record = sx.explain(model.eval(), image, TARGET, "lrp", composite="epsilon_plus").record()
    assert record["options"] == {"composite": "epsilon_plus", "layer_filter": None}
    assert record["extras"]["rules"]["rules"]["convolution"]["rule"] == "z_plus"


@pytest.mark.parametrize("target", [sx.PredictedRegion(class_index=1), TARGET], ids=["predicted", "box"])
@pytest.mark.parametrize("method", ["lrp", "gradient", "gradient_x_input"])
def test_finds_the_region_in_its_own_forward_pass(model, image, target, method):
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    result = sx.explain(model, image, target, method)
    assert len(calls) == 1  # no separate forward pass for the logits
    x = torch.as_tensor(image)[None]
    with torch.no_grad(), deployed(model):
        logits = model(x)
    seed = torch.zeros_like(logits)
    seed[0, 1] = torch.as_tensor(target.region(logits[0]))
    assert result.region_voxels == int(seed.sum())
    given = sx.make_method(method).attribute(model, x, seed).maps[0].numpy()
    np.testing.assert_allclose(result.maps, given, rtol=1e-4, atol=1e-6 * np.abs(given).max())
    assert result.target_score == pytest.approx(float((seed * logits).sum()), rel=1e-6)


def test_model_is_left_exactly_as_it_was(model, image):
    model.train()
    model.encoder[0][0].weight.requires_grad_(False)  # a user's partially frozen model
    flags = [(m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sx.explain(model, image, TARGET, "lrp", dtype=torch.float64)
    assert [(m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in model.modules()] == flags
    for key, value in model.state_dict().items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key


@pytest.mark.parametrize("image, message", [
    (np.zeros((6, 8, 8), np.float32), r"shape \(C, D, H, W\).*got shape \(6, 8, 8\)"),
    (np.zeros(SHAPE, np.int16), "floating point.*int16"),
    (np.full(SHAPE, np.nan, np.float32), "NaN/Inf voxels"),
    (np.zeros((3, 6, 8, 8), np.float32), "expects 2 input channels.*got an image with 3"),
])
def test_bad_images(model, image, message):
    with pytest.raises(SegExplainError, match=message):
        sx.explain(model, image, TARGET)


def test_nan_report_names_the_channel(model, image):
    image[1, 2, 3, 4] = np.inf
    with pytest.raises(SegExplainError, match=r"1 NaN/Inf voxels \(in channels \[1\]\)"):
        sx.explain(model, image, TARGET)


class FlatOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 2, 1)

    def forward(self, x):
        return self.conv(x).flatten(2)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "shap"}, "unknown method 'shap'"),
    ({"method": "lrp", "composite": "nope"}, "unknown composite 'nope'"),
    ({"method": "lrp", "n_steps": 3}, "does not take options"),
    ({"device": "cuda:7"} if not torch.cuda.is_available() else {"device": "tpu"}, "device"),
    ({"samples": 4}, "aggregation='normalized'"),
    ({"voxel_batch_size": 0}, "voxel_batch_size must be >= 1"),
])
def test_bad_options(model, image, kwargs, message):
    with pytest.raises(SegExplainError, match=message):
        sx.explain(model, image, TARGET, **kwargs)


def test_a_model_that_does_not_return_a_volume(image):
    with pytest.raises(SegExplainError, match=r"logits \(N, K, D, H, W\).*got \(1, 2, 384\)"):
        sx.explain(FlatOutput(), image, TARGET)


def test_a_layer_that_refuses_the_image_size_is_one_line_naming_the_shape():
    """torch reports an image too small for a layer as a ValueError (instance norm of one voxel)."""
    with pytest.raises(SegExplainError, match=r"^the model failed on an image of shape \(2, 1, 1, 1\): Expected more "
                                              r"than 1 spatial element"):
        sx.explain(nn.InstanceNorm3d(2), np.ones((2, 1, 1, 1), np.float32), sx.BoxTarget((0, 0, 0), (1, 1, 1)))


def test_target_outside_the_grid_and_bad_class(model, image):
    with pytest.raises(SegExplainError, match="outside the output grid"):
        sx.explain(model, image, sx.BoxTarget((0, 0, 0), (7, 2, 2)))
    with pytest.raises(SegExplainError, match="class_index 2 is out of range for a model with 2"):
        sx.explain(model, image, sx.ClassChannel(class_index=2))
    with pytest.raises(SegExplainError, match="target must be a SegExplainLib target"):
        sx.explain(model, image, (1, 2, 3))


def test_post_hoc_filters_on_the_result(model, image):
    result = sx.explain(model, image, TARGET, "lrp", composite="epsilon")
    passed = result.filtered("pass:0.4")
    clamped = result.filtered(sx.AmplitudeFilter.create("clamp", 0.2))
    limit = np.abs(result.maps).reshape(2, -1).max(1)[:, None, None, None]
    assert np.all(np.abs(passed) <= 0.4 * limit + 1e-7)
    assert np.all(np.abs(clamped) <= 0.2 * limit + 1e-7)
    kept = np.abs(result.maps) <= 0.4 * limit
    np.testing.assert_array_equal(passed[kept], result.maps[kept])


def test_library_never_imports_slicer_qt_or_vtk():
    import ast
    import pathlib

    root = pathlib.Path(sx.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in {"slicer", "qt", "vtk", "ctk", "vtkmodules"}, (path, name)
