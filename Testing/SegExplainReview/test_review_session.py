"""The review session without a browser: case folders, the scene, regions and uploaded files."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import tempfile
import zlib
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from SegExplainLib.application.demo import SEQUENCE_NAMES, write_demo_case
from SegExplainLib.errors import SegExplainError
from SegExplainLib.models.demo_card import demo_card_path


@pytest.fixture(scope="module")
def caseFolder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("case")
    sequences, label = write_demo_case(folder, 1000)
    for path, name in zip(sequences, SEQUENCE_NAMES):
        path.rename(folder / f"{name}.nii.gz")
    label.rename(folder / "label.nii.gz")
    return folder


@pytest.fixture(scope="module")
def session(caseFolder):
    from trame_slicer.core import SlicerApp

    from SegExplainReview.session import ReviewCase, ReviewSession

    session = ReviewSession(SlicerApp(), ReviewCase.fromFolder(caseFolder, str(demo_card_path())))
    yield session
    session.close()


def test_case_folder_follows_the_card_order(caseFolder, tmp_path):
    from SegExplainReview.session import ReviewCase

    case = ReviewCase.fromFolder(caseFolder, str(demo_card_path()))
    assert [p.name for p in case.sequences] == [f"{n}.nii.gz" for n in SEQUENCE_NAMES]
    assert case.label.name == "label.nii.gz"
    (tmp_path / "T2.nii.gz").write_bytes((caseFolder / "T2.nii.gz").read_bytes())
    with pytest.raises(SegExplainError, match=r"has no file for T1, T1-20s.* \(expected T1.nii.gz"):
        ReviewCase.fromFolder(tmp_path, str(demo_card_path()))


def test_scene_holds_the_case(session, caseFolder):
    assert [v.GetName() for v in session.volumes] == SEQUENCE_NAMES
    assert len(session.segments()) == 1
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(caseFolder / "label.nii.gz")))
    centre = np.array(session.segmentationCentre())
    k, j, i = np.argwhere(label > 0).T  # identity direction, origin 0, spacing (1, 1, 2): RAS = (-i, -j, 2k)
    low, high = np.array([-i.max(), -j.max(), 2 * k.min()]), np.array([-i.min(), -j.min(), 2 * k.max()])
    assert np.all(centre >= low - 1) and np.all(centre <= high + 1)


def test_point_region_needs_a_click_inside_the_volume(session):
    from SegExplainReview.session import ReviewParameters

    with pytest.raises(SegExplainError, match="click a point"):
        session.region(ReviewParameters(regionKind="point"))
    session.addClick((500.0, 500.0, 500.0))
    with pytest.raises(SegExplainError, match="lies outside"):
        session.region(ReviewParameters(regionKind="point"))
    centre = session.segmentationCentre()
    session.addClick(centre)
    region = session.region(ReviewParameters(regionKind="point", radius=3.0))
    assert region.kind == "point" and region.radius == 3.0
    with pytest.raises(SegExplainError, match="draw a box"):
        session.region(ReviewParameters(regionKind="box"))


@pytest.mark.parametrize(("name", "content", "message"), [
    ("notes.txt", b"hello", "not an image file"),
    ("T2.nii.gz", b"\x00" * 100, "'T2.nii.gz' is not a single file holding its voxels"),
    ("label.nrrd", b"NRRD0004\ngarbage", "label.nrrd"),
])
def test_bad_uploads_are_refused_without_server_paths(session, name, content, message):
    """The message names the user's file and never the server's temporary copy (nor any server folder)."""
    before = [v.GetID() for v in session.volumes]
    with pytest.raises(SegExplainError, match=message) as refused:
        session.addFile(name, content)
    assert [v.GetID() for v in session.volumes] == before
    assert tempfile.gettempdir() not in str(refused.value) and "segexplain-upload" not in str(refused.value)


def detachedHeaders(dataFile: str, size: tuple[int, ...], spacing: tuple[float, ...]) -> dict[str, bytes]:
    """A MetaImage and two NRRD headers of float32 voxels on a grid (origin 0, LPS identity) that are in ``dataFile``."""
    sizes, spacings = " ".join(map(str, size)), " ".join(map(str, spacing))
    nrrd = (f"NRRD0004\ntype: float\ndimension: 3\nsizes: {sizes}\nencoding: raw\nendian: little\n"
            f"space: left-posterior-superior\nspace origin: (0,0,0)\nspace directions: ({spacing[0]},0,0) "
            f"(0,{spacing[1]},0) (0,0,{spacing[2]})\n")
    return {"T2.mha": (f"ObjectType = Image\nNDims = 3\nDimSize = {sizes}\nElementSpacing = {spacings}\n"
                       f"ElementType = MET_FLOAT\nElementDataFile = {dataFile}\n").encode(),
            "T2.nrrd": f"{nrrd}data file: {dataFile}\n\n".encode(),
            "second_opinion.nrrd": f"{nrrd}datafile: {dataFile}\n\n".encode()}


def test_an_upload_whose_header_names_another_file_is_refused(session, caseFolder, tmp_path):
    """Such a header had ITK read a file of the server (accepted as a sequence), or report that it is absent."""
    geometry = session.volumes[0].GetImageData().GetDimensions()
    serverFile = tmp_path / "server-file.raw"
    serverFile.write_bytes(np.ones(int(np.prod(geometry)), np.float32).tobytes())
    before = [v.GetID() for v in session.volumes]
    relative = "../" * 8 + str(serverFile).lstrip("/")  # from the server's upload folder
    for dataFile in (str(serverFile), relative, str(tmp_path / "absent.raw")):
        for name, content in detachedHeaders(dataFile, geometry, session.volumes[0].GetSpacing()).items():
            with pytest.raises(SegExplainError) as refused:
                session.addFile(name, content)
            assert str(refused.value) == (f"image file {name!r} is not a single file holding its voxels (its header "
                                          f"names another file, or its format is not known); expected NIfTI, NRRD or "
                                          f"MetaImage with the voxels inside"), dataFile
    assert [v.GetID() for v in session.volumes] == before
    image = sitk.ReadImage(str(caseFolder / "T2.nii.gz"))  # the voxels inside the same formats: accepted
    for suffix in (".mha", ".nrrd"):
        sitk.WriteImage(image, str(tmp_path / f"T2{suffix}"))
        assert "replaced sequence T2" in session.addFile(f"T2{suffix}", (tmp_path / f"T2{suffix}").read_bytes())


def gzipBomb(size: tuple[int, int, int]) -> bytes:
    """A gzip-encoded NRRD of ``size`` (x, y, z) zero voxels: a few hundred kB that decode to prod(size) bytes."""
    voxels = int(np.prod(size))
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    body = b"".join(compressor.compress(bytes(10**6)) for _ in range(voxels // 10**6))
    body += compressor.compress(bytes(voxels % 10**6)) + compressor.flush()
    header = f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: {' '.join(map(str, size))}\nencoding: gzip\n\n"
    return header.encode() + body


@contextlib.contextmanager
def peakMemory():
    """Growth of this process's peak resident memory over the block (Linux: the kernel resets the peak on request)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads the peak resident memory from /proc")

    def kilobytes(field: str) -> int:
        with open("/proc/self/status") as status:
            return int(re.search(rf"{field}:\s+(\d+) kB", status.read()).group(1))

    with open("/proc/self/clear_refs", "w") as reset:
        reset.write("5")
    growth = SimpleNamespace(megabytes=0.0)
    start = kilobytes("VmRSS")
    yield growth
    growth.megabytes = (kilobytes("VmHWM") - start) / 1024


