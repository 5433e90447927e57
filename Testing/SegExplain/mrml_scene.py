"""Scenes for the module's tests: Slicer's real MRML wired as the application does it, and test volumes."""

from __future__ import annotations

import time

import numpy as np
import slicer
import vtk

#: The demo case as a scanner would give it: anisotropic voxels and an origin off zero.
DEMO_SPACING, DEMO_ORIGIN = (1.2, 1.2, 3.0), (-20.0, 10.0, 5.0)
#: A scoring of methods that takes seconds: short curves, the fewest random orders, noise draws and randomization
#: stages (options of SegExplainMRML.job.ScoreRun).
QUICK_SCORING = {"steps": 4, "random_orders": 2, "n_perturbations": 1, "randomization_stages": 1}


def wiredScene():
    """A new scene with the application logic, colour tables, module logics and slice presets wired as in Slicer."""
    scene = slicer.vtkMRMLScene()
    application = slicer.vtkSlicerApplicationLogic()
    application.SetMRMLScene(scene)
    application.GetColorLogic().SetMRMLScene(scene)
    application.GetColorLogic().AddDefaultColorNodes()
    application.SetSliceLogics(vtk.vtkCollection())
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    logics = []
    for cls, name in ((slicer.vtkSlicerSegmentationsModuleLogic, "Segmentations"),
                      (slicer.vtkSlicerMarkupsLogic, "Markups"), (slicer.vtkSlicerVolumesLogic, "Volumes"),
                      (slicer.vtkSlicerSubjectHierarchyModuleLogic, "SubjectHierarchy")):
        logic = cls()
        logic.SetMRMLApplicationLogic(application)
        logic.SetMRMLScene(scene)
        application.SetModuleLogic(name, logic)
        logics.append(logic)
    scene.applicationLogic = application
    scene.moduleLogics = logics  # kept alive as long as the scene
    return scene


def addVolume(scene, array, *, name="T2", spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None):
    """A scalar volume from a (D, H, W) array with the given IJK-to-RAS geometry."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    if direction is not None:
        matrix = vtk.vtkMatrix4x4()
        for r in range(3):
            for c in range(3):
                matrix.SetElement(r, c, direction[r][c])
        node.SetIJKToRASDirectionMatrix(matrix)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array, dtype=np.float32))
    node.CreateDefaultDisplayNodes()
    return node


def addDemoCase(scene):
    """The six sequences of demo case 1000 as volumes, and its lesion label.

    The volumes are named like DICOM series in Slicer (``'7: T1-60s'``): names that are not file-safe.
    """
    from SegExplainLib.application.demo import SEQUENCE_NAMES, make_case

    image, label = make_case(1000)
    volumes = [addVolume(scene, channel, name=f"{series}: {name}", spacing=DEMO_SPACING, origin=DEMO_ORIGIN)
               for series, (channel, name) in enumerate(zip(image, SEQUENCE_NAMES), start=4)]
    return volumes, label


def explaining(run, timeout=120):
    """Poll until the worker runs this run's request (model and case are ready)."""
    deadline = time.monotonic() + timeout
    while not run._explaining and run.running and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.01)
    assert run._explaining and run.running, run.error


def polledToEnd(run, seconds: float) -> list:
    """Poll a run as the widget's timer does until it ends, cancelling it after ``seconds``; its events."""
    events, deadline = [], time.monotonic() + seconds
    while run.running and time.monotonic() < deadline:
        events += run.poll()
        time.sleep(0.02)
    if run.running:
        run.cancel()
    return events
