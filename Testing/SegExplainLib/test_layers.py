"""Every layer that real 3D segmentation networks use, one tiny network around each, against an independent reference.

Where the layer is affine (convolutions, linear, average pooling, upsampling, frozen norms) the reference is the
matrix form of :mod:`lrp_reference`: the layer's dense ``(W, b)`` and the rule written out as in the papers; ReLU-type
rectifiers, dropout and flatten pass relevance unchanged; max pooling routes it to the maximum; norm layers under the
default rule "pass" hand their output relevance unchanged to their input. Everything runs in float64.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lrp_reference import EPS, as_matrix, reference_layer, stab
from torch import nn

from SegExplainLib.engine.composites import Composite, lrp_defaults
from SegExplainLib.engine.lrp import LRP, Deconvolution, GuidedBackprop
from SegExplainLib.engine.rules import Epsilon
from SegExplainLib.errors import UnsupportedLayerError
from SegExplainLib.models.networks import tiny_unet

WEIGHTED = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose3d, nn.Linear)
PARAMETER_FREE = (nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.Upsample)
NORMS = (nn.BatchNorm1d, nn.BatchNorm3d, nn.InstanceNorm3d, nn.GroupNorm)
# element-wise or reshaping layers through which relevance passes unchanged
IDENTITY = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.Dropout, nn.Dropout3d, nn.Flatten, nn.Identity, *NORMS)


def max_route(x: np.ndarray, R: np.ndarray, k: int) -> np.ndarray:
    """Max pooling with non-overlapping k-windows: each output's relevance goes to the input that was the maximum."""
    out = np.zeros_like(x)
    for c, d, h, w in np.ndindex(R.shape):
        window = x[c, d * k:(d + 1) * k, h * k:(h + 1) * k, w * k:(w + 1) * k]
        i, j, m = np.unravel_index(np.argmax(window), window.shape)
        out[c, d * k + i, h * k + j, w * k + m] += R[c, d, h, w]
    return out


def reference_lrp(model: nn.Sequential, x: torch.Tensor, seed: torch.Tensor, weighted_rule: str = "epsilon",
                  norm_step=None, eps: float = EPS) -> np.ndarray:
    """Run the chain forward collecting activations, then pass relevance back layer by layer (batch of one)."""
    model.eval()
    acts = [x]
    with torch.no_grad():
        for module in model:
            acts.append(module(acts[-1]))
    R = (seed * acts[-1])[0].numpy()
    for module, a_in in reversed(list(zip(model, acts[:-1]))):
        x_in = a_in[0].numpy()
        if isinstance(module, (*WEIGHTED, *PARAMETER_FREE)):
            rule = weighted_rule if isinstance(module, WEIGHTED) else "epsilon"
            W, b = as_matrix(module, tuple(a_in.shape[1:]))
            R = reference_layer(rule, W, b, x_in.ravel(), R.ravel(), eps).reshape(x_in.shape)
        elif isinstance(module, nn.MaxPool3d):
            R = max_route(x_in, R, module.kernel_size)
        elif norm_step is not None and isinstance(module, NORMS):
            R = norm_step(module, x_in, R)
        elif isinstance(module, IDENTITY):
            R = R.reshape(x_in.shape)
        else:
            raise TypeError(f"no reference for {module}")
    return R


def assert_maps_close(maps: torch.Tensor, expected: np.ndarray, rtol: float = 1e-7) -> None:
    np.testing.assert_allclose(maps[0].detach().numpy(), expected, rtol=rtol, atol=1e-9 * np.abs(expected).max())


def randomize_norm(norm: nn.Module) -> nn.Module:
    """Norm layers as after training: non-trivial gain, shift and running statistics."""
    with torch.no_grad():
        if getattr(norm, "weight", None) is not None:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0.0, 0.3)
        if getattr(norm, "running_mean", None) is not None:
            norm.running_mean.normal_(0.0, 0.3)
            norm.running_var.uniform_(0.5, 1.5)
    return norm


class RelevanceProbe:
    """Relevance ``t * g_t`` at the input and output of one module during an LRP backward pass.

    The probe's forward hook is registered before the engine wires the model, so it sees the rule-wired output; the
    input is read only by this module (a ``Sequential`` chain), so its gradient is the module's own.
    """

    def __init__(self, module: nn.Module) -> None:
        self.r_in = self.r_out = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        x = args[0]
        if output.requires_grad and x.requires_grad:  # only while the engine explains
            output.register_hook(lambda g: setattr(self, "r_out", (output * g).detach()))
            x.register_hook(lambda g: setattr(self, "r_in", (x * g).detach()))

    def remove(self) -> None:
        self.handle.remove()


