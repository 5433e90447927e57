"""SegExplainMRML.display: the diverging colour table, overlays on slice views and the live amplitude filters."""

from __future__ import annotations

import numpy as np
import pytest
import slicer
from mrml_scene import addVolume
from SegExplainMRML import display
from vtk.util.numpy_support import vtk_to_numpy

from SegExplainLib.engine.filters import AmplitudeFilter
from SegExplainLib.errors import SegExplainError


def tableColor(node, index):
    rgba = [0.0] * 4
    node.GetColor(index, rgba)
    return np.array(rgba)


def displayedRgba(volume):
    """The RGBA voxels that Slicer's scalar display pipeline makes of a volume (what a slice view blends)."""
    producer = volume.GetDisplayNode().GetOutputImageDataConnection().GetProducer()
    producer.Update()
    output = producer.GetOutputDataObject(0)
    return vtk_to_numpy(output.GetPointData().GetScalars()).reshape(*slicer.util.arrayFromVolume(volume).shape, -1)


def tjoaFilter(r, kind, low, high):
    """Tjoa et al.'s filters written out: N = max|r|, pass keeps a1 N <= |r| <= a2 N, clamp zeroes below a1 N and
    clips to +-a2 N."""
    norm = np.abs(r).max()
    if kind == "pass":
        return np.where((np.abs(r) >= low * norm) & (np.abs(r) <= high * norm), r, 0.0)
    return np.where(np.abs(r) < low * norm, 0.0, np.clip(r, -high * norm, high * norm))


