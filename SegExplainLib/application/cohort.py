"""A cohort: its cases read from a CSV or a folder, each made a case run, and the results gathered into a table.

``segexplain cohort`` explains every case of a cohort with one configuration (:func:`case_runs`): one after
another in one process, or on warm Ray workers (:mod:`SegExplainLib.frontends.raycohort`). Either way each case's
folder is written by :func:`SegExplainLib.io.outputs.write_case_outputs`, and :func:`gather` makes the per-case table
(``cohort.csv``, optionally ``cohort.parquet``), ``failures.json`` and the cohort figures from those folders.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SegExplainError
from ..io.imaging import image_stem
from .requests import CaseRun

#: Post-hoc filters of the cohort's inclusivity figure (with the unfiltered map).
INCLUSIVITY_FILTERS = ("pass:0.2", "pass:0.4", "pass:0.6", "clamp:0.2", "clamp:0.4")
#: The columns of the cohort table.
COLUMNS = ("case", "sequence", "share_positive", "share_negative", "share_absolute", "ground_truth_inclusivity")


_SPECIAL_FILES = ("label", "ground_truth")


def read_case_folders(root: Path, sequence_names: Sequence[str] | None) -> list[dict[str, Any]]:
    """One case per subfolder: its image files (``<sequence name>.nii.gz`` in that order when names are given, else
    every image file sorted by name), with ``label.*`` and ``ground_truth.*`` set apart."""
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = {image_stem(p.name): p for p in sorted(folder.iterdir()) if image_stem(p.name)}
        special = {name: str(images.pop(name)) if name in images else None for name in _SPECIAL_FILES}
        if sequence_names:
            missing = [name for name in sequence_names if name not in images]
            inputs = [str(images[name]) for name in sequence_names if name in images] if not missing else [
                str(folder / f"{missing[0]}.nii.gz")]  # reported as a missing file by that case
        else:
            inputs = [str(p) for p in images.values()]
        cases.append({"case": folder.name, "inputs": inputs, **special})
    if not cases:
        msg = f"cases folder {str(root)!r} has no case subfolders"
        raise SegExplainError(msg)
    return cases


def read_cases(path: Path, sequence_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The cases of a cohort: a CSV (columns case, inputs separated by ';', optionally label and ground_truth;
    relative paths relative to the CSV) or a folder of case folders (:func:`read_case_folders`)."""

    if path.is_dir():
        return read_case_folders(path, sequence_names)
    if not path.is_file():
        msg = f"cases file {str(path)!r} does not exist"
        raise SegExplainError(msg)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"case", "inputs"} <= set(rows[0]):
        msg = f"cases file {str(path)!r} needs the columns 'case' and 'inputs' and at least one row"
        raise SegExplainError(msg)
    names = [row["case"] for row in rows]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates or any(not name or name in (".", "..") or "/" in name or "\\" in name for name in names):
        msg = (f"case names in {str(path)!r} must be unique, non-empty, not '.' or '..' and without '/' or '\\': "
               f"{duplicates or names}")
        raise SegExplainError(msg)

    def resolve(text: str) -> str:
        candidate = Path(text.strip())
        return str(candidate if candidate.is_absolute() else path.parent / candidate)

    return [{"case": row["case"], "inputs": [resolve(p) for p in row["inputs"].split(";") if p.strip()],
             "label": resolve(row["label"]) if row.get("label") else None,
             "ground_truth": resolve(row["ground_truth"]) if row.get("ground_truth") else None} for row in rows]


def write_parquet(rows: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        msg = "--parquet needs the pyarrow package: pip install pyarrow (or segexplain[parquet])"
        raise SegExplainError(msg) from None
    pq.write_table(pa.table({column: [row[column] for row in rows] for column in columns}), path)




def case_run(case: dict[str, Any], template: CaseRun, output: Path) -> CaseRun:
    """The run of one ``case`` (of :func:`read_cases`): ``template``'s model, request and options, with the case's
    files, its label as the region (when it has one) and its folder under ``output/cases``."""
    request = dataclasses.replace(template.request, label=case["label"]) if case["label"] else template.request
    return dataclasses.replace(template, inputs=tuple(case["inputs"]), output=str(output / "cases" / case["case"]),
                               overwrite=True, progress="none", request=request,
                               ground_truth=template.ground_truth or case["ground_truth"])


def finished(case: dict[str, Any], output: Path) -> bool:
    """Whether ``case`` was explained by an earlier run of the cohort in ``output`` (it is not recomputed)."""
    return (output / "cases" / case["case"] / "summary.json").exists()


def gather(cases: Sequence[dict[str, Any]], failures: dict[str, str], output: Path, *, filters: Sequence[Any],
           parquet: bool = False) -> None:
    """Write the cohort's table (``cohort.csv``, and ``cohort.parquet`` when ``parquet``), ``failures.json`` and its
    figures (relevance shares across cases; ground-truth inclusivity per post-hoc filter in ``filters``) from the
    case folders of ``output``."""
    from ..engine import metrics
    from ..io import figures, imaging

    rows, shares, inclusivity = [], [], {"none": [], **{str(f): [] for f in filters}}
    names: list[str] | None = None
    for case in cases:
        folder = output / "cases" / case["case"]
        if case["case"] in failures:
            continue
        summary = json.loads((folder / "summary.json").read_text())
        names = summary["sequence_names"]
        case_shares = summary["relevance_shares"]
        shares.append([case_shares["positive"][n] for n in names])
        truth = summary.get("ground_truth_inclusivity")
        for name in names:
            rows.append({"case": case["case"], "sequence": name,
                         **{f"share_{kind}": case_shares[kind][name] for kind in ("positive", "negative", "absolute")},
                         "ground_truth_inclusivity": None if truth is None else truth[name]})
        if case["ground_truth"]:
            maps, geometry = imaging.read_sequences([folder / f for f in summary["files"][:len(names)]])
            mask = imaging.read_label(case["ground_truth"], geometry, resample=True) > 0
            inclusivity["none"].append(float(np.mean(metrics.ground_truth_inclusivity(maps, mask, smoothing=1.0))))
            for amplitude_filter in filters:
                values = metrics.ground_truth_inclusivity(amplitude_filter(maps), mask, smoothing=1.0)
                inclusivity[str(amplitude_filter)].append(float(np.mean(values)))
    with (output / "cohort.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    if parquet:
        write_parquet(rows, list(COLUMNS), output / "cohort.parquet")
    (output / "failures.json").write_text(json.dumps(failures, indent=2))
    if shares and names:
        figures.save_figure(figures.shares_figure(np.array(shares), sequence_names=names),
                            output / "shares_across_cases.png")
    if inclusivity["none"]:
        figures.save_figure(figures.inclusivity_figure({k: np.array(v) for k, v in inclusivity.items()},
                                                       title="ground-truth inclusivity per filter"),
                            output / "inclusivity.png")
