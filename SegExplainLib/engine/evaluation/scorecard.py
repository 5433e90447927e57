"""``evaluate()``: a scorecard of attribution methods on the user's own network and case, with a verdict per method.

Every method is reached through :func:`~SegExplainLib.engine.api.explain` by its registry name, so any registered
method is scored. The region is fixed once from the unperturbed image (a predicted region does not move with the
noise or the randomized weights), and what all methods share is computed once: the reference image, the random
orders' curves, the receptive field and the noisy inputs. Scores (docs/evaluation.md):

* faithfulness (:mod:`.faithfulness`): deletion and insertion over 3D blocks, normalized against random orders;
* randomization (:mod:`.randomization`): cascading randomization from the output layer down, Spearman per stage;
* robustness (:mod:`.robustness`): max-sensitivity under small uniform noise;
* localization (:mod:`.localization`): positive relevance outside the region's receptive field and off the target;
* the method's own sum rule (the record's delta), run time and peak memory, and the share of each sequence.

Example:
    >>> card = sx.evaluate(unet, image, sx.PredictedRegion(class_index=1), ["lrp", "gradient", "occlusion"])
    >>> print(card.table())
    >>> card.recommendation
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import SegExplainError
from ..api import METHODS, check_image, explain, placed, resolve_device
from ..baselines import make_baseline
from ..batching import added_peak_bytes, choose_internal_batch_size, max_batch_for
from ..deployment import deployed
from ..kernels import onednn_convolutions
from ..metrics import relevance_shares
from ..targets import MaskTarget, Target
from . import faithfulness, localization, randomization, robustness
from .faithfulness import Curves

__all__ = ["SCORES", "Scorecard", "evaluate", "evaluation_steps"]

#: The scores :func:`evaluate` can compute, in the scorecard's order.
SCORES = ("faithfulness", "randomization", "robustness", "localization")
#: Faithful: the mean normalized area (deletion and insertion) exceeds twice its spread over the random orders and
#: this margin.
FAITHFUL_MARGIN = 0.05
#: Relevance outside the receptive field beyond this share is reported: the network cannot have looked there.
LEAKAGE_TOLERANCE = 0.01
#: A map whose sum misses its method's own rule (LRP conservation, IG or DeepLIFT completeness) by more than this share
#: of the expected sum is not yet what the method stands for (the threshold of IG's own warning).
SUM_RULE_TOLERANCE = 0.05


@dataclass(frozen=True, eq=False)
class Scorecard:
    """The scores of each method on one network, case and region.

    Attributes:
        methods: Per method name, its scores, verdict and record as JSON-friendly values (see docs/evaluation.md).
        curves: Per method name and per random order (``random:0``, ...), the deletion and insertion curves.
        settings: Every option of :func:`evaluate`, enough to rebuild the run (methods and their options included).
        target: The region explained (on the model's grid) and its score.
        recommendation: The method to trust for this network and case, with the reason, in words.
        maps: Per method name, its map on the trained network (C, D, H, W).
    """

    methods: dict[str, dict[str, Any]]
    curves: dict[str, Curves]
    settings: dict[str, Any]
    target: dict[str, Any]
    recommendation: str
    maps: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        """Everything but the maps, as ``summary.json`` records it."""
        return {"scorecard": {"methods": self.methods, "recommendation": self.recommendation,
                              "target": self.target, "settings": self.settings,
                              "curves": {name: {"fractions": c.fractions.tolist(), "deletion": c.deletion.tolist(),
                                                "insertion": c.insertion.tolist()}
                                         for name, c in self.curves.items()}}}

    def table(self) -> str:
        """The scorecard as a text table, one line per method, and the recommendation."""
        head = (f"{'method':<22} {'deletion':>13} {'insertion':>13} {'random rho':>10} {'max-sens':>8} "
                f"{'off-RF':>6} {'off-target':>10} {'seconds':>7}  verdict")
        lines = [head, "-" * len(head)]

        def number(value: Any, digits: int = 2) -> str:
            return "-" if value is None else f"{value:.{digits}f}"

        for name, row in self.methods.items():
            faithful, sanity = row.get("faithfulness", {}), row.get("randomization", {})
            local = row.get("localization", {})
            area = {mode: f"{number(faithful[mode]['mean'])}+-{number(faithful[mode]['std'])}" if mode in faithful
                    else "undefined" if "undefined" in faithful else "-" for mode in ("deletion", "insertion")}
            lines.append(f"{name:<22} {area['deletion']:>13} {area['insertion']:>13} "
                         f"{number(sanity.get('final_spearman')):>10} "
                         f"{number(row.get('robustness', {}).get('max_sensitivity')):>8} "
                         f"{number(local.get('outside_receptive_field')):>6} {number(local.get('outside_target')):>10} "
                         f"{row['seconds']:>7.2f}  {row['verdict']}")
        return "\n".join([*lines, "", f"recommendation: {self.recommendation}"])


def evaluation_steps(methods: Sequence[str], scores: Sequence[str] = SCORES) -> list[str]:
    """The names of :func:`evaluate`'s steps, in the order its ``progress`` is told them."""
    named = {"faithfulness": "faithfulness curves", "randomization": "cascading randomization",
             "robustness": "robustness", "localization": "localization"}
    return ["fixing the region", *[f"explaining: {name}" for name in methods],
            *[named[score] for score in SCORES if score in scores], "verdicts"]


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SegExplainError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not (
            0 < value < 1):
        raise SegExplainError(f"{name} must be a number between 0 and 1 (exclusive), got {value!r}")
    return float(value)


def _check_methods(methods: Any, method_options: Any) -> tuple[list[str], dict[str, dict[str, Any]]]:
    if isinstance(methods, str) or not isinstance(methods, Sequence) or not methods:
        raise SegExplainError(f"methods must be a non-empty list of method names, got {methods!r}")
    for name in methods:
        if name not in METHODS:
            raise SegExplainError(f"unknown method {name!r}; expected some of {sorted(METHODS)}")
    if len(set(methods)) != len(methods):
        raise SegExplainError(f"methods must name each method once, got {list(methods)}")
    if not isinstance(method_options, Mapping):
        raise SegExplainError(f"method_options must map method names to their options, got {method_options!r}")
    for name, given in method_options.items():
        if name not in methods or not isinstance(given, Mapping):
            raise SegExplainError(f"method_options must map some of the methods {list(methods)} to option dicts, got "
                                  f"{name!r}: {given!r}")
    return list(methods), {name: dict(method_options.get(name, {})) for name in methods}


def _check_reference(reference: Any) -> str:
    if reference == faithfulness.ROAD:
        return reference
    if not isinstance(reference, str):
        raise SegExplainError(f"reference must be 'road' or a baseline such as 'blur:2', got {reference!r}")
    make_baseline(reference)
    return reference


def evaluate(model: nn.Module, image: Any, target: Target, methods: Sequence[str], *,
             method_options: Mapping[str, Mapping[str, Any]] | None = None, scores: Sequence[str] = SCORES,
             block_size: int = 4, steps: int = 16, reference: str = "blur:2", road_noise: float = 0.01,
             random_orders: int = 5, randomization_stages: int = 3, randomization_threshold: float = 0.5,
             n_perturbations: int = 4, noise_radius: float = 0.02, robustness_threshold: float = 0.5,
             sequence_names: Sequence[str] | None = None, seed: int = 0, batch_size: int | None = None,
             device: str | torch.device = "auto", dtype: torch.dtype | None = None,
             progress: Callable[[str, float], None] | None = None,
             cancelled: Callable[[], bool] | None = None) -> Scorecard:
    """Score attribution methods on a network, an image and a region: which map can be trusted here?

    Args:
        model: The network as deployed (as for :func:`~SegExplainLib.engine.api.explain`); never modified.
        image: Float (C, D, H, W), one channel per MRI sequence.
        target: The region; a predicted region is fixed from the unperturbed image.
        methods: Registry names of the methods to score.
        method_options: Per method name, options for its constructor (e.g. ``{"integrated_gradients":
            {"n_steps": 16}}``).
        scores: Which of :data:`SCORES` to compute (all by default); run time, memory, the sum rule and the
            sequence shares are always recorded.
        block_size: Voxels per side of the blocks removed together by the faithfulness curves.
        steps: Fraction steps of the curves (``steps + 1`` points).
        reference: What replaces a removed voxel: a baseline (``blur:SIGMA``, ``min``, ``constant:V``; ``zero`` only
            when zero is a plausible intensity) or ``road``, noisy linear imputation.
        road_noise: ROAD's noise, times each sequence's standard deviation.
        random_orders: Random orders (seeds) against which the areas are normalized.
        randomization_stages: Cumulative groups of layers randomized from the output down.
        randomization_threshold: A method fails randomization when the rank correlation of its map with the trained
            network's is still at least this after the last stage.
        n_perturbations: Noisy inputs of the max-sensitivity.
        noise_radius: Noise amplitude, relative to the image's intensity range.
        robustness_threshold: Max-sensitivity at or above it is "not robust".
        sequence_names: Names of the channels for the shares (default ``sequence0``, ...).
        seed: Seed of every random draw (orders, noise, randomized weights).
        batch_size: Perturbed images per forward pass; None chooses it from the memory budget
            (:mod:`~SegExplainLib.engine.batching`).
        device, dtype: As for :func:`~SegExplainLib.engine.api.explain`.
        progress: Called with a step's name and the fraction done before each step.
        cancelled: Asked between steps; when it returns true the evaluation stops with a SegExplainError.

    Returns:
        The :class:`Scorecard`.
    """
    methods, options = _check_methods(methods, method_options or {})
    if isinstance(scores, str) or not set(scores) <= set(SCORES):
        raise SegExplainError(f"scores must be some of {list(SCORES)}, got {scores!r}")
    block_size = _check_int("block_size", block_size, 1)
    steps = _check_int("steps", steps, 1)
    reference = _check_reference(reference)
    road_noise = float(_check_fraction("road_noise", road_noise)) if reference == faithfulness.ROAD else road_noise
    random_orders = _check_int("random_orders", random_orders, 2)
    randomization_stages = _check_int("randomization_stages", randomization_stages, 1)
    randomization_threshold = _check_fraction("randomization_threshold", randomization_threshold)
    n_perturbations = _check_int("n_perturbations", n_perturbations, 1)
    noise_radius = _check_fraction("noise_radius", noise_radius)
    if not isinstance(robustness_threshold, (int, float)) or not robustness_threshold > 0:
        raise SegExplainError(f"robustness_threshold must be a number > 0, got {robustness_threshold!r}")
    seed = _check_int("seed", seed, 0)
    if batch_size is not None:
        batch_size = _check_int("batch_size", batch_size, 1)
    tensor = check_image(image)
    names = list(sequence_names or [f"sequence{c}" for c in range(tensor.shape[0])])
    if len(names) != tensor.shape[0]:
        raise SegExplainError(f"sequence_names has {len(names)} names for an image with {tensor.shape[0]} channels")
    if not isinstance(target, Target):
        raise SegExplainError(f"target must be a SegExplainLib target (MaskTarget, ...), got {type(target).__name__}")
    settings = {"methods": methods, "method_options": options, "scores": [s for s in SCORES if s in scores],
                "block_size": block_size, "steps": steps, "reference": reference, "road_noise": road_noise,
                "random_orders": random_orders, "randomization_stages": randomization_stages,
                "randomization_threshold": randomization_threshold, "n_perturbations": n_perturbations,
                "noise_radius": noise_radius, "robustness_threshold": float(robustness_threshold),
                "sequence_names": names, "seed": seed}
    run_device = resolve_device(device)
    run_model, run_dtype = placed(model, run_device, dtype)
    x = tensor.to(device=run_device, dtype=run_dtype)[None]
    steps_total, steps_done = len(evaluation_steps(methods, scores)), itertools.count()

    def step(name: str) -> None:
        if cancelled is not None and cancelled():
            raise SegExplainError("the evaluation was cancelled")
        done = next(steps_done)
        if progress is not None:
            progress(name, done / steps_total)

    step("fixing the region")
    with deployed(run_model), torch.no_grad(), onednn_convolutions():
        logits = run_model(x)
        region = target.region(logits[0])
    fixed = MaskTarget(np.asarray(region, bool), class_index=target.class_index, aggregation=target.aggregation)
    seed_tensor = torch.zeros_like(logits)
    seed_tensor[0, target.class_index] = torch.as_tensor(np.asarray(region), device=x.device, dtype=x.dtype)

    def explained(net: nn.Module, at: torch.Tensor, name: str, *, quiet: bool = True):
        # the maps of randomized weights and noisy inputs are probes: their sum-rule warnings are not the user's
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            return explain(net, at[0], fixed, name, device=run_device, dtype=run_dtype, **options[name])

    rows: dict[str, dict[str, Any]] = {}
    maps: dict[str, np.ndarray] = {}
    for name in methods:
        step(f"explaining: {name}")
        results: list = []  # the call runs at once, inside the measurement: the defaults only bind this round's names
        peak = added_peak_bytes(lambda name=name, results=results: results.append(
            explained(run_model, x, name, quiet=False)), run_device)
        result = results[0]
        maps[name] = np.asarray(result.maps, dtype=np.float64)
        rows[name] = {"options": result.options, "seconds": result.seconds, "peak_memory_bytes": peak,
                      "memory_measured": ("the CUDA allocator's peak above the memory in use" if run_device.type ==
                                          "cuda" else "the process's resident-set high-water mark above its size"),
                      "sum_rule": {"expected": result.expected_sum, "delta": result.delta,
                                   "relative_delta": result.relative_delta},
                      "sequence_shares": dict(zip(names, relevance_shares(maps[name]).tolist())),
                      "per_sequence": METHODS[name].per_sequence,
                      "warnings": list(result.warnings)}
    curves: dict[str, Curves] = {}
    if "faithfulness" in scores:
        step("faithfulness curves")
        _faithfulness(run_model, x, seed_tensor, maps, rows, curves, settings, batch_size,
                      lambda: cancelled is not None and cancelled())
    if "randomization" in scores:
        step("cascading randomization")
        for name in methods:
            trained = faithfulness.block_sums(maps[name], block_size)
            stages = [{"randomized_down_to": layer,
                       "spearman": randomization.spearman(trained, faithfulness.block_sums(
                           explained(copy, x, name).maps, block_size))}
                      for layer, copy in randomization.cascade(run_model, randomization_stages, seed)]
            final = stages[-1]["spearman"]
            rows[name]["randomization"] = {"stages": stages, "final_spearman": final,
                                           "passed": bool(final < randomization_threshold)}
    if "robustness" in scores:
        step("robustness")
        noisy = robustness.noisy_inputs(x, n_perturbations, noise_radius, seed)
        for name in methods:
            value = robustness.max_sensitivity(lambda at, name=name: explained(run_model, at, name).maps,
                                               maps[name], noisy)
            rows[name]["robustness"] = {"max_sensitivity": value, "robust": bool(value < robustness_threshold)}
    if "localization" in scores:
        step("localization")
        with deployed(run_model):
            field_mask = localization.receptive_field(run_model, x, seed_tensor)
        on_image = np.asarray(region, bool) if region.shape == tuple(x.shape[2:]) else None
        for name in methods:
            rows[name]["localization"] = {
                "outside_receptive_field": localization.leakage(maps[name], field_mask),
                "outside_target": None if on_image is None else localization.leakage(maps[name], on_image),
                "receptive_field_voxels": int(field_mask.any(0).sum())}
    step("verdicts")
    for name in methods:
        rows[name]["verdict"], rows[name]["trustworthy"] = _verdict(rows[name])
    return Scorecard(rows, curves, settings, {**fixed.describe(), "region_voxels": int(np.asarray(region).sum()),
                                              "score": float((logits * seed_tensor).sum())},
                     _recommendation(rows), maps)


def _faithfulness(model: nn.Module, x: torch.Tensor, seed_tensor: torch.Tensor, maps: dict[str, np.ndarray],
                  rows: dict[str, dict[str, Any]], curves: dict[str, Curves], settings: dict[str, Any],
                  batch_size: int | None, cancelled: Callable[[], bool]) -> None:
    """Every method's curves and the random orders' in one batched run; their normalized areas into ``rows``."""
    block_size, reference = settings["block_size"], settings["reference"]
    if batch_size is None:
        batch_size = choose_internal_batch_size(model, x, memory_budget_bytes=None,
                                                max_batch=max_batch_for(None, x.device, forward_only=True))
    orders = [faithfulness.order_of(faithfulness.block_sums(maps[name], block_size)) for name in maps]
    orders += faithfulness.random_orders(orders[0].size, settings["random_orders"], settings["seed"])

    def score(batch: torch.Tensor) -> torch.Tensor:
        return (model(batch) * seed_tensor).flatten(1).sum(1)

    with deployed(model), torch.no_grad(), onednn_convolutions():
        computed = faithfulness.curves(
            score, x, faithfulness.reference_image(x, reference), orders, block_size=block_size,
            steps=settings["steps"], batch_size=batch_size, seed=settings["seed"], cancelled=cancelled,
            road_noise=settings["road_noise"] if reference == faithfulness.ROAD else None)
    random = computed[len(maps):]
    low, high = faithfulness.score_range(computed)
    for index, curve in enumerate(random):
        curves[f"random:{index}"] = curve
    for name, curve in zip(maps, computed):
        curves[name] = curve
        try:
            values = {mode: faithfulness.normalized_area(curve, random, mode, low=low, high=high)
                      for mode in ("deletion", "insertion")}
        except SegExplainError as error:  # the curves are kept; no map can be told from random with this reference
            rows[name]["faithfulness"] = {"undefined": str(error), "faithful": None, "combined": None,
                                          "batch_size": batch_size}
            rows[name]["warnings"].append(f"faithfulness undefined: {error}")
            continue
        both = (values["deletion"] + values["insertion"]) / 2
        rows[name]["faithfulness"] = {
            **{mode: {"mean": float(v.mean()), "std": float(v.std()), "area": curve.area(mode)}
               for mode, v in values.items()},
            "random_area": {mode: float(np.mean([c.area(mode) for c in random])) for mode in values},
            "score_range": [low, high],
            "faithful": bool(both.mean() > max(2 * both.std(), FAITHFUL_MARGIN)), "combined": float(both.mean()),
            "batch_size": batch_size}


def _verdict(row: dict[str, Any]) -> tuple[str, bool]:
    """A verdict in words with its reasons, and whether the method can be trusted here."""
    if row.get("per_sequence"):
        shares = ", ".join(f"{name} {share:.0%}" for name, share in row["sequence_shares"].items())
        return (f"per-sequence answer, not judged as a voxel map (its map is flat inside each sequence, so deletion, "
                f"insertion and randomization by blocks do not apply): positive shares {shares}"), False
    reasons, failed, caveats = [], False, False
    if "faithfulness" in row and row["faithfulness"]["faithful"] is None:
        reasons.append("faithfulness undefined (the reference does not lower the target score)")
        caveats = True
    elif "faithfulness" in row:
        f = row["faithfulness"]
        text = (f"deletion {f['deletion']['mean']:.2f} +- {f['deletion']['std']:.2f} and insertion "
                f"{f['insertion']['mean']:.2f} +- {f['insertion']['std']:.2f}")
        reasons.append(f"{text} above random" if f["faithful"] else f"{text}: no better than random")
        failed |= not f["faithful"]
    if "randomization" in row:
        r = row["randomization"]
        reasons.append(f"{'passes' if r['passed'] else 'fails'} randomization (rank correlation "
                       f"{r['final_spearman']:.2f} with the weights random)")
        failed |= not r["passed"]
    if "robustness" in row:
        r = row["robustness"]
        reasons.append(f"{'robust' if r['robust'] else 'not robust'} (max-sensitivity {r['max_sensitivity']:.2f})")
        caveats |= not r["robust"]
    missed = row.get("sum_rule", {}).get("relative_delta")
    if missed is not None and abs(missed) > SUM_RULE_TOLERANCE:
        reasons.append(f"misses its own sum rule by {100 * abs(missed):.0f}% (see its warning)")
        caveats = True
    if "localization" in row and row["localization"]["outside_receptive_field"] > LEAKAGE_TOLERANCE:
        reasons.append(f"{100 * row['localization']['outside_receptive_field']:.0f}% of its positive relevance lies "
                       "where the network cannot see")
        caveats = True
    word = "not trustworthy" if failed else "use with care" if caveats else "trustworthy"
    return f"{word}: {', '.join(reasons) or 'no score computed'}", not failed and not caveats


def _recommendation(rows: dict[str, dict[str, Any]]) -> str:
    """The method to trust: the most faithful of the trustworthy ones (else of those that fail no test)."""
    for group, why in (([n for n, r in rows.items() if r["trustworthy"]], "passes every test"),
                       ([n for n, r in rows.items() if not r["verdict"].startswith(("not", "per-sequence"))],
                        "fails no test")):
        if group:
            best = max(group, key=lambda n: rows[n].get("faithfulness", {}).get("combined") or 0.0)
            if rows[best].get("faithfulness", {}).get("combined") is None:
                return f"{best}: it {why} (faithfulness not scored or undefined)"
            return (f"{best}: it {why} and is the most faithful of those "
                    f"({rows[best]['faithfulness']['combined']:.2f} above random)")
    return "none: every method failed faithfulness or randomization on this network and case"
