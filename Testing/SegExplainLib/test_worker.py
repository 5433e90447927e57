"""The warm worker: in this process (WarmSession) and as a child process (Worker), on the bundled demo model."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from SegExplainLib.application.demo import write_demo_case
from SegExplainLib.application.model_source import ModelSource
from SegExplainLib.application.requests import EvaluationRequest, ExplainRequest
from SegExplainLib.engine.api import explain
from SegExplainLib.engine.targets import MaskTarget, VoxelTarget
from SegExplainLib.errors import SegExplainError
from SegExplainLib.frontends import worker as worker_module
from SegExplainLib.frontends.worker import WarmSession, Worker, process_tree
from SegExplainLib.frontends.worker.serving import THREADS_VARIABLE, choose_threads, machine_load
from SegExplainLib.io.imaging import read_sequences
from SegExplainLib.models.demo_card import demo_card_path
from SegExplainLib.models.loading import ModelCard

CLICK = ["--voxel", "9", "24", "24", "--radius", "1"]
LRP = ["--method", "lrp", "--composite", "epsilon_plus"]


def ask(*words: str) -> ExplainRequest:
    """A request from the words of ``segexplain explain``."""
    return ExplainRequest.from_arguments(words)


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
    with Worker(ModelSource.from_arguments(["--card", str(demo_card_path())])) as running:
        running.start()
        running.wait(running.set_case(image, geometry), timeout=120)
        yield running


def test_a_session_answers_as_the_engine(case, reference):
    session = WarmSession(ModelSource.from_arguments(["--card", str(demo_card_path())]))
    assert session.sequences == ModelCard.read(demo_card_path()).sequences
    session.set_case(*case)
    result = session.explain(ask(*CLICK, *LRP, "--device", "cpu"))
    np.testing.assert_allclose(result.maps, reference.maps, rtol=1e-5, atol=1e-7)
    assert result.target == reference.target


def test_requests_are_checked_as_the_command_line_checks_them(case):
    session = WarmSession(ModelSource.from_arguments(["--card", str(demo_card_path())]))
    with pytest.raises(SegExplainError, match="no case yet"):
        session.explain(ask(*CLICK))
    session.set_case(*case)
    with pytest.raises(SegExplainError, match=r"voxel \(99, 24, 24\) lies outside the output grid"):
        session.explain(ask("--voxel", "99", "24", "24"))
    with pytest.raises(SegExplainError, match="unrecognized arguments: --bogus"):
        session.explain(ask("--bogus"))
    with pytest.raises(SegExplainError, match="mask has shape"):
        session.explain(ask(), mask=np.ones((2, 2, 2), bool))
    with pytest.raises(SegExplainError, match="no model given"):
        WarmSession(ModelSource.from_arguments([]))


def test_the_worker_answers_every_click_with_the_engines_maps(worker, case, reference):
    assert worker.sequences == ModelCard.read(demo_card_path()).sequences
    for _ in range(2):  # the same warm process for every click
        answer = worker.wait(worker.explain(ask(*CLICK, *LRP, "--device", "cpu")), timeout=120)
        np.testing.assert_allclose(answer.maps, reference.maps, rtol=1e-5, atol=1e-7)
        assert answer.record["target"]["kind"] == "voxel"
        assert ExplainRequest.from_arguments(answer.record["request_arguments"]) == ask(*CLICK, *LRP, "--device", "cpu")
        assert answer.record["model_arguments"] == ["--card", str(demo_card_path())]
    assert worker.starts == 1


@pytest.mark.parametrize(("load", "cores", "expected"), [(0.1, 2, 2), (0.8, 2, 2), (1.2, 2, 1), (3.5, 2, 1),
                                                         (0.0, 16, 16), (5.2, 16, 11), (40.0, 16, 1)])
def test_the_threads_are_the_cores_the_load_leaves_free(load, cores, expected):
    assert choose_threads(load=load, cores=cores) == expected


def test_a_thread_setting_is_honoured_and_checked():
    assert choose_threads(load=40.0, cores=2, requested="2") == 2
    for bad in ("0", "two", "-1", ""):
        with pytest.raises(SegExplainError, match=f"{THREADS_VARIABLE} must be a whole number.*got {bad!r}"):
            choose_threads(load=0.0, cores=2, requested=bad)


def test_the_record_says_how_many_threads_the_click_got(worker, case, monkeypatch):
    """The machine's choice in the shared worker; the user's setting (inherited by a new child) in another."""
    answer = worker.wait(worker.explain(ask(*CLICK, "--method", "gradient")), timeout=60)
    assert 1 <= answer.record["torch_threads"] <= os.cpu_count()
    monkeypatch.setenv(THREADS_VARIABLE, "3")
    image, geometry = case
    with Worker(ModelSource.from_arguments(["--card", str(demo_card_path())])) as set_by_user:
        set_by_user.start()
        set_by_user.wait(set_by_user.set_case(image, geometry), timeout=120)
        answer = set_by_user.wait(set_by_user.explain(ask(*CLICK, "--method", "gradient")), timeout=60)
    assert answer.record["torch_threads"] == 3


def test_a_segment_travels_as_an_array(worker, case):
    image, _ = case
    mask = np.zeros(image.shape[1:], bool)
    mask[8:11, 22:27, 22:27] = True
    answer = worker.wait(worker.explain(ask("--method", "gradient"), mask=mask), timeout=120)
    card = ModelCard.read(demo_card_path())
    expected = explain(card.load_model(), card.normalize(image), MaskTarget(mask, class_index=1), "gradient",
                       device="cpu")
    np.testing.assert_allclose(answer.maps, expected.maps, rtol=1e-5, atol=1e-8)


def test_the_segment_matrix_travels_as_its_record_and_equals_the_engines(worker, case):
    from SegExplainLib.engine.segments import SegmentMatrix, segment_matrix

    image, _ = case
    labels = np.zeros(image.shape[1:], np.int64)
    labels[8:11, 22:27, 22:27] = 4
    answer = worker.wait(worker.segment_matrix(ask("--method", "gradient"), labels=labels), timeout=120)
    matrix = SegmentMatrix.from_record(answer.record)
    card = ModelCard.read(demo_card_path())
    expected = segment_matrix(card.load_model(), card.normalize(image), method="gradient", segmentation=labels,
                              class_names=card.classes, device="cpu")
    assert matrix.rows == ["background", "lesion"] and matrix.columns == ["background", "label 4"]
    np.testing.assert_allclose(matrix.positive, expected.positive, rtol=1e-5)
    np.testing.assert_allclose(matrix.shares, expected.shares, rtol=1e-5)
    with pytest.raises(SegExplainError, match="segmentation has shape"):
        worker.wait(worker.segment_matrix(ask("--method", "gradient"), labels=labels[1:]), timeout=60)


#: A scorecard that takes seconds on the demo case: two methods, short curves, one randomization stage.
QUICK_SCORING = {"methods": ("gradient", "gradient_x_input"), "steps": 4, "random_orders": 2,
                 "randomization_stages": 1, "n_perturbations": 2}


def test_the_scorecard_travels_as_its_record_with_its_steps_and_equals_the_engines(worker, case):
    from SegExplainLib.engine.evaluation import evaluate, evaluation_steps

    request = EvaluationRequest(ask(*CLICK, "--device", "cpu"), **QUICK_SCORING)
    number = worker.evaluate(request)
    events = []
    while worker.answer(number) is None:
        events += [e for e in worker.poll(0.5) if e.get("request") == number and e["event"] == "progress"]
    record = worker.answer(number).record
    assert [e["step"] for e in events] == ["scoring methods", *evaluation_steps(QUICK_SCORING["methods"])]
    assert [e["fraction"] for e in events[1:]] == sorted(e["fraction"] for e in events[1:])
    assert EvaluationRequest.from_json(record["evaluation_request"]) == request
    assert record["model_arguments"] == ["--card", str(demo_card_path())]
    card = ModelCard.read(demo_card_path())
    image, _ = case
    expected = evaluate(card.load_model(), card.normalize(image), VoxelTarget((9, 24, 24), radius=1, class_index=1),
                        list(QUICK_SCORING["methods"]), sequence_names=card.sequences,
                        **request.evaluation_options()).to_json()["scorecard"]
    assert record["scorecard"]["recommendation"] == expected["recommendation"]
    assert record["scorecard"]["curves"].keys() == expected["curves"].keys()
    for name, curve in expected["curves"].items():
        for mode in ("deletion", "insertion"):
            np.testing.assert_allclose(record["scorecard"]["curves"][name][mode], curve[mode], rtol=1e-4)
    for name, row in expected["methods"].items():
        got = record["scorecard"]["methods"][name]
        assert got["verdict"] == row["verdict"]
        assert got["randomization"]["final_spearman"] == pytest.approx(row["randomization"]["final_spearman"], rel=1e-4)
        assert got["robustness"] == pytest.approx(row["robustness"], rel=1e-4)
        assert got["localization"] == pytest.approx(row["localization"], rel=1e-4)


def test_an_evaluate_request_is_checked_in_the_child_and_leaves_the_worker_warm(worker, case):
    good = EvaluationRequest(ask(*CLICK), **QUICK_SCORING).to_json()
    for change, error in [({"steps": 0}, "steps must be an integer >= 1, got 0"),
                          ({"methods": ["nope"]}, "unknown method 'nope'"),
                          ({"bogus": 1}, "EvaluationRequest has no key.s. 'bogus'")]:
        number = worker._request({"op": "evaluate", "evaluate": {**good, **change}})  # as a bad host would send it
        with pytest.raises(SegExplainError, match=error):
            worker.wait(number, timeout=60)
    with pytest.raises(SegExplainError, match="mask has shape"):
        worker.wait(worker.evaluate(EvaluationRequest(**QUICK_SCORING), mask=np.ones((2, 2, 2), bool)), timeout=60)
    with pytest.raises(SegExplainError, match="request must be an EvaluationRequest"):
        worker.evaluate(ask(*CLICK))
    assert worker.wait(worker.explain(ask(*CLICK, "--method", "gradient")), timeout=60).state == "done"
    assert worker.starts == 1


def test_cancel_stops_a_scorecard_and_keeps_the_model_and_case(worker):
    slow = worker.evaluate(EvaluationRequest(ask(*CLICK), methods=("occlusion", "integrated_gradients"),
                                             method_options={"occlusion": {"window": 2}}))
    while not any(e.get("step", "").startswith("explaining: ") for e in worker.poll()):
        time.sleep(0.01)
    worker.cancel()
    assert worker.wait(slow, timeout=60).state == "cancelled"
    assert worker.wait(worker.explain(ask(*CLICK, "--method", "gradient")), timeout=60).state == "done"
    assert worker.starts == 1


def test_a_failed_request_leaves_the_worker_warm(worker):
    with pytest.raises(SegExplainError, match="lies outside the output grid"):
        worker.wait(worker.explain(ask("--voxel", "99", "24", "24")), timeout=60)
    assert worker.wait(worker.explain(ask(*CLICK, "--method", "gradient")), timeout=60).state == "done"


def test_cancel_interrupts_the_request_and_keeps_the_model_and_case(worker):
    slow = worker.explain(ask("--method", "occlusion", "--option", "window=2"))
    while not any(e.get("step") == "explaining" for e in worker.poll()):
        time.sleep(0.01)
    time.sleep(0.3)
    worker.cancel()
    assert worker.wait(slow, timeout=60).state == "cancelled"
    assert worker.wait(worker.explain(ask(*CLICK, "--method", "gradient")), timeout=60).state == "done"
    assert worker.starts == 1


def test_a_crash_fails_the_pending_request_and_a_restart_brings_model_and_case_back(case):
    image, geometry = case
    with Worker(ModelSource.from_arguments(["--card", str(demo_card_path())])) as crashing:
        crashing.start()
        crashing.wait(crashing.set_case(image, geometry), timeout=120)
        pending = crashing.explain(ask("--method", "occlusion", "--option", "window=2"))
        crashing._process.kill()
        with pytest.raises(SegExplainError, match="the worker process ended"):
            crashing.wait(pending, timeout=60)
        assert crashing.state == "dead"
        assert any(event["event"] == "dead" for event in crashing.poll())
        with pytest.raises(SegExplainError, match="the worker is dead; start or restart it first"):
            crashing.explain(ask(*CLICK))
        crashing.restart()
        answer = crashing.wait(crashing.explain(ask(*CLICK, "--method", "gradient")), timeout=120)
        assert answer.state == "done" and answer.maps.shape == image.shape and crashing.starts == 2


def test_a_model_that_cannot_load_fails_its_load_request(tmp_path):
    with Worker(ModelSource.from_arguments(["--card", str(tmp_path / "missing.yaml")])) as broken:
        broken.start()
        with pytest.raises(SegExplainError, match="missing.yaml"):
            broken.wait(broken.load_request, timeout=60)
        with pytest.raises(SegExplainError, match="no model loaded"):
            broken.wait(broken.explain(ask(*CLICK)), timeout=60)


def test_trust_is_the_callers_word():
    with pytest.raises(SegExplainError, match="trust_code must be True or False"):
        ModelSource("card", "x", trust_code="yes")
    with pytest.raises(SegExplainError, match="model must be a ModelSource, got"):
        Worker(["--card", "x", "--trust-model-code"])


HOST = ("import sys, time; from SegExplainLib.frontends.worker import Worker; "
        "from SegExplainLib.application.model_source import ModelSource; worker = Worker(ModelSource.from_arguments(sys.argv[1:])).start(); "
        "worker.wait(worker.load_request, timeout=120); print(worker._process.pid, flush=True); time.sleep(120)")


def _alive(pid: int) -> bool:
    """Running, and not a zombie that an init process without reaping would keep (containers)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_worker_ends_with_its_host_even_a_killed_one():
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


