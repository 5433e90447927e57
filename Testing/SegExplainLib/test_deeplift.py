"""DeepLIFT (rescale) and DeepLIFT-SHAP: a slow reference with explicit multipliers, captum as oracle on networks
written as real ones are, summation-to-delta, refusals, hooks, and every path into explain()."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from testnets import frozen
from torch import nn

import SegExplainLib as sx
from SegExplainLib.engine.baselines import make_baseline
from SegExplainLib.engine.gradients import DeepLift, DeepLiftShap
from SegExplainLib.engine.gradients.deeplift import reference_samples
from SegExplainLib.errors import SegExplainError, UnsupportedLayerError
from SegExplainLib.frontends import cli
from SegExplainLib.models.networks import tiny_unet

captum_attr = pytest.importorskip("captum.attr")


def _conv_matrix(conv: nn.Conv3d, in_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A padding-free, stride-1 convolution as a matrix and a bias vector, written with plain loops."""
    w, b = conv.weight.detach().numpy(), conv.bias.detach().numpy()
    c_out, c_in, kd, kh, kw = w.shape
    _, d, h, wd = in_shape
    out_shape = (c_out, d - kd + 1, h - kh + 1, wd - kw + 1)
    matrix = np.zeros((int(np.prod(out_shape)), int(np.prod(in_shape))))
    bias = np.zeros(int(np.prod(out_shape)))
    for o, z, y, x in itertools.product(*map(range, out_shape)):
        row = np.ravel_multi_index((o, z, y, x), out_shape)
        bias[row] = b[o]
        for i, dz, dy, dx in itertools.product(range(c_in), range(kd), range(kh), range(kw)):
            matrix[row, np.ravel_multi_index((i, z + dz, y + dy, x + dx), in_shape)] += w[o, i, dz, dy, dx]
    return matrix, bias


def slow_deeplift(layers: list, x: np.ndarray, x0: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """DeepLIFT by the book: forward both inputs layer by layer, then multipliers backwards, ``W^T m`` through a
    linear layer and ``m * (f(z) - f(z0)) / (z - z0)`` through an element-wise one."""
    a, a0, steps = x.ravel(), x0.ravel(), []
    for kind, layer in layers:
        if kind == "linear":
            matrix, bias = layer
            steps.append(("linear", matrix))
            a, a0 = matrix @ a + bias, matrix @ a0 + bias
        else:
            fa, fa0 = layer(a), layer(a0)
            steps.append(("rescale", (fa - fa0) / (a - a0)))
            a, a0 = fa, fa0
    m = seed.ravel().copy()
    for kind, value in reversed(steps):
        m = value.T @ m if kind == "linear" else m * value
    return ((x - x0).ravel() * m).reshape(x.shape)


def test_matches_the_slow_reference_with_explicit_multipliers():
    torch.manual_seed(1)
    conv1, conv2, conv3 = nn.Conv3d(2, 3, 2), nn.Conv3d(3, 2, 2), nn.Conv3d(2, 2, 1)
    net = frozen(nn.Sequential(conv1, nn.LeakyReLU(0.2), conv2, nn.Tanh(), conv3)).double()
    x = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)
    seed = torch.zeros(1, 2, 1, 2, 2, dtype=torch.float64)
    seed[0, 1, 0, :, 1] = 1.0
    seed[0, 0, 0, 1, 0] = -0.5
    layers = [("linear", _conv_matrix(conv1, (2, 3, 4, 4))), ("f", lambda z: np.where(z > 0, z, 0.2 * z)),
              ("linear", _conv_matrix(conv2, (3, 2, 3, 3))), ("f", np.tanh),
              ("linear", _conv_matrix(conv3, (2, 1, 2, 2)))]
    for spec in ("zero", "blur:1"):
        x0 = make_baseline(spec)(x)
        expected = slow_deeplift(layers, x[0].numpy(), x0[0].numpy(), seed[0].numpy())
        result = DeepLift(baseline=spec).attribute(net, x, seed)
        np.testing.assert_allclose(result.maps[0].numpy(), expected, rtol=1e-10, atol=1e-12)
        assert abs(float(result.delta)) < 1e-12  # summation-to-delta
        with torch.no_grad():
            change = (seed * (net(x) - net(x0))).sum()
        assert float(result.expected) == pytest.approx(float(change), rel=1e-12)


