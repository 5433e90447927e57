"""A scorecard run: read the case, open the model, score the methods and write the scorecard's folder.

:func:`run_evaluation` is what ``segexplain evaluate`` does with an :class:`~SegExplainLib.application.requests.
EvaluationRun`, and what the Slicer module and the review app call: one function from the request to the folder
(``summary.json``, ``curves.csv``, ``scorecard.png``), telling its steps to a
:class:`~SegExplainLib.application.case_run.Progress` and asking ``cancelled`` between them. The case is read and
its region placed as ``segexplain explain`` does (:func:`~SegExplainLib.application.case_run.run_case`); the methods
are scored on the network's own grid, through the model the pipeline deploys (sliding window, mirroring, folds).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from .case_run import Progress, opened_case, sequence_record
from .requests import EvaluationRun

#: The steps of :func:`run_evaluation` around the scoring's own (:func:`~SegExplainLib.engine.evaluation.
#: evaluation_steps`).
READING_STEPS = ("reading images", "loading model")
WRITING_STEPS = ("writing scorecard",)


def run_evaluation(run: EvaluationRun, progress: Progress | None = None,
                   cancelled: Callable[[], bool] | None = None):
    """Score the methods of ``run`` on its case and write the scorecard's folder (``segexplain evaluate``).

    Args:
        run: The case, model, region, methods and scores.
        progress: The display of the steps and warnings; default: ``run.case.progress`` (a bar on a terminal,
            nothing otherwise).
        cancelled: Asked between steps; when it returns true the run stops with a SegExplainError and writes nothing.

    Returns:
        The :class:`~SegExplainLib.engine.evaluation.Scorecard`; the folder is ``run.case.output``.

    Raises:
        SegExplainError: Bad input (files, grids, model, region, a method the model cannot run), or an output folder
            that may not be replaced (refused before anything is computed).
    """
    import torch

    from ..engine.evaluation import evaluate, evaluation_steps
    from ..io.outputs import write_scorecard_outputs
    from ..models.protocol import network_target
    from .opening import model_fields

    destination = Path(os.path.abspath(run.case.output))
    steps = [*READING_STEPS, *evaluation_steps(run.methods, run.scores), *WRITING_STEPS]
    progress = progress or Progress(run.case.progress or ("bar" if sys.stderr.isatty() else "none"), steps)
    with opened_case(run.case, progress) as opened:
        case, match, image, geometry = opened.run, opened.match, opened.image, opened.geometry
        pipeline, names, target = opened.pipeline, opened.names, opened.target
        for method in run.methods:
            pipeline.check_method(method)
        prepared = pipeline.prepare(image, geometry)
        on_network = target if prepared.on_image_grid else network_target(target, tuple(image.shape[1:]), prepared)
        torch.manual_seed(case.request.seed)
        scorecard = evaluate(prepared.model, prepared.input, on_network, list(run.methods), sequence_names=names,
                             progress=lambda name, fraction: progress.step(name), cancelled=cancelled,
                             **run.evaluation_options())
        for name, row in scorecard.methods.items():
            for warning in row["warnings"]:
                progress.warn(f"{name}: {warning}")
        record = {"inputs": [str(Path(p).resolve()) for p in case.inputs], "sequence_names": names,
                  "geometry": geometry.to_dict(), **model_fields(pipeline), **sequence_record(case, match),
                  "evaluation_run": run.to_json(), "grid": "image" if prepared.on_image_grid else "network"}
        write_scorecard_outputs(destination, overwrite=case.overwrite, scorecard=scorecard, record=record,
                                figures=case.figures, progress=progress)
    progress.finish(Path(case.output))
    return scorecard
