"""SegExplainMRML with the three kinds of model: a model card, an nnU-Net v2 results folder, a MONAI bundle.

The nnU-Net folder is the real one of the session fixture ``nnunet_model`` (``Testing/nnunet_fixture.py``: made by
nnunetv2's planner and trainer; channels T2 and ADC, class 1 lesion). The warm worker loads it as ``segexplain explain --nnunet``
does, with one fold and no mirroring to stay fast.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import numpy as np
import pytest
import vtk
from mrml_scene import addVolume
from SegExplainMRML import job, nodes, results, workflow

from SegExplainLib.errors import SegExplainError

_C, _S = np.cos(np.pi / 6), np.sin(np.pi / 6)
OBLIQUE = ((_C, -_S, 0.0), (_S, _C, 0.0), (0.0, 0.0, 1.0))  # 30 degrees about the slice axis


def _nnunetCase(scene, shape=(12, 30, 34)):
    """Volumes 'case7 ADC' and 'case7 T2' (added in that order), oblique and anisotropic, with a lesion inside a
    zero border that nnU-Net crops; returns them and the lesion centre (d, h, w)."""
    rng = np.random.default_rng(1)
    image = np.zeros((2, *shape), np.float32)
    image[:, 1:-1, 2:-2, 2:-2] = rng.normal(200.0, 15.0, (2, shape[0] - 2, shape[1] - 4, shape[2] - 4))
    centre = tuple(n // 2 for n in shape)
    lesion = tuple(slice(c - 2, c + 2) for c in centre)
    image[(0, *lesion)] += 60.0
    image[(1, *lesion)] -= 40.0
    common = {"spacing": (0.7, 0.9, 2.5), "origin": (-10.0, 5.0, 3.0), "direction": OBLIQUE}
    adc = addVolume(scene, image[1], name="case7 ADC", **common)
    t2 = addVolume(scene, image[0], name="case7 T2", **common)
    return [t2, adc], centre


def _ras(volume, dhw):
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return tuple(matrix.MultiplyPoint((*(float(v) for v in dhw[::-1]), 1.0))[:3])


def test_a_job_explains_an_nnunet_folder_onto_the_input_volumes(scene, nnunet_model):
    """The sequence names come from the folder's dataset.json and pick the scene's volumes; the job runs
    ``segexplain explain --nnunet``; the relevance and overlay volumes land on the input volumes' geometry."""
    volumes, centre = _nnunetCase(scene)
    parameters = SimpleNamespace(modelKind="nnunet", modelCard="", modelFolder=str(nnunet_model),
                                 nnunetConfiguration="3d_fullres", nnunetFolds="0", nnunetMirroring=False)
    model = workflow.modelSource(parameters)
    names = model.sequence_names()
    assert names == ["T2", "ADC"]
    assert nodes.guessSequenceVolumes(scene, names) == volumes
    region = job.Region("point", pointRas=_ras(volumes[0], centre), radius=2.0, description="lesion centre")
    explainer = job.WarmExplainer()
    try:
        run = workflow.startExplanation(explainer, volumes, names, region,
                                        job.ExplainSettings(method="gradient", device="cpu"), model, trustModelCode=True)
        assert run.wait(180) == "done", run.error
        command = run.command()
        start = command.index("--nnunet")
        assert command[start:start + 7] == ["--nnunet", str(nnunet_model), "--configuration", "3d_fullres",
                                            "--folds", "0", "--no-mirroring"]
        assert "--trust-model-code" in command and "--card" not in command
        explanation = workflow.finishExplanation(run, volumes)
    finally:
        explainer.close()
    assert explanation.sequenceNames == ["T2", "ADC"]
    reference = nodes.geometryOfVolume(volumes[0])
    for volume, relevance in zip(volumes, explanation.relevance):
        assert nodes.geometryOfVolume(relevance).differences(reference, tolerance=1e-6) == []
        assert explanation.inputVolume(explanation.relevance.index(relevance)) is volume
    assert nodes.geometryOfVolume(explanation.overlay).differences(reference, tolerance=1e-6) == []
    maps = explanation.maps()
    assert maps.shape == (2, 12, 30, 34) and np.abs(maps).sum() > 0
    assert not maps[:, 0].any() and not maps[:, :, :2].any()  # the zero border nnU-Net crops gets no relevance
    assert explanation.record["model"]["kind"] == "nnunet" and explanation.record["model"]["folds"] == ["0"]
    assert results.explanationFolders(scene) == [explanation.folderItem]


