"""A case run: read the sequence files, open the model, prepare, explain and write the output folder.

:func:`run_case` is what ``segexplain explain`` does with a :class:`~SegExplainLib.application.requests.CaseRun`; it
tells its steps and warnings to a :class:`Progress` (a bar on a terminal, JSON lines for a GUI, ``[k/N] step`` lines,
or nothing). The output folder is written whole at the end, or not at all (:mod:`SegExplainLib.io.outputs`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GridMismatchError, SegExplainError
from .requests import CaseRun
from .sequences import AS_GIVEN, SequenceMatch, input_name, match_sequences

#: The steps of :func:`run_case`, as its progress names them.
CASE_STEPS = ("reading images", "loading model", "explaining", "writing maps", "figures", "summary")


class Progress:
    """Progress of the steps of one run: a bar on a terminal, JSON lines for a GUI, ``[k/N] step`` lines, or
    nothing."""

    def __init__(self, mode: str, steps: Sequence[str], stream=None) -> None:
        self.mode, self.steps, self.done = mode, list(steps), 0
        self.stream = stream or (sys.stdout if mode == "json" else sys.stderr)
        self.started = time.perf_counter()

    def step(self, name: str) -> None:
        """Announce that step ``name`` starts."""
        fraction = self.done / len(self.steps)
        self.done += 1
        if self.mode == "json":
            self.stream.write(json.dumps({"event": "progress", "step": name, "fraction": round(fraction, 3)}) + "\n")
        elif self.mode == "bar":
            filled = int(30 * fraction)
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {name:<28}")
        elif self.mode == "lines":
            self.stream.write(f"[{self.done}/{len(self.steps)}] {name}\n")
        self.stream.flush()

    def warn(self, message: str) -> None:
        """Show something the user should know about the result (it is also in summary.json)."""
        if self.mode == "json":
            self.stream.write(json.dumps({"event": "warning", "message": message}) + "\n")
            self.stream.flush()
        else:  # also without a progress display: a warning is never silent
            self.say(f"warning: {message}")

    def say(self, line: str) -> None:
        """Write a line on stderr, below the bar if one is drawn."""
        sys.stderr.write(f"{chr(10) if self.mode == 'bar' else ''}{line}\n")
        sys.stderr.flush()

    def finish(self, output: Path) -> None:
        seconds = time.perf_counter() - self.started
        if self.mode == "json":
            self.stream.write(json.dumps({"event": "done", "fraction": 1.0, "output": str(output),
                                          "seconds": round(seconds, 3)}) + "\n")
        elif self.mode == "bar":
            self.stream.write(f"\r[{'#' * 30}] done in {seconds:.1f} s{' ' * 20}\n")
        self.stream.flush()


@contextlib.contextmanager
def resample_advice() -> Iterator[None]:
    """Grid mismatches advise the option: the library's advice names its argument."""
    try:
        yield
    except GridMismatchError as error:
        raise GridMismatchError(error.problem, advice="pass --resample to resample it") from None


def failure_text(error: BaseException) -> str:
    """How ``failures.json`` records a case's error: its type and the first line of its message."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def case_sequence_names(given: Sequence[str] | None, known: Sequence[str] | None, channels: int) -> list[str]:
    """The sequence names of a case: those given, else the model's, else ``sequence0``, ...; one per channel."""
    names = list(given or known or [f"sequence{i}" for i in range(channels)])
    if len(names) != channels:
        whose = "sequence names given" if given else "sequences of the model, in order:"
        msg = f"{channels} image channels for {len(names)} {whose} {', '.join(names)}"
        raise SegExplainError(msg)
    return names


