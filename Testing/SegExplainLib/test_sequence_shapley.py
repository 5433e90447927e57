"""Exact per-sequence Shapley values: the permutation definition, captum as oracle, known answers, the sum rule,
the seed's gradient, the sliding window's region and the command line."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from test_cli import base_args, case  # noqa: F401 - the command line's case fixture
from testnets import frozen
from torch import nn

import SegExplainLib as sx
from SegExplainLib.engine.batching import FORWARD_ONLY_MAX_BATCH
from SegExplainLib.engine.perturbation import SequenceShapley
from SegExplainLib.engine.perturbation.sequence_shapley import MAX_CHANNELS
from SegExplainLib.errors import SegExplainError
from SegExplainLib.frontends import cli
from SegExplainLib.models.sliding import SlidingWindow

captum_attr = pytest.importorskip("captum.attr")


def relu_net(c_in: int = 4, k: int = 2) -> nn.Module:
    return frozen(nn.Sequential(nn.Conv3d(c_in, 5, 3, padding=1), nn.ReLU(), nn.Conv3d(5, 5, 1), nn.ReLU(),
                                nn.Conv3d(5, k, 3, padding=1)).double())


def score(model, x, seed):
    with torch.no_grad():
        return float((seed * model(x)).sum())


def test_matches_the_permutation_definition_over_all_orders():
    """phi_c = mean over all C! orders of the score change when c joins the sequences before it."""
    model = relu_net()
    x = torch.randn(1, 4, 4, 5, 5, dtype=torch.float64)
    seed = torch.randn(1, 2, 4, 5, 5, dtype=torch.float64)
    reference = torch.full_like(x, -0.7)
    expected = np.zeros(4)
    for order in itertools.permutations(range(4)):
        current = reference.clone()
        before = score(model, current, seed)
        for c in order:
            current[:, c] = x[:, c]
            after = score(model, current, seed)
            expected[c] += after - before
            before = after
    expected /= math.factorial(4)
    out = SequenceShapley(baseline=-0.7, internal_batch_size=5).attribute(model, x, seed)
    np.testing.assert_allclose(out.maps.sum((2, 3, 4))[0].numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.extras["values"][0], expected, rtol=1e-10, atol=1e-12)
    assert abs(float(out.delta[0])) < 1e-10  # efficiency: float rounding only
    assert float(out.expected[0]) == pytest.approx(score(model, x, seed) - score(model, reference, seed), rel=1e-12)
    # spread in equal parts over the channel's voxels
    assert torch.allclose(out.maps[0, 2], out.maps[0, 2, 0, 0, 0].expand(4, 5, 5))


def test_matches_captum_shapley_values_with_a_channel_mask():
    model = relu_net()
    x = torch.randn(2, 4, 3, 4, 4, dtype=torch.float64)
    seed = torch.randn(2, 2, 3, 4, 4, dtype=torch.float64)
    mask = torch.arange(4).reshape(1, 4, 1, 1, 1).expand(1, 4, 3, 4, 4).contiguous()

    def forward(z):
        return (seed.repeat(z.shape[0] // 2, 1, 1, 1, 1) * model(z)).flatten(1).sum(1)

    reference = captum_attr.ShapleyValues(forward).attribute(x, baselines=0.0, feature_mask=mask,
                                                             perturbations_per_eval=1)
    maps = SequenceShapley().attribute(model, x, seed).maps
    # captum gives every voxel of a channel the channel's whole value, SegExplain spreads it over the voxels;
    # captum rounds its result to float32
    np.testing.assert_allclose(maps.sum((2, 3, 4)).numpy(), reference[:, :, 0, 0, 0].numpy(), rtol=1e-6, atol=1e-7)


def reads_one_sequence(used: int, channels: int = 6) -> nn.Module:
    """A network whose first layer copies channel ``used`` and multiplies the others by exactly 0."""
    select = nn.Conv3d(channels, 1, 1, bias=False)
    with torch.no_grad():
        select.weight.zero_()
        select.weight[0, used] = 1.0
    return frozen(nn.Sequential(select, nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 3, padding=1)))


def test_a_network_that_reads_one_sequence_gives_it_everything():
    model = reads_one_sequence(used=2)
    image = np.random.default_rng(1).normal(size=(6, 4, 8, 8)).astype(np.float32)
    result = sx.explain(model, image, sx.BoxTarget((1, 2, 2), (3, 6, 6), class_index=1), "sequence_shapley")
    values = result.maps.sum((1, 2, 3))
    assert np.all(values[[0, 1, 3, 4, 5]] == 0.0)  # exactly: these sequences never change a coalition's score
    assert values[2] == pytest.approx(result.expected_sum, rel=1e-5) and values[2] != 0
    # the shares count positive relevance: sequence 2 holds all of it, whichever the sign of the score change
    np.testing.assert_allclose(sx.relevance_shares(np.sign(values[2]) * result.maps), np.eye(6)[2], atol=1e-6)


def test_its_forward_only_passes_take_the_higher_cpu_batch_cap_with_the_same_values():
    model = relu_net(c_in=4)
    x = torch.randn(1, 4, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    seed = torch.zeros(1, 2, 4, 6, 6, dtype=torch.float64)
    seed[:, 1, 1:3, 2:4, 2:4] = 1.0
    automatic = SequenceShapley()
    maps = automatic.attribute(model, x, seed).maps
    assert automatic.last_internal_batch_size == FORWARD_ONLY_MAX_BATCH == 8  # not the gradients' cap of 2
    one_by_one = SequenceShapley(internal_batch_size=1).attribute(model, x, seed).maps
    torch.testing.assert_close(maps, one_by_one, rtol=0, atol=1e-12)


def test_a_linear_network_gives_input_minus_reference_times_weight():
    model = frozen(nn.Conv3d(3, 2, 3, padding=1).double())
    x = torch.randn(1, 3, 4, 5, 5, dtype=torch.float64)
    seed = torch.randn(1, 2, 4, 5, 5, dtype=torch.float64)
    reference = sx.BlurredBaseline(1.0)(x)
    grad = torch.autograd.grad((seed * model(x.requires_grad_(True))).sum(), x)[0]
    expected = (grad * (x.detach() - reference)).sum((2, 3, 4))
    maps = SequenceShapley(baseline="blur:1").attribute(model, x.detach(), seed).maps
    np.testing.assert_allclose(maps.sum((2, 3, 4)).numpy(), expected.numpy(), rtol=1e-10)


def test_the_map_is_differentiable_in_the_seed_so_the_exact_normalized_form_holds():
    """The exact normalized aggregation (two passes, the seed's gradient) equals the mean of every voxel's own
    normalized map (the sampled form over the whole region)."""
    model = sx.tiny_unet().eval()
    image = np.random.default_rng(0).normal(size=(2, 6, 8, 8)).astype(np.float32)
    target = sx.BoxTarget((1, 2, 2), (3, 4, 5), class_index=1, aggregation="normalized")
    exact = sx.explain(model, image, target, "sequence_shapley", dtype=torch.float64)
    every = sx.explain(model, image, target, "sequence_shapley", dtype=torch.float64, samples=12)
    assert exact.extras["passes"] == 2
    np.testing.assert_allclose(exact.maps, every.maps, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("method, options", [
    ("sequence_shapley", {}),
    ("supervoxel_shapley", {"block_size": 4, "n_permutations": 4}),  # the same masked passes serve all three
    ("rise", {"n_masks": 6, "mask_resolution": 2}),
])
def test_a_sliding_window_runs_only_the_windows_of_the_region(method, options):
    torch.manual_seed(0)
    net = frozen(nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 3, padding=1)))
    calls = []
    net.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[0]))
    window = SlidingWindow(net, (4, 8, 8), overlap=0.5)
    image = np.random.default_rng(2).normal(size=(3, 8, 16, 16)).astype(np.float32)
    target = sx.VoxelTarget((1, 1, 1), class_index=1)
    region = sx.explain(window, image, target, method, internal_batch_size=8, **options)
    run = sum(calls)
    whole = sx.explain(nn.Sequential(window), image, target, method, internal_batch_size=8, **options)
    assert (region.extras["windows_run"], region.extras["windows_total"]) == (1, 27)
    # the first pass (the target's score) and the method's passes (2^3 coalitions for the sequences), one window each
    assert run == 1 + region.extras["forward_passes"]
    if method == "sequence_shapley":
        assert region.extras["forward_passes"] == 2**3
    np.testing.assert_allclose(region.maps, whole.maps, rtol=1e-5, atol=1e-7)


def test_more_than_ten_sequences_and_bad_options_are_refused():
    model = frozen(nn.Conv3d(MAX_CHANNELS + 1, 2, 1))
    x = torch.zeros(1, MAX_CHANNELS + 1, 2, 2, 2)
    with pytest.raises(SegExplainError, match="got C = 11, expected at most 10"):
        SequenceShapley().attribute(model, x, torch.ones(1, 2, 2, 2, 2))
    with pytest.raises(SegExplainError, match="baseline: baseline spec 'nothing'"):
        SequenceShapley(baseline="nothing")
    with pytest.raises(SegExplainError, match="internal_batch_size must be None or an integer >= 1, got 0"):
        SequenceShapley(internal_batch_size=0)


def test_the_command_line_explains_with_it(case):  # noqa: F811 - the fixture imported above
    output = case["dir"] / "out"
    assert cli.main([*base_args(case, output), "--box-index", "1", "2", "2", "4", "6", "7",
                     "--method", "sequence_shapley", "--baseline", "min"]) == 0
    record = json.loads((output / "summary.json").read_text())
    record = record.get("explanation", record)
    assert record["method"] == "sequence_shapley" and record["options"]["baseline"] == {"type": "min"}
    assert abs(record["delta"]) < 1e-4 * max(1.0, abs(record["expected_sum"]))
