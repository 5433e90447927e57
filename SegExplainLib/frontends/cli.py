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
``segexplain review`` serves the browser review app (package ``SegExplainReview``, the ``review`` extra) on
127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GridMismatchError, SegExplainError

EXIT_ERROR = 2
EXIT_CASES_FAILED = 1
EXIT_INTERRUPTED = 130
#: The file that marks a folder as written by SegExplain; no other folder is ever written into or replaced.
OUTPUT_MARKER = ".segexplain-output"
VERBOSE_HELP = "also show the warnings of other libraries (MONAI's deprecation notices, image codecs...) on stderr"
_MARKER_TEXT = "Written by SegExplain: 'segexplain ... --overwrite' may replace this whole folder.\n"


class Progress:
    """Progress of the steps of one run: a bar on a terminal, JSON lines for a GUI, ``[k/N] step`` lines, or
    nothing."""

    def __init__(self, mode: str, steps: Sequence[str], stream=None) -> None:
        self.mode, self.steps, self.done = mode, list(steps), 0
        self.stream = stream or (sys.stdout if mode == "json" else sys.stderr)
        self.started = time.perf_counter()

    def step(self, name: str) -> None:
        """Announce that step ``name`` starts."""
        fraction = self.done / len(self.steps)
        self.done += 1
        if self.mode == "json":
            self.stream.write(json.dumps({"event": "progress", "step": name, "fraction": round(fraction, 3)}) + "\n")
        elif self.mode == "bar":
            filled = int(30 * fraction)
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {name:<28}")
        elif self.mode == "lines":
            self.stream.write(f"[{self.done}/{len(self.steps)}] {name}\n")
        self.stream.flush()

    def warn(self, message: str) -> None:
        """Show something the user should know about the result (it is also in summary.json)."""
        if self.mode == "json":
            self.stream.write(json.dumps({"event": "warning", "message": message}) + "\n")
            self.stream.flush()
        else:  # also without a progress display: a warning is never silent
            self.say(f"warning: {message}")

    def say(self, line: str) -> None:
        """Write a line on stderr, below the bar if one is drawn."""
        sys.stderr.write(f"{chr(10) if self.mode == 'bar' else ''}{line}\n")
        sys.stderr.flush()

    def finish(self, output: Path) -> None:
        seconds = time.perf_counter() - self.started
        if self.mode == "json":
            self.stream.write(json.dumps({"event": "done", "fraction": 1.0, "output": str(output),
                                          "seconds": round(seconds, 3)}) + "\n")
        elif self.mode == "bar":
            self.stream.write(f"\r[{'#' * 30}] done in {seconds:.1f} s{' ' * 20}\n")
        self.stream.flush()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options naming the model (``--card``, ``--model``, ``--nnunet``, ``--bundle`` and theirs)."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", metavar="SPEC",
                       help="'reference', 'unet3d', 'monai:UNet', 'torch.nn:Conv3d', 'file.py:Class', "
                            "'package.module:factory' or 'pickle:FILE' (the last three run code: --trust-model-code)")
    model.add_argument("--model-kwargs", default="{}", metavar="JSON", help="keyword arguments of the model")
    model.add_argument("--weights", metavar="FILE", help="state dict (.pt with weights_only, or .safetensors)")
    model.add_argument("--card", metavar="FILE", help="model card (YAML/JSON): model, weights, sequences, "
                                                      "normalization; overrides --model/--weights")
    model.add_argument("--nnunet", metavar="FOLDER",
                       help="an nnU-Net v2 results folder (Dataset.../Trainer__Plans__configuration, or the dataset "
                            "folder): nnU-Net's network, preprocessing, sliding window, mirroring and folds")
    model.add_argument("--configuration", help="nnU-Net configuration (default 3d_fullres)")
    model.add_argument("--folds", nargs="+", metavar="FOLD", help="nnU-Net folds to average (default: all trained)")
    model.add_argument("--checkpoint", default="checkpoint_final.pth",
                       help="nnU-Net checkpoint file of each fold (default checkpoint_final.pth)")
    model.add_argument("--no-mirroring", action="store_true", help="nnU-Net: do not average over mirrored inputs")
    model.add_argument("--bundle", metavar="FOLDER", help="a MONAI bundle folder (configs/inference.json, "
                                                          "models/model.pt or model.ts)")
    model.add_argument("--trust-model-code", action="store_true",
                       help="allow a model (of --model, the card, the nnU-Net plans or the bundle) that imports or "
                            "runs code of someone else: a model file, a module outside the built-in networks, MONAI "
                            "and torch.nn, or a pickle")
    model.add_argument("--patch-size", nargs=3, type=int, metavar="N",
                       help="run the network by overlapping windows of this size (default: the card's patch_size)")
    model.add_argument("--overlap", type=float, default=0.5, help="overlap of the windows (default 0.5)")


