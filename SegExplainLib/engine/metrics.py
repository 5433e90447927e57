"""Scores of explanation maps: inclusivity (Tjoa et al. 2020), relevance shares, alpha sweeps and faithfulness curves.

Maps are ``(C, D, H, W)`` with one relevance channel per input MRI sequence. Every function takes numpy arrays or
torch tensors (converted with ``.detach().cpu().numpy()``) and returns numpy arrays or floats.

Example:
    Which of the T1, T2 and FLAIR channels carries the positive evidence for a tumour segment::

        shares = relevance_shares(maps)                       # e.g. array([0.2, 0.1, 0.7])
        hits = ground_truth_inclusivity(maps, tumour_mask)    # how much of the mask the relevance covers
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from ..errors import SegExplainError
from .checks import check_choice
from .filters import AmplitudeFilter

__all__ = [
    "PerturbationCurve",
    "PerturbationMode",
    "RelevanceKind",
    "alpha_sweep",
    "binarize",
    "ground_truth_inclusivity",
    "inclusivity",
    "input_inclusivity",
    "perturbation_curve",
    "relevance_mass_in_region",
    "relevance_shares",
    "shares_by_name",
]

RelevanceKind = Literal["positive", "negative", "absolute"]
PerturbationMode = Literal["deletion", "insertion"]
MapLike = np.ndarray | torch.Tensor

_SPATIAL = (1, 2, 3)


def _as_array(x: object, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        # numpy has no bfloat16.
        x = x.float() if x.dtype == torch.bfloat16 else x
    array = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if array.dtype.kind not in "biuf":
        raise SegExplainError(f"{name} must hold real numbers or booleans, got dtype {array.dtype}")
    return array


def _as_maps(x: object, name: str) -> np.ndarray:
    array = _as_array(x, name)
    if array.ndim != 4:
        raise SegExplainError(f"{name} must be shaped (C, D, H, W), got shape {array.shape}")
    return array


def _as_mask(x: object, name: str, shape: tuple[int, ...]) -> np.ndarray:
    # Label maps (uint8 0/1, float 0/1) are common for ground truth: any nonzero voxel is inside.
    mask = _as_array(x, name).astype(bool)
    if mask.shape != shape:
        raise SegExplainError(f"{name} shape {mask.shape} does not match the spatial shape {shape} of the maps")
    return mask


def _check_same_shape(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise SegExplainError(f"{names[0]} shape {a.shape} does not match {names[1]} shape {b.shape}")


def _check_real(value: object, name: str, *, minimum: float | None = None) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise SegExplainError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise SegExplainError(f"{name} must be >= {minimum}, got {value!r}")
    return float(value)


def _check_count(value: object, name: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise SegExplainError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _channel_inclusivity(a: np.ndarray, b: np.ndarray, smoothing: float, names: Sequence[str]) -> np.ndarray:
    """``|a_c ∩ b_c| / (|b_c| + smoothing)`` for every index ``c`` of the first axis; ``names[c]`` names ``b_c``."""
    axes = tuple(range(1, a.ndim))
    size = b.sum(axis=axes)
    if smoothing == 0.0:
        empty = np.flatnonzero(size == 0)
        if empty.size:
            raise SegExplainError(f"{names[empty[0]]} is empty, so its inclusivity is undefined; pass smoothing > 0")
    return (a & b).sum(axis=axes) / (size + smoothing)


def inclusivity(a: MapLike, b: MapLike, *, smoothing: float = 0.0) -> float:
    """Inclusivity of ``b`` in ``a``, ``D(a, b) = |a ∩ b| / (|b| + smoothing)``: 1.0 when ``b`` lies inside ``a``.

    Args:
        a: Boolean mask, e.g. the voxels with positive relevance.
        b: Boolean mask of the same shape, e.g. the lesion in the ground truth.
        smoothing: Added to ``|b|``; must be > 0 to score an empty ``b`` (as 0.0).

    Returns:
        The score in ``[0, 1]``.

    Example:
        >>> relevant = np.array([True, True, False, False])   # voxels the LRP map marks
        >>> lesion = np.array([True, False, False, False])    # stroke lesion in the ground truth
        >>> inclusivity(relevant, lesion)
        1.0
    """
    smoothing = _check_real(smoothing, "smoothing", minimum=0.0)
    a_mask, b_mask = _as_array(a, "a"), _as_array(b, "b")
    for mask, name in ((a_mask, "a"), (b_mask, "b")):
        # Casting a relevance map to bool would count negative relevance as inside: ask for binarize instead.
        if mask.dtype != bool:
            raise SegExplainError(f"{name} must be a boolean mask (see binarize), got dtype {mask.dtype}")
    _check_same_shape(a_mask, b_mask, ("a", "b"))
    return float(_channel_inclusivity(a_mask[None], b_mask[None], smoothing, ["b"])[0])


def binarize(x: MapLike, *, threshold: float = 0.0) -> np.ndarray:
    """Boolean mask ``x > threshold``.

    Example:
        >>> binarize(np.array([-0.2, 0.0, 0.3]))              # voxels with positive relevance
        array([False, False,  True])
    """
    threshold = _check_real(threshold, "threshold")
    return _as_array(x, "x") > threshold


def input_inclusivity(
    relevance: MapLike,
    image: MapLike,
    *,
    relevance_threshold: float = 0.0,
    image_threshold: float | None = None,
    smoothing: float = 0.0,
) -> np.ndarray:
    """Per channel, the inclusivity of the image foreground in the relevant voxels.

    ``D(binarize(relevance_c, relevance_threshold), binarize(image_c, threshold_c))`` for each channel ``c``.

    Args:
        relevance: Map ``(C, D, H, W)``.
        image: The explained input, same shape, e.g. the T1 and FLAIR volumes.
        relevance_threshold: Relevance above it counts as relevant.
        image_threshold: Intensity above it counts as foreground; ``None`` uses each channel's mean intensity, so
            the foreground is the above-mean voxels (the head rather than the background air).
        smoothing: See :func:`inclusivity`.

    Returns:
        One score per channel, shape ``(C,)``.

    Example:
        >>> flair = np.array([0.0, 0.0, 5.0, 7.0]).reshape(1, 1, 1, 4)
        >>> lrp = np.array([0.0, 0.1, 0.2, 0.3]).reshape(1, 1, 1, 4)
        >>> input_inclusivity(lrp, flair)                     # the whole head is relevant
        array([1.])
    """
    relevance_threshold = _check_real(relevance_threshold, "relevance_threshold")
    smoothing = _check_real(smoothing, "smoothing", minimum=0.0)
    relevance_maps, image_maps = _as_maps(relevance, "relevance"), _as_maps(image, "image")
    _check_same_shape(relevance_maps, image_maps, ("relevance", "image"))
    if image_threshold is None:
        image_thresholds = image_maps.mean(axis=_SPATIAL, keepdims=True)
    else:
        image_thresholds = _check_real(image_threshold, "image_threshold")
    foreground = image_maps > image_thresholds
    names = [f"the foreground of image channel {c}" for c in range(len(image_maps))]
    return _channel_inclusivity(relevance_maps > relevance_threshold, foreground, smoothing, names)


def ground_truth_inclusivity(
    relevance: MapLike,
    ground_truth: MapLike,
    *,
    relevance_threshold: float = 0.0,
    smoothing: float = 0.0,
) -> np.ndarray:
    """Per channel, the inclusivity of the ground-truth segment in the relevant voxels.

    Args:
        relevance: Map ``(C, D, H, W)``.
        ground_truth: Mask ``(D, H, W)``; any nonzero voxel is inside (a 0/1 label map works as is).
        relevance_threshold: Relevance above it counts as relevant.
        smoothing: See :func:`inclusivity`.

    Returns:
        One score per channel, shape ``(C,)``.

    Example:
        >>> lesion = np.array([0, 1, 1, 0]).reshape(1, 1, 4)
        >>> dwi_adc = np.array([[0.0, 0.5, 0.2, 0.0], [0.0, 0.5, -0.1, 0.3]]).reshape(2, 1, 1, 4)
        >>> ground_truth_inclusivity(dwi_adc, lesion)         # ADC misses half of the lesion
        array([1. , 0.5])
    """
    relevance_threshold = _check_real(relevance_threshold, "relevance_threshold")
    smoothing = _check_real(smoothing, "smoothing", minimum=0.0)
    relevance_maps = _as_maps(relevance, "relevance")
    mask = _as_mask(ground_truth, "ground_truth", relevance_maps.shape[1:])
    masks = np.broadcast_to(mask, relevance_maps.shape)
    names = ["ground_truth"] * len(relevance_maps)
    return _channel_inclusivity(relevance_maps > relevance_threshold, masks, smoothing, names)


def _relevance_part(maps: np.ndarray, kind: RelevanceKind) -> np.ndarray:
    # In the maps' type: the callers sum it in float64 (accurate over millions of float32 voxels, no float64 copy).
    if kind == "positive":
        return np.maximum(maps, 0.0)
    if kind == "negative":
        return np.maximum(-maps, 0.0)
    return np.abs(maps)


def relevance_shares(maps: MapLike, *, kind: RelevanceKind = "positive") -> np.ndarray:
    """Share of each channel in the total positive, negative or absolute relevance.

    Args:
        maps: Map ``(C, D, H, W)``.
        kind: ``"positive"`` sums ``max(r, 0)``, ``"negative"`` sums ``max(-r, 0)``, ``"absolute"`` sums ``|r|``.

    Returns:
        Shares ``(C,)`` summing to 1, or all zeros when the total is zero.

    Example:
        >>> t1_flair = np.array([1.0, -2.0, 3.0, 0.0]).reshape(2, 1, 1, 2)
        >>> relevance_shares(t1_flair)                        # FLAIR carries 3/4 of the positive evidence
        array([0.25, 0.75])
    """
    check_choice(kind, "kind", RelevanceKind)
    per_channel = _relevance_part(_as_maps(maps, "maps"), kind).sum(axis=_SPATIAL, dtype=np.float64)
    total = per_channel.sum()
    return per_channel / total if total > 0 else np.zeros_like(per_channel)


def shares_by_name(maps: MapLike, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Every kind of share (:func:`relevance_shares`) per sequence name, as ``summary.json`` records them.

    Example:
        >>> t1_flair = np.array([1.0, -2.0, 3.0, 0.0]).reshape(2, 1, 1, 2)
        >>> shares_by_name(t1_flair, ["T1", "FLAIR"])["positive"]
        {'T1': 0.25, 'FLAIR': 0.75}
    """
    return {kind: dict(zip(names, relevance_shares(maps, kind=kind).tolist())) for kind in get_args(RelevanceKind)}


