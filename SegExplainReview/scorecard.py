"""The review app's "Score methods" action: which map can be trusted for this network, case and region?

The warm worker scores the chosen methods on the page's region (:meth:`~SegExplainLib.frontends.worker.Worker.
evaluate`, the scorecard of ``segexplain evaluate``, docs/evaluation.md) with a progress bar and a Cancel button.
The page shows the scorecard's figure, a table per method (faithfulness above random with its spread, the
randomization check, robustness, leakage, time, verdict) and the recommendation, and offers ``summary.json`` and the
figure as downloads, behind the app's token like its other downloads.
"""

from __future__ import annotations

import asyncio
import base64
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from trame.widgets import html
from trame.widgets import vuetify3 as v
from trame_server.utils.asynchronous import create_task

from SegExplainLib.engine.api import METHODS
from SegExplainLib.errors import SegExplainError
from SegExplainLib.io.figures import save_figure, scorecard_figure

#: The methods scored by default: a method of each kind whose maps take one backward pass (Integrated Gradients,
#: SmoothGrad and the perturbation methods take many, for each of the scorecard's maps: choose them to compare them).
DEFAULT_METHODS = ("gradient", "gradient_x_input", "lrp", "guided_backprop")
#: The scoring options of the page: shorter curves, fewer random orders, stages and noisy inputs than
#: ``segexplain evaluate``'s defaults (the "fast" preset of bench/bench_scorecard.py), for an answer while the user
#: waits; docs/review-app.md gives its time on the demo case.
REVIEW_SCORING = {"steps": 8, "random_orders": 3, "randomization_stages": 2, "n_perturbations": 2}
#: The table's columns: its state key and title.
COLUMNS = (("method", "Method"), ("deletion", "Deletion"), ("insertion", "Insertion"),
           ("randomization", "Randomization"), ("robustness", "Max-sens."), ("leakage", "Off RF / target"),
           ("seconds", "Time (s)"), ("verdict", "Verdict"))