def test_where_a_unit_does_not_change_its_multiplier_is_the_derivative():
    """z = w x1 + w x2 with x - x0 = (1, -1) leaves z unchanged; the quotient 0/0 is replaced by f'(z) = 1 (z > 0),
    which passes the downstream multiplier on: each input gets +-w, not 0."""
    conv = nn.Conv3d(2, 1, 1, bias=False)
    head = nn.Conv3d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(0.5)
        head.weight.fill_(3.0)
    net = frozen(nn.Sequential(conv, nn.ReLU(), head)).double()
    x = torch.tensor([2.0, 1.0], dtype=torch.float64).view(1, 2, 1, 1, 1)
    x0 = torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 2, 1, 1, 1)
    seed = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    result = DeepLift(baseline=_Fixed(x0)).attribute(net, x, seed)
    np.testing.assert_allclose(result.maps.flatten().numpy(), [1.5, -1.5])  # (1 * 0.5 * 3, -1 * 0.5 * 3)
    assert float(result.expected) == 0.0


class _Fixed(sx.engine.baselines.Baseline):
    """A baseline that is a given tensor (test only)."""

    kind = "fixed"

    def __init__(self, value):
        object.__setattr__(self, "value", value)

    def _compute(self, inputs):
        return self.value.expand_as(inputs).clone()


class Block(nn.Module):
    """Conv -> InstanceNorm (running statistics) -> in-place LeakyReLU, as nnU-Net writes its blocks."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(c_in, c_out, 3, padding=1)
        self.norm = nn.InstanceNorm3d(c_out, affine=True, track_running_stats=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class SkipNet(nn.Module):
    """A two-level U-Net: wrappers, max pooling, a transposed convolution and a skip concatenation."""

    def __init__(self, pool: bool = True) -> None:
        super().__init__()
        self.enc = Block(2, 4)
        self.down = nn.MaxPool3d(2) if pool else nn.Conv3d(4, 4, 2, stride=2)
        self.mid = nn.Sequential(Block(4, 4), nn.Dropout3d(0.3))
        self.up = nn.ConvTranspose3d(4, 4, 2, stride=2)
        self.dec = Block(8, 4)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        skip = self.enc(x)
        return self.head(self.dec(torch.cat([skip, self.up(self.mid(self.down(skip)))], dim=1)))


def skip_net(pool: bool = True) -> nn.Module:
    torch.manual_seed(0)
    net = SkipNet(pool).double()
    for module in net.modules():  # running statistics that are not the identity
        if isinstance(module, nn.InstanceNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return frozen(net)


class Scored(nn.Module):
    """The seed's score per row, for captum (which stacks inputs and references along the batch)."""

    def __init__(self, net: nn.Module, seed: torch.Tensor) -> None:
        super().__init__()
        self.net, self.seed = net, seed

    def forward(self, x):
        out = self.net(x)
        return (self.seed.repeat(out.shape[0] // self.seed.shape[0], 1, 1, 1, 1) * out).flatten(1).sum(1, True)


def _data(batch: int = 1):
    x = torch.randn(batch, 2, 4, 6, 6, dtype=torch.float64)
    seed = torch.zeros(batch, 2, 4, 6, 6, dtype=torch.float64)
    seed[:, 1, 1:3, 2:4, 2:5] = 1.0
    seed[:, 0, 0, 0, :2] = -0.5
    return x, seed


@pytest.mark.parametrize("pool", [False, True])
def test_matches_captum_deeplift_on_a_unet_as_real_ones_are_written(pool):
    """Max pooling after a LeakyReLU: captum's own summation-to-delta fails there (its rule on a pool that follows
    a nonlinear module), so that case checks ours against the sum rule, and the strided net against captum."""
    net, (x, seed) = skip_net(pool), _data(2)
    baseline = make_baseline("blur:1")
    result = DeepLift(baseline=baseline).attribute(net, x, seed)
    assert float(result.delta.abs().max()) < 1e-12
    if not pool:
        ref = captum_attr.DeepLift(Scored(net, seed)).attribute(x, baselines=baseline(x), target=0)
        np.testing.assert_allclose(result.maps.numpy(), ref.detach().numpy(), rtol=1e-9, atol=1e-12)


def test_max_pooling_matches_captum_where_a_linear_layer_feeds_it():
    torch.manual_seed(0)
    net = frozen(nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.MaxPool3d(2), nn.Conv3d(4, 4, 1), nn.ELU(),
                               nn.Upsample(scale_factor=2), nn.Conv3d(4, 2, 1))).double()
    x, seed = _data(2)
    baseline = make_baseline("blur:1")
    result = DeepLift(baseline=baseline).attribute(net, x, seed)
    ref = captum_attr.DeepLift(Scored(net, seed)).attribute(x, baselines=baseline(x), target=0)
    np.testing.assert_allclose(result.maps.numpy(), ref.detach().numpy(), rtol=1e-9, atol=1e-12)
    assert float(result.delta.abs().max()) < 1e-12


def test_deeplift_shap_matches_captum_on_the_same_references():
    net, (x, seed) = skip_net(pool=False), _data()
    method = DeepLiftShap(baseline="zero", n_baselines=3, noise_level=0.2, baseline_seed=4, internal_batch_size=2)
    result = method.attribute(net, x, seed)
    generator = torch.Generator().manual_seed(4)
    references = reference_samples(x, make_baseline("zero"), 3, 0.2, generator)[:, 0]
    ref = captum_attr.DeepLiftShap(Scored(net, seed)).attribute(x, baselines=references, target=0)
    np.testing.assert_allclose(result.maps.numpy(), ref.detach().numpy(), rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        change = (seed * (net(x) - net(references))).flatten(1).sum(1).mean()
    assert float(result.expected) == pytest.approx(float(change), rel=1e-12)
    assert abs(float(result.delta)) < 1e-12


def test_deeplift_shap_without_noise_is_deeplift_and_the_batch_does_not_matter():
    net, (x, seed) = skip_net(), _data(2)
    single = DeepLift(baseline="blur:2").attribute(net, x, seed).maps
    for k in (2, 3, 8):
        shap = DeepLiftShap(baseline="blur:2", n_baselines=3, noise_level=0.0, internal_batch_size=k)
        np.testing.assert_allclose(shap.attribute(net, x, seed).maps.numpy(), single.numpy(), rtol=1e-10, atol=1e-13)
    both = DeepLiftShap(n_baselines=4, baseline_seed=1).attribute(net, x, seed).maps
    np.testing.assert_array_equal(DeepLiftShap(n_baselines=4, baseline_seed=1).attribute(net, x, seed).maps, both)
    other = DeepLiftShap(n_baselines=4, baseline_seed=2).attribute(net, x, seed).maps
    assert not torch.allclose(both, other)


@pytest.mark.parametrize("method", [DeepLift, DeepLiftShap])
def test_linear_in_the_seed(method):
    net, (x, seed) = skip_net(), _data()
    other = torch.randn_like(seed)
    attribution = method()
    combined = attribution.attribute(net, x, 2.0 * seed - 3.0 * other).maps
    parts = 2.0 * attribution.attribute(net, x, seed).maps - 3.0 * attribution.attribute(net, x, other).maps
    np.testing.assert_allclose(combined.numpy(), parts.numpy(), rtol=1e-9, atol=1e-12)
    assert method.linear_in_seed and method.seed_local and method.walks_modules


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__
               for m in model.modules())


class Gated(nn.Module):
    def __init__(self, functional) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 2, 3, padding=1)
        self.functional = functional

    def forward(self, x):
        return self.functional(self.conv(x))


