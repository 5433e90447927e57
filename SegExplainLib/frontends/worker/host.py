"""The host's side of the worker: :class:`Worker` starts the child and moves its messages without blocking and
without threads, as a GUI's timer calls :meth:`Worker.poll`; :class:`Answer` is what comes back."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from ...application.model_source import ModelSource
from ...application.requests import EvaluationRequest, ExplainRequest
from ...errors import SegExplainError
from .framing import Inbox, Outbox, wait_ready
from .process_tree import CLOSE_GRACE_S, kill_tree, slicer_python, tree_options

_CLOSE_WAIT_S = CLOSE_GRACE_S
#: Seconds a message under way may pause before a poll returns (the rest comes at the next one).
_FLOW_WAIT_S = 0.02
#: Longest single wait of :meth:`Worker.wait`, so that a launcher's end is noticed even while its child holds the pipes.
_LONGEST_WAIT_S = 0.5
#: The folder that holds the package SegExplainLib, put on the child's path.
_LIBRARY_ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Answer:
    """A worker's answer to one request, or the preview that came before it (:meth:`Worker.preview`).

    Attributes:
        request: The request's number.
        state: ``"done"``, ``"failed"`` or ``"cancelled"`` (a preview is ``"done"``).
        record: ``done``: the explanation's record (as ``summary.json``), or what ``set_case`` prepared.
        maps: ``done`` explanation: (C, D, H, W) float32 on the case's grid.
        error: ``failed``: one line, as the command line prints it.
        seconds: Time in the worker.
    """

    request: int
    state: str
    record: dict[str, Any] = field(default_factory=dict)
    maps: np.ndarray | None = None
    error: str = ""
    seconds: float = 0.0



class Worker:
    """A :class:`WarmSession` in a child process, driven without blocking and without threads.

    Every request (:meth:`set_case`, :meth:`explain`, :meth:`segment_matrix`, :meth:`evaluate`) returns its number
    at once. The bytes move when the owner calls :meth:`poll` (a GUI's timer: Slicer's main thread does not hand the
    interpreter lock to other threads, so the host starts none) or :meth:`wait` (scripts, tests), which blocks for
    one answer.

    Args:
        model: The model, with the user's word on its code (``trust_code``), never the model's.
        python: Interpreter of the child (default: Slicer's ``PythonSlicer`` when there is one, else this one). It may
            be a launcher that runs the real interpreter as its own child (``PythonSlicer`` does): the worker is
            cancelled through its input and closed with its whole process tree.
    """

    def __init__(self, model: ModelSource, *, python: str | None = None) -> None:
        if not isinstance(model, ModelSource):
            raise SegExplainError(f"model must be a ModelSource, got {model!r}")
        self.model, self.python = model, python
        self.state = "new"  # new, running, dead, closed
        self.sequences: list[str] = []
        self.starts = 0
        self._numbers = itertools.count(1)
        self._case: tuple[np.ndarray, dict[str, Any]] | None = None
        self._process: subprocess.Popen | None = None
        self._answers: dict[int, Answer] = {}
        self._previews: dict[int, Answer] = {}
        self._progress: dict[int, dict[str, Any]] = {}
        self._events: list[dict[str, Any]] = []
        self._pending: set[int] = set()
        self._outbox: Outbox | None = None
        self._inbox: Inbox | None = None
        self._stderr: IO[bytes] | None = None
        self.load_request = self.case_request = 0

    def start(self) -> Worker:
        """Start the child and ask it to load the model; returns at once (the load is request :attr:`load_request`,
        the case a restart sends back :attr:`case_request`)."""
        from ...application import parent_watch

        if self.state == "running":
            raise SegExplainError("the worker is running already")
        python = self.python or (slicer_python() or sys.executable)
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_LIBRARY_ROOT), environment.get("PYTHONPATH")]))
        environment[parent_watch.PARENT_PID] = str(os.getpid())  # the host, also behind a launcher
        # the child's last words for a crash report, in a file: a pipe that nobody reads would stall the child
        self._stderr = tempfile.TemporaryFile(prefix="segexplain-worker-")
        self._process = subprocess.Popen([python, "-m", "SegExplainLib.frontends.worker"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._stderr, env=environment,
                                         **tree_options())
        for stream in (self._process.stdin, self._process.stdout):
            os.set_blocking(stream.fileno(), False)
        self.state, self.starts = "running", self.starts + 1
        self._outbox = Outbox(self._process.stdin.fileno())
        self._inbox = Inbox(self._process.stdout.fileno(), self._received)
        self.load_request = self._request({"op": "load", "model": self.model.to_json()})
        if self._case is not None:  # a restart brings the case back
            self.case_request = self._request({"op": "case", "geometry": self._case[1]}, {"image": self._case[0]})
        return self

    def restart(self) -> Worker:
        """End the child (if it still runs) and start a fresh one with the same model and case."""
        self._end()
        return self.start()

    def set_case(self, image: np.ndarray, geometry: Any) -> int:
        """Make ``image`` (C, D, H, W) on ``geometry`` the current case (kept for a restart); the request's number."""
        image = np.ascontiguousarray(image, dtype=np.float32)
        self._case = (image, geometry.to_dict())
        self.case_request = self._request({"op": "case", "geometry": self._case[1]}, {"image": image})
        return self.case_request

    def explain(self, request: ExplainRequest, *, mask: np.ndarray | None = None) -> int:
        """Ask for an explanation (``mask``: a segment on the case's grid instead of the request's region); the
        request's number.

        ``request.preview``: when the model has a cheaper stand-in (an nnU-Net ensemble: its first fold without
        mirroring), the child first explains that and sends it as a ``preview`` event (:meth:`preview`), then goes on
        to the exact answer in the same request (cancel it to stop there). A model without one answers only the exact
        one.
        """
        if not isinstance(request, ExplainRequest):
            raise SegExplainError(f"request must be an ExplainRequest, got {request!r}")
        arrays = {} if mask is None else {"mask": np.asarray(mask, bool)}
        return self._request({"op": "explain", "explain": request.to_json()}, arrays)

    def segment_matrix(self, request: ExplainRequest, *, labels: np.ndarray | None = None) -> int:
        """Ask for the segment x segment matrix of the current case with the request's method and options
        (``labels``: a label map on the case's grid whose segments are the columns; default: the prediction's); the
        request's number. The answer's record is :meth:`~SegExplainLib.engine.segments.SegmentMatrix.record`."""
        if not isinstance(request, ExplainRequest):
            raise SegExplainError(f"request must be an ExplainRequest, got {request!r}")
        arrays = {} if labels is None else {"labels": np.asarray(labels, np.int64)}
        return self._request({"op": "segment_matrix", "explain": request.to_json()}, arrays)

    def evaluate(self, request: EvaluationRequest, *, mask: np.ndarray | None = None) -> int:
        """Ask for the scorecard of the request's methods on the current case and region (``mask``: a segment on
        the case's grid instead of the request's region); the request's number.

        Progress events name each step of the scoring and its ``fraction`` done; :meth:`cancel` stops it. The
        answer's record is the scorecard as ``summary.json`` holds it (``{"scorecard": ...}``, which
        :func:`~SegExplainLib.io.figures.scorecard_figure` draws), with the ``evaluation_request``, the model and the
        sequence names; no maps.
        """
        if not isinstance(request, EvaluationRequest):
            raise SegExplainError(f"request must be an EvaluationRequest, got {request!r}")
        arrays = {} if mask is None else {"mask": np.asarray(mask, bool)}
        return self._request({"op": "evaluate", "evaluate": request.to_json()}, arrays)

    def cancel(self, request: int | None = None) -> None:
        """Cancel ``request`` (default: the running one) through the child's input, on every system.

        A running request is interrupted, a queued one is not run; either is answered ``cancelled`` and the worker
        stays warm, with its model and case.
        """
        if self.state == "running" and self._pending and (request is None or request in self._pending):
            # the child runs its requests in order: the oldest unanswered one runs, or is about to
            self._outbox.put({"op": "cancel", "target": min(self._pending) if request is None else request})
            self._exchange(time.monotonic())

    def poll(self, timeout: float = 0.0) -> list[dict[str, Any]]:
        """Move the bytes that are ready, and return the events since the last call: ``{"event": "progress",
        "request", "step"}``, ``{"event": "answer", ...}`` and ``{"event": "dead", "error"}`` when the child ended
        unasked. A message under way is read to its end (it comes at the speed of memory); ``timeout`` waits that
        long for a first event."""
        deadline = time.monotonic() + timeout
        self._exchange(deadline, until=lambda: bool(self._events))
        events, self._events = self._events, []
        return events

    def answer(self, request: int) -> Answer | None:
        """The answer to ``request``, or None while it runs (:meth:`poll` or :meth:`wait` bring the answers in)."""
        return self._answers.get(request)

    def progress(self, request: int) -> dict[str, Any] | None:
        """The last progress event of ``request`` (``step``, and ``fraction`` for a scoring), or None before its
        first. Kept per request because :meth:`poll` hands each event to one caller only: two runs polling one worker
        each read their own progress here, whichever of them received the event."""
        return self._progress.get(request)

    def preview(self, request: int) -> Answer | None:
        """The preview of explanation ``request`` (asked with ``preview=True``), or None before it came; its record
        says what it shows (``"preview": True``, ``"ensemble"``)."""
        return self._previews.get(request)

    def wait(self, request: int, timeout: float | None = None) -> Answer:
        """Block until ``request`` is answered; raises SegExplainError when it failed or the worker died."""
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        self._exchange(deadline, until=lambda: request in self._answers)
        if request not in self._answers:
            raise SegExplainError(f"request {request} was not answered within {timeout} s")
        answer = self._answers[request]
        if answer.state == "failed":
            raise SegExplainError(answer.error)
        return answer

    def close(self) -> None:
        """Ask the child to end, and end its whole process tree if it does not."""
        if self.state == "running":
            self._outbox.put({"op": "close"})
            self._exchange(time.monotonic() + _CLOSE_WAIT_S, until=lambda: not self._outbox.pending)
        self._end()
        self.state = "closed"

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> int:
        if self.state != "running":
            raise SegExplainError(f"the worker is {self.state}; start or restart it first")
        number = next(self._numbers)
        self._pending.add(number)
        self._outbox.put({**header, "request": number}, arrays)
        self._exchange(time.monotonic())  # what the pipe takes now; the rest at the next poll
        return number

    def _exchange(self, deadline: float, *, until: Callable[[], bool] = lambda: False) -> None:
        """Write and read without blocking until ``until()`` or ``deadline``. Past the deadline it goes on while bytes
        flow, so that a message under way (a case, maps) moves in one call instead of one pipe's worth per tick."""
        while self.state == "running":
            try:
                moved = self._outbox.write()
            except OSError:  # the child is gone: the end of its output tells the rest
                self._outbox.clear()
                moved = 0
            moved += self._inbox.read()
            if self._inbox.ended or self._process.poll() is not None:
                self._died()
                return
            if until():
                return
            flowing = moved and (self._inbox.partial or self._outbox.pending)
            left = deadline - time.monotonic()
            if left <= 0 and not flowing:
                return
            wait_ready(self._inbox.fd, self._outbox.fd if self._outbox.pending else None,
                        min(left, _LONGEST_WAIT_S) if left > 0 else _FLOW_WAIT_S)

    def _received(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        event = header.get("event")
        if event == "progress":
            self._progress[header["request"]] = header
        elif event in ("answer", "preview"):
            answer = Answer(header["request"], header["state"], header.get("record", {}), arrays.get("maps"),
                            header.get("error", ""), header.get("seconds", 0.0))
            if event == "preview":  # the request goes on to its exact answer
                self._previews[answer.request] = answer
            else:
                if answer.request == self.load_request and answer.state == "done":
                    self.sequences = list(answer.record.get("sequences", []))
                self._answers[answer.request] = answer
                self._pending.discard(answer.request)
        self._events.append(header)

    def _end(self) -> None:
        """End the child's process tree: wait a moment for a child asked to close, then kill the tree."""
        process = self._process
        if process is None:
            return
        for stream in (process.stdin, process.stdout):
            with contextlib.suppress(OSError):
                stream.close()  # the end of its input ends the child (see Control)
        try:
            process.wait(_CLOSE_WAIT_S if self.state == "running" else 0)
        except subprocess.TimeoutExpired:
            pass
        kill_tree(process)  # also what a launcher left behind: the real interpreter, its child
        process.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _last_words(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0, os.SEEK_END)
        self._stderr.seek(max(0, self._stderr.tell() - 4096))
        lines = self._stderr.read().decode(errors="replace").splitlines()
        return next((line.rstrip() for line in reversed(lines) if line.strip()), "")

    def _died(self) -> None:
        """Fail every pending request with the child's last words, and end what is left of its process tree."""
        self.state = "dead"
        process = self._process
        try:
            code = process.wait(_CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:  # its output ended but it runs: end it
            kill_tree(process)
            code = process.wait()
        kill_tree(process)  # a launcher's child that outlived it
        last = self._last_words()
        error = f"the worker process ended (exit code {code})" + (f": {last}" if last else "")
        for number in sorted(self._pending):
            self._answers[number] = Answer(number, "failed", error=error)
            self._events.append({"event": "answer", "request": number, "state": "failed", "error": error})
        self._pending.clear()
        self._outbox.clear()
        self._events.append({"event": "dead", "error": error})