def add_region_arguments(parser: argparse.ArgumentParser) -> None:
    """The options naming the region and class to explain."""
    region = parser.add_argument_group("region (default: the predicted region of --class)")
    where = region.add_mutually_exclusive_group()
    where.add_argument("--label", metavar="FILE", help="label map on the image grid; see --label-value")
    where.add_argument("--box-index", nargs=6, type=int, metavar="N", help="voxel box: D0 H0 W0 D1 H1 W1 (half open)")
    where.add_argument("--box-ras", nargs=6, type=float, metavar="MM", help="box between two RAS corners")
    where.add_argument("--box-lps", nargs=6, type=float, metavar="MM", help="box between two LPS corners")
    where.add_argument("--point-ras", nargs=3, type=float, metavar="MM", help="clicked point, RAS (as Slicer shows)")
    where.add_argument("--point-lps", nargs=3, type=float, metavar="MM", help="clicked point, LPS")
    where.add_argument("--voxel", nargs=3, type=int, metavar="N", help="clicked voxel index D H W")
    where.add_argument("--whole-class", action="store_true", help="the whole output channel of --class")
    region.add_argument("--label-value", type=int, default=1, help="label value of the segment (default 1)")
    region.add_argument("--radius", type=float, default=0.0, help="ball radius around a point (mm) or voxel")
    region.add_argument("--class", dest="class_index", type=int, default=1, help="output class (default 1)")
    region.add_argument("--aggregation", choices=("sum", "normalized"), default="sum")
    region.add_argument("--samples", type=int, help="normalized aggregation estimated from this many voxels")


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the method."""
    method = parser.add_argument_group("method")
    method.add_argument("--method", default="lrp", help="lrp, integrated_gradients, gradient, gradient_x_input, "
                                                        "smoothgrad, guided_backprop, deconvolution, occlusion, gradcam")
    method.add_argument("--composite", help="LRP composite (default epsilon_plus_flat)")
    method.add_argument("--layer-filter", metavar="SPEC", help="Tjoa filter inside the propagation, e.g. pass:0.4")
    method.add_argument("--n-steps", type=int, help="IG: most gradient passes (adaptive) or nodes "
                                                    "(fixed rules)")
    method.add_argument("--quadrature", help="IG quadrature: adaptive (default), gausslegendre, riemann_trapezoid, "
                                             "riemann_left, riemann_right, riemann_middle")
    method.add_argument("--tolerance", type=float, help="IG adaptive: relative completeness aimed for "
                                                        "(default 0.01)")
    method.add_argument("--baseline", help="IG baseline: zero, constant:V, min, blur:SIGMA")
    method.add_argument("--option", action="append", default=[], metavar="KEY=JSON",
                        help="any other option of the method, e.g. --option window=4")
    method.add_argument("--filter", action="append", default=[], metavar="SPEC",
                        help="post-hoc filter maps to write as well, e.g. pass:0.4 or clamp:0.2 (repeatable)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segexplain", description="Explain what a 3D segmentation network saw.")
    commands = parser.add_subparsers(dest="command", required=True)
    explain = commands.add_parser("explain", help="explain one case: sequence files in, relevance maps out")
    inputs = explain.add_argument_group("inputs")
    inputs.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="one file per MRI sequence (NIfTI, NRRD, MHA), or one 4D file")
    inputs.add_argument("--sequence-names", nargs="+", metavar="NAME", help="names of the sequences, in order")
    inputs.add_argument("--resample", action="store_true",
                        help="resample sequences onto the first one's grid instead of refusing different grids")
    add_model_arguments(explain)
    add_region_arguments(explain)
    add_method_arguments(explain)
    run = explain.add_argument_group("run")
    run.add_argument("--ground-truth", metavar="FILE", help="ground-truth label map: inclusivity per sequence")
    run.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    run.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    run.add_argument("--output", required=True, metavar="DIR", help="output folder (must not exist unless "
                                                                     "--overwrite)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace an output folder that SegExplain wrote earlier (never any other folder)")
    run.add_argument("--progress", choices=("bar", "json", "none"), default=None,
                     help="progress display (default: bar on a terminal, none otherwise)")
    run.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    run.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
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
                        default=["pass:0.2", "pass:0.4", "pass:0.6", "clamp:0.2", "clamp:0.4"],
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
    review_model.add_argument("--model", metavar="CARD", help="model card")
    review_model.add_argument("--nnunet", metavar="FOLDER",
                              help="an nnU-Net v2 results folder (Dataset.../Trainer__Plans__configuration, or the "
                                   "dataset folder)")
    review_model.add_argument("--configuration", help="nnU-Net configuration (default 3d_fullres)")
    review_model.add_argument("--folds", nargs="+", metavar="FOLD",
                              help="nnU-Net folds to average (default: all trained)")
    review_model.add_argument("--no-mirroring", action="store_true",
                              help="nnU-Net: do not average over mirrored inputs")
    review_model.add_argument("--bundle", metavar="FOLDER", help="a MONAI bundle folder")
    review.add_argument("--trust-model-code", action="store_true",
                        help="allow the model (the card's, the nnU-Net plans' or the bundle's) to import or run code "
                             "of someone else (see explain --help)")
    review.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    review.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    return parser


def run_review(args: argparse.Namespace) -> None:
    """Run ``segexplain review``: build the case and serve the app (blocks until interrupted)."""
    given = _models_given(args, ("--model", "--nnunet", "--bundle"))
    if args.case is None and given:
        raise SegExplainError(f"{given[0]} needs a CASE_OR_FOLDER whose sequences the model takes")
    try:
        from SegExplainMRML.job import ModelSource

        from SegExplainReview.app import serve
        from SegExplainReview.session import ReviewCase
    except ImportError as error:
        raise SegExplainError(f"the review app needs its extra: pip install 'segexplain[review]' ({error})") from None
    if args.nnunet:
        model = ModelSource("nnunet", args.nnunet, configuration=args.configuration or "", folds=args.folds or (),
                            mirroring=not args.no_mirroring)
    else:
        model = ModelSource("bundle", args.bundle) if args.bundle else ModelSource("card", args.model or "")
    model.check(trustModelCode=args.trust_model_code)  # a missing card or folder, a card that would run code
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: the app (the case's images and the explanations) is reachable "
              "from other machines", file=sys.stderr)
    # closing the terminal (SIGHUP) or a plain kill (SIGTERM) ends the app like Ctrl+C, so its temporary files go
    for ending in (getattr(signal, "SIGHUP", None), signal.SIGTERM):
        if ending is not None:
            signal.signal(ending, signal.default_int_handler)
    if args.case is None:
        case = ReviewCase.demo(model)  # in memory, as a 4D case: nothing is written, so nothing can be left behind
    elif Path(args.case).is_file():
        case = ReviewCase.fromFile(args.case, model)
    else:
        case = ReviewCase.fromFolder(args.case, model)
    try:
        serve(dataclasses.replace(case, trustModelCode=args.trust_model_code), host=args.host, port=args.port)
    except KeyboardInterrupt:
        print("review app stopped", file=sys.stderr)


def _json_option(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        msg = f"{what} must be JSON, got {text!r} ({error.msg})"
        raise SegExplainError(msg) from None


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.composite:
        options["composite"] = args.composite
    if args.layer_filter:
        from ..engine.filters import AmplitudeFilter

        options["layer_filter"] = AmplitudeFilter.parse(args.layer_filter)
    if args.n_steps is not None:
        options["n_steps"] = args.n_steps
    if args.quadrature:
        options["quadrature"] = args.quadrature
    if args.tolerance is not None:
        options["tolerance"] = args.tolerance
    if args.baseline:
        options["baseline"] = args.baseline
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            msg = f"--option must look like KEY=JSON, got {item!r}"
            raise SegExplainError(msg)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value  # a bare string such as layer=bottleneck
    return options


def _target(args: argparse.Namespace, geometry, label_path: str | None):
    from ..io import imaging
    from ..engine.targets import BoxTarget, ClassChannel, MaskTarget, PredictedRegion, VoxelTarget

    common = {"class_index": args.class_index, "aggregation": args.aggregation}
    if label_path:
        return MaskTarget(_label_mask(args, geometry, label_path), **common)
    if args.box_index:
        return BoxTarget(tuple(args.box_index[:3]), tuple(args.box_index[3:]), **common)
    for frame in ("ras", "lps"):
        box = getattr(args, f"box_{frame}")
        if box:
            start, stop = imaging.box_to_index(box[:3], box[3:], geometry, frame=frame)
            return BoxTarget(tuple(start), tuple(stop), **common)
        point = getattr(args, f"point_{frame}")
        if point:
            index = imaging.physical_to_index(point, geometry, frame=frame)
            spacing_dhw = tuple(reversed(geometry.spacing))  # a physical radius: the ball is round in millimetres
            return VoxelTarget(tuple(index), radius=args.radius, spacing=spacing_dhw, **common)
    if args.voxel:
        return VoxelTarget(tuple(args.voxel), radius=args.radius, **common)
    if args.whole_class:
        return ClassChannel(**common)
    return PredictedRegion(**common)


def _label_mask(args: argparse.Namespace, geometry, label_path: str) -> np.ndarray:
    """The segment ``--label-value`` of a label map, on the case's grid."""
    from ..io import imaging

    mask = imaging.read_label(label_path, geometry, resample=args.resample) == args.label_value
    if not mask.any():
        msg = f"label value {args.label_value} does not occur in {label_path}"
        raise SegExplainError(msg)
    return mask


