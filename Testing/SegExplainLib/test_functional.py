"""Modules the engine does not know are walked: their functional operations pass when the gradient is their exact rule
(interpolation, scaling, padding, pooling, residual sums), and anything else raises naming the module and operation.

The reference is the matrix form of :mod:`lrp_reference`: a walked module is a linear map without bias, whose LRP-0
rule is written out densely; convolutions get the epsilon rule; rectifiers pass relevance unchanged.
"""

from __future__ import annotations

import copy
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lrp_reference import as_matrix, reference_layer
from torch import nn

from SegExplainLib.engine.gradients import Gradient
from SegExplainLib.engine.lrp import LRP, Deconvolution, GuidedBackprop
from SegExplainLib.engine.method import RULE_FREE_METHODS
from SegExplainLib.errors import UnsupportedLayerError
from SegExplainLib.models.realnets import Interpolate


class LayerScale(nn.Module):
    """A learned per-channel scale, as in ConvNeXt-style blocks: ``x * gamma``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 2.0, channels))

    def forward(self, x):
        return x * self.gamma.view(1, -1, *[1] * (x.dim() - 2))


class PadPoolCrop(nn.Module):
    """Pads, average-pools with stride 1 and crops back: slicing, padding and pooling in one unknown module."""

    def forward(self, x):
        return F.avg_pool3d(F.pad(x, [1, 1, 1, 1, 1, 1]), 3, stride=1)[:, :, :, :, :]


class ResidualSum(nn.Module):
    """An unknown module adding a scaled copy of its input: ``x + x / 2`` (a residual sum and a division)."""

    def forward(self, x):
        return x + x / 2


WALKED = {
    "interpolate_trilinear": lambda: Interpolate(2, "trilinear"),
    "interpolate_nearest": lambda: Interpolate(2, "nearest"),
    "layer_scale": lambda: LayerScale(3),
    "pad_pool_crop": PadPoolCrop,
    "residual_sum": ResidualSum,
}


def _model(walked: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(conv=nn.Conv3d(2, 3, 3, padding=1), act=nn.LeakyReLU(0.1, inplace=True),
                                     walked=walked, head=nn.Conv3d(3, 2, 1))).double().eval()


def _reference(model: nn.Sequential, x: torch.Tensor, seed: torch.Tensor) -> np.ndarray:
    """Epsilon on the convolutions, identity on the rectifier, LRP-0 (no bias, no stabilizer) on the walked map."""
    with torch.no_grad():
        a1 = model.conv(x)
        a2 = model.act(a1.clone())
        a3 = model.walked(a2)
        out = model.head(a3)
    R = (seed * out)[0].numpy().ravel()
    W, b = as_matrix(model.head, tuple(a3.shape[1:]))
    R = reference_layer("epsilon", W, b, a3[0].numpy().ravel(), R)
    W, b = as_matrix(model.walked, tuple(a2.shape[1:]))
    assert np.abs(b).max() == 0  # the walked module is linear without a bias
    R = reference_layer("epsilon", W, b, a2[0].numpy().ravel(), R, eps=0.0)
    W, b = as_matrix(model.conv, tuple(x.shape[1:]))
    return reference_layer("epsilon", W, b, x[0].numpy().ravel(), R).reshape(x.shape[1:])


@pytest.mark.parametrize("name", sorted(WALKED))
def test_an_unknown_module_with_exact_operations_is_walked_and_matches_the_matrix_reference(name):
    model = _model(WALKED[name]())
    x = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        seed = torch.randn_like(model(x))
    maps = LRP(composite="epsilon").attribute(model, x, seed).maps
    expected = _reference(model, x, seed)
    np.testing.assert_allclose(maps[0].numpy(), expected, rtol=1e-7, atol=1e-10 * np.abs(expected).max())


def test_guided_backprop_through_an_upsampling_wrapper_equals_it_through_nn_upsample():
    walked = _model(Interpolate(2, "trilinear"))
    known = copy.deepcopy(walked)
    known.walked = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
    x = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)
    seed = torch.randn(1, 2, 6, 8, 8, dtype=torch.float64)
    for method in (GuidedBackprop(), Deconvolution()):
        torch.testing.assert_close(method.attribute(walked, x, seed).maps, method.attribute(known, x, seed).maps,
                                   rtol=1e-12, atol=0)


class WeightStandardizedConv3d(nn.Conv3d):
    """A convolution subclass whose forward is another function than the convolution the rules would compute."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3, 4), keepdim=True)) / (w.std(dim=(1, 2, 3, 4), keepdim=True) + 1e-5)
        return F.conv3d(x, w, self.bias, self.stride, self.padding)


class Gate(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class DotAttention(nn.Module):
    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)
        return F.scaled_dot_product_attention(tokens, tokens, tokens).transpose(1, 2).reshape(x.shape)


class Clamp6(nn.Module):
    def forward(self, x):
        return x.clamp(0, 6)


