"""The Slicer module file, its .ui and its CMake build agree with each other and with the Qt-free logic.

``SegExplain.py`` imports qt, ctk and Slicer's parameterNodeWrapper, which exist only inside the Slicer application,
so it is read here as source: these tests catch a widget bound to a parameter that does not exist, a menu that
offers a method the engine does not know, a parameter default that differs from the logic's, or a heavy import at
module load. The parameter node's storage (a vtkMRMLScriptedModuleNode with string parameters and node references)
is saved and loaded with a real scene. The module's own workflow test, SegExplainTest, runs inside Slicer.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from types import SimpleNamespace

import pytest
from SegExplainMRML import workflow
from SegExplainMRML.job import METHODS, MODEL_KINDS, REGION_KINDS, SCORED_METHODS, ExplainSettings, ModelSource

from SegExplainLib import composite_names
from SegExplainLib.engine.api import METHODS as ENGINE_METHODS

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "SegExplain" / "SegExplain.py"
UI = ROOT / "SegExplain" / "Resources" / "UI" / "SegExplain.ui"


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    return next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name)


@pytest.fixture(scope="module")
def tree() -> ast.Module:
    return ast.parse(MODULE.read_text())


@pytest.fixture(scope="module")
def parameters(tree) -> dict[str, tuple[str, object]]:
    """Parameter node fields: name -> (annotation source, default value or None); a path field without a default
    has Slicer's (PathSerializer.default: ``Path()``)."""
    fields = {}
    for statement in _class(tree, "SegExplainParameterNode").body:
        if isinstance(statement, ast.AnnAssign):
            default = ast.literal_eval(statement.value) if statement.value is not None else None
            if statement.value is None and ast.unparse(statement.annotation) == "pathlib.Path":
                default = Path()
            fields[statement.target.id] = (ast.unparse(statement.annotation), default)
    return fields


@pytest.fixture(scope="module")
def ui() -> ElementTree.Element:
    return ElementTree.parse(UI).getroot()


def _choices(annotation: str) -> list[str] | None:
    if "Choice(" not in annotation:
        return None
    return ast.literal_eval(annotation.split("Choice(", 1)[1].rsplit(")", 1)[0].rsplit(")", 1)[0])


def _bound_widgets(ui) -> dict[str, ElementTree.Element]:
    bound = {}
    for widget in ui.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget
    return bound


