"""The warm worker: in this process (WarmSession) and as a child process (Worker), on the bundled demo model."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest

from SegExplainLib.api import explain
from SegExplainLib.demo import demo_card_path, write_demo_case
from SegExplainLib.errors import SegExplainError
from SegExplainLib.imaging import read_sequences
from SegExplainLib.loading import ModelCard
from SegExplainLib.targets import MaskTarget, VoxelTarget
from SegExplainLib.worker import WarmSession, Worker

CLICK = ["--voxel", "9", "24", "24", "--radius", "1"]
LRP = ["--method", "lrp", "--composite", "epsilon_plus"]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    sequences, _ = write_demo_case(tmp_path_factory.mktemp("case"))
    return read_sequences(sequences)


@pytest.fixture(scope="module")
def reference(case):
    """The same click explained directly by the engine, as ``segexplain explain --card`` does."""
    card = ModelCard.read(demo_card_path())
    image, _ = case
    return explain(card.load_model(), card.normalize(image), VoxelTarget((9, 24, 24), radius=1, class_index=1),
                   "lrp", composite="epsilon_plus", device="cpu")


@pytest.fixture(scope="module")
def worker(case):
    image, geometry = case
    with Worker(["--card", str(demo_card_path())]) as running:
        running.start()
        running.wait(running.set_case(image, geometry), timeout=120)
        yield running


def test_a_session_answers_as_the_engine(case, reference):
    session = WarmSession(["--card", str(demo_card_path())])
    assert session.sequences == ModelCard.read(demo_card_path()).sequences
    session.set_case(*case)
    result = session.explain([*CLICK, *LRP, "--device", "cpu"])
    np.testing.assert_allclose(result.maps, reference.maps, rtol=1e-5, atol=1e-7)
    assert result.target == reference.target


def test_requests_are_checked_as_the_command_line_checks_them(case):
    session = WarmSession(["--card", str(demo_card_path())])
    with pytest.raises(SegExplainError, match="no case yet"):
        session.explain(CLICK)
    session.set_case(*case)
    with pytest.raises(SegExplainError, match=r"voxel \(99, 24, 24\) lies outside the output grid"):
        session.explain(["--voxel", "99", "24", "24"])
    with pytest.raises(SegExplainError, match="unrecognized arguments: --bogus"):
        session.explain(["--bogus"])
    with pytest.raises(SegExplainError, match="mask has shape"):
        session.explain([], mask=np.ones((2, 2, 2), bool))
    with pytest.raises(SegExplainError, match="no model given"):
        WarmSession([])


def test_the_worker_answers_every_click_with_the_engines_maps(worker, case, reference):
    assert worker.sequences == ModelCard.read(demo_card_path()).sequences
    for _ in range(2):  # the same warm process for every click
        answer = worker.wait(worker.explain([*CLICK, *LRP, "--device", "cpu"]), timeout=120)
        np.testing.assert_allclose(answer.maps, reference.maps, rtol=1e-5, atol=1e-7)
        assert answer.record["target"]["kind"] == "voxel"
        assert answer.record["request_arguments"] == [*CLICK, *LRP, "--device", "cpu"]
        assert answer.record["model_arguments"] == ["--card", str(demo_card_path())]
    assert worker.starts == 1


def test_a_segment_travels_as_an_array(worker, case):
    image, _ = case
    mask = np.zeros(image.shape[1:], bool)
    mask[8:11, 22:27, 22:27] = True
    answer = worker.wait(worker.explain(["--method", "gradient"], mask=mask), timeout=120)
    card = ModelCard.read(demo_card_path())
    expected = explain(card.load_model(), card.normalize(image), MaskTarget(mask, class_index=1), "gradient",
                       device="cpu")
    np.testing.assert_allclose(answer.maps, expected.maps, rtol=1e-5, atol=1e-8)


def test_a_failed_request_leaves_the_worker_warm(worker):
    with pytest.raises(SegExplainError, match="lies outside the output grid"):
        worker.wait(worker.explain(["--voxel", "99", "24", "24"]), timeout=60)
    assert worker.wait(worker.explain([*CLICK, "--method", "gradient"]), timeout=60).state == "done"


def test_cancel_interrupts_the_request_and_keeps_the_model_and_case(worker):
    slow = worker.explain(["--method", "occlusion", "--option", "window=2"])
    while not any(e.get("step") == "explaining" for e in worker.poll()):
        time.sleep(0.01)
    time.sleep(0.3)
    worker.cancel()
    assert worker.wait(slow, timeout=60).state == "cancelled"
    assert worker.wait(worker.explain([*CLICK, "--method", "gradient"]), timeout=60).state == "done"
    assert worker.starts == 1


def test_a_crash_fails_the_pending_request_and_a_restart_brings_model_and_case_back(case):
    image, geometry = case
    with Worker(["--card", str(demo_card_path())]) as crashing:
        crashing.start()
        crashing.wait(crashing.set_case(image, geometry), timeout=120)
        pending = crashing.explain(["--method", "occlusion", "--option", "window=2"])
        crashing._process.kill()
        with pytest.raises(SegExplainError, match="the worker process ended"):
            crashing.wait(pending, timeout=60)
        assert crashing.state == "dead"
        assert any(event["event"] == "dead" for event in crashing.poll())
        with pytest.raises(SegExplainError, match="the worker is dead; start or restart it first"):
            crashing.explain(CLICK)
        crashing.restart()
        answer = crashing.wait(crashing.explain([*CLICK, "--method", "gradient"]), timeout=120)
        assert answer.state == "done" and answer.maps.shape == image.shape and crashing.starts == 2


def test_a_model_that_cannot_load_fails_its_load_request(tmp_path):
    with Worker(["--card", str(tmp_path / "missing.yaml")]) as broken:
        broken.start()
        with pytest.raises(SegExplainError, match="missing.yaml"):
            broken.wait(broken.load_request, timeout=60)
        with pytest.raises(SegExplainError, match="no model loaded"):
            broken.wait(broken.explain(CLICK), timeout=60)


def test_trust_is_the_callers_word():
    with pytest.raises(SegExplainError, match="trust_code must be True or False"):
        Worker(["--card", "x"], trust_code="yes")


HOST = ("import sys, time; from SegExplainLib.worker import Worker; worker = Worker(sys.argv[1:]).start(); "
        "worker.wait(worker.load_request, timeout=120); print(worker._process.pid, flush=True); time.sleep(120)")


def _alive(pid: int) -> bool:
    """Running, and not a zombie that an init process without reaping would keep (containers)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_worker_ends_with_its_host_even_a_killed_one():
    import os
    import signal
    import subprocess
    import sys

    host = subprocess.Popen([sys.executable, "-c", HOST, "--card", str(demo_card_path())], stdout=subprocess.PIPE,
                            text=True)
    child = int(host.stdout.readline())
    try:
        assert _alive(child)  # the worker runs while its host does
        host.kill()
        host.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not _alive(child):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the worker outlived its killed host")
    finally:
        if host.poll() is None:
            host.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
