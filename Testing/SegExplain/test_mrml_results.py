"""SegExplainMRML.results: explanations as subject-hierarchy folders, saved and restored with the scene."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import slicer
import vtk
from mrml_scene import addDemoCase, wiredScene
from SegExplainMRML import display, job, nodes, results

from SegExplainLib.engine import metrics
from SegExplainLib.errors import SegExplainError


@pytest.fixture
def case(scene, demoRun):
    """The demo case's volumes in the scene, with the maps and record of the session's click."""
    assert demoRun.run.state == "done", demoRun.run.error
    volumes, label = addDemoCase(scene)
    return SimpleNamespace(scene=scene, volumes=volumes, label=label, stack=nodes.stackVolumes(volumes),
                           maps=demoRun.maps, summary=demoRun.record)


def load(case, name="LRP lesion", maps=None, stack=None):
    return results.addExplanation(case.maps if maps is None else maps, case.summary, stack or case.stack,
                                  case.volumes, name=name)


def ijkToRas(node):
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix


def tableRows(table):
    """The shares table as {sequence: {column: value}}."""
    data = table.GetTable()
    columns = [data.GetColumnName(c) for c in range(1, data.GetNumberOfColumns())]
    return {data.GetValueByName(row, "Sequence").ToString(): {c: data.GetValueByName(row, c).ToDouble() for c in columns}
            for row in range(data.GetNumberOfRows())}


def nodeIds(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def addSegmentation(scene, label, reference):
    """A segmentation imported from a labelmap on the reference grid; returns it and its segment id per label."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "Truth label")
    labelmap.SetIJKToRASMatrix(ijkToRas(reference))
    slicer.util.updateVolumeFromArray(labelmap, label.astype(np.uint8))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Truth")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    segments = segmentation.GetSegmentation()
    ids = [segments.GetNthSegmentID(i) for i in range(segments.GetNumberOfSegments())]
    return segmentation, {segments.GetSegment(i).GetLabelValue(): i for i in ids}


def saveScene(scene, folder):
    """Write every node saved with the scene to its default file format, then the scene file."""
    storable = scene.GetNodesByClass("vtkMRMLStorableNode")
    for index in range(storable.GetNumberOfItems()):
        node = storable.GetItemAsObject(index)
        if not node.GetSaveWithScene():
            continue
        if node.GetStorageNode() is None:
            node.AddDefaultStorageNode()
        storage = node.GetStorageNode()
        storage.SetFileName(str(folder / f"{node.GetID()}.{storage.GetDefaultWriteFileExtension()}"))
        assert storage.WriteData(node), node.GetID()
    scene.SetRootDirectory(str(folder))
    scene.SetURL(str(folder / "scene.mrml"))
    assert scene.Commit()


def test_load_makes_one_folder_holding_the_record(case):
    """One explanation folder appears, its record attribute is the summary (with its command line) plus the scene's
    input volumes."""
    explanation = load(case)
    assert results.explanationFolders(case.scene) == [explanation.folderItem]
    shNode = results.subjectHierarchy(case.scene)
    assert shNode.GetItemName(explanation.folderItem) == "LRP lesion"
    record = json.loads(shNode.GetItemAttribute(explanation.folderItem, results.RECORD_ATTRIBUTE))
    sceneInputs = [{"sequence": v.GetName(), "file_name": job.fileSafe(v.GetName()), "volume": v.GetName()}
                   for v in case.volumes]
    assert record == {**case.summary, "scene_inputs": sceneInputs} == explanation.record
    assert record["command"][:2] == ["segexplain", "explain"]
    assert json.loads(shNode.GetItemAttribute(explanation.folderItem, "SegExplain.method")) == "lrp"
    assert json.loads(shNode.GetItemAttribute(explanation.folderItem, "SegExplain.target")) == case.summary["target"]
    for field in ("options", "target_score", "delta"):
        assert json.loads(shNode.GetItemAttribute(explanation.folderItem, f"SegExplain.{field}")) == case.summary[field]


def test_relevance_volumes_are_the_files_on_the_input_grid(case):
    """Each relevance volume holds its file's voxels on its input's grid, references that input, and sits in the
    folder; the overlay starts as the first sequence's map."""
    explanation = load(case)
    maps = case.maps
    shNode = results.subjectHierarchy(case.scene)
    assert len(explanation.relevance) == 6 and explanation.sequenceNames == list(case.stack.names)
    for index, (node, volume) in enumerate(zip(explanation.relevance, case.volumes)):
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), maps[index])
        np.testing.assert_array_equal(*(slicer.util.arrayFromVTKMatrix(ijkToRas(n)) for n in (node, volume)))
        assert explanation.inputVolume(index).GetID() == volume.GetID()
        assert shNode.GetItemParent(shNode.GetItemByDataNode(node)) == explanation.folderItem
        assert node.GetDisplayNode().GetColorNodeID() == display.divergingColorNode(case.scene).GetID()
    np.testing.assert_array_equal(explanation.maps(), maps)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(explanation.overlay), maps[0])
    assert np.abs(maps).max() > 0