@pytest.mark.parametrize(("kind", "message"), [
    ("nnunet", "nnU-Net results folder '.*missing' is not a folder"),
    ("bundle", "MONAI bundle '.*missing' is not a folder"),
    ("card", "model card '.*missing' is not a file"),
])
def test_a_missing_model_is_refused_naming_it(scene, tmp_path, kind, message):
    volume = addVolume(scene, np.zeros((2, 3, 4)))
    model = job.ModelSource(kind, str(tmp_path / "missing"))
    with pytest.raises(SegExplainError, match=message):
        model.sequence_names()
    explainer = job.WarmExplainer()
    with pytest.raises(SegExplainError, match=message):
        workflow.startExplanation(explainer, [volume], ["T2"], job.Region("class"), job.ExplainSettings(), model)
    assert explainer.worker is None


@pytest.mark.parametrize(("options", "message"), [
    ({"kind": "onnx"}, "model kind must be one of card, spec, nnunet, bundle, got 'onnx'"),
    ({"kind": "nnunet"}, "choose the nnU-Net results folder to explain"),
    ({"kind": "bundle", "folds": "0"}, "folds belong to an nnU-Net results folder, not a MONAI bundle"),
    ({"kind": "card", "configuration": "3d_lowres", "mirroring": False},
     "configuration, mirroring off belong to an nnU-Net results folder, not a model card"),
    ({"kind": "nnunet", "folds": "0 one"}, "folds must be fold numbers .* got 'one'"),
    ({"kind": "nnunet", "mirroring": "no"}, "mirroring must be True or False, got 'no'"),
])
def test_model_source_validation_names_the_value(options, message):
    with pytest.raises(SegExplainError, match=message):
        job.ModelSource(**options).check()


def test_model_source_arguments(nnunet_model):
    """Each kind gives its command line options; folds are read from any separators; the demo card by default."""
    nnunet = job.ModelSource("nnunet", str(nnunet_model), folds=" 0, 1 ")
    assert nnunet.folds == ("0", "1")
    assert nnunet.arguments() == ["--nnunet", str(nnunet_model), "--folds", "0", "1"]
    assert job.ModelSource("nnunet", "/r", configuration="3d_lowres", folds=("all",), mirroring=False).arguments() == [
        "--nnunet", "/r", "--configuration", "3d_lowres", "--folds", "all", "--no-mirroring"]
    assert job.ModelSource("bundle", "/b").arguments() == ["--bundle", "/b"]
    assert job.ModelSource().arguments() == ["--card", job.demoCardPath()]
    assert workflow.modelSource(SimpleNamespace(modelCard="")) == job.ModelSource()  # a front end without a kind
    bundle = workflow.modelSource(SimpleNamespace(modelKind="bundle", modelFolder="/b", nnunetFolds="0",
                                                  nnunetConfiguration="x", nnunetMirroring=False))
    assert bundle == job.ModelSource("bundle", "/b")  # the nnU-Net options of the panel do not reach a bundle
    assert job.ModelSource("nnunet", str(nnunet_model.parent)).sequence_names() == ["T2", "ADC"]  # dataset folder


def test_model_paths_from_slicers_path_fields():
    """The module's parameter node holds the paths as pathlib paths; an empty field is Path("") == Path("."), which
    means the bundled demo network (card) or no folder, never the working folder."""
    for pathType in (PurePosixPath, Path):
        assert workflow.modelSource(SimpleNamespace(modelKind="card", modelCard=pathType(""))) == job.ModelSource()
        assert workflow.modelSource(SimpleNamespace(modelKind="card", modelCard=pathType("/m/card.yaml"))) == \
            job.ModelSource("card", "/m/card.yaml")
        assert workflow.modelSource(SimpleNamespace(modelKind="bundle", modelFolder=pathType())).path == ""
        assert workflow.modelSource(SimpleNamespace(modelKind="nnunet", modelFolder=pathType("/r"))).path == "/r"
    assert workflow.modelSource(SimpleNamespace(modelCard=".")).path == "."  # typed text is taken as it is
    assert job.ModelSource().location == job.demoCardPath()
