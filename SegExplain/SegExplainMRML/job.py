"""The explanation as a background process: ``segexplain explain`` on files written from the scene.

The Slicer module (and the browser app) must stay responsive while a 3D explanation runs for seconds to minutes, and
a user must be able to cancel it. So the job writes the input sequences and the region to a private temporary
folder, starts ``python -m SegExplainLib explain ... --progress json`` as a child process, and reports its JSON
progress lines through :meth:`ExplainJob.poll`, which a GUI timer calls. The child process is the same command line a
researcher runs by hand, so a result from Slicer can be reproduced outside it from the recorded arguments.

The job folder holds the patient's images, so no path leaves it behind. The inputs are deleted as soon as the
process has ended (done, failed or cancelled), and the rest by :meth:`ExplainJob.cleanup` once the results are
loaded. The child ends with its host: when Slicer or the review server ends, even killed with SIGKILL, the child
deletes the folder and exits (``SegExplainLib._parent_watch``).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import SegExplainLib
from SegExplainLib import _parent_watch
from SegExplainLib.demo import demo_card_path
from SegExplainLib.errors import SegExplainError
from SegExplainLib.imaging import Geometry, write_volume
from SegExplainLib.loading import ModelCard, refuse_untrusted_code
from SegExplainLib.pipelines import sequence_names

from .nodes import VolumeStack

#: The regions a user can pick, and what each needs.
REGION_KINDS = ("segment", "box", "point", "predicted", "class")
#: The job folder's subfolder of inputs.
INPUTS = "inputs"
#: The kinds of model a job explains: a model card file, an nnU-Net v2 results folder, a MONAI bundle folder.
MODEL_KINDS = ("card", "nnunet", "bundle")
#: How messages name each kind's path.
_MODEL_PATHS = {"card": "model card", "nnunet": "nnU-Net results folder", "bundle": "MONAI bundle"}
#: Methods offered in the module, in menu order (the engine's names).
METHODS = ("lrp", "integrated_gradients", "gradient", "gradient_x_input", "smoothgrad", "guided_backprop",
           "deconvolution", "occlusion")


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
        seed: Seed of every random draw (SmoothGrad noise, sampled aggregation).
        extraOptions: Any other option of the engine's method, e.g. ``{"noise": 0.1}`` for SmoothGrad; passed as
            ``--option key=json`` and validated by the engine, which names an unknown option.
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

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SegExplainError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.aggregation not in ("sum", "normalized"):
            raise SegExplainError(f"aggregation must be 'sum' or 'normalized', got {self.aggregation!r}")
        for name in ("nSteps", "samples", "classIndex", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "nSteps" else 0):
                raise SegExplainError(f"{name} must be an integer >= {1 if name == 'nSteps' else 0}, got {value!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise SegExplainError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")

    def arguments(self) -> list[str]:
        """The ``segexplain explain`` options for these settings."""
        args = ["--method", self.method, "--class", str(self.classIndex), "--aggregation", self.aggregation,
                "--device", self.device, "--seed", str(self.seed)]
        if self.method == "lrp":
            args += ["--composite", self.composite] + (["--layer-filter", self.layerFilter] if self.layerFilter else [])
        if self.method == "integrated_gradients":
            args += ["--n-steps", str(self.nSteps), "--baseline", self.baseline]
        if self.aggregation == "normalized" and self.samples:
            args += ["--samples", str(self.samples)]
        for key, value in self.extraOptions.items():
            args += ["--option", f"{key}={json.dumps(value)}"]
        return args


def parseFolds(text: Any) -> tuple[str, ...]:
    """nnU-Net folds from a text such as ``"0 1"`` or ``"0, 1"`` (or a sequence); empty for every trained fold.

    Raises:
        SegExplainError: A fold that is neither a fold number nor ``all``.
    """
    items = re.split(r"[\s,;]+", text.strip()) if isinstance(text, str) else [str(f) for f in (text or ())]
    folds = tuple(item for item in items if item)
    bad = [fold for fold in folds if not (fold.isdigit() or fold == "all")]
    if bad:
        raise SegExplainError(f"folds must be fold numbers (0, 1, ...) or 'all', got {', '.join(map(repr, bad))}")
    return folds


@dataclass(frozen=True)
class ModelSource:
    """The explained model: a model card, an nnU-Net v2 results folder or a MONAI bundle folder.

    Attributes:
        kind: One of :data:`MODEL_KINDS`.
        path: The card file (empty: the bundled demo network) or the model folder.
        configuration: nnU-Net configuration; empty for ``3d_fullres``.
        folds: nnU-Net folds to average (``"0 1"``, ``("0", "1")``); empty for every trained fold.
        mirroring: nnU-Net: average over the mirrored inputs the trainer allowed (``--no-mirroring`` when off).

    Example:
        >>> ModelSource("nnunet", "/results/Dataset001/nnUNetTrainer__nnUNetPlans__3d_fullres", folds="0",
        ...             mirroring=False).arguments()
        ['--nnunet', '/results/...', '--folds', '0', '--no-mirroring']
    """

    kind: str = "card"
    path: str = ""
    configuration: str = ""
    folds: tuple[str, ...] = ()
    mirroring: bool = True

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise SegExplainError(f"model kind must be one of {', '.join(MODEL_KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "path", str(self.path or ""))
        object.__setattr__(self, "configuration", str(self.configuration or "").strip())
        object.__setattr__(self, "folds", parseFolds(self.folds))
        if not isinstance(self.mirroring, bool):
            raise SegExplainError(f"mirroring must be True or False, got {self.mirroring!r}")
        nnunetOptions = [name for name, given in (("configuration", self.configuration), ("folds", self.folds),
                                                  ("mirroring off", not self.mirroring)) if given]
        if nnunetOptions and self.kind != "nnunet":
            raise SegExplainError(f"{', '.join(nnunetOptions)} belong to an nnU-Net results folder, not a "
                                  f"{_MODEL_PATHS[self.kind]}")

    @property
    def location(self) -> str:
        """The card file or folder, the bundled demo card for an empty card path."""
        return self.path or (demoCardPath() if self.kind == "card" else "")

    def check(self, *, trustModelCode: bool = False) -> None:
        """Refuse a missing card or folder, and a card whose model would run code without ``trustModelCode``.

        The plans of an nnU-Net folder and the configuration of a bundle are checked by the job's process, which
        gets ``--trust-model-code`` from the user's word only.
        """
        what = _MODEL_PATHS[self.kind]
        if self.kind == "card":
            if not Path(self.location).is_file():
                raise SegExplainError(f"{what} {self.location!r} is not a file")
            refuse_untrusted_code(
                ModelCard.read(self.location).model, f"{what} {self.location!r}", trusted=trustModelCode,
                advice=", which a model card cannot allow itself; allow it only if you trust the card: tick 'Allow "
                       "code from this model' in the Slicer module, or start segexplain review with "
                       "--trust-model-code")
        elif not self.path:
            raise SegExplainError(f"choose the {what} to explain")
        elif not Path(self.path).is_dir():
            raise SegExplainError(f"{what} {self.path!r} is not a folder")

    def sequenceNames(self) -> list[str]:
        """The model's input sequences, read from its description files (no network is built, see
        :func:`SegExplainLib.pipelines.sequence_names`)."""
        self.check(trustModelCode=True)  # the paths only: nothing of the model runs here
        return sequence_names(self.kind, self.location, configuration=self.configuration or None)

    def arguments(self) -> list[str]:
        """The ``segexplain explain`` options naming this model."""
        if self.kind == "card":
            return ["--card", self.location]
        if self.kind == "bundle":
            return ["--bundle", self.path]
        return ["--nnunet", self.path, *(["--configuration", self.configuration] if self.configuration else []),
                *(["--folds", *self.folds] if self.folds else []), *([] if self.mirroring else ["--no-mirroring"])]


def fileSafe(name: str) -> str:
    """A sequence name usable in a file name: anything but letters, digits, '.', '-' and '_' becomes '_'."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".")
    return safe or "sequence"


