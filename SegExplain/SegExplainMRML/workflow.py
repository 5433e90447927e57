"""The explain workflow shared by the Slicer module and the browser review app: controls in, explanation out.

Both front ends keep their controls in an object with the same attribute names: the module's parameter node
(``SegExplainParameterNode``) and the review app's ``ReviewParameters``. The functions here read those attributes,
so the region, the settings, the warm worker's runs, the loading and the display are the same code in both. An attribute a front
end does not offer takes the logic's default (:class:`ExplainSettings`).

The attributes read: the model (``modelKind``, ``modelCard``, ``modelFolder``, ``nnunetConfiguration``,
``nnunetFolds``, ``nnunetMirroring``; see :func:`modelSource`), ``regionKind``, ``radius``, ``regionSegmentId``; the :class:`ExplainSettings` fields
(``method``, ``composite``, ``nSteps``, ...); ``advancedOptions`` (any other engine option, a JSON object);
``layerwiseFilter`` with ``filterKind``, ``filterLow``, ``filterHigh``;
``displayedSequence``, ``overlayOpacity``; ``montageOrientation``; ``scoreMethods`` (the methods "Score methods"
scores).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path, PurePath
from typing import Any

from SegExplainLib.application.model_source import ModelSource
from SegExplainLib.application.options import json_object
from SegExplainLib.errors import SegExplainError

from . import display, export, nodes, results
from .job import SCORED_METHODS, ExplainSettings, Region, ScoreRun, WarmExplainer, WarmRun

#: Reference from an overlay volume to the relevance volume whose (filtered) map it shows.
_SHOWN_RELEVANCE = "segexplainShownRelevance"


def modelSource(parameters: Any) -> ModelSource:
    """The model the controls name: ``modelKind`` (``card``, ``nnunet``, ``bundle``; ``card`` when absent) with
    ``modelCard`` (the card file, empty for the bundled demo) or ``modelFolder``, and for nnU-Net
    ``nnunetConfiguration`` (empty for 3d_fullres), ``nnunetFolds`` (``"0 1"``; empty for every trained fold) and
    ``nnunetMirroring``. The paths are text or ``pathlib`` paths (the module's parameter node)."""
    kind = getattr(parameters, "modelKind", "card") or "card"
    if kind == "card":
        return ModelSource("card", _pathText(getattr(parameters, "modelCard", "")))
    if kind == "bundle":
        return ModelSource("bundle", _pathText(getattr(parameters, "modelFolder", "")))
    return ModelSource(kind, _pathText(getattr(parameters, "modelFolder", "")),
                       configuration=getattr(parameters, "nnunetConfiguration", ""),
                       folds=getattr(parameters, "nnunetFolds", ""),
                       mirroring=bool(getattr(parameters, "nnunetMirroring", True)))


def _pathText(path: str | PurePath | None) -> str:
    """A path field as text, empty when not set: an empty ``pathlib`` path is ``Path(".")``, which Slicer's path
    field and parameter node hold for an empty field (``Path("")``), so it means "not set", not the working folder."""
    if isinstance(path, PurePath):
        return "" if path == type(path)() else str(path)
    return path or ""


def region(parameters: Any, reference: Any, *, segmentation: Any = None, roi: Any = None,
           clickedPoints: Any = None) -> Region:
    """The region to explain: a segment, an ROI box, the last clicked point, the predicted region or the class.

    Args:
        parameters: The controls (``regionKind``, ``radius``, ``regionSegmentId``).
        reference: The first input volume: regions are voxels of its grid.
        segmentation: The segmentation holding the segment (``segment``).
        roi: The markups ROI (``box``).
        clickedPoints: The markups node whose last point is explained (``point``).
    """
    kind = parameters.regionKind
    if kind == "segment":
        if segmentation is None:
            raise SegExplainError("choose a segmentation and a segment to explain, or pick another region")
        segmentId = parameters.regionSegmentId
        mask = nodes.segmentMask(segmentation, segmentId, reference)
        name = segmentation.GetSegmentation().GetSegment(segmentId).GetName()
        return Region("segment", mask=mask, description=f"segment {name!r} of {segmentation.GetName()!r}")
    if kind == "box":
        if roi is None:
            raise SegExplainError("draw a box (markups ROI) first, or pick another region")
        box = nodes.roiIndexBox(roi, reference)
        return Region("box", box=box, description=f"box {roi.GetName()!r}, voxels {box}")
    if kind == "point":
        last = clickedPoints.GetNumberOfControlPoints() - 1 if clickedPoints is not None else -1
        point = nodes.clickedPoint(clickedPoints, last, reference)
        return Region("point", pointRas=tuple(point), radius=float(parameters.radius),
                      description=f"point {clickedPoints.GetNthControlPointLabel(last)!r}, "
                                  f"radius {float(parameters.radius):g} mm")
    return Region(kind, description="predicted region" if kind == "predicted" else "whole class channel")


def settings(parameters: Any) -> ExplainSettings:
    """The method and options; the layer-wise filter is the current filter when ``layerwiseFilter`` is on."""
    values = {f.name: getattr(parameters, f.name) for f in fields(ExplainSettings)
              if f.name not in ("layerFilter", "extraOptions") and hasattr(parameters, f.name)}
    extraOptions = _jsonObject(getattr(parameters, "advancedOptions", ""), "other options", '{"noise_level": 0.2}')
    if extraOptions is not None:
        values["extraOptions"] = extraOptions
    if getattr(parameters, "layerwiseFilter", False) and parameters.filterKind != "none":
        values["layerFilter"] = f"{parameters.filterKind}:{float(parameters.filterLow):g},{float(parameters.filterHigh):g}"
    return ExplainSettings(**values)


def _jsonObject(text: str, what: str, example: str) -> dict[str, Any] | None:
    """A panel's text field holding a JSON object (``what`` names the field in the error); None when empty."""
    text = str(text or "").strip()
    return json_object(text, what, example=example) if text else None


def scoringOptions(parameters: Any) -> dict[str, Any] | None:
    """The options of "Score methods" (``scoringOptions``): a JSON object of the scoring's fields (``steps``,
    ``random_orders``, ``scores``, ...; see :class:`~SegExplainLib.application.requests.EvaluationRequest`), or None
    for ``segexplain evaluate``'s defaults. An unknown field is refused by name when the scoring is asked for."""
    return _jsonObject(getattr(parameters, "scoringOptions", ""), "scoring options", '{"steps": 8, "random_orders": 4}')


def _model(model: str | ModelSource | None) -> ModelSource:
    return model if isinstance(model, ModelSource) else ModelSource("card", model or "")


def prepareExplanation(explainer: WarmExplainer, volumes: list[Any], names: list[str],
                       model: str | ModelSource | None, *, trustModelCode: bool = False) -> None:
    """Have the front end's warm worker load the model and the case in the background, before the first click.

    ``model`` is a :class:`ModelSource` (a card, an nnU-Net results folder, a MONAI bundle), or a card path (None
    for the bundled demo network). ``trustModelCode`` is the user's word that the model may run code of someone
    else; it never comes from the card, the folder or a saved scene.
    """
    explainer.prepare(_model(model), list(volumes), list(names), trustModelCode=trustModelCode)


def startExplanation(explainer: WarmExplainer, volumes: list[Any], names: list[str], region: Region,
                     settings: ExplainSettings, model: str | ModelSource | None, *,
                     trustModelCode: bool = False) -> WarmRun:
    """Ask the warm worker (started or restarted as needed, see :meth:`WarmExplainer.prepare`) to explain the region;
    returns the running click."""
    return explainer.explain(_model(model), list(volumes), list(names), region, settings,
                             trustModelCode=trustModelCode)


def scoredMethods(parameters: Any) -> tuple[str, ...]:
    """The methods to score: ``scoreMethods``, engine names separated by spaces or commas (empty or absent: the
    defaults, :data:`~.job.SCORED_METHODS`); an unknown name is refused when the scoring is asked for."""
    text = str(getattr(parameters, "scoreMethods", "") or "")
    return tuple(name for name in text.replace(",", " ").split()) or SCORED_METHODS


def startScoring(explainer: WarmExplainer, volumes: list[Any], names: list[str], region: Region,
                 settings: ExplainSettings, methods: tuple[str, ...], model: str | ModelSource | None, *,
                 trustModelCode: bool = False, options: dict[str, Any] | None = None) -> ScoreRun:
    """Ask the warm worker (prepared as for :func:`startExplanation`) for the scorecard of ``methods`` for the
    region, with the class, device and seed of ``settings`` (``options``: of the scoring, see
    :class:`~.job.ScoreRun`); returns the running scoring."""
    return explainer.score(_model(model), list(volumes), list(names), region, settings, methods,
                           trustModelCode=trustModelCode, options=options)


def finishScoring(run: ScoreRun, explanation: results.Explanation | None = None) -> Any:
    """Load a done scoring into the scene: a new table of the scorecard (:func:`results.addScorecard`), in the
    folder of ``explanation`` (the one shown, so that its report has the scorecard page) or beside the case."""
    if run.answer is None:
        raise SegExplainError(f"the scoring is {run.state}, not done")
    return results.addScorecard(run.record(), run.stack.reference, explanation=explanation,
                                name=f"Scorecard, {run.region.description}")


def previewExplanation(run: WarmRun, inputs: list[Any]) -> results.Explanation | None:
    """Load a click's preview into the scene once it came, as a new explanation folder whose record says it is a
    preview (``preview``, ``ensemble``); :func:`finishExplanation` later puts the exact answer in its place. None
    while no preview came, once it is loaded, and once the exact answer came (then only that one is loaded)."""
    if run.preview is None or run.explanation is not None or run.answer is not None:
        return None
    run.explanation = _addExplanation(run, run.preview, inputs)
    return run.explanation


def finishExplanation(run: WarmRun, inputs: list[Any]) -> results.Explanation:
    """Load a done click into the scene as a new explanation folder, named after its method and region; a click
    whose preview is loaded (:func:`previewExplanation`) gets the exact answer in the preview's folder instead."""
    if run.answer is None:
        raise SegExplainError(f"the explanation is {run.state}, not done")
    if run.explanation is None:
        run.explanation = _addExplanation(run, run.answer, inputs)
        return run.explanation
    results.replaceMaps(run.explanation, run.answer.maps, run.record())
    run.explanation.overlay.RemoveNodeReferenceIDs(_SHOWN_RELEVANCE)  # new voxels: a new window at the next show
    return run.explanation


def _addExplanation(run: WarmRun, answer: Any, inputs: list[Any]) -> results.Explanation:
    method = run.settings.method
    name = f"{method} {run.settings.composite}" if method == "lrp" else method
    return results.addExplanation(answer.maps, run.record(), run.stack, inputs,
                                  name=f"{name}, {run.region.description}")


def displayedIndex(explanation: results.Explanation, parameters: Any) -> int:
    return min(max(int(parameters.displayedSequence), 0), len(explanation.relevance) - 1)


def showExplanation(explanation: results.Explanation, parameters: Any, compositeNodes: list[Any], *,
                    overlay: Any = None) -> None:
    """The chosen sequence's relevance, filtered by the sliders, over that sequence in the given slice views.

    Args:
        explanation: The explanation shown.
        parameters: The controls (``displayedSequence``, ``filterKind``/``filterLow``/``filterHigh``,
            ``overlayOpacity``).
        compositeNodes: The slice composite nodes of the views.
        overlay: The volume receiving the filtered map: the explanation's own overlay by default, or another one
            (the review app's side-by-side comparison).
    """
    index = displayedIndex(explanation, parameters)
    relevance = explanation.relevance[index]
    overlay = overlay or explanation.overlay
    if overlay.GetNodeReferenceID(_SHOWN_RELEVANCE) != relevance.GetID():
        # a new map for this overlay: the explanation's shared window, from max|R| over all its sequences (a full
        # pass over the volumes), not at every slider step
        overlay.SetNodeReferenceID(_SHOWN_RELEVANCE, relevance.GetID())
        overlay.SetAttribute(results.SEQUENCE_ATTRIBUTE, relevance.GetAttribute(results.SEQUENCE_ATTRIBUTE))
        display.setDivergingDisplay(overlay, display.sharedAmplitude(explanation.relevance))
    amplitudeFilter = display.amplitudeFilter(parameters.filterKind, float(parameters.filterLow),
                                              float(parameters.filterHigh))
    display.updateFilteredOverlay(relevance, overlay, amplitudeFilter)
    display.showOverlay(compositeNodes, explanation.inputVolume(index), overlay, float(parameters.overlayOpacity))


def montage(explanation: results.Explanation, parameters: Any, applicationLogic: Any) -> Any:
    """The slice montage of the displayed overlay over its sequence (orientation ``montageOrientation``), titled,
    its slices in mm with orientation letters and a labelled colour bar (:func:`export.explanationMontage`): uint8
    RGBA, rows top to bottom."""
    return export.figurePixels(export.explanationMontage(
        explanation, applicationLogic, explanation.inputVolume(displayedIndex(explanation, parameters)),
        orientation=getattr(parameters, "montageOrientation", "Axial"), opacity=float(parameters.overlayOpacity)))


def writeReport(explanation: results.Explanation, parameters: Any, path: str | Path) -> Path:
    """The report of an explanation (:func:`export.writeReport`), titled with its folder name, its overlay at the
    controls' opacity; it draws its views itself, without the slice views."""
    name = results.subjectHierarchy(explanation.overlay.GetScene()).GetItemName(explanation.folderItem)
    return export.writeReport(explanation, path, title=name, opacity=float(parameters.overlayOpacity))
