"""``segexplain cohort --workers N``: the cases of a cohort explained by warm Ray actors.

Each actor holds a :class:`~SegExplainLib.frontends.worker.WarmSession`, so the model is loaded once per actor rather
than once per case. The driver (the ``segexplain cohort`` process) sends the actors the model and the request as their
JSON (:class:`~SegExplainLib.application.model_source.ModelSource`,
:class:`~SegExplainLib.application.requests.ExplainRequest`), reads each case's files, sends the image (and the
label's mask) to a free actor, gets the maps, the record and the figures back (arrays and PNG bytes: the actors draw
the figures, which take longer than explaining a small case), and writes the case folder itself with
:func:`~SegExplainLib.io.outputs.write_case_outputs`, the function ``segexplain explain`` writes with. Only the model
files have to be readable by the actors; the cases and the output folder need not be shared with the machines of a
cluster given with ``--address``. The package itself is shipped to the actors (Ray's ``py_modules``), so they run
the driver's code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import secrets
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..application.requests import CaseRun
from ..errors import SegExplainError

__all__ = ["CaseWorker", "check_address", "explain_cases", "import_ray", "start_ray"]

#: Object store of a local Ray started for a run: the images and maps in flight, a few per worker. Ray spills larger
#: amounts to disk.
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20
#: Cases queued at each actor: the next case is there when one ends, while the driver writes the finished one.
CASES_PER_ACTOR = 2
_PACKAGE = Path(__file__).resolve().parents[1]  # SegExplainLib itself, shipped to the workers


@functools.cache
def _local_token() -> str:
    """The token of the local Rays this process starts: drawn once, kept in memory and environments, in no file."""
    return secrets.token_hex(32)


def _require_local_token() -> None:
    """Token authentication for the local Ray about to start, whatever Ray's default or the user's ``RAY_AUTH_MODE``.

    Ray listens on every interface and has no option to bind to loopback, so anyone who reaches this machine could
    run code in it: with this, its GCS, raylet and workers refuse every process without this run's token. The
    cluster's processes inherit it from this process's environment; Ray writes no token file (``~/.ray/auth_token``)
    when one is in the environment.
    """
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError as error:  # private names, read on Ray 2.60: never start a local Ray without the token
        import ray

        raise SegExplainError(f"segexplain cohort --workers starts a local Ray only with token authentication, which "
                              f"this Ray {ray.__version__} does not offer as SegExplain uses it (tested with Ray "
                              f"2.60); install a newer ray ({error})") from error

    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=_local_token())
    Config.initialize("")  # this process's Ray read its settings at import: as Ray itself does when it turns auth on
    AuthenticationTokenLoader.instance().reset_cache()


def import_ray():
    try:
        import ray
    except ImportError:
        msg = 'cohort --workers needs Ray: pip install "segexplain[ray]"'
        raise SegExplainError(msg) from None
    return ray


def check_address(address: str, timeout: float = 5.0) -> None:
    """Refuse a malformed ``--address`` and one where nothing listens: Ray itself retries those for minutes.

    ``auto`` (the cluster this machine runs) is left to Ray, which says at once when there is none.
    """
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        msg = f"--address must be HOST:PORT, ray://HOST:PORT or auto, got {address!r}"
        raise SegExplainError(msg)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        msg = f"no Ray cluster answers at --address {address!r} ({error}); start one with 'ray start --head'"
        raise SegExplainError(msg) from None


def start_ray(address: str | None = None) -> bool:
    """Connect this process to Ray: a local instance for the run, or the cluster at ``address``.

    A Ray already initialized in this process (by a script or a test) is used as it is.

    Args:
        address: A running cluster (``HOST:PORT``, ``ray://HOST:PORT`` or ``auto``); None starts a local Ray with a
            small object store, no dashboard, and token authentication with a token drawn for this process.

    Returns:
        Whether this call started or connected Ray (the caller then shuts it down).

    Raises:
        SegExplainError: Ray is not installed, or no cluster answers at ``address``.
    """
    ray = import_ray()
    if address is not None:
        check_address(address)
        # the workers there read the cases' images, the model and its code: the user should know where they go
        print(f"note: the case images, the model and its options are sent to the Ray cluster at {address}; anyone "
              "who controls that cluster can read them (see docs/security.md)", file=sys.stderr, flush=True)
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False,
             "runtime_env": {"py_modules": [str(_PACKAGE)]}}
    if address is None:
        _require_local_token()
        ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES, **quiet)
        return True
    try:
        ray.init(address=address, **quiet)
    except ConnectionError as error:
        msg = f"cannot connect to the Ray cluster at --address {address!r}: {str(error).splitlines()[0]}"
        raise SegExplainError(msg) from None
    return True


class CaseWorker:
    """A Ray actor's state: the model loaded once, then one case after another.

    Args:
        model: The model's JSON (:meth:`ModelSource.to_json`), with the user's word on its code.
        threads: torch threads of this actor (its share of the CPU cores).
    """

    def __init__(self, model: dict[str, Any], threads: int) -> None:
        import torch

        from ..application.case_run import failure_text
        from ..application.model_source import ModelSource
        from ..application.opening import model_fields
        from .worker import WarmSession

        torch.set_num_threads(threads)
        self.session, self.info = None, {}
        try:
            self.session = WarmSession(ModelSource.from_json(model))
        except Exception as error:  # noqa: BLE001 - told to the driver, which stops the run
            self.info = {"error": failure_text(error)}
            return
        self.info = {"sequences": self.session.sequences, "model": model_fields(self.session.pipeline)}

    def ready(self) -> dict[str, Any]:
        """``{"sequences", "model"}`` (the model's entries of summary.json), or ``{"error"}``."""
        return self.info

    def explain(self, image: np.ndarray, geometry: dict[str, Any], request: dict[str, Any], mask: np.ndarray | None,
                names: Sequence[str] | None) -> dict[str, Any]:
        """Explain one case: ``{"maps", "record", "figures"}``, or ``{"error"}`` (the actor stays for the next case).

        ``request`` is the JSON of the :class:`ExplainRequest`, checked here by the same class. ``figures`` (file name
        to PNG bytes) are drawn here when ``names`` (the sequence names) are given: drawing takes longer than
        explaining a small case, and the driver would draw one case after another.
        """
        from ..application.case_run import failure_text, shown_region
        from ..application.requests import ExplainRequest
        from ..io.imaging import Geometry
        from ..io.outputs import case_figures

        try:
            grid, explain_request = Geometry(**geometry), ExplainRequest.from_json(request)
            self.session.set_case(image, grid)
            result = self.session.explain(explain_request, mask=mask)
            maps = result.maps.astype(np.float32)
            pngs = {}
            if names is not None:
                region = shown_region(explain_request.target(grid, mask), image.shape[1:])
                with tempfile.TemporaryDirectory(prefix="segexplain-figures-") as folder:
                    drawn = case_figures(image, maps, names, Path(folder), geometry=grid, record=result.record(),
                                         region=region)
                    pngs = {name: (Path(folder) / name).read_bytes() for name in drawn}
        except Exception as error:  # noqa: BLE001 - one failing case must not stop the cohort
            return {"error": failure_text(error)}
        return {"maps": maps, "record": result.record(), "figures": pngs}


def _resources(ray, workers: int) -> dict[str, float]:
    """Each actor's share: the CPU cores (not more than one machine has) and a GPU when the cluster has them."""
    total = ray.cluster_resources()
    biggest = max(node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]) or 1.0
    cpus = min(total.get("CPU", 1.0) / workers, biggest)
    gpus = total.get("GPU", 0.0)
    # fractions when there are more workers than cores or GPUs: whole ones would leave actors waiting for ever
    return {"num_cpus": float(int(cpus)) if cpus >= 1 else cpus,
            "num_gpus": 1.0 if gpus >= workers else gpus / workers}


def explain_cases(cases: Sequence[dict[str, Any]], template: CaseRun, output: Path, *, workers: int,
                  address: str | None, progress) -> dict[str, str]:
    """Explain and write ``cases`` with ``workers`` warm Ray actors; the failures, case name to message.

    Args:
        cases: The cases (:func:`~SegExplainLib.application.cohort.read_cases`).
        template: The model, request and options of every case (:func:`~SegExplainLib.application.cohort.case_run`
            gives each case its run).
        output: The cohort folder (each case is written to ``output/cases/<case>``).
        workers: Number of actors.
        address: A running Ray cluster, or None for a local Ray started for the run.
        progress: The cohort's progress display (one step per finished case).

    Returns:
        The failing cases, with the message that says why, as ``segexplain cohort`` records them.

    Raises:
        SegExplainError: Ray is missing or unreachable, or the actors cannot load the model.
    """
    from ..application.case_run import (
        case_sequence_names,
        failure_text,
        match_case_inputs,
        resample_advice,
        sequence_record,
    )
    from ..application.cohort import case_run
    from ..engine.filters import AmplitudeFilter
    from ..io import imaging
    from ..io.outputs import write_case_outputs

    if not cases:
        return {}
    request = dataclasses.replace(template.request, label=None).to_json()  # a label is sent as its mask
    filters = [AmplitudeFilter.parse(spec) for spec in template.filters]
    ray = import_ray()
    started = start_ray(address)
    try:
        shares = _resources(ray, workers)
        actor_class = ray.remote(CaseWorker).options(max_restarts=1, **shares)
        threads = max(1, int(shares["num_cpus"]))
        actors = [actor_class.remote(template.model.to_json(), threads) for _ in range(workers)]
        try:
            info = ray.get([actor.ready.remote() for actor in actors])[0]
        except ray.exceptions.RayError as error:  # the actor could not even start (a package missing there)
            info = {"error": failure_text(error)}
        if "error" in info:
            msg = f"the Ray workers cannot load the model: {info['error']}"
            raise SegExplainError(msg)
        failures: dict[str, str] = {}
        running: dict[Any, tuple[Any, str, CaseRun, Any]] = {}
        queue = list(cases)

        def fail(name: str, text: str) -> None:
            failures[name] = text
            progress.say(f"  failed: {text}")

        def submit(actor) -> None:
            while queue:
                case = queue.pop(0)
                name = case["case"]
                try:
                    run, match = match_case_inputs(case_run(case, template, output), info["sequences"])
                    with resample_advice():
                        image, geometry = imaging.read_sequences(list(run.inputs), resample=run.resample)
                        names = case_sequence_names(run.sequence_names, info["sequences"], image.shape[0])
                        mask = run.request.label_mask(geometry, resample=run.resample) if run.request.label else None
                except Exception as error:  # noqa: BLE001 - one failing case must not stop the cohort
                    progress.step(name)
                    fail(name, failure_text(error))
                    continue
                reference = actor.explain.remote(image, geometry.to_dict(), request, mask,
                                                 names if run.figures else None)
                running[reference] = (actor, name, run, (image, geometry, names, sequence_record(run, match)))
                return

        for actor in actors:
            for _ in range(CASES_PER_ACTOR):
                submit(actor)
        while running:
            [reference], _ = ray.wait(list(running), num_returns=1)
            actor, name, run, (image, geometry, names, matched) = running.pop(reference)
            submit(actor)  # before writing: the actor works while the driver writes
            progress.step(name)
            try:
                answer = ray.get(reference)
            except ray.exceptions.RayError as error:  # the actor died (Ray restarts it once), or Ray failed
                cause = getattr(error, "cause", None)  # a task's own exception, without Ray's coloured header
                answer = {"error": f"the Ray worker failed: {failure_text(cause or error)}"}
            if "error" in answer:
                fail(name, answer["error"])
                continue
            for warning in answer["record"].get("warnings", []):
                progress.warn(warning)
            try:  # the maps are copied: Ray hands out read-only views of its object store
                with resample_advice():
                    write_case_outputs(Path(run.output), overwrite=True, image=image, geometry=geometry,
                                       maps=np.array(answer["maps"]), record={**answer["record"], **matched},
                                       names=names, inputs=list(run.inputs), model=info["model"], filters=filters,
                                       ground_truth=run.ground_truth, resample=run.resample,
                                       figures=answer["figures"] or False)
            except Exception as error:  # noqa: BLE001 - one failing case must not stop the cohort
                fail(name, failure_text(error))
    finally:
        if started:
            with contextlib.suppress(Exception):  # ending Ray must not hide the run's own error
                ray.shutdown()
    return failures