def test_module_file_has_the_five_parts_of_the_template(tree):
    classes = {node.name: [ast.unparse(b) for b in node.bases] for node in tree.body if isinstance(node, ast.ClassDef)}
    assert classes["SegExplain"] == ["ScriptedLoadableModule"]
    assert classes["SegExplainWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert classes["SegExplainLogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["SegExplainTest"] == ["ScriptedLoadableModuleTest"]
    decorators = [ast.unparse(d) for d in _class(tree, "SegExplainParameterNode").decorator_list]
    assert decorators == ["parameterNodeWrapper"]


def test_module_import_stays_light(tree):
    """Slicer imports every module at start-up: torch and the engine are imported at first use only."""
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            top_level.add(node.module.split(".")[0])
    assert not top_level & {"torch", "SegExplainLib", "SegExplainMRML", "numpy", "SimpleITK", "matplotlib"}


def test_parameter_defaults_match_the_logic(parameters):
    defaults = ExplainSettings()
    shared = {"method", "composite", "nSteps", "baseline", "aggregation", "samples", "classIndex", "device", "seed"}
    for name in shared:
        assert name in parameters, f"parameter node lacks {name}"
        assert parameters[name][1] == getattr(defaults, name), f"default of {name} differs from ExplainSettings"
    ExplainSettings(**{name: parameters[name][1] for name in shared})  # the module's defaults are valid settings


def test_parameter_choices_match_the_logic(parameters):
    assert _choices(parameters["method"][0]) == list(METHODS)


def test_the_method_menu_is_the_engines_registry(parameters):
    # a method registered in the engine (DeepLIFT, Shapley, RISE, ...) is offered by the module and the review app
    assert list(METHODS) == list(ENGINE_METHODS)
    assert _choices(parameters["method"][0]) == list(ENGINE_METHODS)
    assert _choices(parameters["regionKind"][0]) == list(REGION_KINDS)
    assert _choices(parameters["filterKind"][0]) == ["none", "pass", "clamp"]


def test_the_methods_scored_by_default_are_the_logics(parameters, ui):
    # what an empty field scores (SegExplainMRML.workflow.scoredMethods), shown as the field's placeholder
    assert parameters["scoreMethods"][1].split() == list(SCORED_METHODS)
    field = next(w for w in ui.iter("widget") if w.get("name") == "scoreMethodsLineEdit")
    placeholder = next(p for p in field.findall("property") if p.get("name") == "placeholderText")
    assert placeholder.find("string").text.split() == list(SCORED_METHODS)


def test_every_bound_widget_names_a_parameter_and_offers_valid_items(ui, parameters):
    bound = _bound_widgets(ui)
    assert bound, "no widget is bound to the parameter node"
    for name, widget in bound.items():
        assert name in parameters, f"widget {widget.get('name')} is bound to unknown parameter {name!r}"
        if widget.get("class") == "QComboBox":
            items = [item.find("property/string").text for item in widget.findall("item")]
            choices = _choices(parameters[name][0])
            if choices is not None:
                assert items == choices, f"{widget.get('name')} items differ from the choices of {name}"
            if name == "composite":
                assert set(items) <= set(composite_names()), "the composite menu offers an unknown composite"
                assert items[0] == ExplainSettings().composite


def test_every_scalar_parameter_has_a_widget(parameters, ui):
    """Node lists, segment IDs, the shown sequence and the model kind (translated item names, the kind as item
    data) are bound in code; every other parameter has a widget."""
    bound_in_code = {"modelKind", "inputVolumes", "regionSegmentation", "regionSegmentId", "clickedPoints", "displayedSequence",
                     "groundTruthSegmentation", "groundTruthSegmentId"}
    assert set(parameters) - set(_bound_widgets(ui)) == bound_in_code


def test_widgets_used_by_the_module_exist_in_the_ui(ui):
    source = MODULE.read_text()
    names = {widget.get("name") for widget in ui.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used - names == set(), f"SegExplain.py uses widgets the .ui lacks: {sorted(used - names)}"


def _method(tree: ast.Module, className: str, name: str) -> str:
    return ast.unparse(next(node for node in _class(tree, className).body
                            if isinstance(node, ast.FunctionDef) and node.name == name))


def test_trusting_model_code_is_the_users_choice_and_never_saved_with_the_scene(tree, parameters, ui):
    """A scene, like a model card, may come from someone else: the box that lets a card's code run is no parameter
    (a scene cannot tick it), starts unticked, is cleared whenever the card changes and is passed to the job."""
    box = next(widget for widget in ui.iter("widget") if widget.get("name") == "trustModelCodeCheckBox")
    properties = {prop.get("name"): prop for prop in box.findall("property")}
    assert box.get("class") == "QCheckBox" and "SlicerParameterName" not in properties
    assert "checked" not in properties or properties["checked"].find("bool").text == "false"
    assert not [name for name in parameters if "trust" in name.lower()]
    assert "self.ui.trustModelCodeCheckBox.checked = False" in _method(tree, "SegExplainWidget", "onModelChanged")
    for button in ("onApplyButton", "onScoreButton"):
        assert "trustModelCode=self.ui.trustModelCodeCheckBox.checked" in _method(tree, "SegExplainWidget", button)
    for starter in ("startExplanation", "startScoring"):
        assert "trustModelCode=trustModelCode" in _method(tree, "SegExplainLogic", starter)


def _widget(ui, name):
    return next(widget for widget in ui.iter("widget") if widget.get("name") == name)


def test_model_is_a_card_an_nnunet_folder_or_a_bundle(tree, parameters, ui):
    """The kind selector offers the logic's kinds by translated names; the parameter defaults are the logic's default
    model (the demo card); the card field takes files, the folder field folders; the nnU-Net options sit in a frame
    shown for nnU-Net only; any change of the model clears the trust box and rebuilds the sequence selectors."""
    assert _choices(parameters["modelKind"][0]) == list(MODEL_KINDS)
    defaults = {name: value for name, (_annotation, value) in parameters.items()}
    assert workflow.modelSource(type("Defaults", (), defaults)) == ModelSource()
    for kind in ("nnunet", "bundle"):  # the panel's defaults are valid options of each kind
        model = workflow.modelSource(type("Defaults", (), {**defaults, "modelKind": kind, "modelFolder": "/m"}))
        assert model == ModelSource(kind, "/m")
    setup = _method(tree, "SegExplainWidget", "setup")
    for kind, label in (("card", "Model card"), ("nnunet", "nnU-Net results folder"), ("bundle", "MONAI bundle")):
        assert f"('{kind}', _('{label}'))" in setup
    assert "self.ui.modelKindComboBox.addItem(label, kind)" in setup
    for widget in ("modelCardPathLineEdit", "modelFolderPathLineEdit", "nnunetConfigurationLineEdit"):
        assert re.search(rf"self\.ui\.{widget}\.connect\(.*self\.onModelChanged\)", setup), widget
    assert "self.onModelChanged()" in _method(tree, "SegExplainWidget", "onModelKindChanged")
    assert "self._rebuildSequenceSelectors()" in _method(tree, "SegExplainWidget", "onModelChanged")
    filters = {name: _widget(ui, name).find("property[@name='filters']/set").text
               for name in ("modelCardPathLineEdit", "modelFolderPathLineEdit")}
    assert "ctkPathLineEdit::Files" in filters["modelCardPathLineEdit"]
    assert "ctkPathLineEdit::Dirs" in filters["modelFolderPathLineEdit"]
    frame = _widget(ui, "nnunetFrame")
    bound = {prop.find("string").text for widget in frame.iter("widget") for prop in widget.findall("property")
             if prop.get("name") == "SlicerParameterName"}
    assert bound == {"nnunetConfiguration", "nnunetFolds", "nnunetMirroring"}
    shown = _method(tree, "SegExplainWidget", "_updateModelWidgets")
    assert "self.ui.nnunetFrame.visible = kind == 'nnunet'" in shown
    assert "self.logic.modelSource(self._parameterNode)" in _method(tree, "SegExplainWidget",
                                                                    "_rebuildSequenceSelectors")
    assert "model = self.modelSource(parameters)" in _method(tree, "SegExplainLogic", "_modelAndInputs")
    for starter in ("startExplanation", "startScoring"):  # the scoring runs the same model, with the user's word
        start = _method(tree, "SegExplainLogic", starter)
        assert "model, names = self._modelAndInputs(parameters)" in start
        assert "model, trustModelCode=trustModelCode" in start


def test_score_methods_runs_in_the_background_with_cancel_and_shown_errors(tree):
    """The Score methods button starts the logic's scoring under tryWithErrorDisplay and polls it from its own
    timer; pressed again it cancels; a failure of the scoring is shown; a closing scene or module cancels it."""
    pressed = _method(tree, "SegExplainWidget", "onScoreButton")
    assert "self._scoring.cancel()" in pressed and "slicer.util.tryWithErrorDisplay(" in pressed
    assert "self.logic.startScoring(self._parameterNode" in pressed and "self._scoreTimer.start()" in pressed
    started = _method(tree, "SegExplainLogic", "startScoring")
    assert "workflow.scoredMethods(parameters)" in started and "options=workflow.scoringOptions(parameters)" in started
    polled = _method(tree, "SegExplainWidget", "onScoreTimer")
    assert "run.poll()" in polled and "slicer.util.errorDisplay(" in polled
    assert "slicer.util.tryWithErrorDisplay(" in polled and "self.logic.finishScoring(run, self._explanation)" in polled
    assert "self._scoring.cancel()" in _method(tree, "SegExplainWidget", "onSceneStartClose")
    assert "self._scoring" in _method(tree, "SegExplainWidget", "cleanup")
    assert "self._scoreTimer.connect('timeout()', self.onScoreTimer)" in _method(tree, "SegExplainWidget", "__init__")
    assert "self.ui.scoreButton.connect('clicked(bool)', self.onScoreButton)" in _method(tree, "SegExplainWidget",
                                                                                          "setup")


def test_cmake_ships_the_module_and_the_engine():
    root = (ROOT / "CMakeLists.txt").read_text()
    module = (ROOT / "SegExplain" / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "SegExplain")
    assert "set(EXTENSION_DEPENDS PyTorch)" in root
    assert "add_subdirectory(SegExplain)" in root
    # the engine is a package of layer folders: every .py below SegExplainLib/, their relative paths kept
    assert "GLOB_RECURSE SegExplainLib_SCRIPTS" in root and "SegExplainLib/*.py" in root
    assert "SegExplainLib/Resources/demo/*" in root
    assert "SegExplainMRML/*.py" in module and "slicer_add_python_unittest(SCRIPT SegExplain.py)" in module
    for resource in ("Resources/Icons/SegExplain.png", "Resources/UI/SegExplain.ui"):
        assert resource in module
        assert (ROOT / "SegExplain" / resource).is_file()


def test_parameter_node_storage_survives_scene_save_and_load(scene, tmp_path):
    """What parameterNodeWrapper stores (strings and node references in a scripted module node) is saved and
    restored with the scene, including the references to the input volumes."""
    import numpy as np
    import slicer
    from mrml_scene import addVolume

    volumes = [addVolume(scene, np.full((4, 5, 6), float(c)), name=f"sequence {c}") for c in range(2)]
    parameter_node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "SegExplain")
    parameter_node.SetAttribute("ModuleName", "SegExplain")
    values = {"method": "integrated_gradients", "nSteps": "48", "filterHigh": "0.3", "layerwiseFilter": "True",
              "modelCard": "/models/prostate card/card.yaml", "modelKind": "nnunet",
              "modelFolder": "/results/Dataset001_Prostate", "nnunetFolds": "0 1", "nnunetMirroring": "False"}
    for name, value in values.items():
        parameter_node.SetParameter(name, value)
    for index, volume in enumerate(volumes):
        parameter_node.AddNodeReferenceID("inputVolumes", volume.GetID())
        storage = volume.CreateDefaultStorageNode()
        scene.AddNode(storage)
        storage.SetFileName(str(tmp_path / f"volume{index}.nrrd"))
        storage.WriteData(volume)
        volume.SetAndObserveStorageNodeID(storage.GetID())
    scene.SetRootDirectory(str(tmp_path))
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()

    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(tmp_path / "scene.mrml"))
    assert loaded.Connect()
    restored = loaded.GetFirstNodeByName("SegExplain")
    assert restored.GetAttribute("ModuleName") == "SegExplain"
    assert {name: restored.GetParameter(name) for name in values} == values
    references = [restored.GetNthNodeReference("inputVolumes", i) for i in range(2)]
    assert [node.GetName() for node in references] == ["sequence 0", "sequence 1"]
    assert float(slicer.util.arrayFromVolume(references[1]).mean()) == 1.0


