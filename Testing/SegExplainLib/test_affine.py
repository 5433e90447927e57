"""affine_forward / affine_vjp: a weighted layer and its transpose, routed to oneDNN on CPU where they can be."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from SegExplainLib.engine.rules.affine import affine_forward, affine_vjp

LAYERS = {
    # name: (layer, input shape, calls that go to oneDNN directly: the layer's and its transpose's)
    "conv3d_k3_p1": (lambda: nn.Conv3d(4, 5, 3, padding=1), (1, 4, 6, 7, 8), 2),
    "conv3d_k3_p0": (lambda: nn.Conv3d(4, 5, 3), (1, 4, 6, 7, 8), 2),
    "conv3d_k2_p1": (lambda: nn.Conv3d(4, 5, 2, padding=1), (2, 4, 6, 7, 8), 2),
    "conv3d_k3_d2_p2": (lambda: nn.Conv3d(4, 5, 3, padding=2, dilation=2), (1, 4, 9, 9, 9), 2),
    "conv3d_k1_no_bias": (lambda: nn.Conv3d(4, 5, 1, bias=False), (1, 4, 6, 7, 8), 2),
    "conv2d_k5_p2": (lambda: nn.Conv2d(4, 5, 5, padding=2), (1, 4, 12, 11), 2),
    # the transpose of these has no stride-1, single-group kernel form: it goes through convolution_backward
    "conv3d_k3_s2_p1": (lambda: nn.Conv3d(4, 5, 3, stride=2, padding=1), (1, 4, 7, 8, 9), 1),
    "conv3d_groups2": (lambda: nn.Conv3d(4, 6, 3, padding=1, groups=2), (1, 4, 6, 7, 8), 1),
    "conv3d_p_beyond_kernel": (lambda: nn.Conv3d(4, 5, 3, padding=3), (1, 4, 6, 7, 8), 1),
    "conv1d_k3_p1": (lambda: nn.Conv1d(4, 5, 3, padding=1), (1, 4, 20), 0),
    # a transposed convolution's transpose is a strided convolution; its own forward stays with torch
    "up3d_k2_s2": (lambda: nn.ConvTranspose3d(4, 5, 2, stride=2), (1, 4, 5, 6, 7), 1),
    "up3d_k3_s2_p1_op1": (lambda: nn.ConvTranspose3d(4, 5, 3, stride=2, padding=1, output_padding=1),
                          (1, 4, 5, 6, 7), 1),
    "up2d_groups2": (lambda: nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), (1, 4, 6, 7), 1),
}


@pytest.fixture
def onednn_calls(monkeypatch):
    calls = []
    original = torch.mkldnn_convolution

    def counting(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(torch, "mkldnn_convolution", counting)
    return calls


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_and_transpose_match_torch_in_float32(name, onednn_calls):
    torch.manual_seed(0)
    make, shape, direct_calls = LAYERS[name]
    layer = make()
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    (expected_vjp,) = torch.autograd.grad(y, x, grad)
    bias = None if layer.bias is None else layer.bias.detach()

    out = affine_forward(layer, x.detach(), layer.weight.detach(), bias)
    vjp = affine_vjp(layer, x.detach(), layer.weight.detach(), grad)

    torch.testing.assert_close(out, y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vjp, expected_vjp, rtol=1e-5, atol=1e-5)
    assert len(onednn_calls) == direct_calls


@pytest.mark.parametrize("padding", ["same", "reflect"])
def test_layers_with_other_padding_run_their_own_forward(padding, onednn_calls):
    layer = nn.Conv3d(2, 3, 3, padding="same") if padding == "same" else nn.Conv3d(2, 3, 3, padding=1,
                                                                                    padding_mode="reflect")
    x = torch.randn(1, 2, 5, 6, 7)
    torch.testing.assert_close(affine_forward(layer, x, layer.weight.detach(), layer.bias.detach()),
                               layer(x).detach())
    assert onednn_calls == []


def test_double_precision_and_other_devices_stay_on_torch(onednn_calls):
    layer = nn.Conv3d(2, 3, 3, padding=1).double()
    x = torch.randn(1, 2, 5, 5, 5, dtype=torch.float64)
    out = affine_forward(layer, x, layer.weight.detach(), layer.bias.detach())
    torch.testing.assert_close(out, layer(x).detach())
    affine_vjp(layer, x, layer.weight.detach(), torch.randn_like(out))
    assert onednn_calls == []
