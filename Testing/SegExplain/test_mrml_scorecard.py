"""The "Score methods" action on real MRML: the scoring in the warm worker (progress, cancel, errors) and its
scorecard table in the scene (SegExplainMRML.job.ScoreRun, workflow.startScoring/finishScoring,
results.addScorecard)."""

from __future__ import annotations

import copy
import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
from mrml_scene import QUICK_SCORING, addDemoCase, explaining
from SegExplainMRML import job, nodes, results, workflow

from SegExplainLib.errors import SegExplainError


@pytest.fixture
def explainer():
    explainer = job.WarmExplainer()
    yield explainer
    explainer.close()


def score(explainer, volumes, methods=("gradient",), region=None, settings=None, options=QUICK_SCORING):
    """What the Score methods button does, with the demo model."""
    return workflow.startScoring(explainer, volumes, [v.GetName() for v in volumes],
                                 region or job.Region("predicted", description="predicted region"),
                                 settings or job.ExplainSettings(), methods, job.ModelSource(), options=options)


def columnValues(table, name):
    """A column of a table node as Python values (text, or floats with NaN where not computed)."""
    data = table.GetTable()
    column = data.GetColumnByName(name)
    assert column is not None, f"no column {name!r}"
    return [data.GetValueByName(row, name).ToString() if column.IsA("vtkStringArray")
            else data.GetValueByName(row, name).ToDouble() for row in range(data.GetNumberOfRows())]


def test_the_scoring_runs_in_the_worker_and_tells_its_progress(demoScoring):
    """The worker answers the scorecard of both methods for the voxel, telling the steps of the scoring as it goes
    (with their fraction done); the record holds the request and the segexplain evaluate command line."""
    run, record = demoScoring.run, demoScoring.record
    assert run.state == "done", run.error
    assert run.fraction == 1.0 and run.answer.maps is None
    steps = [event["step"] for event in demoScoring.events if event.get("event") == "progress"]
    assert "explaining: gradient" in steps and "faithfulness curves" in steps and "verdicts" in steps
    card = record["scorecard"]
    assert list(card["methods"]) == ["gradient", "gradient_x_input"]
    assert card["target"]["region_voxels"] == 1 and card["recommendation"]  # the one clicked voxel
    assert card["settings"]["steps"] == 4 and card["settings"]["random_orders"] == 2  # the options reach it
    assert record["evaluation_request"]["methods"] == ["gradient", "gradient_x_input"]
    command = record["command"]
    assert command[:3] == ["segexplain", "evaluate", "--input"] and "--point-ras" in command
    assert command[command.index("--methods") + 1:command.index("--methods") + 3] == ["gradient", "gradient_x_input"]
    assert record["region"] == "point 'F-1', radius 0 mm"


def test_the_scorecard_table_holds_the_workers_scores(scene, demoScoring, demoRun):
    """One row per method with the worker's numbers (faithfulness with spread, randomization, max-sensitivity,
    leakage in %, time) and verdict, every number column with its unit and description, placed in the explanation's
    folder; the whole summary is kept in the table and is saved with the scene."""
    volumes, _ = addDemoCase(scene)
    explanation = results.addExplanation(demoRun.maps, demoRun.record, nodes.stackVolumes(volumes), volumes,
                                         name="LRP lesion")
    table = results.addScorecard(demoScoring.record, volumes[0], name="Scorecard", explanation=explanation)
    rows = demoScoring.record["scorecard"]["methods"]
    assert columnValues(table, "Method") == list(rows)
    expected = {
        "Deletion": [r["faithfulness"]["deletion"]["mean"] for r in rows.values()],
        "Deletion spread": [r["faithfulness"]["deletion"]["std"] for r in rows.values()],
        "Insertion": [r["faithfulness"]["insertion"]["mean"] for r in rows.values()],
        "Insertion spread": [r["faithfulness"]["insertion"]["std"] for r in rows.values()],
        "Rank correlation": [r["randomization"]["final_spearman"] for r in rows.values()],
        "Max-sensitivity": [r["robustness"]["max_sensitivity"] for r in rows.values()],
        "Outside receptive field": [100 * r["localization"]["outside_receptive_field"] for r in rows.values()],
        "Time": [r["seconds"] for r in rows.values()],
    }
    for name, values in expected.items():
        np.testing.assert_allclose(columnValues(table, name), values, rtol=1e-6, err_msg=name)
    assert columnValues(table, "Randomization") == ["passes" if r["randomization"]["passed"] else "fails"
                                                    for r in rows.values()]
    assert columnValues(table, "Verdict") == [r["verdict"] for r in rows.values()]
    assert table.GetColumnUnitLabel("Outside receptive field") == "%" and table.GetColumnUnitLabel("Time") == "s"
    for name, _unit, description, _path in results.SCORECARD_COLUMNS:
        assert table.GetColumnDescription(name) == description
    assert "random order" in table.GetColumnDescription("Deletion")
    assert json.loads(table.GetAttribute(results.SCORECARD_ATTRIBUTE)) == json.loads(
        json.dumps(demoScoring.record, default=str))
    shNode = results.subjectHierarchy(scene)
    assert shNode.GetItemParent(shNode.GetItemByDataNode(table)) == explanation.folderItem
    assert results.scorecardOf(explanation) is table
    assert results.explanationOf(scene, explanation.folderItem).table is explanation.table  # still an explanation


