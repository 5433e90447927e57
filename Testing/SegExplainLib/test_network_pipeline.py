"""Model cards and model specs as pipelines: the same maps and record as explain() on the normalized image, the
sliding window of a patch-trained network, and no code of someone else without the user's word."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from SegExplainLib.engine.api import explain
from SegExplainLib.engine.targets import BoxTarget, PredictedRegion
from SegExplainLib.errors import SegExplainError
from SegExplainLib.models.loading import ModelCard, load_model
from SegExplainLib.models.networks import tiny_unet
from SegExplainLib.models.pipelines import explain_case, open_pipeline
from SegExplainLib.models.sliding import SlidingWindow

SPEC = "SegExplainLib.models:tiny_unet"
MODEL_FILE = """
from pathlib import Path

Path(__file__).with_name("ran.txt").write_text("the model file ran")

from SegExplainLib.models.networks import tiny_unet as Net
"""


@pytest.fixture
def folder(tmp_path):
    torch.save(tiny_unet().state_dict(), tmp_path / "weights.pt")
    (tmp_path / "evil.py").write_text(MODEL_FILE)
    return tmp_path


def _card(folder, **fields):
    path = folder / "card.json"
    path.write_text(json.dumps({"model": SPEC, "weights": "weights.pt", "sequences": ["T2", "FLAIR"],
                                "classes": ["background", "lesion"], "normalization": {"kind": "zscore"}, **fields}))
    return str(path)


def _without_seconds(record):
    return {key: value for key, value in record.items() if key != "seconds"}


@pytest.mark.parametrize("target", [BoxTarget((1, 2, 2), (4, 6, 7), class_index=1), PredictedRegion(class_index=1)])
def test_a_card_explains_as_explain_of_its_normalized_image(folder, target):
    path = _card(folder)
    image = np.random.default_rng(0).normal(3.0, 2.0, size=(2, 6, 8, 10)).astype(np.float32)
    result = explain_case(open_pipeline("card", path), image, None, target, "lrp", composite="epsilon", device="cpu")
    card = ModelCard.read(path)
    expected = explain(card.load_model(), card.normalize(image), target, "lrp", composite="epsilon", device="cpu")
    np.testing.assert_array_equal(result.maps, expected.maps)
    assert _without_seconds(result.record()) == _without_seconds(expected.record())


def test_a_card_describes_itself_as_summary_json_does(folder):
    path = _card(folder, patch_size=[4, 4, 4])
    pipeline = open_pipeline("card", path, overlap=0.25)
    assert isinstance(pipeline.model, SlidingWindow) and pipeline.model.patch_size == (4, 4, 4)
    assert pipeline.sliding_window == {"patch_size": [4, 4, 4], "overlap": 0.25}
    assert pipeline.normalized_input and pipeline.preview() is None
    assert (pipeline.sequences, pipeline.classes) == (["T2", "FLAIR"], ["background", "lesion"])
    assert pipeline.describe() == {"spec": path, "weights": None, "card": ModelCard.read(path).to_dict()}
    assert open_pipeline("card", path, patch_size=(2, 4, 6)).sliding_window["patch_size"] == [2, 4, 6]


def test_a_spec_takes_the_image_as_read_with_any_channels(folder):
    weights = str(folder / "weights.pt")
    pipeline = open_pipeline("spec", SPEC, weights=weights)
    assert pipeline.describe() == {"spec": SPEC, "weights": weights, "card": None}
    assert (pipeline.sequences, pipeline.normalized_input, pipeline.sliding_window) == ([], False, None)
    torch.manual_seed(0)  # the same untrained weights as below
    pipeline = open_pipeline("spec", SPEC, kwargs={"in_channels": 3})
    image = np.random.default_rng(1).normal(3.0, 2.0, size=(3, 6, 8, 10)).astype(np.float32)
    target = BoxTarget((1, 2, 2), (4, 6, 7), class_index=1)
    result = explain_case(pipeline, image, None, target, "gradient", device="cpu")
    torch.manual_seed(0)
    expected = explain(load_model(SPEC, kwargs={"in_channels": 3}), image, target, "gradient", device="cpu")
    np.testing.assert_array_equal(result.maps, expected.maps)
    assert _without_seconds(result.record()) == _without_seconds(expected.record())


@pytest.mark.parametrize("kind", ["card", "spec"])
def test_a_model_file_runs_only_with_the_users_word(folder, kind):
    spec = f"{folder / 'evil.py'}:Net"
    path = _card(folder, model=spec) if kind == "card" else spec
    source = f"model card {path!r}" if kind == "card" else f"--model {spec!r}"
    message = (rf"{re.escape(source)} would run the Python file .*evil\.py'; pass --trust-model-code only if you "
               rf"trust it \(a model card cannot allow this itself\)")
    with pytest.raises(SegExplainError, match=message):
        open_pipeline(kind, path)
    assert not (folder / "ran.txt").exists()
    pipeline = open_pipeline(kind, path, trust_code=True)  # positive control: the same file runs with the flag
    assert (folder / "ran.txt").is_file() and isinstance(pipeline.model, torch.nn.Module)
