"""The trame page: Slicer slice and 3D views of the case, the module's controls, downloads and a comparison layout.

The views are trame-slicer's remote views (Slicer's own slice logics and displayable managers, rendered offscreen
and streamed as images). The controls are bound to trame state; every action goes through
:class:`~SegExplainReview.session.ReviewSession`, which drives the module's MRML logic.

The page shows a patient's images, so the server lets in only the user who started it. Each run draws a random
token (``secrets.token_urlsafe``) and prints the address with it, ``http://127.0.0.1:8080/?secret=<token>``. The
page sends the token to open the websocket (wslink's ``secret``, replacing its public default), and it is set as an
HttpOnly, SameSite=Strict cookie, so that the downloads and a reload work. A request without the token gets 403:
the page, the downloads, and any websocket call (state, uploads). A websocket whose ``Origin`` is not the app's own
address, and a request whose ``Host`` is not an address the app is bound to (DNS rebinding), are refused as well.
A client's messages may declare no more than the largest upload (:class:`CappedUnChunker`), which is refused before
anything is allocated.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import logging
import os
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import vtk
from aiohttp import web
from SegExplainMRML import export, workflow
from SegExplainMRML.job import METHODS, REGION_KINDS
from slicer import vtkMRMLLayerDisplayableManager, vtkMRMLSliceNode
from trame.app import TrameApp, get_server
from trame.ui.vuetify3 import VAppLayout
from trame.widgets import html
from trame.widgets import vuetify3 as v
from trame_server.utils.asynchronous import create_task
from trame_slicer import module as trame_slicer_module
from trame_slicer.app.ui import create_vertical_slice_view_gutter_ui
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import Layout, LayoutDirection, SliceView, ViewLayoutDefinition, ViewProps, ViewType
from vtkmodules.util.numpy_support import vtk_to_numpy
from vtkmodules.vtkCommonDataModel import vtkImageData
from wslink.chunking import UnChunker

from SegExplainLib import composite_names
from SegExplainLib.application.model_source import ModelSource
from SegExplainLib.engine.segments import SegmentMatrix
from SegExplainLib.errors import SegExplainError
from SegExplainLib.io.figures import save_figure, segment_matrix_figure

from .layout import Legend, composeLayout, legendGradient, sliceViewLabels
from .scorecard import ScoreAction
from .session import ReviewCase, ReviewParameters, ReviewSession

logger = logging.getLogger(__name__)

#: The second (comparison) set of slice views, in view group 1.
COMPARE_VIEWS = [ViewLayoutDefinition(f"Compare{o}", ViewType.SLICE_VIEW,
                                      ViewProps(orientation=o, label=f"{o[0]}2", color=c, group=1))
                 for o, c in (("Axial", "#F34A33"), ("Coronal", "#6DAD4A"), ("Sagittal", "#EFD64D"))]
MAIN_VIEWS = [ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view(),
              ViewLayoutDefinition.sagittal_view(), ViewLayoutDefinition.threed_view()]
LAYOUTS = {
    "review": Layout(LayoutDirection.Horizontal, [Layout(LayoutDirection.Vertical, MAIN_VIEWS[:2]),
                                                  Layout(LayoutDirection.Vertical, MAIN_VIEWS[2:])]),
    "compare": Layout(LayoutDirection.Horizontal, [Layout(LayoutDirection.Vertical, MAIN_VIEWS[:3]),
                                                   Layout(LayoutDirection.Vertical, COMPARE_VIEWS)]),
}
FILTER_KINDS = ("none", "pass", "clamp")
#: The engine's registered composites, epsilon_plus (each sequence gets its own share) first.
COMPOSITES = ("epsilon_plus", *(name for name in composite_names() if name != "epsilon_plus"))
ROUTE = "/segexplain"
#: The query parameter of the address that carries the run's token (the name trame's page reads it from).
TOKEN_PARAMETER = "secret"
#: Names of this machine in a ``Host`` header, accepted when the app is bound to a loopback address.
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
#: Room in a client's messages beyond the largest upload, for the rest of the message (names, msgpack framing).
MESSAGE_OVERHEAD_BYTES = 2**20


class CappedUnChunker(UnChunker):
    """wslink's reassembly of a client's chunked messages, with a cap on the sizes they declare.

    Each chunk's header declares its message's total size, and wslink allocates that much at the first chunk: up to
    4 GB for a client with the token (one 28-byte chunk declaring 2 GB took the server from 0.82 to 2.78 GB). Here
    the sizes declared by a client's unfinished messages together may not exceed ``limit``; a message over it is
    refused before anything is allocated, the client's unfinished messages are dropped, and wslink closes its
    connection.

    Args:
        limit: The most bytes a client's unfinished messages may declare together, once it has the token.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.allowed = limit, self.max_message_size  # wslink's own limit until the client has the token

    def set_max_message_size(self, size: int) -> None:
        self.allowed = min(size, self.limit)

    def process_chunk(self, chunk: bytes) -> Any:
        pending = sum(len(message["content"]) for message in self.pending_messages.values())
        self.max_message_size = self.allowed - pending  # what wslink checks a new message's declared size against
        try:
            return super().process_chunk(chunk)
        except ValueError:
            self.release_pending_messages()  # at once: the error's traceback keeps this un-chunker alive a while
            raise


