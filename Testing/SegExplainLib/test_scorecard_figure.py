"""The scorecard's figure: its panels, curves and bars from a scorecard or its summary.json entry."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from evaluation_nets import blob_image, one_sequence_net

import SegExplainLib as sx
from SegExplainLib.errors import SegExplainError
from SegExplainLib.io.figures import save_figure, scorecard_figure


@pytest.fixture(scope="module")
def card():
    return sx.evaluate(one_sequence_net(), blob_image(), sx.PredictedRegion(class_index=1), ["gradient", "lrp"],
                       block_size=2, steps=4, random_orders=3, randomization_stages=1, n_perturbations=1,
                       device="cpu")


def test_every_score_has_its_panel_and_every_method_its_curves(card):
    figure = scorecard_figure(card)
    labels = [ax.get_label() for ax in figure.axes]
    assert labels == ["deletion", "insertion", "faithfulness", "randomization", "robustness", "localization"]
    deletion = figure.axes[0]
    lines = {line.get_gid(): line for line in deletion.get_lines() if line.get_gid()}
    assert set(lines) == {"deletion:gradient", "deletion:lrp"}
    # the scale: 1 the image's score, 0 the reference's
    curve = card.curves["lrp"].deletion
    expected = (curve - curve[-1]) / (curve[0] - curve[-1])
    np.testing.assert_allclose(lines["deletion:lrp"].get_ydata(), expected)
    assert "Recommended:" in figure.get_suptitle()
    faithfulness = figure.axes[2]
    heights = [patch.get_height() for patch in faithfulness.patches]
    row = card.methods["gradient"]["faithfulness"]
    assert heights[0] == pytest.approx((row["deletion"]["mean"] + row["insertion"]["mean"]) / 2)


def test_the_summary_entry_draws_the_same_figure_and_saves(card, tmp_path):
    record = json.loads(json.dumps(card.to_json()))["scorecard"]
    figure = scorecard_figure(record)
    assert [ax.get_label() for ax in figure.axes] == [ax.get_label() for ax in scorecard_figure(card).axes]
    assert save_figure(figure, tmp_path / "scorecard.png").stat().st_size > 0


def test_only_the_scores_computed_are_drawn():
    card = sx.evaluate(one_sequence_net(), blob_image(), sx.PredictedRegion(class_index=1), ["gradient"],
                       scores=["robustness"], n_perturbations=1, device="cpu")
    assert [ax.get_label() for ax in scorecard_figure(card).axes] == ["robustness"]


def test_something_else_is_refused():
    with pytest.raises(SegExplainError, match=re.escape("scorecard must be a Scorecard or its summary.json entry")):
        scorecard_figure({"methods": {}})