@pytest.mark.parametrize("name", ["T2.nrrd", "second_opinion.nrrd"])
def test_an_upload_off_the_grid_is_refused_before_decoding(session, name):
    """A 0.9 MB gzip of 600^3 voxels (216 MB as a label, 864 MB as float32) is refused from its header alone."""
    bomb = gzipBomb((600, 600, 600))
    assert len(bomb) < 10**6
    before = [v.GetID() for v in session.volumes]
    with peakMemory() as peak, pytest.raises(SegExplainError, match=rf"'{name}' .*not on the (image )?grid"):
        session.addFile(name, bomb)
    assert peak.megabytes < 100, f"refusing {name} took {peak.megabytes:.0f} MB"
    assert [v.GetID() for v in session.volumes] == before


def test_uploads_are_capped_in_size(session, caseFolder, monkeypatch):
    from SegExplainReview.session import ReviewSession

    for bad in (0, -1, 1.5, True):
        with pytest.raises(SegExplainError, match=rf"maxUploadBytes must be a positive number of bytes, got {bad!r}"):
            ReviewSession(None, None, maxUploadBytes=bad)
    content = (caseFolder / "T1.nii.gz").read_bytes()
    monkeypatch.setattr(session, "maxUploadBytes", len(content) - 1)
    with pytest.raises(SegExplainError, match=rf"'T1.nii.gz' is {len(content)} bytes; uploads are limited to "
                                              rf"{len(content) - 1} bytes"):
        session.addFile("T1.nii.gz", content)


