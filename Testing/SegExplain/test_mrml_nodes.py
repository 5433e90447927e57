"""SegExplainMRML.nodes: volume nodes to arrays with their geometry, and the user's regions as voxels."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk
from mrml_scene import addVolume
from SegExplainMRML import nodes

from SegExplainLib.errors import SegExplainError
from SegExplainLib.io.imaging import write_volume

#: An oblique direction (a rotation about an oblique axis), as the columns of IJK-to-RAS.
_ANGLE = np.deg2rad(25.0)
_AXIS = np.array([1.0, 2.0, 2.0]) / 3.0
_CROSS = np.array([[0.0, -_AXIS[2], _AXIS[1]], [_AXIS[2], 0.0, -_AXIS[0]], [-_AXIS[1], _AXIS[0], 0.0]])
OBLIQUE = np.eye(3) + np.sin(_ANGLE) * _CROSS + (1 - np.cos(_ANGLE)) * _CROSS @ _CROSS


def rasOfIndex(node, i, j, k):
    """Slicer's own IJK-to-RAS mapping of a voxel index (local frame)."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array(matrix.MultiplyPoint((float(i), float(j), float(k), 1.0))[:3])


def addLabelmap(scene, array, reference, name="lesion"):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    matrix = vtk.vtkMatrix4x4()
    reference.GetIJKToRASMatrix(matrix)
    node.SetIJKToRASMatrix(matrix)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array, dtype=np.uint8))
    return node


def addTranslation(scene, offset):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    for axis in range(3):
        matrix.SetElement(axis, 3, offset[axis])
    transform.SetMatrixTransformToParent(matrix)
    return transform


def addFiducial(scene, point):
    markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "clicks")
    markups.AddControlPointWorld(vtk.vtkVector3d(*point), "P-1")
    return markups


def addRoi(scene, center, size):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(*center)
    roi.SetSize(*size)
    return roi


# ------------------------------------------------------------------------------------------------------- geometry
def test_geometry_of_volume_matches_simpleitk_physical_points(scene, rng, tmp_path):
    """A volume written with geometryOfVolume lies in ITK's LPS space exactly where Slicer shows it in RAS."""
    voxels = rng.normal(size=(5, 6, 7)).astype(np.float32)
    node = addVolume(scene, voxels, spacing=(0.7, 1.3, 2.9), origin=(-31.5, 12.25, 8.0), direction=OBLIQUE)
    path = write_volume(slicer.util.arrayFromVolume(node), nodes.geometryOfVolume(node), tmp_path / "t2.nrrd")
    image = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), voxels)
    for i, j, k in ((0, 0, 0), (6, 0, 0), (0, 5, 0), (0, 0, 4), (3, 2, 1), (6, 5, 4)):
        lps = np.array(image.TransformIndexToPhysicalPoint((i, j, k)))
        np.testing.assert_allclose(lps, rasOfIndex(node, i, j, k) * [-1, -1, 1], atol=1e-6)


def test_geometry_of_volume_rejects_a_labelmap(scene):
    """A labelmap is not an input sequence."""
    reference = addVolume(scene, np.zeros((2, 3, 4)))
    label = addLabelmap(scene, np.ones((2, 3, 4)), reference)
    with pytest.raises(SegExplainError, match="scalar volume.*vtkMRMLLabelMapVolumeNode"):
        nodes.geometryOfVolume(label)


# ------------------------------------------------------------------------------------------------------ stacking
def test_stack_volumes_gives_channels_in_order(scene, rng):
    """Scalar volumes stack to (C, D, H, W) float32 in the given order, named after the nodes by default."""
    arrays = [rng.normal(size=(3, 4, 5)) for _ in range(3)]
    volumes = [addVolume(scene, a, name=n, spacing=(1, 1, 2)) for a, n in zip(arrays, ("T2", "T1", "FLAIR"))]
    stack = nodes.stackVolumes(volumes)
    assert stack.image.shape == (3, 3, 4, 5) and stack.image.dtype == np.float32
    np.testing.assert_array_equal(stack.image, np.stack(arrays).astype(np.float32))
    assert stack.names == ("T2", "T1", "FLAIR")
    assert stack.reference is volumes[0]
    assert stack.geometry.size == (5, 4, 3) and stack.geometry.spacing == (1.0, 1.0, 2.0)
    assert nodes.stackVolumes(volumes, ["a", "b", "c"]).names == ("a", "b", "c")