def _refuse_untrusted_code(spec: str, source: str, *, trusted: bool) -> None:
    """Refuse a model that would import or run code of someone else, unless the user passed --trust-model-code."""
    from ..models.loading import refuse_untrusted_code

    refuse_untrusted_code(spec, source, trusted=trusted,
                          advice="; pass --trust-model-code only if you trust it (a model card cannot allow this itself)")


def _models_given(args: argparse.Namespace, flags: Sequence[str], *, together: Sequence[str] = ()) -> list[str]:
    """The model options of ``flags`` that were given, one model at most (``together`` may be given jointly);
    nnU-Net's options need ``--nnunet``."""
    def given(options: Sequence[str]) -> list[str]:
        return [flag for flag in options if getattr(args, flag[2:].replace("-", "_"))]

    models = given(flags)
    if len(models) > 1 and models != list(together):
        raise SegExplainError(f"{' and '.join(models)} each name a model; pass one")
    nnunet_options = given(("--configuration", "--folds", "--no-mirroring"))
    if nnunet_options and not args.nnunet:
        raise SegExplainError(f"{', '.join(nnunet_options)} belong to --nnunet, which was not given")
    return models


def _check_model_given(args: argparse.Namespace) -> None:
    _models_given(args, ("--card", "--model", "--nnunet", "--bundle"), together=("--card", "--model"))
    if args.nnunet or args.bundle:
        if args.patch_size:
            raise SegExplainError("--patch-size is for --model/--card: nnU-Net and MONAI bundles bring their own "
                                  "sliding window")
        return
    if args.card is None and args.model is None:
        from ..application.demo import demo_card_path

        msg = (f"no model given: pass --card FILE (a model card: network, weights, sequences, normalization) or "
               f"--model SPEC with --weights FILE; to try the bundled demo network, pass --card {demo_card_path()}")
        raise SegExplainError(msg)