def test_the_module_uses_one_warm_worker_and_ends_it(tree):
    """The logic holds one warm worker: prepared when the volumes are chosen (with the user's trust), asked by every
    click, polled by the timer, cancelled by Cancel, and closed with the module and with the scene."""
    assert "self._prepareWorker()" in _method(tree, "SegExplainWidget", "_onSequenceVolumesChanged")
    assert "trustModelCode=self.ui.trustModelCodeCheckBox.checked" in _method(tree, "SegExplainWidget",
                                                                              "_prepareWorker")
    assert "workflow.prepareExplanation(self.explainer()" in _method(tree, "SegExplainLogic", "prepareExplanation")
    assert "workflow.startExplanation(self.explainer()" in _method(tree, "SegExplainLogic", "startExplanation")
    assert "WarmExplainer()" in _method(tree, "SegExplainLogic", "explainer")
    assert "self._explainer.close()" in _method(tree, "SegExplainLogic", "closeWorker")
    for method in ("cleanup", "onSceneStartClose"):
        assert "self.logic.closeWorker()" in _method(tree, "SegExplainWidget", method)
    assert "self._job.cancel()" in _method(tree, "SegExplainWidget", "onApplyButton")
    timer = _method(tree, "SegExplainWidget", "onJobTimer")
    assert "job.poll()" in timer and "job.state == 'cancelled'" in timer and "cleanup" not in timer


