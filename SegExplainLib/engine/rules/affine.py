"""Weighted layers run with replaced parameters, their transposes, and the slopes of frozen norm layers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import onednn_eligible
from .base import CONVOLUTIONS, TRANSPOSED_CONVOLUTIONS


def frozen_norm_scale(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Slope ``dy/dx`` of a norm layer with its statistics held fixed: gain / standard deviation."""
    batch, channels = x.shape[:2]
    spatial = tuple(range(2, x.dim()))
    with torch.no_grad():
        if getattr(module, "running_var", None) is not None and not module.training:
            var = module.running_var.reshape((1, channels) + (1,) * len(spatial))
        elif isinstance(module, nn.GroupNorm):
            grouped = x.reshape(batch, module.num_groups, -1).var(dim=2, unbiased=False)
            var = grouped.repeat_interleave(channels // module.num_groups, dim=1)
            var = var.reshape((batch, channels) + (1,) * len(spatial))
        else:  # input statistics are per sample, for BatchNorm too (see SegExplainLib.engine.deployment)
            var = x.var(dim=spatial, unbiased=False, keepdim=True)
        scale = torch.rsqrt(var + module.eps)
        if getattr(module, "weight", None) is not None:
            scale = scale * module.weight.reshape((1, channels) + (1,) * len(spatial))
        return scale


def unwired(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's own function, bypassing the hooks and the patched ``forward`` that apply rules."""
    return lambda x: type(module).forward(module, x)


def affine_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   padding: Any = None):
    """Run a weighted linear layer with replaced parameters (same stride, groups, ...; its padding by default)."""
    if isinstance(module, CONVOLUTIONS):
        if not zero_padded(module):
            return module._conv_forward(x, weight, bias)
        padding = module.padding if padding is None else padding
        if onednn_eligible(x, weight):
            return torch.mkldnn_convolution(x, weight, bias, padding, module.stride, module.dilation, module.groups)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
        return conv(x, weight, bias, module.stride, padding, module.dilation, module.groups)
    if isinstance(module, TRANSPOSED_CONVOLUTIONS):
        conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[x.dim() - 2]
        if x.dim() == 5 and x.device.type == "cpu":
            # oneDNN's 3D transposed convolution is several times faster on a channels-last input; on a contiguous
            # one it also copies its whole output once more. Its output stays channels-last: the decoder's
            # concatenation reads either layout, and a copy back would cost more than that (75 ms at size L).
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return conv(x, weight, bias, module.stride, module.padding, module.output_padding, module.groups,
                    module.dilation)
    return F.linear(x, weight, bias)


def zero_padded(module: nn.Module) -> bool:
    """Whether a convolution pads with zeros by a given number of voxels (not ``"same"``, reflect or circular)."""
    return module.padding_mode == "zeros" and not isinstance(module.padding, str)


def fusable(module: nn.Module) -> bool:
    """Whether extra output channels can be computed in the same call as the layer's output (zero padding, groups 1)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, (*CONVOLUTIONS, *TRANSPOSED_CONVOLUTIONS)) and module.groups == 1 and zero_padded(module)


def weight_dims(module: nn.Module) -> tuple[int, int]:
    """Dimensions of the input and output channels in a weighted layer's weight."""
    return (0, 1) if isinstance(module, TRANSPOSED_CONVOLUTIONS) else (1, 0)


def affine_vjp(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor,
               padding: Any = None) -> torch.Tensor:
    """``W^T grad`` of a weighted layer (the input gradient of ``layer(x; weight)``) without a forward pass."""
    if isinstance(module, nn.Linear):
        return grad @ weight
    transposed = isinstance(module, TRANSPOSED_CONVOLUTIONS)
    padding = module.padding if padding is None else padding
    spatial = tuple(range(2, weight.dim()))
    if onednn_eligible(grad, weight) and zero_padded(module):
        # the transpose of a convolution is a convolution too, which oneDNN runs directly (see kernels.py)
        if transposed:  # a transposed convolution's transpose is the strided convolution with its weights
            return torch.mkldnn_convolution(grad, weight, None, padding, module.stride, module.dilation,
                                            module.groups)
        border = [d * (k - 1) - p for k, p, d in zip(weight.shape[2:], padding, module.dilation)]
        if module.groups == 1 and all(s == 1 for s in module.stride) and min(border) >= 0:
            # stride 1: the convolution of grad with the flipped, transposed kernel
            return torch.mkldnn_convolution(grad, weight.flip(spatial).transpose(0, 1).contiguous(), None, border,
                                            (1,) * len(spatial), module.dilation, 1)
    output_padding = module.output_padding if transposed else (0,) * len(spatial)
    grad_x, _, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, module.stride, padding, module.dilation, transposed, output_padding, module.groups,
        [True, False, False])
    return grad_x
