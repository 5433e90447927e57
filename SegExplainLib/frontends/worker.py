"""A warm explanation worker: the model loaded once, the case prepared once, every click answered from there.

``segexplain explain`` pays for everything on every click: starting Python, importing torch and the engine, loading
the model, reading the images, preprocessing, and the whole-volume prediction. A :class:`WarmSession` pays for each
once. It opens a model (a :class:`~SegExplainLib.application.model_source.ModelSource`: model card, model spec,
nnU-Net results folder or MONAI bundle) with the application's
:func:`~SegExplainLib.application.opening.open_model`, as ``segexplain explain`` does. It keeps the current case's
preprocessed input and its whole-volume prediction, and answers explanation requests
(:class:`~SegExplainLib.application.requests.ExplainRequest`, checked by the same class as the command line's). The
maps come back on the case's grid with their record.

:class:`Worker` runs a session in a child process (``python -m SegExplainLib.frontends.worker``), which a GUI drives
without blocking and without threads: Slicer's main thread does not hand the interpreter lock to other Python threads, so
the host's side is non-blocking reads and writes that the GUI's timer moves (:meth:`Worker.poll`). Requests and
answers travel over the child's standard input and output as a JSON header followed by the arrays' raw bytes, read
straight into preallocated arrays, so no image file is written; the model and each request travel as their JSON
(``to_json``), which the child reads back with ``from_json``, the same checks. The child ends with its host
(``SegExplainLib.application.parent_watch``).

* Launcher: Slicer starts the interpreter through ``PythonSlicer``, a CTK launcher that runs the real interpreter as
  its own child (sharing its standard streams) and forwards no signal. So nothing is done with signals to the
  started process: a cancel is a message on the child's input, and the end kills the whole process tree.
* Cancel: :meth:`Worker.cancel` sends a ``cancel`` message, which the child's input thread acts on while a request
  runs: the running request is interrupted and answered ``cancelled``, a queued one is not run. The worker stays
  warm, with its model and case. The same on Linux, macOS and Windows.
* Close: a ``close`` message and the end of the child's input end it; what still runs after
  :data:`CLOSE_GRACE_S` is killed with its process tree (POSIX: its process group; Windows: ``taskkill /T``).
* Crash: when the child dies, every pending request fails with the reason, and :meth:`Worker.restart` starts a fresh
  child with the same model and case.

Example:
    >>> worker = Worker(ModelSource("card", "prostate.yaml")).start()
    >>> worker.wait(worker.set_case(image, geometry))                     # preprocessing and prediction, once
    >>> answer = worker.wait(worker.explain(ExplainRequest(voxel=(12, 40, 33), method="lrp")))
    >>> answer.maps.shape, answer.record["relative_delta"]
"""

from __future__ import annotations

import _thread
import contextlib
import itertools
import json
import math
import os
import queue
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..application.model_source import ModelSource
from ..application.requests import ExplainRequest
from ..errors import SegExplainError

__all__ = ["Answer", "WarmSession", "Worker"]

_HEADER = struct.Struct("<Q")
#: Most bytes given to one write: a pipe takes what fits, the rest waits for the next write.
_PIECE = 1 << 20
#: Seconds a closing worker is given before its process tree is killed; also the child's grace after its input ends.
CLOSE_GRACE_S = 2.0
_CLOSE_WAIT_S = CLOSE_GRACE_S
#: Seconds a message under way may pause before a poll returns (the rest comes at the next one).
_FLOW_WAIT_S = 0.02
#: Longest single wait of :meth:`Worker.wait`, so that a launcher's end is noticed even while its child holds the pipes.
_LONGEST_WAIT_S = 0.5
#: Windows cannot wait on a pipe (select takes sockets only): it checks again after this long.
_WINDOWS_WAIT_S = 0.005
#: What the child is doing for each request, as its progress events name it.
_STEPS = {"load": "loading model", "case": "preparing the case", "explain": "explaining"}
#: The progress step of a request whose preview was sent, while its exact answer is computed.
_REFINING = "refining to the full ensemble"
_WINDOWS_NEW_PROCESS_GROUP = 0x00000200
_WINDOWS_NO_WINDOW = 0x08000000


