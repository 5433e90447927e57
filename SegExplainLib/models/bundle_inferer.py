"""A MONAI bundle's inferer as SegExplain's sliding window: the inferer's options, MONAI's window positions and
importance map, never the inferer itself."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import SegExplainError
from .bundle_safety import allowed_targets
from .sliding import PAD_MODES, SlidingWindow

__all__ = ["WINDOW_OPTIONS", "bundle_sliding_window", "read_inferer"]

#: The options of a SlidingWindowInferer that change its result, which SegExplain's sliding window follows (the
#: others place it on devices or buffer it).
WINDOW_OPTIONS = ("roi_size", "sw_batch_size", "overlap", "mode", "sigma_scale", "padding_mode", "cval", "with_coord")


def read_inferer(parser: Any, source: str) -> tuple[type | None, list[str]]:
    """The class of the bundle's inferer (None without one) and the ids of the options SegExplain reads from it.

    The inferer is never built: SegExplain runs its own sliding window with the bundle's options, so the inferer's
    device and buffering arguments need no trust.
    """
    from monai.inferers import SimpleInferer, SlidingWindowInferer, SlidingWindowInfererAdapt

    if "inferer" not in parser:
        return None, []
    raw = parser["inferer"]
    found = allowed_targets().get(raw.get("_target_")) if isinstance(raw, dict) else None
    if found not in (SimpleInferer, SlidingWindowInferer, SlidingWindowInfererAdapt):  # not SliceInferer's 2D slices
        target = raw.get("_target_") if isinstance(raw, dict) else raw
        raise SegExplainError(f"{source}: the inferer {target!r} is not supported; expected monai.inferers' "
                              "SimpleInferer, SlidingWindowInferer or SlidingWindowInfererAdapt")
    if found is SimpleInferer:
        return found, []
    if "roi_size" not in raw:
        raise SegExplainError(f"{source}: the {found.__name__} has no roi_size; expected the patch size")
    return found, [f"inferer::{k}" for k in WINDOW_OPTIONS if k in raw]


def _window_starts(grid: tuple[int, ...], patch: tuple[int, ...], *, overlap: tuple[float, ...]) -> list[list[int]]:
    """The window starts of MONAI's ``sliding_window_inference`` per axis of the (padded) ``grid``: its scan interval
    (the whole patch where it spans the axis, else ``int(patch * (1 - overlap))``, at least 1) through MONAI's own
    ``dense_patch_slices``."""
    from monai.data.utils import dense_patch_slices

    interval = [p if p == g else max(int(p * (1 - o)), 1) for g, p, o in zip(grid, patch, overlap)]
    windows = dense_patch_slices(grid, patch, interval)
    return [sorted({int(window[axis].start) for window in windows}) for axis in range(len(grid))]


def bundle_sliding_window(inferer: dict[str, Any] | None, network: nn.Module,
                    spatial: tuple[int, ...]) -> tuple[nn.Module, dict[str, Any]]:
    """The network as the bundle's inferer runs it on a volume of ``spatial`` size, and a record of how.

    MONAI's ``sliding_window_inference``: axes shorter than ``roi_size`` padded (``padding_mode``, ``cval``, half the
    difference rounded down before), windows placed as :func:`_window_starts`, ``sw_batch_size`` of them per call,
    blended with MONAI's ``compute_importance_map`` (``mode`` constant or gaussian, ``sigma_scale``), the output
    cropped back to ``spatial``.
    """
    from monai.data.utils import compute_importance_map

    if inferer is None or "roi_size" not in inferer:
        return network, {"inferer": None if inferer is None else inferer["class"]}
    name = inferer["class"]

    def per_axis(option: str) -> tuple[float, ...]:
        values = np.atleast_1d(np.asarray(inferer[option], dtype=float))
        if values.size not in (1, len(spatial)):
            raise SegExplainError(f"the bundle's {name} has {option}={inferer[option]!r}; expected one value or one "
                                  f"per axis ({len(spatial)})")
        return tuple(float(v) for v in np.broadcast_to(values, (len(spatial),)))

    roi = np.broadcast_to(np.asarray(inferer["roi_size"]), (len(spatial),))
    patch = tuple(int(r) if r > 0 else s for r, s in zip(roi, spatial))  # MONAI: non-positive means the whole axis
    overlap, sigma_scale = per_axis("overlap"), per_axis("sigma_scale")
    if not all(0 <= o < 1 for o in overlap):
        raise SegExplainError(f"the bundle's {name} has overlap={inferer['overlap']!r}; expected values in [0, 1)")
    mode, padding_mode, batch = inferer["mode"], inferer["padding_mode"], inferer["sw_batch_size"]
    if mode not in ("constant", "gaussian"):
        raise SegExplainError(f"the bundle's {name} has mode={mode!r}; expected 'constant' or 'gaussian'")
    if padding_mode not in PAD_MODES:
        raise SegExplainError(f"the bundle's {name} has padding_mode={padding_mode!r}; expected one of "
                              f"{', '.join(PAD_MODES)}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise SegExplainError(f"the bundle's {name} has sw_batch_size={batch!r}; expected a positive integer")
    if inferer["with_coord"]:
        raise SegExplainError(f"the bundle's {name} has with_coord=True: it calls the network with each window's "
                              "coordinates, which SegExplain's sliding window does not pass")
    weight = compute_importance_map(patch, mode=mode, sigma_scale=sigma_scale, dtype=torch.float32)
    window = SlidingWindow(network, patch, positions=functools.partial(_window_starts, overlap=overlap),
                           weight=weight, pad_to_patch=True, pad_mode=padding_mode, pad_value=float(inferer["cval"]),
                           batch_size=batch)
    before = [(p - s) // 2 if s < p else 0 for p, s in zip(patch, spatial)]
    after = [max(p - s, 0) - b for p, s, b in zip(patch, spatial, before)]
    padded = {"before": before, "after": after, "mode": padding_mode,
              **({"value": float(inferer["cval"])} if padding_mode == "constant" else {})}
    return window, {"inferer": name, "patch_size": list(patch), "sw_batch_size": batch, "overlap": list(overlap),
                    "blending": mode, **({"sigma_scale": list(sigma_scale)} if mode == "gaussian" else {}),
                    "window_padding": padded if any(before) or any(after) else None}
