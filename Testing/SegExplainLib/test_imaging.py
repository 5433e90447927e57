"""Image files and coordinates: round trips with oblique anisotropic grids, grid checks, resampling, atomic writes.

SimpleITK itself is the oracle: files are written and read back with it, and indices are compared with its
``TransformPhysicalPointToIndex``.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SegExplainLib.errors import SegExplainError
from SegExplainLib.io.imaging import (
    MAX_VOXELS,
    Geometry,
    box_to_index,
    check_self_contained,
    index_to_physical,
    physical_to_index,
    read_geometry,
    read_label,
    read_sequences,
    write_maps,
    write_volume,
)

SUFFIXES = (".nii.gz", ".nrrd", ".mha")
SPACING = (0.8, 0.8, 3.0)
ORIGIN = (12.5, -40.25, 7.0)
SIZE = (7, 6, 5)        # x, y, z -> arrays (5, 6, 7)


def _rotation(z_degrees: float, x_degrees: float) -> tuple[float, ...]:
    """An oblique direction: a rotation about z followed by a tilt about x (row-major 3x3)."""
    a, b = math.radians(z_degrees), math.radians(x_degrees)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return tuple((rx @ rz).ravel())


DIRECTION = _rotation(30.0, 10.0)


def _image(array: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=DIRECTION) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


@pytest.fixture
def geometry() -> Geometry:
    return Geometry(SPACING, ORIGIN, DIRECTION, SIZE)


@pytest.fixture
def volume(rng) -> np.ndarray:
    return rng.normal(size=SIZE[::-1]).astype(np.float32)


def _listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------------------------------------- geometry

def test_geometry_of_apply_and_dict(geometry):
    image = _image(np.zeros(SIZE[::-1], np.float32))
    assert Geometry.of(image) == geometry
    assert geometry.shape == (5, 6, 7)
    copy = geometry.apply(sitk.Image(list(SIZE), sitk.sitkFloat32))
    np.testing.assert_allclose(copy.GetDirection(), DIRECTION, atol=1e-12)
    np.testing.assert_allclose(copy.GetSpacing(), SPACING)
    np.testing.assert_allclose(copy.GetOrigin(), ORIGIN)
    assert Geometry(**json.loads(json.dumps(geometry.to_dict()))) == geometry
    nudged = Geometry(SPACING, (ORIGIN[0] + 1e-7, *ORIGIN[1:]), DIRECTION, SIZE)
    assert geometry.matches(nudged) and not geometry.matches(nudged, tolerance=0.0)
    shifted = Geometry(SPACING, (ORIGIN[0] + 0.1, *ORIGIN[1:]), DIRECTION, SIZE)
    assert geometry.differences(shifted) == ["origin"]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"spacing": (0.8, -0.8, 3.0)}, r"spacing must be 3 positive numbers \(mm\), got \(0\.8, -0\.8, 3\.0\)"),
    ({"origin": (1.0, 2.0)}, r"origin must be 3 finite numbers, got \(1\.0, 2\.0\)"),
    ({"direction": (0.0,) * 9}, r"direction must be an invertible 3x3 matrix"),
    ({"size": (7, 0, 5)}, r"size must be 3 positive integers \(x, y, z\), got \(7, 0, 5\)"),
])
def test_geometry_rejects_bad_fields(kwargs, match):
    fields = {"spacing": SPACING, "origin": ORIGIN, "direction": DIRECTION, "size": SIZE, **kwargs}
    with pytest.raises(SegExplainError, match=match):
        Geometry(**fields)


def test_geometry_apply_rejects_other_size(geometry):
    with pytest.raises(SegExplainError, match=r"image size \(3, 3, 3\) does not match the geometry's size \(7, 6, 5\)"):
        geometry.apply(sitk.Image([3, 3, 3], sitk.sitkFloat32))


# ------------------------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("suffix", SUFFIXES)
def test_write_volume_round_trip_keeps_oblique_anisotropic_geometry(tmp_path, geometry, volume, suffix):
    path = write_volume(volume, geometry, tmp_path / f"map{suffix}")
    assert _listing(tmp_path) == [f"map{suffix}"]              # no temporary file left behind
    back = sitk.ReadImage(str(path))
    np.testing.assert_allclose(back.GetSpacing(), SPACING, atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), ORIGIN, atol=1e-5)
    np.testing.assert_allclose(back.GetDirection(), DIRECTION, atol=1e-5)
    assert back.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), volume)
    image, read_geometry = read_sequences([path])
    assert image.shape == (1, *volume.shape) and image.dtype == np.float32
    np.testing.assert_array_equal(image[0], volume)
    assert read_geometry.matches(geometry)


def test_read_sequences_stacks_files_of_any_format_as_float32(tmp_path, rng):
    arrays = [rng.integers(-500, 3000, size=SIZE[::-1]).astype(np.int16) for _ in SUFFIXES]
    paths = []
    for n, (array, suffix) in enumerate(zip(arrays, SUFFIXES)):
        paths.append(tmp_path / f"seq{n}{suffix}")
        sitk.WriteImage(_image(array), str(paths[-1]))
    image, geometry = read_sequences(paths)
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image, np.stack(arrays).astype(np.float32))
    np.testing.assert_allclose(geometry.direction, DIRECTION, atol=1e-5)
    np.testing.assert_allclose(geometry.origin, ORIGIN, atol=1e-5)


def test_read_sequences_splits_a_4d_file_and_a_vector_image(tmp_path, rng):
    channels = [rng.normal(size=SIZE[::-1]).astype(np.float32) for _ in range(3)]
    stack = sitk.JoinSeries([_image(c) for c in channels])            # 4D (x, y, z, c)
    assert stack.GetDimension() == 4
    sitk.WriteImage(stack, str(tmp_path / "stack.nii.gz"))
    image, geometry = read_sequences([tmp_path / "stack.nii.gz"])
    np.testing.assert_array_equal(image, np.stack(channels))
    assert geometry.matches(Geometry(SPACING, ORIGIN, DIRECTION, SIZE))
    vector = _image(np.stack(channels, axis=-1))                         # (z, y, x, c) -> vector pixels
    assert vector.GetNumberOfComponentsPerPixel() == 3
    sitk.WriteImage(vector, str(tmp_path / "vector.nrrd"))
    image, _ = read_sequences([str(tmp_path / "vector.nrrd"), tmp_path / "stack.nii.gz"])
    np.testing.assert_array_equal(image, np.stack(channels + channels))


@pytest.mark.parametrize(("change", "field"), [
    ({"spacing": (0.8, 0.8, 2.5)}, "spacing"),
    ({"origin": (12.5, -40.25, 9.0)}, "origin"),
    ({"direction": _rotation(31.0, 10.0)}, "direction"),
])
def test_read_sequences_names_the_file_and_the_field_that_differs(tmp_path, volume, change, field):
    sitk.WriteImage(_image(volume), str(tmp_path / "t1.nii.gz"))
    sitk.WriteImage(_image(volume, **change), str(tmp_path / "flair.mha"))
    with pytest.raises(SegExplainError, match=rf"sequence file '.*flair\.mha' is not on the grid of '.*t1\.nii\.gz': "
                                              rf"{field} .*; pass resample=True"):
        read_sequences([tmp_path / "t1.nii.gz", tmp_path / "flair.mha"])


def test_read_sequences_names_a_size_mismatch(tmp_path, volume):
    sitk.WriteImage(_image(volume), str(tmp_path / "t1.nrrd"))
    sitk.WriteImage(_image(volume[:, :, :4]), str(tmp_path / "t2.nrrd"))
    with pytest.raises(SegExplainError, match=r"'.*t2\.nrrd' .*: size \(4, 6, 5\) instead of \(7, 6, 5\)"):
        read_sequences([tmp_path / "t1.nrrd", tmp_path / "t2.nrrd"])


def test_resample_true_matches_sitk_resample(tmp_path, volume):
    first, second = _image(volume), _image(volume[::-1].copy(), origin=(13.1, -39.9, 8.2))
    sitk.WriteImage(first, str(tmp_path / "t1.nii.gz"))
    sitk.WriteImage(second, str(tmp_path / "adc.mha"))
    with pytest.warns(UserWarning, match=r"resampled '.*adc\.mha' onto the grid of '.*t1\.nii\.gz' \(linear; origin"):
        image, _ = read_sequences([tmp_path / "t1.nii.gz", tmp_path / "adc.mha"], resample=True)
    expected = sitk.Resample(second, first, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    np.testing.assert_array_equal(image[0], volume)
    np.testing.assert_allclose(image[1], sitk.GetArrayFromImage(expected), atol=1e-5)


def test_resample_by_one_voxel_shifts_the_array(tmp_path, volume):
    """Independent of SimpleITK's resampler: an origin one voxel further along x shifts the data by one column."""
    axis_aligned = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
    sitk.WriteImage(_image(volume, direction=axis_aligned), str(tmp_path / "a.nrrd"))
    moved = (ORIGIN[0] + SPACING[0], *ORIGIN[1:])
    sitk.WriteImage(_image(volume, origin=moved, direction=axis_aligned), str(tmp_path / "b.nrrd"))
    with pytest.warns(UserWarning):
        image, _ = read_sequences([tmp_path / "a.nrrd", tmp_path / "b.nrrd"], resample=True)
    np.testing.assert_allclose(image[1][:, :, 1:], volume[:, :, :-1], atol=1e-5)
    np.testing.assert_array_equal(image[1][:, :, 0], 0.0)


