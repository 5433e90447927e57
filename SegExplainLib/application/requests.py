"""The typed requests of the front ends: what to explain (:class:`ExplainRequest`), a whole case run
(:class:`CaseRun`) and a scorecard of methods on a case (:class:`EvaluationRun`; the warm worker's
:class:`EvaluationRequest`).

Each is a frozen dataclass checked field by field when made (a one-line SegExplainError naming the value and what was
expected), converts to and from JSON (:meth:`to_json`, :meth:`from_json`, which refuses unknown keys by name) and to
the words of ``segexplain explain`` (:meth:`arguments`). The command line parses into them
(:meth:`CaseRun.from_namespace`) with options built from their fields (:func:`add_region_arguments`,
:func:`add_method_arguments`, :func:`add_case_arguments`), so each option's default, choices and error are defined
here once. The worker receives an :class:`ExplainRequest` as JSON, the Ray driver sends one, the Slicer module and the
review app build one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from ..errors import SegExplainError
from . import options as opt
from .model_source import ModelSource

#: The region options, of which one at most is given; none explains the predicted region of the class.
REGION_FIELDS = ("label", "box_index", "box_ras", "box_lps", "point_ras", "point_lps", "voxel", "whole_class")
#: The fields with a command-line option, in the order of ``segexplain explain --help``.
_REGION_OPTIONS = ("label_value", "radius", "class_index", "aggregation", "samples")
_METHOD_OPTIONS = ("method", "composite", "layer_filter", "n_steps", "quadrature", "tolerance", "baseline", "options")
_RUN_OPTIONS = ("device", "seed")
AGGREGATIONS = ("sum", "normalized")
PROGRESS_MODES = ("bar", "json", "none")


def _read_method_options(items: list[str]) -> dict[str, Any]:
    """``--option KEY=JSON`` words as a dict; a value that is no JSON is taken as text (``layer=bottleneck``)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SegExplainError(f"--option must look like KEY=JSON, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


@dataclasses.dataclass(frozen=True)
class ExplainRequest(opt.JsonFields):
    """What to explain in a case, and how: the region, the class, the method and its options.

    Attributes:
        label: A label map file on the case's grid; its segment :attr:`label_value` is the region.
        box_index: A voxel box D0 H0 W0 D1 H1 W1 (half open).
        box_ras: A box between two RAS corners (mm); ``box_lps``: two LPS corners.
        point_ras: A clicked point, RAS (mm), with a ball of :attr:`radius` mm; ``point_lps``: LPS.
        voxel: A clicked voxel D H W, with a ball of :attr:`radius` voxels.
        whole_class: The whole output channel of :attr:`class_index`.
        label_value, radius, class_index, aggregation, samples: Of the region (none given: the predicted region of
            the class; a mask given to :meth:`target` replaces the region).
        method: An engine method (:data:`SegExplainLib.engine.api.METHODS`).
        composite, layer_filter, n_steps, quadrature, tolerance, baseline: The method's options (None: its default).
        options: Any other option of the method, validated by the engine, which names an unknown one.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        seed: Seed of every random draw.
        preview: Explain a model's cheaper stand-in first (an nnU-Net ensemble's first fold), then the exact answer
            (the warm worker only; ``segexplain explain`` always computes the exact answer).
    """

    label: str | None = opt.option(None, "--label", metavar="FILE", help="label map on the image grid; see "
                                                                           "--label-value")
    box_index: tuple[int, ...] | None = opt.option(None, "--box-index", nargs=6, type=int, metavar="N",
                                                   help="voxel box: D0 H0 W0 D1 H1 W1 (half open)")
    box_ras: tuple[float, ...] | None = opt.option(None, "--box-ras", nargs=6, type=float, metavar="MM",
                                                   help="box between two RAS corners")
    box_lps: tuple[float, ...] | None = opt.option(None, "--box-lps", nargs=6, type=float, metavar="MM",
                                                   help="box between two LPS corners")
    point_ras: tuple[float, ...] | None = opt.option(None, "--point-ras", nargs=3, type=float, metavar="MM",
                                                     help="clicked point, RAS (as Slicer shows)")
    point_lps: tuple[float, ...] | None = opt.option(None, "--point-lps", nargs=3, type=float, metavar="MM",
                                                     help="clicked point, LPS")
    voxel: tuple[int, ...] | None = opt.option(None, "--voxel", nargs=3, type=int, metavar="N",
                                               help="clicked voxel index D H W")
    whole_class: bool = opt.option(False, "--whole-class", switch=True,
                                   help="the whole output channel of --class")
    label_value: int = opt.option(1, "--label-value", type=int, help="label value of the segment (default 1)")
    radius: float = opt.option(0.0, "--radius", type=float, help="ball radius around a point (mm) or voxel")
    class_index: int = opt.option(1, "--class", type=int, help="output class (default 1)")
    aggregation: str = opt.option("sum", "--aggregation", choices=AGGREGATIONS)
    samples: int | None = opt.option(None, "--samples", type=int,
                                     help="normalized aggregation estimated from this many voxels")
    method: str = opt.option("lrp", "--method", help="lrp, integrated_gradients, gradient, gradient_x_input, "
                                                     "smoothgrad, guided_backprop, deconvolution, occlusion, gradcam, "
                                                     "deeplift, deeplift_shap, gradient_shap, guided_gradcam, "
                                                     "sequence_shapley, supervoxel_shapley, rise, score_cam")
    composite: str | None = opt.option(None, "--composite", help="LRP composite (default epsilon_plus)")
    layer_filter: str | None = opt.option(None, "--layer-filter", metavar="SPEC",
                                          help="Tjoa filter inside the propagation, e.g. pass:0.4")
    n_steps: int | None = opt.option(None, "--n-steps", type=int,
                                     help="IG: most gradient passes (adaptive) or nodes (fixed rules)")
    quadrature: str | None = opt.option(None, "--quadrature", help=(
        "IG quadrature: adaptive (default), adaptive_simpson (fewer passes where the score swings), gausslegendre, "
        "riemann_trapezoid, riemann_left, riemann_right, riemann_middle"))
    tolerance: float | None = opt.option(None, "--tolerance", type=float,
                                         help="IG adaptive: relative completeness aimed for (default 0.01)")
    baseline: str | None = opt.option(None, "--baseline", help="baseline of IG, occlusion, DeepLIFT(-SHAP), "
                                      "GradientSHAP and the perturbation methods: zero, constant:V, min, blur:SIGMA")
    options: dict[str, Any] = opt.option(
        {}, "--option", repeat=True, metavar="KEY=JSON", help="any other option of the method, e.g. --option window=4",
        read=_read_method_options, write=lambda value: [f"{k}={json.dumps(v)}" for k, v in value.items()])
    device: str = opt.option("auto", "--device", help="auto, cpu or cuda[:N]")
    seed: int = opt.option(0, "--seed", type=int, help="seed of every random draw")
    preview: bool = opt.option(False)

    def __post_init__(self) -> None:
        from ..engine.api import METHODS
        from ..engine.baselines import make_baseline
        from ..engine.filters import AmplitudeFilter
        from ..engine.quadrature import QUADRATURES

        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        opt.check_text("label", self.label, optional=True)
        for name, length, kind in (("box_index", 6, int), ("box_ras", 6, float), ("box_lps", 6, float),
                                   ("point_ras", 3, float), ("point_lps", 3, float), ("voxel", 3, int)):
            put(name, opt.check_tuple(name, getattr(self, name), length=length, kind=kind, optional=True))
        opt.check_bool("whole_class", self.whole_class)
        given = [name for name in REGION_FIELDS if getattr(self, name) not in (None, False)]
        if len(given) > 1:
            raise SegExplainError(f"give one region at most, got {' and '.join(given)}")
        opt.check_int("label_value", self.label_value)
        put("radius", opt.check_number("radius", self.radius, minimum=0.0))
        opt.check_int("class_index", self.class_index, minimum=0)
        opt.check_text("aggregation", self.aggregation, choices=AGGREGATIONS)
        opt.check_int("samples", self.samples, minimum=1, optional=True)
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise SegExplainError(f"unknown method {self.method!r}; expected one of {sorted(METHODS)}")
        opt.check_text("composite", self.composite, optional=True)
        if opt.check_text("layer_filter", self.layer_filter, optional=True) is not None:
            AmplitudeFilter.parse(self.layer_filter)
        opt.check_int("n_steps", self.n_steps, minimum=1, optional=True)
        opt.check_text("quadrature", self.quadrature, optional=True, choices=QUADRATURES)
        if self.tolerance is not None:
            put("tolerance", opt.check_number("tolerance", self.tolerance, positive=True))
        if opt.check_text("baseline", self.baseline, optional=True) is not None:
            make_baseline(self.baseline)
        opt.check_dict("options", self.options)
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise SegExplainError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        opt.check_int("seed", self.seed, minimum=0)
        opt.check_bool("preview", self.preview)

    def method_options(self) -> dict[str, Any]:
        """The method's options for the engine (``composite``, ``layer_filter``, ``n_steps``... and :attr:`options`),
        those not given left to the method's defaults."""
        from ..engine.filters import AmplitudeFilter

        given = {name: getattr(self, name) for name in ("composite", "n_steps", "quadrature", "tolerance", "baseline")}
        layer_filter = {"layer_filter": AmplitudeFilter.parse(self.layer_filter)} if self.layer_filter else {}
        return {**{k: v for k, v in given.items() if v is not None}, **layer_filter, **self.options}

    def engine_options(self) -> dict[str, Any]:
        """The keyword options of :func:`~SegExplainLib.engine.api.explain` for this request."""
        return {"device": self.device, "samples": self.samples, "sampling_seed": self.seed, **self.method_options()}

    def label_mask(self, geometry: Any, *, resample: bool = False) -> np.ndarray:
        """The segment :attr:`label_value` of :attr:`label`, on the case's grid (``resample``: onto it)."""
        from ..io import imaging

        mask = imaging.read_label(self.label, geometry, resample=resample) == self.label_value
        if not mask.any():
            raise SegExplainError(f"label value {self.label_value} does not occur in {self.label}")
        return mask

    def target(self, geometry: Any, mask: np.ndarray | None = None, *, resample: bool = False):
        """The engine's target of this request on ``geometry``; ``mask`` (D, H, W) replaces the region, a
        :attr:`label` is read (``resample``: onto the grid)."""
        from ..engine.targets import BoxTarget, ClassChannel, MaskTarget, PredictedRegion, VoxelTarget
        from ..io import imaging

        common = {"class_index": self.class_index, "aggregation": self.aggregation}
        if mask is not None or self.label:
            return MaskTarget(np.asarray(mask, bool) if mask is not None else
                              self.label_mask(geometry, resample=resample), **common)
        if self.box_index:
            return BoxTarget(self.box_index[:3], self.box_index[3:], **common)
        for frame in ("ras", "lps"):
            box, point = getattr(self, f"box_{frame}"), getattr(self, f"point_{frame}")
            if box:
                start, stop = imaging.box_to_index(box[:3], box[3:], geometry, frame=frame)
                return BoxTarget(tuple(start), tuple(stop), **common)
            if point:
                index = imaging.physical_to_index(point, geometry, frame=frame)
                spacing_dhw = tuple(reversed(geometry.spacing))  # a physical radius: the ball is round in millimetres
                return VoxelTarget(tuple(index), radius=self.radius, spacing=spacing_dhw, **common)
        if self.voxel:
            return VoxelTarget(self.voxel, radius=self.radius, **common)
        if self.whole_class:
            return ClassChannel(**common)
        return PredictedRegion(**common)

    def arguments(self) -> list[str]:
        """The ``segexplain explain`` options of this request (those at their defaults left out)."""
        return opt.words(self, (*REGION_FIELDS, *_REGION_OPTIONS, *_METHOD_OPTIONS, *_RUN_OPTIONS))

    @classmethod
    def from_arguments(cls, arguments: Sequence[str]) -> ExplainRequest:
        """The request of ``segexplain explain``'s region, method and run options, e.g. ``["--voxel", "9", "24", "24",
        "--method", "gradient"]`` (the inverse of :meth:`arguments`)."""
        parser = opt.WordParser(prog="request", add_help=False)
        add_region_arguments(parser)
        opt.add_options(parser.add_argument_group("method"), ExplainRequest, _METHOD_OPTIONS)
        opt.add_options(parser.add_argument_group("run"), ExplainRequest, _RUN_OPTIONS)
        return cls.from_namespace(parser.parse_args([str(word) for word in arguments]))

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> ExplainRequest:
        """The request of a parsed ``segexplain explain`` command line."""
        return cls(**opt.from_namespace(cls, args, (*REGION_FIELDS, *_REGION_OPTIONS, *_METHOD_OPTIONS,
                                                    *_RUN_OPTIONS)))


@dataclasses.dataclass(frozen=True)
class CaseRun(opt.JsonFields):
    """One case explained from its files to its output folder, as ``segexplain explain`` does (:func:`run_case`).

    Attributes:
        inputs: One file per MRI sequence, or one 4D file.
        output: The output folder (new, or one SegExplain wrote with :attr:`overwrite`).
        model: The model.
        request: What to explain.
        sequence_names: The names of the sequences, in order (default: the model's).
        resample: Resample sequences (and label maps) onto the first one's grid instead of refusing other grids.
        ground_truth: A ground-truth label file: inclusivity per sequence.
        overwrite: Replace an output folder that SegExplain wrote earlier (never any other folder).
        filters: Post-hoc filters whose maps are written as well, e.g. ``pass:0.4``.
        figures: Draw the PNG figures.
        progress: ``bar``, ``json`` or ``none``; None: a bar on a terminal, none otherwise.
        segment_matrix: Also explain every predicted segment with the method and write the segment x segment matrix
            (``segment_matrix.csv``, ``.png``, ``summary.json``'s ``segment_matrix``).
        segment_labels: A label map on the case's grid whose segments are the matrix's columns (default: the
            prediction's).
    """

    nested_json: ClassVar[dict[str, type]] = {"model": ModelSource, "request": ExplainRequest}

    inputs: tuple[str, ...] = opt.option(dataclasses.MISSING, "--input", nargs="+", required=True, metavar="FILE",
                                         help="one file per MRI sequence (NIfTI, NRRD, MHA), or one 4D file")
    output: str = opt.option(dataclasses.MISSING, "--output", required=True, metavar="DIR",
                             help="output folder (must not exist unless --overwrite)")
    model: ModelSource = opt.option(dataclasses.MISSING)
    request: ExplainRequest = dataclasses.field(default_factory=ExplainRequest, metadata={"flag": opt.Flag()})
    sequence_names: tuple[str, ...] | None = opt.option(None, "--sequence-names", nargs="+", metavar="NAME",
                                                        help="names of the sequences, in order")
    resample: bool = opt.option(False, "--resample", switch=True, help=(
        "resample sequences onto the first one's grid instead of refusing different grids"))
    ground_truth: str | None = opt.option(None, "--ground-truth", metavar="FILE",
                                          help="ground-truth label map: inclusivity per sequence")
    overwrite: bool = opt.option(False, "--overwrite", switch=True, help=(
        "replace an output folder that SegExplain wrote earlier (never any other folder)"))
    filters: tuple[str, ...] = opt.option((), "--filter", repeat=True, metavar="SPEC", write=list, read=tuple, help=(
        "post-hoc filter maps to write as well, e.g. pass:0.4 or clamp:0.2 (repeatable)"))
    figures: bool = opt.option(True, "--no-figures", switch=True, help="skip the PNG figures")
    progress: str | None = opt.option(None, "--progress", choices=PROGRESS_MODES,
                                      help="progress display (default: bar on a terminal, none otherwise)")
    segment_matrix: bool = opt.option(False, "--segment-matrix", switch=True, help=(
        "also explain every predicted segment and write segment_matrix.csv and .png: per explained segment, the share "
        "of its positive relevance in each input segment"))
    segment_labels: str | None = opt.option(None, "--segment-labels", metavar="FILE", help=(
        "label map whose segments are the segment matrix's columns (default: the predicted segmentation)"))

    def __post_init__(self) -> None:
        from ..engine.filters import AmplitudeFilter

        inputs = opt.check_tuple("inputs", self.inputs)
        if not inputs:
            raise SegExplainError("inputs must name at least one image file, got none")
        object.__setattr__(self, "inputs", inputs)
        opt.check_text("output", self.output)
        if not self.output:
            raise SegExplainError("output must name a folder, got ''")
        if not isinstance(self.model, ModelSource):
            raise SegExplainError(f"model must be a ModelSource, got {self.model!r}")
        if not isinstance(self.request, ExplainRequest):
            raise SegExplainError(f"request must be an ExplainRequest, got {self.request!r}")
        object.__setattr__(self, "sequence_names", opt.check_tuple("sequence_names", self.sequence_names,
                                                                   optional=True))
        opt.check_bool("resample", self.resample)
        opt.check_text("ground_truth", self.ground_truth, optional=True)
        opt.check_bool("overwrite", self.overwrite)
        object.__setattr__(self, "filters", opt.check_tuple("filters", self.filters))
        for spec in self.filters:
            AmplitudeFilter.parse(spec)
        opt.check_bool("figures", self.figures)
        opt.check_text("progress", self.progress, optional=True, choices=PROGRESS_MODES)
        opt.check_bool("segment_matrix", self.segment_matrix)
        if opt.check_text("segment_labels", self.segment_labels, optional=True) and not self.segment_matrix:
            raise SegExplainError(f"segment_labels {self.segment_labels!r} needs segment_matrix (--segment-matrix)")

    def arguments(self) -> list[str]:
        """The ``segexplain explain`` words of this run (after ``segexplain explain``)."""
        return [*opt.words(self, ("inputs", "sequence_names", "resample")), *self.model.arguments(),
                *self.request.arguments(), *opt.words(self, ("ground_truth", "output", "overwrite", "progress",
                                                             "filters", "segment_matrix", "segment_labels")),
                *([] if self.figures else ["--no-figures"])]

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> CaseRun:
        """The run of a parsed ``segexplain explain`` command line (:func:`add_case_arguments`)."""
        return cls(**opt.from_namespace(cls, args, ("inputs", "output", "sequence_names", "resample", "ground_truth",
                                                    "overwrite", "filters", "progress", "segment_matrix",
                                                    "segment_labels")),
                   figures=not args.no_figures, model=ModelSource.from_namespace(args),
                   request=ExplainRequest.from_namespace(args))


def add_region_arguments(parser: argparse.ArgumentParser) -> None:
    """The options naming the region and class to explain (:class:`ExplainRequest`'s)."""
    region = parser.add_argument_group("region (default: the predicted region of --class)")
    opt.add_options(region.add_mutually_exclusive_group(), ExplainRequest, REGION_FIELDS)
    opt.add_options(region, ExplainRequest, _REGION_OPTIONS)


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the method (:class:`ExplainRequest`'s) and the post-hoc filters (:class:`CaseRun`'s)."""
    method = parser.add_argument_group("method")
    opt.add_options(method, ExplainRequest, _METHOD_OPTIONS)
    opt.add_options(method, CaseRun, ("filters",))


def add_case_arguments(parser: argparse.ArgumentParser) -> Any:
    """Every option of ``segexplain explain`` but ``--verbose``: inputs, model, region, method and run; returns the
    group of the run's options."""
    from .model_source import add_model_arguments

    inputs = parser.add_argument_group("inputs")
    opt.add_options(inputs, CaseRun, ("inputs", "sequence_names", "resample"))
    add_model_arguments(parser)
    add_region_arguments(parser)
    add_method_arguments(parser)
    run = parser.add_argument_group("run")
    opt.add_options(run, CaseRun, ("ground_truth",))
    opt.add_options(run, ExplainRequest, _RUN_OPTIONS)
    opt.add_options(run, CaseRun, ("output", "overwrite", "progress", "segment_matrix", "segment_labels"))
    run.add_argument("--no-figures", action="store_true", help=opt.flag_of(CaseRun, "figures").help)
    return run


#: The methods ``segexplain evaluate`` scores by default: one of each family, chosen by measured cost
#: (docs/evaluation.md): a gradient, a path integral, LRP, DeepLIFT, Guided Backprop and a perturbation method.
EVALUATED_METHODS = ("gradient", "integrated_gradients", "lrp", "deeplift", "guided_backprop", "sequence_shapley")
#: The fields of :class:`EvaluationRun` that are options of :func:`~SegExplainLib.engine.evaluation.evaluate`.
_EVALUATION_OPTIONS = ("method_options", "scores", "block_size", "steps", "reference", "random_orders",
                       "randomization_stages", "n_perturbations", "noise_radius", "batch_size")


def _read_scored_method_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--method-option METHOD:KEY=JSON`` words as ``{method: {key: value}}``."""
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        method, sep, rest = item.partition(":")
        if not sep or not method:
            raise SegExplainError(f"--method-option must look like METHOD:KEY=JSON, got {item!r}")
        options.setdefault(method, {}).update(_read_method_options([rest]))
    return options


def _check_scoring(run: Any, request: ExplainRequest) -> None:
    """Check the scoring fields of ``run`` (an :class:`EvaluationRun` or :class:`EvaluationRequest`) and its
    region's ``request``, making its sequences tuples."""
    from ..engine.api import METHODS
    from ..engine.evaluation import SCORES

    if request.samples is not None:  # a sampled map would be scored as if it were the exact one
        raise SegExplainError(f"samples={request.samples} has no use in a scorecard, which scores the exact maps; "
                              "leave it out")
    methods = opt.check_tuple("methods", run.methods)
    if not methods:
        raise SegExplainError("methods must name at least one method to score, got none")
    for method in methods:
        if method not in METHODS:
            raise SegExplainError(f"unknown method {method!r}; expected some of {sorted(METHODS)}")
    object.__setattr__(run, "methods", methods)
    opt.check_dict("method_options", run.method_options)
    scores = opt.check_tuple("scores", run.scores)
    for score in scores:
        opt.check_text("scores", score, choices=SCORES)
    object.__setattr__(run, "scores", scores)
    for name in ("block_size", "steps", "randomization_stages", "n_perturbations"):
        opt.check_int(name, getattr(run, name), minimum=1)
    opt.check_int("random_orders", run.random_orders, minimum=2)
    opt.check_int("batch_size", run.batch_size, minimum=1, optional=True)
    opt.check_text("reference", run.reference)
    object.__setattr__(run, "noise_radius", opt.check_number("noise_radius", run.noise_radius, positive=True,
                                                             below=1.0))


def _evaluation_options(run: Any, request: ExplainRequest) -> dict[str, Any]:
    """The keyword options of :func:`~SegExplainLib.engine.evaluation.evaluate` of ``run``, with its region's
    device and seed."""
    return {name: getattr(run, name) for name in _EVALUATION_OPTIONS} | {"device": request.device,
                                                                         "seed": request.seed}


@dataclasses.dataclass(frozen=True)
class EvaluationRun(opt.JsonFields):
    """A scorecard of methods on one case, as ``segexplain evaluate`` makes it (:func:`run_evaluation`).

    Attributes:
        case: The case's files, model, region (its request's region, class, device and seed; its method is not
            used), sequence names, output folder and display.
        methods: The methods to score (:data:`EVALUATED_METHODS` by default).
        method_options: Per method, options of its constructor.
        scores, block_size, steps, reference, random_orders, randomization_stages, n_perturbations, noise_radius,
            batch_size: Options of :func:`~SegExplainLib.engine.evaluation.evaluate` (docs/evaluation.md).
    """

    nested_json: ClassVar[dict[str, type]] = {"case": CaseRun}

    case: CaseRun = opt.option(dataclasses.MISSING)
    methods: tuple[str, ...] = opt.option(EVALUATED_METHODS, "--methods", nargs="+", metavar="METHOD",
                                          help=f"methods to score (default: {' '.join(EVALUATED_METHODS)})")
    method_options: dict[str, Any] = opt.option(
        {}, "--method-option", repeat=True, metavar="METHOD:KEY=JSON",
        help="an option of one method, e.g. integrated_gradients:n_steps=16 (repeatable)",
        read=_read_scored_method_options,
        write=lambda value: [f"{m}:{k}={json.dumps(v)}" for m, given in value.items() for k, v in given.items()])
    scores: tuple[str, ...] = opt.option(("faithfulness", "randomization", "robustness", "localization"),
                                         "--scores", nargs="+", metavar="SCORE",
                                         help="which scores (default: all four)")
    block_size: int = opt.option(4, "--block-size", type=int, help="voxels per side of a removed block (default 4)")
    steps: int = opt.option(16, "--steps", type=int, help="points of the deletion and insertion curves, less one")
    reference: str = opt.option("blur:2", "--reference",
                                help="what replaces a removed block: blur:SIGMA (default blur:2), min, road...")
    random_orders: int = opt.option(5, "--random-orders", type=int, help="random orders of the faithfulness baseline")
    randomization_stages: int = opt.option(3, "--randomization-stages", type=int,
                                           help="layer groups randomized from the output down (default 3)")
    n_perturbations: int = opt.option(4, "--n-perturbations", type=int, help="noisy inputs of the max-sensitivity")
    noise_radius: float = opt.option(0.02, "--noise-radius", type=float,
                                     help="noise of the max-sensitivity, relative to the intensity range")
    batch_size: int | None = opt.option(None, "--batch-size", type=int,
                                        help="perturbed images per forward pass (default: from the memory budget)")

    def __post_init__(self) -> None:
        if not isinstance(self.case, CaseRun):
            raise SegExplainError(f"case must be a CaseRun, got {self.case!r}")
        _check_scoring(self, self.case.request)

    def evaluation_options(self) -> dict[str, Any]:
        """The keyword options of :func:`~SegExplainLib.engine.evaluation.evaluate` for this run."""
        return _evaluation_options(self, self.case.request)

    def arguments(self) -> list[str]:
        """The ``segexplain evaluate`` words of this run (after ``segexplain evaluate``)."""
        case = self.case
        return [*opt.words(case, ("inputs", "sequence_names", "resample")), *case.model.arguments(),
                *opt.words(case.request, (*REGION_FIELDS, *_REGION_OPTIONS, *_RUN_OPTIONS)),
                *opt.words(self, ("methods", *_EVALUATION_OPTIONS)),
                *opt.words(case, ("output", "overwrite", "progress")), *([] if case.figures else ["--no-figures"])]

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> EvaluationRun:
        """The run of a parsed ``segexplain evaluate`` command line (:func:`add_evaluation_arguments`)."""
        from .model_source import ModelSource

        request = ExplainRequest(**opt.from_namespace(ExplainRequest, args, (*REGION_FIELDS, *_REGION_OPTIONS,
                                                                             *_RUN_OPTIONS)))
        case = CaseRun(**opt.from_namespace(CaseRun, args, ("inputs", "output", "sequence_names", "resample",
                                                            "overwrite", "progress")),
                       figures=not args.no_figures, model=ModelSource.from_namespace(args), request=request)
        return cls(case, **opt.from_namespace(cls, args, ("methods", *_EVALUATION_OPTIONS)))


def _same_option(cls: type, name: str) -> Any:
    """A new dataclass field with the default and command-line option of field ``name`` of ``cls``."""
    found = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=found.default, default_factory=found.default_factory, metadata=found.metadata)


