"""Pictures of explanations: slice-view captures, slice montages and the one-page report.

Captures come from Slicer's own slice pipeline (``vtkMRMLSliceLogic``: reslice, window/level, colour table and
layer blending, exactly what a slice view draws), so they work offscreen and without Qt: in the Slicer module, in the
browser app and in the tests. The montage uses a private slice logic that is removed again, so the user's views are
left as they were and no view is added to the layout. The report is one page (PNG or PDF) with the montage, the
share chart and the full record.
"""

from __future__ import annotations

import json
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from vtk.util.numpy_support import vtk_to_numpy

from SegExplainLib.errors import SegExplainError
from SegExplainLib.io.figures import save_figure

from .display import checkedOpacity
from .nodes import worldFromLocalMatrix
from .results import Explanation

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


def sliceMontage(scene: Any, applicationLogic: Any, background: Any, overlay: Any, *, orientation: str = "Axial",
                 count: int = 8, opacity: float = 0.6, tileSize: int = 256, columns: int = 4,
                 label: Any = None) -> np.ndarray:
    """Tiles of evenly spaced slices through the overlay's non-zero extent, as Slicer's slice views draw them.

    Args:
        scene: The scene holding the volumes.
        applicationLogic: Slicer's application logic (``slicer.app.applicationLogic()`` in Slicer).
        background: Input sequence shown under the overlay.
        overlay: Relevance (or filtered overlay) volume with its diverging display.
        orientation: ``Axial``, ``Coronal`` or ``Sagittal``.
        count: Number of slices.
        opacity: Overlay opacity in [0, 1].
        tileSize: Pixels per tile side.
        columns: Tiles per row.
        label: Optional labelmap volume (e.g. the exported ground-truth segment) drawn as outline layer.

    Returns:
        The montage, uint8 RGBA, rows top to bottom.
    """
    if orientation not in ORIENTATIONS:
        raise SegExplainError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}")
    for name, value in (("count", count), ("tileSize", tileSize), ("columns", columns)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SegExplainError(f"{name} must be a positive integer, got {value!r}")
    opacity = checkedOpacity(opacity)
    offsets = _sliceOffsets(overlay, orientation, count)
    tiles = []
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
    rows = -(-len(tiles) // columns)
    montage = np.zeros((rows * tileSize, min(columns, len(tiles)) * tileSize, 4), dtype=np.uint8)
    montage[..., 3] = 255
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        montage[row * tileSize:(row + 1) * tileSize, column * tileSize:(column + 1) * tileSize] = tile
    return montage


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
    """The parameter record as short 'key: value' lines for the report."""
    keys = ("method", "options", "target", "target_score", "region_voxels", "expected_sum", "delta",
            "relative_delta", "device", "dtype", "seconds", "warnings",
            "sequence_names", "normalized_input", "sliding_window", "model", "software", "command")
    lines = []
    for key in keys:
        if key in record:
            value = record[key] if isinstance(record[key], str) else json.dumps(record[key], default=str)
            lines += textwrap.wrap(f"{key}: {value}", 110, subsequent_indent="    ")
    return lines


def writeReport(explanation: Explanation, montage: np.ndarray, path: str | Path, *, title: str = "") -> Path:
    """The one-page report (A4 portrait; PNG or PDF by suffix): montage, share chart, inclusivity and the record.

    Example:
        >>> writeReport(explanation, sliceMontage(scene, appLogic, t2, explanation.overlay), "lesion-report.pdf")
    """
    names = explanation.sequenceNames
    table = explanation.table.GetTable()
    figure = Figure(figsize=(8.27, 11.69), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(3, 2, height_ratios=[2.2, 1.2, 2.0])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    figure.suptitle(f"{title or 'SegExplain explanation'}\n{stamp}", fontsize=11)
    image = figure.add_subplot(grid[0, :])
    image.imshow(montage)
    image.set_axis_off()
    image.set_title(f"Relevance overlay ({explanation.overlay.GetAttribute('SegExplain.sequence')}), red for, "
                    "blue against the explained class", fontsize=8)
    shares = figure.add_subplot(grid[1, 0])
    positive = [table.GetValueByName(row, "Positive share").ToDouble() for row in range(len(names))]
    shares.bar(range(len(names)), positive, color="#d6604d")
    shares.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    shares.set_ylabel("share of positive relevance", fontsize=7)
    shares.tick_params(labelsize=7)
    numbers = figure.add_subplot(grid[1, 1])
    numbers.set_axis_off()
    columns = [table.GetColumnName(c) for c in range(1, table.GetNumberOfColumns())]
    cells = [[f"{table.GetValueByName(row, c).ToDouble():.3f}" for c in columns] for row in range(len(names))]
    shown = numbers.table(cellText=cells, rowLabels=names, colLabels=[c.replace(" share", "") for c in columns],
                          loc="center", fontsize=7)
    shown.auto_set_font_size(False)
    shown.set_fontsize(6)
    text = figure.add_subplot(grid[2, :])
    text.set_axis_off()
    text.text(0, 1, "\n".join(recordLines(explanation.record)), va="top", ha="left", family="monospace",
              fontsize=5.5, transform=text.transAxes)
    return save_figure(figure, path, dpi=150)

