"""Every ``SlicerParameterName`` binding of the panel is one that Slicer's GUI connectors can connect.

``connectGui`` raises at the first binding it cannot connect, and everything after it in ``setup()`` is then never
wired. Slicer is not importable here, so the .ui (each bound widget's class) and the parameter node's annotations
(parsed) are checked against the table of connectors read from Slicer's source (:mod:`slicer_connectors`).
"""

from __future__ import annotations

import ast
import builtins
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from slicer_connectors import CONNECTORS, SLICER_VERSIONS, annotationKind, connectionProblem

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "SegExplain" / "SegExplain.py"
UI = ROOT / "SegExplain" / "Resources" / "UI" / "SegExplain.ui"


@pytest.fixture(scope="module")
def tree() -> ast.Module:
    return ast.parse(MODULE.read_text())


@pytest.fixture(scope="module")
def annotations(tree) -> dict[str, ast.expr]:
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegExplainParameterNode")
    return {s.target.id: s.annotation for s in node.body if isinstance(s, ast.AnnAssign)}


@pytest.fixture(scope="module")
def enums(tree) -> set[str]:
    return {n.name for n in tree.body if isinstance(n, ast.ClassDef)
            and any(ast.unparse(base) in ("Enum", "enum.Enum") for base in n.bases)}


def _bindings() -> dict[str, str]:
    """Parameter name -> class of the widget bound to it in the .ui."""
    bound = {}
    for widget in ElementTree.parse(UI).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget.get("class")
    return bound


def _parse(source: str) -> ast.expr:
    return ast.parse(source, mode="eval").body


def test_the_table_says_what_slicers_connectors_say():
    """Pairs read from Slicer's canRepresent/constructors: what connects and what raises."""
    assert SLICER_VERSIONS and len({c.name for c in CONNECTORS}) == len(CONNECTORS)
    connects = [("QLineEdit", "str"), ("QComboBox", "Annotated[str, Choice(['a'])]"), ("ctkPathLineEdit", "Path"),
                ("ctkPathLineEdit", "pathlib.Path"), ("QSpinBox", "int"), ("ctkSliderWidget",
                "Annotated[float, WithinRange(0, 1)]"), ("qMRMLNodeComboBox", "vtkMRMLVectorVolumeNode"),
                ("qMRMLNodeComboBox", "vtkMRMLScalarVolumeNode | None"), ("QCheckBox", "bool"),
                ("QComboBox", "Method")]
    for widget, annotation in connects:
        assert connectionProblem(widget, _parse(annotation), {"Method"}) == "", (widget, annotation)
    fails = [("ctkPathLineEdit", "str"), ("QComboBox", "str"), ("QLineEdit", "Path"), ("ctkSliderWidget", "float"),
             ("QSlider", "int"), ("QSpinBox", "float"), ("QCheckBox", "int"), ("qMRMLNodeComboBox", "str")]
    for widget, annotation in fails:
        assert connectionProblem(widget, _parse(annotation), set()), (widget, annotation)
    # added in 5.10: a float/int connector for an int on a ctkSliderWidget
    assert connectionProblem("ctkSliderWidget", _parse("Annotated[int, WithinRange(0, 9)]"), set()) == ""
    assert annotationKind(_parse("list[vtkMRMLScalarVolumeNode]"), set()) == "other"


def test_every_binding_in_the_ui_can_be_connected_by_slicer(annotations, enums):
    bound = _bindings()
    assert bound, "no widget of the .ui is bound to the parameter node"
    problems = [f"{name} ({widget}, {ast.unparse(annotations[name])}): {problem}"
                for name, widget in sorted(bound.items())
                if (problem := connectionProblem(widget, annotations[name], enums))]
    assert not problems, "connectGui would raise:\n" + "\n".join(problems)


def test_annotation_names_resolve_in_the_module(tree, annotations):
    """parameterNodeWrapper evaluates the (postponed) annotations with typing.get_type_hints in the module's
    namespace: every name they use must be imported or defined at module level."""
    defined = set(dir(builtins))
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            defined |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined |= {target.id for target in node.targets if isinstance(target, ast.Name)}
    used = {n.id for annotation in annotations.values() for n in ast.walk(annotation) if isinstance(n, ast.Name)}
    assert used - defined == set()


def test_values_the_module_sets_fit_the_parameter_types(tree, annotations, enums):
    """parameterNodeWrapper validates every write: a path field takes a pathlib path (not text) and a Choice field
    one of its choices; the module (and its self-test) sets constants that fit."""
    checked = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign):
            continue
        unpacked = isinstance(node.targets[0], ast.Tuple) and isinstance(node.value, ast.Tuple)
        pairs = zip(node.targets[0].elts, node.value.elts, strict=True) if unpacked else [(node.targets[0], node.value)]
        for target, value in pairs:
            if not (isinstance(target, ast.Attribute) and ast.unparse(target.value) in ("parameters", "restored")
                    and target.attr in annotations):
                continue
            annotation, kind = annotations[target.attr], annotationKind(annotations[target.attr], enums)
            where = f"line {node.lineno}: parameters.{target.attr} = {ast.unparse(value)}"
            if kind == "path":
                assert not isinstance(value, ast.Constant), where
            choices = [extra for extra in ast.walk(annotation) if isinstance(extra, ast.Call)
                       and ast.unparse(extra.func) == "Choice"]
            if choices and isinstance(value, ast.Constant):
                assert value.value in ast.literal_eval(choices[0].args[0]), where
            checked += 1
    assert checked
