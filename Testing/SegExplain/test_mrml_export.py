"""SegExplainMRML.export: slice-view captures, montages and the one-page report, from Slicer's own slice pipeline."""

from __future__ import annotations

import re
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import slicer
import vtk
from matplotlib.image import imread
from mrml_scene import addDemoCase, addVolume
from SegExplainMRML import display, export, nodes, results

from SegExplainLib.engine.filters import AmplitudeFilter
from SegExplainLib.errors import SegExplainError
from SegExplainLib.io.figures.panels import letter_path

GREY = 100.0


@pytest.fixture
def view(scene):
    """A grey background, a relevance map with a strong positive, a strong negative, a weak positive and a zero
    square, and a slice view (100 x 80 pixels) showing both at full opacity on axial slice 1."""
    background = addVolume(scene, np.full((4, 20, 20), GREY), name="T2", spacing=(1.0, 1.0, 2.0))
    background.GetDisplayNode().SetAutoWindowLevel(False)
    background.GetDisplayNode().SetWindowLevel(2 * GREY, GREY)  # grey 127
    relevance = np.zeros((4, 20, 20), np.float32)
    relevance[:, 2:8, 2:8] = 1.0
    relevance[:, 12:18, 12:18] = -1.0
    relevance[:, 2:8, 12:18] = 0.4
    relevanceNode = addVolume(scene, relevance, name="R", spacing=(1.0, 1.0, 2.0))
    overlay = addVolume(scene, relevance, name="R overlay", spacing=(1.0, 1.0, 2.0))
    for node in (relevanceNode, overlay):
        display.setDivergingDisplay(node)
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(scene.applicationLogic)
    logic.SetMRMLScene(scene)
    logic.AddSliceNode("Red")
    logic.ResizeSliceNode(100, 80)
    display.showOverlay([logic.GetSliceCompositeNode()], background, overlay, 1.0)
    logic.FitSliceToBackground()
    logic.SetSliceOffset(2.0)
    return SimpleNamespace(logic=logic, background=background, relevance=relevanceNode, overlay=overlay)


def pixelOf(logic, volume, k, j, i):
    """(row, column) of voxel (k, j, i) in a slice image (rows top to bottom), from the slice node's XY-to-RAS."""
    ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ras)
    point = ras.MultiplyPoint((i, j, k, 1.0))
    xyToRas = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Invert(logic.GetSliceNode().GetXYToRAS(), xyToRas)
    x, y, z, _ = xyToRas.MultiplyPoint(point)
    assert abs(z) < 1e-6  # the voxel is on the shown slice
    height = logic.GetSliceNode().GetDimensions()[1]
    return height - 1 - int(round(y)), int(round(x))


def test_slice_image_shows_the_overlay_colours(view):
    """Positive relevance is red over the background, negative blue, zero leaves the background as it is."""
    image = export.sliceImage(view.logic)
    assert image.shape == (80, 100, 4) and image.dtype == np.uint8
    positive, negative, weak, zero = (image[pixelOf(view.logic, view.overlay, 1, *ji)][:3].astype(int)
                                      for ji in ((4, 4), (15, 15), (4, 15), (15, 4)))
    np.testing.assert_allclose(positive, display.divergingColors(np.array(1.0))[:3] * 255, atol=1)
    np.testing.assert_allclose(negative, display.divergingColors(np.array(-1.0))[:3] * 255, atol=1)
    assert positive[0] > positive[2] and weak[0] > weak[2] and negative[2] > negative[0]
    np.testing.assert_array_equal(zero, [127, 127, 127])


