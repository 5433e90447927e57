"""Faithfulness: deletion and insertion curves of the target score, over 3D blocks in the order of a map.

The image is cut into blocks of ``block_size`` voxels per side, one entry per block and sequence. A map orders the
entries by their summed relevance, most relevant first. The deletion curve replaces the top entries by a reference
image that keeps the image plausible (a blurred copy, or ROAD's noisy linear imputation), the insertion curve starts
from the reference and restores them; both are read at ``steps + 1`` fractions of the entries. Random orders give
the curves of "no better than random", computed once for every method.

The normalized score compares a curve's area ``A`` (the mean of the curve over the fractions, trapezoidal) with the
area ``R`` of a random order and the lowest and highest scores ``L`` and ``H`` that any step of any curve of the
scorecard reached (the image's and the reference's included: removing part of a lesion can score lower than
removing all of it):

* deletion: ``(R - A) / (R - L)``, at most 1, reached when the score falls to ``L`` at once;
* insertion: ``(A - R) / (H - R)``, at most 1, reached when the score rises to ``H`` at once;

both 0 when the map is no better than a random order, negative when it is worse. Each random seed gives one value;
the scorecard reports their mean and standard deviation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import SegExplainError
from ..baselines import make_baseline
from ..metrics import PerturbationMode

__all__ = ["ROAD", "Curves", "block_sums", "curves", "normalized_area", "random_orders", "reference_image",
           "score_range"]

#: The reference name of ROAD's noisy linear imputation (Rong et al. 2022).
ROAD = "road"
#: Jacobi sweeps of the imputation: the removed blocks are at most a few voxels wide, so the fill converges quickly.
_IMPUTATION_SWEEPS = 24


@dataclass(frozen=True, eq=False)
class Curves:
    """The deletion and insertion curves of one order: scores at ``fractions`` (``steps + 1`` values)."""

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray

    def area(self, mode: PerturbationMode) -> float:
        """The mean of the curve over the fractions (trapezoidal)."""
        scores = self.deletion if mode == "deletion" else self.insertion
        return float(np.sum((scores[1:] + scores[:-1]) * np.diff(self.fractions)) / 2.0)


def reference_image(x: torch.Tensor, reference: str) -> torch.Tensor:
    """The reference ``(1, C, D, H, W)`` of a removed voxel: a baseline (``blur:S``, ``min``, ``zero``...) or
    ``road`` (filled per mask by :func:`impute`, so here the image itself)."""
    if reference == ROAD:
        return x.clone()
    return make_baseline(reference)(x)


def _entry_mask(order: torch.Tensor, count: int, blocks: tuple[int, ...], shape: tuple[int, ...],
                block_size: int) -> torch.Tensor:
    """The voxels (C, D, H, W) of the first ``count`` entries of ``order`` (entries are channel x block)."""
    chosen = torch.zeros(int(np.prod(blocks)), dtype=torch.bool, device=order.device)
    chosen[order[:count]] = True
    full = chosen.reshape(blocks)
    for axis in range(1, 4):
        full = full.repeat_interleave(block_size, dim=axis)
    return full[:, :shape[1], :shape[2], :shape[3]]


def impute(x: torch.Tensor, removed: torch.Tensor, *, noise: float, generator: torch.Generator) -> torch.Tensor:
    """ROAD's noisy linear imputation: each removed voxel becomes the mean of its 6 neighbours (solved by Jacobi
    sweeps from the kept voxels), plus Gaussian noise of ``noise`` times each channel's standard deviation.

    Args:
        x: Images ``(B, C, D, H, W)``.
        removed: Boolean masks of the same shape.
        noise: Relative noise amplitude.
        generator: The seeded generator of the noise.
    """
    kernel = torch.zeros((1, 1, 3, 3, 3), dtype=x.dtype, device=x.device)
    kernel[0, 0, 1, 1, 0] = kernel[0, 0, 1, 1, 2] = kernel[0, 0, 1, 0, 1] = kernel[0, 0, 1, 2, 1] = 1.0
    kernel[0, 0, 0, 1, 1] = kernel[0, 0, 2, 1, 1] = 1.0
    flat = x.reshape(-1, 1, *x.shape[2:])
    mask = removed.reshape(flat.shape)
    kept = ~mask
    ones = torch.ones_like(flat)
    # replicate padding: the border's missing neighbours count as the border itself
    neighbours = F.conv3d(F.pad(ones, (1,) * 6, mode="replicate"), kernel)
    filled = torch.where(mask, flat.mean(dim=(2, 3, 4), keepdim=True).expand_as(flat), flat)
    for _ in range(_IMPUTATION_SWEEPS):
        mean = F.conv3d(F.pad(filled, (1,) * 6, mode="replicate"), kernel) / neighbours
        filled = torch.where(kept, flat, mean)
    spread = x.std(dim=(2, 3, 4), keepdim=True).reshape(-1, 1, 1, 1, 1)
    jitter = torch.randn(filled.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device) * spread
    return torch.where(mask, filled + noise * jitter, flat).reshape(x.shape)


def block_sums(maps: np.ndarray | torch.Tensor, block_size: int) -> np.ndarray:
    """The map ``(C, D, H, W)`` summed over blocks of ``block_size`` voxels per side (the last ones cut by the edge):
    ``(C, ceil(D / b), ceil(H / b), ceil(W / b))`` in float64."""
    tensor = torch.as_tensor(np.asarray(maps, dtype=np.float64))
    pad = [(-size) % block_size for size in tensor.shape[1:]]
    padded = F.pad(tensor, (0, pad[2], 0, pad[1], 0, pad[0]))
    return (F.avg_pool3d(padded[None], block_size, divisor_override=1)[0]).numpy()


def order_of(sums: np.ndarray) -> np.ndarray:
    """The entries (flat channel x block indices) by decreasing relevance; ties keep their flat order."""
    return np.argsort(-sums.ravel(), kind="stable")


def random_orders(entries: int, count: int, seed: int) -> list[np.ndarray]:
    """``count`` random orders of ``entries`` entries, seeded."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(entries) for _ in range(count)]


