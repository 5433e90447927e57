"""Pictures of explanations: slice-view captures, slice montages and the one-page report.

Captures come from Slicer's own slice pipeline (``vtkMRMLSliceLogic``: reslice, window/level, colour table and
layer blending, exactly what a slice view draws), so they work offscreen and without Qt: in the Slicer module, in the
browser app and in the tests. The montage uses a private slice logic that is removed again, so the user's views are
left as they were and no view is added to the layout. The report (PDF, or PNG of its first page) is a summary page,
the scorecard of methods when the explanation has one, and the full record.
"""

from __future__ import annotations

import json
import os
import shlex
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import slicer
import vtk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from vtk.util.numpy_support import vtk_to_numpy

from SegExplainLib.errors import SegExplainError
from SegExplainLib.io.figures import region_views, rendered_montage, save_figure, scorecard_figure
from SegExplainLib.io.figures.views import slice_view_label, slice_view_letters

from .display import checkedOpacity, divergingColors
from .nodes import geometryOfVolume, worldFromLocalMatrix
from .results import SCORECARD_ATTRIBUTE, SEQUENCE_ATTRIBUTE, Explanation, scorecardOf, subjectHierarchy

ORIENTATIONS = ("Axial", "Coronal", "Sagittal")


def sliceImage(sliceLogic: Any) -> np.ndarray:
    """The RGBA image (rows top to bottom) that a slice logic currently blends for its view."""
    producer = sliceLogic.GetImageDataConnection().GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(0)
    width, height, _ = image.GetDimensions()
    pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
    return np.ascontiguousarray(pixels[::-1, :, :4])


def writePng(pixels: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3 or 4) uint8 image, rows top to bottom, as PNG (atomically, through the figure writer)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SegExplainError(f"screenshot path {str(path)!r} must end in .png")
    height, width = pixels.shape[:2]
    figure = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(figure)
    figure.figimage(pixels, resize=False)
    return save_figure(figure, path, dpi=100)


def _onBlack(pixels: np.ndarray) -> np.ndarray:
    """An RGBA image as a slice view draws it on its black background: RGB weighted by alpha, fully opaque."""
    alpha = pixels[..., 3:].astype(np.float32) / 255.0
    opaque = np.full_like(pixels, 255)
    opaque[..., :3] = np.round(pixels[..., :3] * alpha).astype(np.uint8)
    return opaque


def captureSliceView(sliceLogic: Any, path: str | Path) -> Path:
    """Save what a slice view shows (background, relevance overlay, segmentation labelmap layer) as PNG."""
    return writePng(_onBlack(sliceImage(sliceLogic)), path)


class _PrivateSliceView:
    """A slice logic with its own slice and composite nodes, removed from the scene on exit.

    Slicer's layout manager makes a slice view widget for every slice node added to the scene without a parent
    layout node (``qMRMLLayoutManager``, ``qMRMLLayoutViewFactory::onNodeAdded``). So the slice node is added with a
    parent, a hidden owner node, as Slicer's "slice view outside the view layout" recipe does, but before it is
    added (``vtkMRMLSliceLogic.AddSliceNode`` would add it without one): no view appears in the user's layout.
    """

    def __init__(self, scene: Any, applicationLogic: Any, size: tuple[int, int]) -> None:
        self.scene, self.applicationLogic, self.size = scene, applicationLogic, size

    def __enter__(self) -> Any:
        if self.scene.GetDefaultNodeByClass("vtkMRMLSliceNode") is None:  # Slicer adds them at start-up
            slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(self.scene, True)
        name = self.scene.GenerateUniqueName("SegExplainMontage")
        self.owner = self.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", f"{name} owner")
        self.owner.SetHideFromEditors(True)
        sliceNode = self.scene.CreateNodeByClass("vtkMRMLSliceNode")  # with the scene's default (presets)
        sliceNode.UnRegister(None)  # CreateNodeByClass hands over a reference of its own
        sliceNode.SetName(name)
        sliceNode.SetLayoutName(name)
        sliceNode.SetAndObserveParentLayoutNodeID(self.owner.GetID())
        self.scene.AddNode(sliceNode)
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(self.applicationLogic)
        self.logic.SetMRMLScene(self.scene)
        self.logic.SetSliceNode(sliceNode)  # as AddSliceNode does once the node is in the scene
        self.logic.UpdateSliceNodeFromLayout()
        self.logic.ResizeSliceNode(*self.size)
        return self.logic

    def __exit__(self, *exc: object) -> None:
        owned = (self.logic.GetSliceCompositeNode(), self.logic.GetSliceNode(), self.owner)
        # the logic's slice model nodes go first, and the logic leaves the scene before its slice node does: a slice
        # logic that sees its slice node removed makes a new slice model
        self.logic.DeleteSliceModel()
        self.logic.SetMRMLScene(None)
        for node in owned:
            if node is not None and node.GetScene() is self.scene:
                self.scene.RemoveNode(node)