def shown_region(target: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """The region the figures' slices go through: the target's own on the case's grid (a segment, a box, a clicked
    ball), or None when it depends on the prediction or covers the whole volume (the slices then follow relevance)."""
    region = target.grid_region(tuple(shape))
    return None if region is None or region.all() else np.asarray(region, bool)


def match_case_inputs(run: CaseRun, known: Sequence[str]) -> tuple[CaseRun, SequenceMatch | None]:
    """The run with its files in the order of its sequences (``--sequence-names``, else the model's ``known``),
    matched by their names (:func:`~SegExplainLib.application.sequences.match_sequences`), and the match; the run as
    it is and None for one file (a 4D file's channels are in its own order) or when no sequence has a name."""
    names = run.sequence_names or known
    if len(run.inputs) == 1 or not names:
        return run, None
    match = match_sequences([input_name(path) for path in run.inputs], names, given_order=True)
    return dataclasses.replace(run, inputs=tuple(match.ordered(run.inputs))), match


def sequence_record(run: CaseRun, match: SequenceMatch | None) -> dict:
    """The entries of ``summary.json`` that say which file went to which sequence (:func:`match_case_inputs`'s run
    and match)."""
    if match is None:
        return {"sequence_order": AS_GIVEN}
    return match.record([Path(path).name for path in run.inputs])


@dataclasses.dataclass(frozen=True)
class OpenedCase:
    """A case read and its model opened: the run with its files in the model's order, how they were matched, the
    image (C, D, H, W) and its geometry, the model's pipeline, the sequence names and the region to explain."""

    run: CaseRun
    match: SequenceMatch | None
    image: np.ndarray
    geometry: Any
    pipeline: Any
    names: list[str]
    target: Any


@contextlib.contextmanager
def opened_case(run: CaseRun, progress: Progress) -> Iterator[OpenedCase]:
    """The first steps of every case run (an explanation's, a scorecard's): the output folder checked (refused at
    once, not after the work), the files put in the model's order (or refused), the images read, the model opened,
    the sequence names and the region placed; a resampling's advice is given for the whole block."""
    from ..io import imaging
    from ..io.outputs import check_replaceable
    from .opening import open_model

    check_replaceable(Path(os.path.abspath(run.output)), run.overwrite)
    run, match = match_case_inputs(run, run.model.sequence_names())
    if match is not None and match.message():
        progress.say(match.message())
    with resample_advice():
        progress.step("reading images")
        image, geometry = imaging.read_sequences(list(run.inputs), resample=run.resample)
        progress.step("loading model")
        pipeline = open_model(run.model)
        names = case_sequence_names(run.sequence_names, pipeline.sequences, image.shape[0])
        target = run.request.target(geometry, resample=run.resample)
        yield OpenedCase(run, match, image, geometry, pipeline, names, target)


def run_case(run: CaseRun, progress: Progress | None = None) -> Path:
    """Explain one case from its files into its output folder (``segexplain explain``); returns the folder as given.

    Args:
        run: The case, model, request and outputs.
        progress: The display of the steps (:data:`CASE_STEPS`) and warnings; default: ``run.progress`` (a bar on a
            terminal, nothing otherwise).

    Raises:
        SegExplainError: Bad input (files, grids, model, region), or an output folder that may not be replaced
            (refused before anything is computed).
    """
    import torch

    from ..engine.filters import AmplitudeFilter
    from ..io import imaging
    from ..io.outputs import write_case_outputs
    from ..models.pipelines import explain_case, segment_matrix_case
    from .opening import model_fields

    output = Path(run.output)
    destination = Path(os.path.abspath(output))  # "." and "results/.." have a name and a parent folder too
    filters = [AmplitudeFilter.parse(spec) for spec in run.filters]
    progress = progress or Progress(run.progress or ("bar" if sys.stderr.isatty() else "none"), CASE_STEPS)
    request = run.request
    with opened_case(run, progress) as case:
        run, match, image, geometry = case.run, case.match, case.image, case.geometry
        pipeline, names, target = case.pipeline, case.names, case.target
        torch.manual_seed(request.seed)
        progress.step("explaining")
        pipeline.check_method(request.method)  # before the case is prepared
        prepared = pipeline.prepare(image, geometry)  # once, for the explanation and the segment matrix
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = explain_case(pipeline, image, geometry, target, request.method, prepared=prepared,
                                  **request.engine_options())
        for warning in caught:  # the explanation's own warnings are shown once, by the progress display
            if str(warning.message) not in result.warnings:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        for warning in result.warnings:
            progress.warn(warning)
        matrix = None
        if run.segment_matrix:
            labels = imaging.read_label(run.segment_labels, geometry, resample=run.resample) if (
                run.segment_labels) else None
            matrix = segment_matrix_case(pipeline, image, geometry, request.method, segmentation=labels,
                                         prepared=prepared, case=Path(run.inputs[0]).name, device=request.device,
                                         **request.method_options())
            progress.say(f"segment matrix ({matrix.method}, batched passes: {matrix.passes}):\n"
                         f"{matrix.to_csv().rstrip()}")
        write_case_outputs(destination, overwrite=run.overwrite, image=image, geometry=geometry, maps=result.maps,
                           record={**result.record(), **sequence_record(run, match)}, names=names,
                           inputs=list(run.inputs), model=model_fields(pipeline),
                           filters=filters, ground_truth=run.ground_truth, resample=run.resample,
                           figures=run.figures, region=shown_region(target, image.shape[1:]), progress=progress,
                           segment_matrix=matrix)
    progress.finish(output)
    return output