#: Modules whose import imports torch (or the engine that does): only after the requirements were checked.
_ENGINE_MODULES = ("torch", "SegExplainLib", "SegExplainMRML")


def _engineImports(function: ast.FunctionDef) -> list[ast.stmt]:
    return [node for node in ast.walk(function) if (isinstance(node, ast.Import) and any(
        alias.name.split(".")[0] in _ENGINE_MODULES for alias in node.names)) or (
        isinstance(node, ast.ImportFrom) and node.module.split(".")[0] in _ENGINE_MODULES)]


def _calls(function: ast.AST, name: str) -> list[ast.Call]:
    return [node for node in ast.walk(function) if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(
        f".{name}")]


def test_self_test_imports_the_engine_only_after_the_requirements(tree):
    """On a Slicer without torch the self-test warns and returns (pip installs nothing in testing mode): runTest
    checks the requirements before any test, and a test method imports the engine only after ensureRequirements."""
    test = _class(tree, "SegExplainTest")
    methods = {node.name: node for node in test.body if isinstance(node, ast.FunctionDef)}
    run = methods["runTest"]
    check = _calls(run, "missingRequirements")
    assert check, "runTest does not check the requirements"
    guard = next(node for node in run.body if isinstance(node, ast.If))
    assert isinstance(guard.body[-1], ast.Return) and guard.lineno > check[0].lineno
    firstTest = min(call.lineno for call in ast.walk(run) if isinstance(call, ast.Call)
                    and ast.unparse(call.func).startswith("self.test_"))
    assert guard.lineno < firstTest
    for name, method in methods.items():
        imports = _engineImports(method)
        if imports:
            ensured = _calls(method, "ensureRequirements")
            assert ensured and ensured[0].lineno < min(node.lineno for node in imports), \
                f"SegExplainTest.{name} imports the engine before ensureRequirements"


