"""The relevance window: z+ computed in the backward pass over the box of voxels that receive relevance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from testnets import frozen
from torch import nn

from SegExplainLib.engine import lrp as lrp_module
from SegExplainLib.engine.filters import AmplitudeFilter
from SegExplainLib.engine.lrp import LRP
from SegExplainLib.engine.rules.affine import affine_vjp
from SegExplainLib.engine.rules.window import RelevanceWindow, box_share, occupied_box
from SegExplainLib.models.networks import tiny_unet

CONVOLUTIONS = {
    "3d_k3_s1_p1": lambda: nn.Conv3d(2, 3, 3, padding=1),
    "3d_k3_s2_p1": lambda: nn.Conv3d(2, 3, 3, stride=2, padding=1),
    "3d_k1": lambda: nn.Conv3d(2, 3, 1),
    "3d_k3_valid": lambda: nn.Conv3d(2, 3, 3),
    "3d_k2_s2": lambda: nn.Conv3d(2, 3, 2, stride=2),
    "2d_k5_p2": lambda: nn.Conv2d(2, 3, 5, padding=2),
    "2d_k3_d2_p2": lambda: nn.Conv2d(2, 3, 3, padding=2, dilation=2),
    "2d_k3_s2_p0_d2": lambda: nn.Conv2d(2, 3, 3, stride=2, dilation=2),
    "1d_k4_s3_p1": lambda: nn.Conv1d(2, 3, 4, stride=3, padding=1),
}
SPATIAL = {1: (40,), 2: (17, 19), 3: (9, 11, 10)}


def sparse_gradient(y: torch.Tensor, generator: torch.Generator, at_border: bool) -> torch.Tensor:
    """A random gradient that is non-zero in a small box of ``y``'s grid only (at the low border, or inside)."""
    grad = torch.zeros_like(y)
    box = []
    for size in y.shape[2:]:
        width = max(1, size // 4)
        start = 0 if at_border else int(torch.randint(1, max(2, size - width), (1,), generator=generator))
        box.append(slice(start, min(size, start + width)))
    grad[(slice(None), slice(None), *box)] = torch.randn(grad[(slice(None), slice(None), *box)].shape,
                                                         dtype=y.dtype, generator=generator)
    return grad


@pytest.mark.parametrize("at_border", [True, False], ids=["at_border", "inside"])
@pytest.mark.parametrize("name", sorted(CONVOLUTIONS))
def test_window_reproduces_the_layer_and_its_transpose_on_the_box(name, at_border):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    conv = CONVOLUTIONS[name]().double()
    x = torch.randn(2, 2, *SPATIAL[conv.weight.dim() - 2], dtype=torch.float64, generator=generator)
    y = conv(x).detach()
    grad = sparse_gradient(y, generator, at_border)

    window = RelevanceWindow.of(conv, x, grad)
    assert window is not None and window.pads is not None  # a box, not the whole output
    part = F.__dict__[f"conv{x.dim() - 2}d"](window.input(x), conv.weight, conv.bias, conv.stride, window.padding,
                                             conv.dilation)
    torch.testing.assert_close(part, y[window.outputs])
    assert part.numel() < y.numel()
    # the transpose on the part, placed back, is the whole layer's transpose of the gradient
    on_part = affine_vjp(conv, window.input(x), conv.weight, grad[window.outputs], window.padding)
    torch.testing.assert_close(window.scatter(on_part), affine_vjp(conv, x, conv.weight, grad))


def test_window_is_none_for_no_relevance_and_whole_for_large_boxes_and_other_layers():
    conv = nn.Conv3d(1, 1, 3, padding=1)
    x = torch.randn(1, 1, 6, 6, 6)
    assert RelevanceWindow.of(conv, x, torch.zeros(1, 1, 6, 6, 6)) is None
    mostly = torch.zeros(1, 1, 6, 6, 6)
    mostly[..., :5, :5, :5] = 1.0  # 125 of 216 voxels: above half, not worth a copy
    assert RelevanceWindow.of(conv, x, mostly) == RelevanceWindow.whole()
    up = nn.ConvTranspose3d(1, 1, 2, stride=2)
    corner = torch.zeros(1, 1, 12, 12, 12)
    corner[..., 0, 0, 0] = 1.0
    assert RelevanceWindow.of(up, x, corner) == RelevanceWindow.whole()
    assert RelevanceWindow.of(up, x, torch.zeros_like(corner)) is None


def test_occupied_box_spans_every_batch_element_and_channel_and_sees_negative_values():
    t = torch.zeros(2, 3, 5, 6, 7)
    t[0, 1, 1, 2, 3] = -1e-30  # negative and tiny still count
    t[1, 2, 3, 4, 5] = 2.0
    assert occupied_box(t) == [(1, 4), (2, 5), (3, 6)]
    assert box_share(t) == pytest.approx(27 / 210)
    assert occupied_box(torch.zeros(1, 1, 3, 3)) is None and box_share(torch.zeros(1, 1, 3, 3)) == 0.0
    nan = torch.zeros(1, 1, 4)
    nan[..., 2] = float("nan")
    assert occupied_box(nan) == [(2, 3)]


def leaky_unet() -> nn.Module:
    """Transposed convolutions, a concatenation with a signed half, LeakyReLU: every path of the z+ rule."""
    torch.manual_seed(4)
    return frozen(tiny_unet(activation="leaky_relu", base_channels=3, depth=3).double())


def windows_taken(monkeypatch) -> list[RelevanceWindow | None]:
    """Record what every call of ``RelevanceWindow.of`` returns."""
    taken, original = [], RelevanceWindow.of

    def recording(cls, module, x, grad):
        taken.append(original(module, x, grad))
        return taken[-1]

    monkeypatch.setattr(RelevanceWindow, "of", classmethod(recording))
    return taken


@pytest.mark.parametrize(("composite", "layer_filter"), [
    ("epsilon_plus_flat", None), ("epsilon_plus_flat", "clamp:0.3"), ("z_plus", None), ("z_plus", "pass:0.02,1"),
    ("epsilon_plus", None), ("epsilon", None), ("zero", None)])
def test_small_targets_give_the_maps_of_the_whole_backward_pass(monkeypatch, composite, layer_filter):
    model = leaky_unet()
    x = torch.randn(1, 2, 8, 16, 16, dtype=torch.float64)
    seed = torch.zeros(1, 2, 8, 16, 16, dtype=torch.float64)
    seed[0, 1, 3:5, 0:3, 9:12] = 1.0  # 18 of 2048 voxels, touching a border
    amplitude_filter = None if layer_filter is None else AmplitudeFilter.parse(layer_filter)

    taken = windows_taken(monkeypatch)
    windowed = LRP(composite=composite, layer_filter=amplitude_filter).attribute(model, x, seed)
    boxes = [window for window in taken if window is not None and window.pads is not None]
    assert len(boxes) >= 3  # the decoder's convolutions ran on boxes

    monkeypatch.setattr(lrp_module, "SPARSE_SEED_SHARE", -1.0)  # every explanation takes the whole pass
    taken.clear()
    whole = LRP(composite=composite, layer_filter=amplitude_filter).attribute(model, x, seed)
    assert taken == []
    torch.testing.assert_close(windowed.maps, whole.maps, rtol=1e-10, atol=1e-12 * float(whole.maps.abs().max()))
    assert float(windowed.maps.abs().max()) > 0


def test_a_region_without_relevance_in_a_layer_passes_zeros(monkeypatch):
    model = frozen(nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv3d(2, 2, 1)).double())
    with torch.no_grad():
        model[2].weight.zero_()  # no relevance reaches the first layers' outputs
        model[2].bias.fill_(1.0)
    x = torch.rand(1, 1, 6, 6, 6, dtype=torch.float64)
    seed = torch.zeros(1, 2, 6, 6, 6, dtype=torch.float64)
    seed[0, 0, 2, 2, 2] = 1.0
    taken = windows_taken(monkeypatch)
    out = LRP(composite="z_plus").attribute(model, x, seed)
    assert None in taken
    assert torch.count_nonzero(out.maps) == 0