@pytest.mark.parametrize("functional, message", [
    (F.relu, r"functional F\.relu in the forward of '' \(Gated\) bypasses the 'deeplift' rules"),
    (lambda h: F.max_pool3d(h, 2), r"F\.max_pool3d"),
    (lambda h: h * torch.sigmoid(h), r"a product of two activations \(a gate\)"),
    (lambda h: F.layer_norm(h, h.shape[1:]), r"F\.layer_norm"),
])
def test_functional_nonlinearities_are_refused_and_hooks_removed(functional, message):
    net = frozen(Gated(functional)).double()
    x, _ = _data()
    seed = torch.ones_like(net(x))
    with pytest.raises(UnsupportedLayerError, match=message + r".*gradient, gradient_shap"):
        DeepLift().attribute(net, x, seed)
    assert _no_hooks(net)
    linear = frozen(Gated(lambda h: h[:, :, :2] * 2.0)).double()  # a copy and a scaling: linear, so it runs
    DeepLift().attribute(linear, x, torch.ones(1, 2, 2, 6, 6, dtype=torch.float64))


@pytest.mark.parametrize("norm", [
    lambda: nn.InstanceNorm3d(4, affine=True),  # nnU-Net's: no running statistics
    lambda: nn.GroupNorm(2, 4),
    lambda: nn.BatchNorm3d(4).train(),  # a train-mode norm: the statistics of its input
], ids=["instance", "group", "batch_train"])
@pytest.mark.parametrize("baseline", ["zero", "blur:1"])
def test_a_norm_on_input_statistics_takes_its_jacobian_averaged_along_the_line(norm, baseline):
    """With the norm the only nonlinearity between two convolutions, the straight line in the input maps to the
    straight line in the norm's input, so DeepLIFT is exactly Integrated Gradients: captum's, with many nodes."""
    torch.manual_seed(0)
    net = frozen(nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), norm(), nn.Conv3d(4, 2, 1))).double()
    with torch.no_grad():
        net[0].bias.uniform_(-1.0, 1.0)
        if net[1].weight is not None:
            net[1].weight.uniform_(0.5, 1.5)
    net[1].train(norm().training)
    x, seed = _data()
    result = DeepLift(baseline=baseline).attribute(net, x, seed)
    oracle = net
    if isinstance(net[1], nn.BatchNorm3d):  # as the user runs it on one image: that image's statistics
        oracle = copy.deepcopy(net)
        oracle[1] = nn.InstanceNorm3d(4, affine=True, eps=net[1].eps).double().requires_grad_(False)
        oracle[1].load_state_dict({"weight": net[1].weight, "bias": net[1].bias})
    ref = captum_attr.IntegratedGradients(Scored(oracle, seed)).attribute(
        x, baselines=make_baseline(baseline)(x), target=0, n_steps=160, method="gausslegendre")
    np.testing.assert_allclose(result.maps.numpy(), ref.detach().numpy(), rtol=1e-6,
                               atol=1e-6 * float(ref.abs().max()))
    assert abs(float(result.delta)) < 1e-9 * abs(float(result.expected))
    assert _no_hooks(net) and net[1].training == norm().training


