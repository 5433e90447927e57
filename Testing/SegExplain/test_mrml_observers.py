"""ReferenceObserver on real MRML: click-to-explain follows the parameter node's ``clickedPoints`` reference."""

from __future__ import annotations

import ast
from pathlib import Path

import slicer
import vtk
from SegExplainMRML.observers import ReferenceObserver

ROOT = Path(__file__).resolve().parents[2]


def _points(scene, name):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    node.CreateDefaultDisplayNodes()
    return node


def test_follows_the_reference_as_it_changes(scene):
    parameterNode = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "SegExplain")
    first, second = _points(scene, "first"), _points(scene, "second")
    parameterNode.SetNodeReferenceID("clickedPoints", first.GetID())
    clicks, shown = [], []
    observer = ReferenceObserver(parameterNode, "clickedPoints", slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                                 lambda caller, event: clicks.append(caller.GetName()), onChanged=shown.append)
    assert shown == [first]
    first.AddControlPoint([1.0, 2.0, 3.0])
    assert clicks == ["first"]

    parameterNode.SetNodeReferenceID("clickedPoints", second.GetID())  # e.g. a loaded scene's click node
    assert shown == [first, second]
    first.AddControlPoint([0.0, 0.0, 0.0])
    second.AddControlPoint([4.0, 5.0, 6.0])
    assert clicks == ["first", "second"]

    parameterNode.Modified()  # the same reference: nothing changes
    assert shown == [first, second]
    scene.RemoveNode(second)
    assert shown == [first, second, None]
    parameterNode.SetNodeReferenceID("clickedPoints", first.GetID())
    assert shown[-1] is first

    observer.close()
    observer.close()
    first.AddControlPoint([7.0, 8.0, 9.0])
    parameterNode.SetNodeReferenceID("clickedPoints", None)
    assert clicks == ["first", "second"] and shown[-1] is first
    assert not first.HasObserver(slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent)
    assert not parameterNode.HasObserver(vtk.vtkCommand.ModifiedEvent)


def test_the_widget_binds_clicks_through_the_reference_and_unbinds_on_exit():
    """The module's widget observes clicks only through ReferenceObserver, created with the parameter node and
    closed when the parameter node changes, the module is left (exit) or cleaned up."""
    tree = ast.parse((ROOT / "SegExplain" / "SegExplain.py").read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegExplainWidget")
    methods = {n.name: ast.unparse(n) for n in widget.body if isinstance(n, ast.FunctionDef)}
    assert "PointPositionDefinedEvent" not in "".join(text for name, text in methods.items()
                                                      if name != "_observeClicks")
    observe = methods["_observeClicks"]
    assert "ReferenceObserver(" in observe and "'clickedPoints'" in observe
    assert "onChanged=self.ui.pointPlaceWidget.setCurrentNode" in observe
    assert "self._observeClicks()" in methods["setParameterNode"]
    for name in ("exit", "cleanup", "setParameterNode"):
        assert "self._stopObservingClicks()" in methods[name], name
    assert "self._clickObserver.close()" in methods["_stopObservingClicks"]
    light = ast.parse((ROOT / "SegExplain" / "SegExplainMRML" / "observers.py").read_text())
    imported = {alias.name for node in light.body if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module for node in light.body if isinstance(node, ast.ImportFrom)}
    assert imported <= {"annotations", "__future__", "collections.abc", "Callable", "typing", "Any", "vtk"}
