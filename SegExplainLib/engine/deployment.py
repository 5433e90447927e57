"""The function the user deploys, explained without side effects on the model.

An explanation must be of the prediction the user gets. Two things about how a model is run change that function:

* **Norm statistics.** A norm layer left in train mode normalizes with the statistics of its input (instance
  statistics; for BatchNorm those of the batch, which for the one image the user runs are that image's). nnU-Net-v1-era
  code runs networks this way. Switching the whole model to eval mode would make such a layer use its running
  statistics and explain another prediction.
* **Dropout** is noise, never part of the explained function.

:func:`deployed` keeps every norm layer on the statistics the user's model uses and puts everything else in eval
mode. Norms on input statistics normalize each sample on its own, so that the batched passes of IG, SmoothGrad or the
voxel-wise aggregation give every sample the statistics the user's single forward pass gives it, and they update no
running statistics. Parameters stop requiring grad, in-place activations run out of place, and on exit every flag,
patch and buffer is restored exactly (buffers bit for bit), also after an exception.

A model that is not made of Python modules (TorchScript) cannot be walked by the rule-based methods:
:func:`check_walkable` says so with the methods that do work.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SegExplainError
from .method import rule_free_methods

__all__ = ["check_walkable", "deployed", "norm_statistics", "statistics_record", "walkable"]

_INPUT_STATISTICS_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_NORM_NAMES = ("BatchNorm", "InstanceNorm", "GroupNorm", "LayerNorm", "SyncBatchNorm")
_active: set[int] = set()


def _script_name(module: nn.Module) -> str | None:
    """The class name of a TorchScript module's original, or ``None`` for a Python module."""
    return getattr(module, "original_name", None) if isinstance(module, torch.jit.ScriptModule) else None


def _is_norm(module: nn.Module) -> bool:
    name = _script_name(module) or type(module).__name__
    return isinstance(module, (*_INPUT_STATISTICS_NORMS, nn.GroupNorm, nn.LayerNorm)) or name.startswith(_NORM_NAMES)


def norm_statistics(module: nn.Module) -> str | None:
    """Which statistics a norm layer normalizes with as the module stands: ``"running"``, ``"instance"``,
    ``"group"``, ``"layer"``; ``None`` for other modules."""
    if isinstance(module, nn.GroupNorm):
        return "group"
    if isinstance(module, nn.LayerNorm):
        return "layer"
    if isinstance(module, _INPUT_STATISTICS_NORMS):
        return "instance" if _uses_input_statistics(module) else "running"
    return None


def _uses_input_statistics(norm: nn.Module) -> bool:
    return norm.training or norm.running_mean is None


def statistics_record(model: nn.Module) -> dict[str, str]:
    """Per kind of norm layer in ``model``, the statistics it uses, e.g. ``{"InstanceNorm3d": "instance"}``;
    a kind whose layers differ lists the counts (``"running (3), instance (2)"``)."""
    kinds: dict[str, Counter] = {}
    for module in model.modules():
        statistics = norm_statistics(module)
        if statistics is not None:
            kinds.setdefault(type(module).__name__, Counter())[statistics] += 1
    return {kind: next(iter(counts)) if len(counts) == 1 else
            ", ".join(f"{statistics} ({count})" for statistics, count in counts.most_common())
            for kind, counts in kinds.items()}


def walkable(model: nn.Module) -> bool:
    """Whether every submodule is a Python module, so that rules can be hooked into it (not TorchScript)."""
    return not any(isinstance(module, torch.jit.ScriptModule) for module in model.modules())


def check_walkable(model: nn.Module, method: str) -> None:
    """Raise for a method that walks the network's modules (LRP, Guided Backprop, ...) on a model it cannot walk."""
    if not isinstance(model, nn.Module):
        msg = f"the model must be a torch.nn.Module, got {type(model).__name__}"
        raise SegExplainError(msg)
    if not walkable(model):
        msg = (f"method {method!r} attaches rules to the network's Python modules, but this model is TorchScript "
               f"(compiled code without them); use {rule_free_methods()}, or load the network from its Python class "
               "and a state dict")
        raise SegExplainError(msg)


def _per_sample(norm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The norm with the statistics of each sample on its own (BatchNorm of a batch of one), updating nothing."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:  # (N, C): a sample has no statistics of its own; let the layer say so
            return type(norm).forward(norm, x)
        return F.instance_norm(x, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)
    return forward


@contextlib.contextmanager
def deployed(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as deployed (see the module docstring) for the duration of a ``with`` block.

    Nested uses on the same model are no-ops, so that :func:`SegExplainLib.explain` and a method called inside it
    share one state.

    Raises:
        SegExplainError: A TorchScript model normalizes with batch statistics, which compiled code cannot be made to
            compute per sample.
    """
    if id(model) in _active:
        yield
        return
    modules = list(model.modules())
    modes = [(m, m.training) for m in modules]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    buffers = [(b, b.clone()) for b in model.buffers()]
    python = [m for m in modules if not isinstance(m, torch.jit.ScriptModule)]
    inplace = [m for m in python if getattr(m, "inplace", False) is True]
    per_sample = [m for m in python if isinstance(m, _INPUT_STATISTICS_NORMS) and _uses_input_statistics(m)]
    patched = [(m, m.__dict__.get("forward")) for m in per_sample]
    _active.add(id(model))
    try:
        for m in modules:
            if not _is_norm(m):
                m.training = False  # the flag alone: train(False) would recurse into the norms
        for m in modules:
            name = _script_name(m)
            if name and name.startswith(("BatchNorm", "SyncBatchNorm")) and m.training:
                msg = (f"the TorchScript model has a {name} in train mode, which normalizes with the statistics of "
                       "the batch; call .eval() on the network before scripting it, or explain its Python class")
                raise SegExplainError(msg)
        for p, _ in grads:
            p.requires_grad_(False)
        for m in inplace:
            m.inplace = False
        for m in per_sample:
            m.forward = _per_sample(m)
        yield
    finally:
        _active.discard(id(model))
        for m, forward in patched:
            if forward is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = forward
        for m, training in modes:
            m.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)
        for m in inplace:
            m.inplace = True
        with torch.no_grad():
            for b, saved in buffers:
                if not torch.equal(b, saved):
                    b.copy_(saved)
