"""SegExplainMRML.job: settings, regions and the warm worker answering the clicks (start, reuse, crash, cancel,
another model, another case)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import slicer
from mrml_scene import addDemoCase, addVolume, explaining
from SegExplainMRML import job, workflow

from SegExplainLib.errors import SegExplainError


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
    ({"preview": "no"}, "preview must be True or False, got 'no'"),
])
def test_settings_validation_names_the_value(options, message):
    """Each bad setting is refused with a message naming the value."""
    with pytest.raises(SegExplainError, match=message):
        job.ExplainSettings(**options)


def words(settings: job.ExplainSettings) -> list[str]:
    """The ``segexplain explain`` options of ``settings`` for the predicted region."""
    return settings.request(job.Region("predicted")).arguments()


def test_settings_accept_cuda_devices():
    """'cuda' and 'cuda:N' are valid devices."""
    arguments = words(job.ExplainSettings(device="cuda:1"))
    assert arguments[arguments.index("--device") + 1] == "cuda:1"
    assert job.ExplainSettings(device="cuda").device == "cuda"


def test_arguments_per_method():
    """LRP passes its composite (and layer filter), IG its steps and baseline, other methods neither."""
    lrp = words(job.ExplainSettings(method="lrp", composite="epsilon_plus_flat", layerFilter="pass:0.4"))
    assert lrp[lrp.index("--composite") + 1] == "epsilon_plus_flat"
    assert lrp[lrp.index("--layer-filter") + 1] == "pass:0.4"
    assert "--n-steps" not in lrp and "--baseline" not in lrp
    assert "--layer-filter" not in words(job.ExplainSettings(method="lrp"))
    ig = words(job.ExplainSettings(method="integrated_gradients", nSteps=16, baseline="blur:2"))
    assert ig[ig.index("--n-steps") + 1] == "16" and ig[ig.index("--baseline") + 1] == "blur:2"
    assert "--composite" not in ig
    for method in ("gradient", "smoothgrad", "occlusion"):
        arguments = words(job.ExplainSettings(method=method, classIndex=2, seed=7))
        assert not {"--composite", "--n-steps", "--baseline"} & set(arguments)
        assert arguments[arguments.index("--method") + 1] == method
        assert arguments[arguments.index("--class") + 1] == "2" and arguments[arguments.index("--seed") + 1] == "7"


def test_arguments_for_sampling_and_extra_options():
    """Samples are passed only for the normalized aggregation; extra options are passed as JSON."""
    assert "--samples" not in words(job.ExplainSettings(samples=100))
    normalized = words(job.ExplainSettings(aggregation="normalized", samples=100, extraOptions={"epsilon": 0.25}))
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


def test_region_requests():
    """Each region kind becomes the request's region; a segment travels as its mask, outside the request."""
    settings = job.ExplainSettings()
    predicted = settings.request(job.Region("predicted"))
    assert settings.request(job.Region("segment", mask=np.ones((2, 2, 2), bool))) == predicted
    assert settings.request(job.Region("box", box=(0, 1, 2, 3, 4, 5))).box_index == (0, 1, 2, 3, 4, 5)
    point = settings.request(job.Region("point", pointRas=(1.5, -2.25, 30.0), radius=4))
    assert point.point_ras == (1.5, -2.25, 30.0) and point.radius == 4.0
    assert point.arguments()[:6] == ["--point-ras", "1.5", "-2.25", "30.0", "--radius", "4.0"]
    assert settings.request(job.Region("class")).whole_class
    assert predicted.arguments()[0] == "--composite"  # no region option: the predicted region


@pytest.fixture
def explainer():
    explainer = job.WarmExplainer()
    yield explainer
    explainer.close()


#: A slow click: occlusion with 2-voxel windows of the predicted region takes far longer than the test waits.
SLOW = job.ExplainSettings(method="occlusion", extraOptions={"window": 2})


def click(explainer, volumes, region=None, settings=None, model=None):
    """What the Explain button does, with the demo model by default."""
    return workflow.startExplanation(explainer, volumes, [v.GetName() for v in volumes], region or job.Region(
        "predicted", description="predicted region"), settings or job.ExplainSettings(), model or job.ModelSource())


@pytest.mark.parametrize(("name", "safe"), [("T2", "T2"), ("T1-20s", "T1-20s"), ("T1 post/Gd", "T1_post_Gd"),
                                            ("DWI[0]", "DWI_0_"), ("..", "sequence"), (".b1000.", "b1000"),
                                            ("Flair é", "Flair__")])
def test_file_safe(name, safe):
    """Sequence names become file names without separators, spaces or leading dots."""
    assert job.fileSafe(name) == safe


def test_missing_card_is_refused(scene, tmp_path, explainer):
    """A model card that is not a file is refused before any worker starts."""
    volume = addVolume(scene, np.zeros((2, 3, 4)))
    with pytest.raises(SegExplainError, match="model card .*missing.yaml.* is not a file"):
        explainer.prepare(job.ModelSource("card", str(tmp_path / "missing.yaml")), [volume], ["T2"])
    assert explainer.worker is None


