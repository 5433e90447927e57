"""The workflow shared by the Slicer module and the review app: controls (any object with the parameter node's
attribute names) to region, settings, job, explanation folder and display."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import slicer
from mrml_scene import addDemoCase, addVolume
from SegExplainMRML import workflow
from SegExplainMRML.job import ExplainSettings, Region, WarmExplainer

from SegExplainLib.errors import SegExplainError


def controls(**values):
    """What a front end holds: the module's parameter node names, with the panel's defaults."""
    defaults = dict(regionKind="point", radius=2.0, regionSegmentId="", displayedSequence=0, overlayOpacity=0.6,
                    filterKind="none", filterLow=0.0, filterHigh=1.0, montageOrientation="Axial")
    return SimpleNamespace(**{**defaults, **values})


@pytest.fixture
def volume(scene):
    return addVolume(scene, np.zeros((6, 8, 10)), spacing=(2.0, 1.0, 1.0))


def test_point_region_is_the_last_clicked_point_with_the_radius(scene, volume):
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points.AddControlPoint(1.0, 1.0, 1.0)
    points.AddControlPoint(4.0, 3.0, 2.0)
    region = workflow.region(controls(radius=3.5), volume, clickedPoints=points)
    assert region.kind == "point" and region.radius == 3.5
    np.testing.assert_allclose(region.pointRas, (4.0, 3.0, 2.0))


def test_point_region_without_a_click_says_so(scene, volume):
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    with pytest.raises(SegExplainError, match="click a point"):
        workflow.region(controls(), volume, clickedPoints=points)


def test_segment_and_box_regions_need_their_nodes(volume):
    with pytest.raises(SegExplainError, match="choose a segmentation"):
        workflow.region(controls(regionKind="segment"), volume)
    with pytest.raises(SegExplainError, match="draw a box"):
        workflow.region(controls(regionKind="box"), volume)


def test_segment_region_is_the_segment_mask(scene, volume):
    label = np.zeros((6, 8, 10), np.uint8)
    label[2:4, 3:6, 4:7] = 1
    labelNode = addVolume(scene, label, name="truth label", spacing=(2.0, 1.0, 1.0))
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    labelmap.SetAndObserveImageData(labelNode.GetImageData())
    labelmap.CopyOrientation(labelNode)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "truth")
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    segmentId = segmentation.GetSegmentation().GetNthSegmentID(0)
    region = workflow.region(controls(regionKind="segment", regionSegmentId=segmentId), volume,
                             segmentation=segmentation)
    np.testing.assert_array_equal(region.mask, label > 0)
    assert "'truth'" in region.description


def test_predicted_and_class_regions_need_no_node(volume):
    assert workflow.region(controls(regionKind="predicted"), volume).kind == "predicted"
    assert workflow.region(controls(regionKind="class"), volume).kind == "class"


def test_settings_take_the_front_ends_values_and_the_logics_defaults_for_the_rest():
    settings = workflow.settings(controls(method="integrated_gradients", nSteps=48, baseline="min"))
    assert (settings.method, settings.nSteps, settings.baseline) == ("integrated_gradients", 48, "min")
    assert settings.composite == ExplainSettings().composite and settings.device == "auto"
    assert settings.layerFilter == ""


def test_layer_wise_filter_is_the_current_filter_only_when_asked():
    asked = controls(layerwiseFilter=True, filterKind="pass", filterLow=0.1, filterHigh=0.6)
    assert workflow.settings(asked).layerFilter == "pass:0.1,0.6"
    assert workflow.settings(asked).request(Region("predicted")).layer_filter == "pass:0.1,0.6"
    assert workflow.settings(controls(layerwiseFilter=False, filterKind="pass")).layerFilter == ""
    assert workflow.settings(controls(layerwiseFilter=True, filterKind="none")).layerFilter == ""


def test_bad_settings_name_the_value():
    with pytest.raises(SegExplainError, match="'lrpp'"):
        workflow.settings(controls(method="lrpp"))


def test_start_refuses_a_missing_sequence(scene, volume):
    with pytest.raises(SegExplainError, match="one volume for each of the 2 sequences: T2, T1"):
        workflow.startExplanation(WarmExplainer(), [volume], ["T2", "T1"], None, ExplainSettings(), None)
    with pytest.raises(SegExplainError, match="one volume for each"):
        workflow.prepareExplanation(WarmExplainer(), [volume, None], ["T2", "T1"], None)


@pytest.fixture
def finishedJob(scene, demoRun):
    """The session's demo click as a done click on this test's volumes (its answer reused, not rerun)."""
    from SegExplainMRML.nodes import stackVolumes

    assert demoRun.run.state == "done", demoRun.run.error
    volumes, _ = addDemoCase(scene)
    run = SimpleNamespace(region=demoRun.run.region, settings=demoRun.run.settings, stack=stackVolumes(volumes),
                          state="done", answer=SimpleNamespace(maps=demoRun.maps), preview=None, explanation=None,
                          record=lambda: demoRun.record)
    return run, volumes


def test_finish_names_the_folder_after_method_and_region(scene, finishedJob):
    job, volumes = finishedJob
    explanation = workflow.finishExplanation(job, volumes)
    name = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene).GetItemName(explanation.folderItem)
    assert name == f"lrp epsilon_plus, {job.region.description}"
    assert explanation.record["command"] == job.record()["command"]
    np.testing.assert_array_equal(explanation.maps(), job.answer.maps)
    assert [explanation.inputVolume(i) for i in range(6)] == volumes


def test_show_filters_the_chosen_sequence_into_the_overlay(scene, finishedJob):
    job, volumes = finishedJob
    explanation = workflow.finishExplanation(job, volumes)
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(scene.applicationLogic)
    logic.SetMRMLScene(scene)
    logic.AddSliceNode("Red")
    composite = logic.GetSliceCompositeNode()
    shown = controls(displayedSequence=2, filterKind="pass", filterLow=0.5, filterHigh=1.0, overlayOpacity=0.4)
    workflow.showExplanation(explanation, shown, [composite])
    raw = slicer.util.arrayFromVolume(explanation.relevance[2])
    keep = np.abs(raw) >= 0.5 * np.abs(raw).max()
    overlay = slicer.util.arrayFromVolume(explanation.overlay)
    np.testing.assert_array_equal(overlay[keep], raw[keep])
    assert not overlay[~keep].any()
    assert composite.GetBackgroundVolumeID() == volumes[2].GetID()
    assert composite.GetForegroundVolumeID() == explanation.overlay.GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.4)
    montage = workflow.montage(explanation, shown, scene.applicationLogic)
    assert montage.ndim == 3 and montage.shape[2] == 4


def test_other_options_are_a_json_object_passed_to_the_engine():
    settings = workflow.settings(controls(method="smoothgrad", advancedOptions=' {"noise_level": 0.2, "n_samples": 4} '))
    assert settings.extraOptions == {"noise_level": 0.2, "n_samples": 4}
    arguments = settings.request(Region("predicted")).arguments()
    assert arguments[arguments.index("--option") + 1] == "noise_level=0.2"
    assert workflow.settings(controls(advancedOptions="")).extraOptions == {}
    with pytest.raises(SegExplainError, match="JSON object .* got '\\{noise: 1\\}'"):
        workflow.settings(controls(advancedOptions="{noise: 1}"))
    with pytest.raises(SegExplainError, match="JSON object .* got '\\[1, 2\\]'"):
        workflow.settings(controls(advancedOptions="[1, 2]"))


def test_show_gives_every_map_the_shared_window(scene, finishedJob):
    """The overlay's window is the explanation's shared +-max|R| over all its sequences, whichever map it shows and
    whatever the filter."""
    job, volumes = finishedJob
    explanation = workflow.finishExplanation(job, volumes)
    for index, filterKind in ((2, "none"), (2, "pass"), (0, "pass"), (2, "clamp")):
        workflow.showExplanation(explanation, controls(displayedSequence=index, filterKind=filterKind,
                                                       filterLow=0.2, filterHigh=0.6), [])
        assert explanation.overlay.GetDisplayNode().GetWindow() == pytest.approx(2 * np.abs(explanation.maps()).max(),
                                                                                 rel=1e-6)
        assert explanation.overlay.GetAttribute("SegExplain.sequence") == explanation.sequenceNames[index]