def test_self_test_closes_every_worker_it_starts(tree):
    """A test method that starts an explanation (a warm worker) closes the worker in a finally block."""
    test = _class(tree, "SegExplainTest")
    methods = {node.name: node for node in test.body if isinstance(node, ast.FunctionDef)}
    starters = {name for name, method in methods.items() if _calls(method, "startExplanation")}
    assert starters
    for name, method in methods.items():
        if not name.startswith("test_"):
            continue
        starting = [call for call in ast.walk(method) if isinstance(call, ast.Call) and (
            ast.unparse(call.func).endswith(".startExplanation") or ast.unparse(call.func) in {
                f"self.{helper}" for helper in starters})]
        closing = [node for node in ast.walk(method) if isinstance(node, ast.Try)
                   and any(_calls(statement, "closeWorker") for statement in node.finalbody)]
        for call in starting:
            assert any(call in ast.walk(statement) for block in closing for statement in block.body), \
                f"SegExplainTest.{name} may leave a worker running (line {call.lineno})"


def test_sequence_selectors_filter_by_the_logics_types_and_hide_the_modules_volumes(tree):
    """The per-sequence selectors take their node types from SegExplainMRML.nodes (tested on real MRML) and hide
    the module's own volumes when built and whenever explanations are added."""
    rebuild = _method(tree, "SegExplainWidget", "_rebuildSequenceSelectors")
    assert "selector.nodeTypes = list(SEQUENCE_VOLUME_TYPES)" in rebuild
    assert "selector.hideChildNodeTypes = list(HIDDEN_SEQUENCE_VOLUME_TYPES)" in rebuild
    assert "self._hideModuleVolumes()" in rebuild
    assert "self._hideModuleVolumes()" in _method(tree, "SegExplainWidget", "_refreshExplanations")
    hide = _method(tree, "SegExplainWidget", "_hideModuleVolumes")
    assert "moduleVolumeIDs(slicer.mrmlScene)" in hide and "sortFilterProxyModel().hiddenNodeIDs = " in hide


def test_seed_is_bounded_in_the_panel_and_the_logic(parameters, ui):
    """The spin box holds 0..2**31-1 (Slicer's int connector would otherwise set it to -2**31..2**31-1), the
    parameter node validates that range, and the logic names a seed outside it."""
    from SegExplainMRML.job import SEED_MAX
    from SegExplainMRML.workflow import settings

    from SegExplainLib.errors import SegExplainError

    assert parameters["seed"][0] == f"Annotated[int, WithinRange(0, {SEED_MAX})]"
    box = _widget(ui, "seedSpinBox")
    assert [int(box.find(f"property[@name='{name}']/number").text) for name in ("minimum", "maximum")] == [0, SEED_MAX]
    assert ExplainSettings(seed=SEED_MAX).seed == SEED_MAX
    controls = {"method": "lrp", "filterKind": "none"}
    with pytest.raises(SegExplainError, match=r"seed must be an integer >= 0, got -1"):
        settings(SimpleNamespace(**controls, seed=-1))
    with pytest.raises(SegExplainError, match=rf"seed must be at most {SEED_MAX} .*got {SEED_MAX + 1}"):
        settings(SimpleNamespace(**controls, seed=SEED_MAX + 1))


def test_module_refuses_python_older_than_3_10(tree):
    """On Slicer 5.8 (Python 3.9.10) the module file stops at once with a message naming the versions; the file
    parses as Python 3.9, so that check is reached; the engine itself requires Python 3.10 (pyproject)."""
    ast.parse(MODULE.read_text(), feature_version=(3, 9))
    check = next(node for node in tree.body if isinstance(node, ast.If) and "sys.version_info" in ast.unparse(node.test))
    definitions = [node.lineno for node in tree.body if isinstance(node, ast.ClassDef)]
    assert check.lineno < min(definitions)
    code = compile(ast.Module([check], type_ignores=[]), str(MODULE), "exec")
    for version, refused in (((3, 9, 10), True), ((3, 10, 0), False), ((3, 12, 10), False)):
        namespace = {"sys": SimpleNamespace(version_info=version), "_": lambda text: text}
        if refused:
            with pytest.raises(ImportError, match=r"needs Slicer 5\.10 or newer .*Python 3\.9\.10"):
                exec(code, namespace)
        else:
            exec(code, namespace)
    assert 'requires-python = ">=3.10"' in (ROOT / "pyproject.toml").read_text()