def alpha_sweep(maps: MapLike, filters: Sequence[AmplitudeFilter]) -> np.ndarray:
    """Mean of each filtered, normalized channel for a series of filters (Tjoa et al. 2020, figure 5D).

    Each channel is normalized by its ``max|r|`` (``f1 = f / N``, an all-zero channel stays zero) and the result
    is the spatial mean of ``P[f1]``.

    Args:
        maps: Map ``(C, D, H, W)``.
        filters: The filters to sweep, e.g. ``pass:0,0.1``, ``pass:0.1,0.2``, ... ``pass:0.9,1``.

    Returns:
        Shape ``(len(filters), C)``.

    Example:
        >>> bands = [AmplitudeFilter.create("pass", (i / 10, (i + 1) / 10)) for i in range(10)]
        >>> dwi_adc = np.random.default_rng(0).normal(size=(2, 4, 4, 4))
        >>> alpha_sweep(dwi_adc, bands).shape
        (10, 2)
    """
    if not isinstance(filters, Sequence) or isinstance(filters, str):
        raise SegExplainError(f"filters must be a sequence of AmplitudeFilter, got {type(filters).__name__}")
    for index, amplitude_filter in enumerate(filters):
        if not isinstance(amplitude_filter, AmplitudeFilter):
            raise SegExplainError(
                f"filters[{index}] must be an AmplitudeFilter, got {type(amplitude_filter).__name__}"
            )
    normalized = _as_maps(maps, "maps").astype(np.float64)
    norm = np.abs(normalized).max(axis=_SPATIAL, keepdims=True)
    normalized /= np.where(norm > 0, norm, 1.0)
    # The filter's own N of a normalized channel is 1 (or 0), so it returns P[f1] as it is.
    sweep = [amplitude_filter(normalized).mean(axis=_SPATIAL) for amplitude_filter in filters]
    return np.array(sweep, dtype=np.float64).reshape(len(sweep), len(normalized))