def _pipeline(args: argparse.Namespace):
    """The nnU-Net results folder or MONAI bundle of --nnunet / --bundle as a pipeline, or None."""
    from ..models.pipelines import open_pipeline

    if args.nnunet:
        folds = [fold if fold == "all" else _fold_number(fold) for fold in args.folds] if args.folds else None
        return open_pipeline("nnunet", args.nnunet, configuration=args.configuration, folds=folds,
                             checkpoint=args.checkpoint, mirroring=not args.no_mirroring,
                             trust_code=args.trust_model_code)
    if args.bundle:
        return open_pipeline("bundle", args.bundle, trust_code=args.trust_model_code)
    return None


def _fold_number(text: str) -> int:
    if not text.isdigit():
        raise SegExplainError(f"--folds takes fold numbers or 'all', got {text!r}")
    return int(text)


def _load(args: argparse.Namespace):
    """The model and, if a card was given, the card (its normalization and sequence names)."""
    from ..models.loading import ModelCard, load_model
    from ..models.sliding import SlidingWindow

    card = ModelCard.read(args.card) if args.card else None
    _refuse_untrusted_code(card.model if card else args.model,
                           f"model card {args.card!r}" if card else f"--model {args.model!r}",
                           trusted=args.trust_model_code)
    if card:
        model = card.load_model(trust_code=args.trust_model_code)
    else:
        model = load_model(args.model, kwargs=_json_option(args.model_kwargs, "--model-kwargs"),
                           weights=args.weights, trust_code=args.trust_model_code)
    patch_size = args.patch_size or (card.patch_size if card else None)
    if patch_size:  # a network trained on patches runs (and is explained) by overlapping windows
        model = SlidingWindow(model, patch_size, overlap=args.overlap)
    return model, card


