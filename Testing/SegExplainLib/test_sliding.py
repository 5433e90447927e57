"""Sliding-window inference as a module: the blend is right and explanations pass through it."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import SegExplainLib as sx
from SegExplainLib.engine.api import explain_layers
from SegExplainLib.errors import SegExplainError
from SegExplainLib.models.sliding import SlidingWindow


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv3d(2, 3, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv3d(3, 2, 1, bias=False)).double().eval()


def test_one_patch_covering_the_volume_is_the_network_itself():
    net = small_net()
    x = torch.randn(1, 2, 6, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(SlidingWindow(net, (8, 8, 8))(x), net(x))


def blend_loop(net: nn.Module, x: torch.Tensor, starts: list[list[int]], weight: torch.Tensor) -> torch.Tensor:
    """Reference: every patch start, one weight, accumulated patch by patch."""
    patch = weight.shape
    out = torch.zeros(1, 2, *x.shape[2:], dtype=x.dtype)
    total = torch.zeros(x.shape[2:], dtype=x.dtype)
    with torch.no_grad():
        for start in itertools.product(*starts):
            box = tuple(slice(a, a + p) for a, p in zip(start, patch))
            out[(slice(None), slice(None), *box)] += net(x[(slice(None), slice(None), *box)]) * weight
            total[box] += weight
    return out / total


def test_overlapping_patches_blend_like_a_loop():
    net = small_net()
    x = torch.randn(1, 2, 6, 10, 9, dtype=torch.float64)
    window = SlidingWindow(net, (4, 6, 5), overlap=0.5)
    starts = [sorted(set(list(range(0, s - p, max(1, p // 2))) + [s - p])) for s, p in zip((6, 10, 9), (4, 6, 5))]
    with torch.no_grad():
        torch.testing.assert_close(window(x), blend_loop(net, x, starts, window._gaussian((4, 6, 5), x)))


def test_given_positions_and_weight_replace_the_built_in_ones():
    net = small_net()
    x = torch.randn(1, 2, 6, 10, 9, dtype=torch.float64)
    starts = [[0, 1, 2], [0, 4], [0, 2, 4]]
    weight = torch.rand(4, 6, 5, dtype=torch.float64) + 0.1
    seen = []

    def positions(shape, patch):
        seen.append((shape, patch))
        return starts

    window = SlidingWindow(net, (4, 6, 5), positions=positions, weight=weight.float())
    with torch.no_grad():
        torch.testing.assert_close(window(x), blend_loop(net, x, starts, weight), rtol=1e-6, atol=1e-7)
    assert seen == [((6, 10, 9), (4, 6, 5))]


def test_pad_to_patch_pads_like_nnunet_and_crops_back():
    net = small_net()
    x = torch.randn(1, 2, 2, 10, 9, dtype=torch.float64)
    window = SlidingWindow(net, (5, 6, 5), pad_to_patch=True)
    padded = torch.nn.functional.pad(x, (0, 0, 0, 0, 1, 2))  # depth 2 -> 5: 3 // 2 = 1 before, 2 after
    starts = [[0], [0, 3, 4], [0, 2, 4]]
    with torch.no_grad():
        expected = blend_loop(net, padded, starts, window._gaussian((5, 6, 5), x))[:, :, 1:3]
        torch.testing.assert_close(window(x), expected)
    # LRP passes the padding: conservation holds through it
    out = sx.LRP(composite="zero").attribute(window, x.abs(), torch.ones(1, 2, 2, 10, 9, dtype=torch.float64))
    assert out.maps.shape == x.shape
    assert abs(float(out.delta[0])) < 1e-9 * abs(float(out.expected[0]))


def test_lrp_through_the_window_conserves_and_explain_runs():
    net = small_net()
    with torch.no_grad():
        net[2].weight.abs_()
    x = torch.rand(1, 2, 6, 10, 9, dtype=torch.float64)
    window = SlidingWindow(net, (4, 6, 5), overlap=0.5)
    seed = torch.zeros(1, 2, 6, 10, 9, dtype=torch.float64)
    seed[0, 1, 2:4, 3:7, 3:6] = 1.0
    out = sx.LRP(composite="zero").attribute(window, x, seed)
    assert abs(float(out.delta[0])) < 1e-9 * abs(float(out.expected[0]))
    # the same map as the gradient x input of the blended network (LRP-0 on a bias-free ReLU net)
    xx = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((window(xx) * seed).sum(), xx)
    torch.testing.assert_close(out.maps, grad * x)
    result = sx.explain(window, x[0].numpy(), sx.PredictedRegion(class_index=1), "lrp", composite="epsilon_plus")
    assert result.maps.shape == (2, 6, 10, 9) and np.isfinite(result.maps).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"patch_size": (4, 4)}, "three positive integers"),
    ({"patch_size": (4, 0, 4)}, "three positive integers"),
    ({"patch_size": (4, 4, 4), "overlap": 1.0}, r"overlap must lie in \[0, 1\)"),
    ({"patch_size": (4, 4, 4), "sigma_scale": 0}, "sigma_scale must be positive"),
    ({"patch_size": (4, 4, 4), "positions": [[0]] * 3}, r"positions must be a callable .* got \[\[0\]"),
    ({"patch_size": (4, 4, 4), "weight": torch.ones(4, 4, 5)}, r"patch shape \(4, 4, 4\), got shape \(4, 4, 5\)"),
    ({"patch_size": (2, 2, 2), "weight": torch.tensor([1.0, 0.0]).repeat(2, 2, 1)}, "positive .* from 0.0 to 1.0"),
    ({"patch_size": (4, 4, 4), "weight": torch.ones(4, 4, 4, dtype=torch.int64)}, "floating point, got dtype"),
    ({"patch_size": (4, 4, 4), "pad_to_patch": 1}, "pad_to_patch must be True or False, got 1"),
    ({"patch_size": (4, 4, 4), "pad_mode": "edge"}, "pad_mode must be one of constant, reflect, replicate, circular, "
                                                    "got 'edge'"),
    ({"patch_size": (4, 4, 4), "pad_value": float("nan")}, "pad_value must be a finite number, got nan"),
    ({"patch_size": (4, 4, 4), "batch_size": 0}, "batch_size must be a positive integer, got 0"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(SegExplainError, match=message):
        SlidingWindow(small_net(), **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"positions": lambda shape, patch: [[0], [0]]}, r"returned \[\[0\], \[0\]\] .*one list of starts per axis"),
    ({"positions": lambda shape, patch: [[0], [0, 4], []]}, "axis 2 needs a non-empty list of integers"),
    ({"positions": lambda shape, patch: [[0], [0, 5], [0, 4]]}, "start 5 on axis 1 puts the patch outside"),
    ({"positions": lambda shape, patch: [[0], [0, 4], [0]]}, "voxel 4 on axis 2 lies in no patch"),
    ({"weight": torch.ones(4, 4, 4)}, "smaller than patch_size .* needs pad_to_patch=True"),
])
def test_bad_positions_and_weights_are_named_when_the_volume_is_known(kwargs, message):
    window = SlidingWindow(small_net(), (4, 4, 4), **kwargs)
    with pytest.raises(SegExplainError, match=message):
        window(torch.zeros(1, 2, 3 if "weight" in kwargs else 4, 8, 8, dtype=torch.float64))


# -------------------------------------------------------------------------------------------------------------
# Only the windows that reach the region
# -------------------------------------------------------------------------------------------------------------


def counting(net: nn.Module) -> list[int]:
    """The number of network calls so far, one entry per call (a forward hook)."""
    calls: list[int] = []
    net.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("pad", [False, True])
def test_restricted_forward_is_exact_inside_the_bounds_and_runs_fewer_windows(pad):
    net = small_net()
    calls = counting(net)
    x = torch.randn(1, 2, 3, 16, 16, dtype=torch.float64)
    window = SlidingWindow(net, (4, 6, 6), pad_to_patch=pad)
    bounds = ((1, 2), (2, 5), (9, 12))
    with torch.no_grad():
        whole = window(x)
        total = len(calls)
        with window.restricted_to(bounds) as record:
            part = window(x)
    box = (slice(None), slice(None), *(slice(a, b) for a, b in bounds))
    assert torch.equal(part[box], whole[box])
    assert record == {"windows_run": len(calls) - total, "windows_total": total}
    assert total == 25 and record["windows_run"] == 6  # of starts 0, 3, 6, 9, 10: H 0, 3; W 6, 9, 10
    with torch.no_grad():
        window(x)
    assert len(calls) == 2 * total + 6  # the restriction ends with the block


@pytest.mark.parametrize("bounds, message", [
    (((0, 1), (0, 1)), "three .start, stop. pairs"),
    (((0, 1), (2, 2), (0, 1)), "three .start, stop. pairs"),
    (((0, 1), (0, 1), (0, 17)), "reach outside the volume"),
])
def test_bad_bounds(bounds, message):
    window = SlidingWindow(small_net(), (4, 6, 6))
    with pytest.raises(SegExplainError, match=message), window.restricted_to(bounds):
        window(torch.zeros(1, 2, 3, 16, 16, dtype=torch.float64))


VOLUME = (8, 16, 16)
MASK = np.zeros(VOLUME, bool)
MASK[5, 12, 3] = MASK[6, 13, 5] = MASK[6, 12, 4] = True
# with the windows that reach each (patch (4, 6, 6), starts D 0, 2, 4; H and W 0, 3, 6, 9, 10: 75 windows)
TARGETS = {
    "click": (sx.VoxelTarget((1, 2, 1), radius=1.0), 2 * 2 * 1),
    "box": (sx.BoxTarget((2, 5, 5), (4, 9, 8)), 2 * 3 * 3),
    "mask": (sx.MaskTarget(MASK), 2 * 2 * 2),
}
METHODS = {
    "lrp_sum": ("lrp", "sum", {"composite": "zero"}),
    "lrp_normalized": ("lrp", "normalized", {"composite": "epsilon_plus"}),
    "gradient": ("gradient", "sum", {}),
    "ig_normalized": ("integrated_gradients", "normalized", {"quadrature": "gausslegendre", "n_steps": 4}),
    "occlusion": ("occlusion", "sum", {"window": 4}),
    "deeplift_normalized": ("deeplift", "normalized", {"baseline": "zero"}),
    "gradient_shap": ("gradient_shap", "sum", {"n_samples": 2, "n_baselines": 2}),
}


def explained(model: nn.Module, x: torch.Tensor, target: sx.Target, method: str, options: dict):
    return sx.explain(model, x, target, method, device="cpu", **options)


@pytest.mark.filterwarnings("ignore:.*(completeness|summing to about zero)")  # of the random test network
@pytest.mark.parametrize(("method_name", "target_name"), [
    (method, target) for method in sorted(METHODS) for target in sorted(TARGETS)
    if method != "occlusion" or target == "click"])  # forward passes only: one target shows it
def test_explanations_through_the_restricted_window_are_the_whole_volume_ones(method_name, target_name):
    net = small_net()
    with torch.no_grad():
        net[2].weight.abs_()  # positive logits: LRP-0 on a bias-free ReLU net conserves exactly
    calls = counting(net)
    x = torch.rand(2, *VOLUME, dtype=torch.float64)
    method, aggregation, options = METHODS[method_name]
    target, windows = TARGETS[target_name]
    target = dataclasses.replace(target, aggregation=aggregation)
    window = SlidingWindow(net, (4, 6, 6), overlap=0.5)
    whole = explained(nn.Sequential(window), x, target, method, options)  # a wrapper runs every window
    whole_calls = len(calls)
    part = explained(window, x, target, method, options)
    np.testing.assert_allclose(part.maps, whole.maps, rtol=1e-10, atol=1e-12 * np.abs(whole.maps).max())
    assert part.target_score == pytest.approx(whole.target_score, rel=1e-12)
    assert (part.extras["windows_run"], part.extras["windows_total"]) == (windows, 75)
    # LRP and the gradient read a "sum" target off their own forward pass; a regional model runs a restricted one of
    # its own first
    passes_more = 2 if method_name in ("lrp_sum", "gradient") else 1
    assert len(calls) - whole_calls == whole_calls * windows / 75 * passes_more
    assert "windows_run" not in whole.extras
    if method_name == "lrp_sum":  # conservation through the restricted window
        assert abs(part.delta) < 1e-9 * abs(part.expected_sum)
        assert part.delta == pytest.approx(whole.delta, abs=1e-12)


def test_predicted_region_reads_one_stored_whole_volume_prediction_per_case():
    net = small_net()
    calls = counting(net)
    x = torch.rand(2, *VOLUME, dtype=torch.float64)
    window = SlidingWindow(net, (4, 6, 6))
    target = sx.PredictedRegion(class_index=1)
    first = sx.explain(window, x, target, "gradient", device="cpu")
    first_calls = len(calls)
    second = sx.explain(window, x, target, "gradient", device="cpu")
    assert len(calls) - first_calls == first_calls - 75  # the second explanation reads the stored prediction
    np.testing.assert_array_equal(second.maps, first.maps)
    whole = sx.explain(nn.Sequential(window), x, target, "gradient", device="cpu")
    np.testing.assert_allclose(first.maps, whole.maps, rtol=1e-10, atol=1e-14)


def test_the_stored_prediction_is_never_one_of_another_input_or_state():
    net = small_net()
    calls = counting(net)
    window = SlidingWindow(net, (4, 6, 6))
    x = torch.rand(1, 2, *VOLUME, dtype=torch.float64)
    with torch.no_grad():
        stored = window.whole_volume(x)
        assert window.whole_volume(x.clone()) is stored and len(calls) == 75  # same content: no run
        changed = x.clone()
        changed[0, 0, 0, 0, 0] += 1.0
        torch.testing.assert_close(window.whole_volume(changed), window(changed))
        net[0].weight[0, 0, 0, 0, 0] += 1.0  # an in-place change of the network
        torch.testing.assert_close(window.whole_volume(x), window(x))
        assert not torch.equal(window.whole_volume(x), stored)


def test_the_stored_prediction_serves_the_window_moved_to_another_device(monkeypatch):
    """explain() copies a model to the GPU it runs on: the prediction stored before (a warm worker's) moves with the
    copy and serves it. The move is faked: after it, every tensor reports a GPU."""
    net = small_net()
    calls = counting(net)
    window = SlidingWindow(net, (4, 6, 6))
    x = torch.rand(1, 2, *VOLUME, dtype=torch.float64)
    with torch.no_grad():
        stored = window.whole_volume(x)
        warm = len(calls)
        moved = copy.deepcopy(window).to(torch.device("cpu"))  # as explain() places a model: a copy, moved
        monkeypatch.setattr(torch.Tensor, "device", property(lambda _: torch.device("cuda", 0)))
        again = moved.whole_volume(x)
        monkeypatch.undo()
    assert len(calls) == warm  # no whole-volume run on the moved copy
    torch.testing.assert_close(again, stored, rtol=0, atol=0)


def test_layer_signals_are_read_from_every_window():
    net = small_net()
    calls = counting(net)
    window = SlidingWindow(net, (4, 6, 6))
    x = torch.rand(2, *VOLUME, dtype=torch.float64)
    explain_layers(window, x, TARGETS["click"][0], ["network.0"], "lrp", device="cpu", composite="zero")
    assert len(calls) == 2 * 75  # the prediction, then the propagation: no window left out


def test_only_the_class_activation_maps_read_beyond_the_seed():
    assert {name for name, cls in sx.METHODS.items() if not cls.seed_local} == {"gradcam", "guided_gradcam", "score_cam"}
