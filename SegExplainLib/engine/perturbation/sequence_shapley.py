"""Exact Shapley values of the input channels (MRI sequences): every coalition of sequences enumerated."""

from __future__ import annotations

import math
from typing import Any

import torch

from ...errors import SegExplainError
from ..baselines import Baseline
from ..gradients.passes import baseline_of, check_inputs, check_seed, coerce_baseline, set_batching
from ..method import AttributionMethod, AttributionOutput
from .passes import masked_scores

#: The most channels whose ``2^C`` coalitions are enumerated (1,024 forward passes).
MAX_CHANNELS = 10


def shapley_values(scores: torch.Tensor) -> torch.Tensor:
    """The Shapley values ``(B, n)`` of the ``n`` players from the scores ``(B, 2^n)`` of every coalition (bit ``p``
    of a coalition's index set: player ``p`` is in).

    ``phi_p = sum over S without p of |S|! (n - |S| - 1)! / n! * (v(S + p) - v(S))``: the marginal contributions are
    formed first, so a player that never changes a score gets exactly 0, not a rounding residue.
    """
    players = (scores.shape[1] - 1).bit_length()
    coalitions = torch.arange(scores.shape[1], device=scores.device)
    size = sum((coalitions >> p) & 1 for p in range(players))
    weight = torch.tensor([math.factorial(s) * math.factorial(players - s - 1) / math.factorial(players)
                           for s in range(players)] + [0.0], dtype=scores.dtype, device=scores.device)
    values = []
    for p in range(players):
        without = coalitions[(coalitions >> p) & 1 == 0]
        gains = scores[:, without | (1 << p)] - scores[:, without]
        values.append(gains @ weight[size[without]])
    return torch.stack(values, dim=1)


class SequenceShapley(AttributionMethod):
    """Exact Shapley value of each input channel (MRI sequence) for the score ``sum(seed * logits)``.

    The players are the ``C`` channels; the value of a coalition ``S`` is the score of the input in which the
    channels outside ``S`` are replaced by the baseline. All ``2^C`` coalitions run (``C <= 10``), so the values are
    exact, need no rule and no sampling, and answer which sequence the network relies on: a channel the network
    never reads gets exactly 0. Efficiency is the sum rule: the values add up to ``score(x) - score(baseline)``;
    ``delta`` is float rounding only.

    The value of channel ``c`` is spread in equal parts over its voxels, so ``maps[c].sum()`` is the value and
    :func:`~SegExplainLib.engine.metrics.relevance_shares` gives the Shapley shares. The map says nothing about
    *where* in a sequence the network looked. Each coalition score is linear in the seed, so the map is too.

    Args:
        baseline: What a missing sequence is replaced by: a :class:`~SegExplainLib.engine.baselines.Baseline` or a
            spec (default ``"zero"``: the mean intensity of a z-scored sequence, i.e. a sequence with no contrast).
        internal_batch_size, memory_budget_bytes: As for
            :class:`~SegExplainLib.engine.gradients.IntegratedGradients`.
    """

    name = "sequence_shapley"
    linear_in_seed = True
    seed_local = True
    per_sequence = True

    def __init__(self, *, baseline: Baseline | str | float = "zero", internal_batch_size: int | None = None,
                 memory_budget_bytes: int | None = None) -> None:
        self.baseline = coerce_baseline(baseline)
        set_batching(self, internal_batch_size, memory_budget_bytes)

    def attribute(self, model: torch.nn.Module, inputs: torch.Tensor, seed: torch.Tensor) -> AttributionOutput:
        x = check_inputs(inputs)
        seed = check_seed(seed, x)
        channels = x.shape[1]
        if channels > MAX_CHANNELS:
            raise SegExplainError(f"sequence_shapley runs all 2^C coalitions of the C input channels; got C = "
                                  f"{channels}, expected at most {MAX_CHANNELS}")
        x0 = baseline_of(x, self.baseline)
        count = 2**channels
        bits = torch.arange(channels, device=x.device)

        def masks(index: torch.Tensor) -> torch.Tensor:
            return ((index[:, None] >> bits) & 1).bool().reshape(len(index), channels, 1, 1, 1)

        scores = masked_scores(self, model, x, x0, seed, count, masks)  # (B, 2^C); bit c set: channel c is kept
        values = shapley_values(scores)  # (B, C)
        voxels = math.prod(x.shape[2:])
        maps = (values / voxels).reshape(*values.shape, 1, 1, 1).expand(-1, -1, *x.shape[2:]).contiguous()
        expected = scores[:, -1] - scores[:, 0]
        delta = maps.flatten(1).sum(1) - expected
        extras = {"values": values.detach().tolist(), "forward_passes": x.shape[0] * count,
                  "internal_batch_size": self.last_internal_batch_size}
        return AttributionOutput(maps=maps, delta=delta, expected=expected, extras=extras)

    def options(self) -> dict[str, Any]:
        return {"baseline": self.baseline.to_dict(), "internal_batch_size": self.internal_batch_size,
                "memory_budget_bytes": self.memory_budget_bytes}
