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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .case_run import Progress, opened_case, sequence_record
from .requests import EvaluationRun

#: The steps of :func:`run_evaluation` around the scoring's own (:func:`~SegExplainLib.engine.evaluation.
#: evaluation_steps`).
READING_STEPS = ("reading images", "loading model")
WRITING_STEPS = ("writing scorecard",)


def score_case(pipeline: Any, prepared: Any, image_shape: tuple[int, ...], target: Any, methods: Sequence[str], *,
               seed: int, sequence_names: Sequence[str] | None, options: dict[str, Any],
               progress: Callable[[str, float], None] | None = None, cancelled: Callable[[], bool] | None = None):
    """The scorecard of ``methods`` on a prepared case, on the network's own grid, through the model the pipeline
    deploys: the region brought to the network's grid, the seed set. The caller has checked the methods against the
    model (``pipeline.check_method``, before the case is prepared).

    Args:
        pipeline: The opened model (:class:`~SegExplainLib.models.protocol.Pipeline`).
        prepared: ``pipeline.prepare(image, geometry)``.
        image_shape: The image's grid (D, H, W), where ``target`` is placed.
        target: The region on the image's grid.
        methods: The methods to score.
        seed: The run's random seed (set before scoring).
        sequence_names: One per input channel, or None.
        options: The keyword options of :func:`~SegExplainLib.engine.evaluation.evaluate` (the request's
            ``evaluation_options()``).
        progress, cancelled: As for :func:`~SegExplainLib.engine.evaluation.evaluate`.
    """
    import torch

    from ..engine.evaluation import evaluate
    from ..models.protocol import network_target

    on_network = target if prepared.on_image_grid else network_target(target, tuple(image_shape), prepared)
    torch.manual_seed(seed)
    return evaluate(prepared.model, prepared.input, on_network, list(methods), sequence_names=sequence_names,
                    progress=progress, cancelled=cancelled, **options)


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
    from ..engine.evaluation import evaluation_steps
    from ..io.outputs import write_scorecard_outputs
    from .opening import model_fields

    destination = Path(os.path.abspath(run.case.output))
    steps = [*READING_STEPS, *evaluation_steps(run.methods, run.scores), *WRITING_STEPS]
    progress = progress or Progress(run.case.progress or ("bar" if sys.stderr.isatty() else "none"), steps)
    with opened_case(run.case, progress) as opened:
        case, match, image, geometry = opened.run, opened.match, opened.image, opened.geometry
        pipeline, names, target = opened.pipeline, opened.names, opened.target
        for method in run.methods:  # before the case is prepared
            pipeline.check_method(method)
        prepared = pipeline.prepare(image, geometry)
        scorecard = score_case(pipeline, prepared, image.shape[1:], target, run.methods, seed=case.request.seed,
                               sequence_names=names, options=run.evaluation_options(),
                               progress=lambda name, fraction: progress.step(name), cancelled=cancelled)
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
