"""The explanation in a warm background worker: the model loaded once, the case sent once, each click answered.

The Slicer module and the browser app must stay responsive while a 3D explanation runs, and a user must be able to
cancel it. Starting ``segexplain explain`` per click cost seconds of process start, imports and file I/O for an
explanation of under one. So a :class:`WarmExplainer` keeps one worker process (``SegExplainLib.frontends.worker``): it is
started as soon as the model and the input volumes are chosen, keeps them loaded, and answers every click with the
maps as arrays, without files. Another model starts another worker; other volumes send a new case; a crashed worker
is restarted by the next click, which first reports the click it took down. Each click is a :class:`WarmRun`, which
a GUI timer polls. The model is the application's :class:`~SegExplainLib.application.model_source.ModelSource` and
each click an :class:`~SegExplainLib.application.requests.ExplainRequest` (:meth:`ExplainSettings.request`), the
classes ``segexplain explain`` parses into, so the record of a result holds the command line that reproduces it from
the input files. The worker ends with its host (``SegExplainLib.application.parent_watch``).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from SegExplainLib.application.model_source import ModelSource
from SegExplainLib.application.requests import CaseRun, EvaluationRequest, EvaluationRun, ExplainRequest
from SegExplainLib.application.sequences import match_sequences
from SegExplainLib.engine import metrics
from SegExplainLib.engine.api import METHODS as ENGINE_METHODS
from SegExplainLib.errors import SegExplainError
from SegExplainLib.frontends.worker import Worker
from SegExplainLib.models.demo_card import demo_card_path

from . import nodes

#: The regions a user can pick, and what each needs.
REGION_KINDS = ("segment", "box", "point", "predicted", "class")
#: The kinds of model the module offers: a model card file, an nnU-Net v2 results folder, a MONAI bundle folder.
MODEL_KINDS = ("card", "nnunet", "bundle")
#: How a refusal of a model's code tells the module's user to allow it.
TRUST_ADVICE = (", which a model card cannot allow itself; allow it only if you trust the card: tick 'Allow code from "
                "this model' in the Slicer module, or start segexplain review with --trust-model-code")
#: Methods offered in the module, in menu order: the engine's registry, so a method registered there is offered here
#: (the module file's menu, which cannot import the engine when Slicer starts, is checked against this).
METHODS = tuple(ENGINE_METHODS)
#: The largest seed: what Qt's spin box (a C int) holds, so the panel's seed field covers every seed.
SEED_MAX = 2**31 - 1
#: The methods "Score methods" scores unless the user names others: ones that finish in seconds on the demo case.
SCORED_METHODS = ("gradient", "gradient_x_input", "lrp")


@dataclass
class Region:
    """What to explain, in voxels of the input grid.

    Attributes:
        kind: One of :data:`REGION_KINDS`.
        mask: ``segment``: the (D, H, W) bool mask of the segment.
        box: ``box``: (D0, H0, W0, D1, H1, W1), half open.
        pointRas: ``point``: the clicked point in the volume's local RAS frame (mm).
        radius: ``point``: radius (mm) of the ball around the point; 0 explains the one voxel.
        description: How the record names the region, e.g. ``segment 'Lesion' of 'Segmentation'``.
    """

    kind: str
    mask: np.ndarray | None = None
    box: tuple[int, ...] | None = None
    pointRas: tuple[float, float, float] | None = None
    radius: float = 0.0
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in REGION_KINDS:
            raise SegExplainError(f"region kind must be one of {', '.join(REGION_KINDS)}, got {self.kind!r}")
        needed = {"segment": self.mask, "box": self.box, "point": self.pointRas}
        if self.kind in needed and needed[self.kind] is None:
            raise SegExplainError(f"a {self.kind!r} region needs its {'mask' if self.kind == 'segment' else self.kind}")
        if isinstance(self.radius, bool) or not isinstance(self.radius, (int, float)) or not self.radius >= 0:
            raise SegExplainError(f"radius must be a number of mm >= 0, got {self.radius!r}")


@dataclass
class ExplainSettings:
    """The method and options of one explanation, as the module's parameter node holds them.

    Attributes:
        method: Engine method, one of :data:`METHODS`.
        composite: LRP composite (``epsilon_plus`` gives each sequence its own share; ``epsilon_plus_flat`` does not).
        layerFilter: Tjoa's layer-wise filter inside the LRP propagation, e.g. ``"pass:0.4"``; empty for none.
        nSteps: Integrated Gradients: the most gradient passes of its adaptive quadrature.
        baseline: Integrated Gradients baseline: ``blur:SIGMA`` (the input blurred, the default), ``zero``, ``min``
            or ``constant:V`` (constant baselines are degenerate for instance-normalized networks; see docs/engine.md).
        aggregation: ``sum`` of the region's logits or ``normalized`` (every voxel weighted equally).
        samples: Voxels drawn for a sampled normalized estimate; 0 computes it exactly.
        classIndex: Output class explained (1 = the first foreground class).
        device: ``auto``, ``cpu`` or ``cuda``.
        seed: Seed of every random draw (SmoothGrad noise, sampled aggregation), 0 to :data:`SEED_MAX`.
        extraOptions: Any other option of the engine's method, e.g. ``{"noise": 0.1}`` for SmoothGrad; passed as
            ``--option key=json`` and validated by the engine, which names an unknown option.
        preview: Show a model's cheaper stand-in first (an nnU-Net ensemble: its first fold without mirroring) and
            replace it by the exact answer when that is done; off, a click shows only the exact answer. Not an option
            of ``segexplain explain``, which always computes the exact answer.
    """

    method: str = "lrp"
    composite: str = "epsilon_plus"
    layerFilter: str = ""
    nSteps: int = 64
    baseline: str = "blur:5"
    aggregation: str = "sum"
    samples: int = 0
    classIndex: int = 1
    device: str = "auto"
    seed: int = 0
    extraOptions: dict[str, Any] = field(default_factory=dict)
    preview: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SegExplainError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.aggregation not in ("sum", "normalized"):
            raise SegExplainError(f"aggregation must be 'sum' or 'normalized', got {self.aggregation!r}")
        for name in ("nSteps", "samples", "classIndex", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "nSteps" else 0):
                raise SegExplainError(f"{name} must be an integer >= {1 if name == 'nSteps' else 0}, got {value!r}")
        if self.seed > SEED_MAX:
            raise SegExplainError(f"seed must be at most {SEED_MAX} (2**31 - 1, what the panel's spin box holds), "
                                  f"got {self.seed!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise SegExplainError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if not isinstance(self.preview, bool):
            raise SegExplainError(f"preview must be True or False, got {self.preview!r}")

    def request(self, region: Region) -> ExplainRequest:
        """The application's request for these settings and ``region`` (a segment travels to the worker as its mask,
        outside the request)."""
        where = {"box": {"box_index": region.box}, "point": {"point_ras": region.pointRas, "radius": region.radius},
                 "class": {"whole_class": True}}.get(region.kind, {})
        method = {"lrp": {"composite": self.composite, "layer_filter": self.layerFilter or None},
                  "integrated_gradients": {"n_steps": self.nSteps, "baseline": self.baseline}}.get(self.method, {})
        samples = self.samples if self.aggregation == "normalized" and self.samples else None
        return ExplainRequest(**where, **method, method=self.method, class_index=self.classIndex,
                              aggregation=self.aggregation, samples=samples, options=dict(self.extraOptions),
                              device=self.device, seed=self.seed, preview=self.preview)


def fileSafe(name: str) -> str:
    """A sequence name usable in a file name: anything but letters, digits, '.', '-' and '_' becomes '_'."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".")
    return safe or "sequence"


