"""``segexplain review`` with an nnU-Net v2 results folder: the case, the session and one explanation, no browser.

The folder is the real one of the session fixture ``nnunet_model`` (``Testing/nnunet_fixture.py``: channels T2 and
ADC, class 1 lesion). ``serve`` is replaced to catch the case the command line builds.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import SimpleITK as sitk

from SegExplainLib.errors import SegExplainError
from SegExplainLib.frontends import cli

_C, _S = np.cos(np.pi / 6), np.sin(np.pi / 6)


@pytest.fixture
def nnunetCase(tmp_path):
    """A case folder 'case7_ADC.nii.gz', 'case7_T2.nii.gz', oblique and anisotropic, lesion inside a zero border."""
    shape = (12, 30, 34)
    rng = np.random.default_rng(1)
    image = np.zeros((2, *shape), np.float32)
    image[:, 1:-1, 2:-2, 2:-2] = rng.normal(200.0, 15.0, (2, shape[0] - 2, shape[1] - 4, shape[2] - 4))
    lesion = tuple(slice(n // 2 - 2, n // 2 + 2) for n in shape)
    image[(0, *lesion)] += 60.0
    image[(1, *lesion)] -= 40.0
    folder = tmp_path / "case7"
    folder.mkdir()
    for channel, name in ((1, "ADC"), (0, "T2")):
        volume = sitk.GetImageFromArray(image[channel])
        volume.SetSpacing((0.7, 0.9, 2.5))
        volume.SetOrigin((-10.0, 5.0, 3.0))
        volume.SetDirection((_C, -_S, 0.0, _S, _C, 0.0, 0.0, 0.0, 1.0))
        sitk.WriteImage(volume, str(folder / f"case7_{name}.nii.gz"))
    return folder


def test_a_case_opens_with_an_nnunet_folder_and_is_explained(nnunetCase, nnunet_model, monkeypatch):
    """The command line's nnU-Net options reach the case; its files are matched by dataset.json's channel names;
    the session explains it through ``segexplain explain --nnunet`` onto the case's volumes."""
    pytest.importorskip("trame_slicer", reason="the review app needs its extra (pip install -e '.[review]')")
    from SegExplainMRML.nodes import geometryOfVolume
    from trame_slicer.core import SlicerApp

    from SegExplainLib.application.model_source import ModelSource
    from SegExplainReview import app
    from SegExplainReview.session import ReviewParameters, ReviewSession

    served = []
    monkeypatch.setattr(app, "serve", lambda case, **options: served.append(case))
    assert cli.main(["review", str(nnunetCase), "--nnunet", str(nnunet_model), "--folds", "0",
                     "--no-mirroring"]) == 0
    (case,) = served
    assert case.model == ModelSource("nnunet", str(nnunet_model), folds=("0",), mirroring=False)
    assert [p.name for p in case.sequences] == ["case7_T2.nii.gz", "case7_ADC.nii.gz"]

    session = ReviewSession(SlicerApp(), case)
    assert session.names == ["T2", "ADC"]
    job = session.startExplanation(ReviewParameters(regionKind="class", method="gradient", device="cpu"))
    assert job.command()[job.command().index("--nnunet"):][:5] == ["--nnunet", str(nnunet_model), "--folds", "0",
                                                                   "--no-mirroring"]
    assert job.wait(180) == "done", job.error
    explanation = session.finishExplanation(job)
    assert explanation.sequenceNames == ["T2", "ADC"] and explanation.record["model"]["kind"] == "nnunet"
    for volume, relevance in zip(session.volumes, explanation.relevance):
        assert geometryOfVolume(relevance).differences(geometryOfVolume(volume), tolerance=1e-6) == []
    assert np.abs(explanation.maps()).sum() > 0


@pytest.mark.parametrize(("arguments", "message"), [
    (["--nnunet", "{missing}"], "nnU-Net results folder '.*missing' is not a folder"),
    (["--bundle", "{missing}"], "MONAI bundle '.*missing' is not a folder"),
    (["--nnunet", "{missing}", "--bundle", "{missing}"], "--nnunet and --bundle each name a model; pass one"),
    (["--folds", "0"], "--folds belong to --nnunet, which was not given"),
])
def test_review_model_options_are_checked_before_serving(tmp_path, capsys, arguments, message):
    arguments = [a.format(missing=tmp_path / "missing") for a in arguments]
    assert cli.main(["review", str(tmp_path), *arguments]) == cli.EXIT_ERROR
    assert re.search(message, capsys.readouterr().err)


def test_a_model_folder_needs_a_case(tmp_path):
    with pytest.raises(SegExplainError, match="--bundle needs a CASE_OR_FOLDER"):
        cli.run_review(cli.parser().parse_args(["review", "--bundle", str(tmp_path)]))