class WarmSession:
    """A model opened once, and the current case prepared once, in this process.

    Args:
        model: The model, e.g. ``ModelSource("card", "prostate.yaml")`` or ``ModelSource("nnunet",
            "Dataset004_Hippocampus", folds="0 1")``, with the user's word on its code (``trust_code``).

    Raises:
        SegExplainError: As ``segexplain explain`` for the same model (missing files, untrusted code...).
    """

    def __init__(self, model: ModelSource) -> None:
        from ..application.opening import open_model

        if not isinstance(model, ModelSource):
            raise SegExplainError(f"model must be a ModelSource, got {model!r}")
        self.source = model
        self.pipeline = open_model(model)
        self.sequences = list(self.pipeline.sequences)
        self.description = self.pipeline.describe()
        #: The pipeline's cheaper stand-in for a first answer (:meth:`Pipeline.preview`), or None.
        self.preview = self.pipeline.preview()
        self.image = self.geometry = self.prepared = self.preview_prepared = None

    def set_case(self, image: np.ndarray, geometry: Any) -> dict[str, Any]:
        """Make ``image`` (C, D, H, W) on ``geometry`` the current case: preprocess it and predict the whole volume.

        Returns:
            What was prepared: ``{"shape", "network_shape", "seconds"}``.
        """
        import torch

        started = time.perf_counter()
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 4 or (self.sequences and image.shape[0] != len(self.sequences)):
            raise SegExplainError(f"image has shape {image.shape}; expected (C, D, H, W) with one channel per sequence "
                                  f"of the model ({', '.join(self.sequences) or 'any'})")
        prepared = self.pipeline.prepare(image, geometry)
        # the preview prepares cases as its pipeline does: the same case with its cheaper model
        preview_prepared = replace(prepared, model=self.preview.model) if self.preview else None
        for model in (prepared.model, preview_prepared.model if preview_prepared else None):
            whole_volume = getattr(model, "whole_volume", None)
            if whole_volume is not None:  # kept by the sliding window for the predicted region of every click
                with torch.no_grad():
                    whole_volume(torch.as_tensor(prepared.input)[None])
        self.image, self.geometry, self.prepared, self.preview_prepared = image, geometry, prepared, preview_prepared
        return {"shape": list(image.shape), "network_shape": list(prepared.input.shape),
                "seconds": time.perf_counter() - started}

    def explain(self, request: ExplainRequest, *, mask: np.ndarray | None = None, preview: bool = False):
        """Explain a region of the current case.

        Args:
            request: The region and method, e.g. ``ExplainRequest(voxel=(9, 24, 24), method="integrated_gradients",
                n_steps=32)``.
            mask: A segment (D, H, W) on the case's grid, instead of the request's region.
            preview: Explain the model's cheaper stand-in (:attr:`preview`) instead of the model.

        Returns:
            The :class:`~SegExplainLib.engine.explanation.Explanation`, maps on the case's grid.
        """
        import torch

        from ..models.pipelines import explain_case

        if not isinstance(request, ExplainRequest):
            raise SegExplainError(f"request must be an ExplainRequest, got {request!r}")
        if self.prepared is None:
            raise SegExplainError("no case yet: call set_case first")
        if preview and self.preview is None:
            raise SegExplainError("this model has no preview (it is one network pass per window already)")
        if mask is not None:
            mask = np.asarray(mask, bool)
            if mask.shape != self.image.shape[1:]:
                raise SegExplainError(f"mask has shape {mask.shape}; expected the case's grid {self.image.shape[1:]}")
        target = request.target(self.geometry, mask)
        torch.manual_seed(request.seed)
        pipeline, prepared = (self.preview, self.preview_prepared) if preview else (self.pipeline, self.prepared)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # each warning is in the result's record
            return explain_case(pipeline, self.image, self.geometry, target, request.method, prepared=prepared,
                                **request.engine_options())

    def shown(self, *, preview: bool) -> dict[str, Any]:
        """What an answer's record says it shows, for a model that has a preview: ``{"preview": True, "ensemble":
        "preview: fold 0 without mirroring, of 2 folds (0, 1) x 8 mirrorings"}``, or the exact ensemble with
        ``"preview": False``; nothing for a model without one."""
        if self.preview is None:
            return {}
        exact = self.description.get("ensemble", self.pipeline.kind)
        if not preview:
            return {"preview": False, "ensemble": exact}
        return {"preview": True, "ensemble": f"preview: {self.preview.describe().get('ensemble', 'cheaper model')}, "
                                             f"of {exact}"}


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


