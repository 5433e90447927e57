"""SegExplainMRML.job: settings, regions and the explanation running as a child process (progress, failure, cancel)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from mrml_scene import addDemoCase, addVolume
from SegExplainMRML import job, nodes, workflow

from SegExplainLib.cli import OUTPUT_MARKER
from SegExplainLib.errors import SegExplainError
from SegExplainLib.imaging import Geometry


@pytest.mark.parametrize(("options", "message"), [
    ({"method": "shap"}, "method must be one of .* got 'shap'"),
    ({"aggregation": "mean"}, "aggregation must be .* got 'mean'"),
    ({"device": "gpu"}, "device must be .* got 'gpu'"),
    ({"device": "cuda:x"}, "got 'cuda:x'"),
    ({"nSteps": 0}, "nSteps must be an integer >= 1, got 0"),
    ({"nSteps": True}, "nSteps must be an integer >= 1, got True"),
    ({"samples": -1}, "samples must be an integer >= 0, got -1"),
    ({"seed": 1.5}, "seed must be an integer >= 0, got 1.5"),
    ({"classIndex": False}, "classIndex must be an integer >= 0, got False"),
])
def test_settings_validation_names_the_value(options, message):
    """Each bad setting is refused with a message naming the value."""
    with pytest.raises(SegExplainError, match=message):
        job.ExplainSettings(**options)


def test_settings_accept_cuda_devices():
    """'cuda' and 'cuda:N' are valid devices."""
    arguments = job.ExplainSettings(device="cuda:1").arguments()
    assert arguments[arguments.index("--device") + 1] == "cuda:1"
    assert job.ExplainSettings(device="cuda").device == "cuda"


def test_arguments_per_method():
    """LRP passes its composite (and layer filter), IG its steps and baseline, other methods neither."""
    lrp = job.ExplainSettings(method="lrp", composite="epsilon_plus_flat", layerFilter="pass:0.4").arguments()
    assert lrp[lrp.index("--composite") + 1] == "epsilon_plus_flat"
    assert lrp[lrp.index("--layer-filter") + 1] == "pass:0.4"
    assert "--n-steps" not in lrp and "--baseline" not in lrp
    assert "--layer-filter" not in job.ExplainSettings(method="lrp").arguments()
    ig = job.ExplainSettings(method="integrated_gradients", nSteps=16, baseline="blur:2").arguments()
    assert ig[ig.index("--n-steps") + 1] == "16" and ig[ig.index("--baseline") + 1] == "blur:2"
    assert "--composite" not in ig
    for method in ("gradient", "smoothgrad", "occlusion"):
        arguments = job.ExplainSettings(method=method, classIndex=2, seed=7).arguments()
        assert not {"--composite", "--n-steps", "--baseline"} & set(arguments)
        assert arguments[:2] == ["--method", method]
        assert arguments[arguments.index("--class") + 1] == "2" and arguments[arguments.index("--seed") + 1] == "7"


def test_arguments_for_sampling_and_extra_options():
    """Samples are passed only for the normalized aggregation; extra options are passed as JSON."""
    assert "--samples" not in job.ExplainSettings(samples=100).arguments()
    normalized = job.ExplainSettings(aggregation="normalized", samples=100, extraOptions={"epsilon": 0.25}).arguments()
    assert normalized[normalized.index("--samples") + 1] == "100"
    key, value = normalized[normalized.index("--option") + 1].split("=", 1)
    assert key == "epsilon" and json.loads(value) == 0.25


@pytest.mark.parametrize(("arguments", "message"), [
    ({"kind": "sphere"}, "region kind must be one of .* got 'sphere'"),
    ({"kind": "segment"}, "'segment' region needs its mask"),
    ({"kind": "box"}, "'box' region needs its box"),
    ({"kind": "point"}, "'point' region needs its point"),
    ({"kind": "point", "pointRas": (0, 0, 0), "radius": -1.0}, "radius .* got -1.0"),
    ({"kind": "point", "pointRas": (0, 0, 0), "radius": True}, "radius .* got True"),
])
def test_region_validation(arguments, message):
    """A region without what its kind needs, or with a bad radius, is refused."""
    with pytest.raises(SegExplainError, match=message):
        job.Region(**arguments)


def test_region_arguments(scene, tmp_path, rng):
    """Each region kind becomes its command-line options; a segment is written as a label file on the input grid."""
    volume = addVolume(scene, np.zeros((3, 4, 5)), spacing=(0.5, 0.5, 2.0), origin=(1.0, 2.0, 3.0))
    geometry = nodes.geometryOfVolume(volume)
    mask = rng.random((3, 4, 5)) > 0.5
    segment = job.regionArguments(job.Region("segment", mask=mask), geometry, tmp_path)
    assert segment[0] == "--label" and segment[2:] == ["--label-value", "1"]
    written = sitk.ReadImage(segment[1])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), mask)
    assert Geometry.of(written).matches(geometry)
    assert job.regionArguments(job.Region("box", box=(0, 1, 2, 3, 4, 5)), geometry, tmp_path) == [
        "--box-index", "0", "1", "2", "3", "4", "5"]
    assert job.regionArguments(job.Region("point", pointRas=(1.5, -2.25, 30.0), radius=4), geometry, tmp_path) == [
        "--point-ras", "1.5", "-2.25", "30", "--radius", "4"]
    assert job.regionArguments(job.Region("class"), geometry, tmp_path) == ["--whole-class"]
    assert job.regionArguments(job.Region("predicted"), geometry, tmp_path) == []


@pytest.mark.parametrize(("name", "safe"), [("T2", "T2"), ("T1-20s", "T1-20s"), ("T1 post/Gd", "T1_post_Gd"),
                                            ("DWI[0]", "DWI_0_"), ("..", "sequence"), (".b1000.", "b1000"),
                                            ("Flair é", "Flair__")])
def test_file_safe(name, safe):
    """Sequence names become file names without separators, spaces or leading dots."""
    assert job.fileSafe(name) == safe


def test_missing_card_is_refused(scene, tmp_path):
    """A model card that is not a file is refused before anything runs."""
    stack = nodes.stackVolumes([addVolume(scene, np.zeros((2, 3, 4)))])
    with pytest.raises(SegExplainError, match="model card .*missing.yaml.* is not a file"):
        job.ExplainJob(stack, job.Region("class"), job.ExplainSettings(), card=str(tmp_path / "missing.yaml"))


CODE_MODEL_FILE = """
from pathlib import Path

