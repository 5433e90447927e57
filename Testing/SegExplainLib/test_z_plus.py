"""The z-plus rule's fast forms against its literal form ``x+ W+ + x- W-`` on signed inputs, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from SegExplainLib.engine.rules import ZPlus
from SegExplainLib.engine.rules.affine import unwired
from SegExplainLib.engine.rules.base import PropagationContext
from SegExplainLib.engine.rules.weighted import WeightRule

LAYERS = {
    # name: (layer, input shape, output box that receives relevance when it is sparse)
    "conv1d": (lambda: nn.Conv1d(4, 5, 3, padding=1), (1, 4, 20), (slice(6, 11),)),
    "conv2d": (lambda: nn.Conv2d(4, 5, 3, padding=1), (1, 4, 9, 10), (slice(2, 4), slice(3, 6))),
    "conv3d": (lambda: nn.Conv3d(4, 5, 3, padding=1), (1, 4, 7, 8, 9), (slice(0, 2), slice(3, 5), slice(6, 9))),
    "conv3d_strided_no_bias": (lambda: nn.Conv3d(4, 5, 3, stride=2, padding=1, bias=False), (1, 4, 9, 8, 7),
                               (slice(1, 3), slice(0, 2), slice(2, 4))),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(4, 5, 2, stride=2), (1, 4, 8), (slice(3, 7),)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 5, 2, stride=2), (1, 4, 5, 6), (slice(2, 5), slice(0, 3))),
    "conv_transpose3d": (lambda: nn.ConvTranspose3d(4, 5, 3, stride=2, padding=1, output_padding=1),
                         (1, 4, 4, 5, 3), (slice(1, 4), slice(2, 6), slice(0, 2))),
    "linear": (lambda: nn.Linear(6, 5), (3, 6), (slice(1, 3),)),
}


def _input_gradient(forward, module, x, grad, ctx):
    leaf = x.clone().requires_grad_(True)
    y = forward(module, leaf, unwired(module), ctx)
    (g,) = torch.autograd.grad(y, leaf, grad_outputs=grad)
    return y.detach(), g


@pytest.mark.parametrize("sparse", [False, True], ids=["whole", "sparse"])
@pytest.mark.parametrize("partly_signed", [False, True], ids=["all_signed", "some_channels_signed"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_fast_forms_equal_the_literal_rule_on_signed_inputs(name, partly_signed, sparse):
    make, shape, box = LAYERS[name]
    torch.manual_seed(0)
    module = make().double().requires_grad_(False)
    x = torch.randn(shape, dtype=torch.float64)
    x[x < 0] *= 0.3  # LeakyReLU-like: negative inputs smaller than positive ones
    if partly_signed:  # a decoder's concatenation: a non-negative block beside the signed one
        x[:, :2] = x[:, :2].abs()
    with torch.no_grad():
        out_shape = module(x).shape
    grad = torch.zeros(out_shape, dtype=torch.float64)
    index = (slice(None), slice(None), *box) if x.dim() > 2 else (box[0], slice(None))
    grad[index] = torch.randn(grad[index].shape, dtype=torch.float64)
    ctx = PropagationContext(network_input=torch.zeros(1), input_sink=torch.zeros(1), sparse_relevance=sparse)
    rule = ZPlus(epsilon=1e-6)
    y, fast = _input_gradient(ZPlus.forward.__get__(rule), module, x, grad, ctx)
    # the generic weight rule runs the terms of ZPlus.groups: x+ with W+ and x- with W-, through autograd
    _, literal = _input_gradient(WeightRule.forward.__get__(rule), module, x, grad, ctx)
    with torch.no_grad():
        torch.testing.assert_close(y, module(x), rtol=1e-12, atol=1e-12)
    assert literal.abs().max() > 0
    torch.testing.assert_close(fast, literal, rtol=1e-10, atol=1e-12)