def assertSharedWindow(explanation, maps):
    """Every relevance volume and the overlay are windowed on the same +-max|R| over all sequences."""
    largest = np.abs(maps).reshape(len(maps), -1).max(axis=1)
    assert largest.min() < 0.5 * largest.max()  # the sequences' own maxima differ: a per-sequence window would show
    for node in (*explanation.relevance, explanation.overlay):
        shown = node.GetDisplayNode()
        assert shown.GetWindow() == pytest.approx(2 * largest.max()) and shown.GetLevel() == 0.0, node.GetName()


def test_all_sequences_share_one_colour_scale(case):
    """Issue 19.3: one symmetric scale per explanation, so that a colour means the same relevance in each sequence."""
    assertSharedWindow(load(case), case.maps)


def test_shares_table_and_chart(case):
    """The table rows are the summary's shares per sequence (named file-safe there); the chart shows a bar series
    of that table."""
    explanation = load(case)
    shares = case.summary["relevance_shares"]
    rows = tableRows(explanation.table)
    assert list(rows) == list(case.stack.names)
    for sequence, row in rows.items():
        for kind in results.SHARE_KINDS:
            assert row[f"{kind.capitalize()} share"] == pytest.approx(shares[kind][job.fileSafe(sequence)], abs=1e-12)
    assert explanation.chart.GetNumberOfPlotSeriesNodes() == 1
    series = explanation.chart.GetNthPlotSeriesNode(0)
    assert series.GetTableNodeID() == explanation.table.GetID()
    assert series.GetPlotType() == slicer.vtkMRMLPlotSeriesNode.PlotTypeBar
    assert series.GetYColumnName() == "Positive share" and series.GetLabelColumnName() == "Sequence"


def test_a_second_load_never_replaces_the_first(case):
    """Loading again under the same name gives '<name> (2)' and leaves the first explanation whole."""
    first = load(case)
    second = load(case)
    shNode = results.subjectHierarchy(case.scene)
    assert results.explanationFolders(case.scene) == [first.folderItem, second.folderItem]
    assert shNode.GetItemName(second.folderItem) == "LRP lesion (2)"
    assert not {n.GetID() for n in first.relevance} & {n.GetID() for n in second.relevance}
    again = results.explanationOf(case.scene, first.folderItem)
    assert [n.GetID() for n in again.relevance] == [n.GetID() for n in first.relevance]
    np.testing.assert_array_equal(again.maps(), case.maps)


def test_only_a_preview_is_replaced_and_in_its_own_folder(case):
    """The exact answer of a click goes in the place of its preview (voxels, shares, record); an exact explanation,
    or maps off the preview's grid, are refused and change nothing."""
    exact = load(case)
    with pytest.raises(SegExplainError, match="only a preview is replaced"):
        results.replaceMaps(exact, -case.maps, case.summary)
    np.testing.assert_array_equal(exact.maps(), case.maps)
    preview = load(case, maps=case.maps * 0.5, name="preview")
    preview.record["preview"] = True
    with pytest.raises(SegExplainError, match="expected .* those of the preview"):
        results.replaceMaps(preview, case.maps[:, 1:], case.summary)
    record = {**case.summary, "preview": False, "ensemble": "2 folds (0, 1) x 8 mirrorings",
              "relevance_shares": metrics.shares_by_name(-case.maps, case.summary["sequence_names"])}
    results.replaceMaps(preview, -case.maps, record)
    again = results.explanationOf(case.scene, preview.folderItem)
    np.testing.assert_array_equal(again.maps(), -case.maps)
    assertSharedWindow(again, -case.maps)  # the window of the exact maps, not of the preview's
    assert again.record["preview"] is False and again.record["ensemble"] == "2 folds (0, 1) x 8 mirrorings"
    shNode = results.subjectHierarchy(case.scene)
    assert shNode.GetItemAttribute(preview.folderItem, "SegExplain.preview") == "false"
    table = preview.table.GetTable()
    positive = [table.GetValue(row, 1).ToDouble() for row in range(table.GetNumberOfRows())]
    assert positive == pytest.approx(list(record["relevance_shares"]["positive"].values()))
    assert results.explanationFolders(case.scene) == [exact.folderItem, preview.folderItem]
    np.testing.assert_array_equal(exact.maps(), case.maps)


def test_explanation_of_rebuilds_the_explanation(case):
    """explanationOf finds the same nodes, in sequence order, and the same record."""
    loaded = load(case)
    rebuilt = results.explanationOf(case.scene, loaded.folderItem)
    assert [n.GetID() for n in rebuilt.relevance] == [n.GetID() for n in loaded.relevance]
    for role in ("overlay", "table", "chart"):
        assert getattr(rebuilt, role).GetID() == getattr(loaded, role).GetID()
    assert rebuilt.record == loaded.record and rebuilt.folderItem == loaded.folderItem
    assert rebuilt.sequenceNames == list(case.stack.names)