def relevance_mass_in_region(maps: MapLike, region: MapLike, *, kind: RelevanceKind = "positive") -> float:
    """Fraction of the relevance, summed over channels, that lies inside a region.

    Args:
        maps: Map ``(C, D, H, W)``.
        region: Mask ``(D, H, W)``, e.g. the segmented lesion; any nonzero voxel is inside.
        kind: Which relevance to count, see :func:`relevance_shares`.

    Returns:
        A fraction in ``[0, 1]``; 0.0 when there is no relevance of that kind at all.

    Example:
        >>> lesion = np.array([True, False]).reshape(1, 1, 2)
        >>> t1_flair = np.array([3.0, 1.0, 0.0, -5.0]).reshape(2, 1, 1, 2)
        >>> relevance_mass_in_region(t1_flair, lesion)
        0.75
    """
    check_choice(kind, "kind", RelevanceKind)
    relevance = _as_maps(maps, "maps")
    mask = _as_mask(region, "region", relevance.shape[1:])
    per_voxel = _relevance_part(relevance, kind).sum(axis=0, dtype=np.float64)
    total = per_voxel.sum()
    return float(per_voxel[mask].sum() / total) if total > 0 else 0.0


@dataclass(frozen=True, eq=False)
class PerturbationCurve:
    """Model score while the most relevant image entries are deleted or inserted.

    Attributes:
        fractions: The perturbed fractions ``0, 1/steps, ..., 1``.
        scores: The score at each fraction.
        mode: ``"deletion"`` or ``"insertion"``.
    """

    fractions: np.ndarray
    scores: np.ndarray
    mode: PerturbationMode

    @property
    def area(self) -> float:
        """Trapezoidal area under the curve: low is faithful for deletion, high for insertion."""
        return float(np.sum((self.scores[1:] + self.scores[:-1]) * np.diff(self.fractions)) / 2.0)