def _holds_results(path: Path) -> bool:
    """Whether ``path`` holds earlier SegExplain results; refuses a file and a folder SegExplain did not write.

    A missing path and an empty folder hold none.
    """
    if path.exists() and not path.is_dir():
        msg = f"output {str(path)!r} is a file, not a folder; choose a folder path that does not exist yet"
        raise SegExplainError(msg)
    if not path.exists() or not any(path.iterdir()):
        return False
    if not (path / OUTPUT_MARKER).is_file():
        msg = (f"output folder {str(path)!r} is not a SegExplain output folder (it has no {OUTPUT_MARKER} file), so "
               f"SegExplain never writes into it or replaces it, even with --overwrite; choose a new folder")
        raise SegExplainError(msg)
    return True


def _check_replaceable(path: Path, overwrite: bool) -> None:
    if _holds_results(path) and not overwrite:
        msg = (f"output folder {str(path)!r} already holds SegExplain results; choose another folder or pass "
               f"--overwrite to replace them")
        raise SegExplainError(msg)


def _prepare_output(path: Path, overwrite: bool) -> Path:
    """A fresh staging folder beside ``path``, marked as SegExplain's; refuses what may not be replaced."""
    _check_replaceable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    (staging / OUTPUT_MARKER).write_text(_MARKER_TEXT)
    return staging


def _move_into_place(staging: Path, path: Path, overwrite: bool) -> None:
    """Put the finished ``staging`` folder at ``path``. An existing folder is moved aside first and deleted only once
    the new one is in place; if the new one cannot be moved in, the old one is moved back."""
    _check_replaceable(path, overwrite)  # again: the folder may have changed during the run
    if not path.exists():
        staging.rename(path)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    old = path.rename(aside / path.name)
    try:
        staging.rename(path)
    except BaseException:
        old.rename(path)  # should this fail too, the old results stay in the aside folder
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def run_explain(args: argparse.Namespace) -> Path:
    """Run ``segexplain explain``; returns the output folder."""
    import torch

    from ..io import imaging
    from ..engine.api import explain
    from ..engine.filters import AmplitudeFilter
    from ..models.pipelines import explain_case

    output = Path(args.output)
    destination = Path(os.path.abspath(output))  # "." and "results/.." have a name and a parent folder too
    _check_model_given(args)
    filters = [AmplitudeFilter.parse(spec) for spec in args.filter]
    options = _method_options(args)
    steps = ["reading images", "loading model", "explaining", "writing maps", "figures", "summary"]
    progress = Progress(args.progress or ("bar" if sys.stderr.isatty() else "none"), steps)
    _check_replaceable(destination, args.overwrite)  # refused at once, not after the explanation
    with _resample_advice():
        progress.step("reading images")
        image, geometry = imaging.read_sequences(args.input, resample=args.resample)
        progress.step("loading model")
        pipeline = _pipeline(args)
        model, card = (None, None) if pipeline else _load(args)
        names = sequence_names(args.sequence_names, pipeline.sequences if pipeline else card.sequences if card
                               else None, image.shape[0])
        target = _target(args, geometry, args.label)
        torch.manual_seed(args.seed)
        progress.step("explaining")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            common = {"device": args.device, "samples": args.samples, "sampling_seed": args.seed, **options}
            if pipeline:
                result = explain_case(pipeline, image, geometry, target, args.method, **common)
            else:
                result = explain(model, card.normalize(image) if card else image, target, args.method, **common)
        for warning in caught:  # the explanation's own warnings are shown once, by the progress display
            if str(warning.message) not in result.warnings:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        for warning in result.warnings:
            progress.warn(warning)
        write_case_outputs(destination, overwrite=args.overwrite, image=image, geometry=geometry, maps=result.maps,
                           record=result.record(), names=names, inputs=args.input,
                           model=model_fields(model_description(args, pipeline, card),
                                              normalized=card is not None or pipeline is not None, model=model),
                           filters=filters, ground_truth=args.ground_truth, resample=args.resample,
                           figures=not args.no_figures, progress=progress)
    progress.finish(output)
    return output


def _is_own(warning: warnings.WarningMessage) -> bool:
    """Whether a warning is SegExplain's (raised in its package, never a deprecation notice) or another library's."""
    own = Path(warning.filename).resolve().is_relative_to(Path(__file__).resolve().parent)
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


