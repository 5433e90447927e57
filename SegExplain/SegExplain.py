"""SegExplain: what did the segmentation network look at? LRP and Integrated Gradients maps in Slicer.

The five parts of Slicer's scripted-module template: the module (metadata), the parameter node (everything the user
sets, saved with the scene), the widget (the panel), the logic (no GUI; raises on bad input) and the self-test.

The logic that touches MRML lives in the Qt-free package ``SegExplainMRML`` beside this file, so that it also runs in
the browser review app and in the headless test suite; the engine is ``SegExplainLib``. Both import torch, so they
are imported at first use, after the requirements were checked, never when Slicer starts.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import sys
import tempfile
from typing import Annotated

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLVectorVolumeNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Slicer loads every module at start-up; on a Slicer with Python 3.9 (5.8 and older) the engine cannot run, so the
# module is not loaded and Slicer's log says why, rather than failing later with a syntax or type error.
if sys.version_info < (3, 10):
    raise ImportError(_("SegExplain needs Slicer 5.10 or newer (Python 3.10 or newer); this Slicer runs Python "
                        "{version}").format(version=".".join(map(str, sys.version_info[:3]))))

# In a source checkout (the repository's SegExplain folder added to the module paths) the engine sits one folder up;
# in an installed extension it is next to this file, which Slicer already puts on sys.path.
_sourceRoot = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_sourceRoot, "SegExplainLib")) and _sourceRoot not in sys.path:
    sys.path.append(_sourceRoot)

#: Python packages the engine needs besides torch (which comes from the PyTorch extension): import name, pip name.
PIP_REQUIREMENTS = (("SimpleITK", "SimpleITK"), ("safetensors", "safetensors"), ("matplotlib", "matplotlib"),
                    ("yaml", "pyyaml"))
SLICE_VIEWS = ("Red", "Yellow", "Green")


#
# SegExplain
#


class SegExplain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SegExplain")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["PyTorchUtils"]
        self.parent.contributors = ["SegExplain developers"]
        self.parent.helpText = _("""
