"""The review session without a browser: case folders, the scene, regions and uploaded files."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from SegExplainLib.demo import SEQUENCE_NAMES, demo_card_path, write_demo_case
from SegExplainLib.errors import SegExplainError


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

    return ReviewSession(SlicerApp(), ReviewCase.fromFolder(caseFolder, str(demo_card_path())))


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
    ("T2.nii.gz", b"\x00" * 100, "could not read .*T2.nii.gz"),
    ("label.nrrd", b"NRRD0004\ngarbage", "label.nrrd"),
])
def test_bad_uploads_are_refused(session, name, content, message):
    before = [v.GetID() for v in session.volumes]
    with pytest.raises(SegExplainError, match=message):
        session.addFile(name, content)
    assert [v.GetID() for v in session.volumes] == before


def test_uploaded_sequence_replaces_its_input(session, caseFolder):
    content = (caseFolder / "T1.nii.gz").read_bytes()
    old = session.volumes[1]
    assert "replaced sequence T1" in session.addFile("T1.nii.gz", content)
    assert session.volumes[1] is not old and session.volumes[1].GetScene() is session.scene
    assert old.GetScene() is session.scene and old.GetName() == "T1 (before T1.nii.gz)"  # earlier results keep it


def test_the_cards_code_runs_only_when_the_case_allows_it(session, tmp_path, monkeypatch):
    """``segexplain review --trust-model-code`` sets the case's trustModelCode; nothing else lets a card run code."""
    from SegExplainReview.session import ReviewParameters

    (tmp_path / "net.py").write_text("from SegExplainLib.models import UNet3D as Net\n")
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"model": "net.py:Net", "kwargs": {"in_channels": 6, "base_channels": 2, "depth": 2},
                                "sequences": SEQUENCE_NAMES, "classes": ["background", "lesion"]}))
    parameters = ReviewParameters(regionKind="class", method="gradient")
    monkeypatch.setattr(session, "case", replace(session.case, card=str(card)))
    with pytest.raises(SegExplainError, match=r"would run the Python file .*--trust-model-code"):
        session.startExplanation(parameters)
    monkeypatch.setattr(session, "case", replace(session.case, card=str(card), trustModelCode=True))
    started = session.startExplanation(parameters)
    try:
        assert started.trustModelCode and "--trust-model-code" in started.command()
    finally:
        started.cancel()


def test_views_image_pads_to_the_tallest():
    from SegExplainReview.session import ReviewSession

    image = ReviewSession.viewsImage([np.full((4, 3, 3), 200, np.uint8), np.full((2, 5, 4), 100, np.uint8)])
    assert image.shape == (4, 8, 4)
    assert np.all(image[:, :3, :3] == 200) and np.all(image[2:, 3:, :3] == 0) and np.all(image[..., 3] > 0)


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
    from SegExplainLib.demo import make_case
    from SegExplainLib.imaging import read_sequences
    from SegExplainReview.session import ReviewCase

    image, _ = make_case(1001)
    stacked = sitk.GetImageFromArray(np.moveaxis(image, 0, -1), isVector=True)
    stacked.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(stacked, str(tmp_path / "case.nrrd"))
    case = ReviewCase.fromFile(tmp_path / "case.nrrd", str(demo_card_path()), tmp_path)
    assert [p.name for p in case.sequences] == [f"{n}.nrrd" for n in SEQUENCE_NAMES]
    split, geometry = read_sequences(case.sequences)
    np.testing.assert_array_equal(split, image)
    assert geometry.spacing == (1.0, 1.0, 2.0)
    sitk.WriteImage(sitk.GetImageFromArray(np.moveaxis(image[:2], 0, -1), isVector=True), str(tmp_path / "two.nrrd"))
    with pytest.raises(SegExplainError, match="has 2 channels; the model card's sequences are T2, T1"):
        ReviewCase.fromFile(tmp_path / "two.nrrd", str(demo_card_path()), tmp_path)


def test_case_folder_as_the_demo_case_command_writes_it(tmp_path):
    """``python -m SegExplainLib.demo case`` names files case_<seed>_<sequence>; the folder opens as it is."""
    from SegExplainReview.session import ReviewCase

    sequences, label = write_demo_case(tmp_path, 1001)
    case = ReviewCase.fromFolder(tmp_path, str(demo_card_path()))
    assert case.sequences == tuple(sequences) and case.label == label
