"""Shapley values of supervoxels (regular 3D blocks), estimated by sampling permutations of the blocks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...errors import SegExplainError
from ..baselines import Baseline
from ..checks import check_triple, is_int
from ..gradients.passes import baseline_of, check_inputs, check_seed, coerce_baseline, set_batching
from ..method import AttributionMethod, AttributionOutput
from .passes import masked_scores, spread


def block_labels(spatial: Sequence[int], block: Sequence[int], device: torch.device) -> torch.Tensor:
    """The block index of every voxel: blocks of ``block`` voxels from the origin, the last ones cut at the border."""
    axes = [torch.arange(size, device=device) // b for size, b in zip(spatial, block)]
    counts = [-(-size // b) for size, b in zip(spatial, block)]
    d, h, w = torch.meshgrid(*axes, indexing="ij")
    return (d * counts[1] + h) * counts[2] + w


class SupervoxelShapley(AttributionMethod):
    """Shapley values of supervoxels (Castro et al. 2009's permutation sampling; Strumbelj & Kononenko 2010).

    The players are regular 3D blocks of ``block_size`` voxels (all channels of a block together); the value of a
    coalition is the score of the input in which the blocks outside it are replaced by the baseline. Each sampled
    order of the blocks adds them one by one to an empty input; a block's marginal contribution is the score change
    when it is added, and its Shapley value is estimated by the mean over the orders. With ``antithetic`` every
    order is followed by its reverse (a block added early in one is added late in the other), which lowers the
    variance. The contributions of each order add up to ``score(x) - score(baseline)``, so the efficiency delta is
    float rounding only; the sampling error is the standard error of each value, in ``extras``.

    Each block's value is spread in equal parts over its voxels in all channels. Cost: ``n_permutations *
    (blocks - 1) + 2`` forward passes.

    Args:
        block_size: Block size in voxels, an int or ``(D, H, W)`` (the last blocks are cut at the border).
        n_permutations: Orders sampled; even with ``antithetic``, and enough for two independent samples (2, or 4
            with ``antithetic``).
        antithetic: Follow each order by its reverse.
        seed: Seed of the orders.
        baseline: What a removed block is replaced by (default ``"zero"``, as for ``sequence_shapley``).
        internal_batch_size, memory_budget_bytes: As for
            :class:`~SegExplainLib.engine.gradients.IntegratedGradients`.
    """

    name = "supervoxel_shapley"
    linear_in_seed = True
    seed_local = True

    def __init__(self, *, block_size: int | Sequence[int] = 8, n_permutations: int = 10, antithetic: bool = True,
                 seed: int = 0, baseline: Baseline | str | float = "zero", internal_batch_size: int | None = None,
                 memory_budget_bytes: int | None = None) -> None:
        self.block_size = check_triple(block_size, "block_size")
        if not isinstance(antithetic, bool):
            raise SegExplainError(f"antithetic must be a bool, got {antithetic!r}")
        least = 4 if antithetic else 2
        if not is_int(n_permutations) or n_permutations < least or (antithetic and n_permutations % 2):
            parity = "an even integer" if antithetic else "an integer"
            raise SegExplainError(f"n_permutations must be {parity} >= {least} (two independent samples"
                                  f"{' of (order, reverse) pairs' if antithetic else ''}), got {n_permutations!r}")
        if not is_int(seed) or seed < 0:
            raise SegExplainError(f"seed must be an integer >= 0, got {seed!r}")
        self.n_permutations, self.antithetic, self.seed = int(n_permutations), antithetic, int(seed)
        self.baseline = coerce_baseline(baseline)
        set_batching(self, internal_batch_size, memory_budget_bytes)

    def _orders(self, players: int) -> torch.Tensor:
        """The sampled orders ``(n_permutations, players)``, reproducible from ``seed``."""
        generator = torch.Generator().manual_seed(self.seed)
        drawn = self.n_permutations // 2 if self.antithetic else self.n_permutations
        orders = torch.stack([torch.randperm(players, generator=generator) for _ in range(drawn)])
        if self.antithetic:
            orders = torch.stack([orders, orders.flip(1)], dim=1).reshape(self.n_permutations, players)
        return orders

    def attribute(self, model: torch.nn.Module, inputs: torch.Tensor, seed: torch.Tensor) -> AttributionOutput:
        x = check_inputs(inputs)
        seed = check_seed(seed, x)
        x0 = baseline_of(x, self.baseline)
        labels = block_labels(x.shape[2:], self.block_size, x.device)
        players = int(labels.max()) + 1
        if players < 2:
            raise SegExplainError(f"block_size {list(self.block_size)} makes one block of the input "
                                  f"{tuple(x.shape[2:])}; expected at least 2 blocks")
        orders = self._orders(players).to(x.device)
        rank = torch.argsort(orders, dim=1)  # rank[p, block]: the step at which order p adds the block
        steps = players - 1  # the coalitions strictly between the empty and the full one, per order
        count = 2 + self.n_permutations * steps

        def masks(index: torch.Tensor) -> torch.Tensor:
            # index 0: the empty coalition; 1: the full one; 2 + p * steps + j: order p's first j + 1 blocks
            inner = (index - 2).clamp(min=0)
            order, added = inner // steps, inner % steps + 1
            keep = rank[order][:, labels] < added.reshape(-1, 1, 1, 1)
            keep[index == 0] = False
            keep[index == 1] = True
            return keep[:, None]

        scores = masked_scores(self, model, x, x0, seed, count, masks)  # (B, count)
        empty, full = scores[:, :1], scores[:, 1:2]
        inner = scores[:, 2:].reshape(x.shape[0], self.n_permutations, steps)
        walk = torch.cat([empty[:, None].expand(-1, self.n_permutations, 1), inner,
                          full[:, None].expand(-1, self.n_permutations, 1)], dim=2)
        gains = walk.diff(dim=2)  # (B, orders, players): the marginal contribution of the block added at each step
        contributions = torch.gather(gains, 2, rank.expand(x.shape[0], -1, -1))  # per block, in block order
        values = contributions.mean(1)
        samples = contributions.reshape(x.shape[0], -1, 2, players).mean(2) if self.antithetic else contributions
        error = samples.detach().std(1) / samples.shape[1] ** 0.5
        sizes = torch.bincount(labels.flatten(), minlength=players)
        maps = spread(values, labels, sizes, x.shape[1])
        expected = (full - empty)[:, 0]
        delta = maps.flatten(1).sum(1) - expected
        extras = {"blocks": players, "standard_errors": error.tolist(), "forward_passes": x.shape[0] * count,
                  "internal_batch_size": self.last_internal_batch_size}
        return AttributionOutput(maps=maps, delta=delta, expected=expected, extras=extras)

    def options(self) -> dict[str, Any]:
        return {"block_size": list(self.block_size), "n_permutations": self.n_permutations,
                "antithetic": self.antithetic, "seed": self.seed, "baseline": self.baseline.to_dict(),
                "internal_batch_size": self.internal_batch_size, "memory_budget_bytes": self.memory_budget_bytes}
