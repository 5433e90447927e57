"""The scorecard's figure: deletion and insertion curves against the random band, and a bar per score and method."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ...errors import SegExplainError
from .drawing import new_figure

#: The bar panels: (key, title, axis label); each reads one number per method from the scorecard.
_PANELS = (
    ("faithfulness", "Faithfulness", "above random (0 = random, 1 = best)"),
    ("randomization", "Sanity: weights randomized", "rank correlation with trained map"),
    ("robustness", "Robustness", "max-sensitivity (relative change)"),
    ("localization", "Localization", "% of positive relevance outside"),
)


def _record(scorecard: Any) -> Mapping[str, Any]:
    record = scorecard.to_json()["scorecard"] if hasattr(scorecard, "to_json") else scorecard
    if not isinstance(record, Mapping) or not {"methods", "curves", "settings", "target"} <= set(record):
        raise SegExplainError("scorecard must be a Scorecard or its summary.json entry 'scorecard'")
    return record


def _relative(scores: Any, image: float, reference: float) -> np.ndarray:
    """Scores on the scale 1 = the image's, 0 = the reference's (every curve starts or ends there)."""
    return (np.asarray(scores, dtype=np.float64) - reference) / (image - reference or 1.0)


def _curves(ax, record: Mapping[str, Any], mode: str, colours: dict[str, Any]) -> None:
    curves = record["curves"]
    first = next(iter(curves.values()))
    image, reference = first["deletion"][0], first["deletion"][-1]
    fractions = 100 * np.asarray(first["fractions"])
    random = np.array([_relative(c[mode], image, reference) for name, c in curves.items()
                       if name.startswith("random:")])
    low, high = random.mean(0) - random.std(0), random.mean(0) + random.std(0)
    ax.fill_between(fractions, low, high, color="0.6", alpha=0.35, label="random orders (mean ± SD)", gid="random")
    ax.plot(fractions, random.mean(0), color="0.4", linestyle="--", linewidth=1.0)
    for name, colour in colours.items():
        ax.plot(fractions, _relative(curves[name][mode], image, reference), color=colour, linewidth=1.8,
                label=name, gid=f"{mode}:{name}")
    verb = "removed" if mode == "deletion" else "restored"
    ax.set_xlabel(f"% of image blocks {verb} (most relevant first)")
    ax.set_ylabel("target score (1 = image, 0 = reference)")
    better = "lower" if mode == "deletion" else "higher"
    ax.set_title(f"{mode.capitalize()}: {better} is more faithful")
    ax.set_xlim(0, 100)
    ax.grid(alpha=0.3)


def _bars(ax, record: Mapping[str, Any], key: str, colours: dict[str, Any]) -> None:
    methods, settings = record["methods"], record["settings"]
    names = [name for name in colours if key in methods[name] and methods[name][key].get("undefined") is None]
    positions = np.arange(len(names))
    if key == "faithfulness":
        values = [(methods[n][key]["deletion"]["mean"] + methods[n][key]["insertion"]["mean"]) / 2 for n in names]
        errors = [(methods[n][key]["deletion"]["std"] + methods[n][key]["insertion"]["std"]) / 2 for n in names]
        ax.bar(positions, values, yerr=errors, color=[colours[n] for n in names], capsize=3)
        ax.axhline(0.0, color="0.3", linewidth=1.0)
    elif key == "randomization":
        ax.bar(positions, [methods[n][key]["final_spearman"] for n in names], color=[colours[n] for n in names])
        ax.axhline(settings["randomization_threshold"], color="#b2182b", linestyle="--", linewidth=1.0,
                   label="fails at or above")
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.05)
    elif key == "robustness":
        ax.bar(positions, [methods[n][key]["max_sensitivity"] for n in names], color=[colours[n] for n in names])
        ax.axhline(settings["robustness_threshold"], color="#b2182b", linestyle="--", linewidth=1.0,
                   label="not robust at or above")
    else:
        width = 0.4
        ax.bar(positions - width / 2, [100 * methods[n][key]["outside_receptive_field"] for n in names], width,
               color=[colours[n] for n in names], label="outside the receptive field")
        ax.bar(positions + width / 2, [100 * (methods[n][key]["outside_target"] or 0.0) for n in names], width,
               color=[colours[n] for n in names], alpha=0.45, hatch="//", label="outside the target region")
        ax.set_ylim(0, 100)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper right")
    ax.set_xticks(positions)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def scorecard_figure(scorecard: Any, *, title: str | None = None) -> Figure:
    """The scorecard as one figure a radiologist can read without help.

    Top: the deletion and insertion curves of each method, the target score on the scale 1 = the image's and
    0 = the reference's, over the random orders' band (mean ± standard deviation). Bottom: one bar per method for
    each score computed (faithfulness with its spread, the rank correlation after randomizing every layer with its
    pass line, max-sensitivity with its line, and the relevance outside the receptive field and the target).

    Args:
        scorecard: A :class:`~SegExplainLib.engine.evaluation.Scorecard`, or its ``summary.json`` entry
            ``"scorecard"`` (the review app redraws from the file).
        title: The figure's title; default: the region and the recommendation.

    Returns:
        A figure on its own Agg canvas; axes labelled ``"deletion"``, ``"insertion"`` and one per score panel
        (``"faithfulness"``, ...); curves carry gid ``"<mode>:<method>"``.
    """
    record = _record(scorecard)
    names = list(record["methods"])
    palette = [f"C{i % 10}" for i in range(len(names))]
    colours = dict(zip(names, palette))
    panels = [panel for panel in _PANELS if any(panel[0] in row for row in record["methods"].values())]
    figure = new_figure(max(10.0, 3.0 * len(panels)), 7.5)
    # one grid, not subfigures: save_figure frees a figure's axes one by one, which subfigures' axes refuse
    count = max(len(panels), 1)
    grid = figure.add_gridspec(2, 2 * count, height_ratios=[1.1, 1.0])
    if "faithfulness" in record["settings"]["scores"]:
        for index, mode in enumerate(("deletion", "insertion")):
            ax = figure.add_subplot(grid[0, index * count:(index + 1) * count])
            ax.set_label(mode)
            _curves(ax, record, mode, colours)
        figure.axes[0].legend(fontsize=8, loc="upper right")
    for index, (key, heading, label) in enumerate(panels):
        ax = figure.add_subplot(grid[1, 2 * index:2 * index + 2])
        ax.set_label(key)
        _bars(ax, record, key, colours)
        ax.set_title(heading, fontsize=10)
        ax.set_ylabel(label, fontsize=8)
    target = record["target"]
    figure.suptitle(title or f"Which map can I trust? {target['kind']} region of class {target['class_index']} "
                             f"({target['region_voxels']} voxels)\nRecommended: {record['recommendation']}",
                    fontsize=10)
    return figure