def curves(score: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, reference: torch.Tensor,
           orders: list[np.ndarray], *, block_size: int, steps: int, batch_size: int, road_noise: float | None = None,
           seed: int = 0, cancelled: Callable[[], bool] = lambda: False) -> list[Curves]:
    """The deletion and insertion curves of every order, all perturbed images batched together.

    Args:
        score: Scores a batch ``(B, C, D, H, W)``: ``(B,)``.
        x: The image ``(1, C, D, H, W)``.
        reference: What replaces a removed voxel, same shape (for ROAD the image; the fill is computed per mask).
        orders: Entry orders (:func:`order_of`, :func:`random_orders`).
        block_size: Voxels per block side.
        steps: Fraction steps; the curves have ``steps + 1`` points.
        batch_size: Perturbed images per forward pass.
        road_noise: ROAD's noise amplitude, or None for a plain reference.
        seed: Seed of ROAD's noise.
        cancelled: Asked between batches; when true, stops with a SegExplainError.
    """
    shape = tuple(x.shape[1:])
    blocks = (shape[0], *(-(-size // block_size) for size in shape[1:]))
    entries = int(np.prod(blocks))
    generator = torch.Generator().manual_seed(seed)
    # the ends are the same for every order (the image, the reference): scored once, as job None
    jobs = [None] + [(index, mode, step) for index in range(len(orders)) for mode in ("deletion", "insertion")
                     for step in range(1, steps)]
    scores = np.zeros(len(jobs) + 1)
    for first in range(0, len(jobs), batch_size):
        if cancelled():
            raise SegExplainError("the evaluation was cancelled")
        batch, masks = [], []
        for job in jobs[first:first + batch_size]:
            if job is None:
                removed = torch.zeros_like(x[0], dtype=torch.bool)
                masks += [removed, ~removed]
                batch += [x[0], reference[0]]
                continue
            index, mode, step = job
            count = step * entries // steps
            order = torch.as_tensor(orders[index], device=x.device)
            removed = _entry_mask(order, count if mode == "deletion" else entries, blocks, shape, block_size)
            if mode == "insertion":  # restore the first entries: everything but them is removed
                removed = removed & ~_entry_mask(order, count, blocks, shape, block_size)
            masks.append(removed)
            batch.append(torch.where(removed, reference[0], x[0]))
        stacked = torch.stack(batch)
        if road_noise is not None:
            stacked = impute(stacked, torch.stack(masks), noise=road_noise, generator=generator)
        offset = first + (first > 0)  # job None fills two places
        scores[offset:offset + len(batch)] = score(stacked).detach().cpu().double().numpy()
    image, removed_all = scores[0], scores[1]
    inner = scores[2:].reshape(len(orders), 2, steps - 1)
    fractions = np.arange(steps + 1) / steps
    return [Curves(fractions, np.concatenate([[image], deletion, [removed_all]]),
                   np.concatenate([[removed_all], insertion, [image]])) for deletion, insertion in inner]


def score_range(computed: list[Curves]) -> tuple[float, float]:
    """The lowest and highest target score of any step of any of the curves (the image and the reference included)."""
    scores = np.concatenate([np.concatenate([c.deletion, c.insertion]) for c in computed])
    return float(scores.min()), float(scores.max())


def normalized_area(curve: Curves, random: list[Curves], mode: PerturbationMode, *, low: float,
                    high: float) -> np.ndarray:
    """The normalized area of ``curve`` against each random order's (see the module docs): one value per order.

    Args:
        curve: The method's curves.
        random: The random orders' curves.
        mode: ``"deletion"`` or ``"insertion"``.
        low, high: The lowest and highest score any curve of the scorecard reached (:func:`score_range`).

    Raises:
        SegExplainError: The reference does not lower the target score, so no map can be told from random.
    """
    image, reference = curve.deletion[0], curve.insertion[0]
    if not image - reference > 1e-12 * max(1.0, abs(image)):
        msg = (f"the reference scores {reference:.4g}, the image {image:.4g}: the reference does not lower the "
               "target score, so no order of the voxels can be told from a random one; choose another reference")
        raise SegExplainError(msg)
    area = curve.area(mode)
    values = []
    for other in random:
        base = other.area(mode)
        values.append((base - area) / (base - low) if mode == "deletion" else (area - base) / (high - base))
    return np.array(values)