class _Outbox:
    """Messages to write to a pipe: an 8-byte length, the JSON header, then each array's raw bytes.

    The arrays are written from their own memory (no copy). On a non-blocking descriptor :meth:`write` writes what the
    pipe takes now and keeps the rest for a later call; on a blocking one it writes everything.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._views: deque[memoryview] = deque()

    @property
    def pending(self) -> bool:
        """Bytes are left to write."""
        return bool(self._views)

    def put(self, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> None:
        arrays = {k: np.ascontiguousarray(v) for k, v in (arrays or {}).items()}
        header = {**header, "arrays": [{"name": k, "dtype": v.dtype.str, "shape": list(v.shape)}
                                       for k, v in arrays.items()]}
        text = json.dumps(header, default=str).encode()
        self._views.append(memoryview(_HEADER.pack(len(text)) + text))
        self._views.extend(memoryview(v.reshape(-1).view(np.uint8)) for v in arrays.values() if v.nbytes)

    def write(self) -> int:
        """Write what the pipe takes; the number of bytes written.

        Raises:
            OSError: The reader is gone (``BrokenPipeError``).
        """
        written = 0
        while self._views:
            try:
                count = os.write(self.fd, self._views[0][:_PIECE])
            except BlockingIOError:
                break
            written += count
            if count == len(self._views[0]):
                self._views.popleft()
            else:
                self._views[0] = self._views[0][count:]
        return written

    def clear(self) -> None:
        self._views.clear()


class _Inbox:
    """Messages read from a pipe as their bytes come, each handed to ``on_message(header, arrays)`` when complete.

    An array's bytes are read straight into the array, preallocated from the header, in pieces as large as the pipe
    gives (no chunk list, no copy). On a non-blocking descriptor :meth:`read` reads what the pipe holds now; on a
    blocking one it reads until the stream ends.
    """

    def __init__(self, fd: int, on_message: Callable[[dict[str, Any], dict[str, np.ndarray]], None]) -> None:
        self.fd, self.on_message = fd, on_message
        self.ended = False
        self._expect(bytearray(_HEADER.size), self._length)

    @property
    def partial(self) -> bool:
        """A message has begun and not ended."""
        return self._filled > 0 or self._then != self._length

    def read(self) -> int:
        """Read what the pipe holds (see above); the number of bytes read. At the end of the stream, :attr:`ended`."""
        count = total = 0
        while not self.ended:
            view = self._view[self._filled:]
            try:
                count = _read_into(self.fd, view) if view else 0
            except BlockingIOError:
                break
            except OSError:  # e.g. the descriptor was closed by a restart
                count = 0
            if view and not count:
                self.ended = True
                break
            total, self._filled = total + count, self._filled + count
            if self._filled == len(self._view):
                self._then()
        return total

    def _expect(self, buffer: Any, then: Callable[[], None]) -> None:
        self._buffer, self._view, self._filled, self._then = buffer, memoryview(buffer).cast("B"), 0, then

    def _length(self) -> None:
        (length,) = _HEADER.unpack(self._buffer)
        self._expect(bytearray(length), self._header)

    def _header(self) -> None:
        header = json.loads(self._buffer)
        arrays = {spec["name"]: np.empty(spec["shape"], np.dtype(spec["dtype"])) for spec in header.pop("arrays", [])}
        self._message, self._arrays = (header, arrays), iter(arrays.values())
        self._next_array()

    def _next_array(self) -> None:
        array = next(self._arrays, None)
        if array is None:
            self._expect(bytearray(_HEADER.size), self._length)
            self.on_message(*self._message)
        elif array.nbytes == 0:
            self._next_array()
        else:
            self._expect(array.reshape(-1).view(np.uint8), self._next_array)


def _read_into(fd: int, view: memoryview) -> int:
    """Read into ``view``; the number of bytes read (0 at the end of the stream)."""
    if hasattr(os, "readv"):
        return os.readv(fd, [view])
    data = os.read(fd, len(view))  # Windows has no readv: one copy
    view[:len(data)] = data
    return len(data)


def _wait_ready(readable: int, writable: int | None, timeout: float) -> None:
    """Block until ``readable`` has bytes or ``writable`` takes some, for at most ``timeout`` seconds."""
    if os.name == "nt":  # select works on sockets only there: a short sleep instead
        time.sleep(min(timeout, _WINDOWS_WAIT_S))
        return
    select.select([readable], [] if writable is None else [writable], [], max(timeout, 0.0))


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
        _Inbox(fd, self.receive).read()
        self.close()
        time.sleep(CLOSE_GRACE_S)
        os._exit(0)  # the main thread is deaf to the interrupt (a long native call): the host is gone, so end


def serve(inputs: int, outputs: int) -> None:
    """The child's loop: answer requests from the descriptor ``inputs`` on ``outputs`` until ``close`` or the end of
    the input; ``cancel`` messages are read and acted on while a request runs (see :class:`_Control`)."""
    from ..io.imaging import Geometry

    session: WarmSession | None = None
    control, out = _Control(), _Outbox(outputs)

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
                request = ExplainRequest.from_json(header["explain"])
                preview = request.preview and session.preview is not None
                for shown in (True, False) if preview else (False,):
                    result = session.explain(request, mask=arrays.get("mask"), preview=shown)
                    record = {**result.record(), **session.shown(preview=shown),
                              "request_arguments": request.arguments(),
                              "model_arguments": session.source.arguments()}  # the command line of the exact answer
                    answer = ({"state": "done", "record": record}, {"maps": result.maps.astype(np.float32)})
                    if shown:  # the first answer at once; the exact one follows in this request, unless cancelled
                        with control.sending(number):
                            send({"event": "preview", "request": number, "seconds": time.perf_counter() - started,
                                  **answer[0]}, answer[1])
                            send({"event": "progress", "request": number, "step": _REFINING})
            else:
                raise SegExplainError(f"unknown request {operation!r}")
        except KeyboardInterrupt:
            answer = ({"state": "cancelled"}, {})
        except Exception as error:  # noqa: BLE001 - every failure is an answer; the worker stays
            answer = ({"state": "failed", "error": _one_line(error)}, {})
        finally:
            control.running = None  # a late interrupt must find nothing to stop
        send({"event": "answer", "request": number, "seconds": time.perf_counter() - started, **answer[0]}, answer[1])


class Worker:
    """A :class:`WarmSession` in a child process, driven without blocking and without threads.

    Every request (:meth:`set_case`, :meth:`explain`) returns its number at once. The bytes move when the owner calls
    :meth:`poll` (a GUI's timer: Slicer's main thread does not hand the interpreter lock to other threads, so the
    host starts none) or :meth:`wait` (scripts, tests), which blocks for one answer.

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
        self._events: list[dict[str, Any]] = []
        self._pending: set[int] = set()
        self._outbox: _Outbox | None = None
        self._inbox: _Inbox | None = None
        self._stderr: IO[bytes] | None = None
        self.load_request = self.case_request = 0

    def start(self) -> Worker:
        """Start the child and ask it to load the model; returns at once (the load is request :attr:`load_request`,
        the case a restart sends back :attr:`case_request`)."""
        from ..application import parent_watch as _parent_watch

        if self.state == "running":
            raise SegExplainError("the worker is running already")
        python = self.python or (_slicer_python() or sys.executable)
        environment = dict(os.environ)
        library_root = str(Path(__file__).resolve().parent.parent)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [library_root, environment.get("PYTHONPATH")]))
        environment[_parent_watch.PARENT_PID] = str(os.getpid())  # the host, also behind a launcher
        # the child's last words for a crash report, in a file: a pipe that nobody reads would stall the child
        self._stderr = tempfile.TemporaryFile(prefix="segexplain-worker-")
        self._process = subprocess.Popen([python, "-m", "SegExplainLib.frontends.worker"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._stderr, env=environment,
                                         **_tree_options())
        for stream in (self._process.stdin, self._process.stdout):
            os.set_blocking(stream.fileno(), False)
        self.state, self.starts = "running", self.starts + 1
        self._outbox = _Outbox(self._process.stdin.fileno())
        self._inbox = _Inbox(self._process.stdout.fileno(), self._received)
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
            _wait_ready(self._inbox.fd, self._outbox.fd if self._outbox.pending else None,
                        min(left, _LONGEST_WAIT_S) if left > 0 else _FLOW_WAIT_S)

    def _received(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        event = header.get("event")
        if event in ("answer", "preview"):
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
                stream.close()  # the end of its input ends the child (see _Control)
        try:
            process.wait(_CLOSE_WAIT_S if self.state == "running" else 0)
        except subprocess.TimeoutExpired:
            pass
        _kill_tree(process)  # also what a launcher left behind: the real interpreter, its child
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
            _kill_tree(process)
            code = process.wait()
        _kill_tree(process)  # a launcher's child that outlived it
        last = self._last_words()
        error = f"the worker process ended (exit code {code})" + (f": {last}" if last else "")
        for number in sorted(self._pending):
            self._answers[number] = Answer(number, "failed", error=error)
            self._events.append({"event": "answer", "request": number, "state": "failed", "error": error})
        self._pending.clear()
        self._outbox.clear()
        self._events.append({"event": "dead", "error": error})


def _tree_options(system: str = os.name) -> dict[str, Any]:
    """``Popen`` options that make the child the root of a process tree :func:`_kill_tree` can end whole: its own
    session (process group) on POSIX; its own process group, without a console window, on Windows."""
    if system == "nt":
        return {"creationflags": _WINDOWS_NEW_PROCESS_GROUP | _WINDOWS_NO_WINDOW}
    return {"start_new_session": True}


def _kill_tree(process: subprocess.Popen, *, system: str = os.name, killpg: Callable[[int, int], None] | None = None,
               run: Callable[..., Any] = subprocess.run) -> None:
    """Kill ``process`` and every process it started (a launcher's real interpreter, the interpreter's helpers).

    POSIX: SIGKILL to the process group that :func:`_tree_options` made (it outlives its leader). Windows:
    ``taskkill /T /F``, which follows the parent links from ``process``; a grandchild whose launcher is already gone
    ends by the end of its input and by its parent watch instead.
    """
    if system == "nt":
        if process.poll() is None:
            run(["taskkill", "/PID", str(process.pid), "/T", "/F"], capture_output=True,
                creationflags=_WINDOWS_NO_WINDOW, check=False)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (killpg or os.killpg)(process.pid, signal.SIGKILL)


def _slicer_python() -> str | None:
    import shutil

    return shutil.which("PythonSlicer")


def main() -> None:
    """``python -m SegExplainLib.frontends.worker``: serve requests on standard input and output."""
    from ..application import parent_watch as _parent_watch

    _parent_watch.end_with_parent()
    outputs = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # prints of libraries (nnU-Net's) must not enter the protocol
    serve(sys.stdin.fileno(), outputs)


if __name__ == "__main__":  # pragma: no cover - the child process
    main()