@dataclasses.dataclass(frozen=True)
class EvaluationRequest(opt.JsonFields):
    """A scorecard of methods on the warm worker's current case (:meth:`~SegExplainLib.frontends.worker.Worker.
    evaluate`): the region of :attr:`request` and the scoring of :class:`EvaluationRun`, whose files, model and
    output folder are the worker's.

    Attributes:
        request: The region, class, device and seed (its method is not used).
        methods, method_options, scores, block_size, steps, reference, random_orders, randomization_stages,
            n_perturbations, noise_radius, batch_size: As :class:`EvaluationRun`'s.
    """

    nested_json: ClassVar[dict[str, type]] = {"request": ExplainRequest}

    request: ExplainRequest = dataclasses.field(default_factory=ExplainRequest)
    methods: tuple[str, ...] = _same_option(EvaluationRun, "methods")
    method_options: dict[str, Any] = _same_option(EvaluationRun, "method_options")
    scores: tuple[str, ...] = _same_option(EvaluationRun, "scores")
    block_size: int = _same_option(EvaluationRun, "block_size")
    steps: int = _same_option(EvaluationRun, "steps")
    reference: str = _same_option(EvaluationRun, "reference")
    random_orders: int = _same_option(EvaluationRun, "random_orders")
    randomization_stages: int = _same_option(EvaluationRun, "randomization_stages")
    n_perturbations: int = _same_option(EvaluationRun, "n_perturbations")
    noise_radius: float = _same_option(EvaluationRun, "noise_radius")
    batch_size: int | None = _same_option(EvaluationRun, "batch_size")

    def __post_init__(self) -> None:
        if not isinstance(self.request, ExplainRequest):
            raise SegExplainError(f"request must be an ExplainRequest, got {self.request!r}")
        _check_scoring(self, self.request)

    def evaluation_options(self) -> dict[str, Any]:
        """The keyword options of :func:`~SegExplainLib.engine.evaluation.evaluate` for this request."""
        return _evaluation_options(self, self.request)


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> Any:
    """Every option of ``segexplain evaluate`` but ``--verbose``: the inputs, model and region of ``segexplain
    explain``, the methods and scores, and the run; returns the group of the run's options."""
    from .model_source import add_model_arguments

    inputs = parser.add_argument_group("inputs")
    opt.add_options(inputs, CaseRun, ("inputs", "sequence_names", "resample"))
    add_model_arguments(parser)
    add_region_arguments(parser)
    opt.add_options(parser.add_argument_group("methods and scores (docs/evaluation.md)"), EvaluationRun,
                    ("methods", *_EVALUATION_OPTIONS))
    run = parser.add_argument_group("run")
    opt.add_options(run, ExplainRequest, _RUN_OPTIONS)
    opt.add_options(run, CaseRun, ("output", "overwrite", "progress"))
    run.add_argument("--no-figures", action="store_true", help="skip the PNG figure")
    return run