def test_stack_volumes_leaves_the_scene_voxels_alone(scene, rng):
    """The stacked image is a copy: writing to it does not change the input volumes."""
    arrays = [rng.normal(size=(3, 4, 5)).astype(np.float32) for _ in range(2)]
    volumes = [addVolume(scene, a, name=f"S{c}") for c, a in enumerate(arrays)]
    stack = nodes.stackVolumes(volumes)
    stack.image[...] = 99.0
    for node, array in zip(volumes, arrays):
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), array)


@pytest.mark.parametrize(("field", "change"), [
    ("spacing", {"spacing": (1.0, 1.0, 2.5)}),
    ("origin", {"origin": (0.0, 3.0, 0.0)}),
    ("direction", {"direction": OBLIQUE}),
])
def test_stack_volumes_names_the_node_and_field_of_a_grid_mismatch(scene, field, change):
    """A second sequence off the first one's grid is refused with its name and the field that differs."""
    first = addVolume(scene, np.zeros((3, 4, 5)), name="T2", spacing=(1.0, 1.0, 2.0))
    second = addVolume(scene, np.zeros((3, 4, 5)), name="ADC", **{"spacing": (1.0, 1.0, 2.0), **change})
    with pytest.raises(SegExplainError) as error:
        nodes.stackVolumes([first, second])
    message = str(error.value)
    assert nodes.nodeLabel(second) in message and f"differs in {field}" in message


def test_stack_volumes_names_a_size_mismatch(scene):
    """Volumes of different sizes are refused with 'size'."""
    first = addVolume(scene, np.zeros((3, 4, 5)), name="T2")
    second = addVolume(scene, np.zeros((3, 4, 6)), name="T1")
    with pytest.raises(SegExplainError, match=r"'T1'.*differs in size"):
        nodes.stackVolumes([first, second])


def test_stack_volumes_rejects_bad_inputs(scene):
    """No volume, a labelmap, or a wrong number of names is an error."""
    volume = addVolume(scene, np.zeros((2, 3, 4)), name="T2")
    label = addLabelmap(scene, np.zeros((2, 3, 4)), volume)
    with pytest.raises(SegExplainError, match="at least one"):
        nodes.stackVolumes([])
    with pytest.raises(SegExplainError, match="input volume 2 must be a scalar volume node"):
        nodes.stackVolumes([volume, label])
    with pytest.raises(SegExplainError, match=r"2 sequence names \(a, b\) given for 1 input channels"):
        nodes.stackVolumes([volume], ["a", "b"])


def test_stack_volumes_of_a_vector_volume(scene, rng):
    """A (D, H, W, C) vector volume stacks to (C, D, H, W) with one name per component, as a copy."""
    voxels = rng.normal(size=(3, 4, 5, 3)).astype(np.float32)
    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "DWI")
    vector.SetSpacing(0.5, 0.5, 2.0)
    slicer.util.updateVolumeFromArray(vector, voxels)
    stack = nodes.stackVolumes([vector])
    np.testing.assert_array_equal(stack.image, np.moveaxis(voxels, -1, 0))
    assert stack.names == ("DWI[0]", "DWI[1]", "DWI[2]")
    assert stack.geometry.size == (5, 4, 3) and stack.geometry.spacing == (0.5, 0.5, 2.0)
    stack.image[...] = 0.0
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(vector), voxels)