class Reciprocal(nn.Module):
    def forward(self, x):
        return 1.0 / (x * x + 1.0)


class SelfAttention(nn.Module):
    """Attention over the voxels with nn.MultiheadAttention: a container, not a leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(3, 1, batch_first=True)

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)
        out, _ = self.attention(tokens, tokens, tokens)
        return out.transpose(1, 2).reshape(x.shape)


class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: D102
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class CustomFunction(nn.Module):
    def forward(self, x):
        return _Square.apply(x)


REFUSED = {
    "weight_standardized_conv": (WeightStandardizedConv3d(3, 3, 3, padding=1), r"conv3d in the forward of 'walked' "
                                 r"\(WeightStandardizedConv3d\)"),
    "sigmoid_gate": (Gate(), r"torch\.sigmoid in the forward of 'walked' \(Gate\)"),
    "scaled_dot_product_attention": (DotAttention(), r"scaled_dot_product_attention in the forward of 'walked' "
                                     r"\(DotAttention\).*attention has no rule"),
    "multihead_attention": (SelfAttention(), r"multi_head_attention_forward in the forward of 'walked\.attention' "
                            r"\(MultiheadAttention\).*attention has no rule"),
    "clamp_0_6": (Clamp6(), r"Tensor\.clamp in the forward of 'walked' \(Clamp6\)"),
    "reciprocal": (Reciprocal(), r"in the forward of 'walked' \(Reciprocal\)"),
    "custom_autograd_function": (CustomFunction(), r"custom autograd Function _Square"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
@pytest.mark.parametrize("method", [LRP, GuidedBackprop, Deconvolution], ids=lambda m: m.name)
def test_an_operation_no_rule_covers_raises_naming_the_module_path_and_the_operation(name, method):
    walked, message = REFUSED[name]
    model = _model(copy.deepcopy(walked))
    x = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        seed = torch.randn_like(model(x))
    if method is not LRP and name in ("weight_standardized_conv", "reciprocal"):
        # functional convolutions and products take the plain gradient in Guided Backprop: that is its rule there
        assert torch.isfinite(method().attribute(model, x, seed).maps).all()
        return
    with pytest.raises(UnsupportedLayerError, match=message):
        method().attribute(model, x, seed)
    # the gradient needs no rules: the same network is explained by it
    assert torch.isfinite(Gradient().attribute(model, x, seed).maps).all()


@pytest.mark.parametrize("method", [GuidedBackprop, Deconvolution], ids=lambda m: m.name)
def test_a_functional_rectifier_in_an_unknown_module_raises_for_guided_backprop(method):
    class LeakyWrapper(nn.Module):
        def forward(self, x):
            return F.leaky_relu(x, 0.1)

    model = _model(LeakyWrapper())
    x = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(UnsupportedLayerError, match=r"F\.leaky_relu in the forward of 'walked' \(LeakyWrapper\)"):
        method().attribute(model, x, torch.ones(1, 2, 3, 4, 4, dtype=torch.float64))
    # for LRP a rectifier is the identity rule: the wrapper gives the map of nn.LeakyReLU
    known = copy.deepcopy(model)
    known.walked = nn.LeakyReLU(0.1)
    seed = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(LRP(composite="epsilon").attribute(model, x, seed).maps,
                               LRP(composite="epsilon").attribute(known, x, seed).maps, rtol=1e-12, atol=0)


def test_lrp_on_swinunetr_names_its_attention_before_its_layer_norm_and_the_methods_that_run_instead():
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    # the BTCV bundle's network, small: one block and one head per stage, windows of 4; 64 voxels along one axis
    # leave the bottleneck's instance norm more than one voxel
    model = nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1),
                           num_heads=(1, 1, 1, 1), window_size=4).eval().requires_grad_(False)
    x = torch.randn(1, 1, 32, 32, 64)
    seed = torch.zeros(1, 2, 32, 32, 64)
    seed[:, 1, 12:16, 12:16, 28:32] = 1.0
    with pytest.raises(UnsupportedLayerError) as refused:
        LRP().attribute(model, x, seed)
    message = str(refused.value)
    # the layer norm comes first in the forward pass, but attention is what no module can replace
    assert re.match(r"functional Tensor\.matmul in the forward of 'swinViT\.layers1\.0\.blocks\.0\.attn' "
                    r"\(WindowAttention\) bypasses the 'epsilon_plus' rules; attention has no rule here", message)
    assert "also without a rule: F.layer_norm in 'swinViT' (SwinTransformer)" in message
    assert "use a module" not in message
    named = re.search(r"explain with (.+) instead", message).group(1).replace(" or ", ", ").split(", ")
    assert named == list(RULE_FREE_METHODS)
    # the gradient family differentiates the same forward pass at other inputs (occlusion runs it only): one
    # gradient stands for them here; docs/engine.md gives the check of all six
    assert torch.isfinite(Gradient().attribute(model, x, seed).maps).all()
