"""The segment x segment matrix: what the network looks at, segment by segment, to find each of its segments.

For a multi-class network (as Agg2Exp, WACV 2025, aggregates voxel attributions per segment): every output class's
predicted region is explained (``aggregation="sum"``: the class logits summed over the region), and the relevance of
each map is added up inside each input segment: the segments of the predicted segmentation, or of a label map the
user gives, label 0 being the background outside all segments. Row ``i`` answers "what does the network look at to
find segment ``i``?": column ``j`` holds the share of the positive relevance (summed over the sequences) that lies in
input segment ``j``, so each explained row sums to 1. The raw positive and negative sums are kept beside the shares.

The K explanations share their passes: the seeds of all classes are stacked along the batch axis (each batch element
explains its own score, the contract of :class:`~SegExplainLib.engine.method.AttributionMethod`), ``segment_batch_size``
per call, after one forward pass that finds the predicted regions. A method that makes data-dependent choices per
target (Integrated Gradients' adaptive quadrature, :meth:`~SegExplainLib.engine.method.AttributionMethod.for_target`)
explains one segment per call, as :func:`~SegExplainLib.engine.api.explain` would.

Example:
    >>> matrix = segment_matrix(unet, image, method="lrp", class_names=["background", "liver", "tumour"])
    >>> matrix.shares[1]            # where the positive relevance for "liver" lies, per input segment
    >>> print(matrix.to_csv())
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import SegExplainError
from .api import check_image, make_method, prepared_run
from .checks import is_int
from .deployment import check_walkable, statistics_record
from .explanation import Explanation
from .targets import ClassChannel, PredictedRegion

#: What a row's status says: explained, or why it has no shares.
EXPLAINED, NOT_PREDICTED, NO_POSITIVE = "explained", "not predicted", "no positive relevance"


@dataclass
class SegmentMatrix:
    """Shares of positive relevance per explained output segment (rows) and input segment (columns).

    Attributes:
        rows: Names of the explained output segments (the classes), e.g. ``["background", "liver"]``.
        row_classes: Their class indices.
        columns: Names of the input segments; label 0 is the background outside all segments.
        column_labels: Their label values in the segmentation.
        shares: ``(R, M)``: share of the row's positive relevance in each input segment; each explained row sums to 1;
            NaN in a row whose class is predicted nowhere or whose map has no positive relevance (see ``status``).
        positive: ``(R, M)``: the raw sums of the positive relevance ``max(r, 0)`` per input segment (0 where not
            explained).
        negative: ``(R, M)``: the raw sums of the negative relevance ``max(-r, 0)`` per input segment.
        status: Per row, ``"explained"``, ``"not predicted"`` (the class is the argmax nowhere) or ``"no positive
            relevance"``.
        method: The method's registry name; ``options`` its options.
        segmentation: ``"predicted"`` (the network's argmax) or ``"given"`` (a label map).
        explanations: Per row, the explanation's record (:meth:`~SegExplainLib.engine.explanation.Explanation.record`),
            or None for a class predicted nowhere.
        passes: Calls of the method (each one forward and backward pass of a batch); one explanation per segment
            would take ``len(rows)`` (plus a forward pass each).
        seconds: Wall-clock time of the whole matrix.
        case: What the case is called in titles (a file or case name), or ``""``.
    """

    rows: list[str]
    row_classes: list[int]
    columns: list[str]
    column_labels: list[int]
    shares: np.ndarray
    positive: np.ndarray
    negative: np.ndarray
    status: list[str]
    method: str
    options: dict[str, Any]
    segmentation: str
    explanations: list[dict[str, Any] | None]
    passes: int
    seconds: float
    case: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def negative_share(self) -> np.ndarray:
        """Per row, the negative relevance's share of all relevance, ``sum(neg) / (sum(pos) + sum(neg))`` (NaN
        where the row has none)."""
        positive, negative = self.positive.sum(1), self.negative.sum(1)
        total = positive + negative
        return np.where(total > 0, negative / np.where(total > 0, total, 1.0), np.nan)

    def record(self) -> dict[str, Any]:
        """Everything as JSON-friendly values (NaN as None): what ``summary.json`` holds under ``segment_matrix``."""
        def plain(array: np.ndarray) -> list:
            return [[None if np.isnan(v) else float(v) for v in row] for row in np.atleast_2d(array)]

        return {"rows": list(self.rows), "row_classes": list(self.row_classes), "columns": list(self.columns),
                "column_labels": list(self.column_labels), "values": "share of positive relevance",
                "shares": plain(self.shares), "positive_sums": plain(self.positive),
                "negative_sums": plain(self.negative), "negative_share": plain(self.negative_share)[0],
                "status": list(self.status), "method": self.method, "options": self.options,
                "segmentation": self.segmentation, "passes": self.passes, "seconds": self.seconds, "case": self.case,
                "extras": self.extras, "explanations": self.explanations}

    def to_json(self, **kwargs: Any) -> str:
        """The record as JSON text."""
        return json.dumps(self.record(), default=str, **kwargs)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SegmentMatrix:
        """The matrix from its :meth:`record` (a worker's answer, ``summary.json``'s ``segment_matrix``)."""
        try:
            arrays = {name: np.array(record[key], dtype=float) for name, key in (
                ("shares", "shares"), ("positive", "positive_sums"), ("negative", "negative_sums"))}
            return cls(rows=record["rows"], row_classes=record["row_classes"], columns=record["columns"],
                       column_labels=record["column_labels"], status=record["status"], method=record["method"],
                       options=record["options"], segmentation=record["segmentation"],
                       explanations=record["explanations"], passes=record["passes"], seconds=record["seconds"],
                       case=record.get("case", ""), extras=record.get("extras", {}), **arrays)
        except (KeyError, TypeError, ValueError) as error:
            raise SegExplainError(f"not a segment matrix record: {type(error).__name__}: {error}") from None

    def to_csv(self) -> str:
        """The shares as CSV: a header naming the input segments, one line per explained output segment, then its
        positive relevance, negative share and status; an empty cell where a row has no shares."""
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["output segment \\ input segment", *self.columns, "positive relevance", "negative share",
                         "status"])
        for name, shares, positive, negative, status in zip(self.rows, self.shares, self.positive,
                                                             self.negative_share, self.status):
            writer.writerow([name, *("" if np.isnan(v) else f"{v:.6g}" for v in shares), f"{positive.sum():.6g}",
                             "" if np.isnan(negative) else f"{negative:.6g}", status])
        return text.getvalue()


def segment_names(labels: Sequence[int], class_names: Sequence[str] | None) -> list[str]:
    """Names of segment labels: the class name where ``class_names`` has one, ``background`` for 0 otherwise,
    ``label N`` for the rest."""
    names = list(class_names or [])
    return [names[v] if v < len(names) else "background" if v == 0 else f"label {v}" for v in labels]


def _check_options(segmentation: Any, classes: Any, class_names: Any, segment_batch_size: Any) -> None:
    if segmentation is not None and not isinstance(segmentation, (np.ndarray, torch.Tensor)):
        raise SegExplainError(f"segmentation must be an integer label array (D, H, W) or None, got "
                              f"{type(segmentation).__name__}")
    if classes is not None and (isinstance(classes, str) or not all(is_int(c) and c >= 0 for c in classes)):
        raise SegExplainError(f"classes must be a list of non-negative class indices or None, got {classes!r}")
    if class_names is not None and (isinstance(class_names, str) or not all(isinstance(n, str) for n in class_names)):
        raise SegExplainError(f"class_names must be a list of texts or None, got {class_names!r}")
    if not is_int(segment_batch_size) or segment_batch_size < 1:
        raise SegExplainError(f"segment_batch_size must be an integer >= 1, got {segment_batch_size!r}")


def _labels(segmentation: Any, grid: tuple[int, ...]) -> np.ndarray:
    """The label map as integers on ``grid``, or an error naming both shapes."""
    labels = np.asarray(segmentation.cpu() if isinstance(segmentation, torch.Tensor) else segmentation)
    if labels.shape != grid:
        raise SegExplainError(f"segmentation has shape {labels.shape} but the relevance maps' grid is {grid}; give a "
                              "label map on that grid")
    if labels.dtype == bool or not (np.issubdtype(labels.dtype, np.integer) or np.array_equal(labels, labels.round())):
        raise SegExplainError(f"segmentation must hold integer labels, got dtype {labels.dtype}")
    if labels.min() < 0:
        raise SegExplainError(f"segmentation labels must be >= 0 (0: background), got {int(labels.min())}")
    return labels.astype(np.int64)


def _per_element(values: torch.Tensor | None, count: int) -> list[float | None]:
    """A method's per-batch-element sums (its ``expected`` or ``delta``) as floats, or Nones without a sum rule."""
    return [None] * count if values is None else values.detach().reshape(count, -1).sum(1).tolist()


