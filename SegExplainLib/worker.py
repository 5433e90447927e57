"""A warm explanation worker: the model loaded once, the case prepared once, every click answered from there.

``segexplain explain`` pays for everything on every click: starting Python, importing torch and the engine, loading
the model, reading the images, preprocessing, and the whole-volume prediction. A :class:`WarmSession` pays for each
once. It loads a model (model card, model spec, nnU-Net results folder or MONAI bundle, named by the options of
``segexplain explain``). It keeps the current case's preprocessed input and its whole-volume prediction, and answers
explanation requests. A request is the region and method options of ``segexplain explain``, checked by the same
parser with the same errors. The maps come back on the case's grid with their record.

:class:`Worker` runs a session in a child process (``python -m SegExplainLib.worker``), which a GUI drives without
blocking. Requests and answers travel over the child's standard input and output as a JSON header followed by raw
array bytes, so no image file is written. The child ends with its parent (``SegExplainLib._parent_watch``).

* Cancel: :meth:`Worker.cancel` interrupts the running request (SIGINT). The child answers ``cancelled`` and stays
  warm, with its model and case.
* Crash: when the child dies, every pending request fails with the reason, and :meth:`Worker.restart` starts a fresh
  child with the same model and case.

Example:
    >>> worker = Worker(["--card", "prostate.yaml"]).start()
    >>> worker.wait(worker.set_case(image, geometry))                     # preprocessing and prediction, once
    >>> answer = worker.wait(worker.explain(["--voxel", "12", "40", "33", "--method", "lrp"]))
    >>> answer.maps.shape, answer.record["relative_delta"]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import SegExplainError

__all__ = ["Answer", "WarmSession", "Worker"]

_HEADER = struct.Struct("<Q")


class _Parser(argparse.ArgumentParser):
    """A parser that raises on bad options instead of ending the process."""

    def error(self, message: str):
        raise SegExplainError(f"{self.prog}: {message}")


def _model_parser() -> argparse.ArgumentParser:
    from .cli import add_model_arguments

    parser = _Parser(prog="model options", add_help=False)
    add_model_arguments(parser)
    return parser


def _request_parser() -> argparse.ArgumentParser:
    from .cli import add_method_arguments, add_region_arguments

    parser = _Parser(prog="request", add_help=False)
    add_region_arguments(parser)
    add_method_arguments(parser)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _parse(parser: argparse.ArgumentParser, arguments: Sequence[str]) -> argparse.Namespace:
    """Parse as the command line does, with its messages, raising instead of ending the process."""
    return parser.parse_args([str(a) for a in arguments])


class WarmSession:
    """A model loaded once, and the current case prepared once, in this process.

    Args:
        model_arguments: The model options of ``segexplain explain``, e.g. ``["--card", "prostate.yaml"]`` or
            ``["--nnunet", "Dataset004_Hippocampus", "--folds", "0", "1"]``.
        trust_code: The user's word that the model may import or run code of someone else (``--trust-model-code``).

    Raises:
        SegExplainError: As ``segexplain explain`` for the same options (missing files, untrusted code...).
    """

    def __init__(self, model_arguments: Sequence[str], *, trust_code: bool = False) -> None:
        from .cli import _check_model_given, _load, _pipeline, model_description

        if not isinstance(trust_code, bool):
            raise SegExplainError(f"trust_code must be True or False, got {trust_code!r}")
        args = _parse(_model_parser(), model_arguments)
        args.trust_model_code = trust_code
        _check_model_given(args)
        self.model_arguments = list(model_arguments)
        self.pipeline = _pipeline(args)
        self.model, self.card = (None, None) if self.pipeline else _load(args)
        self.sequences = list(self.pipeline.sequences if self.pipeline else self.card.sequences if self.card else [])
        self.description = model_description(args, self.pipeline, self.card)
        self.image = self.geometry = self.prepared = None

    def set_case(self, image: np.ndarray, geometry: Any) -> dict[str, Any]:
        """Make ``image`` (C, D, H, W) on ``geometry`` the current case: preprocess it and predict the whole volume.

        Returns:
            What was prepared: ``{"shape", "network_shape", "seconds"}``.
        """
        import torch

        from .pipelines import PreparedCase

        started = time.perf_counter()
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 4 or (self.sequences and image.shape[0] != len(self.sequences)):
            raise SegExplainError(f"image has shape {image.shape}; expected (C, D, H, W) with one channel per sequence "
                                  f"of the model ({', '.join(self.sequences) or 'any'})")
        if self.pipeline:
            prepared = self.pipeline.prepare(image, geometry)
        else:
            model_input = self.card.normalize(image) if self.card else image
            prepared = PreparedCase(self.model, np.ascontiguousarray(model_input, np.float32), np.copy, np.copy)
        whole_volume = getattr(prepared.model, "whole_volume", None)
        if whole_volume is not None:  # kept by the sliding window for the predicted region of every click
            with torch.no_grad():
                whole_volume(torch.as_tensor(prepared.input)[None])
        self.image, self.geometry, self.prepared = image, geometry, prepared
        return {"shape": list(image.shape), "network_shape": list(prepared.input.shape),
                "seconds": time.perf_counter() - started}

    def explain(self, request_arguments: Sequence[str], *, mask: np.ndarray | None = None):
        """Explain a region of the current case.

        Args:
            request_arguments: Region and method options of ``segexplain explain``, e.g. ``["--voxel", "9", "24",
                "24", "--method", "integrated_gradients", "--n-steps", "32"]``.
            mask: A segment (D, H, W) on the case's grid, instead of a region option.

        Returns:
            The :class:`~SegExplainLib.explanation.Explanation`, maps on the case's grid.
        """
        import torch

        from .api import explain
        from .cli import _method_options, _target
        from .pipelines import explain_case
        from .targets import MaskTarget

        if self.prepared is None:
            raise SegExplainError("no case yet: call set_case first")
        args = _parse(_request_parser(), request_arguments)
        if mask is not None:
            mask = np.asarray(mask, bool)
            if mask.shape != self.image.shape[1:]:
                raise SegExplainError(f"mask has shape {mask.shape}; expected the case's grid {self.image.shape[1:]}")
            target = MaskTarget(mask, class_index=args.class_index, aggregation=args.aggregation)
        else:
            target = _target(args, self.geometry, None)
        options = {"device": args.device, "samples": args.samples, "sampling_seed": args.seed,
                   **_method_options(args)}
        torch.manual_seed(args.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # each warning is in the result's record
            if self.pipeline:
                return explain_case(self.pipeline, self.image, self.geometry, target, args.method,
                                    prepared=self.prepared, **options)
            return explain(self.prepared.model, self.prepared.input, target, args.method, **options)


@dataclass
class Answer:
    """A worker's answer to one request.

    Attributes:
        request: The request's number.
        state: ``"done"``, ``"failed"`` or ``"cancelled"``.
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