Explains what a 3D segmentation network looked at: pick a segment, a box or click a voxel, choose LRP, Integrated
Gradients or another method, and get one relevance map per MRI sequence as an overlay (red: evidence for the class,
blue: against). Filter sliders, per-sequence relevance shares, inclusivity and a one-page report are included.
See the <a href="https://github.com/segexplain/SegExplain">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Built on the layer-wise relevance propagation of Bach et al. and Montavon et al., its use for 3D segmentation by
Tjoa et al. and Chatterjee et al., and Integrated Gradients by Sundararajan et al.
""")


#
# SegExplainParameterNode
#


@parameterNodeWrapper
class SegExplainParameterNode:
    """Everything the user sets in the panel; saved with the scene and restored when it is loaded.

    modelKind: what the model is: a model card, an nnU-Net v2 results folder or a MONAI bundle folder.
    modelCard: model card file (YAML/JSON) naming the network, its weights and sequences; empty for the bundled demo.
    modelFolder: the nnU-Net results folder or the bundle folder. Both are ``pathlib.Path`` (Slicer's path field
    takes no other type); an empty field is ``Path(".")``, which SegExplainMRML.workflow.modelSource reads as empty.
    nnunetConfiguration, nnunetFolds, nnunetMirroring: nnU-Net's configuration (empty: 3d_fullres), folds ("0 1";
    empty: every trained fold) and test-time mirroring. All read by SegExplainMRML.workflow.modelSource.
    inputVolumes: one volume per MRI sequence of the model, in its order.
    multiVolume: or one multi-component volume holding the sequences; it is split into ``inputVolumes`` on Explain.
    regionKind: what to explain: a segment, an ROI box, a clicked point, the predicted region or the whole class.
    preview: show an ensemble's quick preview (nnU-Net: fold 0 without mirroring) first, replaced by the exact answer.
    The method fields mirror SegExplainMRML.job.ExplainSettings; the filter fields drive the live overlay.
    scoreMethods: the methods "Score methods" scores for the region (SegExplainMRML.workflow.scoredMethods).
    scoringOptions: that scoring's options, a JSON object (SegExplainMRML.workflow.scoringOptions); empty: the defaults.
    """

    modelKind: Annotated[str, Choice(["card", "nnunet", "bundle"])] = "card"
    modelCard: pathlib.Path
    modelFolder: pathlib.Path
    nnunetConfiguration: str = ""
    nnunetFolds: str = ""
    nnunetMirroring: bool = True
    inputVolumes: list[vtkMRMLScalarVolumeNode]
    multiVolume: vtkMRMLVectorVolumeNode
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    regionKind: Annotated[str, Choice(["segment", "box", "point", "predicted", "class"])] = "point"
    regionSegmentation: vtkMRMLSegmentationNode
    regionSegmentId: str = ""
    regionRoi: vtkMRMLMarkupsROINode
    clickedPoints: vtkMRMLMarkupsFiducialNode
    radius: Annotated[float, WithinRange(0.0, 50.0)] = 3.0
    explainOnClick: bool = True
    preview: bool = True
    method: Annotated[str, Choice(["lrp", "integrated_gradients", "gradient", "gradient_x_input", "smoothgrad",
                                   "guided_backprop", "deconvolution", "occlusion", "gradcam", "deeplift",
                                   "deeplift_shap", "gradient_shap", "guided_gradcam", "sequence_shapley",
                                   "supervoxel_shapley", "rise", "score_cam"])] = "lrp"
    composite: Annotated[str, Choice(["epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1",
                                      "epsilon_alpha2_beta1_flat", "epsilon_plus_z_box", "epsilon_plus_w_square",
                                      "epsilon_gamma_z_box", "z_plus", "alpha1_beta0", "alpha2_beta1", "gamma",
                                      "epsilon", "zero"])] = "epsilon_plus"
    nSteps: Annotated[int, WithinRange(1, 1024)] = 64
    baseline: Annotated[str, Choice(["blur:5", "blur:2", "zero", "min", "constant:0.0"])] = "blur:5"
    aggregation: Annotated[str, Choice(["sum", "normalized"])] = "sum"
    samples: Annotated[int, WithinRange(0, 100000)] = 0
    classIndex: Annotated[int, WithinRange(0, 255)] = 1
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    advancedOptions: str = ""
    layerwiseFilter: bool = False
    replacePrevious: bool = False
    filterKind: Annotated[str, Choice(["none", "pass", "clamp"])] = "none"
    filterLow: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    filterHigh: Annotated[float, WithinRange(0.0, 1.0)] = 1.0
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    displayedSequence: int = 0
    groundTruthSegmentation: vtkMRMLSegmentationNode
    groundTruthSegmentId: str = ""
    montageOrientation: Annotated[str, Choice(["Axial", "Coronal", "Sagittal"])] = "Axial"
    scoreMethods: str = "gradient gradient_x_input lrp"
    scoringOptions: str = ""


#
# SegExplainWidget
#


class SegExplainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobTimer = qt.QTimer()
        self._jobTimer.setInterval(50)  # the warm worker answers a click in well under a second
        self._jobTimer.connect("timeout()", self.onJobTimer)
        # the worker's host side starts no thread (Slicer's main thread holds the GIL): this timer moves the model's
        # load and the case to the worker while no click runs, so that the first click finds it ready
        self._warmTimer = qt.QTimer()
        self._warmTimer.setInterval(50)
        self._warmTimer.connect("timeout()", self.onWarmTimer)
        self._scoring = None
        self._scoreTimer = qt.QTimer()
        self._scoreTimer.setInterval(50)
        self._scoreTimer.connect("timeout()", self.onScoreTimer)
        self._sequenceSelectors = []
        self._explanation = None
        self._clickObserver = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegExplain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SegExplainLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.deviceLabel.text = self.logic.deviceDescription()
        # The kind selector shows translated names and holds the kind as item data; it is bound by hand.
        for kind, label in (("card", _("Model card")), ("nnunet", _("nnU-Net results folder")),
                            ("bundle", _("MONAI bundle"))):
            self.ui.modelKindComboBox.addItem(label, kind)
        self.ui.modelKindComboBox.connect("currentIndexChanged(int)", self.onModelKindChanged)
        self.ui.modelCardPathLineEdit.connect("currentPathChanged(QString)", self.onModelChanged)
        self.ui.modelFolderPathLineEdit.connect("currentPathChanged(QString)", self.onModelChanged)
        self.ui.nnunetConfigurationLineEdit.connect("editingFinished()", self.onModelChanged)
        # The segment selectors hold a node and a segment ID; they are bound by hand.
        self.ui.regionSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onRegionSegmentationChanged)
        self.ui.regionSegmentSelector.connect("currentSegmentChanged(QString)", self.onRegionSegmentChanged)
        self.ui.groundTruthSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                                   self.onGroundTruthSegmentationChanged)
        self.ui.groundTruthSegmentSelector.connect("currentSegmentChanged(QString)", self.onGroundTruthSegmentChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.explanationComboBox.connect("currentIndexChanged(int)", self.onExplanationSelected)
        self.ui.sequenceComboBox.connect("currentIndexChanged(int)", self.onSequenceSelected)
        self.ui.inclusivityButton.connect("clicked(bool)", self.onInclusivityButton)
        self.ui.layoutScreenshotButton.connect("clicked(bool)", self.onLayoutScreenshot)
        self.ui.montageButton.connect("clicked(bool)", self.onMontage)
        self.ui.reportButton.connect("clicked(bool)", self.onReport)
        self.ui.scoreButton.connect("clicked(bool)", self.onScoreButton)
        self.ui.installButton.connect("clicked(bool)", self.onInstallRequirements)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._warmTimer.stop()
        for run in (self._job, self._scoring):
            if run is not None:
                run.cancel()
        self.logic.closeWorker()
        self._stopObservingClicks()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._updateRequirementsBanner()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._stopObservingClicks()  # a point placed in another module must not start an explanation

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:
            self._job.cancel()
            self._finishJobUi()
        if self._scoring is not None:
            self._scoring.cancel()
            self._finishScoringUi()
        self.logic.closeWorker()  # its case is the closing scene's
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        parameterNode = self.logic.getParameterNode()
        if not parameterNode.clickedPoints:  # before setParameterNode, which observes it for click-to-explain
            parameterNode.clickedPoints = self.logic.newClickedPointsNode()
        self.setParameterNode(parameterNode)

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._stopObservingClicks()
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._observeClicks()
            self._rebuildSequenceSelectors()
            self._refreshExplanations()
            self._onParameterNodeModified()

    def _observeClicks(self) -> None:
        """Click-to-explain and the place widget follow the ``clickedPoints`` reference (a loaded scene, Undo or a
        script may point it at another node)."""
        from SegExplainMRML.observers import ReferenceObserver  # imports only vtk: no engine needed

        self._clickObserver = ReferenceObserver(self._parameterNode.parameterNode, "clickedPoints",
                                                slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                                                self.onPointClicked, onChanged=self.ui.pointPlaceWidget.setCurrentNode)

    def _stopObservingClicks(self) -> None:
        if self._clickObserver is not None:
            self._clickObserver.close()
            self._clickObserver = None

    # ------------------------------------------------------------------------------------------------ inputs

    def _updateRequirementsBanner(self) -> None:
        missing = self.logic.missingRequirements()
        self.ui.requirementsFrame.visible = bool(missing)
        self.ui.requirementsLabel.text = _("Needs: {packages}").format(packages=", ".join(missing))

    def onInstallRequirements(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to install the requirements."), waitCursor=True):
            self.logic.ensureRequirements(askConfirmation=True)
        self._updateRequirementsBanner()
        self._rebuildSequenceSelectors()

    def onModelKindChanged(self, index) -> None:
        kind = self.ui.modelKindComboBox.itemData(index)
        if self._parameterNode and kind and self._parameterNode.modelKind != kind:
            self._parameterNode.modelKind = kind
        self.onModelChanged()

    def onModelChanged(self, *unused) -> None:
        # Trust is given to one model: another card or folder (or a loaded scene naming one) starts untrusted.
        self.ui.trustModelCodeCheckBox.checked = False
        self._updateModelWidgets()
        self._rebuildSequenceSelectors()

    def _updateModelWidgets(self) -> None:
        """The kind selector shows the parameter's kind; the path field and options of that kind are shown."""
        kind = self._parameterNode.modelKind if self._parameterNode else "card"
        combo = self.ui.modelKindComboBox
        if combo.itemData(combo.currentIndex) != kind:
            combo.currentIndex = combo.findData(kind)
        self.ui.modelCardPathLineEdit.visible = kind == "card"
        self.ui.modelFolderPathLineEdit.visible = kind != "card"
        self.ui.nnunetFrame.visible = kind == "nnunet"

    def _rebuildSequenceSelectors(self) -> None:
        """One volume selector per sequence of the model, named after it."""
        for label, selector in self._sequenceSelectors:
            label.deleteLater()
            selector.deleteLater()
        self._sequenceSelectors = []
        if not self._parameterNode or self.logic.missingRequirements():
            return
        try:
            names = self.logic.sequenceNames(self.logic.modelSource(self._parameterNode))
        except Exception as error:  # a bad card or folder shows its one-line message under the path field
            self.ui.cardStatusLabel.text = str(error)
            return
        self.ui.cardStatusLabel.text = _("{count} sequences: {names}").format(count=len(names), names=", ".join(names))
        from SegExplainMRML.nodes import HIDDEN_SEQUENCE_VOLUME_TYPES, SEQUENCE_VOLUME_TYPES, guessSequenceVolumes

        chosen = list(self._parameterNode.inputVolumes) or guessSequenceVolumes(slicer.mrmlScene, names)
        for index, name in enumerate(names):
            selector = slicer.qMRMLNodeComboBox()
            # scalar volumes only: no label maps, vector, tensor or DWI volumes, nor the module's relevance volumes
            selector.nodeTypes = list(SEQUENCE_VOLUME_TYPES)
            selector.hideChildNodeTypes = list(HIDDEN_SEQUENCE_VOLUME_TYPES)
            selector.addEnabled = selector.removeEnabled = False
            selector.noneEnabled = True  # an unmatched sequence stays empty rather than taking another's volume
            selector.setMRMLScene(slicer.mrmlScene)
            selector.toolTip = _("Volume of the {name} sequence, on the same grid as the others").format(name=name)
            if index < len(chosen) and chosen[index] is not None:
                selector.setCurrentNode(chosen[index])
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self._onSequenceVolumesChanged)
            label = qt.QLabel(f"{name}:")
            self.ui.sequencesWidget.layout().addRow(label, selector)
            self._sequenceSelectors.append((label, selector))
        self._hideModuleVolumes()
        self._onSequenceVolumesChanged()

    def _hideModuleVolumes(self) -> None:
        """The relevance and overlay volumes are scalar volumes too: the sequence selectors hide them by ID."""
        if not self._sequenceSelectors:
            return
        from SegExplainMRML.nodes import moduleVolumeIDs

        hidden = moduleVolumeIDs(slicer.mrmlScene)
        for _label, selector in self._sequenceSelectors:
            selector.sortFilterProxyModel().hiddenNodeIDs = hidden

    def _onSequenceVolumesChanged(self, *unused) -> None:
        if self._parameterNode:
            chosen = [selector.currentNode() for _label, selector in self._sequenceSelectors]
            # a list parameter holds nodes, not gaps: the sequences are stored once every one has its volume
            self._parameterNode.inputVolumes = chosen if all(chosen) else []
            self._prepareWorker()

    def _prepareWorker(self) -> None:
        """Start the warm worker as soon as the model and every sequence's volume are chosen, so that the first
        click is only its explanation; a problem is shown under the model and again by the click."""
        if not self._parameterNode or not self._parameterNode.inputVolumes or self.logic.missingRequirements():
            return
        try:
            self.logic.prepareExplanation(self._parameterNode, trustModelCode=self.ui.trustModelCodeCheckBox.checked)
        except Exception as error:
            self.ui.cardStatusLabel.text = str(error)
            return
        self._warmTimer.start()

    def onWarmTimer(self) -> None:
        explainer = self.logic.explainer()
        if self._job is None:  # a running click's own timer moves the worker's bytes
            explainer.poll()
        if self._job is not None or not explainer.loading:
            self._warmTimer.stop()

    def onRegionSegmentationChanged(self, node) -> None:
        if self._parameterNode:
            self._parameterNode.regionSegmentation = node

    def onGroundTruthSegmentationChanged(self, node) -> None:
        if self._parameterNode:
            self._parameterNode.groundTruthSegmentation = node

    def onRegionSegmentChanged(self, segmentId) -> None:
        if self._parameterNode:
            self._parameterNode.regionSegmentId = segmentId or ""

    def onGroundTruthSegmentChanged(self, segmentId) -> None:
        if self._parameterNode:
            self._parameterNode.groundTruthSegmentId = segmentId or ""

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        if not parameters:
            return
        self._updateModelWidgets()
        for selector, node, segmentId in (
                (self.ui.regionSegmentSelector, parameters.regionSegmentation, parameters.regionSegmentId),
                (self.ui.groundTruthSegmentSelector, parameters.groundTruthSegmentation,
                 parameters.groundTruthSegmentId)):
            selector.setCurrentNode(node)
            if segmentId:
                selector.setCurrentSegmentID(segmentId)
        ready = self._job is not None or parameters.multiVolume is not None or (
            parameters.inputVolumes and all(parameters.inputVolumes))
        self.ui.applyButton.enabled = bool(ready)
        self.ui.scoreButton.enabled = bool(ready) and (self._scoring is not None or self._job is None)
        self.ui.applyButton.toolTip = "" if ready else _(
            "Select a volume for every sequence of the model, or a multi-volume")
        self.ui.lrpFrame.visible = parameters.method == "lrp"
        self.ui.igFrame.visible = parameters.method == "integrated_gradients"
        if self._explanation is not None:
            with slicer.util.tryWithErrorDisplay(_("Failed to update the overlay."), waitCursor=False):
                self.logic.showExplanation(self._explanation, parameters)

    # ------------------------------------------------------------------------------------------------ running

    def onPointClicked(self, caller, event) -> None:
        parameters = self._parameterNode
        if parameters and parameters.explainOnClick and (self._job is None or self._job.refining):
            if self._job is not None:
                self._finishJobUi()  # a click that only refines its preview gives way: the explainer cancels it
            parameters.regionKind = "point"
            self.onApplyButton()

    def onApplyButton(self) -> None:
        if self._job is not None:
            self._job.cancel()
            previewShown = self._job.explanation is not None
            self._finishJobUi()
            self.ui.statusLabel.text = _("Cancelled; the preview stays shown") if previewShown else _("Cancelled")
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the explanation."), waitCursor=False):
            self.logic.ensureRequirements(askConfirmation=True)
            # Not a parameter: a scene, like a card, may come from someone else, so it cannot tick this box.
            self._job = self.logic.startExplanation(self._parameterNode,
                                                    trustModelCode=self.ui.trustModelCodeCheckBox.checked)
            self._rebuildSequenceSelectors()  # a multi-volume was split into the per-sequence inputs
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the running explanation; nothing is added to the scene but a preview "
                                          "already shown")
            self.ui.progressBar.value = 0
            self.ui.progressBar.visible = True
            self.ui.statusLabel.text = _("Starting")
            self._jobTimer.start()

    def onJobTimer(self) -> None:
        job = self._job
        job.poll()
        self.ui.progressBar.value = int(100 * job.fraction)
        self.ui.statusLabel.text = job.step
        if job.running:
            self._showPreview(job)
            return
        self._finishJobUi()
        if job.state == "failed":
            slicer.util.errorDisplay(_("Explanation failed: {error}").format(error=job.error))
            self.ui.statusLabel.text = _("Failed")
            return
        if job.state == "cancelled":
            self.ui.statusLabel.text = _("Cancelled")
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to load the explanation."), waitCursor=True):
            self._explanation = self.logic.finishExplanation(job, self._parameterNode, self._explanation)
            self.logic.showExplanation(self._explanation, self._parameterNode)
            self.logic.showSharesChart(self._explanation)
            self._refreshExplanations()
            record = self._explanation.record
            self.ui.statusLabel.text = _("Done in {seconds:.1f} s; score {score:.4g}, delta {delta}").format(
                seconds=record["seconds"], score=record["target_score"], delta=record.get("delta"))
            if job.preview is not None:
                self.ui.statusLabel.text += " " + _("(the full ensemble replaced the preview)")
            if self._explanation.warnings:  # e.g. Integrated Gradients missing completeness: never silent
                slicer.util.warningDisplay("\n\n".join(self._explanation.warnings),
                                           windowTitle=_("SegExplain: check this explanation"))

    def _showPreview(self, job) -> None:
        """Load and show the click's preview once it came; the job goes on to the exact answer."""
        with slicer.util.tryWithErrorDisplay(_("Failed to load the preview."), waitCursor=False):
            explanation = self.logic.previewExplanation(job, self._parameterNode, self._explanation)
            if explanation is None:
                return
            self._explanation = explanation
            self.logic.showExplanation(explanation, self._parameterNode)
            self._refreshExplanations()
            self.ui.statusLabel.text = _("Preview shown ({ensemble}); refining").format(
                ensemble=explanation.record.get("ensemble"))

    def _finishJobUi(self) -> None:
        self._jobTimer.stop()
        self._job = None
        self.ui.applyButton.text = _("Explain")
        self.ui.progressBar.visible = False
        self._onParameterNodeModified()

    def onScoreButton(self) -> None:
        if self._scoring is not None:
            self._scoring.cancel()
            self._finishScoringUi()
            self.ui.statusLabel.text = _("Scoring cancelled")
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start scoring the methods."), waitCursor=False):
            self.logic.ensureRequirements(askConfirmation=True)
            self._scoring = self.logic.startScoring(self._parameterNode,
                                                    trustModelCode=self.ui.trustModelCodeCheckBox.checked)
            self._rebuildSequenceSelectors()  # a multi-volume was split into the per-sequence inputs
            self.ui.scoreButton.text = _("Cancel scoring")
            self.ui.progressBar.value = 0
            self.ui.progressBar.visible = True
            self.ui.statusLabel.text = _("Scoring the methods")
            self._scoreTimer.start()
            self._onParameterNodeModified()

    def onScoreTimer(self) -> None:
        run = self._scoring
        run.poll()
        self.ui.progressBar.value = int(100 * run.fraction)
        self.ui.statusLabel.text = run.step
        if run.running:
            return
        self._finishScoringUi()
        if run.state == "failed":
            slicer.util.errorDisplay(_("Scoring failed: {error}").format(error=run.error))
            self.ui.statusLabel.text = _("Scoring failed")
            return
        if run.state == "cancelled":
            self.ui.statusLabel.text = _("Scoring cancelled")
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to load the scorecard."), waitCursor=True):
            table = self.logic.finishScoring(run, self._explanation)
            self.logic.showScorecard(table)
            self.ui.statusLabel.text = _("Scored; recommended: {recommendation}").format(
                recommendation=run.answer.record["scorecard"]["recommendation"])

    def _finishScoringUi(self) -> None:
        self._scoreTimer.stop()
        self._scoring = None
        self.ui.scoreButton.text = _("Score methods")
        self.ui.progressBar.visible = self._job is not None
        self._onParameterNodeModified()

    # ------------------------------------------------------------------------------------------------ results

    def _refreshExplanations(self) -> None:
        combo = self.ui.explanationComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        for item in self.logic.explanationFolders():
            combo.addItem(shNode.GetItemName(item), item)
        if self._explanation is not None:
            combo.setCurrentIndex(max(0, combo.findData(self._explanation.folderItem)))
        combo.blockSignals(wasBlocked)
        self._hideModuleVolumes()  # a new explanation's volumes
        self.onExplanationSelected(combo.currentIndex)

    def onExplanationSelected(self, index) -> None:
        if index < 0:
            self._explanation = None
            self.ui.sequenceComboBox.clear()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to show the explanation."), waitCursor=False):
            self._explanation = self.logic.explanation(self.ui.explanationComboBox.itemData(index))
            combo = self.ui.sequenceComboBox
            wasBlocked = combo.blockSignals(True)
            combo.clear()
            combo.addItems(self._explanation.sequenceNames)
            combo.setCurrentIndex(min(self._parameterNode.displayedSequence, combo.count - 1))
            combo.blockSignals(wasBlocked)
            self.logic.showExplanation(self._explanation, self._parameterNode)

    def onSequenceSelected(self, index) -> None:
        if index >= 0 and self._parameterNode:
            self._parameterNode.displayedSequence = index

    def onInclusivityButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to compute the inclusivity."), waitCursor=True):
            values = self.logic.groundTruthInclusivity(self._explanation, self._parameterNode)
            self.ui.inclusivityLabel.text = ", ".join(f"{name} {value:.2f}" for name, value in values.items())

    def _saveFileName(self, title, defaultName, filters):
        return qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), title, defaultName, filters)

    def onLayoutScreenshot(self) -> None:
        path = self._saveFileName(_("Save screenshot of the views"), "segexplain-views.png", "PNG (*.png)")
        if path:
            with slicer.util.tryWithErrorDisplay(_("Failed to save the screenshot."), waitCursor=True):
                import ScreenCapture

                ScreenCapture.ScreenCaptureLogic().captureImageFromView(None, path)

    def onMontage(self) -> None:
        path = self._saveFileName(_("Save slice montage"), "segexplain-montage.png", "PNG (*.png)")
        if path:
            with slicer.util.tryWithErrorDisplay(_("Failed to save the montage."), waitCursor=True):
                self.logic.saveMontage(self._explanation, self._parameterNode, path)

    def onReport(self) -> None:
        path = self._saveFileName(_("Save report"), "segexplain-report.pdf", "PDF (*.pdf);;PNG (*.png)")
        if path:
            with slicer.util.tryWithErrorDisplay(_("Failed to save the report."), waitCursor=True):
                self.logic.saveReport(self._explanation, self._parameterNode, path)


