"""Functional operations: which ones the modified gradient passes exactly, and which ones need a rule.

Rules are attached to modules. Operations a network calls functionally — in a container's ``forward`` (``torch.cat``
of a skip, ``out + residual``) or inside a module SegExplain does not know (an ``Upsample`` wrapper class that calls
``F.interpolate``) — run without a rule, so the backward pass treats them as the gradient does. That is exact for:

* copies and rearrangements (slicing, reshaping, concatenation, padding, nearest upsampling): relevance moves with
  the values;
* parameter-free linear maps without a bias (sums, averages, linear interpolation, average pooling, a residual
  ``a + b``): with ``R_t = t * g_t`` the gradient is LRP-0, which has no denominator to stabilize and conserves;
* scaling by a constant (``x * mask``, ``x / 2``): the same with a diagonal map;
* positively homogeneous selections (max pooling, ``max``) and, for LRP, rectifiers (``F.relu``, ``F.leaky_relu``):
  the identity rule.

Everything else through which relevance flows (a functional convolution, a norm, a sigmoid gate, a product of two
activations, softmax, attention) would silently take the plain gradient, so the composite refuses it, naming the
most fundamental such operation first (:func:`obstacle`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

_OWNERS = (torch, torch.Tensor, F)


def _collect(names: Iterable[str]) -> frozenset[Callable]:
    """The functions of these names in ``torch``, ``torch.Tensor`` and ``torch.nn.functional`` (where defined)."""
    return frozenset(getattr(owner, name) for name in names for owner in _OWNERS if hasattr(owner, name))


def _with_dims(*stems: str) -> list[str]:
    return [f"{stem}{dims}d" for stem in stems for dims in (1, 2, 3)]


#: Copies and rearrangements of the values.
MOVES = _collect([
    "cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack", "view", "view_as", "reshape", "reshape_as",
    "permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "flatten", "unflatten", "squeeze",
    "unsqueeze", "expand", "expand_as", "repeat", "repeat_interleave", "tile", "contiguous", "clone", "narrow", "split",
    "split_with_sizes", "tensor_split", "chunk", "unbind", "flip", "fliplr", "flipud", "roll", "rot90", "select",
    "index_select", "gather", "take_along_dim", "masked_fill", "where", "unfold", "pixel_shuffle", "pixel_unshuffle",
    "channel_shuffle", "__getitem__", "__setitem__", "to", "type", "type_as", "float", "double", "half", "bfloat16",
    "cpu", "cuda", "t", "pad", "constant_pad_nd", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout",
])
#: Parameter-free linear maps: the gradient is LRP-0 there.
LINEAR = _collect([
    "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "subtract", "__sub__", "__rsub__", "__isub__",
    "neg", "negative", "__neg__", "__pos__", "sum", "mean", "interpolate", "upsample", "upsample_nearest",
    "upsample_bilinear", *_with_dims("avg_pool", "adaptive_avg_pool"),
])
#: Positively homogeneous selections.
SELECTIONS = _collect(["max", "amax", "maximum", *_with_dims("max_pool", "adaptive_max_pool"),
                       *(f"{name}_with_indices" for name in _with_dims("max_pool", "adaptive_max_pool"))])
#: Rectifiers: the identity rule of LRP, but Guided Backprop and Deconvolution must modify them.
RECTIFIERS = _collect(["relu", "relu_", "leaky_relu", "leaky_relu_", "prelu", "clamp", "clamp_", "clamp_min",
                       "clamp_min_"])
#: Products and quotients: linear while at most one operand carries relevance (and never in the divisor).
SCALINGS = _collect(["mul", "mul_", "multiply", "__mul__", "__rmul__", "__imul__", "div", "div_", "divide",
                     "true_divide", "__truediv__", "__itruediv__", "__div__", "__rdiv__", "__rtruediv__"])
#: Weighted layers and norms written as functions: the gradient is Guided Backprop's rule there, not LRP's.
LAYERS = _collect(["conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear",
                   "bilinear", "batch_norm", "instance_norm", "group_norm", "layer_norm", "matmul", "__matmul__",
                   "bmm", "mm", "einsum"])

_QUOTIENTS = _collect(["div", "div_", "divide", "true_divide", "__truediv__", "__itruediv__", "__div__"])
_REVERSED_QUOTIENTS = _collect(["__rdiv__", "__rtruediv__"])
_CLAMPS = _collect(["clamp", "clamp_", "clamp_min", "clamp_min_"])
# Properties that return a rearranged view (``x.T``); attribute reads are ``__get__`` calls of their descriptors.
_VIEW_PROPERTIES = tuple(getattr(torch.Tensor, name) for name in ("T", "mT", "H", "mH", "real") if
                         hasattr(torch.Tensor, name))

#: What LRP composites pass functionally.
LRP_FUNCTIONS = MOVES | LINEAR | SELECTIONS | RECTIFIERS
#: What Guided Backprop and Deconvolution pass: all but rectifiers and other nonlinear activations.
MODIFIED_GRADIENT_FUNCTIONS = MOVES | LINEAR | SELECTIONS | SCALINGS | LAYERS


def carries_relevance(result: Any) -> bool:
    """Whether an operation's result is part of the explained graph (a floating tensor that requires grad)."""
    tensors = result if isinstance(result, (tuple, list)) else (result,)
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _relevant(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


def passes(func: Callable, args: tuple, kwargs: dict, passed: frozenset[Callable]) -> bool:
    """Whether ``func(*args, **kwargs)``, whose result carries relevance, is exact without a rule."""
    if getattr(func, "__name__", "") == "__get__":
        return getattr(func, "__self__", None) in _VIEW_PROPERTIES
    if func in _CLAMPS and func in passed:
        # only max(x, 0) is a rectifier; clamp(0, 6) or clamp(min=-1) are not positively homogeneous
        low = args[1] if len(args) > 1 else kwargs.get("min")
        high = args[2] if len(args) > 2 else kwargs.get("max")
        return isinstance(low, (int, float)) and low == 0 and high is None
    if func in passed:
        return True
    if func in SCALINGS:
        operands = [args[0] if args else None, args[1] if len(args) > 1 else kwargs.get("other")]
        if func in _REVERSED_QUOTIENTS:  # c / x: x is the divisor
            return not _relevant(operands[0])
        if func in _QUOTIENTS:
            return not _relevant(operands[1])
        return sum(map(_relevant, operands)) <= 1
    return False


#: Attention written as functions: its scores are a softmax of a product of two activations.
ATTENTION = _collect(["scaled_dot_product_attention", "multi_head_attention_forward", "softmax", "softmax_",
                      "log_softmax", "softmin"])
#: Products of matrices: attention when both factors carry relevance (queries and keys, weights and values).
_MATRIX_PRODUCTS = _collect(["matmul", "__matmul__", "__rmatmul__", "bmm", "mm", "einsum", "baddbmm"])
#: Gates: a sigmoid of an activation, which then scales another one.
_GATES = _collect(["sigmoid", "sigmoid_", "hardsigmoid"])
#: Norms written as functions; the norm rules cover only the modules of :data:`SegExplainLib.engine.rules.base.NORMS`.
NORM_FUNCTIONS = _collect(["layer_norm", "rms_norm", "group_norm", "instance_norm", "batch_norm", "normalize",
                           "local_response_norm"])

# Kinds of operation without a rule, most fundamental first, and what the user can do about each. The most
# fundamental one present is what the user must hear: while attention remains, making a norm or a convolution a
# module is wasted effort, and no module can stand in for attention or for a product of two activations.
_OBSTACLES = (
    "attention has no rule here",
    "a product of two activations (a gate) has no rule here",
    "the norm rules cover only the modules nn.BatchNorm, nn.InstanceNorm and nn.GroupNorm",
    "use a module for it (e.g. nn.Conv3d, nn.ELU, nn.Upsample)",
)


def _count_relevant(args: tuple) -> int:
    values = [v for a in args for v in (a if isinstance(a, (tuple, list)) else (a,))]
    return sum(map(_relevant, values))


def obstacle(func: Callable, args: tuple) -> tuple[int, str]:
    """How fundamental the missing rule of a refused operation is (0: attention, 1: a gate, 2: a norm, 3: an
    operation a module would cover) and what to tell the user about it."""
    name = getattr(func, "__name__", "")
    if func in ATTENTION or "attention" in name or (func in _MATRIX_PRODUCTS and _count_relevant(args) > 1):
        rank = 0
    elif func in SCALINGS or func in _GATES:
        rank = 1
    elif func in NORM_FUNCTIONS:
        rank = 2
    else:
        rank = 3
    return rank, _OBSTACLES[rank]


def function_name(func: Callable) -> str:
    """A readable name: ``F.softmax``, ``torch.sigmoid``, ``Tensor.mul``."""
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":
        return f"the property {getattr(getattr(func, '__self__', None), '__name__', '?')}"
    module = getattr(func, "__module__", None)
    if module in (None, "torch._C", "torch._tensor") or "Tensor" in getattr(func, "__qualname__", ""):
        return f"Tensor.{name}"
    return f"{module.replace('torch.nn.functional', 'F').replace('torch._C._nn', 'F')}.{name}"
