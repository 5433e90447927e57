"""The review app's scene: one case as volumes and a segmentation, explained through the Slicer module's MRML logic.

:class:`ReviewSession` runs the same workflow as the desktop module's ``SegExplainLogic``
(``SegExplainMRML.workflow``: region, settings, start, finish, show, report), with its choices in
:class:`ReviewParameters` (the page's controls, named like the module's parameter node) instead of a parameter
node. This file only wires that workflow to one scene and the page.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk
from SegExplainMRML import nodes, results, workflow
from SegExplainMRML.job import ExplainSettings, Region, WarmExplainer, WarmRun

from SegExplainLib.application.demo import HELD_OUT_SEEDS, demo_geometry, make_case
from SegExplainLib.application.model_source import ModelSource
from SegExplainLib.application.parent_watch import remove_with_host
from SegExplainLib.application.requests import EvaluationRequest
from SegExplainLib.errors import SegExplainError
from SegExplainLib.io.imaging import (
    WRITE_SUFFIXES,
    Geometry,
    check_self_contained,
    image_stem,
    match_names,
    read_geometry,
    read_label,
    read_sequences,
    sequence_of,
)

#: Segment colours, away from the overlay's red (relevance for) and blue (against).
SEGMENT_COLORS = ((0.2, 0.85, 0.3), (0.1, 0.8, 0.8), (0.75, 0.85, 0.1), (0.9, 0.9, 0.9))
#: The largest file the page may upload (bytes): a compressed sequence of the case is far smaller. It is checked once
#: the file has arrived (the app's wslink takes messages of this size plus 1 MB: ``app.CappedUnChunker``), before it
#: is written or decoded; what it holds is checked from its header (grid, voxel count) before anything is decoded.
MAX_UPLOAD_BYTES = 512 * 2**20

logger = logging.getLogger(__name__)


def _modelSource(model: str | ModelSource) -> ModelSource:
    """A :class:`ModelSource` as given, or the one of a model card path."""
    return model if isinstance(model, ModelSource) else ModelSource("card", str(model or ""))


def _what(model: ModelSource) -> str:
    return {"card": "model card", "nnunet": "nnU-Net model", "bundle": "MONAI bundle"}[model.kind]


@dataclass(frozen=True)
class CaseVolume:
    """A volume of the case held in memory, never written to disk: voxels (D, H, W) on a grid."""

    array: np.ndarray
    geometry: Geometry


@dataclass(frozen=True)
class ReviewCase:
    """The files of one case: one per sequence of the model, in its order, and an optional label map.

    ``model`` is a model card, an nnU-Net v2 results folder or a MONAI bundle (a :class:`ModelSource`; a path is
    taken as a model card). ``trustModelCode`` is the word of whoever started the app (``segexplain review
    --trust-model-code``) that the model may import or run code of someone else; the model itself cannot allow that.
    """

    model: ModelSource
    sequences: tuple[Path | CaseVolume, ...]
    label: Path | CaseVolume | None = None
    trustModelCode: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", _modelSource(self.model))

    @property
    def names(self) -> list[str]:
        """The model's sequence names (from the card, nnU-Net's dataset.json or the bundle's metadata)."""
        return self.model.sequence_names()

    @classmethod
    def fromFile(cls, path: str | Path, model: str | ModelSource) -> ReviewCase:
        """A case in one multi-channel file (4D, or vector pixels), one channel per sequence of the model in its order.

        The channels are kept in memory (:class:`CaseVolume`): no copy of the patient's images is written anywhere,
        so nothing is left behind however the server ends.

        Raises:
            SegExplainError: Not readable as an image, or a channel count other than the model's sequence count.
        """
        model = _modelSource(model)
        image, geometry = read_sequences([path])
        names = model.sequence_names()
        if len(image) != len(names):
            raise SegExplainError(f"{str(path)!r} has {len(image)} channels; the {_what(model)}'s sequences are "
                                  f"{', '.join(names)} ({len(names)})")
        return cls(model, tuple(CaseVolume(channel, geometry) for channel in image))

    @classmethod
    def demo(cls, model: str | ModelSource, seed: int = HELD_OUT_SEEDS[0]) -> ReviewCase:
        """The demo case (:func:`~SegExplainLib.application.demo.make_case`), its sequences and label in memory: no file."""
        image, label = make_case(seed)
        geometry = demo_geometry(label.shape)
        return cls(model, tuple(CaseVolume(channel, geometry) for channel in image), CaseVolume(label, geometry))

    @classmethod
    def fromFolder(cls, folder: str | Path, model: str | ModelSource) -> ReviewCase:
        """A case folder: one image file per sequence of the model and optionally a label map.

        Files are matched to the model's sequences by name, exactly (``T2.nii.gz``, as ``segexplain cohort`` reads
        them) or by ending (``case_1000_T2.nii.gz``, as ``python -m SegExplainLib.application.demo case`` writes them); the
        label map is ``label.*`` or ``*_label.*``.

        Raises:
            SegExplainError: Not a folder, a sequence of the model without its file, or two files naming one.
        """
        model = _modelSource(model)
        folder = Path(folder)
        if not folder.is_dir():
            raise SegExplainError(f"case folder {str(folder)!r} does not exist")
        files = [p for p in sorted(folder.iterdir()) if image_stem(p.name)]
        stems = [image_stem(p.name) for p in files]
        names = model.sequence_names()
        (label,) = match_names(stems, ["label"])
        # each sequence's files by the one naming rule of every front end (sequence_of): never pick one of two
        holders = [[p for p, stem in zip(files, stems) if sequence_of(stem, names) == [index]]
                   for index in range(len(names))]
        for name, found in zip(names, holders):
            if len(found) > 1:
                raise SegExplainError(f"case folder {str(folder)!r} has {' and '.join(p.name for p in found)}, which "
                                      f"both name the sequence {name}; keep one file per sequence of the "
                                      f"{_what(model)} ({', '.join(names)})")
        missing = [name for name, found in zip(names, holders) if not found]
        if missing:
            raise SegExplainError(f"case folder {str(folder)!r} has no file for {', '.join(missing)} (expected "
                                  f"{', '.join(n + '.nii.gz' for n in missing)}; the {_what(model)}'s sequences are "
                                  f"{', '.join(names)})")
        return cls(model, tuple(found[0] for found in holders), files[label] if label is not None else None)


