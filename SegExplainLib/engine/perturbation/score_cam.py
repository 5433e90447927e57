"""Score-CAM in 3D: a layer's activations, used as masks of the input, weighted by the score they keep."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...errors import SegExplainError
from ..baselines import Baseline
from ..checks import check_choice
from ..deployment import check_walkable
from ..gradients.gradcam import check_layer_name, named_layer
from ..gradients.passes import baseline_of, check_inputs, check_output, check_seed, coerce_baseline, set_batching
from ..kernels import onednn_convolutions
from ..method import AttributionMethod, AttributionOutput
from .passes import masked_scores

WEIGHTS = ("increase", "softmax")


class ScoreCAM(AttributionMethod):
    """3D Score-CAM (Wang et al. 2020) on the output of a named layer.

    With ``A`` the layer's activation ``(B, K, d, h, w)``, each channel ``A_k`` is upsampled (trilinear,
    ``align_corners=False``) to the input grid and scaled to [0, 1] (a constant channel gives an empty mask); the
    input blended towards the baseline by that mask is scored, and the channel's weight is its increase of
    confidence, ``score(mask_k) - score(baseline)`` (``weights="increase"``, the paper's definition), or the softmax
    of these increases over the channels (``weights="softmax"``; the increases of a score summed over a region are
    large, so the softmax often keeps a single channel). ``cam = relu(sum_k w_k A_k)`` is upsampled to the input grid
    as Grad-CAM's; the map repeats ``cam / C`` over the ``C`` input channels. No gradient is used, so the map does
    not suffer from saturated or noisy gradients, but it needs a layer (``walks_modules``), reads its activation over
    the whole forward pass (not seed-local) and is not linear in the seed. Cost: ``K + 2`` forward passes.

    Args:
        layer: Name of a module as listed by ``model.named_modules()`` (as for Grad-CAM); its output must be a 5D
            tensor and the module must run once per forward pass.
        weights: ``"increase"`` (default) or ``"softmax"``.
        baseline: What a masked voxel becomes (default ``"zero"``).
        internal_batch_size, memory_budget_bytes: As for
            :class:`~SegExplainLib.engine.gradients.IntegratedGradients`.
    """

    name = "score_cam"
    linear_in_seed = False
    walks_modules = True

    def __init__(self, *, layer: str, weights: str = "increase", baseline: Baseline | str | float = "zero",
                 internal_batch_size: int | None = None, memory_budget_bytes: int | None = None) -> None:
        self.layer = check_layer_name(layer)
        self.weights = check_choice(weights, "weights", WEIGHTS)
        self.baseline = coerce_baseline(baseline)
        set_batching(self, internal_batch_size, memory_budget_bytes)

    def _activation(self, model: torch.nn.Module, x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        """The layer's activation for ``x`` (one forward pass without gradient)."""
        captured: list[Any] = []
        handle = named_layer(model, self.layer).register_forward_hook(lambda _m, _a, out: captured.append(out))
        try:
            with torch.no_grad(), onednn_convolutions():
                check_output(model(x), seed, x.shape[0])
        finally:
            handle.remove()
        if len(captured) != 1:
            raise SegExplainError(
                f"layer {self.layer!r} ran {len(captured)} times in one forward pass; expected exactly once")
        act = captured[0]
        if not isinstance(act, torch.Tensor) or act.dim() != 5:
            kind = tuple(act.shape) if isinstance(act, torch.Tensor) else type(act).__name__
            raise SegExplainError(f"layer {self.layer!r} output must be a 5D tensor (B, C, d, h, w), got {kind}")
        return act.detach()

    def attribute(self, model: torch.nn.Module, inputs: torch.Tensor, seed: torch.Tensor) -> AttributionOutput:
        x = check_inputs(inputs)
        seed = check_seed(seed, x)
        check_walkable(model, self.name)
        x0 = baseline_of(x, self.baseline)
        act = self._activation(model, x, seed)
        channels = act.shape[1]
        upsampled = F.interpolate(act.to(x.dtype), size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)
        low = upsampled.flatten(2).amin(2)[..., None, None, None]
        span = upsampled.flatten(2).amax(2)[..., None, None, None] - low
        masks = torch.where(span > 0, (upsampled - low) / torch.where(span > 0, span, 1), 0)  # (B, K, D, H, W)
        rows = []
        for b in range(x.shape[0]):  # the masks differ per batch element; index K is the empty mask (the baseline)
            empty = torch.zeros_like(masks[b, :1])

            def mask_of(index: torch.Tensor, b: int = b, empty: torch.Tensor = empty) -> torch.Tensor:
                return torch.cat([masks[b], empty])[index][:, None]

            scores = masked_scores(self, model, x[b:b + 1], x0[b:b + 1], seed[b:b + 1], channels + 1, mask_of)
            rows.append(scores[0, :channels] - scores[0, channels])
        increase = torch.stack(rows)  # (B, K)
        weights = increase.softmax(1) if self.weights == "softmax" else increase
        cam = F.relu((weights[..., None, None, None] * act.to(x.dtype)).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)
        maps = (cam / x.shape[1]).expand(-1, x.shape[1], -1, -1, -1).contiguous()
        return AttributionOutput(maps=maps, extras={"forward_passes": x.shape[0] * (channels + 2),
                                                    "internal_batch_size": self.last_internal_batch_size})

    def options(self) -> dict[str, Any]:
        return {"layer": self.layer, "weights": self.weights, "baseline": self.baseline.to_dict(),
                "internal_batch_size": self.internal_batch_size, "memory_budget_bytes": self.memory_budget_bytes}