def test_a_users_node_of_the_same_name_is_left_alone(scene, demoScoring):
    """A user's table already named like the scorecard keeps its name and content; the scorecard gets a new node,
    beside the case when no explanation is shown; a summary without a scorecard adds nothing."""
    volumes, _ = addDemoCase(scene)
    mine = scene.AddNewNodeByClass("vtkMRMLTableNode", "Scorecard, predicted region")
    mine.AddColumn().SetName("my notes")
    before = scene.GetNumberOfNodes()
    table = results.addScorecard(demoScoring.record, volumes[0], name="Scorecard, predicted region")
    assert table is not mine and table.GetName() != "Scorecard, predicted region"
    assert mine.GetName() == "Scorecard, predicted region" and mine.GetNumberOfColumns() == 1
    assert mine.GetTable().GetColumnName(0) == "my notes"
    shNode = results.subjectHierarchy(scene)
    # beside the case: the volumes have no item of their own here (Slicer's plugins add them), so the scene's
    assert shNode.GetItemParent(shNode.GetItemByDataNode(table)) == shNode.GetSceneItemID()
    count = scene.GetNumberOfNodes()
    assert count == before + 1
    with pytest.raises(SegExplainError, match="holds no scorecard of methods"):
        results.addScorecard({"method": "lrp"}, volumes[0], name="Scorecard")
    assert scene.GetNumberOfNodes() == count


def test_an_undefined_score_is_an_empty_cell(scene, demoScoring):
    """A score the scoring did not compute (or left undefined) is NaN in its column, not 0."""
    volumes, _ = addDemoCase(scene)
    summary = json.loads(json.dumps(demoScoring.record))
    row = summary["scorecard"]["methods"]["gradient"]
    row["faithfulness"] = {"undefined": "the reference does not lower the target score", "faithful": None}
    del row["robustness"]
    table = results.addScorecard(summary, volumes[0], name="Scorecard")
    assert math.isnan(columnValues(table, "Deletion")[0]) and math.isnan(columnValues(table, "Max-sensitivity")[0])
    assert not math.isnan(columnValues(table, "Deletion")[1])


def test_the_table_is_shown_in_the_table_view(scene, demoScoring):
    """showScorecard makes the table the application's active table, which Slicer's table views show."""
    volumes, _ = addDemoCase(scene)
    table = results.addScorecard(demoScoring.record, volumes[0], name="Scorecard")
    results.showScorecard(scene.applicationLogic, table)
    assert scene.applicationLogic.GetSelectionNode().GetActiveTableID() == table.GetID()


def test_finish_scoring_loads_the_done_run_only(scene, demoScoring):
    """finishScoring adds the done run's table, named after the region; a run that is not done is refused."""
    volumes, _ = addDemoCase(scene)
    run = copy.copy(demoScoring.run)
    run.stack = nodes.stackVolumes(volumes)  # this test's scene
    table = workflow.finishScoring(run)
    assert table.GetName() == "Scorecard, point 'F-1', radius 0 mm"
    assert columnValues(table, "Method") == ["gradient", "gradient_x_input"]
    run.answer = None
    with pytest.raises(SegExplainError, match="not done"):
        workflow.finishScoring(run)


@pytest.mark.parametrize(("methods", "settings", "message"), [
    (("gradient", "shap"), job.ExplainSettings(), "unknown method 'shap'"),
    ((), job.ExplainSettings(), "methods must name at least one method"),
    ("gradient", job.ExplainSettings(), "methods must name at least one method"),
    (("gradient",), job.ExplainSettings(aggregation="normalized", samples=8), "samples=8 has no use in a scorecard"),
])
def test_a_bad_request_is_refused_before_the_worker_runs(scene, explainer, methods, settings, message):
    """An unknown method, no method or a sampled aggregation is refused with a one-line message naming it, and
    no worker is started."""
    volumes, _ = addDemoCase(scene)
    with pytest.raises(SegExplainError, match=message):
        score(explainer, volumes, methods=methods, settings=settings)
    assert explainer.worker is None


