"""The result of an explanation: the relevance maps and a record of everything needed to reproduce them."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .filters import AmplitudeFilter


def software_versions() -> dict[str, str]:
    """Versions of the packages that determine the numbers of an explanation."""
    import torch

    from ..version import __version__

    return {"segexplain": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


@dataclass
class Explanation:
    """Relevance maps on the image grid plus the record of how they were made.

    Attributes:
        maps: Relevance in the computation type, array (C, D, H, W): one map per input channel (MRI sequence), same grid as the image.
        method: Registry name of the method (``"lrp"``, ``"integrated_gradients"``, ...).
        options: Every option of the method, as passed to its constructor (composite, rules, steps, baseline...).
        target: The target's description: kind, class, aggregation, geometry.
        target_score: Sum of the class logits over the target region (what ``"sum"`` explains).
        region_voxels: Number of output voxels in the target region.
        expected_sum: What ``maps.sum()`` should equal by the method's sum rule (LRP conservation: the score; IG
            completeness: score minus baseline score; normalized aggregation: the number of contributing voxels);
            ``None`` for methods without a sum rule.
        delta: ``maps.sum() - expected_sum`` (the convergence delta), or ``None``.
        seconds: Wall-clock time of the computation.
        device: Device the model ran on, e.g. ``"cpu"`` or ``"cuda:0"``.
        dtype: Floating type of the computation.
        norm_statistics: Per kind of norm layer, the statistics it normalized with (``"running"``, ``"instance"``
            for input statistics, ``"group"``, ``"layer"``): the model runs as the user deployed it.
        warnings: Anything the user should know about this result (e.g. voxels left out of the normalization).
        standard_error: For a sampled normalized aggregation, the standard error of each map value.
        extras: Method- or aggregation-specific facts (e.g. samples drawn, voxels excluded).
        software: Package versions.
    """

    maps: np.ndarray
    method: str
    options: dict[str, Any]
    target: dict[str, Any]
    target_score: float
    region_voxels: int
    expected_sum: float | None
    delta: float | None
    seconds: float
    device: str
    dtype: str
    norm_statistics: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    standard_error: np.ndarray | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    software: dict[str, str] = field(default_factory=software_versions)

    @property
    def relative_delta(self) -> float | None:
        """``|delta| / |expected_sum|``: 0 for perfect conservation or completeness."""
        if self.delta is None or self.expected_sum is None:
            return None
        return abs(self.delta) / max(abs(self.expected_sum), 1e-30)

    def filtered(self, spec: AmplitudeFilter | str) -> np.ndarray:
        """The maps after a post-hoc amplitude filter, e.g. ``"pass:0.4"`` or ``"clamp:0.2"`` (Tjoa et al.)."""
        amplitude_filter = spec if isinstance(spec, AmplitudeFilter) else AmplitudeFilter.parse(spec)
        return amplitude_filter(self.maps)

    def record(self) -> dict[str, Any]:
        """Everything but the arrays, as JSON-friendly values (what ``summary.json`` and node attributes hold)."""
        record = {k: v for k, v in asdict(self).items() if k not in ("maps", "standard_error")}
        record["relative_delta"] = self.relative_delta
        record["map_shape"] = list(self.maps.shape)
        return record

    def to_json(self, **kwargs: Any) -> str:
        """The record as JSON text."""
        return json.dumps(self.record(), **kwargs)