def test_slice_image_follows_opacity_and_filter(view):
    """Opacity 0 shows only the background; a pass filter dropping the strong voxels blanks them in the view."""
    composite = view.logic.GetSliceCompositeNode()
    strong, weak = (pixelOf(view.logic, view.overlay, 1, *ji) for ji in ((4, 4), (4, 15)))
    shown = export.sliceImage(view.logic)
    display.setOverlayOpacity([composite], 0.0)
    hidden = export.sliceImage(view.logic)
    np.testing.assert_array_equal(hidden[strong][:3], [127, 127, 127])
    assert np.abs(shown[strong][:3].astype(int) - hidden[strong][:3]).max() > 50
    display.setOverlayOpacity([composite], 1.0)
    display.updateFilteredOverlay(view.relevance, view.overlay, AmplitudeFilter("pass", (0.0, 0.5)))
    filtered = export.sliceImage(view.logic)
    np.testing.assert_array_equal(filtered[strong][:3], [127, 127, 127])
    np.testing.assert_array_equal(filtered[weak], shown[weak])


def test_capture_slice_view_writes_the_view_as_png(view, tmp_path):
    """The PNG has the slice view's size and its pixels as drawn on the view's black background."""
    path = export.captureSliceView(view.logic, tmp_path / "red.png")
    pixels = imread(path)
    width, height, _ = view.logic.GetSliceNode().GetDimensions()
    assert pixels.shape[:2] == (height, width)
    image = export.sliceImage(view.logic).astype(float)
    assert (image[..., 3] == 0).any()  # the view is wider than the volume
    np.testing.assert_allclose(pixels[..., :3] * 255, image[..., :3] * image[..., 3:] / 255, atol=1)
    np.testing.assert_array_equal(pixels[..., 3], 1.0)
    with pytest.raises(SegExplainError, match="must end in .png"):
        export.captureSliceView(view.logic, tmp_path / "red.jpg")


TILE_OPTIONS = {"opacity": 0.6, "columns": 4, "label": None}


@pytest.mark.parametrize(("count", "orientation"), [(5, "Coronal"), (3, "Axial")])
def test_montage_tiles_and_cleanup(view, scene, count, orientation):
    """The montage's tiles are opaque RGBA slices with their slice-to-RAS matrices; their private slice view leaves no
    node behind and the user's view as it was."""
    before = scene.GetNumberOfNodes()
    shown = export.sliceImage(view.logic)
    tiles, matrices = export.montageTiles(scene, scene.applicationLogic, view.background, view.overlay, count=count,
                                          tileSize=32, orientation=orientation, **TILE_OPTIONS)
    assert len(tiles) == len(matrices) == count
    assert all(tile.shape == (32, 32, 4) and tile.dtype == np.uint8 and (tile[..., 3] == 255).all() for tile in tiles)
    assert all(matrix.shape == (4, 4) for matrix in matrices)
    assert scene.GetNumberOfNodes() == before
    assert scene.GetNumberOfNodesByClass("vtkMRMLSliceNode") == 1
    np.testing.assert_array_equal(export.sliceImage(view.logic), shown)
    red = np.stack(tiles)[..., 0].astype(int) - np.stack(tiles)[..., 2]
    assert red.max() > 50 and red.min() < -50  # both signs of the overlay show


def test_slice_montage_adds_no_view_to_the_layout(view, scene):
    """Slicer's layout manager makes a slice view widget for every view node added without a parent layout node
    (qMRMLLayoutManagerPrivate::onNodeAddedEvent): the montage's slice node has one from the moment it is added."""
    added = []

    def onNodeAdded(caller, event, node):
        if node.IsA("vtkMRMLAbstractViewNode"):
            added.append((node.GetLayoutName(), node.GetParentLayoutNode() is not None))

    onNodeAdded.CallDataType = vtk.VTK_OBJECT
    tag = scene.AddObserver(scene.NodeAddedEvent, onNodeAdded)
    try:
        export.montageTiles(scene, scene.applicationLogic, view.background, view.overlay, count=2, tileSize=16,
                            orientation="Axial", **TILE_OPTIONS)
    finally:
        scene.RemoveObserver(tag)
    assert added and all(hasParent for _name, hasParent in added), added
    assert [node.GetLayoutName() for node in slicer.util.getNodesByClass("vtkMRMLAbstractViewNode", scene)] == ["Red"]