HERE = Path(__file__).resolve().parent


def _executable(folder: Path, name: str, *command: str) -> str:
    """A program ``folder/name`` that runs this interpreter with ``command`` (and its own arguments, when asked)."""
    path = folder / name
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" {" ".join(command)}\n')
    path.chmod(0o755)
    return str(path)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    """A stand-in for ``PythonSlicer``: the interpreter runs as the launcher's own child and gets no signal."""
    return _executable(tmp_path_factory.mktemp("launcher"), "PythonSlicer", f'"{HERE / "launcher_stand_in.py"}"',
                       '"$@"')


def _child_of(pid: int) -> int:
    """The one child process of ``pid`` (the launcher's real interpreter)."""
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        (child,) = children.read().split()
    return int(child)


def _ended(*pids: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _explaining(worker: Worker, request: int) -> None:
    while not any(e.get("step") == "explaining" and e["request"] == request for e in worker.poll()):
        assert worker.answer(request) is None, worker.answer(request)
        time.sleep(0.01)


def test_behind_a_launcher_cancel_reaches_the_work_and_close_leaves_no_process(case, launcher):
    """As inside Slicer: the worker runs behind a launcher that forwards no signal. Cancel stops the computation
    (answered cancelled, the same warm worker answers the next click); close ends the launcher and the worker."""
    image, geometry = case
    with Worker(ModelSource.from_arguments(["--card", str(demo_card_path())]), python=launcher) as behind:
        behind.start()
        behind.wait(behind.load_request, timeout=120)
        started = behind._process.pid
        real = _child_of(started)  # the interpreter, the launcher's own child
        behind.wait(behind.set_case(image, geometry), timeout=120)
        slow = behind.explain(ask("--method", "occlusion", "--option", "window=2"))
        _explaining(behind, slow)
        behind.cancel()
        assert behind.wait(slow, timeout=30).state == "cancelled"
        assert behind.wait(behind.explain(ask(*CLICK, "--method", "gradient")), timeout=60).state == "done"
        assert behind.starts == 1 and _alive(real) and _alive(started)
        _explaining(behind, behind.explain(ask("--method", "occlusion", "--option", "window=2")))  # close while it runs
    assert _ended(started, real, within=2 * worker_module.CLOSE_GRACE_S + 2), "a process outlived close()"


LAUNCHED_HOST = ("import sys, time; from SegExplainLib.frontends.worker import Worker; "
                 "from SegExplainLib.application.model_source import ModelSource; "
                 "worker = Worker(ModelSource.from_arguments(sys.argv[2:]), python=sys.argv[1]).start(); "
                 "worker.wait(worker.load_request, timeout=120); "
                 "print(worker._process.pid, open(f'/proc/{worker._process.pid}/task/{worker._process.pid}/children')"
                 ".read(), flush=True); time.sleep(120)")


def test_behind_a_launcher_the_worker_ends_with_its_killed_host(launcher):
    """The real worker is the host's grandchild (no parent-death signal reaches it): it still ends with the host,
    and the launcher with it."""
    host = subprocess.Popen([sys.executable, "-c", LAUNCHED_HOST, launcher, "--card", str(demo_card_path())],
                            stdout=subprocess.PIPE, text=True)
    started, real = (int(pid) for pid in host.stdout.readline().split())
    try:
        assert _alive(started) and _alive(real)
        host.kill()
        host.wait()
        assert _ended(started, real), "the launcher or the worker outlived its killed host"
    finally:
        for pid in (started, real):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_cancel_and_close_use_no_signal(worker, monkeypatch):
    """Windows has no SIGINT for a child (``send_signal`` raises ValueError): cancel travels through the input."""
    def no_signal(*args):
        raise ValueError(f"no signal on this path, got {args!r}")

    monkeypatch.setattr(subprocess.Popen, "send_signal", no_signal)
    monkeypatch.setattr(os, "kill", no_signal)
    slow = worker.explain(ask("--method", "occlusion", "--option", "window=2"))
    _explaining(worker, slow)
    worker.cancel()
    assert worker.wait(slow, timeout=30).state == "cancelled"
    assert worker.wait(worker.explain(ask(*CLICK, "--method", "gradient")), timeout=60).state == "done"


def test_a_request_cancelled_while_queued_is_not_run(worker):
    """A click cancelled while it waits behind another request is answered cancelled without running."""
    slow = worker.explain(ask("--method", "occlusion", "--option", "window=2"))
    queued = worker.explain(ask("--method", "occlusion", "--option", "window=2"))
    worker.cancel(queued)
    _explaining(worker, slow)
    worker.cancel(slow)
    assert worker.wait(slow, timeout=30).state == "cancelled"
    answer = worker.wait(queued, timeout=30)
    assert answer.state == "cancelled" and answer.seconds < 0.5
    assert worker.wait(worker.explain(ask(*CLICK, "--method", "gradient")), timeout=60).state == "done"


def test_windows_starts_a_process_group_and_kills_the_tree_with_taskkill():
    """The Windows path, by its logic (the OS calls injected): a new process group without a console window, and
    ``taskkill /T /F`` for the tree; POSIX: a new session, and SIGKILL to its process group."""
    assert process_tree.tree_options("nt") == {"creationflags": 0x00000200 | 0x08000000}
    assert process_tree.tree_options("posix") == {"start_new_session": True}

    class Running:
        pid = 4242

        def poll(self):
            return None

    calls = []
    process_tree.kill_tree(Running(), system="nt", run=lambda *args, **options: calls.append((args, options)))
    assert calls[0][0] == (["taskkill", "/PID", "4242", "/T", "/F"],) and calls[0][1]["creationflags"] == 0x08000000
    process_tree.kill_tree(Running(), system="posix", killpg=lambda *args: calls.append(args))
    assert calls[1] == (4242, signal.SIGKILL)


def test_the_host_starts_no_thread_and_a_128_cubed_answer_comes_in_one_tick(tmp_path):
    """Slicer's main thread keeps the interpreter lock: the host side runs on the caller's thread only, moved by
    poll() as a 50 ms GUI timer calls it; six sequences of 128³ float32 (48 MiB) arrive whole in the tick that sees
    their first bytes, not one pipe's worth per tick."""
    from big_answer_worker import SHAPE, expected_maps

    python = _executable(tmp_path, "python", f'"{HERE / "big_answer_worker.py"}"')
    threads = threading.active_count()
    with Worker(ModelSource(), python=python) as big:
        big.start()
        big.wait(big.load_request, timeout=120)
        request = big.explain(ask())
        ticks, halfway, delivering = 0, 0, 0.0
        while big.answer(request) is None:
            assert threading.active_count() == threads
            time.sleep(0.05)  # the module's timer
            started = time.perf_counter()
            big.poll()
            delivering, ticks = time.perf_counter() - started, ticks + 1
            halfway += big._inbox.partial  # a tick that left the answer half read
            assert ticks < 200, "no answer in 10 s of ticks"
        answer = big.wait(request)
        assert answer.state == "done" and answer.maps.shape == SHAPE
        np.testing.assert_array_equal(answer.maps, expected_maps())
        print(f"128^3 x 6 answer: {ticks} ticks, {halfway} left it half read, the last took {delivering:.3f} s")
        assert halfway <= 1  # one tick; two when the machine paused the child for longer than a flow's pause
        assert threading.active_count() == threads


@pytest.mark.parametrize(("average", "text", "expected"), [
    (0.63, "0.63 2.78 3.29 1/345 12345\n", 0.0),  # the average still falls after a busy spell; nothing else runs
    (4.3, "4.30 4.10 3.90 3/345 12345\n", 2.0),  # two busy processes beside the worker
    (0.2, "0.20 0.90 1.10 4/345 12345\n", 0.2),  # a moment's crowd does not outweigh a quiet minute
    (1.5, None, 1.5),  # no /proc/loadavg (macOS, Windows): the average alone
    (1.5, "garbled", 1.5),
])
def test_machine_load_is_the_average_unless_the_machine_is_quiet_now(average, text, expected):
    assert machine_load(average, text) == expected
