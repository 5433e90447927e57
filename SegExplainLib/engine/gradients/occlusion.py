"""Occlusion: the score's drop when a window of the input is replaced by a baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...errors import SegExplainError
from ..baselines import Baseline
from ..checks import check_triple
from ..kernels import onednn_convolutions
from ..method import AttributionMethod, AttributionOutput
from .passes import (
    baseline_of,
    check_inputs,
    check_output,
    check_seed,
    chunks,
    coerce_baseline,
    forward_no_grad,
    resolve_batch,
    seed_scores,
    set_batching,
)


def _window_positions(size: int, window: int, stride: int) -> tuple[list[int], int]:
    """Start positions along one axis (captum's convention) and the window length clipped to the axis."""
    window = min(window, size)
    count = -(-(size - window) // stride) + 1  # ceil((size - window) / stride) + 1
    return [i * stride for i in range(count)], window


def _coverage(size: int, starts: Sequence[int], window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    matrix = torch.zeros(len(starts), size, dtype=dtype, device=device)
    for i, s in enumerate(starts):
        matrix[i, s : s + window] = 1
    return matrix


class Occlusion(AttributionMethod):
    """Occlusion (Zeiler & Fergus 2014) with a sliding 3D window; model-agnostic (forward passes only).

    For each window position (and each input channel when ``per_channel``), the window is replaced by the baseline
    and the score drop ``score(x) - score(x occluded)`` is recorded; a voxel's map value is the mean drop over the
    windows that cover it. Windows start at ``0, stride, 2*stride, ...`` until the last one reaches the end of the
    axis; that last one may be cut at the border (same convention as captum's ``Occlusion``). A window larger than
    an axis is clipped to it.

    With ``per_channel`` (default) each MRI sequence is occluded separately and the maps separate the sequences
    (``C`` times more passes). Otherwise all channels are occluded together and the same value is repeated over
    the channels.

    Forward passes run under ``torch.no_grad``. When ``seed.requires_grad`` the score differences are formed
    differentiably from the stored outputs (the score is linear in the seed), so the maps are differentiable
    w.r.t. the seed; this keeps every forward output alive until the backward pass.

    Args:
        window: Window size in voxels, an int or ``(D, H, W)``.
        stride: Step between windows, an int or ``(D, H, W)``, at most the window (default: the window).
        baseline: Occlusion value: a number, a Baseline or a baseline spec (default 0).
        per_channel: Occlude one input channel at a time.
        internal_batch_size, memory_budget_bytes: As for :class:`IntegratedGradients`.
    """

    name = "occlusion"
    seed_local = True
    linear_in_seed = True

    def __init__(
        self,
        *,
        window: int | Sequence[int] = 4,
        stride: int | Sequence[int] | None = None,
        baseline: Baseline | str | float = 0.0,
        per_channel: bool = True,
        internal_batch_size: int | None = None,
        memory_budget_bytes: int | None = None,
    ) -> None:
        self.window = check_triple(window, "window")
        self.stride = self.window if stride is None else check_triple(stride, "stride")
        if any(s > w for s, w in zip(self.stride, self.window)):
            raise SegExplainError(
                f"stride {self.stride} must not exceed window {self.window} along any axis (voxels would be skipped)"
            )
        if not isinstance(per_channel, bool):
            raise SegExplainError(f"per_channel must be a bool, got {per_channel!r}")
        set_batching(self, internal_batch_size, memory_budget_bytes)
        self.baseline = coerce_baseline(baseline)
        self.per_channel = per_channel

    def attribute(self, model: torch.nn.Module, inputs: torch.Tensor, seed: torch.Tensor) -> AttributionOutput:
        x = check_inputs(inputs)
        seed = check_seed(seed, x)
        batch, channels = x.shape[:2]
        x0 = baseline_of(x, self.baseline)
        axes = [_window_positions(size, w, s) for size, w, s in zip(x.shape[2:], self.window, self.stride)]
        (pd, wd), (ph, wh), (pw, ww) = axes
        groups = channels if self.per_channel else 1
        per_sample = groups * len(pd) * len(ph) * len(pw)
        total = batch * per_sample
        k = resolve_batch(self, model, x, total, forward_only=True)

        ref = forward_no_grad(model, x, max(k, 1))
        check_output(ref, seed, batch)
        ref_scores = seed_scores(seed, ref)
        del ref

        diffs = []
        for rows in chunks(total, k):
            b_list = []
            xs = torch.empty((len(rows),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
            for r, j in enumerate(rows):
                b, rem = divmod(j, per_sample)
                g, rem = divmod(rem, len(pd) * len(ph) * len(pw))
                i_d, rem = divmod(rem, len(ph) * len(pw))
                i_h, i_w = divmod(rem, len(pw))
                c = slice(g, g + 1) if self.per_channel else slice(None)
                region = (c, slice(pd[i_d], pd[i_d] + wd), slice(ph[i_h], ph[i_h] + wh), slice(pw[i_w], pw[i_w] + ww))
                xs[r] = x[b]
                xs[r][region] = x0[b][region]
                b_list.append(b)
            b_idx = torch.tensor(b_list, device=x.device)
            with torch.no_grad(), onednn_convolutions():
                out = model(xs)
            diffs.append(ref_scores[b_idx] - seed_scores(seed[b_idx], out))
        grid = torch.cat(diffs).reshape(batch, groups, len(pd), len(ph), len(pw))
        md, mh, mw = (
            _coverage(size, starts, w, x.dtype, x.device)
            for size, (starts, w) in zip(x.shape[2:], axes)
        )
        summed = torch.einsum("bgpqr,pd,qh,rw->bgdhw", grid, md, mh, mw)
        count = torch.einsum("d,h,w->dhw", md.sum(0), mh.sum(0), mw.sum(0))
        maps = summed / count.clamp(min=1)
        if not self.per_channel:
            maps = maps.expand(-1, channels, -1, -1, -1)
        maps = maps.contiguous()
        if not seed.requires_grad:
            maps = maps.detach()
        return AttributionOutput(maps=maps, extras={"internal_batch_size": k})

    def options(self) -> dict[str, Any]:
        return {
            "window": list(self.window),
            "stride": list(self.stride),
            "baseline": self.baseline.to_dict(),
            "per_channel": self.per_channel,
            "internal_batch_size": self.internal_batch_size,
            "memory_budget_bytes": self.memory_budget_bytes,
        }