def test_split_vector_volume_gives_one_scalar_volume_per_sequence_once(scene, rng):
    """A multi-volume becomes per-sequence scalar volumes on its grid; splitting again reuses them."""
    voxels = rng.normal(size=(3, 4, 5, 3)).astype(np.float32)
    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "mpMRI")
    vector.SetSpacing(0.5, 0.5, 2.0)
    vector.SetOrigin(10.0, -3.0, 7.0)
    slicer.util.updateVolumeFromArray(vector, voxels)
    split = nodes.splitVectorVolume(vector, ["T2", "ADC", "DWI"])
    assert [n.GetName() for n in split] == ["mpMRI T2", "mpMRI ADC", "mpMRI DWI"]
    for component, node in enumerate(split):
        assert not node.IsA("vtkMRMLVectorVolumeNode")
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), voxels[..., component])
        np.testing.assert_array_equal(nodes.ijkToRasMatrix(node), nodes.ijkToRasMatrix(vector))
    stack = nodes.stackVolumes(split, ["T2", "ADC", "DWI"])
    np.testing.assert_array_equal(stack.image, np.moveaxis(voxels, -1, 0))
    volumes = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    assert nodes.splitVectorVolume(vector, ["T2", "ADC", "DWI"]) == split
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes


def test_split_vector_volume_needs_one_component_per_sequence(scene, rng):
    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "mpMRI")
    slicer.util.updateVolumeFromArray(vector, rng.normal(size=(3, 4, 5, 2)).astype(np.float32))
    with pytest.raises(SegExplainError, match="has 2 components; the model's sequences are T2, ADC, DWI"):
        nodes.splitVectorVolume(vector, ["T2", "ADC", "DWI"])
    with pytest.raises(SegExplainError, match="must be a vector volume"):
        nodes.splitVectorVolume(addVolume(scene, np.zeros((2, 2, 2))), ["T2"])


def test_stack_volumes_rejects_volumes_under_different_transforms(scene):
    """Sequences under different transforms do not overlay voxel for voxel."""
    first = addVolume(scene, np.zeros((2, 3, 4)), name="T2")
    second = addVolume(scene, np.zeros((2, 3, 4)), name="T1")
    second.SetAndObserveTransformNodeID(addTranslation(scene, (5.0, 0.0, 0.0)).GetID())
    with pytest.raises(SegExplainError, match=r"'T1'.*under another transform"):
        nodes.stackVolumes([first, second])
    first.SetAndObserveTransformNodeID(second.GetParentTransformNode().GetID())
    assert nodes.stackVolumes([first, second]).image.shape == (2, 2, 3, 4)


# ------------------------------------------------------------------------------------------------------ segments
def test_segment_mask_is_the_label_on_the_reference_grid(scene, rng):
    """Each segment imported from a two-label labelmap exports as exactly its label's voxels."""
    reference = addVolume(scene, rng.normal(size=(4, 6, 8)), spacing=(1.5, 1.0, 2.5), origin=(3.0, -4.0, 7.0),
                          direction=OBLIQUE)
    label = np.zeros((4, 6, 8), np.uint8)
    label[1:3, 2:4, 1:3] = 1
    label[2:4, 3:6, 5:8] = 2
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        addLabelmap(scene, label, reference), segmentation)
    segments = segmentation.GetSegmentation()
    assert segments.GetNumberOfSegments() == 2
    for index in range(2):
        segmentId = segments.GetNthSegmentID(index)
        value = segments.GetSegment(segmentId).GetLabelValue()
        mask = nodes.segmentMask(segmentation, segmentId, reference)
        assert mask.dtype == bool
        np.testing.assert_array_equal(mask, label == value)


