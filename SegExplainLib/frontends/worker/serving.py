"""The worker's child: it answers the host's requests from a :class:`~.session.WarmSession`, one after another,
and acts on ``cancel`` and ``close`` messages while a request runs (:class:`_Control`).

The model and each explanation request come as their JSON and are read with the application's classes
(:meth:`ModelSource.from_json`, :meth:`ExplainRequest.from_json`), so a bad field is answered ``failed`` with the
class's one-line message.
"""

from __future__ import annotations

import _thread
import contextlib
import math
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from ...application.model_source import ModelSource
from ...application.requests import EvaluationRequest, ExplainRequest
from ...errors import SegExplainError
from .framing import Inbox, Outbox
from .process_tree import CLOSE_GRACE_S
from .session import WarmSession

#: What the child is doing for each request, as its progress events name it.
_STEPS = {"load": "loading model", "case": "preparing the case", "explain": "explaining",
          "segment_matrix": "explaining every segment", "evaluate": "scoring methods"}
#: The progress step of a request whose preview was sent, while its exact answer is computed.
REFINING = "refining to the full ensemble"
#: The environment variable that sets the child's torch threads, instead of the choice from the machine's load.
THREADS_VARIABLE = "SEGEXPLAIN_THREADS"


def choose_threads(*, load: float, cores: int, requested: str | None = None) -> int:
    """The torch threads of an explanation: ``requested`` (the user's setting) if given, else the cores that the
    machine's load leaves free (a core counts as taken once a whole process keeps it busy), at least one.

    On a busy machine a second thread waits for a core and slows the explanation down (on a 2-core machine at load
    3-4, 0.65-6.6 s with 2 threads against 0.21-0.29 s with 1, issue 19).

    Args:
        load: The machine's run-queue length, e.g. the one-minute ``os.getloadavg()[0]``.
        cores: The machine's cores (``os.cpu_count()``).
        requested: The value of ``SEGEXPLAIN_THREADS``, or None when unset.

    Raises:
        SegExplainError: ``requested`` is not a whole number of at least 1.
    """
    if requested is not None:
        if not requested.strip().isdigit() or int(requested) < 1:
            raise SegExplainError(f"{THREADS_VARIABLE} must be a whole number of threads, at least 1, "
                                  f"got {requested!r}")
        return int(requested)
    return max(1, min(cores, cores - math.floor(load)))


def machine_load(average: float, loadavg_text: str | None) -> float:
    """How busy the machine is now: the one-minute load average, or fewer when Linux's count of processes running
    this instant (``/proc/loadavg``'s ``running/total``, this worker itself left out) says the load has gone.

    The average trails the machine by about a minute: after a busy spell, an idle machine still shows a load of 0.6
    on two cores. A load that has just begun is seen a minute late, by the average; the count alone would be too
    noisy.

    Args:
        average: The one-minute load average (``os.getloadavg()[0]``).
        loadavg_text: The text of ``/proc/loadavg``, or None where there is none.
    """
    fields = (loadavg_text or "").split()
    running = fields[3].partition("/")[0] if len(fields) > 3 else ""
    return min(average, max(int(running) - 1, 0)) if running.isdigit() else average


def _machine_threads() -> int:
    """:func:`choose_threads` for this machine now (no load average on Windows: all cores)."""
    average = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    try:
        with open("/proc/loadavg") as handle:
            text = handle.read()
    except OSError:  # not Linux
        text = None
    return choose_threads(load=machine_load(average, text), cores=os.cpu_count() or 1,
                          requested=os.environ.get(THREADS_VARIABLE))