# ---------------------------------------------------------------------------------------------------------------
# Affine layers and max pooling against the matrix reference
# ---------------------------------------------------------------------------------------------------------------


def _conv3d():
    return nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv3d(3, 4, 3, padding=1, stride=2),
                         nn.ReLU(), nn.Conv3d(4, 2, 1)), (1, 2, 4, 6, 6)


def _conv2d():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1, stride=2),
                         nn.ReLU(), nn.Conv2d(4, 2, 1)), (1, 2, 6, 6)


def _conv_transpose3d():
    return nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.ReLU(), nn.ConvTranspose3d(3, 3, 2, stride=2),
                         nn.ReLU(), nn.Conv3d(3, 2, 1)), (1, 2, 2, 3, 3)


def _linear():
    # classification-style head on a flattened small volume: the output is (N, K)
    return nn.Sequential(nn.Conv3d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(24, 5),
                         nn.ReLU(), nn.Linear(5, 2)), (1, 2, 4, 4, 4)


def _global_pool_linear():
    return nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                         nn.Linear(3, 2)), (1, 2, 4, 4, 4)


def _elu():
    # ELU on the convolutions' outputs (signed, never exactly zero): rule "pass" hands relevance on unchanged
    return nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.ELU(), nn.Conv3d(3, 4, 3, padding=1), nn.ELU(),
                         nn.Conv3d(4, 2, 1)), (1, 2, 4, 6, 6)


def _around(make_layer, shape=(1, 2, 4, 6, 6)):
    """conv -> ReLU -> LAYER -> 1x1 conv head, for a layer that keeps the 3 channels."""
    return lambda: (nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.ReLU(), make_layer(), nn.Conv3d(3, 2, 1)), shape)


AFFINE_CASES = {
    "conv3d": (_conv3d, ("epsilon", "z_plus")),
    "conv2d": (_conv2d, ("epsilon", "z_plus")),
    "conv_transpose3d": (_conv_transpose3d, ("epsilon", "z_plus")),
    "linear": (_linear, ("epsilon", "z_plus")),
    "adaptive_avg_pool_linear": (_global_pool_linear, ("epsilon", "z_plus")),
    "max_pool3d": (_around(lambda: nn.MaxPool3d(2)), ("epsilon", "z_plus")),
    "avg_pool3d": (_around(lambda: nn.AvgPool3d(3, stride=2, padding=1)), ("epsilon",)),
    "adaptive_avg_pool3d": (_around(lambda: nn.AdaptiveAvgPool3d((3, 2, 4))), ("epsilon",)),  # overlapping windows in D
    "upsample_nearest": (_around(lambda: nn.Upsample(scale_factor=2, mode="nearest"), (1, 2, 2, 3, 3)), ("epsilon",)),
    "upsample_trilinear": (_around(lambda: nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
                                   (1, 2, 2, 3, 3)), ("epsilon",)),
    "dropout": (_around(lambda: nn.Dropout(0.5)), ("epsilon",)),
    "dropout3d": (_around(lambda: nn.Dropout3d(0.5)), ("epsilon",)),
    "elu": (_elu, ("epsilon", "z_plus")),
}


@pytest.mark.parametrize("case, composite", [(c, comp) for c, (_, comps) in AFFINE_CASES.items() for comp in comps])
def test_layer_matches_matrix_reference(case, composite):
    model, shape = AFFINE_CASES[case][0]()
    model = model.double().train()  # the engine must evaluate in eval mode (dropout off) and restore train mode
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        seed = torch.randn_like(model.eval()(x))
    model.train()
    out = LRP(composite=composite).attribute(model, x, seed)
    assert model.training and all(m.training for m in model)
    assert_maps_close(out.maps, reference_lrp(model, x, seed, weighted_rule=composite))