def montageTiles(scene: Any, applicationLogic: Any, background: Any, overlay: Any, *, orientation: str, count: int,
                  opacity: float, tileSize: int, columns: int, label: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Evenly spaced slices through the overlay's non-zero extent as Slicer's slice logic draws them (opaque RGBA
    tiles, in a private slice view that leaves no node behind), and the slice-to-RAS matrix of each.

    Args:
        scene: The scene holding the volumes.
        applicationLogic: Slicer's application logic (``slicer.app.applicationLogic()`` in Slicer).
        background: Input sequence shown under the overlay.
        overlay: Relevance (or filtered overlay) volume with its diverging display.
        orientation: ``Axial``, ``Coronal`` or ``Sagittal``.
        count: Number of slices.
        opacity: Overlay opacity in [0, 1].
        tileSize: Pixels per tile side.
        columns: Tiles per row of the montage (checked here, laid out by :func:`explanationMontage`).
        label: Optional labelmap volume (e.g. the exported ground-truth segment) drawn as outline layer.
    """
    if orientation not in ORIENTATIONS:
        raise SegExplainError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}")
    for name, value in (("count", count), ("tileSize", tileSize), ("columns", columns)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SegExplainError(f"{name} must be a positive integer, got {value!r}")
    opacity = checkedOpacity(opacity)
    offsets = _sliceOffsets(overlay, orientation, count)
    tiles, matrices = [], []
    with _PrivateSliceView(scene, applicationLogic, (tileSize, tileSize)) as logic:
        logic.GetSliceNode().SetOrientation(orientation)
        composite = logic.GetSliceCompositeNode()
        composite.SetBackgroundVolumeID(background.GetID())
        composite.SetForegroundVolumeID(overlay.GetID())
        composite.SetForegroundOpacity(opacity)
        if label is not None:
            composite.SetLabelVolumeID(label.GetID())
        logic.FitSliceToBackground()
        for offset in offsets:
            logic.SetSliceOffset(offset)
            tiles.append(_onBlack(sliceImage(logic)))
            matrices.append(slicer.util.arrayFromVTKMatrix(logic.GetSliceNode().GetSliceToRAS()))
    return tiles, matrices


def explanationMontage(explanation: Explanation, applicationLogic: Any, background: Any, *,
                       orientation: str = "Axial", count: int = 8, opacity: float = 0.6, tileSize: int = 256,
                       columns: int = 4, label: Any = None) -> Figure:
    """The explanation's overlay over ``background`` in evenly spaced slices as Slicer's slice views draw them
    (:func:`montageTiles`), labelled as the library's case figures are (``rendered_montage``): a title with the
    method, region, class and target score, the sequence's name, each slice's position in mm as Slicer gives it,
    orientation letters from the slice's direction, and a colour bar of the overlay's window (the scale shared by
    all sequences of the explanation) that says what red and blue mean.

    Args:
        explanation: The explanation; its overlay (as the slice views show it, filtered) is drawn.
        applicationLogic: Slicer's application logic (``slicer.app.applicationLogic()`` in Slicer).
        background: Input sequence shown under the overlay.
        orientation: ``Axial``, ``Coronal`` or ``Sagittal``.
        count: Number of slices.
        opacity: Overlay opacity in [0, 1].
        tileSize: Pixels per tile side.
        columns: Tiles per row.
        label: Optional labelmap volume drawn as outline layer.

    Returns:
        The figure, for :func:`figurePixels` or ``save_figure``.
    """
    overlay = explanation.overlay
    tiles, matrices = montageTiles(overlay.GetScene(), applicationLogic, background, overlay,
                                    orientation=orientation, count=count, opacity=opacity, tileSize=tileSize,
                                    columns=columns, label=label)
    colours = divergingColors(np.linspace(-1.0, 1.0, 257))[:, :3]
    return rendered_montage(tiles, captions=[slice_view_label(matrix) for matrix in matrices],
                            letters=[slice_view_letters(matrix) for matrix in matrices], record=explanation.record,
                            sequence_name=overlay.GetAttribute(SEQUENCE_ATTRIBUTE),
                            limit=overlay.GetDisplayNode().GetWindow() / 2.0,  # the window the views show
                            cmap=ListedColormap(colours), columns=columns,
                            note=f"{orientation.lower()} slices, the overlay as the slice views show it "
                                 f"(opacity {opacity:g})")


def figurePixels(figure: Figure) -> np.ndarray:
    """A figure drawn at its own resolution: uint8 RGBA, rows top to bottom (for :func:`writePng`)."""
    figure.canvas.draw()
    return np.array(figure.canvas.buffer_rgba())


def _sliceOffsets(overlay: Any, orientation: str, count: int) -> list[float]:
    """World offsets of ``count`` slices spread over the overlay's non-zero voxels (its whole grid if all zero)."""
    voxels = slicer.util.arrayFromVolume(overlay)
    nonzero = np.argwhere(voxels != 0)
    low, high = (nonzero.min(0), nonzero.max(0)) if len(nonzero) else (np.zeros(3), np.array(voxels.shape) - 1)
    ijkToRas = vtk.vtkMatrix4x4()
    overlay.GetIJKToRASMatrix(ijkToRas)
    matrix = worldFromLocalMatrix(overlay) @ slicer.util.arrayFromVTKMatrix(ijkToRas)  # slice offsets are world
    corners = np.array([[i, j, k, 1.0] for k in (low[0], high[0]) for j in (low[1], high[1])
                        for i in (low[2], high[2])])
    ras = (matrix @ corners.T).T[:, :3]
    axis = {"Sagittal": 0, "Coronal": 1, "Axial": 2}[orientation]
    return list(np.linspace(ras[:, axis].min(), ras[:, axis].max(), count + 2)[1:-1]) if count > 1 else [
        float(ras[:, axis].mean())]


def recordLines(record: dict[str, Any]) -> list[str]:
    """The parameter record as short 'key: value' lines for the report's appendix, the command line as one would
    type it."""
    keys = ("method", "options", "target", "target_score", "region_voxels", "expected_sum", "delta",
            "relative_delta", "device", "dtype", "seconds", "warnings", "sequence_names", "scene_inputs",
            "normalized_input", "sliding_window", "model", "software", "command")
    lines = []
    for key in keys:
        if key in record:
            value = record[key]
            if key == "command" and isinstance(value, list):
                value = shlex.join(str(part) for part in value)
            elif not isinstance(value, str):
                value = json.dumps(value, default=str)
            lines += textwrap.wrap(f"{key}: {value}", 110, subsequent_indent="    ")
    return lines


def _modelFields(record: dict[str, Any]) -> dict[str, Any]:
    """The model's description in the record, with a card's fields (nested in it) brought up."""
    model = record.get("model") if isinstance(record.get("model"), dict) else {}
    nested = [value for value in model.values() if isinstance(value, dict) and "name" in value]
    return {**(nested[0] if nested else {}), **{k: v for k, v in model.items() if v is not None}}


def _modelText(model: dict[str, Any]) -> str:
    if not model:
        return "Model: not recorded."
    classes = model.get("classes")
    classText = f"; classes {', '.join(map(str, classes))}" if isinstance(classes, list) else ""
    return f"Model: {model.get('name') or model.get('kind') or 'unnamed'}{classText}."


def reportNotes(explanation: Explanation, inclusivity: dict[str, Any] | None = None, *,
                scored: bool = False) -> list[str]:
    """The report's summary in words: case and model, the class, the shares of each sign (and the inclusivity, when
    computed), the warnings and where the scorecard (``scored``) and the full record are."""
    record, names = explanation.record, explanation.sequenceNames
    classIndex = record["target"]["class_index"]
    model = _modelFields(record)
    classes = model.get("classes") if isinstance(model.get("classes"), list) else []
    className = f" ({classes[classIndex]})" if 0 <= classIndex < len(classes) else ""
    volumes = [entry["volume"] for entry in record.get("scene_inputs") or []] or names
    lines = [f"Case: the scene's volumes {', '.join(map(repr, volumes))}, as the sequences {', '.join(names)}.",
             _modelText(model),
             f"Explained: class {classIndex}{className}; the target score {record['target_score']:.4g} is the sum of "
             f"the class {classIndex} logits over the region.",
             "Shares of the relevance per sequence: positive (red, for the class) and negative (blue, against it), "
             "each of its own sign" + (f"; inclusivity of the segment {inclusivity['segment']!r}" if inclusivity
                                        else "") + ":"]
    table = explanation.table.GetTable()
    for row, name in enumerate(names):
        positive, negative = (100 * table.GetValueByName(row, f"{kind} share").ToDouble()
                              for kind in ("Positive", "Negative"))
        included = f", inclusivity {inclusivity['values'][name]:.2f}" if inclusivity else ""
        lines.append(f"    {name}: {positive:.1f} % positive, {negative:.1f} % negative{included}")
    if not inclusivity:
        lines.append("Inclusivity: not computed (choose a ground-truth segment and press Inclusivity).")
    warnings = explanation.warnings
    lines.append("Warnings: " + (" ".join(warnings) if warnings else "none."))
    if scored:
        lines.append("Page 2 is the scorecard of methods: which map to trust for this network and case.")
    lines.append("The full record, with the command line that reproduces this result, is the appendix "
                 f"(page {3 if scored else 2}).")
    return lines


def writeReport(explanation: Explanation, path: str | Path, *, title: str = "", opacity: float = 0.7) -> Path:
    """The report (PDF, its text searchable; or PNG of its first page): page 1 a summary, then the scorecard of
    methods when the explanation's folder has one (:func:`scorecardPage`), then the full record.

    Page 1 names the case and the model, the method, region, class and target score (with what a negative one
    means), shows the three orthogonal views through the region for each sequence on one colour scale with
    orientation letters, slice positions in mm and a labelled colour bar (``region_views``), and gives the shares of
    each sign, the inclusivity when computed and the warnings in words. The pages after it hold the full record.

    Args:
        explanation: The explanation.
        path: A ``.pdf`` or ``.png`` file.
        title: The report's heading, e.g. the explanation's folder name.
        opacity: The overlay's opacity at the colour limit, in [0, 1].

    Example:
        >>> writeReport(explanation, "lesion-report.pdf", title="lrp epsilon_plus, point 'F-1'")
    """
    suffix = Path(path).suffix.lower()
    if suffix not in (".pdf", ".png"):
        raise SegExplainError(f"report path {str(path)!r} must end in .pdf or .png")
    opacity = checkedOpacity(opacity)
    shNode = subjectHierarchy(explanation.overlay.GetScene())
    attribute = shNode.GetItemAttribute(explanation.folderItem, "SegExplain.groundTruthInclusivity")
    reference = explanation.relevance[0]
    image = np.stack([slicer.util.arrayFromVolume(explanation.inputVolume(i))
                      for i in range(len(explanation.relevance))])
    scorecard = scorecardOf(explanation)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    summary = region_views(image, explanation.maps(), sequence_names=explanation.sequenceNames,
                           geometry=geometryOfVolume(reference), record=explanation.record,
                           heading=[f"{title or 'SegExplain explanation'}: SegExplain report, {stamp}"],
                           notes=reportNotes(explanation, json.loads(attribute) if attribute else None,
                                             scored=scorecard is not None),
                           alpha=opacity)
    if suffix == ".png":
        return save_figure(summary, path, dpi=120)
    scored = [scorecardPage(json.loads(scorecard.GetAttribute(SCORECARD_ATTRIBUTE)))] if scorecard else []
    pages = [summary, *scored, *_recordPages(explanation.record)]
    temporary = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.part")
    try:
        with matplotlib.rc_context({"pdf.fonttype": 42}), PdfPages(temporary) as pdf:  # text as text: searchable
            for page in pages:
                pdf.savefig(page)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return Path(path)


def _recordPages(record: dict[str, Any], linesPerPage: int = 90) -> list[Figure]:
    """A4 pages of the full record as 'key: value' lines."""
    lines = recordLines(record)
    pages = []
    for first in range(0, len(lines), linesPerPage):
        page = Figure(figsize=(8.27, 11.69))
        FigureCanvasAgg(page)
        heading = "Appendix: the full record" + (" (continued)" if first else "")
        page.text(0.06, 0.97, heading, fontsize=10, va="top", ha="left", weight="bold")
        page.text(0.06, 0.94, "\n".join(lines[first:first + linesPerPage]), va="top", ha="left",
                  family="monospace", fontsize=6)
        pages.append(page)
    return pages


def scorecardLines(summary: dict[str, Any]) -> list[str]:
    """The scorecard in words for the report: the region scored, one line per method with its verdict and reasons,
    and the recommendation."""
    card = summary["scorecard"]
    target = card["target"]
    where = summary.get("region") or f"the {target['kind']} region"  # as the scene named it, when it did
    lines = [f"Scored: {where}, class {target['class_index']} ({target['region_voxels']} voxels); methods "
             f"{', '.join(card['methods'])}.", ""]
    for name, row in card["methods"].items():
        lines += textwrap.wrap(f"{name}: {row['verdict']} ({row['seconds']:.1f} s)", 120, subsequent_indent="    ")
    return [*lines, "", *textwrap.wrap(f"Recommended: {card['recommendation']}", 120, subsequent_indent="    ")]


def scorecardPage(summary: dict[str, Any]) -> Figure:
    """The report's scorecard page (A4): the scorecard's figure (curves and bars, drawn from ``summary``) and the
    verdict of every method in words, as text.

    Args:
        summary: The ``summary.json`` of the scoring, as a scorecard table keeps it (``SegExplain.scorecard``).
    """
    page = Figure(figsize=(8.27, 11.69))
    FigureCanvasAgg(page)
    page.text(0.06, 0.97, "Which map can I trust? The scorecard of methods", fontsize=10, va="top", ha="left",
              weight="bold")
    picture = page.add_axes((0.04, 0.40, 0.92, 0.55))
    picture.imshow(figurePixels(scorecard_figure(summary["scorecard"])))
    picture.set_axis_off()
    page.text(0.06, 0.38, "\n".join(scorecardLines(summary)), va="top", ha="left", family="monospace", fontsize=6.5)
    return page