# ------------------------------------------------------------------------------------------------------------ labels

def test_read_label_on_the_grid_and_resampled_nearest(tmp_path, geometry, rng):
    labels = rng.choice(np.array([0, 2, 5], np.uint8), size=SIZE[::-1])
    sitk.WriteImage(_image(labels), str(tmp_path / "seg.nii.gz"))
    read = read_label(tmp_path / "seg.nii.gz", geometry)
    assert read.dtype == np.int64
    np.testing.assert_array_equal(read, labels)
    coarse = _image(labels, spacing=(1.3, 1.1, 2.0), origin=(12.0, -41.0, 6.0))
    sitk.WriteImage(coarse, str(tmp_path / "coarse.nrrd"))
    with pytest.raises(SegExplainError, match=r"label file '.*coarse\.nrrd' is not on the image grid: spacing"):
        read_label(tmp_path / "coarse.nrrd", geometry)
    with pytest.warns(UserWarning, match="nearest neighbour"):
        resampled = read_label(tmp_path / "coarse.nrrd", geometry, resample=True)
    assert resampled.shape == geometry.shape
    assert set(np.unique(resampled)) <= {0, 2, 5} and set(np.unique(resampled)) > {0}
    reference = sitk.Image(list(SIZE), sitk.sitkUInt8)
    geometry.apply(reference)
    expected = sitk.Resample(coarse, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    np.testing.assert_array_equal(resampled, sitk.GetArrayFromImage(expected))


def test_read_label_rejects_fractional_labels(tmp_path, geometry):
    sitk.WriteImage(_image(np.full(SIZE[::-1], 0.5, np.float32)), str(tmp_path / "prob.nii.gz"))
    with pytest.raises(SegExplainError, match=r"label file '.*prob\.nii\.gz' holds non-integer values"):
        read_label(tmp_path / "prob.nii.gz", geometry)


# --------------------------------------------------------------------------------------------------- bad input files

def test_missing_unreadable_and_non_3d_files(tmp_path, geometry):
    with pytest.raises(SegExplainError, match=r"sequence file '.*nothere\.nii\.gz' does not exist"):
        read_sequences([tmp_path / "nothere.nii.gz"])
    with pytest.raises(SegExplainError, match=r"label file '.*nolabel\.nrrd' does not exist"):
        read_label(tmp_path / "nolabel.nrrd", geometry)
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    with pytest.raises(SegExplainError, match=r"could not read sequence file '.*junk\.nii\.gz' as an image: [^\n]+$"):
        read_sequences([tmp_path / "junk.nii.gz"])
    sitk.WriteImage(sitk.Image([4, 5], sitk.sitkFloat32), str(tmp_path / "slice.mha"))
    with pytest.raises(SegExplainError, match=r"'.*slice\.mha' is a 2D image of size \(4, 5\); expected a 3D"):
        read_sequences([tmp_path / "slice.mha"])
    with pytest.raises(SegExplainError, match=r"label file '.*slice\.mha' is a 2D image"):
        read_label(tmp_path / "slice.mha", geometry)


def test_read_sequences_rejects_bad_arguments(tmp_path, volume):
    sitk.WriteImage(_image(volume), str(tmp_path / "t1.nrrd"))
    with pytest.raises(SegExplainError, match=r"paths must be a non-empty list of image files .*got '.*t1\.nrrd'"):
        read_sequences(str(tmp_path / "t1.nrrd"))
    with pytest.raises(SegExplainError, match=r"paths must be a non-empty list .*got \[\]"):
        read_sequences([])
    with pytest.raises(SegExplainError, match=r"resample must be True or False, got 'yes'"):
        read_sequences([tmp_path / "t1.nrrd"], resample="yes")
    with pytest.raises(SegExplainError, match=r"tolerance must be a non-negative number, got -1"):
        read_sequences([tmp_path / "t1.nrrd"], tolerance=-1)


# ------------------------------------------------------------------------------------- header first, voxel limit

def _header_only(path, size, *, origin=ORIGIN, encoding="gzip", kind="uint8") -> None:
    """A NRRD header declaring a volume of ``size`` (x, y, z) voxels on the test grid, with no voxels after it.

    Only a reader that checks the header before decoding can refuse such a file for its size or grid; one that
    decodes first says it could not read it.
    """
    rows = np.reshape(DIRECTION, (3, 3)) * np.asarray(SPACING)[None, :]  # column j: the LPS step of axis j
    steps = " ".join(f"({','.join(f'{v:.17g}' for v in rows[:, j])})" for j in range(3))
    path.write_text(f"NRRD0004\ntype: {kind}\ndimension: 3\nspace: left-posterior-superior\n"
                    f"sizes: {' '.join(str(n) for n in size)}\nspace directions: {steps}\n"
                    f"space origin: ({','.join(str(v) for v in origin)})\nencoding: {encoding}\n\n")


def test_a_file_over_the_voxel_limit_is_refused_from_its_header(tmp_path, geometry):
    """1000^3 voxels (a gzip of a few MB) are refused before a byte of them is decoded, as a sequence and a label."""
    _header_only(tmp_path / "huge.nrrd", (1000, 1000, 1000))
    limit = rf"holds 1000000000 voxels \(1000 x 1000 x 1000\); the limit is max_voxels={MAX_VOXELS}"
    with pytest.raises(SegExplainError, match=rf"sequence file '.*huge\.nrrd' {limit}"):
        read_sequences([tmp_path / "huge.nrrd"])
    with pytest.raises(SegExplainError, match=rf"label file '.*huge\.nrrd' {limit}"):
        read_label(tmp_path / "huge.nrrd", geometry, resample=True)
    with pytest.raises(SegExplainError, match=limit):
        read_geometry(tmp_path / "huge.nrrd")


def test_the_voxel_limit_is_an_option_and_counts_channels(tmp_path, volume, rng):
    sitk.WriteImage(_image(volume), str(tmp_path / "t1.nrrd"))
    assert read_sequences([tmp_path / "t1.nrrd"], max_voxels=volume.size)[0].shape == (1, *volume.shape)
    with pytest.raises(SegExplainError, match=rf"holds {volume.size} voxels .*; the limit is max_voxels=100"):
        read_sequences([tmp_path / "t1.nrrd"], max_voxels=100)
    stack = rng.normal(size=(3, *volume.shape)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(stack, isVector=False), str(tmp_path / "stack.nrrd"))
    with pytest.raises(SegExplainError, match=rf"holds {stack.size} voxels \(7 x 6 x 5 x 3\)"):
        read_sequences([tmp_path / "stack.nrrd"], max_voxels=stack.size - 1)
    for bad in (0, -5, 2.5, True, "10"):
        with pytest.raises(SegExplainError, match=rf"max_voxels must be a positive integer, got {re.escape(repr(bad))}"):
            read_sequences([tmp_path / "t1.nrrd"], max_voxels=bad)


def test_a_file_off_the_grid_is_refused_from_its_header(tmp_path, geometry, volume):
    """The grid is compared before the voxels are decoded: a header alone is enough to refuse another grid."""
    sitk.WriteImage(_image(volume), str(tmp_path / "t1.nrrd"))
    _header_only(tmp_path / "moved.nrrd", SIZE, origin=(0.0, 0.0, 0.0))
    _header_only(tmp_path / "larger.nrrd", (700, 600, 500))
    with pytest.raises(SegExplainError, match=r"'.*moved\.nrrd' is not on the grid of '.*t1\.nrrd': origin"):
        read_sequences([tmp_path / "t1.nrrd", tmp_path / "moved.nrrd"])
    with pytest.raises(SegExplainError, match=r"label file '.*larger\.nrrd' is not on the image grid: size"):
        read_label(tmp_path / "larger.nrrd", geometry)
    assert read_geometry(tmp_path / "larger.nrrd").size == (700, 600, 500)
    assert read_geometry(tmp_path / "t1.nrrd").matches(geometry)


# ----------------------------------------------------------------------------------------------------------- writing

def test_write_maps_one_file_per_channel(tmp_path, geometry, rng):
    maps = torch.from_numpy(rng.normal(size=(2, *SIZE[::-1])))        # float64 tensor, as from explain(dtype=float64)
    paths = write_maps(maps, geometry, tmp_path / "out", ["t1", "flair"], suffix=".nrrd")
    assert [p.name for p in paths] == ["relevance_t1.nrrd", "relevance_flair.nrrd"]
    assert _listing(tmp_path / "out") == ["relevance_flair.nrrd", "relevance_t1.nrrd"]
    for channel, path in zip(maps.numpy(), paths):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), channel.astype(np.float32))