def test_hooks_are_removed_after_success_and_after_an_error_in_the_forward():
    net = skip_net()
    x, seed = _data()
    DeepLift().attribute(net, x, seed)
    assert _no_hooks(net)
    with pytest.raises(SegExplainError, match="seed shape"):
        DeepLift().attribute(net, x, seed[:, :1])
    assert _no_hooks(net)


def test_torchscript_is_refused_with_the_methods_that_work():
    net = torch.jit.script(nn.Sequential(nn.Conv3d(2, 2, 1), nn.ReLU()).eval())
    x, seed = _data()
    with pytest.raises(SegExplainError, match="'deeplift' attaches rules.*TorchScript.*gradient_shap"):
        DeepLift().attribute(net, x.float(), seed.float())


TARGETS = [
    sx.MaskTarget(np.pad(np.ones((2, 2, 2), bool), ((1, 3), (2, 4), (2, 4))), class_index=1),
    sx.BoxTarget((1, 2, 2), (3, 5, 5), class_index=1),
    sx.VoxelTarget((2, 3, 3), class_index=1, radius=1.0),
    sx.PredictedRegion(class_index=1),
    sx.ClassChannel(class_index=1),
]


@pytest.mark.parametrize("method", ["deeplift", "deeplift_shap"])
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: type(t).__name__)
def test_every_target_through_explain_sums_to_the_score_change(method, target):
    """On the demo's architecture: instance norms without running statistics, LeakyReLU, max pooling."""
    model = tiny_unet(norm="instance", activation="leaky_relu").eval()
    image = np.random.default_rng(0).normal(size=(2, 6, 8, 8))
    options = {"n_baselines": 2} if method == "deeplift_shap" else {}
    result = sx.explain(model, image, target, method, dtype=torch.float64, baseline="zero", **options)
    assert result.maps.shape == image.shape
    assert abs(result.delta) < 1e-9 * max(1.0, abs(result.expected_sum))
    record = json.loads(result.to_json())
    assert record["options"]["baseline"] == {"type": "zero"}


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_normalized_aggregation_is_the_sum_of_unit_maps_per_voxel(norm):
    model = tiny_unet(norm=norm).double().eval()
    image = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    target = sx.BoxTarget((1, 2, 2), (3, 4, 4), class_index=1, aggregation="normalized")
    result = sx.explain(model, image, target, "deeplift", dtype=torch.float64)
    x = image[None]
    expected = torch.zeros_like(x)
    method = DeepLift()
    for index in itertools.product(range(1, 3), range(2, 4), range(2, 4)):  # the slow way: one map per voxel
        seed = torch.zeros(1, 2, 6, 8, 8, dtype=torch.float64)
        seed[(0, 1, *index)] = 1.0
        maps = method.attribute(model, x, seed).maps
        expected += maps / maps.sum()
    np.testing.assert_allclose(result.maps, expected[0].numpy(), rtol=1e-6, atol=1e-9 * float(expected.abs().max()))


