"""A real MRML scene with Slicer's application and module logics, as the Slicer application sets them up.

``slicer-core`` (PyPI) provides Slicer's MRML and logic libraries without Qt. The fixture wires them the way
qSlicerCoreApplication does (application logic, colour, volumes, segmentations, markups, subject hierarchy logics,
slice orientation presets), so the module's Qt-free logic runs on exactly the classes it meets inside Slicer.
``demoRun`` runs one real click through the warm worker per session; the results and export tests load its maps.
``demoScoring`` scores two methods for the same voxel through the warm worker once per session; the scorecard and
export tests load its scorecard.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the Slicer module tests need slicer-core (pip install -e '.[test]')")
import vtk  # noqa: E402 - comes with slicer-core
from mrml_scene import QUICK_SCORING, addDemoCase, polledToEnd, wiredScene  # noqa: E402


@pytest.fixture
def scene():
    scene = wiredScene()
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = scene  # slicer.util works on the current scene, as in the application
    yield scene
    slicer.mrmlScene = previous
    scene.Clear(True)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def demoRun():
    """One real click through the warm worker (LRP of a lesion voxel of the demo case), polled to its end with a
    120 s deadline; its maps and record are kept for the results and export tests."""
    from SegExplainMRML.job import ExplainSettings, ModelSource, Region, WarmExplainer
    from SegExplainMRML.workflow import startExplanation

    scene = wiredScene()
    volumes, label = addDemoCase(scene)
    lesion = np.argwhere(label > 0)
    voxel = tuple(int(v) for v in lesion[len(lesion) // 2])  # (k, j, i)
    ijkToRas = vtk.vtkMatrix4x4()
    volumes[0].GetIJKToRASMatrix(ijkToRas)
    pointRas = ijkToRas.MultiplyPoint((*(float(v) for v in voxel[::-1]), 1.0))[:3]
    explainer = WarmExplainer()
    run = startExplanation(explainer, volumes, [v.GetName() for v in volumes], Region("point", pointRas=pointRas),
                           ExplainSettings(), ModelSource())
    events = polledToEnd(run, 120)
    done = run.state == "done"
    explainer.close()
    scene.Clear(True)
    return SimpleNamespace(run=run, events=events, label=label, voxel=voxel, maps=run.answer.maps if done else None,
                           record=run.record() if done else None)


@pytest.fixture(scope="session")
def demoScoring(demoRun):
    """The scorecard of gradient and gradient x input for the session click's voxel (the "Score methods" action)
    through a real warm worker, polled to its end with a 300 s deadline."""
    from SegExplainMRML.job import ExplainSettings, ModelSource, Region, WarmExplainer
    from SegExplainMRML.workflow import scoringOptions, startScoring

    scene = wiredScene()
    volumes, _ = addDemoCase(scene)
    explainer = WarmExplainer()
    region = Region("point", pointRas=demoRun.run.region.pointRas, description="point 'F-1', radius 0 mm")
    run = startScoring(explainer, volumes, [v.GetName() for v in volumes], region, ExplainSettings(),
                       ("gradient", "gradient_x_input"), ModelSource(),
                       options=scoringOptions(SimpleNamespace(scoringOptions=json.dumps(QUICK_SCORING))))  # the panel's
    events = polledToEnd(run, 300)
    explainer.close()
    scene.Clear(True)
    return SimpleNamespace(run=run, events=events, record=run.record() if run.state == "done" else None)
