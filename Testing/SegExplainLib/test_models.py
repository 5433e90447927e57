"""Tests of the reference U-Net: shapes, wiring against a functional reference, hook-friendliness, validation."""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from SegExplainLib.errors import SegExplainError
from SegExplainLib.models.networks import (
    ACTIVATIONS,
    NORMS,
    UPSAMPLES,
    UNet3D,
    count_parameters,
    reference_unet,
    tiny_unet,
)

ALLOWED_LEAVES = (
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.Upsample,
    nn.Dropout2d,
    nn.Dropout3d,
)


def _leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not list(m.children())]


def _randomize_norm_stats(model: nn.Module) -> None:
    # Fresh BatchNorm is the identity in eval mode; random statistics make the reference comparison meaningful.
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)


def _apply_layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One eval-mode layer through torch.nn.functional, so the reference does not call the modules themselves."""
    if isinstance(layer, (nn.Conv2d, nn.Conv3d)):
        conv = F.conv3d if x.dim() == 5 else F.conv2d
        return conv(x, layer.weight, layer.bias, padding=layer.padding)
    if isinstance(layer, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
        conv_t = F.conv_transpose3d if x.dim() == 5 else F.conv_transpose2d
        return conv_t(x, layer.weight, layer.bias, stride=2)
    if isinstance(layer, (nn.BatchNorm2d, nn.BatchNorm3d)):
        return F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps)
    if isinstance(layer, nn.ReLU):
        return F.relu(x)
    if isinstance(layer, nn.LeakyReLU):
        return F.leaky_relu(x, 0.01)
    if isinstance(layer, nn.PReLU):
        return F.prelu(x, layer.weight)
    if isinstance(layer, nn.ELU):
        return F.elu(x)
    if isinstance(layer, nn.Upsample):
        if layer.mode == "nearest":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.interpolate(x, scale_factor=2, mode="trilinear" if x.dim() == 5 else "bilinear", align_corners=False)
    raise AssertionError(f"no reference for {type(layer).__name__}")


def _sequence(layers: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(layers, nn.Sequential):
        return _apply_layer(layers, x)
    for layer in layers:
        x = _apply_layer(layer, x)
    return x


def _reference_forward(model: UNet3D, x: torch.Tensor) -> torch.Tensor:
    """U-Net wiring written out by hand: zero pad at the end, pool, [skip, up] concatenation, crop."""
    size = x.shape[2:]
    multiple = 2 ** (model.depth - 1)
    padded = x.new_zeros(*x.shape[:2], *[-(-s // multiple) * multiple for s in size])
    padded[(..., *(slice(0, s) for s in size))] = x
    pool = F.max_pool3d if x.dim() == 5 else F.max_pool2d
    h = padded
    skips = []
    for level in range(model.depth - 1):
        h = _sequence(model.encoder[level], h)
        skips.append(h)
        h = pool(h, 2)
    h = _sequence(model.bottleneck, h)
    for step in range(model.depth - 1):
        up = _sequence(model.upsamplers[step], h)
        h = _sequence(model.decoder[step], torch.cat([skips[-1 - step], up], dim=1))
    out = _sequence(model.head, h)
    return out[(..., *(slice(0, s) for s in size))]


@pytest.mark.parametrize(
    ("spatial_dims", "depth", "size"),
    [
        (3, 4, (19, 48, 48)),
        (3, 3, (5, 9, 7)),
        (3, 2, (1, 2, 3)),
        (3, 1, (3, 4, 5)),
        (2, 4, (17, 30)),
        (2, 3, (1, 13)),
    ],
)
def test_output_spatial_size_equals_input(spatial_dims: int, depth: int, size: tuple[int, ...]) -> None:
    model = tiny_unet(spatial_dims=spatial_dims, depth=depth, out_channels=3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 2, *size))
    assert out.shape == (2, 3, *size)


@pytest.mark.parametrize(
    ("spatial_dims", "norm", "activation", "upsample", "size"),
    [
        (3, "batch", "relu", "transpose", (5, 9, 7)),
        (3, "none", "leaky_relu", "trilinear", (8, 6, 11)),
        (3, "batch", "prelu", "nearest", (4, 4, 4)),
        (3, "none", "elu", "transpose", (3, 10, 5)),
        (2, "batch", "relu", "trilinear", (13, 9)),
        (2, "none", "prelu", "nearest", (7, 16)),
    ],
)
def test_forward_matches_functional_reference(
    spatial_dims: int, norm: str, activation: str, upsample: str, size: tuple[int, ...]
) -> None:
    model = tiny_unet(spatial_dims=spatial_dims, depth=3, norm=norm, activation=activation, upsample=upsample)
    model = model.double().eval()
    _randomize_norm_stats(model)
    x = torch.randn(2, 2, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference_forward(model, x), rtol=1e-10, atol=1e-12)


def test_padding_is_zero_padding_at_the_end() -> None:
    # A 19-deep volume run through the model equals the same volume explicitly zero-padded to 24, then cropped.
    model = tiny_unet(depth=4).double().eval()
    _randomize_norm_stats(model)
    x = torch.randn(1, 2, 19, 8, 10, dtype=torch.float64)
    padded = torch.cat([x, x.new_zeros(1, 2, 5, 8, 10)], dim=2)
    padded = torch.cat([padded, padded.new_zeros(1, 2, 24, 8, 6)], dim=4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(padded)[:, :, :19, :, :10], rtol=1e-10, atol=1e-12)


def test_depth_one_is_a_single_block_and_head() -> None:
    model = tiny_unet(depth=1).double().eval()
    assert len(model.encoder) == len(model.pools) == len(model.upsamplers) == len(model.decoder) == 0
    x = torch.randn(1, 2, 3, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(model.bottleneck(x)), rtol=0, atol=0)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_every_combination_runs_forward_and_backward(spatial_dims: int) -> None:
    size = (6, 10) if spatial_dims == 2 else (4, 6, 5)
    x = torch.randn(2, 2, *size, requires_grad=True)
    for norm, activation, upsample in itertools.product(NORMS, ACTIVATIONS, UPSAMPLES):
        # Base 8 rather than 4: with 4 channels every ReLU of the last block can be dead, zeroing the input gradient.
        model = tiny_unet(
            spatial_dims=spatial_dims, norm=norm, activation=activation, upsample=upsample, dropout=0.2, base_channels=8
        )
        x.grad = None
        model(x).square().sum().backward()
        combo = (norm, activation, upsample)
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, combo
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (combo, name)


@pytest.mark.parametrize(
    ("norm", "norm_type"),
    [("batch", nn.BatchNorm3d), ("instance", nn.InstanceNorm3d), ("group", nn.GroupNorm), ("none", None)],
)
def test_norm_layers(norm: str, norm_type: type[nn.Module] | None) -> None:
    model = tiny_unet(norm=norm, base_channels=8, depth=3)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm3d, nn.InstanceNorm3d, nn.GroupNorm))]
    if norm_type is None:
        assert norms == []
        return
    # Two norms per block: 2 encoder + 1 bottleneck + 2 decoder blocks.
    assert len(norms) == 10 and all(type(m) is norm_type for m in norms)
    if norm == "instance":
        assert all(m.affine for m in norms)
    if norm == "group":
        assert [m.num_groups for m in norms] == [8] * 10
        assert tiny_unet(norm="group", base_channels=4).bottleneck[1].num_groups == 8
        assert tiny_unet(norm="group", base_channels=4).encoder[0][1].num_groups == 4


def test_activation_and_upsample_layers() -> None:
    leaky = [m for m in tiny_unet(activation="leaky_relu").modules() if isinstance(m, nn.LeakyReLU)]
    assert len(leaky) == 6 and all(m.negative_slope == 0.01 for m in leaky)
    linear_2d = tiny_unet(spatial_dims=2, upsample="trilinear").upsamplers[0][0]
    assert (linear_2d.mode, linear_2d.align_corners, linear_2d.scale_factor) == ("bilinear", False, 2.0)
    assert tiny_unet(upsample="trilinear").upsamplers[0][0].mode == "trilinear"
    assert tiny_unet(upsample="nearest").upsamplers[0][0].mode == "nearest"
    transpose = tiny_unet().upsamplers[0]
    assert (transpose.kernel_size, transpose.stride) == ((2, 2, 2), (2, 2, 2))


def test_conv_norm_pairs_are_adjacent_in_sequentials() -> None:
    model = reference_unet()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d) and m.kernel_size == (3, 3, 3)]
    pairs = [
        (seq[i], seq[i + 1])
        for seq in model.modules()
        if isinstance(seq, nn.Sequential)
        for i in range(len(seq) - 1)
        if isinstance(seq[i], nn.Conv3d) and isinstance(seq[i + 1], nn.BatchNorm3d)
    ]
    assert len(pairs) == len(convs) == 14
    assert all(conv.bias is not None for conv in model.modules() if isinstance(conv, (nn.Conv3d, nn.ConvTranspose3d)))


def test_dropout_only_in_bottleneck() -> None:
    assert not any(isinstance(m, nn.Dropout3d) for m in tiny_unet().modules())
    model = tiny_unet(dropout=0.3, depth=3)
    dropouts = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Dropout3d)]
    assert len(dropouts) == 1 and dropouts[0][0].startswith("bottleneck.") and dropouts[0][1].p == 0.3
    assert isinstance(tiny_unet(dropout=0.3, spatial_dims=2).bottleneck[3], nn.Dropout2d)


@pytest.mark.parametrize("options", [{}, {"norm": "group", "activation": "prelu", "upsample": "trilinear",
                                          "dropout": 0.1, "depth": 3}, {"upsample": "nearest", "spatial_dims": 2}])
def test_leaves_are_allowed_called_once_and_no_functional_ops_outside(options: dict[str, Any]) -> None:
    model = tiny_unet(**options).train()
    leaves = _leaves(model)
    assert all(isinstance(m, ALLOWED_LEAVES) for m in leaves), [type(m).__name__ for m in leaves]
    calls = {id(m): 0 for m in leaves}
    inside = [0]

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        calls[id(module)] += 1
        inside[0] += 1

    def post_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        inside[0] -= 1

    for m in leaves:
        m.register_forward_pre_hook(pre_hook)
        m.register_forward_hook(post_hook)
    outside: set[str] = set()

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN202
            if inside[0] == 0:
                outside.add(getattr(func, "__name__", repr(func)))
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 2, *((9, 7) if options.get("spatial_dims") == 2 else (5, 9, 7)))
    with Recorder():
        model(x)
    # Each leaf exactly once proves there is no module reuse and no skipped layer.
    assert set(calls.values()) == {1}
    # Only concatenation, padding, cropping and shape queries (`__get__` is `x.shape`) run outside the modules.
    assert "cat" in outside and "pad" in outside and "__getitem__" in outside
    assert outside <= {"cat", "pad", "__getitem__", "__get__", "dim"}, outside


def _conv(c_in: int, c_out: int, kernel_volume: int) -> int:
    return c_in * c_out * kernel_volume + c_out


def test_reference_unet_parameter_count_by_hand() -> None:
    model = reference_unet()
    c = [16, 32, 64, 128]
    encoder = sum(_conv(c_in, c_out, 27) + 2 * c_out + _conv(c_out, c_out, 27) + 2 * c_out
                  for c_in, c_out in zip([6, 16, 32], c[:3]))
    bottleneck = _conv(64, 128, 27) + 2 * 128 + _conv(128, 128, 27) + 2 * 128
    transposes = sum(_conv(c[i + 1], c[i], 8) for i in range(3))
    decoder = sum(_conv(2 * c[i], c[i], 27) + 2 * c[i] + _conv(c[i], c[i], 27) + 2 * c[i] for i in range(3))
    head = _conv(16, 2, 1)
    expected = encoder + bottleneck + transposes + decoder + head
    assert expected == 1_404_146
    assert count_parameters(model) == expected
    # PReLU adds one weight per activation (14); interpolation swaps each 2x2x2 transpose for a 1x1 conv.
    assert count_parameters(reference_unet(activation="prelu")) == expected + 14
    assert count_parameters(reference_unet(upsample="nearest")) == expected - transposes + sum(
        _conv(c[i + 1], c[i], 1) for i in range(3)
    )


def test_count_parameters_counts_shared_parameters_once() -> None:
    linear = nn.Linear(3, 4)
    assert count_parameters(nn.Sequential(linear, nn.ReLU(), linear)) == 16


def test_reference_and_tiny_defaults_and_overrides() -> None:
    assert reference_unet().config() == {
        "in_channels": 6, "out_channels": 2, "base_channels": 16, "depth": 4, "spatial_dims": 3,
        "norm": "batch", "activation": "relu", "upsample": "transpose", "dropout": 0.0,
    }
    assert UNet3D().config() == reference_unet().config()
    tiny = tiny_unet(norm="none").config()
    assert (tiny["in_channels"], tiny["out_channels"], tiny["base_channels"], tiny["depth"], tiny["norm"]) == (
        2, 2, 4, 2, "none")
    assert reference_unet(depth=2).depth == 2
    rebuilt = UNet3D(**tiny_unet(activation="elu").config())
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in tiny_unet(activation="elu").modules()]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"depth": 0}, r"^depth must be an int >= 1, got 0$"),
        ({"depth": 2.0}, r"^depth must be an int >= 1, got 2\.0$"),
        ({"base_channels": 0}, r"^base_channels must be an int >= 1, got 0$"),
        ({"in_channels": True}, r"^in_channels must be an int >= 1, got True$"),
        ({"out_channels": -1}, r"^out_channels must be an int >= 1, got -1$"),
        ({"spatial_dims": 1}, r"^spatial_dims must be 2 or 3, got 1$"),
        ({"norm": "layer"}, r"^norm must be one of 'batch', 'instance', 'group', 'none', got 'layer'$"),
        ({"norm": None}, r"^norm must be one of 'batch', 'instance', 'group', 'none', got None$"),
        ({"activation": "gelu"}, r"^activation must be one of 'relu', 'leaky_relu', 'prelu', 'elu', got 'gelu'$"),
        ({"upsample": "bilinear"}, r"^upsample must be one of 'transpose', 'trilinear', 'nearest', got 'bilinear'$"),
        ({"dropout": 1.0}, r"^dropout must be a float in \[0, 1\), got 1\.0$"),
        ({"dropout": -0.1}, r"^dropout must be a float in \[0, 1\), got -0\.1$"),
        ({"dropout": "0.1"}, r"^dropout must be a float in \[0, 1\), got '0\.1'$"),
        ({"norm": "group", "base_channels": 6}, r"^base_channels=6 gives 12 channels, not divisible into 8 groups"),
    ],
)
def test_bad_options_raise(options: dict[str, Any], match: str) -> None:
    with pytest.raises(SegExplainError, match=match):
        tiny_unet(**options)


def test_options_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        UNet3D(6)  # type: ignore[misc]


def test_unknown_override_raises() -> None:
    expected = r"^unknown UNet3D option\(s\) depht, norms; expected any of in_channels, out_channels, base_channels,"
    with pytest.raises(SegExplainError, match=expected):
        reference_unet(depht=3, norms="batch")
    with pytest.raises(SegExplainError, match=r"^unknown UNet3D option\(s\) width;"):
        tiny_unet(width=3)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((1, 2, 8, 8), r"^input shape \(1, 2, 8, 8\) does not match \(N, 2, S, S, S\) expected by this model$"),
        ((1, 3, 8, 8, 8), r"^input shape \(1, 3, 8, 8, 8\) does not match \(N, 2, S, S, S\)"),
    ],
)
def test_bad_input_shape_raises(shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(SegExplainError, match=match):
        tiny_unet()(torch.randn(*shape))


def test_an_input_too_small_for_instance_norm_names_its_size_and_the_smallest() -> None:
    """A 1x1x1 image reached instance norm at the deepest level as one voxel (a raw torch ValueError)."""
    model = UNet3D(in_channels=1, out_channels=2, base_channels=4, depth=3, norm="instance")
    for size in ((1, 1, 1), (4, 4, 4)):
        with pytest.raises(SegExplainError, match=rf"^input of spatial size {re.escape(str(size))} is too small for "
                                                  r"this U-Net \(depth 3, instance norm\): expected at least one "
                                                  r"axis longer than 4 voxels$"):
            model(torch.randn(1, 1, *size))
    assert model(torch.randn(1, 1, 1, 5, 1)).shape == (1, 2, 1, 5, 1)  # the smallest it takes
    assert UNet3D(in_channels=1, out_channels=2, depth=3, norm="batch").eval()(torch.randn(1, 1, 1, 1, 1)).shape == (
        1, 2, 1, 1, 1)
