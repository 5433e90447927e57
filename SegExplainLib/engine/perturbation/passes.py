"""The batched forward passes of masked inputs that every perturbation method shares."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..gradients.passes import check_output, chunks, resolve_batch, seed_scores
from ..kernels import onednn_convolutions

#: ``masks(indices)``: the masks of the perturbations ``indices``, shaped ``(len(indices), C or 1, *spatial)`` (or
#: with axes of size one that broadcast): bool (keep the voxel or take the reference) or float in [0, 1] (the blend).
Masks = Callable[[torch.Tensor], torch.Tensor]


def masked_scores(method: object, model: torch.nn.Module, x: torch.Tensor, reference: torch.Tensor,
                  seed: torch.Tensor, count: int, masks: Masks) -> torch.Tensor:
    """Scores ``sum(seed[b] * model(reference[b] + m_i * (x[b] - reference[b])))`` for every batch element ``b`` and
    mask ``i < count``, shaped ``(B, count)``.

    The ``B * count`` inputs are built chunk by chunk and run ``internal_batch_size`` at a time (the method's batching
    options, :func:`~SegExplainLib.engine.gradients.passes.resolve_batch`). A bool mask takes the voxel itself or the
    reference, never a blend, so a full mask gives exactly the input's score. With ``seed.requires_grad`` the scores
    are differentiable w.r.t. the seed; the outputs stay alive until the backward pass.
    """
    batch = x.shape[0]
    total = batch * count
    k = resolve_batch(method, model, x, total, forward_only=True)
    scores = []
    for rows in chunks(total, k):
        index = torch.arange(rows.start, rows.stop, device=x.device)
        b_idx, m_idx = index // count, index % count
        mask = masks(m_idx).to(x.device)
        if mask.dtype == torch.bool:
            xs = torch.where(mask, x[b_idx], reference[b_idx])
        else:
            xs = torch.lerp(reference[b_idx], x[b_idx], mask.to(x.dtype))
        with torch.no_grad(), onednn_convolutions():
            out = check_output(model(xs), seed, batch)
        scores.append(seed_scores(seed[b_idx], out))
    result = torch.cat(scores).reshape(batch, count)
    return result if seed.requires_grad else result.detach()


def spread(values: torch.Tensor, labels: torch.Tensor, sizes: torch.Tensor, channels: int) -> torch.Tensor:
    """Maps ``(B, C, *spatial)`` that give each player's value ``values[b, p]`` in equal parts to its voxels: player
    ``p`` holds the voxels where ``labels == p`` (``sizes[p]`` of them) in every one of the ``channels``."""
    share = values / (sizes.to(values.dtype) * channels)
    maps = share[:, labels]  # (B, *spatial)
    return maps.unsqueeze(1).expand(-1, channels, *labels.shape).contiguous()
