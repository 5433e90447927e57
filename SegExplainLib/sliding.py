"""Sliding-window inference as a module, so that every explanation method sees the whole-volume network.

Networks trained on patches (nnU-Net style) are run on overlapping patches whose logits are blended with a Gaussian
weight. :class:`SlidingWindow` does this inside ``forward`` with operations LRP propagates exactly: slicing the
input (a copy), the network, a product with a constant weight, and sums into the output. Relevance of a voxel seen by
several patches is therefore the blend of what each patch's network saw.

Example:
    >>> whole = SlidingWindow(unet, patch_size=(32, 96, 96), overlap=0.5)
    >>> explain(whole, image, PredictedRegion(class_index=1), "lrp")
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from .errors import SegExplainError


def _starts(size: int, patch: int, step: int) -> list[int]:
    """Patch starts covering ``[0, size)``; the last patch is aligned to the end."""
    if size <= patch:
        return [0]
    starts = list(range(0, size - patch, step))
    return [*starts, size - patch]


class SlidingWindow(nn.Module):
    """Run ``network`` on overlapping patches and blend their logits with a Gaussian weight.

    Args:
        network: A segmentation network returning logits of its input's spatial size.
        patch_size: Spatial patch size (D, H, W); axes of the volume smaller than the patch are taken whole.
        overlap: Fraction of a patch shared with its neighbour, in [0, 1).
        sigma_scale: Standard deviation of the Gaussian weight as a fraction of the patch size.
    """

    def __init__(self, network: nn.Module, patch_size: Sequence[int], *, overlap: float = 0.5,
                 sigma_scale: float = 0.125) -> None:
        super().__init__()
        patch = tuple(int(p) for p in patch_size)
        if len(patch) != 3 or min(patch) < 1:
            msg = f"patch_size must be three positive integers (D, H, W), got {tuple(patch_size)!r}"
            raise SegExplainError(msg)
        if not 0.0 <= overlap < 1.0:
            msg = f"overlap must lie in [0, 1), got {overlap!r}"
            raise SegExplainError(msg)
        if not sigma_scale > 0:
            msg = f"sigma_scale must be positive, got {sigma_scale!r}"
            raise SegExplainError(msg)
        self.network, self.patch_size, self.overlap, self.sigma_scale = network, patch, overlap, sigma_scale

    def _weight(self, patch: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        axes = []
        for size in patch:
            centre = (size - 1) / 2
            sigma = max(size * self.sigma_scale, 1e-3)
            coordinates = torch.arange(size, dtype=like.dtype, device=like.device)
            axes.append(torch.exp(-0.5 * ((coordinates - centre) / sigma) ** 2))
        weight = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
        return (weight / weight.max()).clamp(min=1e-3)  # no voxel with zero weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - documented in the class
        spatial = tuple(x.shape[2:])
        patch = tuple(min(p, s) for p, s in zip(self.patch_size, spatial))
        steps = [max(1, int(p * (1 - self.overlap))) for p in patch]
        weight = self._weight(patch, x)
        output, total = None, torch.zeros(spatial, dtype=x.dtype, device=x.device)
        for start in itertools.product(*(_starts(s, p, st) for s, p, st in zip(spatial, patch, steps))):
            window = tuple(slice(a, a + p) for a, p in zip(start, patch))
            logits = self.network(x[(slice(None), slice(None), *window)])
            if output is None:
                output = x.new_zeros((x.shape[0], logits.shape[1], *spatial))
            padding = [value for a, p, s in zip(reversed(start), reversed(patch), reversed(spatial))
                       for value in (a, s - a - p)]
            output = output + nn.functional.pad(logits * weight, padding)
            total[window] += weight
        return output / total
