"""Guided Grad-CAM: Guided Backprop weighted by Grad-CAM."""

from __future__ import annotations

from typing import Any

import torch

from ..lrp import GuidedBackprop
from ..method import AttributionMethod, AttributionOutput
from .gradcam import GradCAM


class GuidedGradCAM(AttributionMethod):
    """Guided Grad-CAM (Selvaraju et al. 2017), as captum's ``GuidedGradCam``: the Guided Backprop map of every input
    channel times the Grad-CAM map of a layer (with its ReLU) upsampled to the input grid.

    Grad-CAM gives *where* at the layer's resolution, Guided Backprop the fine detail per MRI sequence; the product
    keeps the detail where the layer's evidence is. Neither factor is linear in the seed, nor is the product, and
    Grad-CAM reads the layer's activation over the whole forward pass, so the map is not seed-local either.

    Args:
        layer: Name of a module as listed by ``model.named_modules()`` (see :class:`GradCAM`).
        upsample: Interpolation of the Grad-CAM map to the input grid, ``"trilinear"`` (default) or ``"nearest"``
            (captum's default).
    """

    name = "guided_gradcam"
    linear_in_seed = False
    walks_modules = True

    def __init__(self, *, layer: str, upsample: str = "trilinear") -> None:
        self.gradcam = GradCAM(layer=layer, relu=True, upsample=upsample)

    def attribute(self, model: torch.nn.Module, inputs: torch.Tensor, seed: torch.Tensor) -> AttributionOutput:
        cam = self.gradcam.attribute(model, inputs, seed).maps.sum(dim=1, keepdim=True)  # cam / C in each channel
        guided = GuidedBackprop().attribute(model, inputs, seed).maps
        return AttributionOutput(maps=guided * cam)

    def options(self) -> dict[str, Any]:
        return {"layer": self.gradcam.layer, "upsample": self.gradcam.upsample}