def _one_line(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return text if isinstance(error, SegExplainError) else f"{type(error).__name__}: {text}"


class _Control:
    """The child's control of its requests, fed by the thread that reads its input.

    ``cancel`` messages act at once: the running request is interrupted in the main thread (``KeyboardInterrupt``,
    through :func:`_thread.interrupt_main`: no OS signal, so the same on every system), a queued one is answered
    ``cancelled`` without running. The end of the input (the host closed or ended) interrupts the running request, and
    ends the process if the request does not stop within :data:`CLOSE_GRACE_S`.
    """

    def __init__(self) -> None:
        self.requests: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.running: int | None = None
        self.stopping: int | None = None
        self.cancelled: set[int] = set()
        self.closing = threading.Event()

    def receive(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        if header.get("op") == "cancel":
            self.cancel(header.get("target"))
        elif header.get("op") == "close":
            self.close()
        else:
            self.requests.put((header, arrays))

    def close(self) -> None:
        """Stop the running request and let no queued one start."""
        self.closing.set()
        self.cancel(None)
        self.requests.put(None)

    def cancel(self, target: int | None) -> None:
        """Interrupt ``target`` if it runs (None: whatever runs), or answer it ``cancelled`` when its turn comes."""
        with self.lock:
            if self.running is not None and target in (None, self.running):
                self.stopping = self.running
                _thread.interrupt_main(signal.SIGINT)
            elif target is not None:
                self.cancelled.add(target)

    def begin(self, number: int) -> bool:
        """Mark ``number`` running; False when it was cancelled while queued, or the worker closes."""
        with self.lock:
            if number in self.cancelled or self.closing.is_set():
                self.cancelled.discard(number)
                return False
            self.running = number
            return True

    @contextlib.contextmanager
    def sending(self, number: int) -> Iterator[None]:
        """Write a message while request ``number`` runs: no interrupt may land in it (half a message would break
        the stream), so a cancel that comes meanwhile is raised once the message is whole."""
        with self.lock:
            self.running = None
        try:
            yield
        finally:
            with self.lock:
                stop = self.stopping == number or number in self.cancelled
                self.cancelled.discard(number)
                self.running = None if stop else number
        if stop:
            raise KeyboardInterrupt

    def interrupt(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - a signal handler's signature
        # only the request that was cancelled is interrupted, never the next one (the interrupt may come late)
        if self.stopping is not None and self.stopping == self.running:
            raise KeyboardInterrupt

    def read_until_end(self, fd: int) -> None:
        """The input thread: hand every message over, then stop the work when the input ends."""
        Inbox(fd, self.receive).read()
        self.close()
        time.sleep(CLOSE_GRACE_S)
        os._exit(0)  # the main thread is deaf to the interrupt (a long native call): the host is gone, so end


def serve(inputs: int, outputs: int) -> None:
    """The child's loop: answer requests from the descriptor ``inputs`` on ``outputs`` until ``close`` or the end of
    the input; ``cancel`` messages are read and acted on while a request runs (see :class:`_Control`)."""
    from ...io.imaging import Geometry

    session: WarmSession | None = None
    control, out = _Control(), Outbox(outputs)

    def send(header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> None:
        out.put(header, arrays)
        out.write()

    signal.signal(signal.SIGINT, control.interrupt)
    threading.Thread(target=control.read_until_end, args=(inputs,), name="segexplain-input", daemon=True).start()
    while (message := control.requests.get()) is not None:
        header, arrays = message
        number, operation, started = header.get("request", 0), header.get("op"), time.perf_counter()
        if operation in _STEPS and number not in control.cancelled:
            send({"event": "progress", "request": number, "step": _STEPS[operation]})
        try:  # only in here may the interrupt of a cancel land (it is raised while this request runs)
            if not control.begin(number):
                raise KeyboardInterrupt
            if operation == "load":
                session = WarmSession(ModelSource.from_json(header["model"]))
                record = {"sequences": session.sequences, "model": session.description}
                answer = ({"state": "done", "record": record}, {})
            elif session is None:
                raise SegExplainError("no model loaded")
            elif operation == "case":
                record = session.set_case(arrays["image"], Geometry(**header["geometry"]))
                answer = ({"state": "done", "record": record}, {})
            elif operation == "explain":
                import torch

                request = ExplainRequest.from_json(header["explain"])
                threads = _machine_threads()  # per click: the machine's load changes while the worker waits
                torch.set_num_threads(threads)
                preview = request.preview and session.preview is not None
                for shown in (True, False) if preview else (False,):
                    result = session.explain(request, mask=arrays.get("mask"), preview=shown)
                    record = {**result.record(), **session.shown(preview=shown),
                              "request_arguments": request.arguments(),
                              "model_arguments": session.source.arguments(),  # the command line of the exact answer
                              "torch_threads": threads}
                    answer = ({"state": "done", "record": record}, {"maps": result.maps.astype(np.float32)})
                    if shown:  # the first answer at once; the exact one follows in this request, unless cancelled
                        with control.sending(number):
                            send({"event": "preview", "request": number, "seconds": time.perf_counter() - started,
                                  **answer[0]}, answer[1])
                            send({"event": "progress", "request": number, "step": REFINING})
            elif operation == "segment_matrix":
                import torch

                torch.set_num_threads(_machine_threads())
                matrix = session.segment_matrix(ExplainRequest.from_json(header["explain"]),
                                                labels=arrays.get("labels"))
                answer = ({"state": "done", "record": matrix.record()}, {})
            elif operation == "evaluate":
                import torch

                evaluation = EvaluationRequest.from_json(header["evaluate"])
                threads = _machine_threads()
                torch.set_num_threads(threads)

                def told(step: str, fraction: float) -> None:
                    with control.sending(number):  # a cancel meanwhile stops the scoring once the event is whole
                        send({"event": "progress", "request": number, "step": step, "fraction": fraction})

                scorecard = session.evaluate(evaluation, mask=arrays.get("mask"), progress=told)
                record = {**scorecard.to_json(), "evaluation_request": evaluation.to_json(),
                          "model_arguments": session.source.arguments(), "model": session.description,
                          "sequence_names": scorecard.settings["sequence_names"],
                          "grid": "image" if session.prepared.on_image_grid else "network", "torch_threads": threads}
                answer = ({"state": "done", "record": record}, {})
            else:
                raise SegExplainError(f"unknown request {operation!r}")
        except KeyboardInterrupt:
            answer = ({"state": "cancelled"}, {})
        except Exception as error:  # noqa: BLE001 - every failure is an answer; the worker stays
            answer = ({"state": "failed", "error": _one_line(error)}, {})
        finally:
            control.running = None  # a late interrupt must find nothing to stop
        send({"event": "answer", "request": number, "seconds": time.perf_counter() - started, **answer[0]}, answer[1])



def main() -> None:
    """``python -m SegExplainLib.frontends.worker``: serve requests on standard input and output."""
    from ...application import parent_watch

    parent_watch.end_with_parent()
    outputs = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # prints of libraries (nnU-Net's) must not enter the protocol
    serve(sys.stdin.fileno(), outputs)