def test_uploaded_sequence_replaces_its_input(session, caseFolder):
    content = (caseFolder / "T1.nii.gz").read_bytes()
    old, caseRequest = session.volumes[1], session.explainer.worker.case_request
    assert "replaced sequence T1" in session.addFile("T1.nii.gz", content)
    assert session.volumes[1] is not old and session.volumes[1].GetScene() is session.scene
    assert old.GetScene() is session.scene and old.GetName() == "T1 (before T1.nii.gz)"  # earlier results keep it
    assert session.explainer.worker.case_request > caseRequest  # the worker got the new case at once


def test_the_cards_code_runs_only_when_the_case_allows_it(session, tmp_path, monkeypatch):
    """``segexplain review --trust-model-code`` sets the case's trustModelCode; nothing else lets a card run code."""
    from SegExplainReview.session import ReviewParameters

    (tmp_path / "net.py").write_text("from SegExplainLib.models.networks import UNet3D as Net\n")
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"model": "net.py:Net", "kwargs": {"in_channels": 6, "base_channels": 2, "depth": 2},
                                "sequences": SEQUENCE_NAMES, "classes": ["background", "lesion"]}))
    parameters = ReviewParameters(regionKind="class", method="gradient")
    monkeypatch.setattr(session, "case", replace(session.case, model=str(card)))
    with pytest.raises(SegExplainError, match=r"would run the Python file .*--trust-model-code"):
        session.startExplanation(parameters)
    monkeypatch.setattr(session, "case", replace(session.case, model=str(card), trustModelCode=True))
    started = session.startExplanation(parameters)
    try:
        assert started.model.trust_code and "--trust-model-code" in started.command()
    finally:
        started.cancel()


def test_the_case_opens_with_a_warm_worker_that_answers_every_click(caseFolder):
    """Opening the case starts the worker (model and case in the background); every click is answered by it, a
    cancelled click leaves it warm, a crash is restarted by the next click, and closing the session ends it."""
    from trame_slicer.core import SlicerApp

    from SegExplainReview.session import ReviewCase, ReviewParameters, ReviewSession

    session = ReviewSession(SlicerApp(), ReviewCase.fromFolder(caseFolder, str(demo_card_path())))
    worker = session.explainer.worker
    try:
        assert worker is not None and worker.state == "running" and worker.case_request
        for method in ("lrp", "gradient"):
            run = session.startExplanation(ReviewParameters(regionKind="predicted", method=method))
            assert run.wait(120) == "done", run.error
            session.finishExplanation(run)
        assert session.explainer.worker is worker and worker.starts == 1
        assert [name.split(",")[0] for _, name in session.explanations()] == ["lrp epsilon_plus", "gradient"]
        slow = ReviewParameters(regionKind="class", method="occlusion")
        cancelled = session.startExplanation(slow)  # Cancel stops the click; the worker stays warm
        _explaining(cancelled)
        cancelled.cancel()
        assert cancelled.state == "cancelled" and worker.starts == 1 and worker.state == "running"
        crashed = session.startExplanation(slow)  # a crash fails the click; the next click restarts the worker
        _explaining(crashed)
        worker._process.kill()
        assert crashed.wait(30) == "failed" and "the worker process ended" in crashed.error
        again = session.startExplanation(ReviewParameters(regionKind="predicted", method="gradient"))
        assert again.wait(120) == "done", again.error
        assert session.explainer.worker.starts == 2 and session.explainer.worker.state == "running"
    finally:
        session.close()
    assert worker.state == "closed"