@pytest.mark.parametrize("build, index", [(_elu, 1), (_around(lambda: nn.Dropout3d(0.5)), 2)], ids=["elu", "dropout3d"])
def test_pass_layers_hand_relevance_through_unchanged(build, index):
    """ELU has rule "pass", dropout is the identity in eval: relevance at the layer's input equals its output's."""
    model, shape = build()
    model = model.double()
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        seed = torch.randn_like(model(x))
    probe = RelevanceProbe(model[index])
    try:
        LRP(composite="epsilon").attribute(model, x, seed)
    finally:
        probe.remove()
    assert probe.r_out.abs().sum() > 0
    # "pass" divides by x + 1e-12 sign(x): a relative error of 1e-12 / |x| (1e-8 at |x| = 1e-4)
    torch.testing.assert_close(probe.r_in, probe.r_out, rtol=1e-6, atol=1e-10 * float(probe.r_out.abs().max()))


# ---------------------------------------------------------------------------------------------------------------
# Rectifiers: the gradient is the LRP identity rule
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_act", [nn.ReLU, lambda: nn.LeakyReLU(0.1), lambda: nn.PReLU(init=0.2),
                                      lambda: nn.PReLU(4, init=0.3)], ids=["relu", "leaky_relu", "prelu", "prelu_ch"])
def test_rectifier_lrp_zero_equals_gradient_times_input(make_act):
    """LRP-0 on a bias-free rectifier network is gradient x input: rectifiers need no hook."""
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1, bias=False), make_act(),
                          nn.Conv3d(4, 4, 3, padding=1, bias=False), make_act(),
                          nn.Conv3d(4, 2, 1, bias=False)).double()
    with torch.no_grad():  # per-channel PReLU slopes should differ
        for m in model:
            if isinstance(m, nn.PReLU):
                m.weight.uniform_(0.1, 0.4)
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    seed = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    (grad,) = torch.autograd.grad((model(x) * seed).sum(), x)
    maps = LRP(composite="zero").attribute(model, x, seed).maps
    torch.testing.assert_close(maps, grad * x.detach(), rtol=1e-9, atol=1e-13)


# ---------------------------------------------------------------------------------------------------------------
# Norm layers
# ---------------------------------------------------------------------------------------------------------------


def _conv_norm_net(norm: nn.Module, channels: int = 4, act: nn.Module | None = None) -> nn.Sequential:
    # the norm follows an activation, so no canonizer merges it: its rule applies; LeakyReLU keeps its input non-zero
    return nn.Sequential(nn.Conv3d(2, channels, 3, padding=1), act or nn.LeakyReLU(0.1), randomize_norm(norm),
                         nn.Conv3d(channels, 2, 1)).double().eval()


NORM_CASES = {
    "batch_norm_eval": lambda: nn.BatchNorm3d(4),
    "instance_norm": lambda: nn.InstanceNorm3d(4),
    "instance_norm_affine": lambda: nn.InstanceNorm3d(4, affine=True),
    "group_norm": lambda: nn.GroupNorm(2, 4),
}


PASS_AFTER_RELU = pytest.param("instance_norm", nn.ReLU, marks=pytest.mark.xfail(
    strict=True, reason="known limitation, documented in docs/engine.md: Pass returns g_x = R_y / stab(x); where the "
                        "norm's input is exactly 0 (after a ReLU) R_x = x * g_x is 0, so R_y is dropped there"),
    id="instance_norm-after_relu")


@pytest.mark.parametrize("case, act", [*[(c, nn.LeakyReLU) for c in sorted(NORM_CASES)], PASS_AFTER_RELU])
def test_norm_pass_rule_conserves_through_the_layer(case, act):
    """Default rule "pass": the norm's input relevance equals its output relevance, voxel by voxel."""
    model = _conv_norm_net(NORM_CASES[case](), act=act(0.1) if act is nn.LeakyReLU else act())
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    seed = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    probe = RelevanceProbe(model[2])
    try:
        out = LRP(composite=Composite(rules=lrp_defaults())).attribute(model, x, seed)  # norms: Pass
    finally:
        probe.remove()
    # "pass" divides by x + 1e-12 sign(x): a relative error of 1e-12 / |x| (1e-8 at |x| = 1e-4)
    torch.testing.assert_close(probe.r_in, probe.r_out, rtol=1e-6, atol=1e-10 * float(probe.r_out.abs().max()))
    assert_maps_close(out.maps, reference_lrp(model, x, seed))