#
# SegExplainLogic
#


class SegExplainLogic(ScriptedLoadableModuleLogic):
    """Turns the parameter node into clicks of a warm worker and their results into scene nodes. No GUI; raises on
    error.

    The MRML work is done by ``SegExplainMRML`` (Qt-free, shared with the browser app and tested headless). The logic
    holds one warm worker (``SegExplainMRML.job.WarmExplainer``), created at first use so that torch is not imported
    when Slicer starts.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._explainer = None

    def getParameterNode(self):
        return SegExplainParameterNode(super().getParameterNode())

    # requirements ---------------------------------------------------------------------------------------------

    def missingRequirements(self) -> list[str]:
        """Packages the engine needs that are not installed (checked without importing them)."""
        missing = [] if importlib.util.find_spec("torch") else ["torch (PyTorch extension)"]
        return missing + [pip for module, pip in PIP_REQUIREMENTS if importlib.util.find_spec(module) is None]

    def ensureRequirements(self, askConfirmation: bool = True) -> None:
        """Install torch through the PyTorch extension and the other packages with pip, after asking the user."""
        if importlib.util.find_spec("torch") is None:
            import PyTorchUtils

            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if torchLogic.installTorch(askConfirmation=askConfirmation) is None:
                raise ValueError(_("PyTorch is required; install it from the PyTorch module"))
        missing = [pip for module, pip in PIP_REQUIREMENTS if importlib.util.find_spec(module) is None]
        if missing:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    _("SegExplain needs these Python packages: {packages}. Install them now?").format(
                        packages=", ".join(missing))):
                raise ValueError(_("Missing Python packages: {packages}").format(packages=", ".join(missing)))
            slicer.util.pip_install(missing)

    # inputs ---------------------------------------------------------------------------------------------------

    @staticmethod
    def deviceDescription() -> str:
        """What 'auto' will pick, read without importing torch in Slicer's process (nvidia-smi or CUDA env)."""
        import shutil
        import subprocess

        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                names = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                       text=True, timeout=5).stdout.strip().splitlines()
            except (OSError, subprocess.SubprocessError):
                names = []
            if names:
                return _("CUDA: {gpus}").format(gpus=", ".join(names))
        return _("No CUDA GPU found: CPU")

    @staticmethod
    def modelSource(parameters):
        """The model the parameters name: a model card, an nnU-Net results folder or a MONAI bundle."""
        from SegExplainMRML import workflow

        return workflow.modelSource(parameters)

    @staticmethod
    def sequenceNames(model) -> list[str]:
        """The sequences of the model: a ``ModelSource``, or a model card path (empty: the bundled demo's).

        Read from the card, nnU-Net's dataset.json or the bundle's metadata: no network is loaded in Slicer.
        """
        from SegExplainLib.application.model_source import ModelSource

        return (model if isinstance(model, ModelSource) else ModelSource("card", model or "")).sequence_names()

    def newClickedPointsNode(self):
        """The markups node whose placed points trigger click-to-explain."""
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "SegExplain click")
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetSelectedColor(1.0, 0.85, 0.1)
        return node

    @staticmethod
    def region(parameters):
        """The region to explain, from the parameter node (segment, ROI box, last clicked point, ...)."""
        from SegExplainMRML import workflow

        return workflow.region(parameters, parameters.inputVolumes[0], segmentation=parameters.regionSegmentation,
                               roi=parameters.regionRoi, clickedPoints=parameters.clickedPoints)

    def explainer(self):
        """The warm worker of this logic: the model and the case loaded once, every click answered from there."""
        if self._explainer is None:
            from SegExplainMRML.job import WarmExplainer

            self._explainer = WarmExplainer()
        return self._explainer

    def closeWorker(self) -> None:
        """End the warm worker (module cleanup, scene close); the next click starts a new one."""
        if self._explainer is not None:
            self._explainer.close()

    def prepareExplanation(self, parameters, trustModelCode: bool = False) -> None:
        """Have the warm worker load the model and the chosen volumes in the background; returns at once."""
        from SegExplainMRML import workflow

        model = self.modelSource(parameters)
        workflow.prepareExplanation(self.explainer(), list(parameters.inputVolumes), self.sequenceNames(model), model,
                                    trustModelCode=trustModelCode)

    def _modelAndInputs(self, parameters):
        """The model and its sequence names; a chosen multi-volume is split into the per-sequence inputs first."""
        from SegExplainMRML.nodes import splitVectorVolume

        model = self.modelSource(parameters)
        names = self.sequenceNames(model)
        if parameters.multiVolume is not None:
            parameters.inputVolumes = splitVectorVolume(parameters.multiVolume, names)
            parameters.multiVolume = None  # the split volumes are now the inputs, shown in the selectors
        return model, names

    def startExplanation(self, parameters, trustModelCode: bool = False):
        """Ask the warm worker for an explanation of the region; returns the running click (``WarmRun``).

        ``trustModelCode`` is the user's word that the model may run code of someone else (a model file, a module
        outside the built-in networks, MONAI and torch.nn, a pickle, classes named by nnU-Net plans or a bundle's
        configuration); see ``SegExplainLib.application.model_source.ModelSource.check``.
        """
        from SegExplainMRML import workflow

        model, names = self._modelAndInputs(parameters)
        run = workflow.startExplanation(self.explainer(), list(parameters.inputVolumes), names,
                                        self.region(parameters), workflow.settings(parameters), model,
                                        trustModelCode=trustModelCode)
        logging.info("SegExplain: %s", " ".join(run.command()))
        return run

    def startScoring(self, parameters, trustModelCode: bool = False):
        """Ask the warm worker for the scorecard of the chosen methods (``scoreMethods``) for the region, with the
        panel's class, device and seed and the scoring options (``scoringOptions``); returns the running scoring
        (``ScoreRun``). Trust as for
        :meth:`startExplanation`."""
        from SegExplainMRML import workflow

        model, names = self._modelAndInputs(parameters)
        run = workflow.startScoring(self.explainer(), list(parameters.inputVolumes), names, self.region(parameters),
                                    workflow.settings(parameters), workflow.scoredMethods(parameters), model,
                                    trustModelCode=trustModelCode, options=workflow.scoringOptions(parameters))
        logging.info("SegExplain: %s", " ".join(run.command()))
        return run

    @staticmethod
    def finishScoring(run, explanation=None):
        """Load a done scoring into the scene as a new scorecard table, in ``explanation``'s folder (its report then
        has the scorecard page) or beside the case."""
        from SegExplainMRML import workflow

        return workflow.finishScoring(run, explanation)

    @staticmethod
    def showScorecard(table) -> None:
        """Show the scorecard table in the layout's table view."""
        from SegExplainMRML.results import showScorecard

        showScorecard(slicer.app.applicationLogic(), table)

    @staticmethod
    def finishExplanation(job, parameters, previous=None):
        """Load a done click into the scene as a new explanation folder (replacing ``previous`` if asked); a click
        whose preview is shown gets the exact answer in the preview's folder."""
        from SegExplainMRML import workflow

        return SegExplainLogic._replacing(workflow.finishExplanation(job, list(parameters.inputVolumes)),
                                          parameters, previous)

    @staticmethod
    def previewExplanation(job, parameters, previous=None):
        """Load a click's preview into the scene once it came (replacing ``previous`` if asked); None before."""
        from SegExplainMRML import workflow

        return SegExplainLogic._replacing(workflow.previewExplanation(job, list(parameters.inputVolumes)),
                                          parameters, previous)

    @staticmethod
    def _replacing(explanation, parameters, previous):
        """Remove ``previous`` when asked and a new folder took its place (never the folder itself: a preview's
        folder receives the exact answer)."""
        from SegExplainMRML.results import removeExplanation

        if explanation is not None and parameters.replacePrevious and previous is not None and \
                previous.folderItem != explanation.folderItem:
            removeExplanation(slicer.mrmlScene, previous.folderItem)
        return explanation

    def explanationFolders(self) -> list[int]:
        from SegExplainMRML.results import explanationFolders

        return explanationFolders(slicer.mrmlScene)

    def explanation(self, folderItem):
        from SegExplainMRML.results import explanationOf

        return explanationOf(slicer.mrmlScene, folderItem)

    # display ----------------------------------------------------------------------------------------------------

    @staticmethod
    def sliceCompositeNodes() -> list:
        """The composite nodes of the Red, Yellow and Green slice views (read from the scene: no widget needed)."""
        return [node for node in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
                if node.GetLayoutName() in SLICE_VIEWS]

    def showExplanation(self, explanation, parameters) -> None:
        """Show the chosen sequence's relevance, filtered by the sliders, over that sequence on the slice views."""
        from SegExplainMRML import workflow

        workflow.showExplanation(explanation, parameters, self.sliceCompositeNodes())

    @staticmethod
    def showSharesChart(explanation) -> None:
        slicer.modules.plots.logic().ShowChartInLayout(explanation.chart)

    def groundTruthInclusivity(self, explanation, parameters) -> dict:
        from SegExplainMRML.results import addGroundTruthInclusivity

        if explanation is None:
            raise ValueError(_("run or select an explanation first"))
        return addGroundTruthInclusivity(explanation, parameters.groundTruthSegmentation,
                                         parameters.groundTruthSegmentId)

    # export -----------------------------------------------------------------------------------------------------

    @staticmethod
    def saveMontage(explanation, parameters, path: str) -> None:
        from SegExplainMRML import workflow
        from SegExplainMRML.export import writePng

        if explanation is None:
            raise ValueError(_("run or select an explanation first"))
        writePng(workflow.montage(explanation, parameters, slicer.app.applicationLogic()), path)

    @staticmethod
    def saveReport(explanation, parameters, path: str) -> None:
        from SegExplainMRML import workflow

        if explanation is None:
            raise ValueError(_("run or select an explanation first"))
        workflow.writeReport(explanation, parameters, path)


