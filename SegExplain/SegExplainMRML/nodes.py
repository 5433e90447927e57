"""Volume nodes to arrays and back, and the regions a user picks (segment, ROI box, clicked point) as voxels.

Arrays follow the engine's layout: a volume is (D, H, W) = (K, J, I) in Slicer's IJK terms, several sequences are
stacked to (C, D, H, W). A volume under a linear transform is handled in its own (local) frame: the inputs are
written with their local geometry, regions are mapped from world coordinates into that frame, and the relevance
volumes are placed under the same transform, so they overlay the inputs wherever the transform moves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import slicer
import vtk

from SegExplainLib.errors import SegExplainError
from SegExplainLib.io.imaging import Geometry, match_names

#: Attributes of a scalar volume split from a multi-volume: the vector volume's ID and the component.
_SPLIT_FROM = "SegExplain.splitFrom"
_COMPONENT = "SegExplain.component"
#: Attribute of the nodes the module makes for an explanation: their role (relevance, overlay, ...).
ROLE_ATTRIBUTE = "SegExplain.role"

#: What a sequence's volume selector lists (qMRMLNodeComboBox ``nodeTypes`` and ``hideChildNodeTypes``): scalar
#: volumes, but no label maps, no tensor volumes (vector and DTI volumes are tensor volumes) and no DWI volumes.
SEQUENCE_VOLUME_TYPES = ("vtkMRMLScalarVolumeNode",)
HIDDEN_SEQUENCE_VOLUME_TYPES = ("vtkMRMLLabelMapVolumeNode", "vtkMRMLTensorVolumeNode",
                                "vtkMRMLDiffusionWeightedVolumeNode")


def nodeLabel(node: Any) -> str:
    """How messages name a node: its name and ID, e.g. ``'T2' (vtkMRMLScalarVolumeNode1)``."""
    return f"{node.GetName()!r} ({node.GetID()})" if node is not None else "None"


def _checkVolume(node: Any, what: str) -> None:
    scalar = node is not None and node.IsA("vtkMRMLScalarVolumeNode")
    if not scalar or node.IsA("vtkMRMLLabelMapVolumeNode") or node.IsA("vtkMRMLVectorVolumeNode"):
        got = node.GetClassName() if node is not None else "nothing"
        raise SegExplainError(f"{what} must be a scalar volume node, got {got}"
                              + (f" {nodeLabel(node)}" if node is not None else ""))
    if node.GetImageData() is None:
        raise SegExplainError(f"{what} {nodeLabel(node)} has no voxels")


def ijkToRasMatrix(volumeNode: Any) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a volume in its own (local) frame."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def worldFromLocalMatrix(node: Any) -> np.ndarray:
    """The 4x4 matrix taking the node's local RAS to world RAS (identity without a parent transform).

    Raises:
        SegExplainError: The node is under a non-linear transform, which has no single matrix; harden it first.
    """
    transformNode = node.GetParentTransformNode()
    if transformNode is None:
        return np.eye(4)
    if not transformNode.IsTransformToWorldLinear():
        raise SegExplainError(f"{nodeLabel(node)} is under the non-linear transform {nodeLabel(transformNode)}; "
                              "harden the transform (Data module) before explaining")
    matrix = vtk.vtkMatrix4x4()
    transformNode.GetMatrixTransformToWorld(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def geometryOfVolume(volumeNode: Any) -> Geometry:
    """The grid of a scalar (or multi-component vector) volume node in ITK's LPS convention, in its local frame.

    Example:
        >>> geometryOfVolume(getNode("T2")).spacing
        (0.9375, 0.9375, 3.0)
    """
    if not (volumeNode is not None and volumeNode.IsA("vtkMRMLVectorVolumeNode")):
        _checkVolume(volumeNode, "the volume")
    size = volumeNode.GetImageData().GetDimensions()
    return Geometry.from_ijk_to_ras(ijkToRasMatrix(volumeNode), tuple(int(n) for n in size))


@dataclass(frozen=True)
class VolumeStack:
    """The explained image: the sequences stacked to (C, D, H, W) float32, their grid and the node they came from.

    Attributes:
        image: The voxels, a copy (the scene's volumes are never written to).
        geometry: The shared grid, local frame of ``reference``.
        names: One name per channel, e.g. the model card's sequence names.
        reference: The first input volume: results get its geometry and parent transform.
    """

    image: np.ndarray
    geometry: Geometry
    names: tuple[str, ...]
    reference: Any


def stackVolumes(volumeNodes: list[Any], names: list[str] | None = None) -> VolumeStack:
    """Stack one scalar volume per sequence (or one multi-component vector volume) into the engine's image.

    Args:
        volumeNodes: The sequences in the model's channel order, e.g. ``[t2Node, t1Node]``; or a single
            ``vtkMRMLVectorVolumeNode`` whose components are the sequences.
        names: Channel names; by default the node names (a vector volume's channels get ``<name>[c]``).

    Returns:
        The stacked image, its geometry and names.

    Raises:
        SegExplainError: No volume, a missing or non-scalar node, grids that differ (the message names the nodes and
            the fields: size, spacing, origin, direction), nodes under different transforms, or a name count that
            does not match the channels.
    """
    if not volumeNodes:
        raise SegExplainError("select at least one input volume (one per MRI sequence)")
    if len(volumeNodes) == 1 and volumeNodes[0] is not None and volumeNodes[0].IsA("vtkMRMLVectorVolumeNode"):
        vector = volumeNodes[0]
        voxels = slicer.util.arrayFromVolume(vector)
        image = np.ascontiguousarray(np.moveaxis(voxels, -1, 0), dtype=np.float32)
        geometry = geometryOfVolume(vector)
        defaultNames = [f"{vector.GetName()}[{c}]" for c in range(image.shape[0])]
        return VolumeStack(image, geometry, _checkedNames(names, defaultNames), vector)
    for index, node in enumerate(volumeNodes):
        _checkVolume(node, f"input volume {index + 1}")
    reference = volumeNodes[0]
    geometry = geometryOfVolume(reference)
    referenceTransform = reference.GetParentTransformNode()
    for node in volumeNodes[1:]:
        differences = geometry.differences(geometryOfVolume(node), tolerance=1e-4)
        if differences:
            raise SegExplainError(f"input volume {nodeLabel(node)} is not on the grid of {nodeLabel(reference)} "
                                  f"(differs in {', '.join(differences)}); resample it first (Resample Scalar "
                                  "Volume module)")
        if node.GetParentTransformNode() is not referenceTransform:
            raise SegExplainError(f"input volume {nodeLabel(node)} is under another transform than "
                                  f"{nodeLabel(reference)}; harden the transforms or use the same one")
    image = np.stack([slicer.util.arrayFromVolume(node).astype(np.float32) for node in volumeNodes])
    return VolumeStack(image, geometry, _checkedNames(names, [n.GetName() for n in volumeNodes]), reference)


def _checkedNames(names: list[str] | None, defaults: list[str]) -> tuple[str, ...]:
    if names is None:
        return tuple(defaults)
    if len(names) != len(defaults):
        raise SegExplainError(f"{len(names)} sequence names ({', '.join(names)}) given for {len(defaults)} "
                              "input channels")
    return tuple(str(n) for n in names)


def worldToIndex(volumeNode: Any, pointWorld: Any) -> np.ndarray:
    """Continuous voxel index (d, h, w) of a world RAS point, e.g. a clicked markups point."""
    worldFromIjk = worldFromLocalMatrix(volumeNode) @ ijkToRasMatrix(volumeNode)
    ijk = np.linalg.solve(worldFromIjk, np.append(np.asarray(pointWorld, dtype=float), 1.0))[:3]
    return ijk[::-1]


def localPoint(volumeNode: Any, pointWorld: Any) -> np.ndarray:
    """A world RAS point in the volume's local RAS frame (the frame of the files the job writes)."""
    local = np.linalg.solve(worldFromLocalMatrix(volumeNode), np.append(np.asarray(pointWorld, dtype=float), 1.0))
    return local[:3]


def _shape(volumeNode: Any) -> tuple[int, int, int]:
    i, j, k = volumeNode.GetImageData().GetDimensions()
    return k, j, i


def clickedPoint(markupsNode: Any, pointIndex: int, referenceVolume: Any) -> np.ndarray:
    """The local RAS position of control point ``pointIndex`` of a markups node, checked to lie in the volume.

    Raises:
        SegExplainError: No such point, or the point lies outside the grid of ``referenceVolume``.
    """
    if markupsNode is None or not markupsNode.IsA("vtkMRMLMarkupsNode"):
        raise SegExplainError(f"the clicked point must be a markups node, got {nodeLabel(markupsNode)}")
    count = markupsNode.GetNumberOfControlPoints()
    if not 0 <= pointIndex < count:
        raise SegExplainError(f"point index {pointIndex} is out of range: {nodeLabel(markupsNode)} has {count} "
                              "control points; click a point on a slice view first")
    world = np.zeros(3)
    markupsNode.GetNthControlPointPositionWorld(pointIndex, world)
    index = np.round(worldToIndex(referenceVolume, world)).astype(int)
    if np.any(index < 0) or np.any(index >= np.array(_shape(referenceVolume))):
        raise SegExplainError(f"point {markupsNode.GetNthControlPointLabel(pointIndex)!r} at RAS "
                              f"({', '.join(f'{v:.1f}' for v in world)}) lies outside {nodeLabel(referenceVolume)} "
                              f"(voxel {tuple(int(v) for v in index)} for a grid of {_shape(referenceVolume)})")
    return localPoint(referenceVolume, world)


def roiIndexBox(roiNode: Any, referenceVolume: Any) -> tuple[int, int, int, int, int, int]:
    """The voxel box (D0, H0, W0, D1, H1, W1), half open, that a markups ROI covers on the reference grid.

    The ROI's eight corners are mapped to voxel indices, so a rotated ROI gives its bounding box on the grid; the
    box is clipped to the volume.

    Raises:
        SegExplainError: Not an ROI node, or an ROI that does not overlap the volume.
    """
    if roiNode is None or not roiNode.IsA("vtkMRMLMarkupsROINode"):
        raise SegExplainError(f"the box must be a markups ROI node, got {nodeLabel(roiNode)}")
    center = np.zeros(3)
    roiNode.GetCenter(center)
    size = np.array(roiNode.GetSize())  # wrapped as GetSize() -> tuple; there is no GetSize(double[3])
    roiToWorldArray = slicer.util.arrayFromVTKMatrix(roiNode.GetObjectToWorldMatrix())
    signs = np.array(np.meshgrid([-0.5, 0.5], [-0.5, 0.5], [-0.5, 0.5])).reshape(3, -1).T
    cornersObject = signs * size
    cornersWorld = (roiToWorldArray[:3, :3] @ cornersObject.T).T + roiToWorldArray[:3, 3]
    indices = np.array([worldToIndex(referenceVolume, corner) for corner in cornersWorld])
    shape = np.array(_shape(referenceVolume))
    low = np.clip(np.floor(indices.min(axis=0) + 0.5).astype(int), 0, shape)
    high = np.clip(np.floor(indices.max(axis=0) + 0.5).astype(int) + 1, 0, shape)
    if np.any(high <= low):
        raise SegExplainError(f"ROI {nodeLabel(roiNode)} (centre RAS {np.round(center, 1).tolist()}, size "
                              f"{np.round(size, 1).tolist()} mm) does not overlap {nodeLabel(referenceVolume)}")
    return (*(int(v) for v in low), *(int(v) for v in high))


def segmentMask(segmentationNode: Any, segmentId: str, referenceVolume: Any) -> np.ndarray:
    """The voxels of one segment on the reference grid, as a (D, H, W) bool array.

    Raises:
        SegExplainError: Not a segmentation, no such segment, or a segment with no voxel on the grid.
    """
    if segmentationNode is None or not segmentationNode.IsA("vtkMRMLSegmentationNode"):
        raise SegExplainError(f"the region must be a segmentation node, got {nodeLabel(segmentationNode)}")
    segmentation = segmentationNode.GetSegmentation()
    if not segmentId or segmentation.GetSegment(segmentId) is None:
        known = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        raise SegExplainError(f"segment {segmentId!r} is not in {nodeLabel(segmentationNode)} (it has "
                              f"{', '.join(map(repr, known)) or 'no segments'})")
    scene = segmentationNode.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "SegExplain temporary labelmap")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segmentId)
        exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentationNode, ids, labelmap, referenceVolume)
        if not exported:
            raise SegExplainError(f"segment {segmentId!r} of {nodeLabel(segmentationNode)} could not be converted to "
                                  f"voxels on the grid of {nodeLabel(referenceVolume)}")
        mask = slicer.util.arrayFromVolume(labelmap) > 0
        if mask.shape != _shape(referenceVolume):
            raise SegExplainError(f"segment {segmentId!r} was exported on a {mask.shape} grid, expected "
                                  f"{_shape(referenceVolume)}")
    finally:
        scene.RemoveNode(labelmap)
    if not mask.any():
        name = segmentation.GetSegment(segmentId).GetName()
        raise SegExplainError(f"segment {name!r} of {nodeLabel(segmentationNode)} has no voxel inside "
                              f"{nodeLabel(referenceVolume)}")
    return mask