def test_volumes_named_after_other_sequences_are_refused(scene, explainer):
    """The module's mix-up of issue 19: a volume chosen for a sequence whose name says another one."""
    from SegExplainLib.application.demo import SEQUENCE_NAMES

    volumes, _ = addDemoCase(scene)
    swapped = [volumes[1], volumes[0], *volumes[2:]]
    with pytest.raises(SegExplainError, match=r"names say other sequences .*: 4: T2 -> T2, 5: T1 -> T1, "):
        explainer.prepare(job.ModelSource("card", ""), swapped, list(SEQUENCE_NAMES))
    assert explainer.worker is None
    explainer.prepare(job.ModelSource("card", ""), volumes, list(SEQUENCE_NAMES))  # each where it belongs
    assert explainer.worker is not None


CODE_MODEL_FILE = """
from pathlib import Path

Path(__file__).with_name("ran.txt").write_text("the model file ran")

from torch import nn


def Net():
    return nn.Conv3d(1, 2, kernel_size=1)
"""


def test_a_card_that_runs_code_needs_the_users_word(scene, tmp_path, rng, explainer):
    """A card naming a model file is refused before anything runs; the user's trustModelCode reaches the worker."""
    (tmp_path / "net.py").write_text(CODE_MODEL_FILE)
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"model": "net.py:Net", "sequences": ["T2"], "classes": ["background", "lesion"]}))
    volumes = [addVolume(scene, rng.normal(size=(3, 4, 5)), name="T2")]
    settings, model = job.ExplainSettings(method="gradient"), job.ModelSource("card", str(card))
    with pytest.raises(SegExplainError, match=r"model card '.*card\.json' would run the Python file '.*net\.py'.*"
                                              r"'Allow code from this model'.*--trust-model-code"):
        workflow.startExplanation(explainer, volumes, ["T2"], job.Region("class"), settings, model)
    with pytest.raises(SegExplainError, match="trustModelCode must be True or False, got 1"):
        workflow.startExplanation(explainer, volumes, ["T2"], job.Region("class"), settings, model, trustModelCode=1)
    assert explainer.worker is None and not (tmp_path / "ran.txt").exists()
    trusted = workflow.startExplanation(explainer, volumes, ["T2"], job.Region("class"), settings, model,
                                        trustModelCode=True)
    assert trusted.wait(120) == "done", trusted.error
    assert "--trust-model-code" in trusted.command()
    assert (tmp_path / "ran.txt").is_file()  # the worker ran the card's model file


def test_the_worker_starts_with_the_inputs_and_every_click_reuses_it(demoRun, scene, explainer):
    """Preparing returns at once and loads in the background; two clicks are answered by the one worker process,
    with no second case; the record is the command line's summary and reproduces the result."""
    run = demoRun.run
    assert run.state == "done" and run.fraction == 1.0 and run.error == ""
    steps = [event.get("step") for event in demoRun.events if event.get("event") == "progress"]
    assert steps == ["loading model", "preparing the case", "explaining"]
    assert demoRun.record["target"]["index"] == list(demoRun.voxel)
    names = [job.fileSafe(n) for n in run.stack.names]
    assert demoRun.record["sequence_names"] == names and demoRun.record["method"] == "lrp"
    assert demoRun.record["relevance_shares"]["positive"].keys() == set(names)
    command = demoRun.record["command"]
    assert command[:3] == ["segexplain", "explain", "--input"] and "--point-ras" in command
    assert command[command.index("--card") + 1] == job.demoCardPath()

    volumes, _ = addDemoCase(scene)
    started = time.monotonic()
    workflow.prepareExplanation(explainer, volumes, [v.GetName() for v in volumes], None)
    assert time.monotonic() - started < 1.0 and not explainer.ready
    worker, caseRequest = explainer.worker, explainer.worker.case_request
    pid = worker._process.pid
    first = click(explainer, volumes)
    assert first.wait(120) == "done", first.error
    assert explainer.ready
    second = click(explainer, volumes, settings=job.ExplainSettings(method="gradient"))
    assert second.wait(60) == "done", second.error
    assert explainer.worker is worker and worker.starts == 1 and worker._process.pid == pid
    assert worker.case_request == caseRequest  # the same volumes: no second case
    assert second.answer.maps.shape == (6, *volumes[0].GetImageData().GetDimensions()[::-1])
    assert second.record()["method"] == "gradient"


def test_the_timer_ticks_warm_the_worker_before_the_first_click(scene, explainer):
    """The host starts no thread: a front end's timer polls while the explainer is ``loading``, and that alone sends
    the whole case and gets the model loaded, so that the first click finds the worker ready."""
    volumes, _ = addDemoCase(scene)
    assert not explainer.loading  # no worker yet
    workflow.prepareExplanation(explainer, volumes, [v.GetName() for v in volumes], None)
    assert explainer.loading and not explainer.ready
    deadline = time.monotonic() + 120
    while explainer.loading and time.monotonic() < deadline:
        explainer.poll(0.05)  # the module's 50 ms timer tick
    assert explainer.ready and not explainer.loading
    explainer.worker._process.kill()
    explainer.worker._process.wait(10)
    explainer.poll(0.05)
    assert not explainer.loading  # a dead worker has nothing to move: the timer stops