def _explaining(run, timeout=60):
    """Wait until the worker has started explaining ``run``'s click."""
    import time

    deadline = time.monotonic() + timeout
    while run.step != "explaining":
        assert time.monotonic() < deadline and run.state == "running", (run.state, run.error)
        run.poll()
        time.sleep(0.01)


def test_the_screenshot_is_the_layout_with_names_letters_positions_sequence_and_legend():
    """Two columns of two views (as the page shows them), each labelled, and a band with the sequence and legend."""
    import slicer
    from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

    from SegExplainReview.layout import LEGEND_BAND, Legend, composeLayout, legendColors, sliceViewLabels

    axial = slicer.vtkMRMLSliceNode()
    matrix = axial.GetSliceToRAS()
    for column, vector in enumerate([(-1, 0, 0), (0, 1, 0), (0, 0, 1), (3, -4, 12.5)]):  # Slicer's axial preset
        for row, value in enumerate(vector):
            matrix.SetElement(row, column, value)
    labels = sliceViewLabels(axial, "Red: Axial")
    assert labels == {"name": "Red: Axial", "position": "S: 12.5 mm",
                      "letters": {"left": "R", "right": "L", "top": "A", "bottom": "P"}}

    views = [ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view(),
             ViewLayoutDefinition.sagittal_view(), ViewLayoutDefinition.threed_view()]
    layout = Layout(LayoutDirection.Horizontal, [Layout(LayoutDirection.Vertical, views[:2]),
                                                 Layout(LayoutDirection.Vertical, views[2:])])
    shades = {"Red": 40, "Green": 80, "Yellow": 120, views[3].singleton_tag: 160}
    tiles = {tag: np.full((100, 150, 4), shade, np.uint8) for tag, shade in shades.items()}
    image, drawn = composeLayout(layout, tiles, {"Red": labels, views[3].singleton_tag: {"name": "3D"}},
                                 sequence="T2", legend=Legend("T2", 1, 0.0123))
    assert image.shape == (200 + LEGEND_BAND, 300, 4)
    for (top, left), tag in zip([(0, 0), (100, 0), (0, 150), (100, 150)], shades):  # column by column
        assert np.median(image[top:top + 100, left:left + 150, 0]) == shades[tag], tag
    assert drawn == ["Red: Axial", "S: 12.5 mm", "R", "L", "A", "P", "3D", "Sequence: T2", "-0.0123", "+0.0123",
                     "blue: against class 1, red: for class 1"]
    name = image[4:18, 6:60, :3]  # the view's name, white on the grey tile
    assert (name == 255).all(axis=-1).sum() > 20
    band = image[200:].reshape(-1, 4)[:, :3]
    for color in legendColors()[[0, -1]]:  # the bar's two ends: the colours of max|R| against and for the class
        assert (band == color).all(axis=-1).sum() >= 100


def test_page_parameters_are_validated_settings_with_the_modules_names():
    from SegExplainMRML import workflow

    from SegExplainReview.session import ReviewParameters

    with pytest.raises(SegExplainError, match="'lrpp'"):
        ReviewParameters(method="lrpp")
    with pytest.raises(SegExplainError, match="seed must be an integer"):
        ReviewParameters(seed=-1)
    chosen = ReviewParameters(method="integrated_gradients", baseline="min", layerwiseFilter=True, filterKind="pass",
                              filterLow=0.2)
    settings = workflow.settings(chosen)
    assert (settings.method, settings.nSteps, settings.baseline, settings.layerFilter) == (
        "integrated_gradients", 64, "min", "pass:0.2,1")


