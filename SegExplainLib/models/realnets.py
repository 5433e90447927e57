"""Networks written the way real segmentation packages write them, for tests and benchmarks of the engine.

The reference U-Net of :mod:`SegExplainLib.models.networks` is written for the engine. Real code is not: nnU-Net and MONAI
build blocks from wrapper modules, run activations in place (``nn.LeakyReLU(inplace=True)``), add residuals in place
(``out += residual``), upsample with a small class of their own that calls ``F.interpolate``, and are deployed with
some norm layers left in train mode. :func:`nnunet_like` is such a network (the layout of nnU-Net's residual-encoder
U-Net, with instance norm and leaky ReLU), small enough for tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvDropoutNormReLU", "Interpolate", "ResidualBlock", "ResidualEncoderUNet", "nnunet_like"]


class ConvDropoutNormReLU(nn.Module):
    """nnU-Net's basic block: convolution, optional dropout, instance norm, in-place leaky ReLU, in a wrapper."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, nonlin: bool = True) -> None:
        super().__init__()
        layers = [nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=True),
                  nn.Dropout3d(0.1),
                  nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True, track_running_stats=True)]
        if nonlin:
            layers.append(nn.LeakyReLU(0.01, inplace=True))
        self.all_modules = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_modules(x)


class ResidualBlock(nn.Module):
    """nnU-Net's ``BasicBlockD``: two blocks, an average-pooling skip when strided, ``out += residual`` in place."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = ConvDropoutNormReLU(in_channels, out_channels, stride)
        self.conv2 = ConvDropoutNormReLU(out_channels, out_channels, nonlin=False)
        self.nonlin2 = nn.LeakyReLU(0.01, inplace=True)
        skip: list[nn.Module] = []
        if stride != 1:
            skip.append(nn.AvgPool3d(stride, stride))
        if in_channels != out_channels:
            skip.append(nn.Sequential(nn.Conv3d(in_channels, out_channels, 1, bias=False),
                                      nn.InstanceNorm3d(out_channels, affine=True, track_running_stats=True)))
        self.skip = nn.Sequential(*skip) if skip else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.skip(x)
        out = self.conv2(self.conv1(x))
        out += residual
        return self.nonlin2(out)


class Interpolate(nn.Module):
    """The upsampling class many U-Nets define themselves: a module whose forward only calls ``F.interpolate``."""

    def __init__(self, scale_factor: int = 2, mode: str = "trilinear") -> None:
        super().__init__()
        self.scale_factor, self.mode = scale_factor, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        align = False if self.mode in ("linear", "bilinear", "trilinear") else None
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode, align_corners=align)


class ResidualEncoderUNet(nn.Module):
    """A residual-encoder U-Net in nnU-Net's layout: strided residual stages, upsampling, concatenation skips.

    Args:
        in_channels: MRI sequences.
        out_channels: Classes.
        features: Channels per stage, the first at full resolution.
        upsample: ``"transpose"`` (nnU-Net's transposed convolutions) or ``"interpolate"`` (the
            :class:`Interpolate` wrapper, then a 1x1 convolution).
    """

    def __init__(self, in_channels: int = 4, out_channels: int = 3, features: tuple[int, ...] = (8, 16, 32),
                 upsample: str = "transpose") -> None:
        super().__init__()
        self.stem = ConvDropoutNormReLU(in_channels, features[0])
        self.stages = nn.ModuleList(
            ResidualBlock(features[max(i - 1, 0)], channels, stride=1 if i == 0 else 2)
            for i, channels in enumerate(features))
        self.upsamplers = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for deep, shallow in zip(features[:0:-1], features[-2::-1]):
            if upsample == "transpose":
                self.upsamplers.append(nn.ConvTranspose3d(deep, shallow, 2, stride=2))
            else:
                self.upsamplers.append(nn.Sequential(Interpolate(2), nn.Conv3d(deep, shallow, 1)))
            self.decoder.append(nn.Sequential(ConvDropoutNormReLU(2 * shallow, shallow),
                                              ConvDropoutNormReLU(shallow, shallow)))
        self.seg_layer = nn.Conv3d(features[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = self.stem(x)
        for stage in self.stages:
            h = stage(h)
            skips.append(h)
        for level, (upsampler, block) in enumerate(zip(self.upsamplers, self.decoder)):
            h = block(torch.cat((upsampler(h), skips[-2 - level]), 1))
        return self.seg_layer(h)


def nnunet_like(*, in_channels: int = 4, out_channels: int = 3, seed: int = 0, upsample: str = "transpose",
                norm_mode: str = "train") -> ResidualEncoderUNet:
    """A seeded :class:`ResidualEncoderUNet` deployed as nnU-Net-v1-era code runs it.

    Args:
        norm_mode: ``"train"``: instance norms in train mode (instance statistics), everything else in eval, as
            networks run by code that switched only dropout off; ``"eval"``: the whole network in eval mode, which
            with ``track_running_stats=True`` uses the running statistics.
    """
    torch.manual_seed(seed)
    model = ResidualEncoderUNet(in_channels, out_channels, upsample=upsample)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.InstanceNorm3d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    model.eval()
    if norm_mode == "train":
        for module in model.modules():
            if isinstance(module, nn.InstanceNorm3d):
                module.train()
    return model
