"""RISE in 3D: random masks weighted by the score of the input they keep."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import SegExplainError
from ..baselines import Baseline
from ..checks import check_triple, is_int
from ..gradients.passes import baseline_of, check_inputs, check_seed, coerce_baseline, set_batching
from ..method import AttributionMethod, AttributionOutput
from .passes import masked_scores


class Rise(AttributionMethod):
    """RISE (Petsiuk et al. 2018) in 3D: the saliency of a voxel is the mean score of random masks that keep it.

    Each mask is a low-resolution grid of ``mask_resolution`` cells, each kept with probability
    ``keep_probability``, upsampled trilinearly (``align_corners=False``) to ``(resolution + 1)`` cells of
    ``ceil(size / resolution)`` voxels and cut at a random shift of up to one cell, so that mask edges fall anywhere.
    Where a mask is below 1 the input is blended towards the baseline. The saliency is ``sum_i score_i * M_i / (N *
    p)``: a Monte-Carlo estimate of the expected score given that the voxel is kept. It has no sum rule and is one
    map for all channels: the map repeats ``saliency / C`` over the ``C`` input channels (as Grad-CAM's), so that
    summing over channels gives the saliency. Linear in the seed. Cost: ``n_masks`` forward passes.

    Args:
        n_masks: Number of random masks.
        mask_resolution: Cells of the low-resolution grid, an int or ``(D, H, W)``, each at most the image's size.
        keep_probability: Probability that a cell is kept, in (0, 1).
        seed: Seed of the masks.
        baseline: What a masked voxel becomes (default ``"zero"``).
        internal_batch_size, memory_budget_bytes: As for
            :class:`~SegExplainLib.engine.gradients.IntegratedGradients`.
    """

    name = "rise"
    linear_in_seed = True
    seed_local = True

    def __init__(self, *, n_masks: int = 500, mask_resolution: int | Sequence[int] = 6,
                 keep_probability: float = 0.5, seed: int = 0, baseline: Baseline | str | float = "zero",
                 internal_batch_size: int | None = None, memory_budget_bytes: int | None = None) -> None:
        if not is_int(n_masks) or n_masks < 1:
            raise SegExplainError(f"n_masks must be an integer >= 1, got {n_masks!r}")
        self.mask_resolution = check_triple(mask_resolution, "mask_resolution")
        p = keep_probability
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1:
            raise SegExplainError(f"keep_probability must be a number in (0, 1), got {keep_probability!r}")
        if not is_int(seed) or seed < 0:
            raise SegExplainError(f"seed must be an integer >= 0, got {seed!r}")
        self.n_masks, self.keep_probability, self.seed = int(n_masks), float(p), int(seed)
        self.baseline = coerce_baseline(baseline)
        set_batching(self, internal_batch_size, memory_budget_bytes)

    def masks(self, spatial: Sequence[int], dtype: torch.dtype, device: torch.device) -> Any:
        """``masks(index)``: the masks ``(len(index), 1, *spatial)`` of the given numbers, drawn from ``seed``."""
        if any(r > s for r, s in zip(self.mask_resolution, spatial)):
            raise SegExplainError(f"mask_resolution {list(self.mask_resolution)} must not exceed the image's size "
                                  f"{tuple(spatial)} along any axis")
        generator = torch.Generator().manual_seed(self.seed)
        grids = torch.rand((self.n_masks, 1, *self.mask_resolution), generator=generator) < self.keep_probability
        cells = [-(-s // r) for s, r in zip(spatial, self.mask_resolution)]
        shifts = torch.stack([torch.randint(0, c, (self.n_masks,), generator=generator) for c in cells], dim=1)
        grids, shifts = grids.to(device=device, dtype=dtype), shifts.tolist()
        upsampled = [(r + 1) * c for r, c in zip(self.mask_resolution, cells)]

        def masks(index: torch.Tensor) -> torch.Tensor:
            large = F.interpolate(grids[index], size=upsampled, mode="trilinear", align_corners=False)
            return torch.stack([large[i][(slice(None), *(slice(s, s + n) for s, n in zip(shifts[j], spatial)))]
                                for i, j in enumerate(index.tolist())])

        return masks

    def attribute(self, model: torch.nn.Module, inputs: torch.Tensor, seed: torch.Tensor) -> AttributionOutput:
        x = check_inputs(inputs)
        seed = check_seed(seed, x)
        x0 = baseline_of(x, self.baseline)
        masks = self.masks(x.shape[2:], x.dtype, x.device)
        scores = masked_scores(self, model, x, x0, seed, self.n_masks, masks)  # (B, N)
        saliency = torch.zeros((x.shape[0], *x.shape[2:]), dtype=x.dtype, device=x.device)
        for rows in range(0, self.n_masks, 64):  # masks rebuilt in chunks: N full-size masks need not fit at once
            index = torch.arange(rows, min(rows + 64, self.n_masks), device=x.device)
            saliency = saliency + torch.einsum("bn,ndhw->bdhw", scores[:, index], masks(index)[:, 0])
        saliency = saliency / (self.n_masks * self.keep_probability)
        channels = x.shape[1]
        maps = (saliency[:, None] / channels).expand(-1, channels, -1, -1, -1).contiguous()
        return AttributionOutput(maps=maps, extras={"forward_passes": x.shape[0] * self.n_masks,
                                                    "internal_batch_size": self.last_internal_batch_size})

    def options(self) -> dict[str, Any]:
        return {"n_masks": self.n_masks, "mask_resolution": list(self.mask_resolution),
                "keep_probability": self.keep_probability, "seed": self.seed, "baseline": self.baseline.to_dict(),
                "internal_batch_size": self.internal_batch_size, "memory_budget_bytes": self.memory_budget_bytes}