@pytest.mark.parametrize(("options", "message"), [
    ({"stepz": 4}, r"unknown scoring options \['stepz'\]; expected some of .*'steps'"),
    ({"methods": ("lrp",)}, r"unknown scoring options \['methods'\]"),
    ({"random_orders": 1}, "random_orders must be"),
])
def test_bad_scoring_options_are_refused_by_name(scene, explainer, options, message):
    """An option the scoring does not have, or a bad value, is refused by name before a worker starts."""
    volumes, _ = addDemoCase(scene)
    with pytest.raises(SegExplainError, match=message):
        score(explainer, volumes, options=options)
    assert explainer.worker is None


@pytest.mark.parametrize(("text", "message"), [
    ("{steps: 8}", r"scoring options must be a JSON object such as .* got '\{steps: 8\}' \(Expecting property name"),
    ("[8]", r"scoring options must be a JSON object such as .* got '\[8\]'"),
])
def test_the_panels_scoring_options_are_a_json_object(text, message):
    """The panel's scoring options are a JSON object of the scoring's fields (an empty field: the defaults); other
    text is refused with what was typed. Their reaching the worker is checked on the session's scoring (demoScoring
    passes the panel's text)."""
    assert workflow.scoringOptions(SimpleNamespace(scoringOptions=" ")) is None
    assert workflow.scoringOptions(SimpleNamespace(scoringOptions='{"steps": 3}')) == {"steps": 3}
    with pytest.raises(SegExplainError, match=message):
        workflow.scoringOptions(SimpleNamespace(scoringOptions=text))


def test_a_failing_scoring_reports_one_line_and_the_worker_stays(scene, explainer):
    """A point outside the grid fails the scoring in the worker with the command line's one-line message; the
    worker stays warm and scores the next request."""
    volumes, _ = addDemoCase(scene)
    failing = score(explainer, volumes, region=job.Region("point", pointRas=(1000.0, 1000.0, 1000.0)))
    assert failing.wait(120) == "failed"
    assert "lies outside the volume" in failing.error and "\n" not in failing.error
    with pytest.raises(SegExplainError, match="is failed, not done"):
        failing.record()
    assert explainer.worker.state == "running" and explainer.worker.starts == 1


def test_cancel_stops_the_scoring_and_the_worker_stays_warm(scene, explainer):
    """Cancel interrupts a running scoring within seconds; nothing is answered but 'cancelled', and the same warm
    worker explains the next click."""
    volumes, _ = addDemoCase(scene)
    slow = score(explainer, volumes, methods=("occlusion",),
                 settings=job.ExplainSettings(extraOptions={"window": 2}))
    explaining(slow)
    started = time.monotonic()
    slow.cancel()
    assert time.monotonic() - started < 6
    assert slow.state == "cancelled" and explainer.worker.answer(slow.request).state == "cancelled"
    again = workflow.startExplanation(explainer, volumes, [v.GetName() for v in volumes],
                                      job.Region("predicted"), job.ExplainSettings(method="gradient"),
                                      job.ModelSource())
    assert again.wait(60) == "done", again.error
    assert explainer.worker.starts == 1


def test_a_click_and_a_scoring_on_one_worker_each_show_their_own_progress(scene, explainer):
    """The widget's two timers poll a click and a scoring queued behind it on one worker, and each poll takes the
    events that came: the scoring, polled alone to its end, never shows the click's step, and the click, polled after
    the scoring took all of its events, still knows it ran and what it did last."""
    volumes, _ = addDemoCase(scene)
    clickRun = workflow.startExplanation(explainer, volumes, [v.GetName() for v in volumes],
                                         job.Region("predicted"), job.ExplainSettings(method="gradient"),
                                         job.ModelSource())
    scoring = score(explainer, volumes)
    steps, deadline = [], time.monotonic() + 120
    while scoring.running and time.monotonic() < deadline:
        scoring.poll(0.05)
        steps.append(scoring.step)
    assert scoring.state == "done", scoring.error
    assert "explaining" not in steps and "explaining: gradient" in steps
    clickRun.poll()
    assert clickRun.state == "done" and clickRun._explaining and clickRun.step == "explaining"


def test_scored_methods_come_from_the_controls():
    """Spaces or commas separate the names; an empty field scores the defaults."""
    assert workflow.scoredMethods(SimpleNamespace(scoreMethods="lrp, gradient  rise")) == ("lrp", "gradient", "rise")
    assert workflow.scoredMethods(SimpleNamespace(scoreMethods=" ")) == job.SCORED_METHODS
    assert workflow.scoredMethods(SimpleNamespace()) == job.SCORED_METHODS
