"""z-plus, with the sign checks that tell which inputs are signed."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .affine import affine_forward, affine_vjp, fusable, weight_dims
from .base import replace_backward
from .weighted import Term, WeightRule, signed_parts
from .window import RelevanceWindow


def _broadcast_bias(module: nn.Module, bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A weighted layer's bias shaped to add to its output ``y`` (channels in dim 1; last for ``nn.Linear``)."""
    return bias if isinstance(module, nn.Linear) else bias.reshape(-1, *(1,) * (y.dim() - 2))


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
        if ctx.sparse_relevance is not False:
            # A small target (a click, a box) leaves most of the decoder's output voxels without relevance: the
            # denominators z+ are computed in the backward pass, over the box of voxels that receive some. So they
            # are while the target is not yet known (read off this forward pass's logits): on signed inputs at no
            # extra cost, as the dense path below runs the same convolutions.
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
                 for part, gate, positive in signed_parts(x)]
        return [(1.0, terms)]


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