def test_slice_montage_of_transformed_volumes(view, scene):
    """Volumes moved by a transform give the same montage: the slices follow the overlay into world space."""
    tiles, _ = export.montageTiles(scene, scene.applicationLogic, view.background, view.overlay, count=3, tileSize=32,
                                   orientation="Axial", **TILE_OPTIONS)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(2, 3, 40.0)
    transform.SetMatrixTransformToParent(matrix)
    for node in (view.background, view.overlay):
        node.SetAndObserveTransformNodeID(transform.GetID())
    moved, _ = export.montageTiles(scene, scene.applicationLogic, view.background, view.overlay, count=3, tileSize=32,
                                   orientation="Axial", **TILE_OPTIONS)
    np.testing.assert_array_equal(np.stack(moved), np.stack(tiles))
    assert (np.stack(tiles)[..., 0].astype(int) - np.stack(tiles)[..., 2]).max() > 50


def test_slice_montage_validates_arguments(view, scene):
    """Bad orientation, counts, sizes and opacities are refused with the value."""
    for options, message in (({"orientation": "Oblique"}, "got 'Oblique'"), ({"count": 0}, "count .* got 0"),
                             ({"tileSize": True}, "tileSize .* got True"), ({"columns": 1.5}, "columns .* got 1.5"),
                             ({"opacity": 2}, "opacity .* got 2")):
        with pytest.raises(SegExplainError, match=message):
            export.montageTiles(scene, scene.applicationLogic, view.background, view.overlay,
                                **{"orientation": "Axial", "count": 2, "tileSize": 16, **TILE_OPTIONS, **options})


def lettersOf(figure) -> list[str]:
    """The orientation letters of a figure's letter collection, read back from their outlines."""
    (collection,) = [a for a in figure.artists if a.get_gid() == "letters"]
    known = {letter: letter_path(letter).vertices for letter in "RLAPSI"}
    return [next(k for k, v in known.items() if v.shape == p.vertices.shape and np.allclose(v, p.vertices))
            for p in collection.get_paths()]


def test_explanation_montage_puts_r_on_the_left_of_an_axial_slice(view, scene):
    """Slicer's axial view shows the patient's right on the left: the negative square (high i, towards R) is drawn
    left of the positive one, and the letters say so; coronal and sagittal slices get their own letters."""
    view.overlay.SetAttribute(results.SEQUENCE_ATTRIBUTE, "T2")
    record = {"method": "lrp", "options": {}, "target": {"kind": "predicted", "class_index": 1}, "target_score": 2.5}
    explanation = results.Explanation(0, record, [view.relevance], view.overlay, None, None)
    figure = export.explanationMontage(explanation, scene.applicationLogic, view.background, count=1, tileSize=64,
                                       opacity=1.0)
    assert lettersOf(figure) == ["R", "L", "A", "P"]
    pixels = export.figurePixels(figure).astype(int)
    (bar,) = [ax for ax in figure.axes if ax.get_label() == "colorbar"]
    tile = pixels[:, :int(bar.get_window_extent().x0) - 10]  # the colour bar's ends left out
    red = np.nonzero((tile[..., 0] - tile[..., 2] > 60) & (tile[..., 0] - tile[..., 1] > 60))[1]
    blue = np.nonzero((tile[..., 2] - tile[..., 0] > 60) & (tile[..., 2] - tile[..., 1] > 20))[1]
    assert red.size and blue.size and blue.mean() < red.mean()
    for orientation, letters in (("Coronal", ["R", "L", "S", "I"]), ("Sagittal", ["A", "P", "S", "I"])):
        assert lettersOf(export.explanationMontage(explanation, scene.applicationLogic, view.background, count=1,
                                                   tileSize=32, orientation=orientation)) == letters


@pytest.fixture
def explanation(scene, demoRun):
    """The session click's explanation loaded into the scene, and the volumes it explains."""
    assert demoRun.run.state == "done", demoRun.run.error
    volumes, _ = addDemoCase(scene)
    loaded = results.addExplanation(demoRun.maps, demoRun.record, nodes.stackVolumes(volumes), volumes,
                                    name="LRP lesion")
    return SimpleNamespace(volumes=volumes, explanation=loaded)