Path(__file__).with_name("ran.txt").write_text("the model file ran")

from torch import nn


def Net():
    return nn.Conv3d(1, 2, kernel_size=1)
"""


def test_a_card_that_runs_code_needs_the_users_word(scene, tmp_path, rng):
    """A card naming a model file is refused before anything runs; the user's trustModelCode reaches the process."""
    (tmp_path / "net.py").write_text(CODE_MODEL_FILE)
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"model": "net.py:Net", "sequences": ["T2"], "classes": ["background", "lesion"]}))
    stack = nodes.stackVolumes([addVolume(scene, rng.normal(size=(3, 4, 5)), name="T2")])
    settings = job.ExplainSettings(method="gradient")
    with pytest.raises(SegExplainError, match=r"model card '.*card\.json' would run the Python file '.*net\.py'.*"
                                              r"'Allow code from this model'.*--trust-model-code"):
        job.ExplainJob(stack, job.Region("class"), settings, card=str(card))
    with pytest.raises(SegExplainError, match="trustModelCode must be True or False, got 1"):
        job.ExplainJob(stack, job.Region("class"), settings, card=str(card), trustModelCode=1)
    assert not (tmp_path / "ran.txt").exists()
    trusted = job.ExplainJob(stack, job.Region("class"), settings, card=str(card), trustModelCode=True)
    trusted.start()
    try:
        assert trusted.wait(120) == "done", trusted.error
    finally:
        trusted.cleanup()
    assert (tmp_path / "ran.txt").is_file()  # the child process ran the card's model file


def test_a_job_runs_to_its_end_with_progress(demoRun):
    """The demo job ends 'done' with rising progress, the maps of every sequence and the clicked voxel as target."""
    run = demoRun.job
    assert run.state == "done" and run.fraction == 1.0 and run.error == ""
    fractions = [event["fraction"] for event in demoRun.events]
    assert len(fractions) >= 3 and fractions == sorted(fractions) and len(set(fractions)) == len(fractions)
    assert "explaining" in [event.get("step") for event in demoRun.events]
    names = [job.fileSafe(n) for n in run.stack.names]
    assert sorted(p.name for p in demoRun.output.iterdir()) == sorted(
        [OUTPUT_MARKER, "summary.json"] + [f"relevance_{n}.nii.gz" for n in names])
    summary = json.loads((demoRun.output / "summary.json").read_text())
    assert summary["target"]["index"] == list(demoRun.voxel)
    assert summary["sequence_names"] == names and summary["method"] == "lrp"
    assert not run.folder.exists()  # cleanup deleted the inputs and outputs