def pythonExecutable() -> str:
    """The Python that runs the job: Slicer's ``PythonSlicer`` inside Slicer, else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


def regionArguments(region: Region, geometry: Geometry, folder: Path) -> list[str]:
    if region.kind == "segment":
        path = write_volume(region.mask.astype(np.uint8), geometry, folder / "region.nrrd")
        return ["--label", str(path), "--label-value", "1"]
    if region.kind == "box":
        return ["--box-index", *(str(v) for v in region.box)]
    if region.kind == "point":
        return ["--point-ras", *(f"{v:.6g}" for v in region.pointRas), "--radius", f"{region.radius:g}"]
    if region.kind == "class":
        return ["--whole-class"]
    return []


class ExplainJob:
    """One explanation running in a child process.

    Example (what the module's Apply button does, with a timer calling ``poll``):
        >>> job = ExplainJob(stackVolumes([t2, t1]), Region("point", pointRas=(10.0, -4.5, 22.0), radius=3.0),
        ...                  ExplainSettings(method="lrp"), card="/models/prostate/card.yaml")
        >>> job.start()
        >>> while job.running:
        ...     for event in job.poll(): print(event["step"], event["fraction"])
        >>> job.state, job.outputFolder
        ('done', PosixPath('/tmp/segexplain-job-.../result'))
    """

    def __init__(self, stack: VolumeStack, region: Region, settings: ExplainSettings, *, card: str | None = None,
                 model: ModelSource | None = None, trustModelCode: bool = False, python: str | None = None) -> None:
        """Check the model; nothing runs before :meth:`start`.

        Args:
            stack: The input sequences.
            region: What to explain.
            settings: The method and its options.
            card: The model card (short for ``model=ModelSource("card", card)``); None for the bundled demo network.
            model: The model: a card, an nnU-Net results folder or a MONAI bundle; give ``card`` or ``model``.
            trustModelCode: The user's word that the model may import or run code of someone else (a model file, a
                module outside the built-in networks, MONAI and torch.nn, a pickle; classes of nnU-Net plans or of
                a bundle's configuration outside the libraries): the module's 'Allow code from this model' box or
                ``segexplain review --trust-model-code``, never the card or the folder. Passed on as
                ``--trust-model-code``.
            python: The interpreter of the child process (default :func:`pythonExecutable`).

        Raises:
            SegExplainError: The card or folder is missing, the card is invalid or would run code without
                ``trustModelCode``.
        """
        if card is not None and model is not None:
            raise SegExplainError("give the model card or the model, not both")
        if not isinstance(trustModelCode, bool):
            raise SegExplainError(f"trustModelCode must be True or False, got {trustModelCode!r}")
        model = model if model is not None else ModelSource("card", card or "")
        if not isinstance(model, ModelSource):
            raise SegExplainError(f"model must be a ModelSource, got {type(model).__name__}")
        model.check(trustModelCode=trustModelCode)
        self.stack, self.region, self.settings, self.model = stack, region, settings, model
        self.card = model.location if model.kind == "card" else None
        self.trustModelCode = trustModelCode
        self.python = python or pythonExecutable()
        self.state = "new"
        self.fraction, self.step, self.error = 0.0, "", ""
        self.warnings: list[str] = []
        self.folder: Path | None = None
        self._process: subprocess.Popen | None = None
        self._events: queue.Queue = queue.Queue()
        self._stderr: list[str] = []
        self._threads: list[threading.Thread] = []

    @property
    def outputFolder(self) -> Path:
        if self.folder is None:
            raise SegExplainError("the job has not been started")
        return self.folder / "result"

    @property
    def inputFolder(self) -> Path:
        """Where the inputs are written: the sequences and a segment's mask, deleted when the process ends."""
        if self.folder is None:
            raise SegExplainError("the job has not been started")
        return self.folder / INPUTS

    @property
    def running(self) -> bool:
        return self.state == "running"

    def command(self) -> list[str]:
        """The full command line; valid once :meth:`start` wrote the inputs."""
        names = [fileSafe(n) for n in self.stack.names]
        inputs = [str(self.inputFolder / f"input_{i}_{n}.nrrd") for i, n in enumerate(names)]
        model = [*self.model.arguments(), *(["--trust-model-code"] if self.trustModelCode else [])]
        return [self.python, "-m", "SegExplainLib", "explain", "--input", *inputs, "--sequence-names", *names, *model,
                *regionArguments(self.region, self.stack.geometry, self.inputFolder), *self.settings.arguments(),
                "--output", str(self.outputFolder), "--progress", "json", "--no-figures"]

    def start(self) -> None:
        """Write the inputs and start the child process; returns at once.

        Call it from a thread that outlives the job (a GUI's main thread, the server's event loop): on Linux the
        child ends when the thread that started it ends.
        """
        if self.state != "new":
            raise SegExplainError(f"a job runs once; this one is {self.state}")
        self.folder = Path(tempfile.mkdtemp(prefix="segexplain-job-"))
        try:
            self.inputFolder.mkdir()
            for index, (channel, name) in enumerate(zip(self.stack.image, self.stack.names)):
                write_volume(channel, self.stack.geometry, self.inputFolder / f"input_{index}_{fileSafe(name)}.nrrd")
            command = self.command()
            (self.folder / "command.json").write_text(json.dumps(command))
            environment = dict(os.environ)
            libraryRoot = str(Path(SegExplainLib.__file__).resolve().parent.parent)
            environment["PYTHONPATH"] = os.pathsep.join(filter(None, [libraryRoot, environment.get("PYTHONPATH")]))
            environment[_parent_watch.PARENT_PID] = str(os.getpid())
            environment[_parent_watch.JOB_FOLDER] = str(self.folder)
            self._process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                             env=environment, start_new_session=os.name == "posix")
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.state = "failed"
            raise
        self.state = "running"
        self._threads = [threading.Thread(target=self._readEvents, daemon=True),
                         threading.Thread(target=self._readErrors, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _readEvents(self) -> None:
        for line in self._process.stdout:
            try:
                self._events.put(json.loads(line))
            except json.JSONDecodeError:
                self._stderr.append(line.rstrip())

    def _readErrors(self) -> None:
        for line in self._process.stderr:
            self._stderr.append(line.rstrip())

    def poll(self) -> list[dict[str, Any]]:
        """Progress events since the last call; updates ``state``, ``fraction``, ``step`` and ``error``."""
        finished = self.state == "running" and self._process.poll() is not None
        if finished:
            for thread in self._threads:  # every line the process wrote is read before the state changes
                thread.join()
        events = []
        while not self._events.empty():
            events.append(self._events.get_nowait())
        for event in events:
            if event.get("event") == "warning":
                self.warnings.append(event["message"])
            self.fraction, self.step = float(event.get("fraction", self.fraction)), event.get("step", self.step)
        if finished:
            shutil.rmtree(self.inputFolder, ignore_errors=True)
        if finished and self._process.returncode == 0:
            self.state, self.fraction = "done", 1.0
        elif finished:
            self.state, self.error = "failed", self._errorLine()
        return events

    def _errorLine(self) -> str:
        errors = [line for line in self._stderr if line.startswith("error:")]
        if errors:
            return errors[-1][len("error:"):].strip()
        last = next((line for line in reversed(self._stderr) if line.strip()), "")
        return f"the explanation process stopped with exit code {self._process.returncode}" + (
            f": {last}" if last else "")

    def wait(self, timeout: float | None = None) -> str:
        """Block until the process ends (tests and scripts); returns the final state."""
        if self.state == "running":
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.cancel()
                raise SegExplainError(f"the explanation took longer than {timeout} s and was cancelled") from None
            self.poll()
        return self.state

    def cancel(self) -> None:
        """Stop the process (interrupt, then kill after 5 s) and delete everything it wrote."""
        if self.state == "running":
            if os.name == "posix":
                self._process.send_signal(signal.SIGINT)
            else:
                self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            for thread in self._threads:
                thread.join()
            self.state = "cancelled"
        self.cleanup()

    def cleanup(self) -> None:
        """Delete the temporary folder (after the results were loaded into the scene)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def demoCardPath() -> str:
    """The model card of the bundled demo U-Net (6 synthetic MRI sequences, lesion class 1)."""
    return str(demo_card_path())
