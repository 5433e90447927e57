"""The intensity normalization of every sequence, as a model card states it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ...errors import SegExplainError

#: Intensity normalizations that :func:`normalize` applies.
NORMALIZATION_KINDS = ("zscore", "percentile", "window", "none")

def _check_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SegExplainError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _check_norm_spec(spec: Any, where: str) -> dict[str, Any]:
    """Validate one normalization spec and return it with defaults filled in."""
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise SegExplainError(f"{where} must be a mapping with a 'kind' ({', '.join(NORMALIZATION_KINDS)}), got {spec!r}")
    kind = spec["kind"]
    if kind not in NORMALIZATION_KINDS:
        raise SegExplainError(f"{where} kind must be one of {', '.join(NORMALIZATION_KINDS)}, got {kind!r}")
    allowed = {"kind", "low", "high"} if kind in ("percentile", "window") else {"kind"}
    unknown = sorted(str(k) for k in spec if k not in allowed)
    if unknown:
        raise SegExplainError(
            f"{where} of kind {kind!r} has unknown key(s) {', '.join(unknown)}; expected only {', '.join(sorted(allowed))}"
        )
    if kind == "percentile":
        low = _check_number(spec.get("low", 0.5), f"{where} low")
        high = _check_number(spec.get("high", 99.5), f"{where} high")
        if not 0.0 <= low < high <= 100.0:
            raise SegExplainError(f"{where} percentiles must satisfy 0 <= low < high <= 100, got low={low}, high={high}")
        return {"kind": kind, "low": low, "high": high}
    if kind == "window":
        if "low" not in spec or "high" not in spec:
            raise SegExplainError(f"{where} of kind 'window' needs both low and high, got {dict(spec)!r}")
        low = _check_number(spec["low"], f"{where} low")
        high = _check_number(spec["high"], f"{where} high")
        if not low < high:
            raise SegExplainError(f"{where} window must satisfy low < high, got low={low}, high={high}")
        return {"kind": kind, "low": low, "high": high}
    return {"kind": kind}


def check_normalization(specs: Any, where: str) -> dict[str, Any] | list[dict[str, Any]]:
    if isinstance(specs, Mapping):
        return _check_norm_spec(specs, where)
    if isinstance(specs, (list, tuple)) and specs:
        return [_check_norm_spec(s, f"{where}[{i}]") for i, s in enumerate(specs)]
    raise SegExplainError(f"{where} must be one spec or a non-empty list of per-channel specs, got {specs!r}")


def _scale(channel: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:  # a constant channel: nothing to scale
        return np.zeros_like(channel)
    return (np.clip(channel, low, high) - low) / (high - low)


def normalize(image: np.ndarray, specs: Mapping[str, Any] | list[Mapping[str, Any]]) -> np.ndarray:
    """Normalize every channel of ``image`` by its spec.

    Kinds: ``{"kind": "zscore"}`` gives ``(x - mean) / std`` (zeros for a constant channel);
    ``{"kind": "percentile", "low": 0.5, "high": 99.5}`` clips to the channel's ``low``/``high`` percentiles and
    scales that range to ``[0, 1]`` (the defaults are 0.5 and 99.5); ``{"kind": "window", "low": L, "high": H}``
    clips to ``[L, H]`` and scales to ``[0, 1]``; ``{"kind": "none"}`` leaves the values as they are.

    Args:
        image: ``(C, *spatial)``, e.g. ``(C, D, H, W)``, one channel per MRI sequence; finite values.
        specs: One spec for every channel, or a list of ``C`` specs.

    Returns:
        A new array of ``image``'s shape; float arrays keep their dtype, other dtypes become float32.

    Raises:
        SegExplainError: ``image`` is not an array of at least 2 axes, has non-finite values, or the specs are
            invalid or not one per channel.
    """
    if not isinstance(image, np.ndarray) or image.ndim < 2:
        raise SegExplainError(
            f"image must be a numpy array (C, D, H, W), got {type(image).__name__} "
            f"{getattr(image, 'shape', '')}".rstrip()
        )
    if not (np.issubdtype(image.dtype, np.number) and not np.issubdtype(image.dtype, np.complexfloating)):
        raise SegExplainError(f"image must hold real numbers, got dtype {image.dtype}")
    checked = check_normalization(specs, "normalization")
    per_channel = checked if isinstance(checked, list) else [checked] * image.shape[0]
    if len(per_channel) != image.shape[0]:
        raise SegExplainError(
            f"normalization lists {len(per_channel)} specs but the image has {image.shape[0]} channels; expected one per channel"
        )
    out_dtype = image.dtype if np.issubdtype(image.dtype, np.floating) else np.dtype(np.float32)
    out = np.empty(image.shape, dtype=out_dtype)
    for c, spec in enumerate(per_channel):
        x = image[c].astype(np.float64)
        if not np.isfinite(x).all():
            raise SegExplainError(f"image channel {c} has NaN or infinite values; expected finite intensities")
        kind = spec["kind"]
        if kind == "zscore":
            std = x.std()
            y = (x - x.mean()) / std if std > 0 else np.zeros_like(x)
        elif kind == "percentile":
            low, high = np.percentile(x, [spec["low"], spec["high"]])
            y = _scale(x, float(low), float(high))
        elif kind == "window":
            y = _scale(x, spec["low"], spec["high"])
        else:
            y = x
        out[c] = y
    return out
