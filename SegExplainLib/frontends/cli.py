"""Command line: ``segexplain explain`` reads MRI sequence files, explains a region and writes maps, record, figures.

Example::

    segexplain explain --input t2.nii.gz t1.nii.gz --model reference --weights unet.safetensors \\
        --point-ras 12.5 -30 44 --radius 5 --class 1 --output results/

Every failure prints one line ``error: ...`` on stderr and exits with status 2; an interrupted run (Ctrl-C) exits
with 130 and leaves no output folder behind, because results are written to a temporary folder that is renamed into
place at the very end. Output folders carry a marker file (:data:`OUTPUT_MARKER`): ``--overwrite`` replaces only a
folder that has it, and only once the new results are complete. ``segexplain cohort`` runs the same explanation over
the cases of a CSV, goes on after a failing case (exit status 1 when any failed) and does not recompute finished
cases when run again; with ``--workers N`` on N warm Ray workers (:mod:`SegExplainLib.frontends.raycohort`).
``segexplain evaluate`` scores several methods on one case (docs/evaluation.md) and writes the scorecard.
``segexplain review`` serves the browser review app (package ``SegExplainReview``, the ``review`` extra) on
127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from ..application.cohort import INCLUSIVITY_FILTERS
from ..application.model_source import add_nnunet_arguments
from ..application.requests import CaseRun, EvaluationRun, add_case_arguments, add_evaluation_arguments
from ..errors import SegExplainError
from ..io.outputs import OUTPUT_MARKER

__all__ = ["EXIT_CASES_FAILED", "EXIT_ERROR", "EXIT_INTERRUPTED", "OUTPUT_MARKER", "main", "parser"]

EXIT_ERROR = 2
EXIT_CASES_FAILED = 1
EXIT_INTERRUPTED = 130
VERBOSE_HELP = "also show the warnings of other libraries (MONAI's deprecation notices, image codecs...) on stderr"
#: The word standing for a cohort case's files until each case gets its own
#: (:func:`~SegExplainLib.application.cohort.case_run`).
_CASE_PLACEHOLDER = "<case>"


def parser() -> argparse.ArgumentParser:
    """The parser of the ``segexplain`` command and its subcommands."""
    parser = argparse.ArgumentParser(prog="segexplain", description="Explain what a 3D segmentation network saw.")
    commands = parser.add_subparsers(dest="command", required=True)
    explain = commands.add_parser("explain", help="explain one case: sequence files in, relevance maps out")
    add_case_arguments(explain).add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    evaluate = commands.add_parser(
        "evaluate", help="score attribution methods on one case: which map can be trusted for this network?",
        description="Scores each method's map on the case (faithfulness by deletion and insertion against random "
                    "orders, cascading randomization, max-sensitivity, relevance outside the receptive field and the "
                    "target; docs/evaluation.md), prints the scorecard and writes summary.json, curves.csv and "
                    "scorecard.png. Inputs, model and region are given as for explain.")
    add_evaluation_arguments(evaluate).add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    demo = commands.add_parser("demo", help="explain the bundled demo network on a generated 6-sequence case")
    demo.add_argument("--output", default="segexplain-demo", metavar="DIR", help="output folder "
                                                                                 "(default: segexplain-demo)")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace an output folder that SegExplain wrote earlier (never any other folder)")
    demo.add_argument("--seed", type=int, default=1000, help="which generated case (held out from training)")
    cohort = commands.add_parser(
        "cohort", help="explain every case of a CSV with one configuration; per-case table and cohort figures",
        description="Options after '--' are those of 'segexplain explain' (model, region, method), used for every "
                    "case. The CSV has the columns case, inputs (paths separated by ';'), and optionally label (a "
                    "segment to explain) and ground_truth; relative paths are relative to the CSV.")
    cohort.add_argument("--cases", required=True, metavar="CSV_OR_FOLDER",
                        help="a CSV, or a folder with one subfolder per case holding its sequence files (named "
                             "<sequence>.nii.gz when --sequence-names is given), label.* and ground_truth.*")
    cohort.add_argument("--output", required=True, metavar="DIR",
                        help="cohort folder (new, empty, or an earlier cohort's: its finished cases are kept and not "
                             "recomputed)")
    cohort.add_argument("--parquet", action="store_true", help="also write the table as cohort.parquet (pyarrow)")
    cohort.add_argument("--workers", type=int, metavar="N",
                        help="explain the cases on N warm Ray workers, each loading the model once (needs the ray "
                             "extra); default: one case after another in this process, the model loaded per case")
    cohort.add_argument("--address", metavar="ADDRESS",
                        help="the Ray cluster of the workers (HOST:PORT, ray://HOST:PORT or auto); default: a local "
                             "Ray started for the run")
    cohort.add_argument("--inclusivity-filters", nargs="+", metavar="SPEC",
                        default=list(INCLUSIVITY_FILTERS),
                        help="post-hoc filters of the inclusivity figure (with the unfiltered map)")
    cohort.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    review = commands.add_parser(
        "review", help="explain a case in a local web app with Slicer's slice and 3D views (needs the review extra)",
        description="Serves the review app until interrupted and prints its address, http://HOST:PORT/?secret=TOKEN: "
                    "the token is drawn anew for each run and the app answers no one without it. It never opens a "
                    "browser. With no CASE, the bundled demo case and model are used.")
    review.add_argument("case", nargs="?", metavar="CASE_OR_FOLDER",
                        help="a case folder: one file per sequence of the model (<sequence>.nii.gz, .nii, .nrrd or "
                             ".mha, named after the card's sequences, nnU-Net's channel_names or the bundle's "
                             "channels) and optionally label.*; or one 4D file with a channel per sequence")
    review_model = review.add_argument_group("model (one of; default: the bundled demo model)")
    review_model.add_argument("--card", metavar="FILE", help="model card (YAML/JSON), as explain takes it")
    review_model.add_argument("--model", dest="old_model", help=argparse.SUPPRESS)  # its earlier name, refused below
    review_model.add_argument("--nnunet", metavar="FOLDER",
                              help="an nnU-Net v2 results folder (Dataset.../Trainer__Plans__configuration, or the "
                                   "dataset folder)")
    add_nnunet_arguments(review_model, checkpoint=False)
    review_model.add_argument("--bundle", metavar="FOLDER", help="a MONAI bundle folder")
    review.add_argument("--trust-model-code", dest="trust_code", action="store_true",
                        help="allow the model (the card's, the nnU-Net plans' or the bundle's) to import or run code "
                             "of someone else (see explain --help)")
    review.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    review.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    return parser


def run_review(args: argparse.Namespace) -> None:
    """Run ``segexplain review``: build the case and serve the app (blocks until interrupted)."""
    from ..application.model_source import ModelSource, models_given

    if args.old_model is not None:
        raise SegExplainError(f"review takes a model card as --card {args.old_model} (as explain does); --model names "
                              "a network in explain")
    given = models_given(args, {"--card": "card", "--nnunet": "nnunet", "--bundle": "bundle"})
    if args.case is None and given:
        raise SegExplainError(f"{given[0]} needs a CASE_OR_FOLDER whose sequences the model takes")
    try:  # the one way into the review app: SegExplainLib imports it nowhere else
        from SegExplainReview.app import serveCase
    except ImportError as error:
        raise SegExplainError(f"the review app needs its extra: pip install 'segexplain[review]' ({error})") from None
    if args.nnunet:
        model = ModelSource("nnunet", args.nnunet, configuration=args.configuration, folds=args.folds,
                            mirroring=args.mirroring)
    else:
        model = ModelSource("bundle", args.bundle) if args.bundle else ModelSource("card", args.card or "")
    # a missing card or folder, a card that would run code; the user's word goes to the case (trustModelCode)
    dataclasses.replace(model, trust_code=args.trust_code).check()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: the app (the case's images and the explanations) is reachable "
              "from other machines", file=sys.stderr)
    # closing the terminal (SIGHUP) or a plain kill (SIGTERM) ends the app like Ctrl+C, so its temporary files go
    for ending in (getattr(signal, "SIGHUP", None), signal.SIGTERM):
        if ending is not None:
            signal.signal(ending, signal.default_int_handler)
    try:
        serveCase(model, args.case, trustModelCode=args.trust_code, host=args.host, port=args.port)
    except KeyboardInterrupt:
        print("review app stopped", file=sys.stderr)


def _is_own(warning: warnings.WarningMessage) -> bool:
    """Whether a warning is SegExplain's (raised in its package, never a deprecation notice) or another library's."""
    own = Path(warning.filename).resolve().is_relative_to(Path(__file__).resolve().parents[1])  # SegExplainLib
    return own and not issubclass(warning.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))


@contextlib.contextmanager
def _library_warnings(verbose: bool):
    """Keep the terminal to SegExplain's messages: other libraries' warnings are shown only when ``verbose``, after
    the command (with or without its failure)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            yield
    finally:
        for warning in caught:
            if verbose or _is_own(warning):
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def run_cohort(args: argparse.Namespace, explain_options: Sequence[str]) -> Path:
    """Run ``segexplain cohort``: every case, continuing after failures and resuming finished ones.

    Without ``--workers`` the cases run one after another in this process, each as a whole ``segexplain explain``.
    With ``--workers N`` they run on N warm Ray actors (:mod:`SegExplainLib.frontends.raycohort`); the case folders,
    the table and the figures are the same.
    """
    from ..application import cohort
    from ..application.case_run import Progress, failure_text, run_case
    from ..engine.filters import AmplitudeFilter
    from ..io.outputs import MARKER_TEXT, holds_results

    if args.workers is not None and args.workers < 1:
        msg = f"--workers must be 1 or more (the number of Ray workers), got {args.workers}"
        raise SegExplainError(msg)
    if args.address is not None and args.workers is None:
        msg = f"--address {args.address!r} names a Ray cluster for the workers: pass --workers N as well"
        raise SegExplainError(msg)
    if args.workers is not None:
        from .raycohort import check_address, import_ray

        import_ray()  # missing Ray and a wrong address are said at once, before anything is written
        if args.address is not None:
            check_address(args.address)

    explain_args = parser().parse_args(["explain", "--input", _CASE_PLACEHOLDER, "--output", _CASE_PLACEHOLDER,
                                        *explain_options])
    cases = cohort.read_cases(Path(args.cases), explain_args.sequence_names)
    template = CaseRun.from_namespace(explain_args)  # the options of every case, checked once
    if args.workers is not None and template.segment_matrix:
        msg = "--segment-matrix is computed by 'segexplain cohort' without --workers only (the Ray workers do not yet)"
        raise SegExplainError(msg)
    filters = [AmplitudeFilter.parse(spec) for spec in args.inclusivity_filters]
    output = Path(args.output)
    holds_results(output)  # an earlier cohort's folder is resumed; another folder is never written into
    (output / "cases").mkdir(parents=True, exist_ok=True)
    (output / OUTPUT_MARKER).write_text(MARKER_TEXT)
    progress = Progress("bar" if sys.stderr.isatty() else "lines", [case["case"] for case in cases])

    failures: dict[str, str] = {}
    if args.workers is None:  # one case after another, each a whole 'segexplain explain' (the model loaded anew)
        for case in cases:
            progress.step(case["case"])
            if not cohort.finished(case, output):
                try:
                    run_case(cohort.case_run(case, template, output))
                except Exception as error:  # noqa: BLE001 - one failing case must not stop the cohort
                    failures[case["case"]] = failure_text(error)
                    progress.say(f"  failed: {failures[case['case']]}")
    else:
        from .raycohort import explain_cases

        todo = []
        for case in cases:
            if cohort.finished(case, output):
                progress.step(f"{case['case']} (finished earlier)")
            else:
                todo.append(case)
        failed = explain_cases(todo, template, output, workers=args.workers, address=args.address,
                               progress=progress)
        failures = {case["case"]: failed[case["case"]] for case in cases if case["case"] in failed}  # CSV order
    progress.finish(output)
    cohort.gather(cases, failures, output, filters=filters, parquet=args.parquet)
    print(f"{len(cases) - len(failures)} of {len(cases)} cases explained; {len(failures)} failed", file=sys.stderr)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``segexplain`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if argv[:1] == ["cohort"] and "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args = parser().parse_args(argv)
    try:
        if args.command == "demo":
            from ..application.demo import run_demo

            output = run_demo(args.output, seed=args.seed, overwrite=args.overwrite,
                              progress="bar" if sys.stderr.isatty() else "none")
        elif args.command == "cohort":
            with _library_warnings(args.verbose):
                output = run_cohort(args, extra)
        elif args.command == "review":
            run_review(args)
            return 0
        elif args.command == "evaluate":
            from ..application.evaluation import run_evaluation

            run = EvaluationRun.from_namespace(args)
            with _library_warnings(args.verbose):
                scorecard = run_evaluation(run)
            output = Path(run.case.output)
            if args.progress != "json":
                print(scorecard.table())
        else:
            from ..application.case_run import run_case

            with _library_warnings(args.verbose):
                output = run_case(CaseRun.from_namespace(args))
    except SegExplainError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - a user sees one line; SEGEXPLAIN_DEBUG=1 shows the traceback
        if os.environ.get("SEGEXPLAIN_DEBUG"):
            raise
        first_line = str(error).splitlines()[0] if str(error) else ""
        print(f"error: {type(error).__name__}: {first_line} (SEGEXPLAIN_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return EXIT_ERROR
    progress = getattr(args, "progress", None)
    if progress != "json":
        print(f"wrote {output}", file=sys.stderr if progress == "bar" else sys.stdout)
    if args.command == "cohort" and json.loads((output / "failures.json").read_text()):
        return EXIT_CASES_FAILED
    return 0


if __name__ == "__main__":  # pragma: no cover - python -m SegExplainLib.frontends.cli
    sys.exit(main())