@pytest.mark.parametrize(("names", "match"), [
    (["t1"], r"names must be a list of 2 names, one per channel of maps, got \['t1'\]"),
    (["t1", "../t2"], r"channel name '\.\./t2' cannot be part of a file name"),
    (["t1", "t1"], r"channel names must be unique, got \['t1', 't1'\]"),
])
def test_write_maps_rejects_bad_names(tmp_path, geometry, names, match):
    with pytest.raises(SegExplainError, match=match):
        write_maps(np.zeros((2, *SIZE[::-1])), geometry, tmp_path, names)


def test_write_rejects_bad_shapes_and_suffixes(tmp_path, geometry, volume):
    with pytest.raises(SegExplainError, match=r"cannot write '.*map\.mhd': expected a file name ending in one of "
                                              r"\.nii\.gz, \.nii, \.nrrd, \.mha"):
        write_volume(volume, geometry, tmp_path / "map.mhd")
    with pytest.raises(SegExplainError, match=r"array shape \(2, 5, 6, 7\) is not the grid's \(D, H, W\) "
                                              r"\(5, 6, 7\); write one file per channel with write_maps"):
        write_volume(np.stack([volume, volume]), geometry, tmp_path / "map.nii.gz")
    with pytest.raises(SegExplainError, match=r"the folder '.*missing' does not exist"):
        write_volume(volume, geometry, tmp_path / "missing" / "map.nii.gz")
    with pytest.raises(SegExplainError, match=r"suffix must be one of .*, got '\.png'"):
        write_maps(volume[None], geometry, tmp_path, ["t1"], suffix=".png")
    assert _listing(tmp_path) == []


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, geometry, volume, monkeypatch):
    target = tmp_path / "relevance_t1.nii.gz"
    write_volume(volume, geometry, target)
    before = target.read_bytes()
    written = []

    def broken_writer(image, path, *args, **kwargs):
        written.append(path)
        with open(path, "wb") as handle:
            handle.write(b"half a volume")
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute:\nNo space left on device")

    monkeypatch.setattr(sitk, "WriteImage", broken_writer)
    with pytest.raises(SegExplainError, match=r"^could not write '.*relevance_t1\.nii\.gz': No space left on device$"):
        write_volume(volume * 2, geometry, target)
    assert written and os.path.dirname(written[0]) == str(tmp_path) and written[0] != str(target)
    assert target.read_bytes() == before
    assert _listing(tmp_path) == ["relevance_t1.nii.gz"]