def test_options_rebuild_the_method_and_are_checked_at_once():
    method = DeepLiftShap(baseline="min", n_baselines=3, noise_level=0.05, baseline_seed=9, internal_batch_size=4)
    rebuilt = sx.engine.api.make_method("deeplift_shap", **json.loads(json.dumps(method.options())))
    assert rebuilt.options() == method.options()
    assert DeepLift().options()["baseline"] == {"type": "blur", "sigma_voxels": 5.0}
    for kwargs, message in [({"n_baselines": 0}, "n_baselines must be an integer >= 1, got 0"),
                            ({"n_baselines": 2.0}, "n_baselines must be an integer >= 1, got 2.0"),
                            ({"noise_level": -0.1}, r"noise_level must be a finite number >= 0.*got -0.1"),
                            ({"noise_level": float("nan")}, "noise_level must be a finite number >= 0"),
                            ({"baseline_seed": "1"}, "baseline_seed must be an integer, got '1'"),
                            ({"baseline": "blurry"}, "baseline: "),
                            ({"internal_batch_size": 0}, "internal_batch_size")]:
        with pytest.raises(SegExplainError, match=message):
            DeepLiftShap(**kwargs)
    with pytest.raises(TypeError):
        DeepLift("zero")  # keyword-only


def test_the_command_line_explains_with_deeplift_shap(tmp_path):
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    images = []
    for i in range(2):
        path = tmp_path / f"seq{i}.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(rng.normal(size=(6, 8, 10)).astype(np.float32)), str(path))
        images.append(str(path))
    weights = tmp_path / "weights.pt"
    torch.save(tiny_unet().eval().state_dict(), weights)
    output = tmp_path / "out"
    code = cli.main(["explain", "--input", *images, "--model", "SegExplainLib.models:tiny_unet", "--weights",
                     str(weights), "--output", str(output), "--no-figures", "--progress", "none", "--box-index",
                     "1", "2", "2", "4", "6", "7", "--method", "deeplift_shap", "--baseline", "zero", "--option",
                     "n_baselines=2"])
    assert code == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["method"] == "deeplift_shap" and summary["options"]["n_baselines"] == 2
    assert summary["options"]["baseline"] == {"type": "zero"}


@pytest.mark.parametrize("var_a, cov, var_d", [
    (1.0, 0.3, 2.0),  # smooth
    (0.0, 0.0, 3.0),  # a constant reference: the variance is eps at t = 0
    (1.0, -1.0, 1.0),  # a + t d vanishes at t = 1/2 inside the path
    (2.0, 0.0, 0.0),  # the input equals the reference
])
def test_the_norm_rule_integrals_match_adaptive_quadrature(var_a, cov, var_d):
    """The four integrals along the path, from a group built to have these moments, against scipy's quad."""
    from scipy.integrate import quad

    from SegExplainLib.engine.gradients.deeplift import _path_integrals

    eps = 1e-5
    basis = np.random.default_rng(0).normal(size=(64, 2))
    e1, e2 = np.linalg.qr(basis - basis.mean(0))[0].T * 8.0  # centred, mean(e1^2) = mean(e2^2) = 1, mean(e1 e2) = 0
    a = np.sqrt(var_a) * e1
    d = cov / np.sqrt(var_a) * e1 + np.sqrt(max(var_d - cov**2 / var_a, 0.0)) * e2 if var_a else np.sqrt(var_d) * e2
    ours = [float(v) for v in _path_integrals(torch.as_tensor(a)[None, None], torch.as_tensor(d)[None, None], eps)]
    s2 = lambda t: var_a + 2 * cov * t + var_d * t**2 + eps  # noqa: E731
    expected = [quad(f, 0, 1, epsabs=0, epsrel=1e-12, limit=500, points=[0.5])[0] for f in (
        lambda t: s2(t) ** -0.5, lambda t: s2(t) ** -1.5, lambda t: t * s2(t) ** -1.5, lambda t: t**2 * s2(t) ** -1.5)]
    np.testing.assert_allclose(ours, expected, rtol=1e-9)
