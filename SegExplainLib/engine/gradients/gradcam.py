"""Grad-CAM on the output of a named layer."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...errors import SegExplainError
from ..deployment import check_walkable
from ..kernels import onednn_convolutions
from ..method import AttributionMethod, AttributionOutput
from .passes import check_inputs, check_output, check_seed, seed_scores


def check_layer_name(layer: Any) -> str:
    """``layer`` if it can name a module (a non-empty text), else a one-line error."""
    if not isinstance(layer, str) or not layer:
        raise SegExplainError(f"layer must be a non-empty module name from model.named_modules(), got {layer!r}")
    return layer


def named_layer(model: torch.nn.Module, layer: str) -> torch.nn.Module:
    """The module named ``layer`` in ``model.named_modules()``, or an error listing some of the names there are."""
    modules = dict(model.named_modules())
    if layer not in modules or not layer:
        names = [n for n in modules if n]
        shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
        raise SegExplainError(
            f"layer {layer!r} is not a module of the model; expected one of {len(names)} names such as {shown}"
        )
    return modules[layer]


class GradCAM(AttributionMethod):
    """3D Grad-CAM (Selvaraju et al. 2017) on the output of a named layer.

    With ``A`` the layer's activation ``(B, Ck, d, h, w)``, ``w_c = mean over (d, h, w) of d score / d A_c`` and
    ``cam = relu(sum_c w_c A_c)``, upsampled (trilinear, ``align_corners=False``) to the input grid. Grad-CAM has one
    map for all input channels: it is not per MRI sequence. The returned map repeats ``cam / C`` over the ``C`` input
    channels, so that summing over channels gives ``cam``.

    The map is linear in the seed only without the ReLU, so ``linear_in_seed`` is ``not relu`` on instances.
    The hook that captures the activation is removed in a ``finally`` block, even when the forward pass fails.

    Args:
        layer: Name of a module as listed by ``model.named_modules()``; its output must be a 5D tensor and the
            module must run once per forward pass.
        relu: Apply the ReLU of the original method.
        upsample: Interpolation to the input grid, ``"trilinear"`` (default) or ``"nearest"``.
    """

    name = "gradcam"
    linear_in_seed = False
    walks_modules = True

    def __init__(self, *, layer: str, relu: bool = True, upsample: str = "trilinear") -> None:
        check_layer_name(layer)
        if not isinstance(relu, bool):
            raise SegExplainError(f"relu must be a bool, got {relu!r}")
        if upsample not in ("trilinear", "nearest"):
            raise SegExplainError(f"upsample {upsample!r} is not valid; expected 'trilinear' or 'nearest'")
        self.layer = layer
        self.relu = relu
        self.upsample = upsample
        self.linear_in_seed = not relu  # type: ignore[misc]

    def attribute(self, model: torch.nn.Module, inputs: torch.Tensor, seed: torch.Tensor) -> AttributionOutput:
        x = check_inputs(inputs)
        seed = check_seed(seed, x)
        create_graph = seed.requires_grad
        check_walkable(model, self.name)
        module = named_layer(model, self.layer)
        captured: list[torch.Tensor] = []
        layer = self.layer

        def hook(_mod: torch.nn.Module, _args: Any, output: Any) -> torch.Tensor:
            if not isinstance(output, torch.Tensor) or output.dim() != 5:
                kind = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise SegExplainError(f"layer {layer!r} output must be a 5D tensor (B, C, d, h, w), got {kind}")
            # A leaf of its own: the backward pass stops at the layer. The clone keeps in-place ops downstream
            # (e.g. ReLU(inplace=True)) off the captured activation.
            act = output.detach().requires_grad_(True)
            captured.append(act)
            return act.clone()

        handle = module.register_forward_hook(hook)
        try:
            with torch.enable_grad(), onednn_convolutions():
                out = model(x)
        finally:
            handle.remove()
        check_output(out, seed, x.shape[0])
        if len(captured) != 1:
            raise SegExplainError(
                f"layer {layer!r} ran {len(captured)} times in one forward pass; expected exactly once"
            )
        act = captured[0]
        with torch.enable_grad():
            score = seed_scores(seed, out).sum()
            grad = None
            if score.requires_grad:
                (grad,) = torch.autograd.grad(score, act, create_graph=create_graph, allow_unused=True)
        if grad is None:
            raise SegExplainError(f"layer {layer!r} does not influence the model output; choose another layer")
        if not create_graph:
            grad, act = grad.detach(), act.detach()
        weights = grad.mean(dim=(2, 3, 4), keepdim=True)
        cam = (weights * act).sum(dim=1, keepdim=True)
        if self.relu:
            cam = F.relu(cam)
        if self.upsample == "trilinear":
            cam = F.interpolate(cam, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)
        else:
            cam = F.interpolate(cam, size=tuple(x.shape[2:]), mode="nearest")
        channels = x.shape[1]
        maps = (cam / channels).expand(-1, channels, -1, -1, -1).contiguous()
        if not create_graph:
            maps = maps.detach()
        return AttributionOutput(maps=maps)

    def options(self) -> dict[str, Any]:
        return {"layer": self.layer, "relu": self.relu, "upsample": self.upsample}
