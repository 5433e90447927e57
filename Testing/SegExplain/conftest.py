"""A real MRML scene with Slicer's application and module logics, as the Slicer application sets them up.

``slicer-core`` (PyPI) provides Slicer's MRML and logic libraries without Qt. The fixture wires them the way
qSlicerCoreApplication does (application logic, colour, volumes, segmentations, markups, subject hierarchy logics,
slice orientation presets), so the module's Qt-free logic runs on exactly the classes it meets inside Slicer.
``demoRun`` runs one real explanation job per session; the results and export tests load its output.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the Slicer module tests need slicer-core (pip install -e '.[test]')")
import vtk  # noqa: E402 - comes with slicer-core

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "SegExplain"))


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


@pytest.fixture
def scene():
    scene = wiredScene()
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = scene  # slicer.util works on the current scene, as in the application
    yield scene
    slicer.mrmlScene = previous
    scene.Clear(True)


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


@pytest.fixture
def rng():
    return np.random.default_rng(0)


#: Grid of the demo case in the tests: anisotropic voxels, off the origin.
DEMO_SPACING, DEMO_ORIGIN = (1.2, 1.2, 3.0), (-20.0, 10.0, 5.0)


def addDemoCase(scene):
    """The six sequences of demo case 1000 as volumes, and its lesion label.

    The volumes are named like DICOM series in Slicer (``'7: T1-60s'``): names that are not file-safe.
    """
    from SegExplainLib.demo import SEQUENCE_NAMES, make_case

    image, label = make_case(1000)
    volumes = [addVolume(scene, channel, name=f"{series}: {name}", spacing=DEMO_SPACING, origin=DEMO_ORIGIN)
               for series, (channel, name) in enumerate(zip(image, SEQUENCE_NAMES), start=4)]
    return volumes, label


@pytest.fixture(scope="session")
def demoRun(tmp_path_factory):
    """One real explanation job (LRP of a lesion voxel of the demo case), polled to its end with a 120 s deadline.

    Its output folder is copied before ``job.cleanup()``, for the results and export tests.
    """
    from SegExplainMRML.job import ExplainJob, ExplainSettings, Region
    from SegExplainMRML.nodes import stackVolumes

    scene = wiredScene()
    volumes, label = addDemoCase(scene)
    lesion = np.argwhere(label > 0)
    voxel = tuple(int(v) for v in lesion[len(lesion) // 2])  # (k, j, i)
    ijkToRas = vtk.vtkMatrix4x4()
    volumes[0].GetIJKToRASMatrix(ijkToRas)
    pointRas = ijkToRas.MultiplyPoint((*(float(v) for v in voxel[::-1]), 1.0))[:3]
    job = ExplainJob(stackVolumes(volumes), Region("point", pointRas=pointRas), ExplainSettings())
    job.start()
    events, deadline = [], time.monotonic() + 120
    while job.running and time.monotonic() < deadline:
        events += job.poll()
        time.sleep(0.05)
    if job.running:
        job.cancel()
    output = tmp_path_factory.mktemp("demo-run") / "result"
    if job.state == "done":
        shutil.copytree(job.outputFolder, output)
    job.cleanup()
    scene.Clear(True)
    return SimpleNamespace(job=job, events=events, output=output, label=label, voxel=voxel)
