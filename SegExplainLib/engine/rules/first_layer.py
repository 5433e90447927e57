"""Rules of the first layer, which ignore (flat, w-square) or bound (z-box) the input values."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import SegExplainError
from .affine import affine_vjp, fusable
from .base import CONVOLUTIONS, replace_backward
from .weighted import Term, WeightRule


class Flat(WeightRule):
    """Flat (first layer): relevance spread uniformly over each output's receptive field, whatever the input."""

    name = "flat"
    first_layer_only = True

    def forward(self, module, x, original, ctx):
        # All weights are one, so every input channel receives the same relevance: compute it on one channel.
        if not isinstance(module, CONVOLUTIONS) or not fusable(module):
            return super().forward(module, x, original, ctx)
        self._check_reads_input(module, x, ctx)
        one_channel = torch.ones_like(x[:, :1])
        box = _BoxSum(module) if _BoxSum.applies(module) else None
        with torch.no_grad():
            y = original(x)
            count = box.over_inputs(one_channel) if box else module._conv_forward(
                one_channel, _ones_kernel(module, x), None)
            count = count.mul_(x.shape[1]).add_(self.epsilon)
            saved = y / count if ctx.layer_filter is None else y

        def propagate(x_in, saved, grad):
            ratio = grad * saved if ctx.layer_filter is None else ctx.filtered(saved * grad) / count
            ratio = ratio.sum(1, keepdim=True)
            spread = box.over_outputs(ratio) if box else affine_vjp(module, one_channel, _ones_kernel(module, x),
                                                                    ratio)
            return ctx.to_input(x, spread.expand_as(x_in))

        return replace_backward(x, y, propagate, ctx.input_sink, saved=saved)

    def groups(self, module, x):
        weight = module.weight.detach()
        return [(1.0, [Term(torch.ones_like(x), torch.ones_like(weight))])]


def _ones_kernel(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.ones((1, 1, *module.kernel_size), dtype=x.dtype, device=x.device)


class _BoxSum:
    """Sums over a stride-1 3D convolution's windows, with a sum pooling instead of a convolution with ones.

    ``over_inputs`` counts, per output voxel, the input voxels inside the image; ``over_outputs`` is the transposed
    sum that spreads each output's share back onto its window.
    """

    def __init__(self, module: nn.Module) -> None:
        self.kernel = tuple(module.kernel_size)
        self.padding = tuple(module.padding)

    @staticmethod
    def applies(module: nn.Module) -> bool:
        return (isinstance(module, nn.Conv3d) and tuple(module.stride) == (1, 1, 1) and
                tuple(module.dilation) == (1, 1, 1) and not isinstance(module.padding, str) and
                all(p < k for p, k in zip(module.padding, module.kernel_size)))

    def _sum(self, values: torch.Tensor, pads: tuple[int, ...]) -> torch.Tensor:
        padded = F.pad(values, [p for pad in reversed(pads) for p in (pad, pad)])
        return F.avg_pool3d(padded, self.kernel, stride=1, divisor_override=1)

    def over_inputs(self, ones: torch.Tensor) -> torch.Tensor:
        return self._sum(ones, self.padding)

    def over_outputs(self, values: torch.Tensor) -> torch.Tensor:
        return self._sum(values, tuple(k - 1 - p for k, p in zip(self.kernel, self.padding)))


class WSquare(WeightRule):
    """w-square (first layer): relevance spread in proportion to the squared weights."""

    name = "w_square"
    first_layer_only = True

    def groups(self, module, x):
        weight = module.weight.detach()
        return [(1.0, [Term(torch.ones_like(x), weight * weight)])]


class ZBox(WeightRule):
    """z-box (first layer) for inputs known to lie in ``[low, high]`` (e.g. normalized MRI intensities).

    Args:
        low: Lowest possible input value: a number, or one value per input channel.
        high: Highest possible input value, likewise.
    """

    name = "z_box"
    first_layer_only = True

    def __init__(self, low: float | list[float] = -3.0, high: float | list[float] = 3.0, *,
                 epsilon: float = 1e-6) -> None:
        super().__init__(epsilon=epsilon)
        low_t = torch.as_tensor(low, dtype=torch.float64)
        high_t = torch.as_tensor(high, dtype=torch.float64)
        if low_t.dim() > 1 or high_t.dim() > 1 or not bool((low_t < high_t).all()):
            msg = f"z_box needs low < high (numbers or one value per channel), got low={low!r}, high={high!r}"
            raise SegExplainError(msg)
        self.low, self.high = low_t, high_t

    def options(self) -> dict[str, Any]:
        return {**super().options(), "low": self.low.tolist(), "high": self.high.tolist()}

    def _bound(self, value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        value = value.to(dtype=x.dtype, device=x.device)
        if value.dim() == 1:
            if value.numel() != x.shape[1]:
                msg = f"z_box bounds have {value.numel()} values but the input has {x.shape[1]} channels"
                raise SegExplainError(msg)
            value = value.reshape((1, -1) + (1,) * (x.dim() - 2))
        return value.expand_as(x)

    def groups(self, module, x):
        weight = module.weight.detach()
        terms = [Term(x, weight, None if module.bias is None else module.bias.detach()),
                 Term(self._bound(self.low, x), weight.clamp(min=0), sign=-1.0),
                 Term(self._bound(self.high, x), weight.clamp(max=0), sign=-1.0)]
        return [(1.0, terms)]
