"""``segexplain evaluate`` and its request: the demo case and the nnU-Net fixture scored from their files, the
folder it writes, the table it prints, and its options refused by name."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from test_nnunet import _case, _write_case

from SegExplainLib.application import demo
from SegExplainLib.application.evaluation import run_evaluation
from SegExplainLib.application.model_source import ModelSource
from SegExplainLib.application.requests import CaseRun, EvaluationRun, ExplainRequest
from SegExplainLib.errors import SegExplainError
from SegExplainLib.frontends.cli import main
from SegExplainLib.io.outputs import OUTPUT_MARKER
from SegExplainLib.models.demo_card import demo_card_path

#: Small options: a scorecard in seconds (what each score means does not depend on them).
FAST = ["--steps", "4", "--random-orders", "2", "--randomization-stages", "1", "--n-perturbations", "1",
        "--block-size", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    return demo.write_demo_case(tmp_path_factory.mktemp("case"))


def test_the_demo_case_is_scored_printed_and_written(demo_files, tmp_path, capsys):
    inputs, label = demo_files
    output = tmp_path / "scorecard"
    code = main(["evaluate", "--card", str(demo_card_path()), "--input", *map(str, inputs), "--label", str(label),
                 "--methods", "gradient", "lrp", "--output", str(output), *FAST])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "recommendation:" in printed.out and re.search(r"^lrp\s", printed.out, re.MULTILINE)
    assert sorted(p.name for p in output.iterdir()) == sorted([OUTPUT_MARKER, "curves.csv", "scorecard.png",
                                                                "summary.json"])
    summary = json.loads((output / "summary.json").read_text())
    card = summary["scorecard"]
    assert list(card["methods"]) == ["gradient", "lrp"]
    assert summary["sequence_names"] == demo.SEQUENCE_NAMES
    assert set(card["methods"]["lrp"]["sequence_shares"]) == set(demo.SEQUENCE_NAMES)
    assert card["target"]["kind"] == "mask" and card["settings"]["steps"] == 4
    # the run is rebuilt from its record
    rebuilt = EvaluationRun.from_json(summary["evaluation_run"])
    assert rebuilt.methods == ("gradient", "lrp") and rebuilt.case.request.label == str(label)
    with (output / "curves.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["order"] for row in rows} == {"gradient", "lrp", "random:0", "random:1"}
    assert len(rows) == 4 * 2 * 5
    lrp_deletion = [float(r["score"]) for r in rows if r["order"] == "lrp" and r["mode"] == "deletion"]
    np.testing.assert_allclose(lrp_deletion, card["curves"]["lrp"]["deletion"])


def test_the_nnunet_fixture_is_scored_on_the_network_grid(nnunet_model, tmp_path, capsys):
    image, geometry, centre = _case((12, 30, 34))
    paths = _write_case(image, geometry, tmp_path)
    output = tmp_path / "out"
    code = main(["evaluate", "--nnunet", str(nnunet_model), "--folds", "0", "--no-mirroring", "--input",
                 *map(str, paths), "--voxel", *map(str, centre), "--radius", "2", "--methods", "gradient",
                 "gradient_x_input", "--output", str(output), "--no-figures", *FAST])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "gradient_x_input" in printed.out
    summary = json.loads((output / "summary.json").read_text())
    assert summary["grid"] == "network" and summary["model"]["kind"] == "nnunet"
    assert "figures" not in summary and not (output / "scorecard.png").exists()
    for row in summary["scorecard"]["methods"].values():
        # gradients have no relevance where the network cannot look
        assert row["localization"]["outside_receptive_field"] == pytest.approx(0.0, abs=1e-9)
        # this barely trained network scores the blurred image higher than the case: no map beats random there
        assert row["faithfulness"]["faithful"] is None and "does not lower" in row["faithfulness"]["undefined"]
        assert row["verdict"].startswith("use with care: faithfulness undefined")
    assert "warning: gradient: faithfulness undefined" in printed.err


def test_the_request_round_trips_through_json_and_words(demo_files):
    inputs, label = demo_files
    run = EvaluationRun(CaseRun(tuple(map(str, inputs)), "out", ModelSource("card", str(demo_card_path())),
                                ExplainRequest(label=str(label), device="cpu", seed=3)),
                        methods=("gradient", "lrp"), method_options={"lrp": {"composite": "epsilon_plus"}},
                        steps=6, reference="road")
    assert EvaluationRun.from_json(json.dumps(run.to_json())) == run
    words = run.arguments()
    assert words[words.index("--method-option") + 1] == 'lrp:composite="epsilon_plus"'
    from SegExplainLib.frontends.cli import parser

    assert EvaluationRun.from_namespace(parser().parse_args(["evaluate", *words])) == run
    assert run.evaluation_options()["seed"] == 3 and run.evaluation_options()["reference"] == "road"


@pytest.mark.parametrize(("change", "message"), [
    ({"methods": ("nope",)}, "unknown method 'nope'"),
    ({"scores": ("speed",)}, "scores must be one of faithfulness"),
    ({"random_orders": 1}, "random_orders must be an integer >= 2, got 1"),
    ({"noise_radius": 1.5}, "noise_radius must be a finite number > 0 and < 1, got 1.5"),
    ({"request": ExplainRequest(samples=4, aggregation="normalized")}, "samples=4 has no use in a scorecard"),
])
def test_bad_runs_are_refused_by_name(change, message):
    request = change.pop("request", ExplainRequest())
    with pytest.raises(SegExplainError, match=re.escape(message)):
        EvaluationRun(CaseRun(("a.nii",), "out", ModelSource("card", "c.json"), request), **change)


def test_a_cancelled_run_writes_nothing(demo_files, tmp_path):
    inputs, _ = demo_files
    run = EvaluationRun(CaseRun(tuple(map(str, inputs)), str(tmp_path / "out"),
                                ModelSource("card", str(demo_card_path())), ExplainRequest(device="cpu")),
                        methods=("gradient",))
    with pytest.raises(SegExplainError, match="cancelled"):
        run_evaluation(run, cancelled=lambda: True)
    assert not (tmp_path / "out").exists()