def test_record_lines(explanation):
    """The report's record lists the method, the target and the command line."""
    lines = export.recordLines(explanation.explanation.record)
    assert "method: lrp" in lines
    assert any(line.startswith("target: ") and '"kind": "voxel"' in line for line in lines)
    assert any(line.startswith("command: segexplain explain --input ") for line in lines)
    assert all(len(line) <= 110 for line in lines)


def pdfPages(path) -> list[str]:
    """The text of each page of a PDF that matplotlib wrote with ``pdf.fonttype 42``: the strings of its text
    objects (UTF-16 with kerning between characters), a text object a line, and what a reader's search finds."""
    data = path.read_bytes()
    pages = []
    for stream in re.findall(rb"stream\r?\n(.*?)endstream", data, re.S):
        try:
            content = zlib.decompress(stream)
        except zlib.error:
            continue  # an image or a font
        if b"BT" not in content:
            continue
        lines = []
        for block in re.findall(rb"BT(.*?)ET", content, re.S):
            parts = re.findall(rb"\(((?:\\.|[^\\)])*)\)", block, re.S)
            raw = b"".join(re.sub(rb"\\(.)", lambda m: {b"n": b"\n", b"r": b"\r"}.get(m.group(1), m.group(1)), p)
                           for p in parts)
            lines.append(raw.decode("utf-16-be"))
        pages.append("\n".join(lines))
    return pages


def test_report_is_a_designed_summary_with_the_record_as_appendix(scene, explanation, tmp_path):
    """Page 1 says case, model, method, region, class, score, the shares of each sign per sequence, inclusivity and
    the warnings in words, over three orthogonal views per sequence on one scale with mm labels, letters and a
    labelled colour bar; page 2 holds the full record with a command line without placeholders; all searchable."""
    loaded = explanation.explanation
    loaded.record["warnings"] = ["integrated gradients misses completeness by 7 %"]
    path = export.writeReport(loaded, tmp_path / "report.pdf", title="LRP lesion")
    summary, appendix = pdfPages(path)
    words = " ".join(summary.split())
    record = loaded.record
    names = loaded.sequenceNames
    assert "LRP lesion: SegExplain report" in words
    assert "Case: the scene's volumes '4: T2'" in words and "Model: segexplain-demo-unet; classes background, lesion" \
        in words
    assert f"lrp (composite epsilon_plus) | voxel {tuple(record['target']['index'])}, class 1" in words
    assert f"target score {record['target_score']:.4g}" in words and "class 1 (lesion)" in words
    for name in names:
        share = 100 * record["relevance_shares"]["positive"][results.fileSafe(name)]
        assert f"{name}: {share:.1f} % positive, 0.0 % negative" in words
    assert "Inclusivity: not computed" in words
    assert "Warnings: integrated gradients misses completeness by 7 %" in words
    largest = np.abs(loaded.maps()).max()
    assert f"One colour scale for all sequences: ±{largest:.3g}" in words
    assert "red: for, blue: against class 1" in words  # the colour bar's label
    assert re.search(r"S: -?\d+\.\d mm \(through S-I\)", words) and re.search(r"A: -?\d+\.\d mm", words) \
        and re.search(r"R: -?\d+\.\d mm", words)
    assert "{" not in words  # no JSON on page 1
    text = " ".join(appendix.split())
    assert "Appendix: the full record" in text and "method: lrp" in text
    assert "command: segexplain explain --input 4__T2.nrrd 5__T1.nrrd" in text and "<" not in appendix
    assert "--output segexplain-output" in text