# ------------------------------------------------------------------------------------------------------- coordinates

def test_physical_to_index_agrees_with_sitk_in_lps_and_ras(geometry, rng):
    image = geometry.apply(sitk.Image(list(SIZE), sitk.sitkFloat32))
    for _ in range(50):
        continuous = rng.uniform(-0.49, np.asarray(SIZE) - 0.51)
        lps = image.TransformContinuousIndexToPhysicalPoint(continuous.tolist())
        x, y, z = image.TransformPhysicalPointToIndex(lps)
        assert physical_to_index(lps, geometry, frame="lps") == (z, y, x)
        ras = (-lps[0], -lps[1], lps[2])
        assert physical_to_index(ras, geometry, frame="ras") == (z, y, x)
        back = index_to_physical((z, y, x), geometry, frame="ras")
        expected = image.TransformIndexToPhysicalPoint((x, y, z))
        np.testing.assert_allclose(back, (-expected[0], -expected[1], expected[2]), atol=1e-9)


def test_points_and_indices_outside_the_volume_are_named(geometry):
    with pytest.raises(SegExplainError, match=r"point \(1000, 0, 0\) \(RAS\) lies outside the volume"):
        physical_to_index((1000.0, 0.0, 0.0), geometry, frame="ras")
    with pytest.raises(SegExplainError, match=r"index \(d, h, w\) \(5, 0, 0\) lies outside the volume of shape "
                                              r"\(5, 6, 7\)"):
        index_to_physical((5, 0, 0), geometry, frame="lps")
    with pytest.raises(SegExplainError, match=r"frame must be one of \('ras', 'lps'\) .*got 'RAS'"):
        physical_to_index(ORIGIN, geometry, frame="RAS")
    with pytest.raises(SegExplainError, match=r"point must be 3 finite numbers, got \(1\.0, nan, 2\.0\)"):
        physical_to_index((1.0, float("nan"), 2.0), geometry, frame="lps")