def test_a_crash_fails_its_click_and_the_next_click_restarts_the_worker(scene, explainer):
    """A killed worker fails the click it was running with a one-line error; the next click starts a fresh worker,
    which loads the model and the case again and answers."""
    volumes, _ = addDemoCase(scene)
    slow = click(explainer, volumes, settings=SLOW)
    explaining(slow)
    killed = explainer.worker._process.pid
    os.kill(killed, signal.SIGKILL)
    assert slow.wait(30) == "failed"
    assert "the worker process ended (exit code -9)" in slow.error and "\n" not in slow.error
    again = click(explainer, volumes)
    assert again.wait(120) == "done", again.error
    assert explainer.worker.starts == 2 and explainer.worker._process.pid != killed
    assert again.answer.maps.any()


def test_cancel_interrupts_the_click_and_the_worker_stays_warm(scene, explainer):
    """Cancel stops the running explanation at once; the next click is answered by the same warm worker."""
    volumes, _ = addDemoCase(scene)
    slow = click(explainer, volumes, settings=SLOW)
    explaining(slow)
    started = time.monotonic()
    slow.cancel()
    assert time.monotonic() - started < 5
    assert slow.state == "cancelled" and not slow.running
    assert explainer.worker.answer(slow.request).state == "cancelled"
    again = click(explainer, volumes)
    assert again.wait(60) == "done", again.error
    assert explainer.worker.starts == 1 and explainer.worker.state == "running"


def test_another_model_starts_another_worker_and_other_voxels_a_new_case(scene, explainer, tmp_path):
    """New voxels in an input volume send a new case to the same worker; another model card ends the worker and
    starts one for that model."""
    volumes, _ = addDemoCase(scene)
    assert click(explainer, volumes).wait(120) == "done"
    worker, caseRequest = explainer.worker, explainer.worker.case_request
    before = click(explainer, volumes).wait(60) and explainer.worker.case_request
    assert before == caseRequest
    slicer.util.arrayFromVolume(volumes[0])[:] *= 2.0
    slicer.util.arrayFromVolumeModified(volumes[0])
    changed = click(explainer, volumes)
    assert changed.wait(60) == "done", changed.error
    assert explainer.worker is worker and worker.starts == 1 and worker.case_request > caseRequest
    np.testing.assert_array_equal(changed.stack.image[0], slicer.util.arrayFromVolume(volumes[0]))
    for name in ("card.json", "demo_unet.safetensors"):
        shutil.copy(Path(job.demoCardPath()).with_name(name), tmp_path / name)
    other = click(explainer, volumes, model=job.ModelSource("card", str(tmp_path / "card.json")))
    assert other.wait(120) == "done", other.error
    assert explainer.worker is not worker and worker.state == "closed" and explainer.worker.starts == 1
    assert other.record()["command"][other.record()["command"].index("--card") + 1] == str(tmp_path / "card.json")


def test_a_failing_click_reports_one_line_and_the_worker_stays(scene, explainer):
    """A point outside the grid fails the click with the command line's one-line message, no traceback."""
    volumes, _ = addDemoCase(scene)
    failing = click(explainer, volumes, region=job.Region("point", pointRas=(1000.0, 1000.0, 1000.0)))
    assert failing.wait(120) == "failed"
    assert "lies outside the volume" in failing.error
    assert "\n" not in failing.error and "Traceback" not in failing.error
    with pytest.raises(SegExplainError, match="is failed, not done"):
        failing.record()
    assert click(explainer, volumes).wait(60) == "done" and explainer.worker.starts == 1


def test_a_warning_of_the_engine_reaches_the_scene(scene, explainer):
    """IG with two fixed nodes from a zero baseline misses completeness: the record carries the engine's warning,
    and the loaded explanation shows it to the module."""
    volumes, _ = addDemoCase(scene)
    settings = job.ExplainSettings(method="integrated_gradients", nSteps=2, baseline="zero",
                                   extraOptions={"quadrature": "gausslegendre"})
    run = click(explainer, volumes, settings=settings)
    assert run.wait(120) == "done", run.error
    explanation = workflow.finishExplanation(run, volumes)
    assert len(explanation.warnings) == 1 and "misses completeness" in explanation.warnings[0]


def test_a_click_cancelled_while_queued_is_never_run(scene, explainer):
    """A click cancelled while it waits behind the model load and the case is answered cancelled without running,
    so the next click does not wait for it."""
    volumes, _ = addDemoCase(scene)
    queued = click(explainer, volumes, settings=SLOW)
    assert not queued._explaining
    queued.cancel()
    assert queued.state == "cancelled"
    again = click(explainer, volumes)
    assert again.wait(120) == "done", again.error
    assert explainer.worker.answer(queued.request).state == "cancelled"
    assert explainer.worker.starts == 1