def test_a_multi_channel_file_is_split_into_the_cards_sequences(tmp_path):
    from SegExplainLib.application.demo import make_case
    from SegExplainLib.io.imaging import read_sequences
    from SegExplainReview.session import ReviewCase

    image, _ = make_case(1001)
    stacked = sitk.GetImageFromArray(np.moveaxis(image, 0, -1), isVector=True)
    stacked.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(stacked, str(tmp_path / "case.nrrd"))
    before = sorted(tmp_path.iterdir())
    case = ReviewCase.fromFile(tmp_path / "case.nrrd", str(demo_card_path()))
    assert sorted(tmp_path.iterdir()) == before  # in memory: no copy of the patient's images on disk
    np.testing.assert_array_equal(np.stack([volume.array for volume in case.sequences]), image)
    assert {volume.geometry for volume in case.sequences} == {read_sequences([tmp_path / "case.nrrd"])[1]}
    assert case.sequences[0].geometry.spacing == (1.0, 1.0, 2.0)
    sitk.WriteImage(sitk.GetImageFromArray(np.moveaxis(image[:2], 0, -1), isVector=True), str(tmp_path / "two.nrrd"))
    with pytest.raises(SegExplainError, match="has 2 channels; the model card's sequences are T2, T1"):
        ReviewCase.fromFile(tmp_path / "two.nrrd", str(demo_card_path()))


def test_case_folder_as_the_demo_case_command_writes_it(tmp_path):
    """``python -m SegExplainLib.application.demo case`` names files case_<seed>_<sequence>; the folder opens as it is."""
    from SegExplainReview.session import ReviewCase

    sequences, label = write_demo_case(tmp_path, 1001)
    case = ReviewCase.fromFolder(tmp_path, str(demo_card_path()))
    assert case.sequences == tuple(sequences) and case.label == label


def test_case_folder_with_two_files_for_one_sequence_is_refused(tmp_path):
    """Two files that both name a sequence (two cases' T1 in one folder) are refused, not one of them picked."""
    from SegExplainReview.session import ReviewCase

    sequences, _ = write_demo_case(tmp_path, 1001)
    (tmp_path / "case_1002_T1.nii.gz").write_bytes(sequences[1].read_bytes())
    with pytest.raises(SegExplainError, match=r"case_1001_T1.nii.gz and case_1002_T1.nii.gz, which both name the "
                                              r"sequence T1"):
        ReviewCase.fromFolder(tmp_path, str(demo_card_path()))


def test_the_demo_case_is_made_in_memory_as_its_files_would_be_read(caseFolder, session, monkeypatch, tmp_path):
    """The demo case of ``segexplain review`` without a case was written to the temporary folder (and stayed there
    after SIGKILL); it is now made in memory: the same voxels, grid and segment as its files."""
    from trame_slicer.core import SlicerApp

    from SegExplainLib.io.imaging import read_label, read_sequences
    from SegExplainReview.session import CaseVolume, ReviewCase, ReviewSession

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    case = ReviewCase.demo(str(demo_card_path()), 1000)
    assert all(isinstance(volume, CaseVolume) for volume in (*case.sequences, case.label))
    image, geometry = read_sequences([caseFolder / f"{name}.nii.gz" for name in SEQUENCE_NAMES])
    np.testing.assert_allclose(np.stack([volume.array for volume in case.sequences]), image, rtol=1e-6)
    assert {volume.geometry for volume in (*case.sequences, case.label)} == {geometry}
    np.testing.assert_array_equal(case.label.array, read_label(caseFolder / "label.nii.gz", geometry))
    demo = ReviewSession(SlicerApp(), case)
    try:
        assert [name for _, name in demo.segments()] == [name for _, name in session.segments()]
        assert np.allclose(demo.segmentationCentre(), session.segmentationCentre())
    finally:
        demo.close()
    assert list(tmp_path.iterdir()) == []  # nothing written