def frozen_affine(norm: nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel slope and offset of a norm layer with its statistics for this input held fixed, by hand."""
    c = x.shape[0]
    if isinstance(norm, nn.GroupNorm):
        g = x.reshape(norm.num_groups, -1)
        mean = np.repeat(g.mean(1), c // norm.num_groups)
        var = np.repeat(g.var(1), c // norm.num_groups)
    elif isinstance(norm, nn.InstanceNorm3d) or not norm.track_running_stats:
        # per-instance statistics (a batch of one: BatchNorm without running statistics normalizes the same way)
        mean, var = x.reshape(c, -1).mean(1), x.reshape(c, -1).var(1)
    else:
        mean, var = norm.running_mean.numpy(), norm.running_var.numpy()
    gain = norm.weight.detach().numpy() if norm.weight is not None else np.ones(c)
    shift = norm.bias.detach().numpy() if norm.bias is not None else np.zeros(c)
    slope = gain / np.sqrt(var + norm.eps)
    view = (c,) + (1,) * (x.ndim - 1)
    return slope.reshape(view) * np.ones_like(x), (shift - mean * slope).reshape(view) * np.ones_like(x)


def epsilon_norm_step(norm: nn.Module, x: np.ndarray, R: np.ndarray) -> np.ndarray:
    """The epsilon rule on the diagonal affine map y = s x + t: R_x = x s R_y / (y + eps sign y)."""
    s, t = frozen_affine(norm, x)
    y = s * x + t
    with torch.no_grad():  # the hand-written map is the layer for this input
        np.testing.assert_allclose(y, norm(torch.from_numpy(x)[None])[0].numpy(), rtol=1e-10, atol=1e-12)
    return x * s * R / stab(y)


EPSILON_NORM_CASES = [
    *[pytest.param(make, id=name) for name, make in sorted(NORM_CASES.items())],
    # eval mode without running statistics normalizes with the batch's own (once a TypeError in frozen_norm_scale)
    pytest.param(lambda: nn.BatchNorm3d(4, track_running_stats=False), id="batch_norm_no_running_stats"),
]


@pytest.mark.parametrize("how", ["category", "layer_rules"])
@pytest.mark.parametrize("make", EPSILON_NORM_CASES)
def test_epsilon_on_norm_is_the_frozen_statistics_affine_map(make, how):
    model = _conv_norm_net(make())
    if how == "category":
        composite = Composite(rules={**lrp_defaults(), "norm": Epsilon(1e-6)})
    else:
        composite = Composite(rules=lrp_defaults(), layer_rules={"2": Epsilon(1e-6)})
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    seed = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    out = LRP(composite=composite).attribute(model, x, seed)
    assert_maps_close(out.maps, reference_lrp(model, x, seed, norm_step=epsilon_norm_step))


def test_pass_on_norm_equals_merging_it_under_z_plus():
    """The "pass" docstring: pass on a norm = the norm (statistics frozen, positive gain) merged into the conv, z+."""
    model = _conv_norm_net(nn.InstanceNorm3d(4, affine=True))
    model = nn.Sequential(model[0], model[2], model[1], model[3])  # conv -> norm -> LeakyReLU -> head
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    seed = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        z = model[0](x)[0].numpy()
    s, t = frozen_affine(model[1], z)
    merged = copy.deepcopy(model)
    with torch.no_grad():  # one input, so per-instance statistics are constants of the merged conv
        merged[0].weight.mul_(torch.from_numpy(s[:, 0, 0, 0]).reshape(-1, 1, 1, 1, 1))
        merged[0].bias.copy_(torch.from_numpy(s[:, 0, 0, 0] * model[0].bias.numpy() + t[:, 0, 0, 0]))
        merged[1] = nn.Identity()
        torch.testing.assert_close(merged(x), model(x))
    # a tiny stabilizer: z+ of the merged conv is s times that of the unmerged one, and so would be its epsilon share
    lrp = LRP(composite="z_plus", epsilon=1e-14)
    torch.testing.assert_close(lrp.attribute(model, x, seed).maps, lrp.attribute(merged, x, seed).maps,
                               rtol=1e-8, atol=1e-14)


def _fold(model: nn.Sequential) -> nn.Sequential:
    """A copy with every (linear layer, BatchNorm) pair folded by hand and the BatchNorm replaced by an identity."""
    folded = copy.deepcopy(model)
    for i in range(len(folded) - 1):
        layer, norm = folded[i], folded[i + 1]
        if isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm3d)):
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            shape = [1] * layer.weight.dim()
            shape[1 if isinstance(layer, nn.ConvTranspose3d) else 0] = -1
            with torch.no_grad():
                layer.weight.mul_(scale.reshape(shape))
                layer.bias.copy_((layer.bias - norm.running_mean) * scale + norm.bias)
            folded[i + 1] = nn.Identity()
    return folded


BN_MERGE_CASES = {
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.BatchNorm3d(3), nn.ReLU(),
                                     nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 2, 1)),
               (1, 2, 4, 4, 4)),
    "conv_transpose3d": (lambda: nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.ReLU(),
                                               nn.ConvTranspose3d(3, 3, 2, stride=2), nn.BatchNorm3d(3), nn.ReLU(),
                                               nn.Conv3d(3, 2, 1)), (1, 2, 2, 3, 3)),
    "linear": (lambda: nn.Sequential(nn.Conv3d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(24, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)),
               (1, 2, 4, 4, 4)),
}


@pytest.mark.parametrize("composite", ["epsilon", "z_plus"])
@pytest.mark.parametrize("case", sorted(BN_MERGE_CASES))
def test_batch_norm_after_linear_layer_is_merged_and_restored(case, composite):
    build, shape = BN_MERGE_CASES[case]
    model = build().double().eval()
    for m in model:
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm3d)):
            randomize_norm(m)
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        seed = torch.randn_like(model(x))
    modules = list(model)
    params = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    folded = _fold(model)

    maps = LRP(composite=composite).attribute(model, x, seed).maps
    torch.testing.assert_close(maps, LRP(composite=composite).attribute(folded, x, seed).maps, rtol=1e-9, atol=1e-13)
    assert_maps_close(maps, reference_lrp(folded, x, seed, weighted_rule=composite))
    # the model is back as it was: same module objects, same parameter objects with the same values, same buffers
    assert list(model) == modules and all(a is b for a, b in zip(model, modules))
    for name, p in model.named_parameters():
        assert p is params[name][0] and torch.equal(p, params[name][1])
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name])


# ---------------------------------------------------------------------------------------------------------------
# Skips
# ---------------------------------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """MONAI-style residual unit: conv -> ReLU -> conv, plus a 1x1 conv on the skip, then ReLU."""

    def __init__(self, inplace_add: bool = False) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv3d(2, 3, 3, padding=1), nn.ReLU()
        self.conv2 = nn.Conv3d(3, 3, 3, padding=1)
        self.skip = nn.Conv3d(2, 3, 1)
        self.act2 = nn.ReLU()
        self.head = nn.Conv3d(3, 2, 1)
        self.inplace_add = inplace_add

    def forward(self, x):
        out = self.conv2(self.act1(self.conv1(x)))
        if self.inplace_add:
            out += self.skip(x)  # as MONAI's UnetResBlock does
        else:
            out = out + self.skip(x)
        return self.head(self.act2(out))


@pytest.mark.parametrize("inplace_add", [False, True], ids=["add", "inplace_add"])
def test_residual_block_with_skip_conv_matches_reference(inplace_add):
    model = ResidualBlock(inplace_add).double()
    shape = (3, 3, 4, 4)
    x = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)
    seed = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)
    out = LRP(composite="epsilon").attribute(model, x, seed)

    with torch.no_grad():
        h = model.act1(model.conv1(x))
        a, s = model.conv2(h), model.skip(x)
        y = model.act2(a + s)
        logits = model.head(y)
    ravel = lambda t: t[0].numpy().ravel()  # noqa: E731
    W, b = as_matrix(model.head, shape)
    R_y = reference_layer("epsilon", W, b, ravel(y), ravel(seed * logits))
    total = ravel(a + s)  # the addition splits relevance in proportion to the two contributions (LRP-0)
    R_a = np.where(total == 0, 0.0, ravel(a) / np.where(total == 0, 1.0, total) * R_y)
    R_s = np.where(total == 0, 0.0, ravel(s) / np.where(total == 0, 1.0, total) * R_y)
    W2, b2 = as_matrix(model.conv2, shape)
    R_h = reference_layer("epsilon", W2, b2, ravel(h), R_a)
    W1, b1 = as_matrix(model.conv1, (2, 3, 4, 4))
    Ws, bs = as_matrix(model.skip, (2, 3, 4, 4))
    expected = reference_layer("epsilon", W1, b1, ravel(x), R_h) + reference_layer("epsilon", Ws, bs, ravel(x), R_s)
    assert_maps_close(out.maps, expected.reshape(2, 3, 4, 4))


# ---------------------------------------------------------------------------------------------------------------
# Heads, unsupported layers and functional operations
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", [nn.Softmax(dim=1), nn.LogSoftmax(dim=1), nn.Sigmoid()],
                         ids=["softmax", "log_softmax", "sigmoid"])
def test_output_head_is_skipped_and_logits_explained(head):
    body, shape = _conv3d()
    model = nn.Sequential(OrderedDict(body=body, head=head)).double()
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        logits = model.body(x)
    seed = torch.randn_like(logits)
    out = LRP(composite="epsilon").attribute(model, x, seed)
    torch.testing.assert_close(out.expected, (seed * logits).flatten(1).sum(1))
    assert_maps_close(out.maps, reference_lrp(model.body, x, seed))


def test_softmax_inside_network_raises_naming_its_path():
    model = nn.Sequential(OrderedDict(
        body=nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.Softmax(dim=1)), head=nn.Conv3d(3, 2, 1))).double()
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    with pytest.raises(UnsupportedLayerError, match=r"'body\.1'.*softmax/sigmoid inside the network"):
        LRP(composite="epsilon").attribute(model, x, torch.ones(1, 2, 4, 4, 4, dtype=torch.float64))


class Functional(nn.Module):
    """A container whose forward applies ``fn`` to the activations functionally, outside any leaf module."""

    def __init__(self, fn, act: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(2, 4, 3, padding=1, bias=False)
        self.conv2 = nn.Conv3d(2, 4, 3, padding=1, bias=False)
        self.head = nn.Conv3d(4, 2, 1, bias=False)
        self.act = act
        self.fn = fn

    def forward(self, x):
        h = self.conv1(x)
        h = self.act(h) if self.act is not None else self.fn(h, self.conv2(x))
        return self.head(h)


def _net(fn):
    return nn.Sequential(OrderedDict(block=Functional(fn))).double()


FORBIDDEN = {
    "sigmoid_gate": (lambda h, g: h * torch.sigmoid(g), r"torch\.sigmoid"),
    "attention_product": (lambda h, g: h * g, r"mul"),
    "softmax_attention": (lambda h, g: h * F.softmax(g, dim=1), r"softmax"),
}


@pytest.mark.parametrize("case", sorted(FORBIDDEN))
def test_functional_ops_bypassing_rules_raise(case):
    fn, name = FORBIDDEN[case]
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    with pytest.raises(UnsupportedLayerError, match=name + r".*'block' \(Functional\)"):
        LRP(composite="epsilon").attribute(_net(fn), x, torch.ones(1, 2, 4, 4, 4, dtype=torch.float64))


def _imul(h, g):
    h = h.clone()
    h *= g
    return h


GUARD_GAPS = {
    # nonlinear functional operations that are not on the deny lists: they silently take the plain gradient
    "square_by_pow": (LRP, lambda h, g: h * 2.0 + g ** 2),
    "inplace_product": (LRP, _imul),
    "inplace_sigmoid": (LRP, lambda h, g: h * 2.0 + g.clone().sigmoid_()),
    "clamp_as_relu": (GuidedBackprop, lambda h, g: h.clamp(min=0) + g),
}


@pytest.mark.parametrize("case", sorted(GUARD_GAPS))
def test_functional_ops_missing_from_the_guard_raise(case):
    method, fn = GUARD_GAPS[case]
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    with pytest.raises(UnsupportedLayerError):
        method().attribute(_net(fn), x, torch.ones(1, 2, 4, 4, 4, dtype=torch.float64))


@pytest.mark.parametrize("relu", [F.relu, torch.relu, torch.Tensor.relu], ids=["F.relu", "torch.relu", "Tensor.relu"])
def test_functional_relu_is_fine_for_lrp_but_raises_for_guided_backprop_and_deconvolution(relu):
    functional = nn.Sequential(OrderedDict(block=Functional(None, act=relu))).double()
    module = copy.deepcopy(functional)
    module.block.act = nn.ReLU()
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    seed = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    # a rectifier is the LRP identity rule: the functional form gives the same map as the module form
    torch.testing.assert_close(LRP(composite="epsilon").attribute(functional, x, seed).maps,
                               LRP(composite="epsilon").attribute(module, x, seed).maps, rtol=1e-12, atol=0)
    # ... but Guided Backprop and Deconvolution would silently skip their rule there
    with pytest.raises(UnsupportedLayerError, match=r"relu.*'block' \(Functional\).*guided_backprop"):
        GuidedBackprop().attribute(functional, x, seed)
    with pytest.raises(UnsupportedLayerError, match=r"relu.*'block' \(Functional\).*deconvolution"):
        Deconvolution().attribute(functional, x, seed)


# ---------------------------------------------------------------------------------------------------------------
# Conservation
# ---------------------------------------------------------------------------------------------------------------


def test_epsilon_conserves_on_bias_free_relu_network():
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool3d(2),
                          nn.Conv3d(4, 4, 3, padding=1, bias=False), nn.ReLU(),
                          nn.ConvTranspose3d(4, 4, 2, stride=2, bias=False), nn.ReLU(),
                          nn.Conv3d(4, 2, 1, bias=False)).double()
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    seed = torch.zeros(1, 2, 4, 4, 4, dtype=torch.float64)
    seed[0, 1, 1:3] = 1.0
    out = LRP(composite="epsilon", epsilon=1e-9).attribute(model, x, seed)
    # only outputs with |z| ~ 1e-9 lose relevance to the stabilizer
    assert abs(float(out.delta[0])) <= 1e-4 * abs(float(out.expected[0]))


def test_z_plus_conserves_when_every_denominator_is_positive():
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv3d(4, 2, 1)).double()
    with torch.no_grad():  # positive weights after the first layer: every z+ with a non-zero input is positive
        model[2].weight.abs_()
        model[4].weight.abs_()
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    seed = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    with torch.no_grad():  # check the premise: z+ = sum of positive contributions > 0 at every output
        h1 = model[1](model[0](x))
        h2 = model[3](model[2](h1))
        w = model[0].weight
        z1 = F.conv3d(x.clamp(min=0), w.clamp(min=0), padding=1) + F.conv3d(x.clamp(max=0), w.clamp(max=0), padding=1)
        for z in (z1, F.conv3d(h1, model[2].weight, padding=1), F.conv3d(h2, model[4].weight)):
            assert float(z.min()) > 1e-3
    # biases are ignored by z+, so no relevance is absorbed; the default stabilizer 1e-6 would take ~1e-6 / z+
    out = LRP(composite="z_plus", epsilon=1e-12).attribute(model, x, seed)
    assert abs(float(out.delta[0])) <= 1e-8 * abs(float(out.expected[0]))


def test_epsilon_composite_stays_bounded_at_a_near_zero_pre_norm_activation():
    model = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1, bias=False), nn.InstanceNorm3d(3), nn.LeakyReLU(0.1),
                          nn.Conv3d(3, 2, 1, bias=False)).double()
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    with torch.no_grad():  # move one input so that one pre-norm activation is 1e-9 (its norm output is not small)
        z = model[0](x)[0, 0, 2, 2, 2]
        x[0, 0, 2, 2, 2] -= (z - 1e-9) / model[0].weight[0, 0, 1, 1, 1]
        assert abs(float(model[0](x)[0, 0, 2, 2, 2]) - 1e-9) < 1e-12
        total = float(model(x).abs().sum())
    seed = torch.ones(1, 2, 4, 4, 4, dtype=torch.float64)
    bounded = Composite(rules={**lrp_defaults(), "norm": Epsilon(1e-6)})
    assert float(LRP(composite=bounded).attribute(model, x, seed).maps.abs().max()) <= total
    # one voxel's LRP-epsilon relevance should not exceed the whole output relevance (measured: ~45 times)
    assert float(LRP(composite="epsilon").attribute(model, x, seed).maps.abs().max()) <= total


@pytest.mark.parametrize("size", [4, 5])
def test_flat_first_layer_rule_applies_when_the_network_pads_its_input(size):
    """tiny_unet pools once: an odd depth is padded to an even one before the first conv."""
    model = tiny_unet(norm="none").double()
    x = torch.randn(1, 2, size, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        seed = torch.ones_like(model(x))
    maps = LRP(composite="epsilon_plus_flat").attribute(model, x, seed).maps
    # the flat rule ignores the input values: every input channel receives the same relevance
    torch.testing.assert_close(maps[:, 0], maps[:, 1], rtol=1e-12, atol=1e-15)