@dataclass
class ReviewParameters(ExplainSettings):
    """The page's controls: the explanation settings (validated on creation) plus the region and the display, with
    the names of the Slicer module's parameter node, so that ``SegExplainMRML.workflow`` reads both alike."""

    regionKind: str = "point"
    radius: float = 2.0
    regionSegmentId: str = ""
    layerwiseFilter: bool = False
    advancedOptions: str = ""
    displayedSequence: int = 0
    overlayOpacity: float = 0.6
    filterKind: str = "none"
    filterLow: float = 0.0
    filterHigh: float = 1.0


class ReviewSession:
    """The case in a trame-slicer scene, its explanations and what the page asks of them.

    Args:
        slicerApp: trame-slicer's ``SlicerApp`` (scene, application and module logics).
        case: The files to load.
        maxUploadBytes: The largest file :meth:`addFile` accepts.
    """

    def __init__(self, slicerApp: Any, case: ReviewCase, *, maxUploadBytes: int = MAX_UPLOAD_BYTES) -> None:
        if isinstance(maxUploadBytes, bool) or not isinstance(maxUploadBytes, int) or maxUploadBytes < 1:
            raise SegExplainError(f"maxUploadBytes must be a positive number of bytes, got {maxUploadBytes!r}")
        self.app, self.case, self.scene = slicerApp, case, slicerApp.scene
        self.maxUploadBytes = maxUploadBytes
        self._scratch: tuple[Path, Any] | None = None  # the scratch folder and its guardian, made when first needed
        slicer.mrmlScene = self.scene  # slicer.util works on the current scene, as in the application
        self.names = case.names
        if len(case.sequences) != len(self.names):
            raise SegExplainError(f"{len(case.sequences)} sequence files for the model's {len(self.names)} "
                                  f"sequences ({', '.join(self.names)})")
        files = [source for source in case.sequences if not isinstance(source, CaseVolume)]
        if files:
            read_sequences(files)  # one clear message when the files do not share a grid
        self.volumes = [self._addVolume(path, name) for path, name in zip(case.sequences, self.names)]
        self.segmentation = self._addSegmentation(case.label, "label") if case.label else None
        self.clickedPoints = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "SegExplain click")
        self.clickedPoints.CreateDefaultDisplayNodes()
        self.clickedPoints.GetDisplayNode().SetSelectedColor(1.0, 0.85, 0.1)
        self.clickedPoints.GetDisplayNode().SetPointLabelsVisibility(False)
        self.roi: Any = None
        self._compareOverlay: Any = None
        self.explainer = WarmExplainer()
        try:  # the worker loads the model and the case while the page opens; the first click waits for it
            self.prepareExplanation()
        except SegExplainError as error:  # e.g. a model that runs code without the user's word: the click says why
            logger.warning("the explanation worker did not start: %s", error)

    # case -----------------------------------------------------------------------------------------------------

    def _addVolume(self, path: Path | CaseVolume, name: str) -> Any:
        if isinstance(path, CaseVolume):
            return slicer.util.addVolumeFromArray(path.array, path.geometry.ijk_to_ras, name)
        node = self.app.volumes_logic.AddArchetypeVolume(str(path), name, 0)
        if node is None:
            raise SegExplainError(f"could not load {str(path)!r} as a volume")
        return node

    def _addSegmentation(self, path: Path | CaseVolume, name: str) -> Any:
        grid = nodes.geometryOfVolume(self.volumes[0])
        if isinstance(path, CaseVolume):
            differences = grid.differences(path.geometry, tolerance=1e-4)
            if differences:
                raise SegExplainError(f"the label map is not on the grid of the case (differs in "
                                      f"{', '.join(differences)})")
            label = slicer.util.addVolumeFromArray(path.array, path.geometry.ijk_to_ras, "label",
                                                   nodeClassName="vtkMRMLLabelMapVolumeNode")
            label.GetDisplayNode().SetAndObserveColorNodeID("")  # segments named as from a file, not a colour table
        else:
            read_label(path, grid)  # refuses a label map off the input grid
            label = self.app.volumes_logic.AddArchetypeVolume(str(path), "label", 1)
        segmentation = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", self.scene.GenerateUniqueName(name))
        segmentation.CreateDefaultDisplayNodes()
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label, segmentation)
        self.scene.RemoveNode(label)
        segmentation.CreateClosedSurfaceRepresentation()
        segmentation.GetDisplayNode().SetOpacity2DFill(0.0)  # outlines only: the overlay stays visible inside
        segments = segmentation.GetSegmentation()
        for index in range(segments.GetNumberOfSegments()):
            segments.GetNthSegment(index).SetColor(*SEGMENT_COLORS[index % len(SEGMENT_COLORS)])
        return segmentation

    def segments(self) -> list[tuple[str, str]]:
        """(segment ID, name) of the case's segmentation."""
        if self.segmentation is None:
            return []
        seg = self.segmentation.GetSegmentation()
        return [(seg.GetNthSegmentID(i), seg.GetNthSegment(i).GetName()) for i in range(seg.GetNumberOfSegments())]

    def segmentationCentre(self) -> tuple[float, float, float] | None:
        """World RAS centre of the segmentation's bounds (where the views open), None without one."""
        if self.segmentation is None or not self.segments():
            return None
        bounds = np.zeros(6)
        self.segmentation.GetRASBounds(bounds)
        if bounds[0] > bounds[1]:
            return None
        return tuple(float(v) for v in (bounds[0::2] + bounds[1::2]) / 2)

    def addFile(self, fileName: str, content: bytes) -> str:
        """An uploaded sequence (``<sequence>.nii.gz``) replacing that input, or a label map (any other name).

        The file is checked from its header (a single file holding its voxels, on the case's grid, at most
        :data:`~SegExplainLib.io.imaging.MAX_VOXELS` voxels) before any voxel is decoded: a header that names another
        file (a MetaImage ``ElementDataFile``, an NRRD ``data file``) is refused before anything opens that file.

        Returns:
            What was done, for the page.

        Raises:
            SegExplainError: A name without an image ending, a file over ``maxUploadBytes``, a file that is no image
                or not self-contained, or one off the input grid. The message names ``fileName``, never the server's
                temporary copy.
        """
        stem = image_stem(Path(fileName).name)
        if not stem:
            raise SegExplainError(f"{fileName!r} is not an image file (expected {', '.join(WRITE_SUFFIXES)})")
        if len(content) > self.maxUploadBytes:
            raise SegExplainError(f"{fileName!r} is {len(content)} bytes; uploads are limited to "
                                  f"{self.maxUploadBytes} bytes")
        with tempfile.TemporaryDirectory(prefix="segexplain-upload-", dir=self.scratchFolder()) as folder:
            path = Path(folder) / f"upload{Path(fileName).name[len(stem):]}"
            try:
                path.write_bytes(content)
                check_self_contained(path)  # a header naming a server file would have ITK read it, or say it is absent
                return self._addFile(path, stem, fileName)
            except Exception as error:  # noqa: BLE001 - any failure reaches the page, without the server's paths
                if not isinstance(error, SegExplainError):
                    logger.exception("upload of %r failed", fileName)
                message = str(error) if isinstance(error, SegExplainError) else f"{type(error).__name__}: {error}"
                for shown, replacement in ((str(path), fileName), (os.path.realpath(path), fileName),
                                           (folder, "<upload folder>"), (os.path.realpath(folder), "<upload folder>")):
                    message = message.replace(shown, replacement)
                raise SegExplainError(message) from None

    def scratchFolder(self) -> Path:
        """The private temporary folder for files the server holds only for a moment (an upload while it is checked:
        ITK reads images from files only; a download while it is made). A guardian process removes it when the
        server ends, even killed with SIGKILL in that moment."""
        if self._scratch is None:
            folder = Path(tempfile.mkdtemp(prefix="segexplain-scratch-"))
            self._scratch = folder, remove_with_host(folder)
        return self._scratch[0]

    def _addFile(self, path: Path, stem: str, fileName: str) -> str:
        if stem in self.names:
            uploaded = read_geometry(path)
            differences = nodes.geometryOfVolume(self.volumes[0]).differences(uploaded, tolerance=1e-4)
            if differences:
                raise SegExplainError(f"{fileName!r} is not on the grid of the case (differs in "
                                      f"{', '.join(differences)})")
            read_sequences([path])  # on the grid: decoding it is bounded, and says clearly when the voxels are broken
            index = self.names.index(stem)
            old, self.volumes[index] = self.volumes[index], self._addVolume(path, stem)
            # earlier explanations refer to the volume they explained: it stays, renamed
            old.SetName(self.scene.GenerateUniqueName(f"{stem} (before {fileName})"))
            self.prepareExplanation()  # the worker gets the new case now, not at the next click
            return f"replaced sequence {stem} with {fileName}"
        self.segmentation = self._addSegmentation(path, stem)
        return f"added segmentation {self.segmentation.GetName()} with {len(self.segments())} segment(s)"

    # explain ---------------------------------------------------------------------------------------------------

    def addClick(self, ras: Any) -> int:
        """A clicked point (world RAS) as a new control point of the click markups node; returns its index."""
        return self.clickedPoints.AddControlPointWorld(vtk.vtkVector3d(*(float(v) for v in ras)))

    def region(self, parameters: ReviewParameters) -> Region:
        """The region to explain, through the workflow the Slicer module uses."""
        if parameters.regionKind == "box" and self.roi is not None and not self.roi.GetControlPointPlacementComplete():
            raise SegExplainError("finish drawing the box on a slice view first")
        return workflow.region(parameters, self.volumes[0], segmentation=self.segmentation, roi=self.roi,
                               clickedPoints=self.clickedPoints)

    def prepareExplanation(self) -> None:
        """Have the warm worker hold the model and the case's volumes (in the background; returns at once)."""
        workflow.prepareExplanation(self.explainer, self.volumes, self.names, self.case.model,
                                    trustModelCode=self.case.trustModelCode)

    def startExplanation(self, parameters: ReviewParameters) -> WarmRun:
        """Ask the warm worker for an explanation of the region; returns the running click."""
        return workflow.startExplanation(self.explainer, self.volumes, self.names, self.region(parameters),
                                         workflow.settings(parameters), self.case.model,
                                         trustModelCode=self.case.trustModelCode)

    def startSegmentMatrix(self, parameters: ReviewParameters) -> int:
        """Ask the warm worker for the case's segment x segment matrix with the page's method and options (every
        predicted segment explained; the region controls are not used); the request's number on
        ``self.explainer.worker``."""
        settings = workflow.settings(parameters)
        self.prepareExplanation()
        return self.explainer.worker.segment_matrix(settings.request(Region(kind="predicted")))

    def startEvaluation(self, parameters: ReviewParameters, methods: tuple[str, ...]) -> tuple[Any, int]:
        """Ask the warm worker for the scorecard of ``methods`` on the page's region (docs/evaluation.md; each method
        with its defaults); the worker and the request's number on it."""
        region = self.region(parameters)
        request = EvaluationRequest(workflow.settings(parameters).request(region), methods=methods)
        self.prepareExplanation()
        worker = self.explainer.worker
        return worker, worker.evaluate(request, mask=region.mask)

    def finishExplanation(self, run: WarmRun) -> results.Explanation:
        """Load a done click into the scene as a new explanation folder (its preview's folder, if one is shown)."""
        return workflow.finishExplanation(run, self.volumes)

    def previewExplanation(self, run: WarmRun) -> results.Explanation | None:
        """Load a click's preview into the scene once it came (see ``workflow.previewExplanation``); None before."""
        return workflow.previewExplanation(run, self.volumes)

    def close(self) -> None:
        """End the warm worker and remove the scratch folder (the server's end)."""
        self.explainer.close()
        if self._scratch is not None:
            _, guardian = self._scratch
            guardian.stdin.close()  # the guardian removes the folder and ends
            guardian.wait()
            self._scratch = None

    def explanations(self) -> list[tuple[int, str]]:
        """(folder item, name) of every explanation, oldest first."""
        shNode = results.subjectHierarchy(self.scene)
        return [(item, shNode.GetItemName(item)) for item in results.explanationFolders(self.scene)]

    def explanationItems(self) -> list[dict[str, Any]]:
        """The page's list of explanations, oldest first: a short distinct title (number, method, region) and the
        folder's full name as the description, e.g. ``#3 lrp point (12.0, -30.0, 44.0) mm``."""
        items = []
        for number, (item, name) in enumerate(self.explanations(), 1):
            record = self.explanation(item).record
            items.append({"value": item, "title": f"#{number} {record.get('method', '?')} {self._where(record)}",
                          "description": name})
        return items

    def _where(self, record: dict[str, Any]) -> str:
        """The region of a record in a few words: a point's RAS position (mm), else its kind."""
        target = record.get("target", {})
        if target.get("kind") != "voxel":
            return str(target.get("kind", "region"))
        ijkToRas = vtk.vtkMatrix4x4()
        self.volumes[0].GetIJKToRASMatrix(ijkToRas)
        ras = ijkToRas.MultiplyPoint([*reversed(target["index"]), 1.0])[:3]  # the record's index is (D, H, W)
        return f"point ({', '.join(f'{c:.1f}' for c in ras)}) mm"

    def explanation(self, folderItem: int) -> results.Explanation:
        return results.explanationOf(self.scene, folderItem)

    # display ---------------------------------------------------------------------------------------------------

    def compareOverlay(self) -> Any:
        """The second overlay volume, for a comparison that may show the same explanation with other filters."""
        if self._compareOverlay is None:
            self._compareOverlay = nodes.addVolumeLike(self.volumes[0], np.zeros_like(
                slicer.util.arrayFromVolume(self.volumes[0]), dtype=np.float32), "SegExplain comparison overlay")
        return self._compareOverlay

    def inclusivity(self, explanation: results.Explanation, segmentId: str) -> dict[str, float]:
        if self.segmentation is None:
            raise SegExplainError("this case has no segmentation to measure inclusivity against")
        return results.addGroundTruthInclusivity(explanation, self.segmentation, segmentId)

    @staticmethod
    def sharesRows(explanation: results.Explanation) -> list[dict[str, Any]]:
        """The shares table as rows: sequence and every numeric column (shares, inclusivity)."""
        table = explanation.table.GetTable()
        columns = [table.GetColumnName(c) for c in range(1, table.GetNumberOfColumns())]
        return [{"sequence": table.GetValue(row, 0).ToString(),
                 **{c: round(table.GetValueByName(row, c).ToDouble(), 4) for c in columns}}
                for row in range(table.GetNumberOfRows())]

    # export ----------------------------------------------------------------------------------------------------

    def writeReport(self, explanation: results.Explanation, parameters: ReviewParameters, path: str | Path) -> Path:
        """The module's one-page report (montage of the filtered overlay, shares, record)."""
        return workflow.writeReport(explanation, parameters, path)
