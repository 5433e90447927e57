"""Canonizers: reversible rewrites of a model that make rules apply cleanly.

A canonizer changes the model in place for the duration of an explanation and restores it exactly afterwards,
also after an exception (use it through :meth:`Canonizer.applied`).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .rules.base import TRANSPOSED_CONVOLUTIONS, WEIGHTED_LINEAR

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class Canonizer(abc.ABC):
    """A reversible model rewrite."""

    name: str

    @abc.abstractmethod
    def apply(self, model: nn.Module) -> None:
        """Rewrite ``model`` in place, remembering how to undo it."""

    @abc.abstractmethod
    def remove(self) -> None:
        """Undo :meth:`apply` exactly."""

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Apply for the duration of a ``with`` block, and always remove."""
        try:
            self.apply(model)
            yield
        finally:
            self.remove()


class MergeBatchNorm(Canonizer):
    """Fold each eval-mode BatchNorm that directly follows a conv/linear layer in a ``Sequential`` into that layer.

    The merged layer computes the same output, so LRP rules see one affine layer (conv + normalization) as the
    papers' networks intend; the BatchNorm is replaced by an identity while merged.
    """

    name = "merge_batch_norm"

    def __init__(self) -> None:
        self._undo: list[tuple] = []

    def apply(self, model: nn.Module) -> None:
        for container in model.modules():
            if not isinstance(container, nn.Sequential):
                continue
            names = list(container._modules)
            for previous, current in zip(names, names[1:]):
                linear, norm = container._modules[previous], container._modules[current]
                mergeable = isinstance(linear, WEIGHTED_LINEAR) and getattr(linear, "groups", 1) == 1
                if mergeable and isinstance(norm, _BATCH_NORMS) and not norm.training and norm.running_var is not None:
                    self._merge(container, current, linear, norm)

    def _merge(self, container: nn.Sequential, norm_name: str, linear: nn.Module, norm: nn.Module) -> None:
        weight, bias = linear.weight, linear.bias
        self._undo.append((container, norm_name, norm, linear, weight, bias))
        with torch.no_grad():
            scale = norm.running_var.add(norm.eps).rsqrt()
            if norm.weight is not None:
                scale = scale * norm.weight
            shift = -norm.running_mean * scale
            if norm.bias is not None:
                shift = shift + norm.bias
            # output channels are dim 1 of a transposed convolution's weight, else dim 0
            out_dim = 1 if isinstance(linear, TRANSPOSED_CONVOLUTIONS) else 0
            shape = [1] * weight.dim()
            shape[out_dim] = -1
            new_weight = weight * scale.reshape(shape)
            new_bias = shift if bias is None else bias * scale + shift
        linear.weight = nn.Parameter(new_weight, requires_grad=False)
        linear.bias = nn.Parameter(new_bias, requires_grad=False)
        container._modules[norm_name] = nn.Identity()

    def remove(self) -> None:
        for container, norm_name, norm, linear, weight, bias in reversed(self._undo):
            container._modules[norm_name] = norm
            linear.weight, linear.bias = weight, bias
        self._undo.clear()