def test_explanation_of_keeps_sequence_order(case):
    """The relevance volumes come back in the record's sequence order even when the folder's items are reordered."""
    loaded = load(case)
    shNode = results.subjectHierarchy(case.scene)
    first = shNode.GetItemByDataNode(loaded.relevance[0])
    assert shNode.MoveItem(first, 0)  # to the end of the folder
    assert shNode.GetItemPositionUnderParent(first) > shNode.GetItemPositionUnderParent(
        shNode.GetItemByDataNode(loaded.relevance[-1]))
    rebuilt = results.explanationOf(case.scene, loaded.folderItem)
    assert [n.GetID() for n in rebuilt.relevance] == [n.GetID() for n in loaded.relevance]


def test_explanation_survives_saving_and_loading_the_scene(case, tmp_path):
    """A saved scene loaded into a fresh scene still holds the explanation: record, maps, inputs and shares."""
    explanation = load(case)
    saveScene(case.scene, tmp_path)
    restored = wiredScene()
    try:
        restored.SetURL(str(tmp_path / "scene.mrml"))
        assert restored.Import()
        folders = results.explanationFolders(restored)
        assert len(folders) == 1
        again = results.explanationOf(restored, folders[0])
        assert again.record == explanation.record
        np.testing.assert_array_equal(again.maps(), case.maps)
        assert [again.inputVolume(i).GetName() for i in range(6)] == list(case.stack.names)
        savedRows, rows = tableRows(again.table), tableRows(explanation.table)
        assert list(savedRows) == list(rows)
        for sequence, row in rows.items():  # Slicer's TSV writer keeps 6 significant digits
            assert savedRows[sequence] == pytest.approx(row, rel=1e-5)
        assert again.relevance[0].GetDisplayNode().GetColorNode().GetName() == display.DIVERGING_COLOR_NAME
    finally:
        restored.Clear(True)


def test_remove_explanation(case):
    """Removing deletes the folder and its nodes, not the inputs; other items are not removed."""
    explanation = load(case)
    inside = {n.GetID() for n in [*explanation.relevance, explanation.overlay, explanation.table, explanation.chart,
                                  explanation.chart.GetNthPlotSeriesNode(0)]}
    results.removeExplanation(case.scene, explanation.folderItem)
    assert results.explanationFolders(case.scene) == []
    assert not inside & nodeIds(case.scene)
    assert all(case.scene.GetNodeByID(v.GetID()) is v for v in case.volumes)
    shNode = results.subjectHierarchy(case.scene)
    volumeItem = shNode.GetItemByDataNode(case.volumes[0])
    with pytest.raises(SegExplainError, match="is not an explanation folder"):
        results.removeExplanation(case.scene, volumeItem)
    assert case.scene.GetNodeByID(case.volumes[0].GetID()) is case.volumes[0]


def test_ground_truth_inclusivity(case):
    """The inclusivity of a segment equals the metric on the files and the segment's voxels, and becomes a table
    column: for the lesion, and for a box half outside the relevant voxels."""
    explanation = load(case)
    maps = case.maps
    truth = (case.label > 0).astype(np.uint8)
    truth[:, :12, 30:46][truth[:, :12, 30:46] == 0] = 2  # a box across the edge of the relevant voxels
    segmentation, segmentIds = addSegmentation(case.scene, truth, case.volumes[0])
    shNode = results.subjectHierarchy(case.scene)
    for value in (1, 2):
        values = results.addGroundTruthInclusivity(explanation, segmentation, segmentIds[value])
        expected = metrics.ground_truth_inclusivity(maps, truth == value, smoothing=1.0)
        assert list(values) == list(case.stack.names)
        np.testing.assert_allclose(list(values.values()), expected, rtol=1e-12)
        name = segmentation.GetSegmentation().GetSegment(segmentIds[value]).GetName()
        rows = tableRows(explanation.table)
        np.testing.assert_allclose([rows[s][f"Inclusivity of {name}"] for s in case.stack.names], expected, rtol=1e-12)
        stored = json.loads(shNode.GetItemAttribute(explanation.folderItem, "SegExplain.groundTruthInclusivity"))
        assert stored["segment"] == name and stored["values"] == pytest.approx(values)
    assert 0.1 < expected.min() and expected.max() < 0.9  # the box segment tells a transposed mask apart
    assert explanation.table.GetNumberOfColumns() == 6


def test_load_refuses_maps_off_the_input_grid(case):
    """Maps of another shape than one per sequence on the input grid are refused, and add nothing."""
    before = nodeIds(case.scene)
    with pytest.raises(SegExplainError, match=r"maps have shape \(5, 24, 48, 48\); expected \(6, 24, 48, 48\)"):
        load(case, maps=case.maps[:5])
    with pytest.raises(SegExplainError, match=r"maps have shape \(6, 24, 48, 47\)"):
        load(case, maps=case.maps[..., 1:])
    assert results.explanationFolders(case.scene) == []
    assert nodeIds(case.scene) == before