def test_box_to_index_on_an_axis_aligned_grid(rng):
    flipped = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)      # a typical NIfTI-from-DICOM grid: RAS-aligned axes
    geometry = Geometry(SPACING, ORIGIN, flipped, SIZE)
    image = geometry.apply(sitk.Image(list(SIZE), sitk.sitkFloat32))
    a_lps = image.TransformContinuousIndexToPhysicalPoint((5.2, 0.8, 3.9))
    b_lps = image.TransformContinuousIndexToPhysicalPoint((1.7, 4.1, 1.2))
    a_ras, b_ras = (-a_lps[0], -a_lps[1], a_lps[2]), (-b_lps[0], -b_lps[1], b_lps[2])
    assert box_to_index(a_ras, b_ras, geometry, frame="ras") == ((1, 1, 2), (5, 5, 6))
    assert box_to_index(b_lps, a_lps, geometry, frame="lps") == ((1, 1, 2), (5, 5, 6))


def test_box_to_index_covers_every_voxel_centre_in_an_oblique_box(geometry):
    image = geometry.apply(sitk.Image(list(SIZE), sitk.sitkFloat32))
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint((3.0, 2.5, 2.0)))
    a, b = centre - (1.2, 0.9, 1.5), centre + (1.0, 1.1, 1.4)
    start, stop = box_to_index(a, b, geometry, frame="lps")
    inside = 0
    for x in range(SIZE[0]):
        for y in range(SIZE[1]):
            for z in range(SIZE[2]):
                point = np.array(image.TransformIndexToPhysicalPoint((x, y, z)))
                if np.all(point >= a) and np.all(point <= b):
                    inside += 1
                    assert all(lo <= i < hi for lo, i, hi in zip(start, (z, y, x), stop))
    assert inside > 0
    # tight: every face of the voxel box holds the voxel of one of the eight corners of the physical box
    corners = [np.where([i, j, k], b, a) for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    voxels = np.array([image.TransformPhysicalPointToIndex(c.tolist())[::-1] for c in corners])
    assert tuple(voxels.min(axis=0)) == start and tuple(voxels.max(axis=0) + 1) == stop


def test_box_to_index_names_the_corner_outside(geometry):
    with pytest.raises(SegExplainError, match=r"corner_b \(500, 500, 500\) \(LPS\) lies outside the volume"):
        box_to_index(ORIGIN, (500.0, 500.0, 500.0), geometry, frame="lps")


def test_messages_are_one_line(tmp_path, geometry):
    with pytest.raises(SegExplainError) as info:
        read_sequences([tmp_path / "nothere.nrrd"])
    assert not re.search(r"\n", str(info.value))


def test_half_way_points_round_up_like_itk():
    geometry = Geometry((0.5, 0.25, 2.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), (6, 6, 6))
    image = geometry.apply(sitk.Image([6, 6, 6], sitk.sitkFloat32))
    for point in [(1.25, 0.625, 5.0), (0.75, 0.125, 3.0), (-0.25, -0.125, -1.0)]:   # continuous index 2.5 / 1.5 / -0.5
        x, y, z = image.TransformPhysicalPointToIndex(point)
        assert physical_to_index(point, geometry, frame="lps") == (z, y, x)


def test_match_names_prefers_exact_then_suffix_and_uses_each_candidate_once():
    from SegExplainLib.io.imaging import match_names

    candidates = ["case7_T1-20s", "case7_T1", "4: T2", "T2 registered", "ADCmap", "t1-20S"]
    assert match_names(candidates, ["T2", "T1", "T1-20s", "ADC"]) == [2, 1, 5, None]
    assert match_names(candidates[:2], ["T1-20s", "T1"]) == [0, 1]
    assert match_names(["T1", "x_T1"], ["T1", "T1"]) == [0, 1]
    assert match_names([], ["T2"]) == [None]


def test_image_stem_strips_an_image_ending_only():
    from SegExplainLib.io.imaging import image_stem

    assert [image_stem(n) for n in ("T1-20s.nii.gz", "flair.nii", "t2.nrrd", "adc.mha", "notes.txt", "T2.gz")] == [
        "T1-20s", "flair", "t2", "adc", None, None]


def test_geometry_from_ijk_to_ras_places_voxels_where_the_matrix_does():
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = rotation * np.array([0.8, 0.9, 3.0])[None, :]
    ijk_to_ras[:3, 3] = (-12.0, 30.0, 5.0)
    geometry = Geometry.from_ijk_to_ras(ijk_to_ras, (10, 11, 12))
    assert geometry.size == (10, 11, 12) and geometry.spacing == pytest.approx((0.8, 0.9, 3.0))
    for ijk in ((0, 0, 0), (3, 7, 2), (8.5, 0.0, 11.0)):
        expected = (ijk_to_ras @ np.array([*ijk, 1.0]))[:3]
        np.testing.assert_allclose(index_to_physical(ijk[::-1], geometry, frame="ras"), expected, atol=1e-9)
    with pytest.raises(SegExplainError, match="4x4 matrix, got shape \\(3, 3\\)"):
        Geometry.from_ijk_to_ras(np.eye(3), (1, 1, 1))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_nan_and_inf_voxels_are_refused_naming_the_file_in_every_format(tmp_path, suffix):
    """NIfTI's reader turns NaN and Inf into 0, so for .nii(.gz) they are counted in the file's raw data."""
    volume = np.ones((3, 4, 5), np.float32)
    volume[1, 2, 3], volume[0, 0, 0] = np.nan, -np.inf
    path = tmp_path / f"t2{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(path))
    with pytest.raises(SegExplainError, match=rf"^sequence file '{re.escape(str(path))}' has 2 NaN/Inf voxels; "
                                              r"expected finite values \(clean or mask them first\)$"):
        read_sequences([path])
    with pytest.raises(SegExplainError, match=r"^label file .* has 2 NaN/Inf voxels"):
        read_label(path, read_geometry(path))
    sitk.WriteImage(sitk.GetImageFromArray(np.nan_to_num(volume, posinf=0, neginf=0).astype(np.float64)), str(path))
    np.testing.assert_array_equal(read_sequences([path])[0][0], np.nan_to_num(volume, posinf=0, neginf=0))


def test_only_files_that_hold_their_own_voxels_are_self_contained(tmp_path):
    volume = sitk.GetImageFromArray(np.ones((3, 4, 5), np.float32))
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        sitk.WriteImage(volume, str(tmp_path / f"own{suffix}"))
        check_self_contained(tmp_path / f"own{suffix}")
    sitk.WriteImage(volume, str(tmp_path / "pair.hdr"))  # NIfTI header (ni1) beside pair.img
    (tmp_path / "pair.nii.gz").write_bytes(gzip.compress((tmp_path / "pair.hdr").read_bytes()))
    sitk.WriteImage(volume, str(tmp_path / "detached.mhd"))  # ElementDataFile = detached.raw
    sitk.WriteImage(volume, str(tmp_path / "detached.nhdr"))  # data file: detached.raw
    (tmp_path / "other.nii").write_bytes(b"P5 5 4 255\n" + bytes(20))  # not a format SegExplain knows
    for name in ("pair.hdr", "pair.nii.gz", "detached.mhd", "detached.nhdr", "other.nii"):
        with pytest.raises(SegExplainError, match=rf"^image file '.*{re.escape(name)}' is not a single file holding "
                                                  r"its voxels \(its header names another file"):
            check_self_contained(tmp_path / name)


def test_ijk_to_ras_is_the_inverse_of_from_ijk_to_ras():
    matrix = np.array([[-0.7, 0.2, 0.0, 12.0], [-0.2, -0.7, 0.0, -30.0], [0.0, 0.0, 3.0, 5.0], [0, 0, 0, 1.0]])
    geometry = Geometry.from_ijk_to_ras(matrix, (10, 12, 4))
    np.testing.assert_allclose(geometry.ijk_to_ras, matrix, atol=1e-12)
    ras = geometry.ijk_to_ras @ np.array([3, 5, 2, 1.0])
    np.testing.assert_allclose(index_to_physical((2, 5, 3), geometry, frame="ras"), ras[:3], atol=1e-9)