def _send(stream: IO[bytes], header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> None:
    arrays = {k: np.ascontiguousarray(v) for k, v in (arrays or {}).items()}
    header = {**header, "arrays": [{"name": k, "dtype": v.dtype.str, "shape": list(v.shape)} for k, v in arrays.items()]}
    text = json.dumps(header, default=str).encode()
    stream.write(_HEADER.pack(len(text)) + text)
    for array in arrays.values():
        stream.write(array.tobytes())
    stream.flush()


def _read_exactly(stream: IO[bytes], count: int) -> bytes:
    chunks, left = [], count
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise EOFError("the stream ended")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _receive(stream: IO[bytes]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    (length,) = _HEADER.unpack(_read_exactly(stream, _HEADER.size))
    header = json.loads(_read_exactly(stream, length))
    arrays = {}
    for spec in header.pop("arrays", []):
        dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
        arrays[spec["name"]] = np.frombuffer(_read_exactly(stream, dtype.itemsize * int(np.prod(shape))),
                                             dtype=dtype).reshape(shape)
    return header, arrays


def _one_line(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return text if isinstance(error, SegExplainError) else f"{type(error).__name__}: {text}"


def serve(inputs: IO[bytes], outputs: IO[bytes]) -> None:
    """The child's loop: answer requests until ``close`` or the end of the input stream."""
    from .imaging import Geometry

    session: WarmSession | None = None
    busy = threading.Event()

    def interrupt(signum, frame):  # noqa: ARG001 - a signal handler's signature
        if busy.is_set():  # only a running request is cancelled; the worker stays
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    while True:
        try:
            header, arrays = _receive(inputs)
        except EOFError:
            return
        number, operation, started = header.get("request", 0), header.get("op"), time.perf_counter()
        if operation == "close":
            return
        busy.set()
        try:
            if operation == "load":
                _send(outputs, {"event": "progress", "request": number, "step": "loading model"})
                session = WarmSession(header["model"], trust_code=bool(header.get("trust_code")))
                record = {"sequences": session.sequences, "model": session.description}
                answer = ({"state": "done", "record": record}, {})
            elif session is None:
                raise SegExplainError("no model loaded")
            elif operation == "case":
                _send(outputs, {"event": "progress", "request": number, "step": "preparing the case"})
                record = session.set_case(arrays["image"], Geometry(**header["geometry"]))
                answer = ({"state": "done", "record": record}, {})
            elif operation == "explain":
                _send(outputs, {"event": "progress", "request": number, "step": "explaining"})
                result = session.explain(header["arguments"], mask=arrays.get("mask"))
                record = {**result.record(), "request_arguments": header["arguments"],
                          "model_arguments": session.model_arguments}  # the command line that reproduces it
                answer = ({"state": "done", "record": record}, {"maps": result.maps.astype(np.float32)})
            else:
                raise SegExplainError(f"unknown request {operation!r}")
        except KeyboardInterrupt:
            answer = ({"state": "cancelled"}, {})
        except Exception as error:  # noqa: BLE001 - every failure is an answer; the worker stays
            answer = ({"state": "failed", "error": _one_line(error)}, {})
        finally:
            busy.clear()
        _send(outputs, {"event": "answer", "request": number, "seconds": time.perf_counter() - started,
                        **answer[0]}, answer[1])


class Worker:
    """A :class:`WarmSession` in a child process, driven without blocking.

    Every request (:meth:`set_case`, :meth:`explain`) returns its number at once. :meth:`poll` gives progress events
    and answers as they come (for a GUI timer); :meth:`wait` blocks for one answer (scripts, tests).

    Args:
        model_arguments: The model options of ``segexplain explain``.
        trust_code: ``--trust-model-code``: the user's word, never the model's.
        python: Interpreter of the child (default: Slicer's ``PythonSlicer`` when there is one, else this one).
    """

    def __init__(self, model_arguments: Sequence[str], *, trust_code: bool = False, python: str | None = None) -> None:
        if not isinstance(trust_code, bool):
            raise SegExplainError(f"trust_code must be True or False, got {trust_code!r}")
        self.model_arguments, self.trust_code = [str(a) for a in model_arguments], trust_code
        self.python = python
        self.state = "new"  # new, running, dead, closed
        self.sequences: list[str] = []
        self.starts = 0
        self._numbers = itertools.count(1)
        self._case: tuple[np.ndarray, dict[str, Any]] | None = None
        self._process: subprocess.Popen | None = None
        self._answers: dict[int, Answer] = {}
        self._events: queue.Queue = queue.Queue()
        self._pending: set[int] = set()
        self._outbox: queue.Queue | None = None
        self._writer: threading.Thread | None = None
        self._stderr: list[str] = []
        self.load_request = self.case_request = 0

    def start(self) -> Worker:
        """Start the child and ask it to load the model; returns at once (the load is request :attr:`load_request`,
        the case a restart sends back :attr:`case_request`)."""
        from . import _parent_watch

        if self.state == "running":
            raise SegExplainError("the worker is running already")
        python = self.python or (_slicer_python() or sys.executable)
        environment = dict(os.environ)
        library_root = str(Path(__file__).resolve().parent.parent)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [library_root, environment.get("PYTHONPATH")]))
        environment[_parent_watch.PARENT_PID] = str(os.getpid())
        self._process = subprocess.Popen([python, "-m", "SegExplainLib.worker"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment,
                                         start_new_session=os.name == "posix")
        self.state, self.starts = "running", self.starts + 1
        self._stderr = []
        process = self._process
        self._outbox = queue.Queue()
        self._writer = threading.Thread(target=self._write, args=(process, self._outbox), daemon=True)
        self._writer.start()
        threading.Thread(target=self._read_answers, args=(process,), daemon=True).start()
        threading.Thread(target=self._read_errors, args=(process,), daemon=True).start()
        self.load_request = self._request({"op": "load", "model": self.model_arguments,
                                           "trust_code": self.trust_code})
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

    def explain(self, request_arguments: Sequence[str], *, mask: np.ndarray | None = None) -> int:
        """Ask for an explanation (region and method options of ``segexplain explain``); the request's number."""
        arrays = {} if mask is None else {"mask": np.asarray(mask, bool)}
        return self._request({"op": "explain", "arguments": [str(a) for a in request_arguments]}, arrays)

    def cancel(self) -> None:
        """Interrupt the running request; it is answered ``cancelled`` and the worker stays warm."""
        if self.state == "running" and self._pending:
            self._process.send_signal(signal.SIGINT)

    def poll(self) -> list[dict[str, Any]]:
        """Events since the last call: ``{"event": "progress", "request", "step"}``, ``{"event": "answer", ...}`` and
        ``{"event": "dead", "error"}`` when the child ended unasked."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def answer(self, request: int) -> Answer | None:
        """The answer to ``request``, or None while it runs."""
        return self._answers.get(request)

    def wait(self, request: int, timeout: float | None = None) -> Answer:
        """Block until ``request`` is answered; raises SegExplainError when it failed or the worker died."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while request not in self._answers:
            if deadline is not None and time.monotonic() > deadline:
                raise SegExplainError(f"request {request} was not answered within {timeout} s")
            time.sleep(0.002)
        answer = self._answers[request]
        if answer.state == "failed":
            raise SegExplainError(answer.error)
        return answer

    def close(self) -> None:
        """Ask the child to end, and end it if it does not."""
        if self.state == "running":
            self._outbox.put(({"op": "close"}, None))
            self._outbox.put(None)
            self._writer.join(1)
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
        self._outbox.put(({**header, "request": number}, arrays))
        return number

    def _write(self, process: subprocess.Popen, outbox: queue.Queue) -> None:
        """Send the requests in order from a thread of their own: a case is megabytes, the pipe holds 64 KiB, and the
        child reads only once it has imported the engine, so a caller (a GUI) must not wait for it."""
        while (message := outbox.get()) is not None:
            try:
                _send(process.stdin, *message)
            except (OSError, ValueError):  # the child ended: the answer reader fails the pending requests
                return

    def _end(self) -> None:
        if self._outbox is not None:
            self._outbox.put(None)  # the writer of this child stops
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _read_answers(self, process: subprocess.Popen) -> None:
        while True:
            try:
                header, arrays = _receive(process.stdout)
            except (EOFError, OSError, ValueError):
                break
            if header.get("event") == "answer":
                answer = Answer(header["request"], header["state"], header.get("record", {}), arrays.get("maps"),
                                header.get("error", ""), header.get("seconds", 0.0))
                if header["request"] == self.load_request and answer.state == "done":
                    self.sequences = list(answer.record.get("sequences", []))
                self._answers[answer.request] = answer
                self._pending.discard(answer.request)
            self._events.put(header)
        if process is self._process and self.state == "running":
            process.wait()
            self._died()

    def _read_errors(self, process: subprocess.Popen) -> None:
        for line in process.stderr:
            self._stderr.append(line.decode(errors="replace").rstrip())
            del self._stderr[:-50]

    def _died(self) -> None:
        """Fail every pending request with the child's last words."""
        self.state = "dead"
        last = next((line for line in reversed(self._stderr) if line.strip()), "")
        code = self._process.poll()
        error = f"the worker process ended (exit code {code})" + (f": {last}" if last else "")
        for number in sorted(self._pending):
            self._answers[number] = Answer(number, "failed", error=error)
            self._events.put({"event": "answer", "request": number, "state": "failed", "error": error})
        self._pending.clear()
        self._events.put({"event": "dead", "error": error})


def _slicer_python() -> str | None:
    import shutil

    return shutil.which("PythonSlicer")


def main() -> None:
    """``python -m SegExplainLib.worker``: serve requests on standard input and output."""
    from . import _parent_watch

    _parent_watch.end_with_parent()
    outputs = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # prints of libraries (nnU-Net's) must not enter the protocol
    serve(sys.stdin.buffer, outputs)


if __name__ == "__main__":  # pragma: no cover - the child process
    main()