def perturbation_curve(
    score_fn: Callable[[np.ndarray], MapLike],
    image: MapLike,
    maps: MapLike,
    *,
    mode: PerturbationMode = "deletion",
    steps: int = 10,
    baseline: float | MapLike = 0.0,
    batch_size: int = 4,
) -> PerturbationCurve:
    """Faithfulness curve: perturb the image entries in order of decreasing relevance and score the model.

    Every voxel of every channel is one entry; entries are ranked by relevance, descending, ties keeping their
    flat (C, D, H, W) order. At fraction ``i / steps`` the top ``floor(i * n / steps)`` of the ``n`` entries are
    perturbed: deletion replaces them by the baseline, insertion starts from the baseline image and restores them.

    Args:
        score_fn: Takes a batch ``(n, C, D, H, W)`` and returns ``n`` scores, e.g. the mean tumour logit.
        image: The explained input ``(C, D, H, W)``; a non-float image is converted to float64.
        maps: Its relevance map, same shape.
        mode: ``"deletion"`` or ``"insertion"``.
        steps: Number of fraction steps; the curve has ``steps + 1`` points.
        baseline: Scalar or array broadcastable to the image, e.g. each sequence's minimum shaped ``(C, 1, 1, 1)``.
        batch_size: How many perturbed images go to ``score_fn`` at once.

    Returns:
        The curve.

    Example:
        >>> t1_flair = np.ones((2, 4, 4, 4))
        >>> curve = perturbation_curve(lambda x: x.sum(axis=(1, 2, 3, 4)), t1_flair, t1_flair, steps=4)
        >>> curve.scores
        array([128.,  96.,  64.,  32.,   0.])
    """
    if not callable(score_fn):
        raise SegExplainError(f"score_fn must be callable, got {type(score_fn).__name__}")
    check_choice(mode, "mode", PerturbationMode)
    steps = _check_count(steps, "steps")
    batch_size = _check_count(batch_size, "batch_size")
    start = _as_maps(image, "image")
    if start.dtype.kind != "f":
        start = start.astype(np.float64)
    relevance = _as_maps(maps, "maps")
    _check_same_shape(relevance, start, ("maps", "image"))
    baseline_array = _as_array(baseline, "baseline")
    try:
        replacement = np.broadcast_to(baseline_array, start.shape).astype(start.dtype)
    except ValueError:
        raise SegExplainError(
            f"baseline shape {baseline_array.shape} does not broadcast to the image shape {start.shape}"
        ) from None
    if mode == "insertion":
        start, replacement = replacement, start
    # Negating a float copy gives a descending order in which a stable sort keeps ties in flat order.
    order = np.argsort(-relevance.astype(np.float64).ravel(), kind="stable")
    count = start.size

    def perturbed(step: int) -> np.ndarray:
        flat = start.copy().ravel()
        top = order[: step * count // steps]
        flat[top] = replacement.ravel()[top]
        return flat.reshape(start.shape)

    scores = []
    for first in range(0, steps + 1, batch_size):
        batch = np.stack([perturbed(step) for step in range(first, min(first + batch_size, steps + 1))])
        batch_scores = _as_array(score_fn(batch), "score_fn output")
        if batch_scores.shape != (len(batch),):
            raise SegExplainError(
                f"score_fn must return shape ({len(batch)},) for a batch of {len(batch)}, got {batch_scores.shape}"
            )
        scores.append(batch_scores.astype(np.float64))
    return PerturbationCurve(np.arange(steps + 1) / steps, np.concatenate(scores), mode)
