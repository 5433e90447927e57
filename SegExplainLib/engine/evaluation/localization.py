"""Localization: how much positive relevance lies where the network cannot look, or off the target.

The receptive field of the region is computed structurally: the input support of the gradient of the region's
score through a copy of the network whose weights and biases are made positive (absolute values), whose
normalisation layers pass their input on and whose max-pooling averages, at an all-ones input. Every path from an
input voxel to the region then carries a positive product of weights, so no two paths cancel and every activation
(ReLU, leaky ReLU, ...) works in its positive, linear regime: the gradient is non-zero exactly where some path of
non-zero weights reaches the region. A weight that is zero in the trained network stays zero, so a sequence the
first layer ignores lies outside the field. Normalisation statistics reach every voxel of a real network; they are
left out because that dependency is global and weak, and would make the whole volume the field of every network
with instance normalisation.
"""

from __future__ import annotations

from copy import deepcopy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import SegExplainError
from ..deployment import walkable

__all__ = ["leakage", "receptive_field"]

_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _average_instead(module: nn.Module, inputs: tuple, _output: torch.Tensor) -> torch.Tensor:
    pool = {3: F.avg_pool1d, 4: F.avg_pool2d, 5: F.avg_pool3d}[inputs[0].dim()]
    return pool(inputs[0], module.kernel_size, module.stride, module.padding, ceil_mode=module.ceil_mode)


def receptive_field(model: nn.Module, x: torch.Tensor, seed: torch.Tensor) -> np.ndarray:
    """The voxels ``(C, D, H, W)`` of the input that the score ``sum(seed * model(x))`` can depend on (see the
    module docs); ``x`` gives shape, device and type.

    Raises:
        SegExplainError: The model has no modules to walk (TorchScript).
    """
    if not walkable(model):
        raise SegExplainError("the receptive field needs a network of torch modules; TorchScript hides its layers")
    with torch.no_grad():
        copy = deepcopy(model)
        for parameter in copy.parameters():
            parameter.abs_()
    hooks = []
    for module in copy.modules():
        if isinstance(module, _MAX_POOLS) and not getattr(module, "return_indices", False):
            hooks.append(module.register_forward_hook(_average_instead))
        elif isinstance(module, _NORMS):
            hooks.append(module.register_forward_hook(lambda _module, inputs, _output: inputs[0]))
    ones = torch.ones_like(x).requires_grad_(True)
    try:
        with torch.enable_grad():
            (gradient,) = torch.autograd.grad((copy(ones) * seed.abs()).sum(), ones)
    finally:
        for hook in hooks:
            hook.remove()
    return (gradient[0] != 0).cpu().numpy()


def leakage(maps: np.ndarray, inside: np.ndarray) -> float:
    """The share of the positive relevance of ``maps`` (C, D, H, W) outside ``inside`` (broadcast to the maps);
    0.0 when there is no positive relevance."""
    positive = np.maximum(maps, 0.0)
    total = float(positive.sum(dtype=np.float64))
    if total == 0.0:
        return 0.0
    return float(positive[~np.broadcast_to(inside, maps.shape)].sum(dtype=np.float64) / total)
