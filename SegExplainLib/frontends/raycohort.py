"""``segexplain cohort --workers N``: the cases of a cohort explained by warm Ray actors.

Each actor holds a :class:`~SegExplainLib.frontends.worker.WarmSession`, so the model is loaded once per actor rather than once
per case. The driver (the ``segexplain cohort`` process) reads each case's files, sends the image (and the label's
mask) to a free actor, gets the maps, the record and the figures back (arrays and PNG bytes: the actors draw the
figures, which take longer than explaining a small case), and writes the case folder itself with
:func:`~SegExplainLib.frontends.cli.write_case_outputs`, the function ``segexplain explain`` writes with. Only the model files
have to be readable by the actors; the cases and the output folder need not be shared with the machines of a
cluster given with ``--address``. The package itself is shipped to the actors (Ray's ``py_modules``), so they run
the driver's code.
"""

from __future__ import annotations

import argparse
import contextlib
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

from ..errors import SegExplainError

__all__ = ["CaseWorker", "check_address", "explain_cases", "import_ray", "start_ray"]

#: Object store of a local Ray started for a run: the images and maps in flight, a few per worker. Ray spills larger
#: amounts to disk.
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20
#: Cases queued at each actor: the next case is there when one ends, while the driver writes the finished one.
CASES_PER_ACTOR = 2
_PACKAGE = Path(__file__).resolve().parent


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
        model_arguments: The model options of ``segexplain explain``.
        trust_code: ``--trust-model-code``.
        threads: torch threads of this actor (its share of the CPU cores).
    """

    def __init__(self, model_arguments: Sequence[str], trust_code: bool, threads: int) -> None:
        import torch

        from .cli import failure_text, model_fields
        from .worker import WarmSession

        torch.set_num_threads(threads)
        self.session, self.info = None, {}
        try:
            self.session = WarmSession(model_arguments, trust_code=trust_code)
        except Exception as error:  # noqa: BLE001 - told to the driver, which stops the run
            self.info = {"error": failure_text(error)}
            return
        session = self.session
        self.info = {"sequences": session.sequences, "model": model_fields(
            session.description, normalized=session.card is not None or session.pipeline is not None,
            model=session.model)}

    def ready(self) -> dict[str, Any]:
        """``{"sequences", "model"}`` (the model's entries of summary.json), or ``{"error"}``."""
        return self.info

    def explain(self, image: np.ndarray, geometry: dict[str, Any], request: Sequence[str], mask: np.ndarray | None,
                names: Sequence[str] | None) -> dict[str, Any]:
        """Explain one case: ``{"maps", "record", "figures"}``, or ``{"error"}`` (the actor stays for the next case).

        ``figures`` (file name to PNG bytes) are drawn here when ``names`` (the sequence names) are given: drawing
        takes longer than explaining a small case, and the driver would draw one case after another.
        """
        from .cli import case_figures, failure_text
        from ..io.imaging import Geometry

        try:
            self.session.set_case(image, Geometry(**geometry))
            result = self.session.explain(request, mask=mask)
            maps = result.maps.astype(np.float32)
            pngs = {}
            if names is not None:
                with tempfile.TemporaryDirectory(prefix="segexplain-figures-") as folder:
                    pngs = {name: (Path(folder) / name).read_bytes()
                            for name in case_figures(image, maps, names, Path(folder))}
        except Exception as error:  # noqa: BLE001 - one failing case must not stop the cohort
            return {"error": failure_text(error)}
        return {"maps": maps, "record": result.record(), "figures": pngs}


def _options(parser: argparse.ArgumentParser, args: argparse.Namespace, leave_out: Sequence[str]) -> list[str]:
    """The values in ``args`` of ``parser``'s options, as command-line words; defaults are left out."""
    words: list[str] = []
    for action in parser._actions:  # argparse has no public list of a parser's options
        value = getattr(args, action.dest, action.default)
        if not action.option_strings or action.dest in leave_out or value == action.default:
            continue
        flag = action.option_strings[0]
        if action.nargs == 0:  # store_true
            words.append(flag)
        elif isinstance(action, argparse._AppendAction):
            words += [word for item in value for word in (flag, str(item))]
        else:
            words += [flag, *map(str, value if isinstance(value, list) else [value])]
    return words


def _resources(ray, workers: int) -> dict[str, float]:
    """Each actor's share: the CPU cores (not more than one machine has) and a GPU when the cluster has them."""
    total = ray.cluster_resources()
    biggest = max(node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]) or 1.0
    cpus = min(total.get("CPU", 1.0) / workers, biggest)
    gpus = total.get("GPU", 0.0)
    # fractions when there are more workers than cores or GPUs: whole ones would leave actors waiting for ever
    return {"num_cpus": float(int(cpus)) if cpus >= 1 else cpus,
            "num_gpus": 1.0 if gpus >= workers else gpus / workers}


