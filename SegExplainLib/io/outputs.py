"""The output folder of a case: written whole or not at all, and only where SegExplain wrote before.

A case's results (relevance maps per sequence, ``summary.json``, figures) are written to a staging folder beside the
destination and renamed into place at the very end (:func:`write_case_outputs`), so an interrupted run leaves no
output folder behind. Output folders carry a marker file (:data:`OUTPUT_MARKER`): ``overwrite`` replaces only a folder
that has it, and only once the new results are complete; no other folder is ever written into or replaced.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SegExplainError

#: The file that marks a folder as written by SegExplain; no other folder is ever written into or replaced.
OUTPUT_MARKER = ".segexplain-output"
MARKER_TEXT = "Written by SegExplain: 'segexplain ... --overwrite' may replace this whole folder.\n"


def holds_results(path: Path) -> bool:
    """Whether ``path`` holds earlier SegExplain results; refuses a file and a folder SegExplain did not write.

    A missing path and an empty folder hold none.
    """
    if path.exists() and not path.is_dir():
        msg = f"output {str(path)!r} is a file, not a folder; choose a folder path that does not exist yet"
        raise SegExplainError(msg)
    if not path.exists() or not any(path.iterdir()):
        return False
    if not (path / OUTPUT_MARKER).is_file():
        msg = (f"output folder {str(path)!r} is not a SegExplain output folder (it has no {OUTPUT_MARKER} file), so "
               f"SegExplain never writes into it or replaces it, even with --overwrite; choose a new folder")
        raise SegExplainError(msg)
    return True


def check_replaceable(path: Path, overwrite: bool) -> None:
    if holds_results(path) and not overwrite:
        msg = (f"output folder {str(path)!r} already holds SegExplain results; choose another folder or pass "
               f"--overwrite to replace them")
        raise SegExplainError(msg)


def prepare_output(path: Path, overwrite: bool) -> Path:
    """A fresh staging folder beside ``path``, marked as SegExplain's; refuses what may not be replaced."""
    check_replaceable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    (staging / OUTPUT_MARKER).write_text(MARKER_TEXT)
    return staging