def _number(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def scoreRows(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """The table of a scorecard (``summary.json``'s ``"scorecard"``): one row of texts per method.

    A faithfulness area is "mean ± spread" above random (0: no better than a random order); the randomization
    column says pass or fail with the rank correlation after the last stage; a score not computed is "-".
    """
    rows = []
    for name, row in record["methods"].items():
        faithful = row.get("faithfulness", {})
        area = {mode: (f"{_number(faithful[mode]['mean'])} ± {_number(faithful[mode]['std'])}" if mode in faithful
                       else "undefined" if "undefined" in faithful else "-") for mode in ("deletion", "insertion")}
        sanity = row.get("randomization")
        local = row.get("localization", {})
        rows.append({"method": name, **area,
                     "randomization": "-" if sanity is None else (
                         f"{'pass' if sanity['passed'] else 'FAIL'} (rho {_number(sanity['final_spearman'])})"),
                     "robustness": _number(row.get("robustness", {}).get("max_sensitivity")),
                     "leakage": (f"{_number(local.get('outside_receptive_field'))} / "
                                 f"{_number(local.get('outside_target'))}") if local else "-",
                     "seconds": _number(row["seconds"], 1), "verdict": row["verdict"]})
    return rows


class ScoreAction:
    """The Score methods action of a :class:`~SegExplainReview.app.ReviewApp`: its state, controls, watcher and
    downloads.

    Args:
        app: The app; its session's warm worker computes the scorecard.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.worker: Any = None  # the worker of the running request, and its number there
        self.number: int | None = None
        self.summary: dict[str, Any] | None = None  # the last scorecard, as summary.json
        self.figure = b""  # its PNG

    @staticmethod
    def initialState() -> dict[str, Any]:
        return {"score_method_names": sorted(METHODS), "score_methods": list(DEFAULT_METHODS), "scoring": False,
                "score_progress": 0, "score_step": "", "score_rows": [], "score_recommendation": "",
                "scorecard_png": "",
                "score_columns": [{"key": key, "title": title} for key, title in COLUMNS]}

    def start(self) -> None:
        """Ask the warm worker for the scorecard of the chosen methods on the page's region, watched by an asyncio
        task that shows its progress, then its figure and table."""
        state = self.app.state
        if state.scoring:
            return
        try:
            methods = tuple(state.score_methods or ())
            self.worker, self.number = self.app.session.startEvaluation(self.app.parameters(), methods,
                                                                          **REVIEW_SCORING)
        except SegExplainError as error:
            state.error = str(error)
            return
        state.update({"scoring": True, "score_progress": 0, "score_step": "starting", "error": "",
                      "message": f"Scoring {len(methods)} methods on the region"})
        create_task(self._watch(self.worker, self.number))

    def cancel(self) -> None:
        """Stop the running scorecard; the worker stays warm."""
        if self.app.state.scoring and self.worker is not None:
            self.worker.cancel(self.number)

    async def _watch(self, worker: Any, number: int) -> None:
        while (answer := worker.answer(number)) is None and worker.state == "running":
            await asyncio.sleep(0.05)
            worker.poll()  # another watcher (a click's) may receive this request's events: read them off the worker
            progress = worker.progress(number)
            if progress is not None and "fraction" in progress:
                with self.app.state:
                    self.app.state.update({"score_progress": round(100 * progress["fraction"]),
                                           "score_step": progress["step"]})
        with self.app.state:
            self.app.state.update({"scoring": False, "score_step": ""})
            if answer is not None and answer.state == "cancelled":
                self.app.state.message = "Scoring cancelled"
            elif answer is None or answer.state != "done":
                self.app.state.error = answer.error if answer is not None and answer.error else (
                    f"the methods were not scored (the worker is {worker.state})")
            else:
                self._show(answer)

    def _show(self, answer: Any) -> None:
        from SegExplainLib.engine.explanation import software_versions

        record = answer.record["scorecard"]
        self.summary = {**answer.record, "software": software_versions()}
        with tempfile.TemporaryDirectory(dir=self.app.session.scratchFolder()) as folder:
            self.figure = save_figure(scorecard_figure(record), Path(folder) / "scorecard.png").read_bytes()
        self.app.state.update({"scorecard_png": f"data:image/png;base64,{base64.b64encode(self.figure).decode()}",
                               "score_rows": scoreRows(record), "score_recommendation": record["recommendation"],
                               "message": f"Scored {len(record['methods'])} methods in {answer.seconds:.1f} s"})

    # downloads ---------------------------------------------------------------------------------------------------

    def routes(self, route: str) -> list[Any]:
        """The downloads under ``route`` (the app's guard asks for the token there)."""
        return [web.get(f"{route}/scorecard/summary.json", self._summaryResponse),
                web.get(f"{route}/scorecard/scorecard.png", self._figureResponse)]

    async def _summaryResponse(self, _request: web.Request) -> web.Response:
        if self.summary is None:
            return web.Response(status=404, text="no scorecard yet: score the methods first")
        body = json.dumps(self.summary, indent=2, default=str).encode()
        return self.app.attachment(body, "segexplain-scorecard-summary.json", "application/json")

    async def _figureResponse(self, _request: web.Request) -> web.Response:
        if self.summary is None:
            return web.Response(status=404, text="no scorecard yet: score the methods first")
        return self.app.attachment(self.figure, "segexplain-scorecard.png", "image/png")

    # page --------------------------------------------------------------------------------------------------------

    def controls(self, route: str) -> None:
        """The action's controls, table and figure in the page's side panel."""
        v.VSelect(label="Methods to score", v_model=("score_methods",), items=("score_method_names",), multiple=True,
                  chips=True, density="compact", hide_details=True, classes="mb-2", id="score-methods")
        with html.Div(classes="d-flex ga-2 mb-2"):
            v.VBtn("Score methods", click=self.start, size="small", disabled=("scoring",), id="score-button")
            v.VBtn("Cancel", click=self.cancel, size="small", disabled=("!scoring",), id="score-cancel")
            v.VBtn("JSON", href=f"{route}/scorecard/summary.json", download="segexplain-scorecard-summary.json",
                   size="small", v_if="scorecard_png", id="score-summary")
            v.VBtn("PNG", href=f"{route}/scorecard/scorecard.png", download="segexplain-scorecard.png", size="small",
                   v_if="scorecard_png", id="score-figure-download")
        v.VProgressLinear(model_value=("score_progress",), active=("scoring",), height=4, color="primary",
                          id="score-progress")
        html.Div("{{ score_step }}", v_if="scoring", classes="text-caption", id="score-step")
        with html.Table(v_if="score_rows.length", classes="text-caption mt-1", id="score-table"):
            with html.Tr():
                html.Th("{{ c.title }}", v_for="c in score_columns", key="c.key")
            with html.Tr(v_for="row in score_rows", key="row.method"):
                html.Td("{{ row[c.key] }}", v_for="c in score_columns", key="c.key")
        html.Div("{{ score_recommendation }}", v_if="score_recommendation", classes="text-caption",
                 id="score-recommendation")
        html.Img(src=("scorecard_png",), v_if="scorecard_png", style="width: 100%;", id="scorecard-figure")