@contextlib.contextmanager
def _resample_advice():
    """Grid mismatches advise the option: the library's advice names its argument."""
    try:
        yield
    except GridMismatchError as error:
        raise GridMismatchError(error.problem, advice="pass --resample to resample it") from None


def failure_text(error: BaseException) -> str:
    """How ``failures.json`` records a case's error: its type and the first line of its message."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def sequence_names(given: Sequence[str] | None, known: Sequence[str] | None, channels: int) -> list[str]:
    """The sequence names of a case: those given, else the model's, else ``sequence0``, ...; one per channel."""
    names = list(given or known or [f"sequence{i}" for i in range(channels)])
    if len(names) != channels:
        msg = f"{len(names)} sequence names given for {channels} image channels"
        raise SegExplainError(msg)
    return names


def model_description(args: argparse.Namespace, pipeline, card) -> dict[str, Any]:
    """What ``summary.json`` says of the model: the pipeline's description, or the spec, weights and card."""
    if pipeline:
        return pipeline.describe()
    return {"spec": args.card or args.model, "weights": args.weights, "card": card.to_dict() if card else None}


def model_fields(description: dict[str, Any], *, normalized: bool, model) -> dict[str, Any]:
    """The model's entries of ``summary.json``; ``model`` is the network or pipeline that ran."""
    return {"model": description, "normalized_input": normalized, "sliding_window": (
        {"patch_size": list(model.patch_size), "overlap": model.overlap} if hasattr(model, "patch_size") else None)}


