"""The widget/type pairs that Slicer's parameter node GUI connectors can connect, read from Slicer's source.

Source: ``Base/Python/slicer/parameterNodeWrapper/guiConnectors.py`` of github.com/Slicer/Slicer, read at
``v5.10.0`` (a2b6d082be04274a849884fbb1e85634a9df90fb), ``v5.12.0`` (a5df71450f1d27d87dc1c513bc25c57c702bf71d) and
``main`` (583e9b37d50ead7daf7b783dce465ccaecec8809, 2026-08-21, version 5.13): the file is the same in all three.
``v5.8.0`` (d20ee94ceeaf3da1d67042059c6c125c82626005) lacks the entries marked ``since="5.10"``; the module needs
Python 3.10, which Slicer ships from 5.10 on (5.8 has Python 3.9.10), so 5.10 is the oldest version checked.

``createGuiConnector(widget, datatype)`` tries the connectors in the order below and takes the first whose
``canRepresent`` holds; the widget test is ``type(widget) == ...`` or ``type(widget) in (...)``, an exact class, so a
subclass (``ctkPathLineEdit`` is no ``QLineEdit``) does not match. A connector that matches may still raise in its
constructor: ``needs`` names that condition (``choice``: a ``Choice`` annotation; ``bounds``: ``WithinRange``, or
both ``Minimum`` and ``Maximum``). No connector matches: ``RuntimeError("Unable to create GUI connector from
datatype ...")``, and ``connectGui`` stops there, leaving every later binding unconnected.

Types, as :func:`annotationKind` names them: ``bool``, ``int``, ``float``, ``str``, ``enum`` (an ``enum.Enum``
subclass), ``path`` (``pathlib.Path``, ``PosixPath``, ``WindowsPath``, ``PurePath``, ``PurePosixPath``,
``PureWindowsPath``), ``node`` (a ``vtkMRMLNode`` subclass or a union of them with None), ``FloatRange``, ``QColor``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

SLICER_VERSIONS = {"v5.10.0": "a2b6d082be04274a849884fbb1e85634a9df90fb",
                   "v5.12.0": "a5df71450f1d27d87dc1c513bc25c57c702bf71d",
                   "main (5.13)": "583e9b37d50ead7daf7b783dce465ccaecec8809"}

_PATH_TYPES = {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}
_SIMPLE_TYPES = {"bool", "int", "float", "str", "FloatRange", "QColor"}


@dataclass(frozen=True)
class Connector:
    """One GUI connector of Slicer: the widget classes and value types it takes, and what its constructor needs."""

    name: str
    widgets: tuple[str, ...]
    types: tuple[str, ...]
    needs: str = ""
    needsFor: tuple[str, ...] = ()  # the widgets for which ``needs`` holds; all when empty
    since: str = "5.8"


#: In Slicer's registration order (the first match wins).
CONNECTORS = (
    Connector("QCheckBoxToBoolConnector", ("QCheckBox", "ctkCheckBox"), ("bool",)),
    Connector("QCheckablePushButtonToBoolConnector", ("QPushButton",), ("bool",)),
    Connector("ctkCheckablePushButtonToBoolConnector", ("ctkCheckablePushButton",), ("bool",), since="5.10"),
    Connector("QSliderOrSpinBoxToIntConnector", ("QSlider", "QSpinBox"), ("int",), needs="bounds",
              needsFor=("QSlider",)),
    # before 5.10: float only, named QDoubleSpinBoxCtkSliderWidgetToFloatConnector
    Connector("QDoubleSpinBoxCtkSliderWidgetToFloatIntConnector",
              ("QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider", "ctkDoubleSpinBox",
               "qMRMLSpinBox"), ("float", "int"), needs="bounds", needsFor=("ctkSliderWidget", "qMRMLSliderWidget")),
    Connector("QComboBoxToStringableConnector", ("QComboBox", "ctkComboBox"), ("int", "float", "str", "bool"),
              needs="choice"),
    Connector("QComboBoxToEnumConnector", ("QComboBox", "ctkComboBox"), ("enum",)),
    Connector("QLineEditToStrConnector", ("QLineEdit",), ("str",)),
    Connector("QLabelToStrConnector", ("QLabel",), ("str",)),
    Connector("QTextEditPlainTextToStrConnector", ("QTextEdit",), ("str",)),
    Connector("ctkRangeWidgetToRangeConnector", ("ctkRangeWidget", "ctkDoubleRangeSlider", "qMRMLRangeWidget"),
              ("FloatRange",), needs="bounds"),
    Connector("ctkPathLineEditToPathConnector", ("ctkPathLineEdit",), ("path",)),
    Connector("ctkDirectoryButtonToPathConnector", ("ctkDirectoryButton",), ("path",)),
    Connector("qMRMLNodeComboBoxToNodeConnector", ("qMRMLNodeComboBox",), ("node",)),
    Connector("ctkColorPickerButtonToQColorConnector", ("ctkColorPickerButton",), ("QColor",), since="5.10"),
)


def _name(node: ast.expr) -> str:
    """``pathlib.Path`` -> ``Path``, ``typing.Optional`` -> ``Optional``, ``str`` -> ``str``."""
    return node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""


def splitAnnotation(annotation: ast.expr) -> tuple[ast.expr, list[str]]:
    """The type inside ``Annotated[type, ...]`` and the names of its annotations (``Choice``, ``WithinRange``)."""
    if isinstance(annotation, ast.Subscript) and _name(annotation.value) == "Annotated":
        first, *rest = annotation.slice.elts
        return first, [_name(extra.func) if isinstance(extra, ast.Call) else _name(extra) for extra in rest]
    return annotation, []


def annotationKind(annotation: ast.expr, enums: set[str]) -> str:
    """The kind of value type (see the module docstring) of an annotation, parsed; ``other`` if none of them."""
    base, _extras = splitAnnotation(annotation)
    if isinstance(base, ast.BinOp) or (isinstance(base, ast.Subscript) and _name(base.value) in ("Union", "Optional")):
        parts = ([base.left, base.right] if isinstance(base, ast.BinOp) else
                 base.slice.elts if isinstance(base.slice, ast.Tuple) else [base.slice])
        named = [_name(part) for part in parts if not (isinstance(part, ast.Constant) and part.value is None)]
        return "node" if named and all(name.startswith("vtkMRML") for name in named) else "other"
    name = _name(base)
    if name in _SIMPLE_TYPES:
        return name
    if name in _PATH_TYPES:
        return "path"
    if name in enums:
        return "enum"
    return "node" if name.startswith("vtkMRML") else "other"


def connectionProblem(widgetClass: str, annotation: ast.expr, enums: set[str], *, version: str = "5.10") -> str:
    """Why Slicer (``version`` or newer) cannot connect a widget of this class to a parameter with this annotation,
    as ``createGuiConnector`` would fail; empty if it can."""
    kind = annotationKind(annotation, enums)
    extras = splitAnnotation(annotation)[1]
    available = [c for c in CONNECTORS if tuple(map(int, c.since.split("."))) <= tuple(map(int, version.split(".")))]
    connector = next((c for c in available if widgetClass in c.widgets and kind in c.types), None)
    if connector is None:
        return f"no connector takes a {widgetClass} with a {kind} value ('Unable to create GUI connector')"
    if connector.needsFor and widgetClass not in connector.needsFor:
        return ""
    if connector.needs == "choice" and "Choice" not in extras:
        return f"{connector.name} requires the Choice annotation"
    if connector.needs == "bounds" and "WithinRange" not in extras and not {"Minimum", "Maximum"} <= set(extras):
        return f"{connector.name} requires a bounded value (WithinRange, or Minimum and Maximum)"
    return ""
