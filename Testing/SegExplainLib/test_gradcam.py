"""Grad-CAM: captum's LayerGradCam as oracle, hook hygiene, layer errors."""

from __future__ import annotations

import json

import pytest
import torch
from testnets import frozen
from torch import nn

from SegExplainLib.engine.gradients import GradCAM
from SegExplainLib.errors import SegExplainError

captum_attr = pytest.importorskip("captum.attr")


def small_net(inplace: bool = False) -> nn.Module:
    """Layer "2" (strided conv) is at half resolution; "3" is a ReLU that may work in place on its output."""
    return frozen(
        nn.Sequential(
            nn.Conv3d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv3d(4, 5, 3, stride=2, padding=1),
            nn.ReLU(inplace=inplace),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv3d(5, 2, 3, padding=1),
        ).double()
    )


def _captum_forward(model, seed):
    def forward(z: torch.Tensor) -> torch.Tensor:
        return (seed * model(z)).flatten(1).sum(1)

    return forward


def _data(spatial=(4, 6, 8)):
    x = torch.randn((2, 3) + spatial, dtype=torch.float64)
    seed = torch.randn((2, 2) + spatial, dtype=torch.float64)
    return x, seed


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("layer", ["2", "3", "0"])
def test_matches_captum_layer_gradcam(relu, layer):
    model = small_net()
    x, seed = _data()
    cam = captum_attr.LayerGradCam(_captum_forward(model, seed), model[int(layer)]).attribute(
        x.clone().requires_grad_(True), relu_attributions=relu
    )
    ref = captum_attr.LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode="trilinear")
    out = GradCAM(layer=layer, relu=relu).attribute(model, x, seed)
    assert out.maps.shape == x.shape and out.delta is None
    # Repeated over the 3 input channels, divided by 3.
    assert torch.allclose(out.maps.sum(1, keepdim=True), ref, rtol=1e-10, atol=1e-12 * ref.abs().max().item())
    assert torch.equal(out.maps[:, 0], out.maps[:, 2])
    if relu:
        assert out.maps.min() >= 0
    assert not out.maps.requires_grad


def test_inplace_activation_after_the_layer():
    x, seed = _data()
    torch.manual_seed(1)
    plain = small_net(inplace=False)
    torch.manual_seed(1)
    inplace = small_net(inplace=True)
    a = GradCAM(layer="2").attribute(plain, x, seed).maps
    b = GradCAM(layer="2").attribute(inplace, x, seed).maps
    assert torch.allclose(a, b, rtol=1e-13, atol=0)
    # The model output itself is unchanged by the hook.
    assert GradCAM(layer="3").attribute(inplace, x, seed).maps.shape == x.shape


def test_linear_in_seed_only_without_relu():
    assert GradCAM.linear_in_seed is False
    assert GradCAM(layer="a").linear_in_seed is False
    assert GradCAM(layer="a", relu=False).linear_in_seed is True


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hooks_removed_after_success_and_after_an_exception():
    model = small_net()
    x, seed = _data()
    GradCAM(layer="2").attribute(model, x, seed)
    assert _no_hooks(model)

    class Boom(nn.Module):
        def forward(self, z):
            raise RuntimeError("boom inside forward")

    broken = nn.Sequential(*list(small_net().children())[:3], Boom())
    with pytest.raises(RuntimeError, match="boom inside forward"):
        GradCAM(layer="2").attribute(broken, x, seed)
    assert _no_hooks(broken)


def test_unknown_layer_lists_valid_names():
    model = small_net()
    x, seed = _data()
    with pytest.raises(SegExplainError, match=r"layer 'encoder' is not a module of the model; expected one of 6 "
                       r"names such as '0', '1', '2', '3', '4', '5'$"):
        GradCAM(layer="encoder").attribute(model, x, seed)
    with pytest.raises(SegExplainError, match=r"layer must be a non-empty module name .*, got ''"):
        GradCAM(layer="")
    with pytest.raises(SegExplainError, match=r"layer must be a non-empty module name .*, got 3"):
        GradCAM(layer=3)  # type: ignore[arg-type]


def test_layer_errors():
    x, seed = _data()

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(3, 3, 3, padding=1)
            self.head = nn.Conv3d(3, 2, 1)
            self.side = nn.Conv3d(3, 3, 1)
            self.flat = nn.Flatten()

        def forward(self, z):
            self.flat(z)
            self.side(z)  # computed but unused
            return self.head(self.conv(self.conv(z)))

    model = frozen(Twice().double())
    with pytest.raises(SegExplainError, match=r"layer 'conv' ran 2 times in one forward pass; expected exactly once"):
        GradCAM(layer="conv").attribute(model, x, seed)
    with pytest.raises(SegExplainError, match=r"layer 'side' does not influence the model output"):
        GradCAM(layer="side").attribute(model, x, seed)
    with pytest.raises(SegExplainError, match=r"layer 'flat' output must be a 5D tensor \(B, C, d, h, w\), got \(2, "):
        GradCAM(layer="flat").attribute(model, x, seed)
    assert _no_hooks(model)


def test_options_and_constructor_errors():
    cam = GradCAM(layer="enc.0", relu=False, upsample="nearest")
    assert json.loads(json.dumps(cam.options())) == {"layer": "enc.0", "relu": False, "upsample": "nearest"}
    assert GradCAM(layer="x").options()["upsample"] == "trilinear"
    with pytest.raises(SegExplainError, match=r"upsample 'cubic' is not valid; expected 'trilinear' or 'nearest'"):
        GradCAM(layer="x", upsample="cubic")
    with pytest.raises(SegExplainError, match=r"relu must be a bool, got 1"):
        GradCAM(layer="x", relu=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        GradCAM("x")  # type: ignore[misc]


def test_runs_on_the_tiny_unet():
    models = pytest.importorskip("SegExplainLib.models.networks")
    model = frozen(models.tiny_unet().double())
    names = [n for n, _ in model.named_modules() if n]
    layer = next(n for n in names if n.startswith("bottleneck"))
    x = torch.randn(1, 2, 8, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    seed = torch.zeros_like(logits)
    seed[:, 1] = 1.0
    out = GradCAM(layer=layer).attribute(model, x, seed)
    assert out.maps.shape == x.shape and torch.isfinite(out.maps).all() and out.maps.min() >= 0
    assert _no_hooks(model)