def test_a_failing_job_reports_one_line(scene):
    """A point outside the grid makes the process fail; the error is its one-line message, no traceback, and the
    patient's images written as its inputs are gone before the host even cleans up."""
    volumes, _ = addDemoCase(scene)
    failing = job.ExplainJob(nodes.stackVolumes(volumes), job.Region("point", pointRas=(1000.0, 1000.0, 1000.0)),
                             job.ExplainSettings())
    failing.start()
    try:
        assert failing.wait(120) == "failed"
        assert not list(failing.folder.rglob("input_*")), "the inputs are deleted as soon as the process ended"
    finally:
        failing.cleanup()
    assert "lies outside the volume" in failing.error
    assert "\n" not in failing.error and "Traceback" not in failing.error
    assert failing.fraction < 1.0


def test_a_warning_of_the_engine_reaches_the_job_and_the_scene(scene):
    """IG with two fixed nodes from a zero baseline misses completeness: the job collects the engine's warning
    event, and the loaded explanation carries it for the module to show."""
    volumes, _ = addDemoCase(scene)
    settings = job.ExplainSettings(method="integrated_gradients", nSteps=2, baseline="zero",
                                   extraOptions={"quadrature": "gausslegendre"})
    run = job.ExplainJob(nodes.stackVolumes(volumes), job.Region("predicted"), settings)
    run.start()
    try:
        assert run.wait(120) == "done", run.error
        assert len(run.warnings) == 1 and "misses completeness" in run.warnings[0]
        explanation = workflow.finishExplanation(run, volumes)
    finally:
        run.cleanup()
    assert explanation.warnings == run.warnings


def test_cancel_right_after_start(scene):
    """A cancelled job stops, deletes its folder and cannot be started again."""
    volumes, _ = addDemoCase(scene)
    cancelled = job.ExplainJob(nodes.stackVolumes(volumes), job.Region("predicted"), job.ExplainSettings())
    with pytest.raises(SegExplainError, match="has not been started"):
        _ = cancelled.outputFolder
    cancelled.start()
    assert cancelled.running and cancelled.folder.is_dir()
    with pytest.raises(SegExplainError, match="runs once; this one is running"):
        cancelled.start()
    cancelled.cancel()
    assert cancelled.state == "cancelled" and not cancelled.running
    assert not cancelled.folder.exists()
    assert cancelled._process.poll() is not None
    with pytest.raises(SegExplainError, match="runs once; this one is cancelled"):
        cancelled.start()


#: A throwaway host: starts a long job (occlusion of the whole class) on the demo case, prints the child's pid and the
#: job folder once the child reports progress (or at once with "now"), then idles until it is killed.
HOST_SCRIPT = """
import json, sys, time
from SegExplainMRML.job import ExplainJob, ExplainSettings, Region
from SegExplainMRML.nodes import VolumeStack
from SegExplainLib.demo import SEQUENCE_NAMES, make_case
from SegExplainLib.imaging import Geometry

image, _ = make_case(1000)
geometry = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), image.shape[:0:-1])
job = ExplainJob(VolumeStack(image, geometry, tuple(SEQUENCE_NAMES), None), Region("class"),
                 ExplainSettings(method="occlusion"))
job.start()
while sys.argv[1] == "busy" and not job.poll():
    time.sleep(0.05)
print(json.dumps({"pid": job._process.pid, "folder": str(job.folder)}), flush=True)
time.sleep(600)
"""


def processRuns(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an orphan's zombie lasts until init reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and kills with SIGKILL")
@pytest.mark.parametrize("when", ["now", "busy"])
def test_a_job_ends_with_the_process_that_started_it(when):
    """A host killed with SIGKILL (as a crash would) takes its job along: the child ends and the patient's images in
    the job folder are deleted, whether the child was still starting or already explaining."""
    host = subprocess.Popen([sys.executable, "-c", HOST_SCRIPT, when], stdout=subprocess.PIPE, text=True)
    try:
        started = json.loads(host.stdout.readline() or "{}")
        assert started, "the host did not start its job"
        child, folder = started["pid"], Path(started["folder"])
        assert processRuns(child)
    finally:
        host.kill()
        host.wait()
    deadline = time.monotonic() + 15
    while (processRuns(child) or folder.exists()) and time.monotonic() < deadline:
        time.sleep(0.1)
    if processRuns(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail(f"the job process {child} outlived its host by 15 s")
    assert not folder.exists(), f"the job folder {folder} outlived its host"