#
# SegExplainTest
#


class SegExplainTest(ScriptedLoadableModuleTest):
    """The whole workflow on a generated 6-sequence case with the bundled demo network, inside Slicer."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        # As SlicerNNUnet does: in testing mode nothing is installed, so without the engine's packages there is
        # nothing to test; the engine (and torch) is imported only after this check.
        missing = SegExplainLogic().missingRequirements()
        if missing:
            logging.warning("SegExplain self-test skipped: missing %s", ", ".join(missing))
            return
        self.setUp()
        self.test_SegExplainWorkflow()
        self.setUp()
        self.test_SegExplainMultiVolume()
        self.setUp()
        self.test_SegExplainParametersSavedWithScene()

    def _demoScene(self):
        import numpy as np

        logic = SegExplainLogic()
        logic.ensureRequirements(askConfirmation=False)
        from SegExplainLib.application.demo import make_case

        image, label = make_case(1000)
        names = logic.sequenceNames("")
        ijkToRas = np.diag([-1.2, -1.2, 3.0, 1.0])
        volumes = [slicer.util.addVolumeFromArray(image[c], ijkToRas, name) for c, name in enumerate(names)]
        labelNode = slicer.util.addVolumeFromArray(label.astype(np.uint8), ijkToRas, "lesion",
                                                   nodeClassName="vtkMRMLLabelMapVolumeNode")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "truth")
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelNode, segmentation)
        parameters = logic.getParameterNode()
        parameters.modelCard = pathlib.Path()  # empty: the bundled demo network
        parameters.inputVolumes = volumes
        return logic, parameters, volumes, label, segmentation

    def test_SegExplainWorkflow(self):
        self.delayDisplay("Explaining a clicked point of the demo case")
        logic, parameters, volumes, label, segmentation = self._demoScene()
        try:
            self._checkWorkflow(logic, parameters, volumes, label, segmentation)
        finally:
            logic.closeWorker()
        self.delayDisplay("Workflow passed")

    def _checkWorkflow(self, logic, parameters, volumes, label, segmentation):
        import numpy as np

        parameters.clickedPoints = logic.newClickedPointsNode()
        lesion = np.argwhere(label > 0).mean(axis=0)
        ijkToRas = vtk.vtkMatrix4x4()
        volumes[0].GetIJKToRASMatrix(ijkToRas)
        point = ijkToRas.MultiplyPoint([lesion[2], lesion[1], lesion[0], 1.0])[:3]
        parameters.clickedPoints.AddControlPoint(point)
        parameters.regionKind = "point"
        job = logic.startExplanation(parameters)
        self.assertEqual(job.wait(timeout=300), "done", job.error)
        explanation = logic.finishExplanation(job, parameters)
        self.assertEqual(len(explanation.relevance), 6)
        self.assertGreater(explanation.record["target_score"], 0)

        self.delayDisplay("Overlay and live filter")
        logic.showExplanation(explanation, parameters)
        composites = logic.sliceCompositeNodes()
        self.assertEqual(len(composites), 3)
        for composite in composites:
            self.assertEqual(composite.GetForegroundVolumeID(), explanation.overlay.GetID())
            self.assertEqual(composite.GetBackgroundVolumeID(), volumes[0].GetID())
        raw = slicer.util.arrayFromVolume(explanation.relevance[0]).copy()
        parameters.filterKind, parameters.filterLow, parameters.filterHigh = "pass", 0.5, 1.0
        logic.showExplanation(explanation, parameters)
        shown = slicer.util.arrayFromVolume(explanation.overlay)
        keep = np.abs(raw) >= 0.5 * np.abs(raw).max()
        np.testing.assert_array_equal(shown[~keep], 0)
        np.testing.assert_array_equal(shown[keep], raw[keep])

        self.delayDisplay("Shares, inclusivity, report")
        logic.showSharesChart(explanation)
        parameters.groundTruthSegmentation = segmentation
        parameters.groundTruthSegmentId = segmentation.GetSegmentation().GetNthSegmentID(0)
        inclusivity = logic.groundTruthInclusivity(explanation, parameters)
        self.assertEqual(len(inclusivity), 6)
        folder = tempfile.mkdtemp()
        logic.saveReport(explanation, parameters, os.path.join(folder, "report.pdf"))
        self.assertGreater(os.path.getsize(os.path.join(folder, "report.pdf")), 10000)

        self.delayDisplay("A second run adds a second explanation")
        job = logic.startExplanation(parameters)
        self.assertEqual(job.wait(timeout=300), "done", job.error)
        logic.finishExplanation(job, parameters)
        self.assertEqual(len(logic.explanationFolders()), 2)
        self.assertEqual(logic.explainer().worker.starts, 1)  # both clicks answered by the one warm worker

    def test_SegExplainMultiVolume(self):
        import numpy as np

        self.delayDisplay("A multi-volume is split into the sequences and explained")
        logic, parameters, volumes, label, segmentation = self._demoScene()
        stacked = np.stack([slicer.util.arrayFromVolume(v) for v in volumes], axis=-1)
        ijkToRas = vtk.vtkMatrix4x4()
        volumes[0].GetIJKToRASMatrix(ijkToRas)
        vector = slicer.util.addVolumeFromArray(stacked, slicer.util.arrayFromVTKMatrix(ijkToRas), "mpMRI",
                                                nodeClassName="vtkMRMLVectorVolumeNode")
        parameters.inputVolumes = []
        parameters.multiVolume = vector
        parameters.regionKind = "predicted"
        try:
            job = logic.startExplanation(parameters)
            self.assertEqual(job.wait(timeout=300), "done", job.error)
            explanation = logic.finishExplanation(job, parameters)
        finally:
            logic.closeWorker()
        names = logic.sequenceNames("")
        self.assertEqual([v.GetName() for v in parameters.inputVolumes], [f"mpMRI {n}" for n in names])
        self.assertEqual(explanation.sequenceNames, names)
        self.assertIsNone(parameters.multiVolume)
        self.delayDisplay("Multi-volume passed")

    def test_SegExplainParametersSavedWithScene(self):
        self.delayDisplay("Parameters are saved with the scene")
        logic, parameters, volumes, label, segmentation = self._demoScene()
        parameters.method, parameters.nSteps, parameters.filterKind = "integrated_gradients", 48, "clamp"
        parameters.filterHigh, parameters.overlayOpacity, parameters.regionKind = 0.3, 0.45, "segment"
        parameters.regionSegmentation = segmentation
        folder = tempfile.mkdtemp()
        scenePath = os.path.join(folder, "scene.mrb")
        self.assertTrue(slicer.util.saveScene(scenePath))
        slicer.mrmlScene.Clear()
        slicer.util.loadScene(scenePath)
        restored = SegExplainLogic().getParameterNode()
        self.assertEqual((restored.method, restored.nSteps, restored.filterKind), ("integrated_gradients", 48, "clamp"))
        self.assertAlmostEqual(restored.filterHigh, 0.3)
        self.assertAlmostEqual(restored.overlayOpacity, 0.45)
        self.assertEqual(restored.regionKind, "segment")
        self.assertEqual(restored.regionSegmentation.GetName(), "truth")
        self.assertEqual([v.GetName() for v in restored.inputVolumes], [v.GetName() for v in volumes])
        self.delayDisplay("Parameters restored")