def segment_matrix(model: nn.Module, image: Any, *, method: str = "lrp", segmentation: Any = None,
                   classes: Sequence[int] | None = None, class_names: Sequence[str] | None = None,
                   maps_to_grid: Callable[[np.ndarray], np.ndarray] | None = None, segment_batch_size: int = 8,
                   device: str | torch.device = "auto", dtype: torch.dtype | None = None, case: str = "",
                   **options: Any) -> SegmentMatrix:
    """Explain every predicted segment and add up its relevance in each input segment.

    Args:
        model: As for :func:`~SegExplainLib.engine.api.explain`: logits (N, K, D, H, W), left as it was.
        image: Float array (C, D, H, W), normalized as the model expects.
        method: Registry name of the method (``options`` are its constructor's).
        segmentation: Integer label map of the input segments (0: background) on the grid of the maps (after
            ``maps_to_grid``); None: the network's prediction (argmax), on the image grid.
        classes: The output classes to explain (rows); None: every class of the model.
        class_names: Names of the classes (and labels), for rows and columns; None: ``background``, ``label N``.
        maps_to_grid: Brings a map (C, D, H, W) onto the grid of ``segmentation`` (a pipeline's way back to the
            original images); None: the segmentation is on the image grid. The predicted segmentation is always on
            the network's grid and summed there.
        segment_batch_size: Segments explained together in one batched call of the method.
        device, dtype: As for :func:`~SegExplainLib.engine.api.explain`.
        case: The case's name, for titles.
        **options: Options of the method's constructor, e.g. ``composite="epsilon_plus"``.

    Returns:
        The :class:`SegmentMatrix`; a class predicted nowhere gets a row of status ``"not predicted"``.

    Raises:
        SegExplainError: An unknown method or option, a class out of range, a label map not on the grid (naming both
            shapes) or not integer.
    """
    started = time.perf_counter()
    _check_options(segmentation, classes, class_names, segment_batch_size)
    attribution = make_method(method, **options)
    if attribution.walks_modules:
        check_walkable(model, attribution.name)
    grid = tuple(check_image(image).shape[1:])
    if segmentation is not None:  # checked before anything runs; a zero map tells the grid the maps are brought to
        grid = grid if maps_to_grid is None else tuple(np.shape(maps_to_grid(np.zeros((1, *grid))))[1:])
        segmentation = _labels(segmentation, grid)
    norm_statistics = statistics_record(model)
    # the whole output channel as the target: every window of a sliding window runs, as the regions are not known yet
    with prepared_run(model, image, ClassChannel(class_index=0), device, dtype, restrict=False) as (
            model, x, logits, _, _, _):
        count = logits.shape[1]
        rows = list(range(count)) if classes is None else [int(c) for c in classes]
        if any(c >= count for c in rows):
            raise SegExplainError(f"classes {rows} include one out of range for a model with {count} output classes")
        predicted = logits[0].argmax(0)
        explained = [c for c in rows if bool((predicted == c).any())]
        seeds = torch.zeros((len(explained), *logits.shape[1:]), dtype=x.dtype, device=x.device)
        for i, c in enumerate(explained):
            seeds[i, c] = (predicted == c).to(x.dtype)
        # a method choosing per target (IG's adaptive nodes) is run one segment per call, as explain() runs it
        per_target = bool(explained) and attribution.for_target(model, x, seeds[:1]) is not attribution
        batch = 1 if per_target else segment_batch_size
        maps, expected, delta, extras = [], [], [], []
        for start in range(0, len(explained), batch):
            chunk = seeds[start:start + batch]
            out = attribution.attribute(model, x.expand(len(chunk), *x.shape[1:]), chunk)
            maps.append(out.maps.detach().cpu().numpy())
            expected += _per_element(out.expected, len(chunk))
            delta += _per_element(out.delta, len(chunk))
            extras += [out.extras] * len(chunk)
        scores = (logits[0] * seeds).flatten(1).sum(1).tolist() if explained else []
        region_voxels = seeds.flatten(1).sum(1).tolist()
        device_name, dtype_name = str(x.device), str(x.dtype).replace("torch.", "")
        predicted = predicted.cpu().numpy()
    maps = np.concatenate(maps) if maps else np.zeros((0, *x.shape[1:]))
    passes = -(-len(explained) // batch)
    seconds = time.perf_counter() - started
    records: dict[int, dict[str, Any]] = {}
    for i, c in enumerate(explained):
        warns = attribution.sum_rule_warnings(delta[i], expected[i])
        records[c] = Explanation(
            maps=maps[i], method=attribution.name, options=attribution.options(),
            target=PredictedRegion(class_index=c).describe(), target_score=float(scores[i]),
            region_voxels=int(region_voxels[i]), expected_sum=expected[i], delta=delta[i], seconds=seconds,
            device=device_name, dtype=dtype_name, norm_statistics=norm_statistics, warnings=warns,
            extras={**attribution.details(), **extras[i], "segment_matrix_passes": passes}).record()
    if maps_to_grid is not None and segmentation is not None:
        maps = np.stack([maps_to_grid(m) for m in maps]) if len(maps) else maps
    labels = predicted if segmentation is None else segmentation
    column_labels = list(range(count)) if segmentation is None else sorted({0, *np.unique(labels).tolist()})
    inside = [labels == label for label in column_labels]
    positive = np.zeros((len(rows), len(column_labels)))
    negative = np.zeros_like(positive)
    for i, c in enumerate(explained):
        per_voxel_positive = np.clip(maps[i], 0, None).sum(0, dtype=np.float64)
        per_voxel_negative = np.clip(-maps[i], 0, None).sum(0, dtype=np.float64)
        positive[rows.index(c)] = [per_voxel_positive[mask].sum() for mask in inside]
        negative[rows.index(c)] = [per_voxel_negative[mask].sum() for mask in inside]
    totals = positive.sum(1, keepdims=True)
    shares = np.where(totals > 0, positive / np.where(totals > 0, totals, 1.0), np.nan)
    status = [NOT_PREDICTED if c not in records else EXPLAINED if totals[r, 0] > 0 else NO_POSITIVE
              for r, c in enumerate(rows)]
    return SegmentMatrix(
        rows=segment_names(rows, class_names), row_classes=rows, columns=segment_names(column_labels, class_names),
        column_labels=column_labels, shares=shares, positive=positive, negative=negative, status=status,
        method=attribution.name, options=attribution.options(),
        segmentation="predicted" if segmentation is None else "given",
        explanations=[records.get(c) for c in rows], passes=passes, seconds=time.perf_counter() - started, case=case,
        extras={"per_target": per_target, "segment_batch_size": batch, "device": device_name, "dtype": dtype_name})