def _caseKey(volumes: list[Any], names: list[str]) -> tuple:
    """What makes a case: the nodes, their voxels' modification times, the grid and the names (no voxel copied)."""
    return (tuple(names), tuple(node.GetID() for node in volumes),
            tuple(node.GetImageData().GetMTime() if node.GetImageData() else 0 for node in volumes),
            tuple(json.dumps(nodes.geometryOfVolume(node).to_dict(), default=str) for node in volumes))


class WarmExplainer:
    """One warm worker for a front end, and what it holds: the model and the case.

    Example (what the module does: prepare when the inputs are chosen, then one run per click):
        >>> explainer = WarmExplainer()
        >>> explainer.prepare(ModelSource("card", ""), [t2, t1, ...], names)        # returns at once
        >>> run = explainer.explain(ModelSource("card", ""), [t2, t1, ...], names, Region("predicted"),
        ...                         ExplainSettings())
        >>> run.wait(60), run.answer.maps.shape
        ('done', (6, 24, 48, 48))

    Args:
        python: The worker's interpreter (default: Slicer's ``PythonSlicer`` when there is one, else this one).
    """

    def __init__(self, *, python: str | None = None) -> None:
        self.python = python
        self.worker: Worker | None = None
        self.model: ModelSource | None = None
        self.stack: nodes.VolumeStack | None = None
        self.step = ""
        self._caseKey: tuple | None = None
        self._run: WarmRun | None = None

    def prepare(self, model: ModelSource, volumes: list[Any], names: list[str], *,
                trustModelCode: bool = False) -> None:
        """Have a worker hold this model and these volumes; returns at once, the worker loads in the background.

        The same model and volumes cost nothing; another model starts a new worker; other volumes (or new voxels)
        send a new case; a dead worker, or one whose model failed to load, is started again.

        Raises:
            SegExplainError: A missing volume, volumes whose names contradict the sequences they were chosen for
                (:func:`~SegExplainLib.application.sequences.match_sequences`), volumes off one grid, a missing model
                or one that would run code without ``trustModelCode``.
        """
        if len(volumes) != len(names) or not all(volumes):
            raise SegExplainError(f"select one volume for each of the {len(names)} sequences: {', '.join(names)}")
        match = match_sequences([node.GetName() for node in volumes], names, given_order=True)  # refuses a mix-up
        if match.reordered:  # a volume was chosen for each sequence: names that say otherwise are refused, not swapped
            raise SegExplainError(f"the volumes' names say other sequences than they were chosen for: {match.pairs()}; "
                                  "choose each volume for its sequence")
        if not isinstance(trustModelCode, bool):
            raise SegExplainError(f"trustModelCode must be True or False, got {trustModelCode!r}")
        model = replace(model, trust_code=trustModelCode)  # the user's word, never the model's
        model.check(advice=TRUST_ADVICE)
        if self.worker is None or model != self.model:
            self.close()
            self.worker = Worker(model, python=self.python).start()
            self.model, self._caseKey = model, None
        else:
            load = self.worker.answer(self.worker.load_request)
            if self.worker.state == "dead" or (load is not None and load.state != "done"):
                self.worker.restart()  # brings the model and the case back
            case = self.worker.answer(self.worker.case_request) if self.worker.case_request else None
            if case is not None and case.state != "done":
                self._caseKey = None
        caseKey = _caseKey(volumes, names)
        if caseKey != self._caseKey:
            self.stack = nodes.stackVolumes(volumes, names)
            self.worker.set_case(self.stack.image, self.stack.geometry)
            self._caseKey = caseKey

    @property
    def ready(self) -> bool:
        """The model is loaded and the case prepared: a click is only its explanation."""
        worker = self.worker
        answers = [worker.answer(worker.load_request), worker.answer(worker.case_request)] if worker else [None]
        return worker is not None and worker.state == "running" and all(a and a.state == "done" for a in answers)

    @property
    def loading(self) -> bool:
        """The running worker has not yet answered the model's load or the case: the front end's timer must keep
        calling :meth:`poll` until this is false, since the host starts no thread and nothing moves between calls."""
        worker = self.worker
        return worker is not None and worker.state == "running" and any(
            request and worker.answer(request) is None for request in (worker.load_request, worker.case_request))

    def explain(self, model: ModelSource, volumes: list[Any], names: list[str], region: Region,
                settings: ExplainSettings, *, trustModelCode: bool = False) -> WarmRun:
        """Prepare (see :meth:`prepare`) and ask for one explanation; returns the running :class:`WarmRun`.

        A click that is refining its preview (:attr:`WarmRun.refining`) is cancelled first: its preview stays shown,
        and the worker turns to the new click at once.
        """
        if self._run is not None and self._run.refining:
            self._run.cancel()
        self.prepare(model, volumes, names, trustModelCode=trustModelCode)
        self._run = WarmRun(self, region, settings)
        return self._run

    def score(self, model: ModelSource, volumes: list[Any], names: list[str], region: Region,
              settings: ExplainSettings, methods: tuple[str, ...], *, trustModelCode: bool = False,
              options: dict[str, Any] | None = None) -> ScoreRun:
        """Prepare (see :meth:`prepare`) and ask for the scorecard of ``methods`` for ``region`` (``options``: of the
        scoring, see :class:`ScoreRun`); returns the running :class:`ScoreRun`. A click refining its preview is
        cancelled first, as by :meth:`explain`."""
        request = ScoreRun.evaluationRequestOf(region, settings, methods, options)  # a bad one starts nothing
        if self._run is not None and self._run.refining:
            self._run.cancel()
        self.prepare(model, volumes, names, trustModelCode=trustModelCode)
        self._run = ScoreRun(self, region, settings, request)
        return self._run

    def poll(self, timeout: float = 0.0) -> list[dict[str, Any]]:
        """Move the worker's bytes that are ready (this is the front end's timer tick: the host starts no thread), and
        return its events since the last call; ``step`` follows what it is doing. ``timeout``: wait that long for a
        first event."""
        events = self.worker.poll(timeout) if self.worker is not None else []
        for event in events:
            if event.get("event") == "progress":
                self.step = event["step"]
        return events

    def close(self) -> None:
        """End the worker (the module's cleanup, a closed scene, the review server's end)."""
        if self.worker is not None:
            self.worker.close()
        self.worker, self.model, self._caseKey, self.stack, self._run = None, None, None, None, None


