"""The Score methods action: the warm worker scores the chosen methods on the page's region, with progress and
cancel; the page shows the figure, the table and the recommendation, and offers summary.json and the figure."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import urllib.error
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from review_page import setState

from SegExplainReview.scorecard import ScoreAction

SUMMARY, FIGURE = "/segexplain/scorecard/summary.json", "/segexplain/scorecard/scorecard.png"


def status(server, path: str) -> int:
    """The HTTP status of ``path`` fetched with the run's token."""
    try:
        server.get(path)
    except urllib.error.HTTPError as error:
        return error.code
    return 200


def test_no_method_chosen_is_an_error_and_nothing_is_offered(server, page):
    setState(page, score_methods=[], region_kind="predicted", error="")
    page.evaluate("document.querySelector('#score-button').click()")
    page.waitFor("window.trame.state.get('error')", timeout=30)
    assert page.evaluate("window.trame.state.get('error')") == (
        "methods must name at least one method to score, got none")
    assert not page.evaluate("window.trame.state.get('scoring')")
    assert status(server, SUMMARY) == status(server, FIGURE) == 404
    assert page.evaluate("document.querySelector('#score-summary')") is None


def test_the_scorecard_shows_its_figure_table_and_downloads(server, page):
    setState(page, score_methods=["gradient", "gradient_x_input"], region_kind="predicted", error="")
    page.evaluate("document.querySelector('#score-button').click()")
    page.waitFor("window.trame.state.get('scoring')", timeout=30)
    page.waitFor("window.trame.state.get('score_progress') > 0 || window.trame.state.get('scorecard_png')",
                 timeout=120)
    page.waitFor("(window.trame.state.get('scorecard_png') && !window.trame.state.get('scoring')) || "
                 "window.trame.state.get('error')", timeout=300)
    assert page.evaluate("window.trame.state.get('error')") == ""
    rows = page.evaluate("window.trame.state.get('score_rows')")
    assert [row["method"] for row in rows] == ["gradient", "gradient_x_input"]
    cells = page.evaluate("[...document.querySelectorAll('#score-table tr')].map(r => [...r.children].map("
                          "c => c.textContent.trim()))")
    assert cells[0] == ["Method", "Deletion", "Insertion", "Randomization", "Max-sens.", "Off RF / target",
                        "Time (s)", "Verdict"]
    assert [row[0] for row in cells[1:]] == ["gradient", "gradient_x_input"]
    assert all(row[3].startswith(("pass (rho ", "FAIL (rho ")) for row in cells[1:])
    summary = json.loads(server.get(SUMMARY))
    card = summary["scorecard"]
    assert list(card["methods"]) == ["gradient", "gradient_x_input"]
    assert summary["evaluation_request"]["methods"] == ["gradient", "gradient_x_input"]
    assert card["target"]["kind"] == "mask" and card["target"]["region_voxels"] > 0
    for row, cell in zip(card["methods"].values(), cells[1:]):
        assert cell[-1] == row["verdict"] and cell[4] == f"{row['robustness']['max_sensitivity']:.2f}"
    assert page.evaluate("document.querySelector('#score-recommendation').textContent.trim()") == (
        card["recommendation"])
    source = page.evaluate("document.querySelector('#scorecard-figure').getAttribute('src')")
    shown = Image.open(io.BytesIO(base64.b64decode(source.partition(",")[2])))
    downloaded = server.get(FIGURE)
    assert downloaded == base64.b64decode(source.partition(",")[2])
    assert shown.size[0] > 600 and np.asarray(shown.convert("RGB")).std() > 10  # drawn, not blank
    for path in (SUMMARY, FIGURE):  # the downloads need the run's token
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{server.url.split('?')[0].rstrip('/')}{path}", timeout=30)
        assert refused.value.code == 403


def test_cancel_stops_the_scoring_and_keeps_the_last_scorecard(server, page):
    before = page.evaluate("window.trame.state.get('score_rows')")
    setState(page, score_methods=["occlusion", "integrated_gradients"], region_kind="predicted", error="")
    page.evaluate("document.querySelector('#score-button').click()")
    page.waitFor("window.trame.state.get('scoring') && window.trame.state.get('score_step').startsWith('explaining')",
                 timeout=60)
    page.evaluate("document.querySelector('#score-cancel').click()")
    page.waitFor("!window.trame.state.get('scoring')", timeout=60)
    assert page.evaluate("window.trame.state.get('message')") == "Scoring cancelled"
    assert page.evaluate("window.trame.state.get('error')") == ""
    assert page.evaluate("window.trame.state.get('score_rows')") == before
    setState(page, score_methods=["gradient"])  # the worker stays warm: the next scorecard comes
    page.evaluate("document.querySelector('#score-button').click()")
    page.waitFor("window.trame.state.get('scoring')", timeout=30)
    page.waitFor("!window.trame.state.get('scoring')", timeout=300)
    assert page.evaluate("window.trame.state.get('error')") == ""
    assert [row["method"] for row in page.evaluate("window.trame.state.get('score_rows')")] == ["gradient"]


class _State(dict):
    """The app state's part the watcher uses: attributes, update (each one kept in ``updates``), and ``with``."""

    __getattr__, __setattr__ = dict.get, dict.__setitem__

    def update(self, values):
        self.setdefault("updates", []).append(dict(values))
        super().update(values)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False


class _SharedWorker:
    """A worker whose every event another poller (a click's watcher) has taken: ``poll`` gives this one nothing."""

    state = "running"

    def __init__(self, number):
        self.number, self.polls = number, 0

    def poll(self):
        self.polls += 1
        return []

    def progress(self, request):
        return {"event": "progress", "request": request, "step": "faithfulness curves", "fraction": 0.4} if (
            request == self.number and self.polls >= 1) else None

    def answer(self, request):
        return SimpleNamespace(state="cancelled", error="") if self.polls >= 2 else None


def test_the_scoring_shows_its_progress_when_a_click_took_its_events():
    """The watcher reads the scoring's progress off the worker, which keeps each request's last step, so that the
    progress bar moves even when the click's watcher, polling the same worker, received the events."""
    action = ScoreAction(SimpleNamespace(state=_State(scoring=True, score_progress=0, score_step="starting")))
    asyncio.run(action._watch(_SharedWorker(7), 7))
    assert {"score_progress": 40, "score_step": "faithfulness curves"} in action.app.state["updates"]
    assert action.app.state["message"] == "Scoring cancelled" and not action.app.state["scoring"]