def addVolumeLike(referenceVolume: Any, array: np.ndarray, name: str) -> Any:
    """A new scalar volume with the voxels ``array`` (D, H, W) on the grid and under the transform of a reference.

    The name is made unique in the scene, so an earlier result is never replaced.
    """
    if array.shape != _shape(referenceVolume):
        raise SegExplainError(f"array of shape {array.shape} does not fit the grid {_shape(referenceVolume)} of "
                              f"{nodeLabel(referenceVolume)}")
    scene = referenceVolume.GetScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    matrix = vtk.vtkMatrix4x4()
    referenceVolume.GetIJKToRASMatrix(matrix)
    node.SetIJKToRASMatrix(matrix)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array, dtype=np.float32))
    transform = referenceVolume.GetParentTransformNode()
    if transform is not None:
        node.SetAndObserveTransformNodeID(transform.GetID())
    return node


def splitVectorVolume(vectorNode: Any, names: list[str]) -> list[Any]:
    """One scalar volume per component of a multi-component volume, named ``<volume> <sequence>``.

    A multi-volume (e.g. a 4D NRRD loaded as a vector volume) becomes the per-sequence volumes the module explains and
    shows as backgrounds. Volumes split from the same node earlier are reused rather than added again.

    Raises:
        SegExplainError: Not a vector volume, or a component count other than the number of sequences.
    """
    if vectorNode is None or not vectorNode.IsA("vtkMRMLVectorVolumeNode") or vectorNode.GetImageData() is None:
        raise SegExplainError(f"the multi-volume must be a vector volume with voxels, got {nodeLabel(vectorNode)}")
    components = vectorNode.GetImageData().GetNumberOfScalarComponents()
    if components != len(names):
        raise SegExplainError(f"multi-volume {nodeLabel(vectorNode)} has {components} components; the model's "
                              f"sequences are {', '.join(names)} ({len(names)})")
    scene = vectorNode.GetScene()
    earlier = {}
    for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode", scene):
        if node.GetAttribute(_SPLIT_FROM) == vectorNode.GetID():
            earlier[int(node.GetAttribute(_COMPONENT))] = node
    voxels = slicer.util.arrayFromVolume(vectorNode)
    split = []
    for component, name in enumerate(names):
        node = earlier.get(component)
        if node is None:
            node = addVolumeLike(vectorNode, voxels[..., component], f"{vectorNode.GetName()} {name}")
            node.SetAttribute(_SPLIT_FROM, vectorNode.GetID())
            node.SetAttribute(_COMPONENT, str(component))
            node.CreateDefaultDisplayNodes()
        split.append(node)
    return split