def test_segment_mask_errors(scene):
    """An unknown segment lists the known ids; a segment outside the reference volume is refused."""
    reference = addVolume(scene, np.zeros((4, 6, 8)))
    label = np.zeros((4, 6, 8), np.uint8)
    label[1:3, 1:3, 1:3] = 1
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        addLabelmap(scene, label, reference), segmentation)
    segmentId = segmentation.GetSegmentation().GetNthSegmentID(0)
    with pytest.raises(SegExplainError, match=f"'nope' is not in .*'{segmentId}'"):
        nodes.segmentMask(segmentation, "nope", reference)
    far = addVolume(scene, np.zeros((4, 6, 8)), name="far", origin=(500.0, 500.0, 500.0))
    with pytest.raises(SegExplainError, match="has no voxel inside 'far'"):
        nodes.segmentMask(segmentation, segmentId, far)
    with pytest.raises(SegExplainError, match="must be a segmentation node"):
        nodes.segmentMask(reference, segmentId, reference)
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 1  # no temporary left


# ---------------------------------------------------------------------------------------------------------- ROIs
def test_roi_index_box_of_an_axis_aligned_roi(scene):
    """The box holds the voxels whose centres lie inside the ROI, in (D, H, W) order, half open."""
    volume = addVolume(scene, np.zeros((10, 12, 14)), spacing=(2.0, 1.0, 3.0), origin=(10.0, -5.0, 4.0))
    low, high = np.array([13.4, -1.3, 9.8]), np.array([20.6, 4.2, 20.2])
    roi = addRoi(scene, (low + high) / 2, high - low)
    # voxel centres x = 10 + 2i, y = -5 + j, z = 4 + 3k inside: i 2..5 (x 14..20), j 4..9 (y -1..4), k 2..5 (z 10..19)
    expected = (2, 4, 2, 6, 10, 6)
    assert nodes.roiIndexBox(roi, volume) == expected


def test_roi_index_box_is_clipped_to_the_volume(scene):
    """An ROI reaching past the volume gives the box up to the volume's edge."""
    volume = addVolume(scene, np.zeros((4, 5, 6)))
    roi = addRoi(scene, (4.0, 1.0, 0.0), (6.0, 6.0, 20.0))  # x 1..7, y -2..4, z -10..10
    assert nodes.roiIndexBox(roi, volume) == (0, 0, 1, 4, 5, 6)


def test_roi_index_box_follows_the_volume_transform(scene):
    """The ROI is in world coordinates: for a translated volume the box moves by the translation in voxels."""
    volume = addVolume(scene, np.zeros((10, 10, 10)), spacing=(2.0, 2.0, 2.0))
    roi = addRoi(scene, (9.0, 9.0, 9.0), (5.0, 5.0, 5.0))
    before = np.array(nodes.roiIndexBox(roi, volume))
    volume.SetAndObserveTransformNodeID(addTranslation(scene, (4.0, -6.0, 2.0)).GetID())
    shift = np.array([2.0, -6.0, 4.0]) / 2.0  # (z, y, x) in voxels
    assert tuple(nodes.roiIndexBox(roi, volume)) == tuple(before - np.tile(shift, 2).astype(int))


def test_roi_index_box_of_a_rotated_roi(scene):
    """An ROI under a 90 degree rotation about S gives the box of its rotated corners (its sides swap)."""
    volume = addVolume(scene, np.zeros((10, 20, 20)))
    roi = addRoi(scene, (0.0, 0.0, 0.0), (4.0, 10.0, 2.0))
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "turn")
    turn = vtk.vtkTransform()
    turn.Translate(10.0, 10.0, 5.0)
    turn.RotateZ(90.0)
    transform.SetMatrixTransformToParent(turn.GetMatrix())
    roi.SetAndObserveTransformNodeID(transform.GetID())
    assert nodes.roiIndexBox(roi, volume) == (4, 8, 5, 7, 13, 16)  # x 5..15, y 8..12, z 4..6 in world


def test_roi_index_box_errors(scene):
    """An ROI off the volume, or a node that is not an ROI, is refused."""
    volume = addVolume(scene, np.zeros((4, 5, 6)))
    with pytest.raises(SegExplainError, match="does not overlap"):
        nodes.roiIndexBox(addRoi(scene, (100.0, 0.0, 0.0), (4.0, 4.0, 4.0)), volume)
    with pytest.raises(SegExplainError, match="must be a markups ROI node"):
        nodes.roiIndexBox(addFiducial(scene, (1.0, 1.0, 1.0)), volume)


