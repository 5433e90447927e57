"""Explanations in the scene: one subject-hierarchy folder per run, holding its record, maps, shares and chart.

A folder holds, for an explanation of a C-sequence image:

- C relevance volumes (role ``relevance``), one per sequence, on the input grid, each referencing its input volume;
- one overlay volume (role ``overlay``): the filtered map of the sequence shown on the slice views;
- a table (role ``shares``) with the positive, negative and absolute relevance share per sequence, and the
  inclusivity against a ground-truth segment once computed;
- a bar chart (role ``chart``) of the positive shares;
- once the methods were scored for its region (:func:`addScorecard`), a table (role ``scorecard``) with one row per
  method, its ``summary.json`` in the table's attribute ``SegExplain.scorecard`` (the scorecard's figure is drawn
  from it).

The folder's attributes hold the record of the run (method, options, target, score, delta, software versions, the
command line that reproduces it), so that the result can be reproduced; they are saved with the scene. Nothing is ever replaced: a new
run gets a new folder, unless the caller removes an old one explicitly with :func:`removeExplanation`. The one
exception is a preview (a cheaper stand-in of an ensemble, its record's ``preview`` true): :func:`replaceMaps` puts
the exact answer of the same click in its place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import slicer
import vtk

from SegExplainLib.engine import metrics
from SegExplainLib.errors import SegExplainError

from .display import setDivergingDisplay, sharedAmplitude
from .job import fileSafe
from .nodes import ROLE_ATTRIBUTE, VolumeStack, addVolumeLike, segmentMask

#: Attribute that marks a subject-hierarchy folder as an explanation; its value is the JSON record.
RECORD_ATTRIBUTE = "SegExplain.record"
SEQUENCE_ATTRIBUTE = "SegExplain.sequence"
INPUT_REFERENCE = "segexplainInput"
#: Record fields also stored as attributes of their own, for the Data module's attribute view.
_SHOWN_FIELDS = ("method", "options", "target", "target_score", "delta", "warnings", "preview", "ensemble")
SHARE_KINDS = ("positive", "negative", "absolute")
#: Attribute of a scorecard table: the ``summary.json`` of the scoring (``segexplain evaluate``'s), as JSON.
SCORECARD_ATTRIBUTE = "SegExplain.scorecard"
#: The scorecard table's number columns: name, unit, description, and where the value is in a method's row.
SCORECARD_COLUMNS = (
    ("Deletion", "", "normalized area of the deletion curve: 0 = no better than a random order, 1 = best",
     ("faithfulness", "deletion", "mean")),
    ("Deletion spread", "", "standard deviation of the deletion area over the random orders",
     ("faithfulness", "deletion", "std")),
    ("Insertion", "", "normalized area of the insertion curve: 0 = no better than a random order, 1 = best",
     ("faithfulness", "insertion", "mean")),
    ("Insertion spread", "", "standard deviation of the insertion area over the random orders",
     ("faithfulness", "insertion", "std")),
    ("Rank correlation", "", "Spearman correlation of the map with the trained network's after randomizing every "
     "layer (fails at or above the threshold)", ("randomization", "final_spearman")),
    ("Max-sensitivity", "", "largest relative change of the map under small input noise",
     ("robustness", "max_sensitivity")),
    ("Outside receptive field", "%", "share of the positive relevance where the network cannot see",
     ("localization", "outside_receptive_field")),
    ("Outside target", "%", "share of the positive relevance outside the target region",
     ("localization", "outside_target")),
    ("Time", "s", "run time of the method on the trained network", ("seconds",)),
)


@dataclass
class Explanation:
    """The nodes of one explanation folder (see the module docstring)."""

    folderItem: int
    record: dict[str, Any]
    relevance: list[Any]
    overlay: Any
    table: Any
    chart: Any

    @property
    def sequenceNames(self) -> list[str]:
        return [node.GetAttribute(SEQUENCE_ATTRIBUTE) for node in self.relevance]

    @property
    def warnings(self) -> list[str]:
        """What the engine said the user should know about this result (e.g. IG missing completeness)."""
        return list(self.record.get("warnings", []))

    def inputVolume(self, index: int) -> Any:
        """The input volume explained by relevance volume ``index`` (None if it was deleted)."""
        return self.relevance[index].GetNodeReference(INPUT_REFERENCE)

    def maps(self) -> np.ndarray:
        """The relevance maps (C, D, H, W), a copy."""
        return np.stack([slicer.util.arrayFromVolume(node) for node in self.relevance]).astype(np.float32)


def subjectHierarchy(scene: Any) -> Any:
    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)


def _uniqueFolderName(shNode: Any, parent: Any, base: str) -> str:
    children = vtk.vtkIdList()
    shNode.GetItemChildren(parent, children)
    taken = {shNode.GetItemName(children.GetId(i)) for i in range(children.GetNumberOfIds())}
    if base not in taken:
        return base
    return next(f"{base} ({n})" for n in range(2, len(taken) + 3) if f"{base} ({n})" not in taken)


def _placeInFolder(shNode: Any, node: Any, folder: int, role: str) -> None:
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    item = shNode.GetItemByDataNode(node)
    if item:  # Slicer's subject hierarchy plugins add an item for every new node; headless, we add it
        shNode.SetItemParent(item, folder)
    else:
        shNode.CreateItem(folder, node)


def addExplanation(maps: np.ndarray, record: dict[str, Any], stack: VolumeStack, inputs: list[Any], *,
                   name: str) -> Explanation:
    """Bring a finished explanation into the scene as a new explanation folder.

    Args:
        maps: The relevance maps (C, D, H, W) on the grid of ``stack``, one per sequence.
        record: The run's record, as ``summary.json`` of ``segexplain explain`` holds it (sequence names file-safe,
            ``relevance_shares``); kept in the folder's attributes.
        stack: The explained image: its grid, sequence names and reference volume.
        inputs: The input volume nodes, one per sequence (or the one vector volume).
        name: Folder name, e.g. ``"LRP epsilon_plus, Lesion"``; made unique among its siblings.

    Returns:
        The new explanation. Raises :class:`SegExplainError` (and adds nothing) if the maps are off the grid.
    """
    maps = np.asarray(maps, dtype=np.float32)
    expected = (len(stack.names), *stack.image.shape[1:])
    if maps.shape != expected:
        raise SegExplainError(f"the maps have shape {maps.shape}; expected {expected}, one map per sequence on the "
                              "input grid")
    record = dict(record)
    # the input volume of each sequence: its own, or the one vector volume holding them all
    sources = list(inputs) if len(inputs) == len(stack.names) else [inputs[0]] * len(stack.names)
    # the record names the sequences file-safely, as the command line's files; it keeps what the scene called them
    record["scene_inputs"] = [{"sequence": name, "file_name": fileSafe(name), "volume": node.GetName()}
                              for name, node in zip(stack.names, sources)]
    scene = stack.reference.GetScene()
    shNode = subjectHierarchy(scene)
    referenceItem = shNode.GetItemByDataNode(stack.reference)
    parent = shNode.GetItemParent(referenceItem) if referenceItem else shNode.GetSceneItemID()
    folder = shNode.CreateFolderItem(parent, _uniqueFolderName(shNode, parent, name))
    folderName = shNode.GetItemName(folder)
    shNode.SetItemAttribute(folder, RECORD_ATTRIBUTE, json.dumps(record, default=str))
    for field in _SHOWN_FIELDS:
        shNode.SetItemAttribute(folder, f"SegExplain.{field}", json.dumps(record.get(field), default=str))
    relevance = []
    for sequence, array, source in zip(stack.names, maps, sources):
        node = addVolumeLike(stack.reference, array, f"{folderName} {sequence}")
        node.SetAttribute(SEQUENCE_ATTRIBUTE, sequence)
        node.SetNodeReferenceID(INPUT_REFERENCE, source.GetID())
        _placeInFolder(shNode, node, folder, "relevance")
        relevance.append(node)
    overlay = addVolumeLike(stack.reference, maps[0], f"{folderName} overlay")
    overlay.SetAttribute(SEQUENCE_ATTRIBUTE, stack.names[0])
    _setSharedDisplay(relevance, overlay)
    _placeInFolder(shNode, overlay, folder, "overlay")
    shares = {kind: {n: values[fileSafe(n)] for n in stack.names}  # the job names the sequences file-safe
              for kind, values in record["relevance_shares"].items()}
    table = _sharesTable(scene, f"{folderName} shares", stack.names, shares)
    _placeInFolder(shNode, table, folder, "shares")
    chart = _sharesChart(scene, table, folderName)
    _placeInFolder(shNode, chart, folder, "chart")
    _placeInFolder(shNode, chart.GetNthPlotSeriesNode(0), folder, "series")  # removed with the folder
    return Explanation(folder, record, relevance, overlay, table, chart)


def replaceMaps(explanation: Explanation, maps: np.ndarray, record: dict[str, Any]) -> None:
    """Put the exact answer of a click in the place of its preview: the relevance volumes' voxels, the overlay, the
    shares and the record (attributes included) of the same folder.

    Raises:
        SegExplainError: The folder does not hold a preview, or the maps are off its grid (nothing is changed).
    """
    if explanation.record.get("preview") is not True:
        raise SegExplainError("only a preview is replaced; an exact explanation is never overwritten")
    maps = np.asarray(maps, dtype=np.float32)
    expected = (len(explanation.relevance), *slicer.util.arrayFromVolume(explanation.relevance[0]).shape)
    if maps.shape != expected:
        raise SegExplainError(f"the maps have shape {maps.shape}; expected {expected}, those of the preview")
    record = {**record, "scene_inputs": explanation.record.get("scene_inputs")}
    shNode = subjectHierarchy(explanation.overlay.GetScene())
    shNode.SetItemAttribute(explanation.folderItem, RECORD_ATTRIBUTE, json.dumps(record, default=str))
    for field in _SHOWN_FIELDS:
        shNode.SetItemAttribute(explanation.folderItem, f"SegExplain.{field}",
                                json.dumps(record.get(field), default=str))
    for node, array in zip(explanation.relevance, maps):
        slicer.util.updateVolumeFromArray(node, array)
    _setSharedDisplay(explanation.relevance, explanation.overlay)
    names = explanation.sequenceNames
    for kind in SHARE_KINDS:
        values = record["relevance_shares"][kind]
        _addNumberColumn(explanation.table, f"{kind.capitalize()} share", [values[fileSafe(n)] for n in names])
    explanation.record = record


def _setSharedDisplay(relevance: list[Any], overlay: Any) -> None:
    """One symmetric window, max|R| over all sequences, for every relevance volume and the overlay: a colour means
    the same relevance in every sequence (issue 19: a 5 % share must not look as red as a 29 % one)."""
    amplitude = sharedAmplitude(relevance)
    for node in (*relevance, overlay):
        setDivergingDisplay(node, amplitude)


def _sharesTable(scene: Any, name: str, sequences: tuple[str, ...], shares: dict[str, dict[str, float]]) -> Any:
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    _addTextColumn(table, "Sequence", list(sequences))
    for kind in SHARE_KINDS:
        _addNumberColumn(table, f"{kind.capitalize()} share", [shares[kind][s] for s in sequences])
    return table


def _addNumberColumn(table: Any, name: str, values: list[float]) -> None:
    column = table.GetTable().GetColumnByName(name)
    if column is None:
        column = vtk.vtkDoubleArray()
        column.SetName(name)
        column.SetNumberOfTuples(len(values))
        table.AddColumn(column)
    for row, value in enumerate(values):
        column.SetValue(row, float(value))
    table.GetTable().Modified()
    table.Modified()


def _sharesChart(scene: Any, table: Any, folderName: str) -> Any:
    series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(f"{folderName} positive"))
    series.SetAndObserveTableNodeID(table.GetID())
    series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeBar)
    series.SetLabelColumnName("Sequence")
    series.SetYColumnName("Positive share")
    series.SetColor(0.84, 0.38, 0.30)
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(f"{folderName} chart"))
    chart.SetAndObservePlotSeriesNodeID(series.GetID())
    chart.SetTitle(f"Relevance share per sequence: {folderName}")
    chart.SetXAxisTitle("Sequence")
    chart.SetYAxisTitle("Share of positive relevance")
    chart.SetLegendVisibility(False)
    return chart


def explanationFolders(scene: Any) -> list[int]:
    """Subject-hierarchy items of every explanation in the scene, oldest first."""
    shNode = subjectHierarchy(scene)
    items = vtk.vtkIdList()
    shNode.GetItemChildren(shNode.GetSceneItemID(), items, True)
    found = [items.GetId(i) for i in range(items.GetNumberOfIds())]
    return [item for item in found if shNode.HasItemAttribute(item, RECORD_ATTRIBUTE)]


def explanationOf(scene: Any, folderItem: int) -> Explanation:
    """The explanation stored in a folder, e.g. after the scene was saved and loaded again."""
    shNode = subjectHierarchy(scene)
    if not shNode.HasItemAttribute(folderItem, RECORD_ATTRIBUTE):
        raise SegExplainError(f"subject hierarchy item {folderItem} ({shNode.GetItemName(folderItem)!r}) is not an "
                              "explanation folder")
    children = vtk.vtkIdList()
    shNode.GetItemChildren(folderItem, children)
    nodes = [shNode.GetItemDataNode(children.GetId(i)) for i in range(children.GetNumberOfIds())]
    byRole: dict[str, list[Any]] = {}
    for node in nodes:
        if node is not None and node.GetAttribute(ROLE_ATTRIBUTE):
            byRole.setdefault(node.GetAttribute(ROLE_ATTRIBUTE), []).append(node)
    missing = [role for role in ("relevance", "overlay", "shares", "chart") if role not in byRole]
    if missing:
        raise SegExplainError(f"explanation {shNode.GetItemName(folderItem)!r} lacks its {', '.join(missing)} "
                              "node(s); was something deleted?")
    record = json.loads(shNode.GetItemAttribute(folderItem, RECORD_ATTRIBUTE))
    order = {name: i for i, name in enumerate(record.get("sequence_names", []))}
    relevance = sorted(byRole["relevance"],
                       key=lambda n: order.get(fileSafe(n.GetAttribute(SEQUENCE_ATTRIBUTE)), len(order)))
    return Explanation(folderItem, record, relevance, byRole["overlay"][0], byRole["shares"][0], byRole["chart"][0])


def removeExplanation(scene: Any, folderItem: int) -> None:
    """Delete an explanation folder and every node in it (the Re-run "replace" option; nothing else calls it)."""
    explanationOf(scene, folderItem)  # refuses to delete anything that is not an explanation folder
    subjectHierarchy(scene).RemoveItem(folderItem, True, True)


def addGroundTruthInclusivity(explanation: Explanation, segmentationNode: Any, segmentId: str) -> dict[str, float]:
    """Ground-truth inclusivity D(relevant, segment) = |relevant ∩ segment| / |segment| per sequence.

    The relevant voxels are those with positive relevance (smoothing 1, as in the command line's summary). The
    values go into the shares table as a column and into the folder's attributes.

    Returns:
        Sequence name to inclusivity, e.g. ``{"T2": 0.91, "T1": 0.34}``.
    """
    reference = explanation.relevance[0]
    mask = segmentMask(segmentationNode, segmentId, reference)
    values = metrics.ground_truth_inclusivity(explanation.maps(), mask, smoothing=1.0)
    result = dict(zip(explanation.sequenceNames, (float(v) for v in values)))
    segmentName = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
    _addNumberColumn(explanation.table, f"Inclusivity of {segmentName}", list(result.values()))
    shNode = subjectHierarchy(reference.GetScene())
    shNode.SetItemAttribute(explanation.folderItem, "SegExplain.groundTruthInclusivity", json.dumps(
        {"segmentation": segmentationNode.GetName(), "segment": segmentName, "values": result}))
    return result



def _scoreValue(row: dict[str, Any], path: tuple[str, ...], unit: str) -> float:
    """A method's score at ``path`` of its scorecard row (NaN where it was not computed or is undefined)."""
    value: Any = row
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    if value is None:
        return float("nan")
    return 100.0 * float(value) if unit == "%" else float(value)


def addScorecard(summary: dict[str, Any], reference: Any, *, name: str, explanation: Explanation | None = None) -> Any:
    """Bring a scorecard of methods into the scene as a new table node, one row per method.

    The columns are the method, faithfulness by deletion and insertion above random with their spread, whether it
    passes the randomization check and its rank correlation, max-sensitivity, the relevance outside the receptive
    field and the target (%), the time (s) and the verdict, each with its unit and description. ``summary`` is kept
    whole in the table's attribute :data:`SCORECARD_ATTRIBUTE`, so the figure and the report are drawn from it and it
    is saved with the scene.

    Args:
        summary: The ``summary.json`` of the scoring (its ``"scorecard"`` entry as
            :meth:`~SegExplainLib.engine.evaluation.Scorecard.to_json` writes it).
        reference: A volume of the scored case: the table goes beside it when there is no ``explanation``.
        name: The table's name, made unique in the scene (a user's node of that name is left as it is).
        explanation: The explanation whose folder holds the table (its role ``scorecard``), or None.

    Returns:
        The table node.

    Raises:
        SegExplainError: ``summary`` holds no scorecard (nothing is added).
    """
    card = summary.get("scorecard") if isinstance(summary, dict) else None
    if not isinstance(card, dict) or not isinstance(card.get("methods"), dict) or not card["methods"]:
        raise SegExplainError("the summary holds no scorecard of methods (expected its 'scorecard' entry with "
                              "'methods', as segexplain evaluate writes it)")
    scene = reference.GetScene()
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    rows = card["methods"]
    texts = {"Method": list(rows),
             "Randomization": [("passes" if row["randomization"]["passed"] else "fails") if "randomization" in row
                               else "not scored" for row in rows.values()],
             "Verdict": [row["verdict"] for row in rows.values()]}
    for column in ("Method", "Randomization"):
        _addTextColumn(table, column, texts[column])
    for column, unit, description, path in SCORECARD_COLUMNS:
        _addNumberColumn(table, column, [_scoreValue(row, path, unit) for row in rows.values()])
        table.SetColumnUnitLabel(column, unit)
        table.SetColumnDescription(column, description)
    _addTextColumn(table, "Verdict", texts["Verdict"])
    table.SetColumnDescription("Method", "the attribution method, as the engine names it")
    table.SetColumnDescription("Randomization", "cascading randomization of the weights from the output layer down: "
                               "a map that does not change fails")
    table.SetColumnDescription("Verdict", "trustworthy, use with care, not trustworthy or per-sequence answer, with the reasons")
    table.SetAttribute(SCORECARD_ATTRIBUTE, json.dumps(summary, default=str))
    shNode = subjectHierarchy(scene)
    if explanation is not None:
        folder = explanation.folderItem
    else:  # beside the case, as an explanation folder would be
        item = shNode.GetItemByDataNode(reference)
        folder = shNode.GetItemParent(item) if item else shNode.GetSceneItemID()
    _placeInFolder(shNode, table, folder, "scorecard")
    return table


def showScorecard(applicationLogic: Any, table: Any) -> None:
    """Show a scorecard table in the layout's table views (the selection node's active table, propagated).

    Args:
        applicationLogic: Slicer's application logic (``slicer.app.applicationLogic()`` in Slicer).
        table: The scorecard's table node.
    """
    applicationLogic.GetSelectionNode().SetActiveTableID(table.GetID())
    applicationLogic.PropagateTableSelection()


def _addTextColumn(table: Any, name: str, values: list[str]) -> None:
    column = vtk.vtkStringArray()
    column.SetName(name)
    for value in values:
        column.InsertNextValue(value)
    table.AddColumn(column)


def scorecardOf(explanation: Explanation) -> Any:
    """The newest scorecard table in the explanation's folder, or None."""
    shNode = subjectHierarchy(explanation.overlay.GetScene())
    children = vtk.vtkIdList()
    shNode.GetItemChildren(explanation.folderItem, children)
    tables = [shNode.GetItemDataNode(children.GetId(i)) for i in range(children.GetNumberOfIds())]
    tables = [node for node in tables if node is not None and node.GetAttribute(ROLE_ATTRIBUTE) == "scorecard"]
    return tables[-1] if tables else None