class ReviewApp(TrameApp):
    """One case, its explanations and the page.

    Args:
        case: The files of the case.
        server: A trame server; by default a new vue3 one.
        host: The address the server will be bound to: with a loopback address, only requests to a loopback name
            (``127.0.0.1``, ``localhost``, ``[::1]``) are served.
        token: The secret a client needs; by default a new random one. It stays the same for the app's lifetime.
    """

    def __init__(self, case: ReviewCase, server: Any = None, *, host: str = "127.0.0.1",
                 token: str | None = None) -> None:
        super().__init__(server or get_server(client_type="vue3"))
        self.host, self.token = host, token or secrets.token_urlsafe(32)
        self.server.enable_module(trame_slicer_module)
        self.slicerApp = SlicerApp()
        register_rca_factories(self.slicerApp.view_manager, self.server, slice_view_ui_f=self._sliceViewUi)
        self.session = ReviewSession(self.slicerApp, case)
        self.layoutManager = LayoutManager(self.slicerApp.scene, self.slicerApp.view_manager, self.server)
        self.layoutManager.register_layout("review", LAYOUTS["review"])
        self.layoutManager.register_layout("compare", LAYOUTS["compare"], lazy_initialization=True)
        self.job: Any = None
        self.segmentMatrixResult: SegmentMatrix | None = None  # the last one computed, for its CSV download
        self.scoring = ScoreAction(self)
        self._initializeState()
        self._buildUi()
        self.layoutManager.set_layout("review")
        self._setUpViews(MAIN_VIEWS)
        self.server.controller.on_server_bind.add(self._addRoutes)
        self.server.controller.on_server_exited.add(lambda **_: self.session.close())
        self.server.controller.on_server_ready.add(lambda **_: create_task(self._warmWorker()))
        self.state.change("method", "composite", "class_index", "aggregation", "region_kind", "radius", "segment_id",
                          "n_steps", "baseline", "samples", "seed", "layerwise", "device",
                          "advanced_options")(self._onParametersChanged)
        self.state.change("current", "sequence", "opacity", "filter_kind", "alpha1", "alpha2")(self._onDisplayChanged)
        self.state.change("compare_on", "compare_item", "compare_filter_kind", "compare_alpha1",
                          "compare_alpha2")(self._onCompareChanged)
        self.state.change("upload")(self._onUpload)
        self.state.change("region_kind")(self._onRegionKindChanged)

    # state -------------------------------------------------------------------------------------------------------

    def _initializeState(self) -> None:
        defaults = ReviewParameters()
        segments = self.session.segments()
        self.state.update({
            "trame__title": "SegExplain review", "trame__favicon": None,
            "methods": list(METHODS), "composites": list(COMPOSITES), "region_kinds": list(REGION_KINDS),
            "filter_kinds": list(FILTER_KINDS),
            "method": defaults.method, "composite": defaults.composite, "class_index": defaults.classIndex,
            "aggregation": defaults.aggregation, "n_steps": defaults.nSteps, "region_kind": defaults.regionKind,
            "radius": defaults.radius, "explain_on_click": True, "preview": defaults.preview, "refining": False,
            "baseline": defaults.baseline,
            "samples": defaults.samples, "seed": defaults.seed, "layerwise": defaults.layerwiseFilter,
            "device": defaults.device, "advanced_options": defaults.advancedOptions,
            "segments": [{"value": i, "title": n} for i, n in segments],
            "segment_id": segments[0][0] if segments else "",
            "sequences": [{"value": i, "title": n} for i, n in enumerate(self.session.names)],
            "sequence": 0, "opacity": defaults.overlayOpacity, "filter_kind": "none", "alpha1": 0.0, "alpha2": 1.0,
            "running": False, "progress": 0, "step": "", "message": "Click a point on a slice view to explain it.",
            "error": "", "warning": "", "explanations": [], "current": None, "overlay_version": 0, "clicks": 0, "shares": [],
            "share_columns": [], "inclusivity": {},
            "compare_on": False, "compare_item": None, "compare_filter_kind": "pass", "compare_alpha1": 0.3,
            "compare_alpha2": 1.0, "upload": None, "upload_message": "", "upload_error": "",
            "box_pending": False, "worker_ready": False, "view_labels": {}, "legend": None,
            "segment_matrix_running": False, "segment_matrix_png": "", **ScoreAction.initialState(),
        })

    def parameters(self) -> ReviewParameters:
        """The page's controls as the session's parameters.

        Raises:
            SegExplainError: A control holds a bad value, e.g. an emptied number field; the message names it.
        """
        s = self.state
        numbers = {"class": s.class_index, "steps": s.n_steps, "samples": s.samples, "seed": s.seed}
        bad = [name for name, value in numbers.items() if isinstance(value, bool) or not isinstance(value, int)]
        if bad:
            raise SegExplainError(f"{', '.join(bad)} must be whole numbers, got "
                                  f"{', '.join(repr(numbers[name]) for name in bad)}")
        return ReviewParameters(method=s.method, composite=s.composite, classIndex=s.class_index,
                                aggregation=s.aggregation, nSteps=s.n_steps, regionKind=s.region_kind,
                                radius=float(s.radius), regionSegmentId=s.segment_id or "",
                                displayedSequence=int(s.sequence), overlayOpacity=float(s.opacity),
                                filterKind=s.filter_kind, filterLow=float(s.alpha1), filterHigh=float(s.alpha2),
                                baseline=s.baseline, samples=s.samples, seed=s.seed,
                                layerwiseFilter=bool(s.layerwise), device=s.device,
                                advancedOptions=s.advanced_options or "", preview=bool(s.preview))

    def _onParametersChanged(self, **_: Any) -> None:
        self.state.error = ""

    # views -------------------------------------------------------------------------------------------------------

    def _views(self, definitions: list[ViewLayoutDefinition]) -> list[Any]:
        return [self.slicerApp.view_manager.get_view(d.singleton_tag) for d in definitions]

    def _compositeNodes(self, definitions: list[ViewLayoutDefinition]) -> list[Any]:
        return [self.slicerApp.app_logic.GetSliceLogicByLayoutName(d.singleton_tag).GetSliceCompositeNode()
                for d in definitions if d.view_type == ViewType.SLICE_VIEW]

    def _setUpViews(self, definitions: list[ViewLayoutDefinition]) -> None:
        """Click observers and labels on the slice views, no depth peeling in 3D (llvmpipe bug), then the case."""
        for definition, view in zip(definitions, self._views(definitions)):
            if isinstance(view, SliceView):
                view.interactor().AddObserver("LeftButtonPressEvent", self._onSliceClick, 1.0)
                name = f"{definition.properties.label}: {definition.properties.orientation}"
                view.get_view_node().AddObserver(vtk.vtkCommand.ModifiedEvent,
                                                 lambda node, _event, tag=definition.singleton_tag, name=name:
                                                 self._updateViewLabels(tag, sliceViewLabels(node, name)))
                self._updateViewLabels(definition.singleton_tag, sliceViewLabels(view.get_view_node(), name))
            else:
                view.renderer().SetUseDepthPeeling(False)
                view.renderer().SetUseDepthPeelingForVolumes(False)
        self._showCase(definitions)

    def _updateViewLabels(self, tag: str, labels: dict[str, Any]) -> None:
        if self.state.view_labels.get(tag) != labels:
            with self.state:
                self.state.view_labels = {**self.state.view_labels, tag: labels}

    def _sliceViewUi(self, server: Any, viewId: str, sliceView: Any) -> None:
        """trame-slicer's gutter (slice slider, tools), then the view's name, position and edge letters over it."""
        create_vertical_slice_view_gutter_ui(server, viewId, sliceView)
        labels = f"view_labels[{sliceView.get_singleton_tag()!r}]"
        edges = {"left": "left: 4px; top: 50%", "right": "right: 4px; top: 50%", "top": "top: 2px; left: 50%",
                 "bottom": "bottom: 30px; left: 50%"}  # above the slice slider
        with html.Div(v_if=labels, classes="view-labels", style="position: absolute; inset: 0; pointer-events: none;"
                      " color: white; font-size: 13px; text-shadow: 0 0 3px black, 0 0 2px black;"):
            html.Div(f"{{{{ {labels}.name }}}}", classes="view-name",
                     style="position: absolute; top: 2px; right: 8px; font-weight: bold")
            html.Div(f"{{{{ {labels}.position }}}}", classes="view-position",
                     style="position: absolute; top: 18px; right: 8px")
            for edge, place in edges.items():
                html.Div(f"{{{{ {labels}.letters.{edge} }}}}", classes=f"view-letter view-letter-{edge}",
                         style=f"position: absolute; {place}; font-weight: bold")

    def _showCase(self, definitions: list[ViewLayoutDefinition]) -> None:
        """The first sequence as background, views fitted to it and centred on the segmentation."""
        for view in self._views(definitions):
            if isinstance(view, SliceView):
                view.set_background_volume_id(self.session.volumes[0].GetID())
                view.fit_view_to_content()
            else:
                view.reset_camera()
        centre = self.session.segmentationCentre()
        if centre is not None:
            vtkMRMLSliceNode.JumpAllSlices(self.slicerApp.scene, *centre, vtkMRMLSliceNode.CenteredJumpSlice)

    def _onSliceClick(self, interactor: Any, _event: str) -> None:
        """A left click on a slice view: a point (and with explain-on-click, a new explanation) or nothing."""
        if self.state.region_kind != "point" or self.state.box_pending:
            return
        view = next((view for view in self.slicerApp.view_manager.get_slice_views()
                     if view.interactor() is interactor), None)
        if view is None:
            return
        x, y = interactor.GetEventPosition()
        width, height = interactor.GetSize()
        if not (0 <= x < width and 0 <= y < height):  # a press without a position yet (no pointer move before)
            return
        ras = np.array(view.get_view_node().GetXYToRAS().MultiplyPoint((x, y, 0.0, 1.0))[:3])
        self.session.addClick(ras)
        with self.state:
            self.state.clicks += 1
            self.state.message = f"Point at RAS ({', '.join(f'{c:.1f}' for c in ras)})"
        if self.state.explain_on_click and (not self.state.running or self.state.refining):
            self.explain()

    # explain -----------------------------------------------------------------------------------------------------

    def explain(self) -> None:
        """Ask the warm worker for an explanation of the chosen region, watched by an asyncio task. A click that only
        refines its preview gives way (the explainer cancels its refinement; its preview stays)."""
        if self.job is not None and self.job.running and not self.job.refining:
            return
        try:
            self.job = self.session.startExplanation(self.parameters())
        except SegExplainError as error:
            with self.state:
                self.state.error = str(error)
            return
        with self.state:
            self.state.update({"running": True, "refining": False, "progress": 0, "step": "starting", "error": "",
                               "warning": ""})
        create_task(self._watch(self.job))

    async def _warmWorker(self) -> None:
        """Move the model's load and the case to the worker while no click runs (at the start, after a replaced
        sequence): its host side starts no thread, so nothing moves between polls. ``worker_ready`` follows it."""
        while True:
            explainer = self.session.explainer
            if (self.job is None or not self.job.running) and explainer.loading:
                explainer.poll()
            if explainer.ready != self.state.worker_ready:
                with self.state:
                    self.state.worker_ready = explainer.ready
            await asyncio.sleep(0.05)

    async def _watch(self, job: Any) -> None:
        while job.running:
            await asyncio.sleep(0.02)  # the warm worker answers a click in a fraction of a second
            job.poll()
            if (round(100 * job.fraction), job.step) != (self.state.progress, self.state.step):
                with self.state:
                    self.state.progress = round(100 * job.fraction)
                    self.state.step = job.step
            if job is self.job and job.running:
                self._showPreview(job)
        if job is not self.job:  # a newer click took over; it cancelled this one's refinement
            return
        with self.state:
            self.state.running = self.state.refining = False
            if job.state == "done":
                try:
                    explanation = self.session.finishExplanation(job)
                except SegExplainError as error:
                    self.state.error = str(error)
                    return
                self._refreshExplanations()
                self.state.current = explanation.folderItem
                self.state.message = f"Explained in {explanation.record.get('seconds', 0):.1f} s" + (
                    f" ({explanation.record.get('ensemble')}; it replaced the preview)" if job.preview else "")
                self.state.warning = " ".join(explanation.warnings)
                if job.preview:  # the preview's folder got new voxels: the same item, so no change event
                    self._onDisplayChanged()
            elif job.state == "failed":
                self.state.error = job.error
            else:
                self.state.message = "Cancelled" + ("; the preview stays shown" if job.explanation else "")

    def _showPreview(self, job: Any) -> None:
        """Show the click's preview once it came, while the worker refines it to the exact answer."""
        try:
            explanation = self.session.previewExplanation(job)
        except SegExplainError as error:
            self.state.error = str(error)
            return
        if explanation is not None:
            with self.state:
                self._refreshExplanations()
                self.state.current = explanation.folderItem
                self.state.refining = True
                self.state.message = (f"Preview in {job.preview.seconds:.1f} s ({explanation.record.get('ensemble')});"
                                      f" refining")

    def cancel(self) -> None:
        if self.job is not None and self.job.running:
            self.job.cancel()

    def drawBox(self) -> None:
        """Place a markups ROI on a slice view (two clicks), the region of the 'box' kind.

        ``box_pending`` (which disables Explain) holds until both corners are placed: they arrive through the view's
        event queue, which a click on Explain would otherwise overtake.
        """
        if self.session.roi is not None:
            self.slicerApp.scene.RemoveNode(self.session.roi)
        roi = self.slicerApp.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "SegExplain box")
        roi.AddObserver(roi.PointPositionDefinedEvent, self._onBoxCorner)
        self.session.roi = roi
        self.slicerApp.markups_logic.place_node(roi)
        self.state.update({"region_kind": "box", "box_pending": True,
                           "message": "Click two opposite corners of the box on a slice view."})

    def _onBoxCorner(self, roi: Any, _event: str) -> None:
        if roi is self.session.roi and roi.GetControlPointPlacementComplete():
            with self.state:
                self.state.update({"box_pending": False, "message": "Box drawn: Explain explains the voxels in it."})

    def _onRegionKindChanged(self, region_kind: str, **_: Any) -> None:
        """Another region kind while a box is being drawn: stop placing it."""
        if region_kind != "box" and self.state.box_pending:
            self.slicerApp.markups_logic.disable_place_mode()
            self.state.box_pending = False

    def _refreshExplanations(self) -> None:
        self.state.explanations = self.session.explanationItems()

    def _currentExplanation(self) -> Any:
        return self.session.explanation(int(self.state.current)) if self.state.current is not None else None

    def _onDisplayChanged(self, **_: Any) -> None:
        explanation = self._currentExplanation()
        if explanation is None:
            return
        try:
            workflow.showExplanation(explanation, self.parameters(), self._compositeNodes(MAIN_VIEWS))
        except SegExplainError as error:
            self.state.error = str(error)
            return
        self.state.legend = Legend.of(explanation, self.parameters()).state()
        rows = self.session.sharesRows(explanation)
        self.state.shares = rows
        self.state.share_columns = [c for c in rows[0] if c != "sequence"] if rows else []
        self.state.overlay_version += 1
        if self.state.compare_on:
            self._onCompareChanged()

    def _onCompareChanged(self, **_: Any) -> None:
        self.layoutManager.set_layout("compare" if self.state.compare_on else "review")
        if not self.state.compare_on:
            return
        if not getattr(self, "_compareReady", False):
            self._setUpViews(COMPARE_VIEWS)
            self._compareReady = True
        item = self.state.compare_item if self.state.compare_item is not None else self.state.current
        if item is None:
            return
        try:
            parameters = self.parameters()
            parameters.filterKind = self.state.compare_filter_kind
            parameters.filterLow = float(self.state.compare_alpha1)
            parameters.filterHigh = float(self.state.compare_alpha2)
            workflow.showExplanation(self.session.explanation(int(item)), parameters,
                                     self._compositeNodes(COMPARE_VIEWS), overlay=self.session.compareOverlay())
        except SegExplainError as error:
            self.state.error = str(error)

    def inclusivity(self) -> None:
        explanation = self._currentExplanation()
        try:
            if explanation is None:
                raise SegExplainError("run or select an explanation first")
            self.state.inclusivity = self.session.inclusivity(explanation, self.state.segment_id)
        except SegExplainError as error:
            self.state.error = str(error)
            return
        self._onDisplayChanged()

    def segmentMatrix(self) -> None:
        """Ask the warm worker for the segment x segment matrix of the case with the chosen method, watched by an
        asyncio task that shows its figure and keeps it for the CSV download."""
        if self.state.segment_matrix_running:
            return
        try:
            number = self.session.startSegmentMatrix(self.parameters())
        except SegExplainError as error:
            self.state.error = str(error)
            return
        self.state.update({"segment_matrix_running": True, "error": "",
                           "message": "Explaining every predicted segment for the segment matrix"})
        create_task(self._watchSegmentMatrix(self.session.explainer.worker, number))

    async def _watchSegmentMatrix(self, worker: Any, number: int) -> None:
        while (answer := worker.answer(number)) is None and worker.state == "running":
            await asyncio.sleep(0.05)
            worker.poll()  # the answers are kept by number: a click's watcher finds its own
        with self.state:
            self.state.segment_matrix_running = False
            if answer is None or answer.state != "done":
                self.state.error = answer.error if answer is not None and answer.error else (
                    f"the segment matrix was not computed (the worker is {worker.state})")
                return
            self.segmentMatrixResult = SegmentMatrix.from_record(answer.record)
            with tempfile.TemporaryDirectory(dir=self.session.scratchFolder()) as folder:
                path = save_figure(segment_matrix_figure(self.segmentMatrixResult), Path(folder) / "matrix.png")
                encoded = base64.b64encode(path.read_bytes()).decode("ascii")
            self.state.segment_matrix_png = f"data:image/png;base64,{encoded}"
            self.state.message = (f"Segment matrix in {answer.seconds:.1f} s "
                                  f"(batched passes: {self.segmentMatrixResult.passes})")

    def _onUpload(self, upload: Any, **_: Any) -> None:
        if not upload:
            return
        upload = upload[0] if isinstance(upload, list) else upload
        try:
            content = upload.get("content") or b""
            if isinstance(content, list):  # large files arrive in chunks
                content = b"".join(content)
            message = self.session.addFile(str(upload.get("name", "")), content)
        except SegExplainError as error:
            self.state.update({"upload_error": f"{upload.get('name')}: {error}", "upload_message": "", "upload": None})
            return
        except Exception as error:  # noqa: BLE001 - a bad file must give a message, never stop the server
            logger.exception("upload failed")
            self.state.update({"upload_error": f"{upload.get('name')}: {type(error).__name__}: {error}",
                               "upload_message": "", "upload": None})
            return
        segments = self.session.segments()
        self.state.update({"upload_message": message, "upload_error": "", "upload": None,
                           "segments": [{"value": i, "title": n} for i, n in segments],
                           "segment_id": segments[0][0] if segments else ""})
        self._showCase(MAIN_VIEWS)

    # downloads ---------------------------------------------------------------------------------------------------

    def screenshot(self) -> tuple[np.ndarray, list[str]]:
        """The views as the page lays them out, with their names, letters and positions, the sequence shown and the
        colour legend (RGBA, rows top to bottom), and the texts drawn in it."""
        layout = LAYOUTS["compare" if self.state.compare_on else "review"]
        definitions = layout.get_views(is_recursive=True)
        tiles = {}
        for definition, view in zip(definitions, self._views(definitions)):
            view.render()
            buffer = vtkImageData()
            vtkMRMLLayerDisplayableManager.RenderWindowBufferToImage(view.render_window(), buffer)
            width, height, _ = buffer.GetDimensions()
            tiles[definition.singleton_tag] = vtk_to_numpy(buffer.GetPointData().GetScalars()).reshape(
                height, width, -1)[::-1]
        labels = {tag: self.state.view_labels.get(tag, {"name": tag}) for tag in tiles}
        explanation = self._currentExplanation()
        legend = Legend.of(explanation, self.parameters()) if explanation is not None else None
        sequence = legend.sequence if legend is not None else self.session.names[int(self.state.sequence)]
        return composeLayout(layout, tiles, labels, sequence=sequence, legend=legend)

    def _addRoutes(self, wslinkServer: Any) -> None:
        """The download routes and the guard, and the run's token as wslink's secret (before the server listens)."""
        wslinkServer.app.middlewares.append(self._guard)
        wslinkServer.app.add_routes([web.get(f"{ROUTE}/screenshot.png", self._screenshotResponse),
                                     web.get(f"{ROUTE}/report.pdf", self._reportResponse),
                                     web.get(f"{ROUTE}/segment_matrix.csv", self._segmentMatrixResponse),
                                     *self.scoring.routes(ROUTE)])
        self.server.protocol.updateSecret(self.token)
        for handler in wslinkServer._ws_handlers:  # wslink has no setting for the size a message may declare
            self._capMessages(handler)

    def _capMessages(self, handler: Any) -> None:
        """Give each new connection of a wslink handler a :class:`CappedUnChunker` (before its first message)."""
        connect = handler.onConnect

        async def onConnect(request: Any, clientId: str) -> None:
            await connect(request, clientId)
            handler.unchunkers[clientId] = CappedUnChunker(self.session.maxUploadBytes + MESSAGE_OVERHEAD_BYTES)

        handler.onConnect = onConnect

    # access ------------------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The address to open, with the token; valid once the server listens (its port is known)."""
        return f"http://{self._hostName(self.host)}:{self.server.port}/?{urlencode({TOKEN_PARAMETER: self.token})}"

    @staticmethod
    def _hostName(host: str) -> str:
        return f"[{host}]" if ":" in host else host

    def _trustedHosts(self) -> set[str] | None:
        """The ``Host`` headers served: the bound address and, on loopback, its other names; None: any (0.0.0.0)."""
        try:
            address = ipaddress.ip_address(self.host)
        except ValueError:  # a name such as localhost
            address = None
        if address is not None and address.is_unspecified:
            return None
        names = {self._hostName(self.host)}
        if self.host == "localhost" or (address is not None and address.is_loopback):
            names.update(LOOPBACK_NAMES)
        return {f"{name}:{self.server.port}" for name in names}

    def _cookieName(self) -> str:
        return f"segexplain-token-{self.server.port}"  # cookies are per host, not per port

    def _hasToken(self, request: web.Request) -> bool:
        return any(secrets.compare_digest(value.encode(), self.token.encode()) for value in (
            request.query.get(TOKEN_PARAMETER, ""), request.cookies.get(self._cookieName(), "")))

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every request: the app's own host; a websocket: the app's own origin; the page and downloads: the token.

        The page's static files (scripts, styles) are served to anyone: they hold nothing of the case.
        """
        hosts = self._trustedHosts()
        if hosts is not None and request.host not in hosts:
            return web.Response(status=403, text=f"this app answers on {', '.join(sorted(hosts))} only")
        if request.headers.get("Upgrade", "").lower() == "websocket" and (
                request.headers.get("Origin") not in (f"http://{request.host}", f"https://{request.host}")):
            return web.Response(status=403, text="websocket from another origin refused")
        page = request.path in ("/", "/index.html")
        if page and TOKEN_PARAMETER not in request.query and self._hasToken(request):  # a reload: the cookie
            raise web.HTTPFound(f"/index.html?{urlencode({**request.query, TOKEN_PARAMETER: self.token})}")
        if (page or request.path.startswith(f"{ROUTE}/")) and not self._hasToken(request):
            return web.Response(status=403, text="open the address that 'segexplain review' printed: it carries "
                                                 f"the access token (?{TOKEN_PARAMETER}=...)")
        response = await handler(request)
        if page:
            response.set_cookie(self._cookieName(), self.token, httponly=True, samesite="Strict", path="/")
        return response

    async def _screenshotResponse(self, _request: web.Request) -> web.Response:
        with tempfile.TemporaryDirectory(dir=self.session.scratchFolder()) as folder:
            path = export.writePng(self.screenshot()[0], Path(folder) / "screenshot.png")
            return self.attachment(path.read_bytes(), "segexplain-views.png", "image/png")

    async def _reportResponse(self, _request: web.Request) -> web.Response:
        explanation = self._currentExplanation()
        if explanation is None:
            return web.Response(status=404, text="no explanation yet: run or select one first")
        with tempfile.TemporaryDirectory(dir=self.session.scratchFolder()) as folder:
            try:
                path = self.session.writeReport(explanation, self.parameters(), Path(folder) / "report.pdf")
            except SegExplainError as error:
                return web.Response(status=400, text=str(error))
            return self.attachment(path.read_bytes(), "segexplain-report.pdf", "application/pdf")

    async def _segmentMatrixResponse(self, _request: web.Request) -> web.Response:
        if self.segmentMatrixResult is None:
            return web.Response(status=404, text="no segment matrix yet: compute it first")
        return self.attachment(self.segmentMatrixResult.to_csv().encode(), "segexplain-segment-matrix.csv",
                                "text/csv")

    @staticmethod
    def attachment(body: bytes, name: str, mime: str) -> web.Response:
        """A download of ``body`` named ``name``, never cached (it holds the patient's data)."""
        return web.Response(body=body, content_type=mime, headers={
            "Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"})

    # page --------------------------------------------------------------------------------------------------------

    def _buildUi(self) -> None:
        with VAppLayout(self.server, full_height=True) as layout:
            layout.root.theme = "dark"
            with v.VNavigationDrawer(permanent=True, width=340, classes="pa-2", style="font-size: 13px"):
                self._explainControls()
                v.VDivider(classes="my-2")
                self._displayControls()
                v.VDivider(classes="my-2")
                self._resultControls()
            with v.VMain(), html.Div(style="height: 100vh; display: flex; flex-direction: column;"):
                self._toolbar()
                with html.Div(style="flex: 1; display: flex; min-height: 0;"):
                    self.layoutManager.initialize_layout_grid(layout)
        self.ui = layout

    def _toolbar(self) -> None:
        """Above the views, always in sight: the downloads and the shown explanation's sequence and colour legend."""
        with html.Div(classes="d-flex align-center ga-2 px-2 text-caption", id="toolbar", style="flex: 0 0 40px;"):
            v.VBtn("Screenshot", href=f"{ROUTE}/screenshot.png", download="segexplain-views.png", size="small",
                   id="screenshot")
            v.VBtn("Report", href=f"{ROUTE}/report.pdf", download="segexplain-report.pdf", size="small",
                   disabled=("current === null",), id="report")
            with html.Div(v_if="legend", classes="d-flex align-center ga-2 ml-4", id="legend"):
                html.Span("Sequence: {{ legend.sequence }}", id="legend-sequence")
                html.Span("-{{ legend.amplitude }}")
                html.Div(style=f"width: 160px; height: 12px; background: {legendGradient()};", id="legend-bar")
                html.Span("+{{ legend.amplitude }}")
                html.Span("blue: against class {{ legend.class_index }}, red: for class {{ legend.class_index }}",
                          id="legend-meaning")

    def _explainControls(self) -> None:
        compact = {"density": "compact", "hide_details": True, "classes": "mb-2"}
        html.Div("SegExplain review", classes="text-h6 mb-2")
        v.VSelect(label="Method", v_model=("method",), items=("methods",), **compact)
        v.VSelect(label="LRP composite", v_model=("composite",), items=("composites",), v_if="method === 'lrp'",
                  **compact)
        v.VCheckbox(label="Layer-wise filter (reruns with the filter below)", v_model=("layerwise",),
                    v_if="method === 'lrp'", **compact)
        with html.Div(classes="d-flex ga-2", v_if="method === 'integrated_gradients'"):
            v.VTextField(label="Integrated Gradients steps", v_model_number=("n_steps",), type="number", **compact)
            v.VSelect(label="Baseline", v_model=("baseline",), items=("['blur:5', 'blur:2', 'zero', 'min', 'constant:0.0']",),
                      **compact)
        with html.Div(classes="d-flex ga-2"):
            v.VTextField(label="Class", v_model_number=("class_index",), type="number", **compact)
            v.VSelect(label="Aggregation", v_model=("aggregation",), items=("['sum', 'normalized']",), **compact)
        with html.Div(classes="d-flex ga-2"):
            v.VTextField(label="Samples (0: exact)", v_model_number=("samples",), type="number",
                         v_if="aggregation === 'normalized'", **compact)
            v.VTextField(label="Seed", v_model_number=("seed",), type="number", **compact)
            v.VSelect(label="Device", v_model=("device",), items=("['auto', 'cpu', 'cuda']",), **compact)
        v.VTextField(label="Other options (JSON)", v_model=("advanced_options",), placeholder='{"noise_level": 0.2}',
                     id="advanced-options", **compact)
        v.VSelect(label="Region", v_model=("region_kind",), items=("region_kinds",), id="region-kind", **compact)
        v.VSelect(label="Segment", v_model=("segment_id",), items=("segments",),
                  v_if="region_kind === 'segment'", **compact)
        v.VSlider(label="Radius (mm)", v_model=("radius",), min=0, max=10, step=0.5, thumb_label=True,
                  v_if="region_kind === 'point'", **compact)
        v.VBtn("Draw box on a slice view", click=self.drawBox, v_if="region_kind === 'box'", size="small", id="draw-box",
               classes="mb-2")
        v.VCheckbox(label="Explain on click", v_model=("explain_on_click",), **compact)
        v.VCheckbox(label="Quick preview of an ensemble first", v_model=("preview",), id="preview", **compact)
        with html.Div(classes="d-flex ga-2 mb-1"):
            v.VBtn("Explain", click=self.explain, disabled=("(running && !refining) || box_pending",), color="primary",
                   id="explain-button")
            v.VBtn("Cancel", click=self.cancel, disabled=("!running",), id="cancel-button")
        v.VProgressLinear(model_value=("progress",), active=("running",), height=6, color="primary", id="progress")
        html.Div("{{ step }}", v_if="running", classes="text-caption")
        html.Div("{{ message }}", classes="text-caption", id="message")
        v.VAlert(text=("error",), v_if="error", type="error", density="compact", id="error")
        v.VAlert(text=("warning",), v_if="warning", type="warning", density="compact", id="warning")

    def _displayControls(self) -> None:
        compact = {"density": "compact", "hide_details": True, "classes": "mb-2"}
        # the short title in the list, the folder's full name on hover
        with html.Div(title=("explanations.find(e => e.value === current)?.description",), id="explanation-field"):
            with v.VSelect(label="Explanation", v_model=("current",), items=("explanations",), id="explanation",
                           **compact), v.Template(v_slot_item="{ props, item }"):
                with html.Div(title=("item.raw.description",), classes="explanation-item"):
                    v.VListItem(v_bind="props")
        v.VSelect(label="Sequence", v_model=("sequence",), items=("sequences",), id="sequence", **compact)
        v.VSlider(label="Opacity", v_model=("opacity",), min=0, max=1, step=0.05, id="opacity", **compact)
        v.VSelect(label="Filter", v_model=("filter_kind",), items=("filter_kinds",), id="filter-kind", **compact)
        v.VSlider(label="alpha1", v_model=("alpha1",), min=0, max=1, step=0.05, thumb_label=True, id="alpha1",
                  **compact)
        v.VSlider(label="alpha2", v_model=("alpha2",), min=0, max=1, step=0.05, thumb_label=True, id="alpha2",
                  **compact)
        v.VCheckbox(label="Compare side by side", v_model=("compare_on",), id="compare", **compact)
        with html.Div(v_if="compare_on"):
            v.VSelect(label="Right: explanation", v_model=("compare_item",), items=("explanations",), **compact)
            v.VSelect(label="Right: filter", v_model=("compare_filter_kind",), items=("filter_kinds",), **compact)
            v.VSlider(label="alpha1", v_model=("compare_alpha1",), min=0, max=1, step=0.05, **compact)
            v.VSlider(label="alpha2", v_model=("compare_alpha2",), min=0, max=1, step=0.05, **compact)

    def _resultControls(self) -> None:
        html.Div("Relevance share per sequence", classes="text-subtitle-2")
        with html.Div(id="shares"):
            with html.Div(v_for="row in shares", key="row.sequence", classes="d-flex align-center",
                          style="height: 16px"):
                html.Div("{{ row.sequence }}", style="width: 70px")
                html.Div(style=("{width: (160 * row['Positive share']) + 'px', height: '10px', "
                                "background: '#d6604d'}",))
                html.Div("{{ row['Positive share'].toFixed(2) }}", classes="ml-1")
        with html.Table(v_if="shares.length", classes="text-caption mt-1", id="share-table"):
            with html.Tr():
                html.Th("")
                html.Th("{{ c.replace(' share', '') }}", v_for="c in share_columns", key="c")
            with html.Tr(v_for="row in shares", key="row.sequence"):
                html.Td("{{ row.sequence }}")
                html.Td("{{ row[c].toFixed(3) }}", v_for="c in share_columns", key="c")
        v.VBtn("Ground-truth inclusivity", click=self.inclusivity, size="small", classes="my-2",
               disabled=("!segments.length || current === null",), id="inclusivity")
        with html.Div(classes="d-flex ga-2 mb-2"):
            v.VBtn("Segment matrix", click=self.segmentMatrix, size="small", disabled=("segment_matrix_running",),
                   id="segment-matrix")
            v.VBtn("CSV", href=f"{ROUTE}/segment_matrix.csv", download="segexplain-segment-matrix.csv", size="small",
                   v_if="segment_matrix_png", id="segment-matrix-csv")
        v.VProgressLinear(indeterminate=True, active=("segment_matrix_running",), height=4, color="primary")
        html.Img(src=("segment_matrix_png",), v_if="segment_matrix_png", style="width: 100%;",
                 id="segment-matrix-figure")
        self.scoring.controls(ROUTE)
        v.VFileInput(label="Add a sequence (<name>.nii.gz) or label map", v_model=("upload",), density="compact",
                     show_size=True, id="upload")
        v.VAlert(text=("upload_error",), v_if="upload_error", type="error", density="compact", id="upload-error")
        html.Div("{{ upload_message }}", v_if="upload_message", classes="text-caption", id="upload-message")


def serveCase(model: ModelSource, case: str | Path | None, *, trustModelCode: bool = False, host: str = "127.0.0.1",
              port: int = 8080) -> None:
    """What ``segexplain review`` runs: the case of a file (4D, a channel per sequence), a folder (a file per
    sequence) or, for None, the demo case in memory, explained with ``model``, served until interrupted.

    ``trustModelCode`` is the user's word (``--trust-model-code``), never the case's or the card's.
    """
    chooseRendering()
    if case is None:
        reviewCase = ReviewCase.demo(model)  # in memory, as a 4D case: nothing is written, so nothing can be left
    elif Path(case).is_file():
        reviewCase = ReviewCase.fromFile(case, model)
    else:
        reviewCase = ReviewCase.fromFolder(case, model)
    serve(dataclasses.replace(reviewCase, trustModelCode=trustModelCode), host=host, port=port)


def chooseRendering() -> None:
    """Render offscreen with EGL where there is no display (a server, an SSH session) and VTK has EGL, unless the
    user chose a render window (``VTK_DEFAULT_OPENGL_WINDOW``): an X window would fail there, with warnings."""
    if (sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY")
            and hasattr(vtk, "vtkEGLRenderWindow")):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


@contextlib.contextmanager
def quietVtk():
    """Keep VTK's warnings off the terminal while the app is built (an interactor's deprecation notice, a label
    map's colour table set after its display node): they are about VTK, and would bury the address printed next."""
    shown, verbosity = vtk.vtkObject.GetGlobalWarningDisplay(), vtk.vtkLogger.GetCurrentVerbosityCutoff()
    vtk.vtkObject.GlobalWarningDisplayOff()
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_ERROR)
    try:
        yield
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(shown)
        vtk.vtkLogger.SetStderrVerbosity(verbosity)


def serve(case: ReviewCase, *, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Build the app and serve it until interrupted; never opens a browser.

    It prints the address to open, which carries this run's token: ``http://127.0.0.1:8080/?secret=<token>``.
    """
    with quietVtk():
        app = ReviewApp(case, host=host)

    def announce(**_: Any) -> None:
        print(f"SegExplain review: serving {app.url} (bound to {host}; the address carries this run's access token)",
              flush=True)

    app.server.controller.on_server_ready.add(announce)
    app.server.start(host=host, port=port, open_browser=False, show_connection_info=False, disable_logging=True)