def test_report_has_the_scorecard_page_when_the_explanation_was_scored(scene, explanation, demoScoring, tmp_path):
    """A scored explanation's report has the scorecard as page 2 (its figure and each method's verdict in words,
    searchable), says so on page 1, and the record follows on page 3; without a scorecard there is no such page."""
    loaded = explanation.explanation
    unscored = pdfPages(export.writeReport(loaded, tmp_path / "plain.pdf"))
    assert not any("scorecard of methods" in page for page in unscored)
    results.addScorecard(demoScoring.record, explanation.volumes[0], name="Scorecard", explanation=loaded)
    summary, scorecard, appendix = pdfPages(export.writeReport(loaded, tmp_path / "scored.pdf"))
    assert "Page 2 is the scorecard of methods" in " ".join(summary.split()) and "(page 3)" in summary
    words = " ".join(scorecard.split())
    assert "Which map can I trust? The scorecard of methods" in words
    assert "Scored: point 'F-1', radius 0 mm, class 1 (1 voxels); methods gradient, gradient_x_input." in words
    for name, row in demoScoring.record["scorecard"]["methods"].items():
        assert f"{name}: {row['verdict'].split(':')[0]}" in words
    assert f"Recommended: {demoScoring.record['scorecard']['recommendation'][:40]}" in words
    assert "Appendix: the full record" in appendix
    with_figure = (tmp_path / "scored.pdf").stat().st_size - (tmp_path / "plain.pdf").stat().st_size
    assert with_figure > 20_000  # the scorecard's figure is drawn on the page


def test_report_views_share_one_scale_and_carry_orientation_letters(explanation, tmp_path):
    """The summary's views have one colour bar from -max|R| to max|R| of all sequences, and each of the three
    views of every sequence its four orientation letters."""
    loaded = explanation.explanation
    captured = {}
    original = export.region_views

    def spy(*args, **kwargs):
        figure = original(*args, **kwargs)  # read before the report saves (and clears) it
        (bar,) = [ax for ax in figure.axes if ax.get_label() == "colorbar"]
        (letters,) = [a for a in figure.artists if a.get_gid() == "letters"]
        captured.update(limits=bar.get_ylim(), letters=len(letters.get_paths()))
        return figure

    export.region_views = spy
    try:
        export.writeReport(loaded, tmp_path / "report.png")
    finally:
        export.region_views = original
    np.testing.assert_allclose(captured["limits"], np.array([-1, 1]) * np.abs(loaded.maps()).max(), rtol=1e-5)
    assert captured["letters"] == 4 * 3 * len(loaded.relevance)


def test_explanation_montage_is_titled_with_mm_positions_letters_and_a_labelled_scale(scene, explanation):
    """Issue 19.3-5 in the module's montage: a title with method, region, class and target score, the sequence, each
    axial slice's position in mm as Slicer gives it, four orientation letters per tile and a colour bar of the
    scale shared by all sequences that says what red and blue mean; drawn as uint8 RGBA."""
    loaded = explanation.explanation
    record = loaded.record
    figure = export.explanationMontage(loaded, scene.applicationLogic, loaded.inputVolume(2), count=3, tileSize=64)
    texts = {text.get_gid(): " ".join(text.get_text().split()) for text in figure.texts}
    assert texts["title"].startswith(f"lrp (composite epsilon_plus) | voxel {tuple(record['target']['index'])}, "
                                     f"class 1 | target score {record['target_score']:.4g}")
    largest = np.abs(loaded.maps()).max()
    assert texts[f"name:{loaded.sequenceNames[0]}"].startswith(f"{loaded.sequenceNames[0]}: axial slices")
    assert f"One colour scale for all sequences: ±{largest:.3g}" in texts[f"name:{loaded.sequenceNames[0]}"]
    offsets = export._sliceOffsets(loaded.overlay, "Axial", 3)
    assert [texts[f"slice:{i}"] for i in range(3)] == [f"S: {offset:.1f} mm" for offset in offsets]
    assert lettersOf(figure) == ["R", "L", "A", "P"] * 3
    (bar,) = [ax for ax in figure.axes if ax.get_label() == "colorbar"]
    np.testing.assert_allclose(bar.get_ylim(), (-largest, largest), rtol=1e-5)
    assert bar.get_ylabel() == "relevance\nred: for, blue: against class 1"
    pixels = export.figurePixels(figure)
    assert pixels.dtype == np.uint8 and pixels.shape[2] == 4 and pixels.shape[1] > 3 * 64


def test_write_report_refuses_other_suffixes(explanation, tmp_path):
    with pytest.raises(SegExplainError, match="report.txt"):
        export.writeReport(explanation.explanation, tmp_path / "report.txt")