def explain_cases(cases: Sequence[tuple[str, argparse.Namespace]], *, workers: int, address: str | None,
                  progress) -> dict[str, str]:
    """Explain and write ``cases`` with ``workers`` warm Ray actors; the failures, case name to message.

    Args:
        cases: Each case's name and its ``segexplain explain`` arguments (as parsed; ``output`` is its folder).
            Every case has the same model, region and method options.
        workers: Number of actors.
        address: A running Ray cluster, or None for a local Ray started for the run.
        progress: The cohort's progress display (one step per finished case).

    Returns:
        The failing cases, with the message that says why, as ``segexplain cohort`` records them.

    Raises:
        SegExplainError: Ray is missing or unreachable, or the actors cannot load the model.
    """
    from ..io import imaging
    from .cli import _label_mask, _resample_advice, failure_text, sequence_names, write_case_outputs
    from ..engine.filters import AmplitudeFilter
    from .worker import _model_parser, _request_parser

    if not cases:
        return {}
    first = cases[0][1]
    model_arguments = _options(_model_parser(), first, leave_out=("trust_model_code",))
    request = _options(_request_parser(), first, leave_out=("label",))  # a label is sent as its mask
    filters = [AmplitudeFilter.parse(spec) for spec in first.filter]
    ray = import_ray()
    started = start_ray(address)
    try:
        shares = _resources(ray, workers)
        actor_class = ray.remote(CaseWorker).options(max_restarts=1, **shares)
        threads = max(1, int(shares["num_cpus"]))
        actors = [actor_class.remote(model_arguments, first.trust_model_code, threads) for _ in range(workers)]
        try:
            info = ray.get([actor.ready.remote() for actor in actors])[0]
        except ray.exceptions.RayError as error:  # the actor could not even start (a package missing there)
            info = {"error": failure_text(error)}
        if "error" in info:
            msg = f"the Ray workers cannot load the model: {info['error']}"
            raise SegExplainError(msg)
        failures: dict[str, str] = {}
        running: dict[Any, tuple[Any, str, argparse.Namespace, Any]] = {}
        queue = list(cases)

        def fail(name: str, text: str) -> None:
            failures[name] = text
            progress.say(f"  failed: {text}")

        def submit(actor) -> None:
            while queue:
                name, args = queue.pop(0)
                try:
                    with _resample_advice():
                        image, geometry = imaging.read_sequences(args.input, resample=args.resample)
                        names = sequence_names(args.sequence_names, info["sequences"], image.shape[0])
                        mask = _label_mask(args, geometry, args.label) if args.label else None
                except Exception as error:  # noqa: BLE001 - one failing case must not stop the cohort
                    progress.step(name)
                    fail(name, failure_text(error))
                    continue
                reference = actor.explain.remote(image, geometry.to_dict(), request, mask,
                                                 None if args.no_figures else names)
                running[reference] = (actor, name, args, (image, geometry, names))
                return

        for actor in actors:
            for _ in range(CASES_PER_ACTOR):
                submit(actor)
        while running:
            [reference], _ = ray.wait(list(running), num_returns=1)
            actor, name, args, (image, geometry, names) = running.pop(reference)
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
                with _resample_advice():
                    write_case_outputs(Path(args.output), overwrite=True, image=image, geometry=geometry,
                                       maps=np.array(answer["maps"]), record=answer["record"], names=names, inputs=args.input,
                                       model=info["model"], filters=filters, ground_truth=args.ground_truth,
                                       resample=args.resample, figures=answer["figures"] or False)
            except Exception as error:  # noqa: BLE001 - one failing case must not stop the cohort
                fail(name, failure_text(error))
    finally:
        if started:
            with contextlib.suppress(Exception):  # ending Ray must not hide the run's own error
                ray.shutdown()
    return failures
