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
without blocking and without threads: Slicer's main thread does not hand the interpreter lock to other Python
threads, so the host's side is non-blocking reads and writes that the GUI's timer moves (:meth:`Worker.poll`).
Requests and answers travel over the child's standard input and output as a JSON header followed by the arrays' raw
bytes, read straight into preallocated arrays, so no image file is written; the model and each request travel as
their JSON (``to_json``), which the child reads back with ``from_json``, the same checks. The child ends with its
host (``SegExplainLib.application.parent_watch``).

* Launcher: Slicer starts the interpreter through ``PythonSlicer``, a CTK launcher that runs the real interpreter as
  its own child (sharing its standard streams) and forwards no signal. So nothing is done with signals to the
  started process: a cancel is a message on the child's input, and the end kills the whole process tree.
* Cancel: :meth:`Worker.cancel` sends a ``cancel`` message, which the child's input thread acts on while a request
  runs: the running request is interrupted and answered ``cancelled``, a queued one is not run. The worker stays
  warm, with its model and case. The same on Linux, macOS and Windows.
* Close: a ``close`` message and the end of the child's input end it; what still runs after
  :data:`~.process_tree.CLOSE_GRACE_S` is killed with its process tree (POSIX: its process group; Windows:
  ``taskkill /T``).
* Crash: when the child dies, every pending request fails with the reason, and :meth:`Worker.restart` starts a fresh
  child with the same model and case.

Example:
    >>> worker = Worker(ModelSource("card", "prostate.yaml")).start()
    >>> worker.wait(worker.set_case(image, geometry))                     # preprocessing and prediction, once
    >>> answer = worker.wait(worker.explain(ExplainRequest(voxel=(12, 40, 33), method="lrp")))
    >>> answer.maps.shape, answer.record["relative_delta"]

The subjects live in one module each: :mod:`.session` (the warm session), :mod:`.framing` (messages over a pipe),
:mod:`.serving` (the child's loop, with cancel), :mod:`.host` (:class:`Worker`), :mod:`.process_tree` (starting and
ending the child's process tree); ``python -m SegExplainLib.frontends.worker`` runs :func:`.serving.main`.
"""

from __future__ import annotations

from .host import Answer, Worker
from .process_tree import CLOSE_GRACE_S
from .session import WarmSession

__all__ = ["CLOSE_GRACE_S", "Answer", "WarmSession", "Worker"]