def write_case_outputs(destination: Path, *, overwrite: bool, image: np.ndarray, geometry, maps: np.ndarray,
                       record: dict[str, Any], names: Sequence[str], inputs: Sequence[str], model: dict[str, Any],
                       filters: Sequence[Any], ground_truth: str | None, resample: bool,
                       figures: bool | dict[str, bytes], progress: Progress | None = None) -> dict[str, Any]:
    """Write one case's results as ``segexplain explain`` does: maps per sequence, ``summary.json``, figures.

    Used by ``segexplain explain`` and by both ways of ``segexplain cohort`` (serial, Ray workers), so that a case's
    folder is the same whichever wrote it. Everything is written to a staging folder beside ``destination`` that is
    renamed into place at the end.

    Args:
        destination: The case's output folder.
        overwrite: Replace an earlier SegExplain result there.
        image: The case (C, D, H, W) as read, on ``geometry``.
        geometry: The case's grid.
        maps: The relevance maps (C, D, H, W) on the case's grid.
        record: The explanation's record (:meth:`~SegExplainLib.engine.explanation.Explanation.record`).
        names: The sequence names, one per channel.
        inputs: The sequence files read.
        model: :func:`model_fields` of the model that ran.
        filters: Post-hoc filters whose maps are written as well.
        ground_truth: A ground-truth label file: inclusivity per sequence.
        resample: Resample the ground truth onto the case's grid.
        figures: Draw and write the PNG figures; or the figures already drawn (:func:`case_figures`, by a Ray
            worker), file name to PNG bytes, written as they are.
        progress: The run's progress display.

    Returns:
        The summary written to ``summary.json``.
    """
    from ..io import imaging
    from ..engine import metrics
    from ..engine.explanation import software_versions

    progress = progress or Progress("none", ["writing maps", "figures", "summary"])
    staging = _prepare_output(destination, overwrite)
    try:
        progress.step("writing maps")
        maps = np.asarray(maps, dtype=np.float32)
        written = imaging.write_maps(maps, geometry, staging, names)
        for amplitude_filter in filters:
            tag = str(amplitude_filter).replace(":", "_").replace(",", "-")
            written += imaging.write_maps(amplitude_filter(maps), geometry, staging, names,
                                          prefix=f"relevance_{tag}_")
        summary = {
            **record, "inputs": [str(Path(p).resolve()) for p in inputs], "sequence_names": list(names),
            "geometry": geometry.to_dict(), **model,
            "relevance_shares": metrics.shares_by_name(maps, names),
            "post_hoc_filters": [str(f) for f in filters], "files": [p.name for p in written],
            "software": software_versions(),
        }
        if ground_truth:
            truth = imaging.read_label(ground_truth, geometry, resample=resample) > 0
            summary["ground_truth_inclusivity"] = dict(zip(names, metrics.ground_truth_inclusivity(
                maps, truth, smoothing=1.0).tolist()))
            summary["input_inclusivity"] = dict(zip(names, metrics.input_inclusivity(maps, image,
                                                                                     smoothing=1.0).tolist()))
        progress.step("figures")
        if isinstance(figures, dict):
            for filename, png in figures.items():
                (staging / filename).write_bytes(png)
            summary["figures"] = list(figures)
        elif figures:
            summary["figures"] = case_figures(image, maps, names, staging)
        progress.step("summary")
        (staging / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        _move_into_place(staging, destination, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a failed run's partial results; gone once moved into place
    return summary


def case_figures(image: np.ndarray, maps: np.ndarray, names: Sequence[str], folder: Path) -> list[str]:
    """Write a case's figures (``mip.png``, ``montage.png``, ``shares.png``) into ``folder``; their names."""
    from ..io import figures
    from ..engine import metrics

    shares = dict(zip(names, metrics.relevance_shares(maps, kind="positive").tolist()))
    made = []
    for filename, figure in (("mip.png", figures.mip_figure(image, maps, sequence_names=names)),
                             ("montage.png", figures.montage_figure(image, maps, sequence_names=names)),
                             ("shares.png", figures.shares_figure(np.array([shares[n] for n in names]),
                                                                  sequence_names=names))):
        figures.save_figure(figure, folder / filename)
        made.append(filename)
    return made


_SPECIAL_FILES = ("label", "ground_truth")


def _read_case_folders(root: Path, sequence_names: Sequence[str] | None) -> list[dict[str, Any]]:
    """One case per subfolder: its image files (``<sequence name>.nii.gz`` in that order when names are given, else
    every image file sorted by name), with ``label.*`` and ``ground_truth.*`` set apart."""
    from ..io.imaging import image_stem

    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = {image_stem(p.name): p for p in sorted(folder.iterdir()) if image_stem(p.name)}
        special = {name: str(images.pop(name)) if name in images else None for name in _SPECIAL_FILES}
        if sequence_names:
            missing = [name for name in sequence_names if name not in images]
            inputs = [str(images[name]) for name in sequence_names if name in images] if not missing else [
                str(folder / f"{missing[0]}.nii.gz")]  # reported as a missing file by that case
        else:
            inputs = [str(p) for p in images.values()]
        cases.append({"case": folder.name, "inputs": inputs, **special})
    if not cases:
        msg = f"cases folder {str(root)!r} has no case subfolders"
        raise SegExplainError(msg)
    return cases


def _read_cases(path: Path, sequence_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    import csv

    if path.is_dir():
        return _read_case_folders(path, sequence_names)
    if not path.is_file():
        msg = f"cases file {str(path)!r} does not exist"
        raise SegExplainError(msg)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"case", "inputs"} <= set(rows[0]):
        msg = f"cases file {str(path)!r} needs the columns 'case' and 'inputs' and at least one row"
        raise SegExplainError(msg)
    names = [row["case"] for row in rows]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates or any(not name or name in (".", "..") or "/" in name or "\\" in name for name in names):
        msg = (f"case names in {str(path)!r} must be unique, non-empty, not '.' or '..' and without '/' or '\\': "
               f"{duplicates or names}")
        raise SegExplainError(msg)

    def resolve(text: str) -> str:
        candidate = Path(text.strip())
        return str(candidate if candidate.is_absolute() else path.parent / candidate)

    return [{"case": row["case"], "inputs": [resolve(p) for p in row["inputs"].split(";") if p.strip()],
             "label": resolve(row["label"]) if row.get("label") else None,
             "ground_truth": resolve(row["ground_truth"]) if row.get("ground_truth") else None} for row in rows]


def _write_parquet(rows: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        msg = "--parquet needs the pyarrow package: pip install pyarrow (or segexplain[parquet])"
        raise SegExplainError(msg) from None
    pq.write_table(pa.table({column: [row[column] for row in rows] for column in columns}), path)


def run_cohort(args: argparse.Namespace, explain_options: Sequence[str]) -> Path:
    """Run ``segexplain cohort``: every case, continuing after failures and resuming finished ones.

    Without ``--workers`` the cases run one after another in this process, each as a whole ``segexplain explain``.
    With ``--workers N`` they run on N warm Ray actors (:mod:`SegExplainLib.frontends.raycohort`); the case folders, the table
    and the figures are the same.
    """
    import csv

    from ..io import figures
    from ..io import imaging
    from ..engine import metrics
    from ..engine.filters import AmplitudeFilter

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

    names_given = explain_options[explain_options.index("--sequence-names") + 1:] if (
        "--sequence-names" in explain_options) else None
    if names_given:
        names_given = list(itertools.takewhile(lambda option: not option.startswith("--"), names_given))
    cases = _read_cases(Path(args.cases), names_given)
    filters = [AmplitudeFilter.parse(spec) for spec in args.inclusivity_filters]
    output = Path(args.output)
    _holds_results(output)  # an earlier cohort's folder is resumed; another folder is never written into
    (output / "cases").mkdir(parents=True, exist_ok=True)
    (output / OUTPUT_MARKER).write_text(_MARKER_TEXT)
    progress = Progress("bar" if sys.stderr.isatty() else "lines", [case["case"] for case in cases])

    def explain_arguments(case: dict[str, Any]) -> argparse.Namespace:
        return _parser().parse_args([
            "explain", "--input", *case["inputs"], "--output", str(output / "cases" / case["case"]), "--progress",
            "none", "--overwrite", *(["--label", case["label"]] if case["label"] else []),
            *(["--ground-truth", case["ground_truth"]] if case["ground_truth"] else []), *explain_options])

    failures: dict[str, str] = {}
    if args.workers is None:  # one case after another, each a whole 'segexplain explain' (the model loaded anew)
        for case in cases:
            progress.step(case["case"])
            if not (output / "cases" / case["case"] / "summary.json").exists():
                try:
                    run_explain(explain_arguments(case))
                except Exception as error:  # noqa: BLE001 - one failing case must not stop the cohort
                    failures[case["case"]] = failure_text(error)
                    progress.say(f"  failed: {failures[case['case']]}")
    else:
        from .raycohort import explain_cases

        todo = []
        for case in cases:
            if (output / "cases" / case["case"] / "summary.json").exists():
                progress.step(f"{case['case']} (finished earlier)")
            else:
                todo.append((case["case"], explain_arguments(case)))
        failed = explain_cases(todo, workers=args.workers, address=args.address, progress=progress)
        failures = {case["case"]: failed[case["case"]] for case in cases if case["case"] in failed}  # CSV order
    progress.finish(output)
    rows, shares, inclusivity = [], [], {"none": [], **{str(f): [] for f in filters}}
    names: list[str] | None = None
    for case in cases:
        folder = output / "cases" / case["case"]
        if case["case"] in failures:
            continue
        summary = json.loads((folder / "summary.json").read_text())
        names = summary["sequence_names"]
        case_shares = summary["relevance_shares"]
        shares.append([case_shares["positive"][n] for n in names])
        truth = summary.get("ground_truth_inclusivity")
        for name in names:
            rows.append({"case": case["case"], "sequence": name,
                         **{f"share_{kind}": case_shares[kind][name] for kind in ("positive", "negative", "absolute")},
                         "ground_truth_inclusivity": None if truth is None else truth[name]})
        if case["ground_truth"]:
            maps, geometry = imaging.read_sequences([folder / f for f in summary["files"][:len(names)]])
            mask = imaging.read_label(case["ground_truth"], geometry, resample=True) > 0
            inclusivity["none"].append(float(np.mean(metrics.ground_truth_inclusivity(maps, mask, smoothing=1.0))))
            for amplitude_filter in filters:
                values = metrics.ground_truth_inclusivity(amplitude_filter(maps), mask, smoothing=1.0)
                inclusivity[str(amplitude_filter)].append(float(np.mean(values)))
    columns = ["case", "sequence", "share_positive", "share_negative", "share_absolute", "ground_truth_inclusivity"]
    with (output / "cohort.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    if args.parquet:
        _write_parquet(rows, columns, output / "cohort.parquet")
    (output / "failures.json").write_text(json.dumps(failures, indent=2))
    if shares and names:
        figures.save_figure(figures.shares_figure(np.array(shares), sequence_names=names),
                            output / "shares_across_cases.png")
    if inclusivity["none"]:
        figures.save_figure(figures.inclusivity_figure({k: np.array(v) for k, v in inclusivity.items()},
                                                       title="ground-truth inclusivity per filter"),
                            output / "inclusivity.png")
    print(f"{len(cases) - len(failures)} of {len(cases)} cases explained; {len(failures)} failed", file=sys.stderr)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``segexplain`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if argv[:1] == ["cohort"] and "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from ..application.demo import run_demo

            output = run_demo(args.output, seed=args.seed, overwrite=args.overwrite,
                              extra_args=["--progress", "bar" if sys.stderr.isatty() else "none"])
        elif args.command == "cohort":
            with _library_warnings(args.verbose):
                output = run_cohort(args, extra)
        elif args.command == "review":
            run_review(args)
            return 0
        else:
            with _library_warnings(args.verbose):
                output = run_explain(args)
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