def guessSequenceVolumes(scene: Any, names: list[str]) -> list[Any]:
    """For each sequence name of the model, the scene's scalar volume that seems to hold it, or None.

    Names are matched as :func:`SegExplainLib.io.imaging.match_names` does: exactly first, then by ending
    (``"4: T2"``, ``"case_1000_T2"``); each volume is used once, so ``T1`` does not take ``T1-20s``.

    Example:
        >>> guessSequenceVolumes(slicer.mrmlScene, ["T2", "T1"])      # volumes "case7_T1", "case7_T2"
        [<vtkMRMLScalarVolumeNode case7_T2>, <vtkMRMLScalarVolumeNode case7_T1>]
    """
    volumes = sequenceVolumes(scene)
    return [volumes[i] if i is not None else None for i in match_names([v.GetName() for v in volumes], names)]


def isSequenceVolume(node: Any) -> bool:
    """Whether a node can be a sequence's input: a scalar volume of a type the selectors list, not made by the module.
    """
    return (any(node.IsA(name) for name in SEQUENCE_VOLUME_TYPES)
            and not any(node.IsA(name) for name in HIDDEN_SEQUENCE_VOLUME_TYPES)
            and node.GetAttribute(ROLE_ATTRIBUTE) is None)


def sequenceVolumes(scene: Any) -> list[Any]:
    """The scene's volumes that can be a sequence's input (:func:`isSequenceVolume`), in scene order."""
    return [node for node in slicer.util.getNodesByClass("vtkMRMLVolumeNode", scene) if isSequenceVolume(node)]


def moduleVolumeIDs(scene: Any) -> list[str]:
    """IDs of the volumes the module made (relevance and overlay volumes), which the selectors' node types alone
    would list: the selectors hide them by ID (``qMRMLSortFilterProxyModel.hiddenNodeIDs``)."""
    return [node.GetID() for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode", scene)
            if node.GetAttribute(ROLE_ATTRIBUTE) is not None]
