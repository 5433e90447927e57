"""The checks of the figures' arguments: arrays, axes, names, colour maps, spacing."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch

from ...errors import SegExplainError


def as_array(x: object, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.dtype == torch.bfloat16 else x  # numpy has no bfloat16
        array = x.numpy()
    else:
        try:
            array = np.asarray(x)
        except (TypeError, ValueError) as error:  # ragged lists
            raise SegExplainError(f"{name} must be an array of real numbers, got {type(x).__name__}") from error
    if array.dtype.kind not in "biuf":
        raise SegExplainError(f"{name} must hold real numbers, got dtype {array.dtype}")
    # NaN and infinity show in the minimum or the maximum: no boolean temporary the size of the array.
    if array.dtype.kind == "f" and array.size and not (np.isfinite(array.min()) and np.isfinite(array.max())):
        raise SegExplainError(f"{name} contains NaN or infinite values; expected finite numbers")
    return array


def check_axis(axis: object) -> int:
    if not isinstance(axis, numbers.Integral) or isinstance(axis, bool) or not 0 <= axis <= 2:
        raise SegExplainError(f"axis must be 0, 1 or 2 (a spatial axis of (D, H, W)), got {axis!r}")
    return int(axis)


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise SegExplainError(f"{name} must be True or False, got {value!r}")
    return value


def check_fraction(value: object, name: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise SegExplainError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_title(title: object) -> str | None:
    if title is not None and not isinstance(title, str):
        raise SegExplainError(f"title must be a string or None, got {title!r}")
    return title


def check_cmap(cmap: object) -> matplotlib.colors.Colormap:
    if not isinstance(cmap, str) or cmap not in matplotlib.colormaps:
        raise SegExplainError(f"cmap must be the name of a matplotlib colour map such as 'RdBu_r', got {cmap!r}")
    return matplotlib.colormaps[cmap]


def check_spacing(spacing: object) -> tuple[float, float, float] | None:
    if spacing is None:
        return None
    ok = isinstance(spacing, Sequence) and not isinstance(spacing, str) and len(spacing) == 3
    ok = ok and all(
        isinstance(s, numbers.Real) and not isinstance(s, bool) and math.isfinite(s) and s > 0 for s in spacing
    )
    if not ok:
        raise SegExplainError(f"spacing must be three positive voxel sizes (D, H, W), got {spacing!r}")
    return tuple(float(s) for s in spacing)  # type: ignore[return-value]


def check_names(names: object, count: int) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise SegExplainError(f"sequence_names must be a list of {count} strings, got {names!r}")
    if len(names) != count:
        raise SegExplainError(f"sequence_names has {len(names)} names for {count} sequences; expected one per channel")
    for name in names:
        if not isinstance(name, str):
            raise SegExplainError(f"sequence_names must hold strings, got {name!r}")
    return list(names)


def image_and_maps(image: object, maps: object, names: object) -> tuple[np.ndarray, np.ndarray, list[str]]:
    image_array = as_array(image, "image")
    maps_array = as_array(maps, "maps")
    if maps_array.ndim != 4:
        raise SegExplainError(f"maps must be shaped (C, D, H, W), got shape {maps_array.shape}")
    if image_array.shape != maps_array.shape:
        raise SegExplainError(
            f"image shape {image_array.shape} does not match maps shape {maps_array.shape}; expected the same (C, D, H, W)"
        )
    if maps_array.size == 0:
        raise SegExplainError(f"maps shape {maps_array.shape} is empty; expected at least one voxel per channel")
    return image_array, maps_array, check_names(names, maps_array.shape[0])
