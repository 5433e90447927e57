"""Robustness: max-sensitivity of a map under small input noise (Yeh et al. 2019).

``max_i ||m(x + n_i) - m(x)|| / ||m(x)||`` over ``n_perturbations`` draws of uniform noise ``n_i`` in
``[-r, r]`` per voxel, with ``r = noise_radius * (max(x) - min(x))`` (the image's intensity range), seeded. The region
explained stays the one of the unperturbed image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = ["max_sensitivity", "noisy_inputs"]


def noisy_inputs(x: torch.Tensor, count: int, radius: float, seed: int) -> list[torch.Tensor]:
    """``count`` copies of ``x`` with uniform noise of ``radius`` times the intensity range, seeded."""
    generator = torch.Generator().manual_seed(seed)
    span = float(x.max() - x.min()) or 1.0
    return [x + ((torch.rand(x.shape, generator=generator, dtype=torch.float64) * 2 - 1) * radius * span).to(x)
            for _ in range(count)]


def max_sensitivity(explain_at: Callable[[torch.Tensor], np.ndarray], maps: np.ndarray,
                    noisy: list[torch.Tensor]) -> float:
    """The largest relative change of the map over the noisy inputs (0.0 for an all-zero map that stays so)."""
    norm = float(np.linalg.norm(maps))
    changes = [float(np.linalg.norm(explain_at(x) - maps)) for x in noisy]
    if norm == 0.0:
        return 0.0 if max(changes) == 0.0 else float("inf")
    return max(changes) / norm
