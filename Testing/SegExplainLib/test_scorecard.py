"""evaluate() and its Scorecard: the known answers (one sequence read, a random map, a map blind to the weights),
the user's model untouched, the record, the verdicts and the bad options."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from evaluation_nets import EdgesMethod, RandomMethod, blob_image, one_sequence_net
from testnets import frozen

import SegExplainLib as sx
from SegExplainLib.engine.api import METHODS
from SegExplainLib.engine.gradients import GradientXInput
from SegExplainLib.engine.method import AttributionOutput
from SegExplainLib.errors import SegExplainError

FAST = {"block_size": 2, "steps": 6, "random_orders": 4, "randomization_stages": 2, "n_perturbations": 2,
        "device": "cpu"}


@pytest.fixture
def test_methods(monkeypatch):
    monkeypatch.setitem(METHODS, EdgesMethod.name, EdgesMethod)
    monkeypatch.setitem(METHODS, RandomMethod.name, RandomMethod)


@pytest.fixture(scope="module")
def card():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(METHODS, RandomMethod.name, RandomMethod)
        model = one_sequence_net()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        result = sx.evaluate(model, blob_image(), sx.PredictedRegion(class_index=1),
                             ["gradient", "gradient_x_input", "integrated_gradients", "lrp", "sequence_shapley",
                              RandomMethod.name],
                             method_options={"integrated_gradients": {"n_steps": 8}}, sequence_names=["T1", "T2"],
                             **FAST)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert not any(m._forward_hooks for m in model.modules())
        return result


@pytest.mark.parametrize("method", ["gradient", "gradient_x_input", "integrated_gradients", "lrp"])
def test_a_network_reading_one_sequence_gets_every_method_to_say_so(card, method):
    row = card.methods[method]
    assert row["sequence_shares"]["T2"] == pytest.approx(0.0, abs=1e-9)
    # the unread sequence is outside the receptive field: no relevance of a faithful method lies there
    assert row["localization"]["outside_receptive_field"] == pytest.approx(0.0, abs=1e-9)
    assert row["faithfulness"]["faithful"], row["faithfulness"]
    # no randomization answer here: the maps of so shallow a network take the shape of its receptive field, which
    # random weights keep (Binder et al. 2023; docs/evaluation.md); the tiny U-Net below passes


def test_a_per_sequence_answer_is_given_as_such_not_judged_as_a_voxel_map(card):
    row = card.methods["sequence_shapley"]
    assert row["per_sequence"] and not card.methods["gradient"]["per_sequence"]
    assert row["sequence_shares"] == pytest.approx({"T1": 1.0, "T2": 0.0}, abs=1e-9)  # all on the one read
    assert row["verdict"].startswith("per-sequence answer") and "T1 100%, T2 0%" in row["verdict"]
    assert not row["trustworthy"]
    assert not card.recommendation.startswith("sequence_shapley")


def test_a_random_map_scores_about_zero_within_the_random_spread(card):
    random = card.methods[RandomMethod.name]
    for mode in ("deletion", "insertion"):
        assert abs(random["faithfulness"][mode]["mean"]) < 3 * max(random["faithfulness"][mode]["std"], 0.05), mode
    assert not random["faithfulness"]["faithful"]
    assert random["verdict"].startswith("not trustworthy") and "no better than random" in random["verdict"]
    # half of its positive relevance is in the sequence the network never reads
    assert random["localization"]["outside_receptive_field"] > 0.4
    assert RandomMethod.name not in card.recommendation.split(":")[0]


def test_the_record_is_json_and_rebuilds_the_settings(card):
    data = json.loads(json.dumps(card.to_json()))["scorecard"]
    assert data["settings"]["method_options"]["integrated_gradients"] == {"n_steps": 8}
    assert data["settings"]["block_size"] == 2 and data["settings"]["reference"] == "blur:2"
    assert set(data["curves"]) == {*card.methods, "random:0", "random:1", "random:2", "random:3"}
    assert len(data["curves"]["lrp"]["deletion"]) == FAST["steps"] + 1
    lrp = data["methods"]["lrp"]
    assert lrp["sum_rule"]["relative_delta"] is not None and lrp["seconds"] > 0
    assert data["target"]["region_voxels"] > 0
    table = card.table()
    assert all(name in table for name in card.methods) and "recommendation:" in table


def test_a_method_blind_to_the_weights_is_not_recommended(test_methods):
    card = sx.evaluate(frozen(sx.tiny_unet().double()), blob_image(), sx.BoxTarget((2, 4, 4), (6, 8, 8)),
                       [EdgesMethod.name, "gradient"], scores=["randomization"], **FAST)
    assert not card.methods[EdgesMethod.name]["randomization"]["passed"]
    assert card.recommendation.startswith("gradient:")


class HalfSumMethod(GradientXInput):
    """Gradient x input reporting the sum rule it would have with the maps doubled: it misses it by half."""

    name = "half_sum_test_only"

    def attribute(self, model, inputs, seed):
        result = super().attribute(model, inputs, seed)
        expected = 2 * result.maps.flatten(1).sum(1)
        return AttributionOutput(result.maps, delta=result.maps.flatten(1).sum(1) - expected, expected=expected)


def test_a_map_that_misses_its_own_sum_rule_is_used_with_care(monkeypatch):
    monkeypatch.setitem(METHODS, HalfSumMethod.name, HalfSumMethod)
    card = sx.evaluate(one_sequence_net(), blob_image(), sx.PredictedRegion(class_index=1),
                       ["gradient_x_input", HalfSumMethod.name], scores=["faithfulness"], **FAST)
    half, whole = card.methods[HalfSumMethod.name], card.methods["gradient_x_input"]
    assert abs(half["sum_rule"]["relative_delta"]) == pytest.approx(0.5)
    assert half["verdict"].startswith("use with care") and "misses its own sum rule by 50%" in half["verdict"]
    assert whole["verdict"].startswith("trustworthy"), whole["verdict"]  # the same map, no sum rule to miss


def test_road_and_progress_and_cancellation():
    seen = []
    card = sx.evaluate(one_sequence_net(), blob_image(), sx.PredictedRegion(class_index=1), ["gradient"],
                       scores=["faithfulness"], reference="road", progress=lambda step, f: seen.append((step, f)),
                       **FAST)
    assert card.methods["gradient"]["faithfulness"]["faithful"]
    assert seen[0] == ("fixing the region", 0.0) and all(0 <= f < 1 for _, f in seen)
    with pytest.raises(SegExplainError, match="cancelled"):
        sx.evaluate(one_sequence_net(), blob_image(), sx.PredictedRegion(class_index=1), ["gradient"],
                    cancelled=lambda: True, **FAST)


@pytest.mark.parametrize(("options", "message"), [
    ({"methods": []}, "methods must be a non-empty list"),
    ({"methods": ["nope"]}, "unknown method 'nope'"),
    ({"methods": ["gradient", "gradient"]}, "each method once"),
    ({"method_options": {"lrp": {}}}, "method_options must map some of the methods"),
    ({"scores": ["speed"]}, "scores must be some of"),
    ({"block_size": 0}, "block_size must be an integer >= 1, got 0"),
    ({"random_orders": 1}, "random_orders must be an integer >= 2"),
    ({"reference": "blurry"}, "blurry"),
    ({"noise_radius": 2.0}, "noise_radius must be a number between 0 and 1"),
    ({"sequence_names": ["T1"]}, "sequence_names has 1 names for an image with 2 channels"),
])
def test_bad_options_are_refused_by_name(options, message):
    arguments = {"methods": ["gradient"], **options}
    with pytest.raises(SegExplainError, match=re.escape(message)):
        sx.evaluate(one_sequence_net(), blob_image(), sx.PredictedRegion(class_index=1), **arguments)


def test_the_maps_are_kept_for_the_figures(card):
    maps = card.maps["gradient"]
    assert maps.shape == (2, 8, 12, 12) and np.isfinite(maps).all()


def test_the_curves_batch_forward_passes_by_eight_on_cpu_with_the_same_scores():
    def faithfulness(batch_size):
        card = sx.evaluate(one_sequence_net(), blob_image(), sx.PredictedRegion(class_index=1), ["gradient", "lrp"],
                           scores=["faithfulness"], batch_size=batch_size, **FAST)
        return {name: row["faithfulness"] for name, row in card.methods.items()}

    chosen = faithfulness(None)
    assert {row.pop("batch_size") for row in chosen.values()} == {8}  # forward passes only: not the cap of 2
    one_at_a_time = faithfulness(1)
    for row in one_at_a_time.values():
        row.pop("batch_size")
    assert json.dumps(chosen) == json.dumps(one_at_a_time)