def move_into_place(staging: Path, path: Path, overwrite: bool) -> None:
    """Put the finished ``staging`` folder at ``path``. An existing folder is moved aside first and deleted only once
    the new one is in place; if the new one cannot be moved in, the old one is moved back."""
    check_replaceable(path, overwrite)  # again: the folder may have changed during the run
    if not path.exists():
        staging.rename(path)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    old = path.rename(aside / path.name)
    try:
        staging.rename(path)
    except BaseException:
        old.rename(path)  # should this fail too, the old results stay in the aside folder
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def staged_output(path: Path, overwrite: bool) -> Iterator[Path]:
    """A staging folder for the results of ``path`` (see :func:`prepare_output`), moved into place when the block
    ends without an error; a failed run's partial results are deleted, and nothing at ``path`` is touched."""
    staging = prepare_output(path, overwrite)
    try:
        yield staging
        move_into_place(staging, path, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone once moved into place


def write_case_outputs(destination: Path, *, overwrite: bool, image: np.ndarray, geometry, maps: np.ndarray,
                       record: dict[str, Any], names: Sequence[str], inputs: Sequence[str], model: dict[str, Any],
                       filters: Sequence[Any], ground_truth: str | None, resample: bool,
                       figures: bool | dict[str, bytes], region: np.ndarray | None = None,
                       progress: Any = None, segment_matrix: Any = None) -> dict[str, Any]:
    """Write one case's results as ``segexplain explain`` does: maps per sequence, ``summary.json``, figures.

    Used by ``segexplain explain`` and by both ways of ``segexplain cohort`` (serial, Ray workers), so that a case's
    folder is the same whichever wrote it. Everything is written to a staging folder beside ``destination`` that is
    renamed into place at the end.

    Args:
        destination: The case's output folder.
        overwrite: Replace an earlier SegExplain result there.
        image: The case (C, D, H, W) as read, on ``geometry``.
        geometry: The case's grid.
        maps: The relevance maps (C, D, H, W) on the case's grid.
        record: The explanation's record (:meth:`~SegExplainLib.engine.explanation.Explanation.record`).
        names: The sequence names, one per channel.
        inputs: The sequence files read.
        model: The model's entries of ``summary.json`` (``model``, ``normalized_input``, ``sliding_window``).
        filters: Post-hoc filters whose maps are written as well.
        ground_truth: A ground-truth label file: inclusivity per sequence.
        resample: Resample the ground truth onto the case's grid.
        figures: Draw and write the PNG figures; or the figures already drawn (:func:`case_figures`, by a Ray
            worker), file name to PNG bytes, written as they are.
        region: The explained region on the case's grid, for the montage's slices (None: where relevance is).
        progress: The run's progress display (its ``step(name)`` is told each step), or None.
        segment_matrix: A :class:`~SegExplainLib.engine.segments.SegmentMatrix` to write as
            ``segment_matrix.csv`` (and ``segment_matrix.png`` with the figures), in ``summary.json`` under
            ``segment_matrix``; or None.

    Returns:
        The summary written to ``summary.json``.
    """
    from ..engine import metrics
    from ..engine.explanation import software_versions
    from . import figures as figures_module
    from . import imaging

    step = progress.step if progress is not None else lambda name: None
    with staged_output(destination, overwrite) as staging:
        step("writing maps")
        maps = np.asarray(maps, dtype=np.float32)
        written = imaging.write_maps(maps, geometry, staging, names)
        for amplitude_filter in filters:
            tag = str(amplitude_filter).replace(":", "_").replace(",", "-")
            written += imaging.write_maps(amplitude_filter(maps), geometry, staging, names,
                                          prefix=f"relevance_{tag}_")
        summary = {
            **record, "inputs": [str(Path(p).resolve()) for p in inputs], "sequence_names": list(names),
            "geometry": geometry.to_dict(), **model,
            "relevance_shares": metrics.shares_by_name(maps, names),
            "post_hoc_filters": [str(f) for f in filters], "files": [p.name for p in written],
            "software": software_versions(),
        }
        if ground_truth:
            truth = imaging.read_label(ground_truth, geometry, resample=resample) > 0
            summary["ground_truth_inclusivity"] = dict(zip(names, metrics.ground_truth_inclusivity(
                maps, truth, smoothing=1.0).tolist()))
            summary["input_inclusivity"] = dict(zip(names, metrics.input_inclusivity(maps, image,
                                                                                     smoothing=1.0).tolist()))
        if segment_matrix is not None:
            (staging / "segment_matrix.csv").write_text(segment_matrix.to_csv())
            summary["files"].append("segment_matrix.csv")
            summary["segment_matrix"] = segment_matrix.record()
        step("figures")
        if isinstance(figures, dict):
            for filename, png in figures.items():
                (staging / filename).write_bytes(png)
            summary["figures"] = list(figures)
        elif figures:
            summary["figures"] = case_figures(image, maps, names, staging, geometry=geometry, record=record,
                                              region=region)
            if segment_matrix is not None:
                figures_module.save_figure(figures_module.segment_matrix_figure(segment_matrix),
                                           staging / "segment_matrix.png")
                summary["figures"].append("segment_matrix.png")
        step("summary")
        (staging / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def case_figures(image: np.ndarray, maps: np.ndarray, names: Sequence[str], folder: Path, *, geometry,
                 record: dict[str, Any], region: np.ndarray | None = None) -> list[str]:
    """Write a case's figures (``mip.png``, ``montage.png``, ``shares.png``, see
    :func:`~SegExplainLib.io.figures.explanation_figures`) into ``folder``; their names.

    ``record`` is the explanation's record (method, region, class, target score for the titles); ``region`` the
    explained region on the case's grid, which the montage's slices go through (None: where relevance is).
    """
    from . import figures

    drawn = figures.explanation_figures(image, maps, sequence_names=names, geometry=geometry, record=record,
                                        region=region)
    for filename, figure in drawn.items():
        figures.save_figure(figure, folder / filename)
    return list(drawn)


def write_scorecard_outputs(destination: Path, *, overwrite: bool, scorecard: Any, record: dict[str, Any],
                            figures: bool, progress: Any = None) -> dict[str, Any]:
    """Write a scorecard (``segexplain evaluate``): ``summary.json``, ``curves.csv`` and ``scorecard.png``.

    Written like a case's results: to a staging folder renamed into place at the end, into a folder SegExplain
    wrote or a new one.

    Args:
        destination: The output folder.
        overwrite: Replace an earlier SegExplain result there.
        scorecard: The :class:`~SegExplainLib.engine.evaluation.Scorecard`.
        record: The run's other entries of ``summary.json`` (inputs, model, sequence order, request).
        figures: Draw ``scorecard.png``.
        progress: The run's progress display (its ``step(name)`` is told each step), or None.

    Returns:
        The summary written to ``summary.json``.
    """
    import csv

    from ..engine.explanation import software_versions

    step = progress.step if progress is not None else lambda name: None
    with staged_output(destination, overwrite) as staging:
        step("writing scorecard")
        with (staging / "curves.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["order", "mode", "fraction", "score"])
            for name, curve in scorecard.curves.items():
                for mode in ("deletion", "insertion"):
                    writer.writerows([name, mode, f, s] for f, s in zip(curve.fractions, getattr(curve, mode)))
        summary = {**record, **scorecard.to_json(), "files": ["curves.csv"], "software": software_versions()}
        if figures:
            from . import figures as drawing

            drawing.save_figure(drawing.scorecard_figure(scorecard), staging / "scorecard.png")
            summary["figures"] = ["scorecard.png"]
        (staging / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