# -------------------------------------------------------------------------------------------------------- points
def test_clicked_point_inside_and_outside(scene):
    """A point in the volume comes back as its RAS position; one outside or a bad index is refused."""
    volume = addVolume(scene, np.zeros((4, 5, 6)), spacing=(2.0, 2.0, 3.0), origin=(-5.0, 0.0, 1.0))
    markups = addFiducial(scene, (1.0, 4.5, 7.2))
    np.testing.assert_allclose(nodes.clickedPoint(markups, 0, volume), (1.0, 4.5, 7.2))
    markups.AddControlPointWorld(vtk.vtkVector3d(-5.0, 0.0, 50.0), "P-2")
    with pytest.raises(SegExplainError, match=r"'P-2' .* lies outside .* \(voxel \(16, 0, 0\) for a grid of \(4, 5, 6\)"):
        nodes.clickedPoint(markups, 1, volume)
    with pytest.raises(SegExplainError, match="point index 2 is out of range"):
        nodes.clickedPoint(markups, 2, volume)
    with pytest.raises(SegExplainError, match="must be a markups node"):
        nodes.clickedPoint(volume, 0, volume)


def test_points_under_a_linear_transform(scene):
    """Under a translation, a world point maps to the index of the point minus the translation, in local RAS."""
    volume = addVolume(scene, np.zeros((6, 7, 8)), spacing=(1.5, 1.0, 2.0), origin=(2.0, -3.0, 1.0),
                       direction=OBLIQUE)
    offset = np.array([7.0, -2.5, 4.0])
    volume.SetAndObserveTransformNodeID(addTranslation(scene, offset).GetID())
    world = rasOfIndex(volume, 3.25, 2.5, 1.75) + offset
    rasToIjk = vtk.vtkMatrix4x4()
    volume.GetRASToIJKMatrix(rasToIjk)
    ijk = np.array(rasToIjk.MultiplyPoint((*(world - offset), 1.0))[:3])
    np.testing.assert_allclose(nodes.worldToIndex(volume, world), ijk[::-1], atol=1e-9)
    np.testing.assert_allclose(nodes.worldToIndex(volume, world), (1.75, 2.5, 3.25), atol=1e-9)
    np.testing.assert_allclose(nodes.clickedPoint(addFiducial(scene, world), 0, volume), world - offset, atol=1e-9)


@pytest.mark.parametrize("kind", ["grid", "thin plate spline"])
def test_non_linear_transforms_are_refused(scene, kind):
    """A volume under a non-linear transform has no single local frame: harden first."""
    volume = addVolume(scene, np.zeros((4, 5, 6)))
    if kind == "grid":
        transform = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    else:
        source, target = vtk.vtkPoints(), vtk.vtkPoints()
        for point in ((0, 0, 0), (10, 0, 0), (0, 10, 0), (0, 0, 10)):
            source.InsertNextPoint(point)
            target.InsertNextPoint(point[0] + 1.0, point[1], point[2])
        spline = vtk.vtkThinPlateSplineTransform()
        spline.SetSourceLandmarks(source)
        spline.SetTargetLandmarks(target)
        spline.SetBasisToR()
        transform = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
        transform.SetAndObserveTransformToParent(spline)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(SegExplainError, match="non-linear transform 'warp'"):
        nodes.worldToIndex(volume, (1.0, 1.0, 1.0))
    with pytest.raises(SegExplainError, match="non-linear"):
        nodes.clickedPoint(addFiducial(scene, (1.0, 1.0, 1.0)), 0, volume)