def test_seeds_that_are_large_or_differentiated_take_the_whole_pass(monkeypatch):
    model = leaky_unet()
    x = torch.randn(1, 2, 8, 16, 16, dtype=torch.float64)
    taken = windows_taken(monkeypatch)
    whole_class = torch.zeros(1, 2, 8, 16, 16, dtype=torch.float64)
    whole_class[0, 1] = 1.0
    LRP(composite="epsilon_plus_flat").attribute(model, x, whole_class)
    small = torch.zeros_like(whole_class)
    small[0, 1, 4, 8, 8] = 1.0
    LRP(composite="epsilon_plus_flat").attribute(model, x, small.requires_grad_(True))
    assert taken == []
    LRP(composite="epsilon_plus_flat").attribute(model, x, small.detach())
    assert taken


@pytest.mark.parametrize("small", [True, False], ids=["small_region", "large_region"])
@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_plus_flat", "z_plus", "epsilon"])
def test_a_seed_read_off_the_wired_forward_pass_gives_the_maps_of_that_seed_given(composite, small):
    model = leaky_unet()
    x = torch.randn(1, 2, 8, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with LRP(composite=composite).seeded_by_output(model, x) as (logits, finish):
        torch.testing.assert_close(logits, model(x), rtol=1e-12, atol=1e-12)
        assert not logits.requires_grad
        seed = torch.zeros_like(logits)
        seed[0, 1] = (logits[0].argmax(0) == 1).to(x.dtype)
        if small:  # a box of 18 voxels: the rules' backward passes work on windows
            seed[0, 1, :, :, :] = 0.0
            seed[0, 1, 3:5, 6:9, 6:9] = 1.0
        deferred = finish(seed)
    given = LRP(composite=composite).attribute(model, x, seed)
    scale = float(given.maps.abs().max())
    assert scale > 0
    torch.testing.assert_close(deferred.maps, given.maps, rtol=1e-10, atol=1e-12 * scale)
    torch.testing.assert_close(deferred.delta, given.delta, rtol=1e-10, atol=1e-12 * scale)
