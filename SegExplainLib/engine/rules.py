"""Rules: how one layer passes relevance back.

The engine propagates a *modified gradient* ``g`` rather than relevance itself: at every tensor ``t`` of the
network the relevance is ``R_t = t * g_t``. Propagating ``g`` instead of ``R`` has two consequences that make LRP as
cheap as a gradient:

* Operations that are positively homogeneous (ReLU, LeakyReLU, PReLU, max pooling, concatenation, slicing, padding,
  nearest upsampling) pass ``g`` exactly like the gradient does, so the plain autograd backward is already the LRP
  identity rule there and no hook is needed.
* For a linear layer ``z = W x + b`` the epsilon rule ``R_x = x * W^T (R_z / (z + eps))`` becomes
  ``g_x = W^T (g_z * z / (z + eps))``: one element-wise factor on the incoming gradient, then the layer's own
  backward. A residual addition is the LRP-0 rule (relevance split in proportion to the two contributions).

Rules that change the weights (z-plus, alpha-beta, gamma, flat, w-square, z-box) run a modified forward of the layer
in the backward pass and return ``g`` (or, for rules of the first layer, the input relevance itself).

For a small target, z-plus and epsilon run a convolution's backward on the box of its output voxels that receive
relevance (:class:`RelevanceWindow`); outside that box the relevance is exactly zero.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SegExplainError
from .kernels import onednn_eligible

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONVOLUTIONS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
WEIGHTED_LINEAR = (*CONVOLUTIONS, *TRANSPOSED_CONVOLUTIONS, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
         nn.GroupNorm)


def stabilize(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``z + epsilon * sign(z)`` with ``sign(0) = 1``, so that no denominator is zero."""
    return torch.where(z >= 0, z + epsilon, z - epsilon)