#: Progress of a click while the worker does each step.
_FRACTIONS = {"loading model": 0.1, "preparing the case": 0.3, "explaining": 0.5, "refining to the full ensemble": 0.6}
#: Longest single wait of :meth:`WarmRun.wait` for the worker's next event.
_WAIT_S = 0.5
#: Seconds a cancelled explanation may take to stop before its worker is replaced by a fresh one.
_DEAF_S = 5.0


class WarmRun:
    """One click's explanation in the warm worker: ``state`` (running, done, failed, cancelled), ``fraction``,
    ``step``, ``error``; :meth:`poll` from a GUI timer, :meth:`wait` in scripts, :meth:`cancel`.

    With ``settings.preview`` and a model that has a preview (an nnU-Net ensemble), :attr:`preview` holds the first
    answer (the first fold without mirroring) while the run goes on ``running`` (:attr:`refining`) to the exact
    :attr:`answer`; :attr:`shown` is the one to show, and its record says which (``"preview"``, ``"ensemble"``).
    :attr:`explanation` is the scene's folder showing it, set by the workflow.
    """

    def __init__(self, explainer: WarmExplainer, region: Region, settings: ExplainSettings) -> None:
        self.explainer, self.worker, self.stack = explainer, explainer.worker, explainer.stack
        self.model, self.region, self.settings = explainer.model, region, settings
        #: What the worker is asked: the application's request (a segment travels as its mask).
        self.explainRequest = settings.request(region)
        self.state, self.fraction, self.step, self.error = "running", 0.0, "waiting for the worker", ""
        self.answer = self.preview = self.explanation = None
        self._explaining = False
        self.request = self._ask(region.mask if region.kind == "segment" else None)

    def _ask(self, mask: np.ndarray | None) -> int:
        """Send this run's request to the worker (``mask``: a segment's); its number."""
        return self.worker.explain(self.explainRequest, mask=mask)

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def refining(self) -> bool:
        """Its preview came and the exact answer is being computed."""
        return self.running and self.preview is not None

    @property
    def shown(self) -> Any:
        """The answer to show: the exact one when done, else the preview (None before either came)."""
        return self.answer or self.preview

    def poll(self, timeout: float = 0.0) -> list[dict[str, Any]]:
        """Move the worker's bytes (the GUI timer's tick) and return its events since the last call; updates
        ``state``, ``fraction``, ``step`` and ``error``. ``timeout``: wait that long for a first event."""
        events = self.explainer.poll(timeout) if self.explainer.worker is self.worker else self.worker.poll(timeout)
        # the step is read off the worker, not off these events: another run polling the same worker (a scoring
        # queued behind a click) may have received this run's events, and this run theirs
        progress = self.worker.progress(self.request) or self._queuedBehind()
        if progress is not None and self.running:
            self._explaining = self._explaining or progress["request"] == self.request
            # a scoring tells its fraction done; an explanation's steps have theirs
            self.step = progress["step"]
            self.fraction = progress.get("fraction", _FRACTIONS.get(progress["step"], self.fraction))
        self.preview = self.preview or self.worker.preview(self.request)
        answer = self.worker.answer(self.request)
        if self.running and answer is not None:
            self.state, self.error, self.fraction = answer.state, answer.error, 1.0
            self.answer = answer if answer.state == "done" else None
        return events

    def _queuedBehind(self) -> dict[str, Any] | None:
        """The progress of the model's load or the case while this run waits for them, else None."""
        worker = self.worker
        waitedFor = [request for request in (worker.case_request, worker.load_request)
                     if request and worker.answer(request) is None]
        return next(filter(None, map(worker.progress, waitedFor)), None)

    def wait(self, timeout: float | None = None) -> str:
        """Block until the answer (tests and scripts); returns the final state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running:
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise SegExplainError(f"the explanation took longer than {timeout} s and was cancelled")
            self.poll(_WAIT_S if deadline is None else min(_WAIT_S, max(deadline - time.monotonic(), 0.0)))
        return self.state

    def cancel(self) -> None:
        """Stop this click, through the worker's input (no signal: the worker may run behind a launcher, or on
        Windows). A running explanation is interrupted and the worker stays warm with its model and case; one still
        queued behind the model or the case is not run. A refining click keeps its :attr:`preview`, whose record
        says it is one."""
        self.poll()
        if not self.running:
            return
        self.worker.cancel(self.request)
        if self._explaining:
            try:
                self.worker.wait(self.request, timeout=_DEAF_S)
            except SegExplainError:
                if self.worker.answer(self.request) is None:  # deaf to the interrupt (a long native call): a fresh one
                    self.worker.restart()
        self.state, self.step = "cancelled", "cancelled"

    def command(self) -> list[str]:
        """The ``segexplain explain`` command line of this result, run in a folder where the scene's volumes are
        saved under their file-safe sequence names (``4__T2.nrrd``; the record's ``scene_inputs`` says which volume
        each is) and a segment as the label file ``segment.nrrd``; it writes ``segexplain-output``."""
        return ["segexplain", "explain", *self._caseRun(self.explainRequest, "segexplain-output").arguments()]

    def _caseRun(self, request: ExplainRequest, output: str) -> CaseRun:
        """The command line's run of ``request`` on the scene's volumes saved under their file-safe sequence names
        (a segment as ``segment.nrrd``), writing ``output``."""
        names = tuple(fileSafe(n) for n in self.stack.names)
        request = replace(request, label="segment.nrrd") if self.region.kind == "segment" else request
        return CaseRun(tuple(f"{n}.nrrd" for n in names), output, self.model, request, sequence_names=names)

    def record(self) -> dict[str, Any]:
        """The record of the shown answer (:attr:`shown`), as ``summary.json`` of the command line holds it: the
        engine's record, the sequences, the grid, the model, the relevance shares per sequence, and the command line
        (of the exact answer; a preview's record says it is one)."""
        shown = self.shown
        if shown is None:
            raise SegExplainError(f"the explanation is {self.state}, not done")
        names = [fileSafe(n) for n in self.stack.names]
        load = self.worker.answer(self.worker.load_request)
        return {**shown.record, "sequence_names": names, "geometry": self.stack.geometry.to_dict(),
                "model": load.record.get("model") if load else None,
                "relevance_shares": metrics.shares_by_name(shown.maps, names),
                "command": self.command()}


class ScoreRun(WarmRun):
    """The scorecard of several methods for one region in the warm worker (the "Score methods" action): polled,
    waited for and cancelled as a :class:`WarmRun`; its answer's record is the scorecard as ``summary.json`` of
    ``segexplain evaluate`` holds it, without maps.

    Args:
        explainer: The warm worker holding the model and the case.
        region: The region scored.
        settings: The class, device and seed of the scoring (its method is not used).
        evaluationRequest: What the worker is asked (:meth:`evaluationRequestOf`).
    """

    def __init__(self, explainer: WarmExplainer, region: Region, settings: ExplainSettings,
                 evaluationRequest: EvaluationRequest) -> None:
        self.evaluationRequest = evaluationRequest
        super().__init__(explainer, region, settings)

    @staticmethod
    def evaluationRequestOf(region: Region, settings: ExplainSettings, methods: tuple[str, ...],
                            options: dict[str, Any] | None = None) -> EvaluationRequest:
        """The worker's request for scoring ``methods`` for ``region`` with the class, device and seed of
        ``settings``.

        Args:
            region: The region scored.
            settings: The class, device and seed (its method is not used).
            methods: The engine's methods to score, at least one.
            options: Other fields of the :class:`~SegExplainLib.application.requests.EvaluationRequest` (``steps``,
                ``random_orders``, ``method_options``, ...); None for ``segexplain evaluate``'s defaults.

        Raises:
            SegExplainError: An unknown method or option, or a request the scorecard cannot take (a sampled
                aggregation).
        """
        if isinstance(methods, str) or not methods:
            raise SegExplainError(f"methods must name at least one method to score, got {methods!r}")
        options = dict(options or {})
        allowed = {f.name for f in fields(EvaluationRequest)} - {"request", "methods"}
        if set(options) - allowed:
            raise SegExplainError(f"unknown scoring options {sorted(set(options) - allowed)}; expected some of "
                                  f"{sorted(allowed)}")
        return EvaluationRequest(request=replace(settings.request(region), preview=False), methods=tuple(methods),
                                 **options)

    def _ask(self, mask: np.ndarray | None) -> int:
        return self.worker.evaluate(self.evaluationRequest, mask=mask)

    def command(self) -> list[str]:
        """The ``segexplain evaluate`` command line of this scorecard, run where the scene's volumes are saved as for
        :meth:`WarmRun.command`; it writes ``segexplain-scorecard``."""
        scoring = {f.name: getattr(self.evaluationRequest, f.name) for f in fields(EvaluationRequest)
                   if f.name != "request"}
        run = EvaluationRun(self._caseRun(self.evaluationRequest.request, "segexplain-scorecard"), **scoring)
        return ["segexplain", "evaluate", *run.arguments()]

    def record(self) -> dict[str, Any]:
        """The scorecard's ``summary.json``: the worker's answer (``scorecard``, ``evaluation_request``, the model,
        the sequence names), the region as the scene named it and the command line."""
        if self.answer is None:
            raise SegExplainError(f"the scoring is {self.state}, not done")
        return {**self.answer.record, "region": self.region.description, "command": self.command()}


def demoCardPath() -> str:
    """The model card of the bundled demo U-Net (6 synthetic MRI sequences, lesion class 1)."""
    return str(demo_card_path())