def test_diverging_color_node_is_a_singleton(scene):
    """A second call returns the table already in the scene instead of adding another."""
    first = display.divergingColorNode(scene)
    assert display.divergingColorNode(scene) is first
    tables = [scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
              for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode"))]
    assert [t.GetName() for t in tables].count(display.DIVERGING_COLOR_NAME) == 1


def test_diverging_color_node_entries(scene):
    """The first, centre and last entries are the colours of -1, 0 and +1; the centre is transparent."""
    node = display.divergingColorNode(scene)
    count = node.GetNumberOfColors()
    assert count % 2 == 1
    for index, value in ((0, -1.0), (count // 2, 0.0), (count - 1, 1.0)):
        np.testing.assert_allclose(tableColor(node, index), display.divergingColors(np.array(value)), atol=1e-6)
    assert tableColor(node, count // 2)[3] == 0.0
    np.testing.assert_allclose(tableColor(node, 0), [5 / 255, 48 / 255, 97 / 255, 1.0], atol=1e-6)
    np.testing.assert_allclose(tableColor(node, count - 1), [103 / 255, 0.0, 31 / 255, 1.0], atol=1e-6)


def test_diverging_colors_band_and_anchors():
    """Transparent below 4% of max|R|, opaque above; the colours interpolate the ColorBrewer anchors."""
    values = np.array([-1.0, -0.5, -0.039, 0.0, 0.039, 0.04, 0.27, 0.5, 1.0])
    colors = display.divergingColors(values)
    np.testing.assert_array_equal(colors[:, 3], [1, 1, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(colors[1, :3], np.array([67, 147, 195]) / 255)
    np.testing.assert_allclose(colors[5, :3], np.array([244, 165, 130]) / 255)
    np.testing.assert_allclose(colors[6, :3], (np.array([244, 165, 130]) + np.array([214, 96, 77])) / 2 / 255)
    np.testing.assert_array_equal(display.divergingColors(np.array([-3.0, 3.0])), colors[[0, -1]])


def test_set_diverging_display_window(scene, rng):
    """The window is symmetric about 0 with width 2 max|R| (or 2 x a given amplitude), with the diverging table."""
    relevance = rng.normal(size=(3, 4, 5)).astype(np.float32)
    node = addVolume(scene, relevance, name="R")
    shown = display.setDivergingDisplay(node)
    assert shown.GetWindow() == pytest.approx(2 * np.abs(relevance).max())
    assert shown.GetLevel() == 0.0 and not shown.GetAutoWindowLevel()
    assert shown.GetColorNodeID() == display.divergingColorNode(scene).GetID()
    assert display.setDivergingDisplay(node, 0.25).GetWindow() == pytest.approx(0.5)
    zero = addVolume(scene, np.zeros((2, 2, 2)), name="Z")
    assert display.setDivergingDisplay(zero).GetWindow() == 2.0


def test_display_pipeline_maps_relevance_to_the_diverging_colours(scene):
    """Through Slicer's display pipeline +max is dark red, -max dark blue, max/2 the table's colour, 0 transparent.

    Slicer makes every voxel whose table alpha is non-zero fully opaque, so only the band around zero is see-through.
    """
    values = np.array([2.0, -2.0, 1.0, 0.0, -1.0], np.float32)
    node = addVolume(scene, np.tile(values, (2, 3, 1)), name="R")
    display.setDivergingDisplay(node)
    rgba = displayedRgba(node)[0, 0].astype(float)
    expected = display.divergingColors(values / 2.0) * 255
    np.testing.assert_allclose(rgba[[0, 1], :3], expected[[0, 1], :3], atol=1)
    np.testing.assert_allclose(rgba[[2, 4], :3], expected[[2, 4], :3], atol=4)  # one table entry of 257
    np.testing.assert_array_equal(rgba[[0, 1, 2, 4], 3], 255)
    assert rgba[3, 3] == 0


def test_show_overlay_and_opacity(scene):
    """The composite nodes get the background, the overlay and the opacity; bad opacities are named."""
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(scene.applicationLogic)
    logic.SetMRMLScene(scene)
    logic.AddSliceNode("Red")
    composite = logic.GetSliceCompositeNode()
    background = addVolume(scene, np.ones((2, 3, 4)), name="T2")
    overlay = addVolume(scene, np.zeros((2, 3, 4)), name="R")
    display.showOverlay([composite], background, overlay, 0.4)
    assert composite.GetBackgroundVolumeID() == background.GetID()
    assert composite.GetForegroundVolumeID() == overlay.GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.4)
    display.setOverlayOpacity([composite], 1)
    assert composite.GetForegroundOpacity() == 1.0
    for bad in (1.5, -0.1, True, "0.5", None):
        with pytest.raises(SegExplainError, match=f"got {bad!r}"):
            display.setOverlayOpacity([composite], bad)
    with pytest.raises(SegExplainError, match="got 2"):
        display.showOverlay([composite], background, overlay, 2)
    assert composite.GetForegroundOpacity() == 1.0
    display.showOverlay([composite], background, None)
    assert composite.GetForegroundVolumeID() is None


def test_amplitude_filter_choice():
    """'none' and the full range [0, 1] need no filter; other ranges give Tjoa's filter; unknown kinds fail."""
    assert display.amplitudeFilter("none", 0.2, 0.5) is None
    assert display.amplitudeFilter("pass", 0.0, 1.0) is None
    assert display.amplitudeFilter("clamp", 0.0, 1.0) is None
    assert display.amplitudeFilter("pass", 0.1, 0.6) == AmplitudeFilter("pass", (0.1, 0.6))
    assert display.amplitudeFilter("clamp", 0.0, 0.3) == AmplitudeFilter("clamp", (0.0, 0.3))
    with pytest.raises(SegExplainError, match="got 'band'"):
        display.amplitudeFilter("band", 0.1, 0.6)
    with pytest.raises(SegExplainError, match="0 <= a1 < a2 <= 1"):
        display.amplitudeFilter("pass", 0.7, 0.2)


@pytest.mark.parametrize(("kind", "low", "high"), [("pass", 0.2, 0.6), ("pass", 0.5, 1.0), ("clamp", 0.0, 0.3),
                                                   ("clamp", 0.1, 0.5)])
def test_update_filtered_overlay_applies_tjoa_filters(scene, rng, kind, low, high):
    """The overlay gets the filtered map; the relevance volume keeps its voxels."""
    relevance = rng.normal(size=(4, 5, 6)).astype(np.float32)
    source = addVolume(scene, relevance, name="R")
    overlay = addVolume(scene, np.zeros_like(relevance), name="overlay")
    display.updateFilteredOverlay(source, overlay, display.amplitudeFilter(kind, low, high))
    filtered = slicer.util.arrayFromVolume(overlay)
    np.testing.assert_allclose(filtered, tjoaFilter(relevance.astype(float), kind, low, high), rtol=1e-6, atol=1e-7)
    assert not np.array_equal(filtered, relevance)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(source), relevance)


def test_update_filtered_overlay_identity_and_grid(scene, rng):
    """Without a filter the overlay is a copy of the map; an overlay on another grid is refused."""
    relevance = rng.normal(size=(4, 5, 6)).astype(np.float32)
    source = addVolume(scene, relevance, name="R")
    overlay = addVolume(scene, np.zeros_like(relevance), name="overlay")
    display.updateFilteredOverlay(source, overlay, None)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(overlay), relevance)
    slicer.util.arrayFromVolume(overlay)[...] = 0.0
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(source), relevance)
    other = addVolume(scene, np.zeros((4, 5, 7)), name="other")
    with pytest.raises(SegExplainError, match="'other'.* is not on the grid of 'R'"):
        display.updateFilteredOverlay(source, other, None)