def epsilon_factor(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``z / (z + epsilon * sign(z))``, which is ``|z| / (|z| + epsilon)``: the epsilon rule as a gradient factor."""
    if epsilon == 0.0:
        return (z != 0).to(z.dtype)
    # as 1 - eps / (|z| + eps): one new tensor and four in-place passes, a third faster than |z| / (|z| + eps);
    # the two forms differ by one rounding of a number below 1
    return z.abs().add_(epsilon).reciprocal_().mul_(-epsilon).add_(1.0)


@dataclass
class PropagationContext:
    """What a rule needs to know besides its own layer.

    Attributes:
        network_input: The input tensor of the explained forward pass (rules of the first layer check it).
        input_sink: A zero tensor shaped like the input: rules of the first layer send the input relevance to it as
            its gradient, because relevance such as the flat rule's cannot be written as ``input * g``.
        layer_filter: An amplitude filter applied to the relevance entering every linear layer and norm layer
            (Tjoa et al.'s layer-wise mode), or ``None``.
        sparse_relevance: Whether the explained outputs are a small box of the output grid (a click, a box, a
            small segment): rules then compute what they need in the backward pass, and only over the part of each
            layer that receives relevance.
    """

    network_input: torch.Tensor
    input_sink: torch.Tensor
    layer_filter: Any = None
    sparse_relevance: bool = False

    def filtered(self, relevance: torch.Tensor) -> torch.Tensor:
        if self.layer_filter is None:
            return relevance
        return relevance * self.layer_filter.factor(relevance)

    def reads_input(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is the network input or a copy of it (padded, cropped, reshaped): a first layer's input."""
        if x is self.network_input:
            return True
        node = x.grad_fn
        while node is not None and type(node).__name__ in _COPY_NODES:
            parents = [parent for parent, _ in node.next_functions if parent is not None]
            if len(parents) != 1:
                return False
            node = parents[0]
        return type(node).__name__ == "AccumulateGrad" and node.variable is self.network_input

    def to_input(self, x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        """Relevance of a first layer's input ``x`` carried back to the network input through the copies.

        A copy passes relevance like a gradient: each input voxel gets the relevance of all its copies, and padding
        voxels, which are no input voxels, drop theirs.
        """
        if x is self.network_input:
            return relevance
        (carried,) = torch.autograd.grad(x, self.network_input, grad_outputs=relevance, retain_graph=True,
                                         create_graph=torch.is_grad_enabled())
        return carried


_COPY_NODES = frozenset({
    "ConstantPadNdBackward0", "ReplicationPad1DBackward0", "ReplicationPad2DBackward0", "ReplicationPad3DBackward0",
    "ReflectionPad1DBackward0", "ReflectionPad2DBackward0", "ReflectionPad3DBackward0", "SliceBackward0",
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "UnsqueezeBackward0", "SqueezeBackward0",
    "SqueezeBackward1", "PermuteBackward0", "TransposeBackward0", "CloneBackward0", "AliasBackward0",
    "ToCopyBackward0", "ExpandBackward0",
})


class _ReplaceBackward(torch.autograd.Function):
    """Identity on the layer output whose backward is ``propagate(x, saved, grad)`` instead of the layer's own."""

    @staticmethod
    def forward(ctx, x, y, sink, saved, propagate):  # noqa: D102 - autograd protocol
        ctx.propagate = propagate
        ctx.save_for_backward(x, saved)
        ctx.has_sink = sink is not None
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 - autograd protocol
        x, saved = ctx.saved_tensors
        grad_x = ctx.propagate(x, saved, grad)
        if ctx.has_sink:
            return None, None, grad_x, None, None
        return grad_x, None, None, None, None


class _TransformGrad(torch.autograd.Function):
    """Identity whose backward replaces the gradient by ``transform(saved, grad)``; the layer's backward follows."""

    @staticmethod
    def forward(ctx, y, saved, transform):  # noqa: D102 - autograd protocol
        ctx.transform = transform
        ctx.save_for_backward(saved)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 - autograd protocol
        (saved,) = ctx.saved_tensors
        return ctx.transform(saved, grad), None, None


def replace_backward(x: torch.Tensor, y: torch.Tensor, propagate: Callable, sink: torch.Tensor | None = None,
                     saved: torch.Tensor | None = None):
    """Return ``y`` cut from its own graph, reconnected to ``x`` (or to ``sink``) through ``propagate``.

    ``propagate(x, saved, grad)`` receives what the rule saved in the forward pass: by default the output ``y``;
    rules that can fold their denominators into one tensor save that instead, to keep memory at the gradient's.
    """
    y = y.detach()
    return _ReplaceBackward.apply(x, y, sink, y if saved is None else saved, propagate)


def transform_grad(y: torch.Tensor, transform: Callable, saved: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``y`` unchanged; on the way back its gradient becomes ``transform(saved, grad)`` (``saved``: ``y``)."""
    return _TransformGrad.apply(y, y.detach() if saved is None else saved, transform)


class Rule(abc.ABC):
    """How one module passes relevance back.

    ``categories`` lists the kinds of module the rule can be attached to (see
    :data:`SegExplainLib.engine.composites.CATEGORIES`); ``first_layer_only`` rules need the network input as the layer's
    input, because their relevance does not factor as ``input * g``.
    """

    name: ClassVar[str]
    categories: ClassVar[frozenset[str]]
    first_layer_only: ClassVar[bool] = False

    @abc.abstractmethod
    def wrap(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: PropagationContext) -> torch.Tensor:
        """Return the module output ``y`` wired so that the backward pass applies this rule."""

    def forward(self, module: nn.Module, x: torch.Tensor, original: Callable, ctx: PropagationContext):
        """Run the module on ``x`` (its own ``forward`` is ``original``) and wire the output for this rule.

        Rules may compute what their backward pass needs in the same call as the output (see :class:`ZPlus`).
        """
        return self.wrap(module, x, original(x), ctx)

    def options(self) -> dict[str, Any]:
        """The rule's name and parameters, for the explanation record."""
        return {"rule": self.name}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.options().items() if k != "rule")
        return f"{type(self).__name__}({params})"


def _check_non_negative(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or value < 0 or value != value:
        msg = f"{name} must be a non-negative number, got {value!r}"
        raise SegExplainError(msg)
    return float(value)


class Epsilon(Rule):
    """LRP-epsilon: ``R_x = x * W^T (R_z / (z + eps sign z))``; biases absorb part of the relevance.

    On a norm layer the rule treats the layer as the affine map it is for the current input (statistics frozen).

    Args:
        epsilon: Stabilizer added to every denominator. ``epsilon=0`` is LRP-0 (the rule :class:`Zero`).
    """

    name = "epsilon"
    categories = frozenset({"convolution", "dense", "parameter_free", "norm"})

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = _check_non_negative("epsilon", epsilon)

    def options(self) -> dict[str, Any]:
        return {"rule": self.name, "epsilon": self.epsilon}

    def _ratio(self, y: torch.Tensor, grad: torch.Tensor, ctx: PropagationContext) -> torch.Tensor:
        """``R_y / (y + eps)`` with ``R_y = y * grad`` after the layer-wise filter."""
        relevance = ctx.filtered(y * grad)
        if self.epsilon == 0.0:
            return torch.where(y == 0, torch.zeros_like(y), relevance / torch.where(y == 0, 1.0, y))
        return relevance / stabilize(y, self.epsilon)

    def forward(self, module, x, original, ctx):
        if not isinstance(module, CONVOLUTIONS) or not zero_padded(module) or ctx.layer_filter is not None:
            return super().forward(module, x, original, ctx)
        # A convolution and its transpose run through affine_forward / affine_vjp (oneDNN on CPU), the transpose
        # on the part of the output that receives relevance; the rule is one factor on the gradient.
        weight = module.weight.detach()
        with torch.no_grad():
            y = affine_forward(module, x, weight, None if module.bias is None else module.bias.detach())
            factor = epsilon_factor(y, self.epsilon)

        def transpose_part(window, x_part, grad, saved):
            return affine_vjp(module, x_part, weight, window.output(grad) * window.output(saved), window.padding)

        return replace_backward(x, y, lambda x_in, saved, grad: RelevanceWindow.propagate(
            module, x_in, grad, saved, transpose_part, ctx), saved=factor)

    def wrap(self, module, x, y, ctx):
        norm = isinstance(module, NORMS)
        scale = frozen_norm_scale(module, x) if norm else None
        if ctx.layer_filter is None:
            # the rule is one factor on the gradient, computed now: the backward pass is a single product
            with torch.no_grad():
                factor = epsilon_factor(y, self.epsilon)
                if norm:
                    factor = factor * scale
            if norm:
                return replace_backward(x, y, lambda x_in, saved, grad: grad * saved, saved=factor)
            return transform_grad(y, lambda saved, grad: grad * saved, saved=factor)
        if norm:
            return replace_backward(x, y, lambda x_in, y_out, grad: self._ratio(y_out, grad, ctx) * scale)
        return transform_grad(y, lambda y_out, grad: self._ratio(y_out, grad, ctx))


class Zero(Epsilon):
    """LRP-0: the epsilon rule without stabilizer (gradient x input on ReLU networks without biases)."""

    name = "zero"

    def __init__(self) -> None:
        super().__init__(epsilon=0.0)

    def options(self) -> dict[str, Any]:
        return {"rule": self.name}


class Pass(Rule):
    """Relevance passes through unchanged: ``R_x = R_y`` (element-wise activations, norm layers).

    On a norm layer this equals merging the layer, with its statistics frozen, into the preceding convolution under
    the z-plus rule (for a positive scale), which keeps relevance conserved; it is the default for norm layers that a
    canonizer cannot merge (InstanceNorm, GroupNorm).
    """

    name = "pass"
    categories = frozenset({"norm", "activation"})

    def __init__(self, epsilon: float = 1e-12) -> None:
        self.epsilon = _check_non_negative("epsilon", epsilon)

    def options(self) -> dict[str, Any]:
        return {"rule": self.name, "epsilon": self.epsilon}

    def wrap(self, module, x, y, ctx):
        if ctx.layer_filter is None or not isinstance(module, NORMS):
            # the rule is one factor y / x on the gradient, computed now: the backward pass is a single product
            with torch.no_grad():
                factor = y / stabilize(x, self.epsilon)
            return replace_backward(x, y, lambda x_in, saved, grad: grad * saved, saved=factor)

        def propagate(x_in, y_out, grad):
            return ctx.filtered(y_out * grad) / stabilize(x_in, self.epsilon)

        return replace_backward(x, y, propagate)


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


@dataclass
class Term:
    """One modified forward ``sign * layer(input; weight, bias)`` inside a rule.

    ``gate`` marks terms whose input is the layer input restricted to a sign (``x * gate``); their contribution to
    the propagated ``g`` is ``gate * vjp``. Rules of the first layer ignore it and collect ``input * vjp``.
    """

    input: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    sign: float = 1.0


class WeightRule(Rule):
    """Base of rules that run modified forwards of a weighted layer (conv, transposed conv, linear).

    A subclass returns groups of :class:`Term`; each group ``(coefficient, terms)`` gets the denominator
    ``z_g = sum(sign * layer(input; weight, bias))`` and passes ``coefficient * R / z_g`` back through its terms.
    """

    categories = frozenset({"convolution", "dense"})

    def __init__(self, *, epsilon: float = 1e-6) -> None:
        self.epsilon = _check_non_negative("epsilon", epsilon)

    @abc.abstractmethod
    def groups(self, module: nn.Module, x: torch.Tensor) -> list[tuple[float, list[Term]]]:
        """The modified forwards of this rule for layer input ``x``."""

    def options(self) -> dict[str, Any]:
        return {"rule": self.name, "epsilon": self.epsilon}

    def _check_reads_input(self, module: nn.Module, x: torch.Tensor, ctx: PropagationContext) -> None:
        if self.first_layer_only and not ctx.reads_input(x):
            msg = (f"rule {self.name!r} applies to a layer that reads the network input, but "
                   f"{type(module).__name__} receives an intermediate tensor")
            raise SegExplainError(msg)

    def wrap(self, module, x, y, ctx):
        self._check_reads_input(module, x, ctx)

        def propagate(x_in, y_out, grad):
            relevance = ctx.filtered(y_out * grad)
            create_graph = torch.is_grad_enabled()
            total = torch.zeros_like(x_in)
            for coefficient, terms in self.groups(module, x_in):
                with torch.enable_grad():
                    leaves = [term.input.detach().requires_grad_(True) for term in terms]
                    z = sum(term.sign * affine_forward(module, leaf, term.weight, term.bias)
                            for term, leaf in zip(terms, leaves))
                ratio = coefficient * relevance / stabilize(z, self.epsilon)
                vjps = torch.autograd.grad(z, leaves, grad_outputs=ratio, create_graph=create_graph)
                for term, vjp in zip(terms, vjps):
                    if self.first_layer_only:
                        total = total + term.input * vjp
                    else:
                        total = total + (vjp if term.gate is None else term.gate * vjp)
            return ctx.to_input(x, total) if self.first_layer_only else total

        sink = ctx.input_sink if self.first_layer_only else None
        return replace_backward(x, y, propagate, sink)


def _broadcast_bias(module: nn.Module, bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A weighted layer's bias shaped to add to its output ``y`` (channels in dim 1; last for ``nn.Linear``)."""
    return bias if isinstance(module, nn.Linear) else bias.reshape(-1, *(1,) * (y.dim() - 2))


def _signed_parts(x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    """``(x_part, gate, positive)`` for the positive part and, if present, the negative part of ``x``."""
    parts = [(x.clamp(min=0), (x > 0).to(x.dtype), True)]
    if bool((x < 0).any()):
        parts.append((x.clamp(max=0), (x < 0).to(x.dtype), False))
    return parts


class ZPlus(WeightRule):
    """z-plus (Tjoa et al.): ``R_i = sum_j x_i w_ij+ / sum_k x_k w_kj+ R_j``, positive contributions only.

    For signed inputs (after LeakyReLU) the positive contributions are ``x+ w+`` and ``x- w-``; on non-negative
    activations this is exactly the paper's rule and relevance is conserved. Biases are ignored.
    """

    name = "z_plus"

    def forward(self, module, x, original, ctx):
        if not fusable(module):
            return super().forward(module, x, original, ctx)
        weight = module.weight.detach()
        bias = None if module.bias is None else module.bias.detach()
        rectified = known_non_negative(x)
        if ctx.sparse_relevance:
            # A small target (a click, a box) leaves most of the decoder's output voxels without relevance: the
            # denominators z+ are computed in the backward pass, over the box of voxels that receive some.
            with torch.no_grad():
                y = affine_forward(module, x, weight, bias)

            def propagate_part(window, x_part, grad, y_out):
                signed = None if rectified else _signed_channels(x_part)
                with torch.no_grad():
                    if signed is None:
                        z_plus = affine_forward(module, x_part, weight.clamp(min=0), None, window.padding)
                    else:  # W x on the window is the output's part less its bias: no convolution for it
                        y_part = window.output(y_out)
                        z_plus = self._signed_denominators(
                            module, x_part, y_part if bias is None else y_part - _broadcast_bias(module, bias, y_part),
                            window.padding)
                    z_plus.add_(self.epsilon)
                ratio = ctx.filtered(window.output(y_out) * window.output(grad)) / z_plus
                return self._transposed(module, x_part, ratio, signed, window.padding)

            return replace_backward(x, y, lambda x_in, y_out, grad: RelevanceWindow.propagate(
                module, x_in, grad, y_out, propagate_part, ctx))
        # Otherwise every voxel needs z+. On non-negative inputs it comes from the same call as the output (weights
        # [W; W+]): one larger convolution was cheaper than two (1.05x against 1.23x a gradient at size M, 1.45x
        # against 1.53x at L). On signed inputs it is (W x + |W| |x|) / 2, one convolution besides the output's.
        signed = None if rectified else _signed_channels(x)
        with torch.no_grad():  # the backward pass is this rule's own: no graph needed
            if signed is None:
                channels = weight.shape[weight_dims(module)[1]]
                # the z+ half gets the stabilizer as its bias: z+ + eps comes out of the same call
                fused_bias = torch.full((2 * channels,), self.epsilon, dtype=weight.dtype, device=weight.device)
                fused_bias[:channels] = 0.0 if bias is None else bias
                fused = affine_forward(module, x, torch.cat([weight, weight.clamp(min=0)],
                                                            dim=weight_dims(module)[1]), fused_bias)
                y, z_plus = fused.chunk(2, dim=1)
            else:
                y = affine_forward(module, x, weight, None)
                z_plus = self._signed_denominators(module, x, y, None).add_(self.epsilon)
                if bias is not None:
                    y += _broadcast_bias(module, bias, y)
            # without a layer-wise filter only y / (z+ + eps) is needed later: one tensor, as the gradient keeps
            if ctx.layer_filter is None:
                saved = y / z_plus
            else:
                saved = fused if signed is None else torch.cat([y, z_plus], dim=1)

        def propagate(x_in, saved, grad):
            if ctx.layer_filter is None:
                ratio = grad * saved
            else:
                y_out, stabilized = saved.chunk(2, dim=1)
                ratio = ctx.filtered(y_out * grad) / stabilized
            return self._transposed(module, x_in, ratio, signed, None)

        return replace_backward(x, y, propagate, saved=saved)

    @staticmethod
    def _signed_denominators(module, x, wx, padding):
        """z+ of signed inputs (after LeakyReLU, or an up-convolution) from ``wx = W x``, the output without bias.

        ``x+ W+ + x- W- = (W x + |W| |x|) / 2`` (with ``W+- = (W +- |W|) / 2``, ``x+- = (x +- |x|) / 2``): one
        convolution besides the layer's own instead of ``x W+`` and ``x- (W- - W+)``. The clamp keeps a z+ that
        rounding took below zero (all contributions negative) at zero, as the sum of non-negative terms is.
        """
        weight = module.weight.detach()
        return affine_forward(module, x.abs(), weight.abs(), None, padding).add_(wx).mul_(0.5).clamp_(min=0)

    @staticmethod
    def _transposed(module, x, ratio, signed, padding):
        """``g_x``: ``W+^T ratio``, and ``W-^T ratio`` at the negative inputs of the signed channels."""
        weight = module.weight.detach()
        on_positive = affine_vjp(module, x, weight.clamp(min=0), ratio, padding)
        if signed is None:
            # zero inputs get no relevance (R = x g = 0); their g dies in the ReLU (or padding) that made them
            return on_positive
        # only the signed channels mix the two paths: their negative inputs take W-^T (a zero input carries no
        # relevance, R = x g = 0, whichever it takes)
        x_signed = _channels(x, 1, signed)
        on_negative = affine_vjp(module, x_signed, _channels(weight, weight_dims(module)[0], signed).clamp(max=0),
                                 ratio, padding)
        if torch.is_grad_enabled():
            mixed = torch.where(x_signed < 0, on_negative, _channels(on_positive, 1, signed))
            return torch.cat([on_positive[:, :signed.start], mixed, on_positive[:, signed.stop:]], dim=1)
        on_signed = _channels(on_positive, 1, signed)
        torch.where(x_signed < 0, on_negative, on_signed, out=on_signed)
        return on_positive

    def groups(self, module, x):
        weight = module.weight.detach()
        terms = [Term(part, weight.clamp(min=0) if positive else weight.clamp(max=0), None, gate)
                 for part, gate, positive in _signed_parts(x)]
        return [(1.0, terms)]


def occupied_box(t: torch.Tensor) -> list[tuple[int, int]] | None:
    """``(start, stop)`` per spatial dim of the box around the voxels of ``t`` (B, C, *spatial) that are not zero.

    ``None`` when ``t`` is zero everywhere. A voxel counts when any batch element or channel is non-zero there.
    """
    values = t.detach().flatten(0, 1)
    occupied = (values.amax(0) != 0) | (values.amin(0) != 0)  # far cheaper than ne() and any() over all channels
    axes = range(occupied.dim())
    box = []
    for axis in axes:
        profile = occupied.any(dim=[d for d in axes if d != axis]) if occupied.dim() > 1 else occupied
        hits = torch.nonzero(profile).flatten()
        if not len(hits):
            return None
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return box


def box_share(t: torch.Tensor) -> float:
    """Share of the spatial voxels of ``t`` inside :func:`occupied_box` (0 for an all-zero tensor)."""
    box = occupied_box(t)
    return 0.0 if box is None else math.prod(stop - start for start, stop in box) / math.prod(t.shape[2:])


@dataclass
class RelevanceWindow:
    """The box of a layer's output voxels that receive relevance, and the part of its input that box reads.

    Outside the box the incoming relevance is exactly zero, so a rule's modified forward and its transposed pass
    need only be computed inside it. The input part carries explicit zero padding where the box reaches the image
    border, so the layer runs on it without padding of its own.

    Attributes:
        outputs: Index of the output box (all batch elements and channels), or ``None`` for the whole output.
        pads: ``F.pad`` widths that take the input to the part the box reads (negative widths crop), or ``None``.
        padding: The padding to run the layer with: its own for the whole output, zero for a box.
    """

    outputs: tuple[slice, ...] | None
    pads: list[int] | None
    padding: Any

    # above this share of the output voxels a box is not worth its copies
    MAX_SHARE: ClassVar[float] = 0.5

    @classmethod
    def whole(cls) -> RelevanceWindow:
        return cls(None, None, None)

    @classmethod
    def propagate(cls, module: nn.Module, x: torch.Tensor, grad: torch.Tensor, saved: torch.Tensor,
                  on_part: Callable, ctx: PropagationContext) -> torch.Tensor:
        """A rule's backward pass on the window of ``grad``: ``on_part(window, x_part, grad, saved)`` returns the
        input gradient of the part, which goes back into a zero tensor shaped like ``x``.

        Without ``ctx.sparse_relevance`` the window is the whole output, without looking at ``grad``. So it is when
        a graph of this backward pass is built (the normalized aggregation differentiates it w.r.t. the seed): the
        graph needs every output voxel, also those whose relevance happens to be zero.
        """
        sparse = ctx.sparse_relevance and not torch.is_grad_enabled()
        window = cls.of(module, x, grad) if sparse else cls.whole()
        if window is None:
            return torch.zeros_like(x)
        return window.scatter(on_part(window, window.input(x), grad, saved))

    @classmethod
    def of(cls, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> RelevanceWindow | None:
        """The window of the non-zero voxels of ``grad``, the output gradient of ``module`` on input ``x``.

        ``None`` when ``grad`` is zero everywhere; the whole output for layers other than convolutions, and when the
        box holds more than half of the output voxels.
        """
        if not isinstance(module, CONVOLUTIONS) or not zero_padded(module):
            return cls.whole() if bool(grad.any()) else None
        box = occupied_box(grad)
        if box is None:
            return None
        if math.prod(stop - start for start, stop in box) > cls.MAX_SHARE * math.prod(grad.shape[2:]):
            return cls.whole()
        pads = []  # F.pad lists the last dim first
        for (start, stop), size, kernel, stride, padding, dilation in reversed(list(zip(
                box, x.shape[2:], module.kernel_size, module.stride, module.padding, module.dilation))):
            first = start * stride - padding  # the input voxels the box reads, in unpadded coordinates
            last = (stop - 1) * stride - padding + dilation * (kernel - 1)
            pads += [-first, last + 1 - size]
        return cls((slice(None), slice(None), *(slice(start, stop) for start, stop in box)), pads, (0,) * len(box))

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.pads is None else F.pad(x, self.pads)

    def output(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.outputs is None else y[self.outputs]

    def scatter(self, grad_part: torch.Tensor) -> torch.Tensor:
        """The input gradient of the part, placed back into a zero tensor shaped like the layer input."""
        return grad_part if self.pads is None else F.pad(grad_part, [-width for width in self.pads])


# Autograd nodes whose output is non-negative when all their inputs are (a ReLU's is in any case): an input made by
# them needs no scan for negative values.
_RECTIFYING_NODES = frozenset({"ReluBackward0", "ThresholdBackward0"})
_SIGN_KEEPING_NODES = frozenset({"MaxPool1DWithIndicesBackward0", "MaxPool2DWithIndicesBackward0",
                                 "MaxPool3DWithIndicesBackward0", "CatBackward0", "SliceBackward0", "ViewBackward0",
                                 "CloneBackward0", "UpsampleNearest1DBackward0", "UpsampleNearest2DBackward0",
                                 "UpsampleNearest3DBackward0"})


def known_non_negative(x: torch.Tensor) -> bool:
    """Whether the operations that made ``x`` guarantee it is non-negative (a ReLU, then pooling or concatenation)."""
    return x.grad_fn is not None and _made_non_negative(x.grad_fn)


def _made_non_negative(node: Any, depth: int = 0) -> bool:
    name = type(node).__name__
    if name in _RECTIFYING_NODES:
        return True
    if name not in _SIGN_KEEPING_NODES or depth > 8:
        return False
    parents = [parent for parent, _ in node.next_functions if parent is not None]
    return bool(parents) and all(_made_non_negative(parent, depth + 1) for parent in parents)


def _signed_channels(x: torch.Tensor) -> slice | None:
    """The range of channels of ``x`` from the first to the last that holds negative values; ``None`` if none does.

    A range, not a list: in a decoder's concatenation the signed channels are the up-convolution's block, and a
    range of channels is a view rather than a copy.
    """
    negative = torch.nonzero(x.detach().amin(dim=[d for d in range(x.dim()) if d != 1]) < 0).flatten()
    return slice(int(negative[0]), int(negative[-1]) + 1) if len(negative) else None


def _channels(t: torch.Tensor, dim: int, channels: slice) -> torch.Tensor:
    return t.narrow(dim, channels.start, channels.stop - channels.start)


class AlphaBeta(WeightRule):
    """Alpha-beta: ``alpha`` times the positive contributions minus ``beta`` times the negative ones.

    ``alpha - beta = 1`` keeps relevance conserved; presets: alpha1-beta0 (equals z-plus) and alpha2-beta1.

    Args:
        alpha: Weight of positive contributions.
        beta: Weight of negative contributions.
    """

    name = "alpha_beta"

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, *, epsilon: float = 1e-6) -> None:
        super().__init__(epsilon=epsilon)
        self.alpha = _check_non_negative("alpha", alpha)
        self.beta = _check_non_negative("beta", beta)
        if abs(self.alpha - self.beta - 1.0) > 1e-9:
            msg = f"alpha - beta must equal 1 to conserve relevance, got alpha={alpha!r}, beta={beta!r}"
            raise SegExplainError(msg)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "alpha": self.alpha, "beta": self.beta}

    def groups(self, module, x):
        weight = module.weight.detach()
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        parts = _signed_parts(x)
        positive = [Term(p, w_pos if pos else w_neg, None, g) for p, g, pos in parts]
        negative = [Term(p, w_neg if pos else w_pos, None, g) for p, g, pos in parts]
        groups = [(self.alpha, positive)]
        if self.beta:
            groups.append((-self.beta, negative))
        return groups


class Gamma(WeightRule):
    """Gamma: weights ``w + gamma * w+`` (for negative inputs ``w + gamma * w-``), favouring positive evidence.

    Args:
        gamma: How much positive contributions are boosted (0 gives LRP-epsilon without biases' absorption).
    """

    name = "gamma"

    def __init__(self, gamma: float = 0.25, *, epsilon: float = 1e-6) -> None:
        super().__init__(epsilon=epsilon)
        self.gamma = _check_non_negative("gamma", gamma)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "gamma": self.gamma}

    def groups(self, module, x):
        weight = module.weight.detach()
        bias = None if module.bias is None else module.bias.detach()
        terms = []
        for part, gate, positive in _signed_parts(x):
            boost = weight.clamp(min=0) if positive else weight.clamp(max=0)
            bias_part = None if bias is None or not positive else bias + self.gamma * bias.clamp(min=0)
            terms.append(Term(part, weight + self.gamma * boost, bias_part, gate))
        return [(1.0, terms)]


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


class GuidedBackprop(Rule):
    """Guided Backprop on a rectifier: ``g_x = f'(x) * max(g_y, 0)``; f' is LeakyReLU's or PReLU's slope too."""

    name = "guided_backprop"
    categories = frozenset({"rectifier", "activation"})

    def wrap(self, module, x, y, ctx):
        def propagate(x_in, y_out, grad):
            with torch.enable_grad():
                leaf = x_in.detach().requires_grad_(True)
                out = unwired(module)(leaf)
            return torch.autograd.grad(out, leaf, grad_outputs=grad.clamp(min=0),
                                       create_graph=torch.is_grad_enabled())[0]

        return replace_backward(x, y, propagate)


class Deconvolution(Rule):
    """Deconvolution (Zeiler & Fergus): the backward signal goes through the rectifier itself, ``g_x = f(g_y)``.

    ReLU gives ``max(g, 0)``; LeakyReLU and PReLU keep their negative slope, as their forward does.
    """

    name = "deconvolution"
    categories = frozenset({"rectifier"})

    def wrap(self, module, x, y, ctx):
        return replace_backward(x, y, lambda x_in, y_out, grad: unwired(module)(grad))


RULES: dict[str, type[Rule]] = {
    rule.name: rule for rule in (Epsilon, Zero, Pass, ZPlus, AlphaBeta, Gamma, Flat, WSquare, ZBox,
                                 GuidedBackprop, Deconvolution)
}


def make_rule(spec: str | Rule, **options: Any) -> Rule:
    """A rule from its registry name (``"epsilon"``, ``"z_plus"``, ...) and options, or a rule as it is."""
    if isinstance(spec, Rule):
        return spec
    if spec not in RULES:
        msg = f"unknown LRP rule {spec!r}; expected one of {sorted(RULES)}"
        raise SegExplainError(msg)
    try:
        return RULES[spec](**options)
    except TypeError as error:
        msg = f"rule {spec!r} does not take options {sorted(options)}: {error}"
        raise SegExplainError(msg) from None