# ------------------------------------------------------------------------------------------------------ results
def test_add_volume_like_copies_grid_and_transform(scene, rng):
    """A result volume gets the reference's IJK-to-RAS and parent transform, and a fresh name each time."""
    reference = addVolume(scene, np.zeros((3, 4, 5)), spacing=(0.8, 1.1, 2.5), origin=(4.0, -2.0, 9.0),
                          direction=OBLIQUE)
    reference.SetAndObserveTransformNodeID(addTranslation(scene, (1.0, 2.0, 3.0)).GetID())
    array = rng.normal(size=(3, 4, 5)).astype(np.float32)
    first = nodes.addVolumeLike(reference, array, "relevance")
    second = nodes.addVolumeLike(reference, array, "relevance")
    assert first.GetName() != second.GetName()
    for node in (first, second):
        assert node.GetParentTransformNode() is reference.GetParentTransformNode()
        np.testing.assert_array_equal(nodes.ijkToRasMatrix(node), nodes.ijkToRasMatrix(reference))
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), array)
    with pytest.raises(SegExplainError, match=r"shape \(3, 4, 6\) does not fit the grid \(3, 4, 5\)"):
        nodes.addVolumeLike(reference, np.zeros((3, 4, 6)), "bad")


def test_guess_sequence_volumes_matches_names_once_each(scene):
    """Exact names first, then names ending in the sequence after a separator; each volume once; others stay None."""
    for name in ("case7_T1-20s", "case7_T1", "4: T2", "T2 registered", "ADCmap"):
        addVolume(scene, np.zeros((2, 2, 2)), name=name)
    guessed = nodes.guessSequenceVolumes(scene, ["T2", "T1", "T1-20s", "ADC"])
    assert [v.GetName() if v else None for v in guessed] == ["4: T2", "case7_T1", "case7_T1-20s", None]
    exact = addVolume(scene, np.zeros((2, 2, 2)), name="t2")
    assert nodes.guessSequenceVolumes(scene, ["T2"]) == [exact]


def _listedBySelector(scene, nodeTypes, hideChildNodeTypes, hiddenNodeIDs):
    """The volumes a qMRMLNodeComboBox lists, by qMRMLSortFilterProxyModel::filterAcceptsNode's rules (hidden IDs,
    a node type the node IsA, none of the hidden child types; showChildNodeTypes on, as by default)."""
    return [node.GetName() for node in slicer.util.getNodesByClass("vtkMRMLVolumeNode", scene)
            if node.GetID() not in hiddenNodeIDs and any(node.IsA(t) for t in nodeTypes)
            and not any(node.IsA(t) for t in hideChildNodeTypes)]


def test_sequence_selectors_list_scalar_volumes_only(scene):
    """Label maps, vector (multi-component), DTI and DWI volumes and the module's relevance and overlay volumes are
    no sequence's input: the selectors do not list them and no name guess picks them."""
    addVolume(scene, np.zeros((2, 2, 2)), name="T2")
    for className in ("vtkMRMLLabelMapVolumeNode", "vtkMRMLVectorVolumeNode", "vtkMRMLDiffusionTensorVolumeNode",
                      "vtkMRMLDiffusionWeightedVolumeNode"):
        scene.AddNewNodeByClass(className, f"{className} T1")
    for role in ("relevance", "overlay"):
        addVolume(scene, np.zeros((2, 2, 2)), name=f"{role} T1").SetAttribute(nodes.ROLE_ATTRIBUTE, role)
    assert [node.GetName() for node in nodes.sequenceVolumes(scene)] == ["T2"]
    assert _listedBySelector(scene, nodes.SEQUENCE_VOLUME_TYPES, nodes.HIDDEN_SEQUENCE_VOLUME_TYPES,
                             nodes.moduleVolumeIDs(scene)) == ["T2"]
    assert nodes.guessSequenceVolumes(scene, ["T2", "T1"]) == [scene.GetFirstNodeByName("T2"), None]
    for name in (*nodes.SEQUENCE_VOLUME_TYPES, *nodes.HIDDEN_SEQUENCE_VOLUME_TYPES):
        assert getattr(slicer, name)().IsA("vtkMRMLVolumeNode"), name  # a real class of Slicer
