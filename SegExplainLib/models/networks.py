"""The project's reference segmentation network: the 3D U-Net of Çiçek et al. (2016).

Both LRP papers this project reproduces explain a 3D U-Net with 6 MRI sequences in and 2 classes out. The network is
written for the explanation engine, which hooks and walks modules:

* every layer is its own module instance, called exactly once per forward pass; the only functional operations in
  :meth:`UNet3D.forward` are ``torch.cat`` (skips), ``F.pad`` (size padding) and slicing (cropping back);
* each ``Conv -> Norm -> Activation`` sequence lives in one ``nn.Sequential``, so that a canonizer merging BatchNorm
  into the preceding convolution finds the pairs by adjacency;
* every convolution has a bias, so the engine always has to handle biases.

The model returns logits ``(N, K, *spatial)`` with the spatial size of the input, whatever that size is.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.checks import check_choice
from ..errors import SegExplainError

__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "UPSAMPLES",
    "UNet3D",
    "count_parameters",
    "reference_unet",
    "tiny_unet",
]

NORMS = ("batch", "instance", "group", "none")
ACTIVATIONS = ("relu", "leaky_relu", "prelu", "elu")
UPSAMPLES = ("transpose", "trilinear", "nearest")

_GROUP_NORM_MAX_GROUPS = 8
_LEAKY_RELU_SLOPE = 0.01


def _check_positive_int(name: str, value: Any) -> int:
    # bool is an int subclass, but True as a channel count is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SegExplainError(f"{name} must be an int >= 1, got {value!r}")
    return value


class UNet3D(nn.Module):
    """3D (or 2D) U-Net with concatenation skips after Çiçek et al. (2016).

    Level ``l`` (``0 <= l < depth``) has ``base_channels * 2**l`` channels. Every level has a block of two
    ``Conv(k3, pad 1) -> Norm -> Activation``; the encoder goes down by ``MaxPool(2, 2)``; the decoder upsamples the
    level below to the channels of the level, concatenates ``[skip, up]`` along channels and applies a block; a final
    1x1 convolution gives the logits. Inputs whose spatial size is not a multiple of ``2**(depth - 1)`` are padded
    with zeros at the end of each spatial axis and the logits are cropped back to the input size.

    Attributes:
        encoder: Blocks of levels ``0 .. depth - 2``, in execution order.
        pools: One max pooling per encoder block.
        bottleneck: Block of level ``depth - 1`` (holds the dropout, if any).
        upsamplers: From level ``l + 1`` to level ``l``, in execution order (deepest first).
        decoder: Blocks after each concatenation, in execution order (deepest first).
        head: 1x1 convolution to ``out_channels`` logits.
    """

    def __init__(
        self,
        *,
        in_channels: int = 6,
        out_channels: int = 2,
        base_channels: int = 16,
        depth: int = 4,
        spatial_dims: int = 3,
        norm: str = "batch",
        activation: str = "relu",
        upsample: str = "transpose",
        dropout: float = 0.0,
    ) -> None:
        """Build the network.

        Args:
            in_channels: Input channels (MRI sequences).
            out_channels: Classes; the model returns one logit map per class.
            base_channels: Channels of the first level; level ``l`` has ``base_channels * 2**l``.
            depth: Number of resolution levels; ``depth - 1`` poolings.
            spatial_dims: 3 for volumes ``(N, C, D, H, W)``, 2 for images ``(N, C, H, W)``.
            norm: ``"batch"``, ``"instance"`` (affine), ``"group"`` (``min(8, channels)`` groups) or ``"none"``.
            activation: ``"relu"``, ``"leaky_relu"`` (slope 0.01), ``"prelu"`` (one weight per layer) or ``"elu"``.
            upsample: ``"transpose"`` (ConvTranspose k2 s2), ``"trilinear"`` (linear interpolation, bilinear in 2D,
                ``align_corners=False``, then a 1x1 conv) or ``"nearest"`` (nearest interpolation, then a 1x1 conv).
            dropout: Channel dropout probability in ``[0, 1)`` inside the bottleneck block; 0 adds no layer.

        Raises:
            SegExplainError: An option is out of range or unknown.
        """
        super().__init__()
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.out_channels = _check_positive_int("out_channels", out_channels)
        self.base_channels = _check_positive_int("base_channels", base_channels)
        self.depth = _check_positive_int("depth", depth)
        if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
            raise SegExplainError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.spatial_dims = spatial_dims
        self.norm = check_choice(norm, "norm", NORMS)
        self.activation = check_choice(activation, "activation", ACTIVATIONS)
        self.upsample = check_choice(upsample, "upsample", UPSAMPLES)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise SegExplainError(f"dropout must be a float in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)

        channels = [base_channels * 2**level for level in range(depth)]
        if norm == "group":
            for c in channels:
                if c % min(_GROUP_NORM_MAX_GROUPS, c):
                    raise SegExplainError(
                        f"base_channels={base_channels} gives {c} channels, not divisible into "
                        f"{_GROUP_NORM_MAX_GROUPS} groups for norm='group'; expected a multiple of 8 or at most 8"
                    )

        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        pool = nn.MaxPool3d if spatial_dims == 3 else nn.MaxPool2d
        self.encoder = nn.ModuleList()
        self.pools = nn.ModuleList()
        in_c = in_channels
        for c in channels[:-1]:
            self.encoder.append(self._block(in_c, c, dropout=0.0))
            self.pools.append(pool(kernel_size=2, stride=2))
            in_c = c
        self.bottleneck = self._block(in_c, channels[-1], dropout=self.dropout)
        self.upsamplers = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in reversed(range(depth - 1)):
            self.upsamplers.append(self._upsampler(channels[level + 1], channels[level]))
            self.decoder.append(self._block(2 * channels[level], channels[level], dropout=0.0))
        self.head = conv(channels[0], out_channels, kernel_size=1, bias=True)

    @property
    def divisor(self) -> int:
        """Every spatial size is padded to a multiple of this before the encoder."""
        return 2 ** (self.depth - 1)

    def config(self) -> dict[str, Any]:
        """Every option as JSON-friendly values; ``UNet3D(**model.config())`` rebuilds the architecture."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "base_channels": self.base_channels,
            "depth": self.depth,
            "spatial_dims": self.spatial_dims,
            "norm": self.norm,
            "activation": self.activation,
            "upsample": self.upsample,
            "dropout": self.dropout,
        }

    def _norm_layer(self, channels: int) -> nn.Module | None:
        three_d = self.spatial_dims == 3
        if self.norm == "batch":
            return nn.BatchNorm3d(channels) if three_d else nn.BatchNorm2d(channels)
        if self.norm == "instance":
            return nn.InstanceNorm3d(channels, affine=True) if three_d else nn.InstanceNorm2d(channels, affine=True)
        if self.norm == "group":
            return nn.GroupNorm(min(_GROUP_NORM_MAX_GROUPS, channels), channels)
        return None

    def _activation_layer(self) -> nn.Module:
        if self.activation == "relu":
            return nn.ReLU()
        if self.activation == "leaky_relu":
            return nn.LeakyReLU(negative_slope=_LEAKY_RELU_SLOPE)
        if self.activation == "prelu":
            return nn.PReLU()
        return nn.ELU()

    def _block(self, in_channels: int, out_channels: int, *, dropout: float) -> nn.Sequential:
        conv = nn.Conv3d if self.spatial_dims == 3 else nn.Conv2d
        layers: list[nn.Module] = []
        for i, c_in in enumerate((in_channels, out_channels)):
            layers.append(conv(c_in, out_channels, kernel_size=3, padding=1, bias=True))
            norm = self._norm_layer(out_channels)
            if norm is not None:
                layers.append(norm)
            layers.append(self._activation_layer())
            # Between the two convolutions, so that no dropout separates a convolution from its norm.
            if i == 0 and dropout > 0:
                layers.append(nn.Dropout3d(dropout) if self.spatial_dims == 3 else nn.Dropout2d(dropout))
        return nn.Sequential(*layers)

    def _upsampler(self, in_channels: int, out_channels: int) -> nn.Module:
        conv = nn.Conv3d if self.spatial_dims == 3 else nn.Conv2d
        if self.upsample == "transpose":
            transpose = nn.ConvTranspose3d if self.spatial_dims == 3 else nn.ConvTranspose2d
            return transpose(in_channels, out_channels, kernel_size=2, stride=2, bias=True)
        if self.upsample == "trilinear":
            mode = "trilinear" if self.spatial_dims == 3 else "bilinear"
            interpolate = nn.Upsample(scale_factor=2, mode=mode, align_corners=False)
        else:
            interpolate = nn.Upsample(scale_factor=2, mode="nearest")
        return nn.Sequential(interpolate, conv(in_channels, out_channels, kernel_size=1, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for ``x``.

        Args:
            x: ``(N, in_channels, *spatial)`` with ``spatial_dims`` spatial axes of any size.

        Returns:
            Logits ``(N, out_channels, *spatial)``, same spatial size as ``x``.

        Raises:
            SegExplainError: ``x`` has the wrong number of axes or channels, or is too small for instance norm.
        """
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise SegExplainError(
                f"input shape {tuple(x.shape)} does not match (N, {self.in_channels}, "
                f"{', '.join(['S'] * self.spatial_dims)}) expected by this model"
            )
        size = tuple(x.shape[2:])
        # instance norm needs two voxels to normalise; the deepest level holds ceil(s / divisor) voxels per axis
        if self.norm == "instance" and all(s <= self.divisor for s in size):
            raise SegExplainError(
                f"input of spatial size {size} is too small for this U-Net (depth {self.depth}, instance norm): "
                f"expected at least one axis longer than {self.divisor} voxels"
            )
        # F.pad lists (before, after) pairs starting from the last axis.
        padding = [amount for s in reversed(size) for amount in (0, -s % self.divisor)]
        padded = any(padding)
        if padded:
            x = F.pad(x, padding)
        skips = []
        for block, pool in zip(self.encoder, self.pools):
            x = block(x)
            skips.append(x)
            x = pool(x)
        x = self.bottleneck(x)
        for upsampler, block, skip in zip(self.upsamplers, self.decoder, reversed(skips)):
            x = block(torch.cat([skip, upsampler(x)], dim=1))
        x = self.head(x)
        if padded:
            x = x[(..., *(slice(0, s) for s in size))]
        return x


def _build(defaults: dict[str, Any], overrides: dict[str, Any]) -> UNet3D:
    known = [name for name in inspect.signature(UNet3D.__init__).parameters if name != "self"]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise SegExplainError(f"unknown UNet3D option(s) {', '.join(unknown)}; expected any of {', '.join(known)}")
    return UNet3D(**{**defaults, **overrides})


def reference_unet(**overrides: Any) -> UNet3D:
    """The network of both LRP papers: 6 sequences in, 2 classes out, base 16, depth 4, BatchNorm, ReLU, ConvTranspose.

    Args:
        **overrides: Any :class:`UNet3D` option to change.

    Raises:
        SegExplainError: An override is unknown or out of range.
    """
    defaults = {"in_channels": 6, "out_channels": 2, "base_channels": 16, "depth": 4, "spatial_dims": 3,
                "norm": "batch", "activation": "relu", "upsample": "transpose", "dropout": 0.0}
    return _build(defaults, overrides)


def tiny_unet(**overrides: Any) -> UNet3D:
    """A small U-Net for fast tests: 2 in, 2 out, base 4, depth 2 (other options as :class:`UNet3D`).

    Args:
        **overrides: Any :class:`UNet3D` option to change.

    Raises:
        SegExplainError: An override is unknown or out of range.
    """
    return _build({"in_channels": 2, "out_channels": 2, "base_channels": 4, "depth": 2}, overrides)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model`` (shared parameters counted once, buffers not counted)."""
    return sum(p.numel() for p in model.parameters())
