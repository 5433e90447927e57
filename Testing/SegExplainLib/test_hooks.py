"""The rule-based methods leave the model exactly as they found it, also when something fails half-way.

LRP, Guided Backprop and Deconvolution hook every module, patch the ``forward`` of leaf modules, switch to eval mode,
freeze parameters, turn in-place activations off and (LRP) merge BatchNorm into convolutions. After a successful
explanation and after an exception in the forward pass, the backward pass or the wiring itself, every one of these
must be undone: no hook or patched ``forward`` left, the same training / ``requires_grad`` / ``inplace`` flags, the
same module and parameter objects with the same values, and bit-identical outputs. The second part checks Guided
Backprop and Deconvolution against captum (ReLU networks) and against their formulas written out by hand (LeakyReLU,
PReLU, where captum falls back to the plain gradient).
"""

from __future__ import annotations

import copy
import types
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

from SegExplainLib.engine.api import explain
from SegExplainLib.engine.composites import Composite, lrp_defaults
from SegExplainLib.engine.lrp import LRP, Deconvolution, GuidedBackprop
from SegExplainLib.engine.rules import Flat
from SegExplainLib.engine.targets import ClassChannel
from SegExplainLib.errors import SegExplainError, UnsupportedLayerError

METHODS = {"lrp": LRP, "guided_backprop": GuidedBackprop, "deconvolution": Deconvolution}


class Bomb(nn.Module):
    """A container whose forward raises on its second call (the first is the user's own)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(4, 4, 3, padding=1)
        self.calls = 0
        self.armed = False

    def forward(self, x):
        self.calls += 1
        if self.armed and self.calls == 2:
            raise RuntimeError("bomb went off in the forward pass")
        return self.conv(x)


def _raise_in_backward(grad):
    raise RuntimeError("bomb went off in the backward pass")


class BackwardBomb(nn.Module):
    """A container whose output's backward raises (while the composite is attached)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(4, 4, 1)
        self.armed = False

    def forward(self, x):
        h = self.conv(x)
        if self.armed and h.requires_grad:  # not in the user's own forward pass under no_grad
            h = h.clone()
            h.register_hook(_raise_in_backward)
        return h


class Unknown(nn.Module):
    """A leaf module no method knows, walked: its sigmoid gate fails after the modules before it have run."""

    def forward(self, x):
        return x * torch.sigmoid(x)


def _user_hook(module, args, output):
    return None


def _user_pre_hook(module, args):
    return None


def make_model(scenario: str) -> nn.Sequential:
    """BatchNorm after a conv (merged by LRP), in-place rectifiers, mixed training and requires_grad flags,
    user hooks and a user instance ``forward`` that must survive."""
    layers = OrderedDict(
        conv1=nn.Conv3d(2, 4, 3, padding=1), bn=nn.BatchNorm3d(4), act1=nn.ReLU(inplace=True),
        block=Bomb(), act2=nn.LeakyReLU(0.1, inplace=True), back=BackwardBomb(), act3=nn.ReLU(),
        head=nn.Conv3d(4, 2, 1))
    if scenario == "unsupported_leaf":
        layers["tail"] = Unknown()
    model = nn.Sequential(layers).double()
    with torch.no_grad():
        model.bn.running_mean.normal_(0.0, 0.3)
        model.bn.running_var.uniform_(0.5, 1.5)
        model.bn.weight.uniform_(0.5, 1.5)
    model.train()
    model.block.eval()  # mixed flags: each module's own flag must come back
    model.conv1.bias.requires_grad_(False)
    model.head.register_forward_hook(_user_hook)
    model.conv1.register_forward_pre_hook(_user_pre_hook)
    model.act3.forward = types.MethodType(nn.ReLU.forward, model.act3)  # a user's instance attribute
    model.block.armed = scenario == "forward_raises"
    model.back.armed = scenario == "backward_raises"
    return model


def snapshot(model: nn.Module) -> dict:
    """Everything the engine touches, by identity where identity matters."""
    return {
        "modules": [(name, m) for name, m in model.named_modules()],
        "children": {name: list(m._modules.items()) for name, m in model.named_modules()},
        "training": {name: m.training for name, m in model.named_modules()},
        "inplace": {name: getattr(m, "inplace", None) for name, m in model.named_modules()},
        "hooks": {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks),
                         dict(m._backward_pre_hooks)) for name, m in model.named_modules()},
        "forward": {name: m.__dict__.get("forward") for name, m in model.named_modules()},
        "params": {name: (p, p.requires_grad, p.dtype, p.detach().clone()) for name, p in model.named_parameters()},
        "buffers": {name: (b, b.detach().clone()) for name, b in model.named_buffers()},
    }


def outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode and train-mode outputs, computed on copies so that BatchNorm statistics of the model stay put."""
    results = []
    for train in (False, True):
        clone = copy.deepcopy(model)
        clone.block.armed = clone.back.armed = False
        clone.train(train)
        with torch.no_grad():
            results.append(clone(x))
    return tuple(results)


def assert_same_outputs(model: nn.Module, x: torch.Tensor, out_before) -> None:
    """The model gives bit-identical outputs to those recorded before the explanation."""
    for a, b in zip(out_before, outputs(model, x)):
        assert torch.equal(a, b)


def assert_restored(model: nn.Module, before: dict, buffer_identity: bool = True) -> None:
    after = snapshot(model)
    assert [(n, id(m)) for n, m in after["modules"]] == [(n, id(m)) for n, m in before["modules"]]
    assert {n: [(k, id(v)) for k, v in c] for n, c in after["children"].items()} == {
        n: [(k, id(v)) for k, v in c] for n, c in before["children"].items()}
    assert after["training"] == before["training"]
    assert after["inplace"] == before["inplace"]
    assert after["hooks"] == before["hooks"]  # the same hook objects: the user's kept, none of the engine's left
    for name, module in model.named_modules():
        if name not in ("head", "conv1"):
            assert not module._forward_hooks and not module._forward_pre_hooks, name
        if name != "act3":
            assert "forward" not in module.__dict__, name
    assert model.act3.__dict__["forward"] is before["forward"]["act3"]
    for name, (p, requires_grad, dtype, value) in before["params"].items():
        q = dict(model.named_parameters())[name]
        assert q is p and q.requires_grad == requires_grad and q.dtype == dtype and torch.equal(q, value), name
    for name, (b, value) in before["buffers"].items():
        c = dict(model.named_buffers())[name]
        assert (c is b or not buffer_identity) and c.dtype == value.dtype and torch.equal(c, value), name
    # nothing global left behind either
    assert not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks
    assert torch._C._len_torch_function_stack() == 0


SCENARIOS = {
    "success": None,
    "forward_raises": (RuntimeError, "forward pass"),
    "backward_raises": (RuntimeError, "backward pass"),
    "wrong_seed_shape": (SegExplainError, "model output has shape"),
    "unsupported_leaf": (UnsupportedLayerError, r"torch\.sigmoid in the forward of 'tail' \(Unknown\)"),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("method", list(METHODS))
def test_model_is_restored_after_success_and_failure(method, scenario):
    model = make_model(scenario)
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        model(x)  # the user's own forward pass: the Bomb's first call (BatchNorm statistics move here)
    model.block.calls = 1
    before, out_before = snapshot(model), outputs(model, x)
    shape = (1, 2, 4, 4, 3) if scenario == "wrong_seed_shape" else (1, 2, 4, 4, 4)
    seed = torch.randn(shape, dtype=torch.float64)
    if SCENARIOS[scenario] is None:
        maps = METHODS[method]().attribute(model, x, seed).maps
        assert maps.shape == x.shape and bool(torch.isfinite(maps).all())
    else:
        error, message = SCENARIOS[scenario]
        with pytest.raises(error, match=message):
            METHODS[method]().attribute(model, x, seed)
    assert_restored(model, before)
    assert_same_outputs(model, x, out_before)


def test_lrp_rule_error_in_the_middle_of_the_forward_restores_the_model():
    """A rule that refuses its layer (flat on an intermediate conv) raises while half of the model has run."""
    model = make_model("success")
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    before, out_before = snapshot(model), outputs(model, x)
    composite = Composite(rules=lrp_defaults(), layer_rules={"block.conv": Flat()})
    with pytest.raises(SegExplainError, match="receives an intermediate tensor"):
        LRP(composite=composite).attribute(model, x, torch.randn(1, 2, 4, 4, 4, dtype=torch.float64))
    assert_restored(model, before)
    assert_same_outputs(model, x, out_before)


def test_repeated_explanations_are_identical_and_leave_nothing_behind():
    """Nothing accumulates: the tenth explanation equals the first and the model is still as it was."""
    model = make_model("success")
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    seed = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    before = snapshot(model)
    first = LRP().attribute(model, x, seed).maps
    for _ in range(9):
        last = LRP().attribute(model, x, seed).maps
    assert torch.equal(first, last)
    assert_restored(model, before)


def test_explain_restores_dtype_mode_and_values_of_a_float32_model():
    """explain() moves the model to float64 for the computation and back: values round-trip exactly."""
    model = make_model("success").float()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float32)
    before = snapshot(model)
    result = explain(model, x, ClassChannel(class_index=1), "lrp", composite="epsilon_plus_flat", device="cpu",
                     dtype=torch.float64)
    assert result.maps.shape == (2, 4, 4, 4) and result.dtype == "float64"
    # Module.to() converts parameters in place but replaces buffers by new tensors: values are compared for those
    assert_restored(model, before, buffer_identity=False)


# ---------------------------------------------------------------------------------------------------------------
# Guided Backprop and Deconvolution: captum on ReLU networks, the formula by hand on LeakyReLU / PReLU
# ---------------------------------------------------------------------------------------------------------------


def rectifier_net(act) -> nn.Sequential:
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), act(), nn.Conv3d(4, 4, 3, padding=1), act(),
                          nn.MaxPool3d(2), nn.Conv3d(4, 4, 1), act(), nn.Conv3d(4, 2, 1)).double().eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.PReLU):
                m.weight.uniform_(0.1, 0.4)
    return model


class SeededScore(nn.Module):
    """captum explains one scalar per batch element: sum(seed * logits)."""

    def __init__(self, model: nn.Module, seed: torch.Tensor) -> None:
        super().__init__()
        self.model, self.seed = model, seed

    def forward(self, x):
        return (self.seed * self.model(x)).sum(dim=(1, 2, 3, 4))


def captum_map(name: str, model: nn.Module, x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    captum_attr = pytest.importorskip("captum.attr")
    method = {"guided_backprop": captum_attr.GuidedBackprop, "deconvolution": captum_attr.Deconvolution}[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return method(SeededScore(model, seed)).attribute(x.clone().requires_grad_(True)).detach()


def slope(module: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """f'(z) of a rectifier: 1 for positive inputs, the negative slope otherwise."""
    if isinstance(module, nn.LeakyReLU):
        negative = torch.full_like(z, module.negative_slope)
    elif isinstance(module, nn.PReLU):
        negative = module.weight.detach().reshape(1, -1, 1, 1, 1).expand_as(z)
    else:
        negative = torch.zeros_like(z)
    return torch.where(z > 0, torch.ones_like(z), negative)


def handwritten_backward(name: str, model: nn.Sequential, x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """The backward pass written out: linear layers and max pooling by their vector-Jacobian product, rectifiers by
    the method's formula: Guided Backprop f'(z) * max(g, 0), Deconvolution f(g) (the rectifier applied to g)."""
    acts = [x]
    with torch.no_grad():
        for module in model:
            acts.append(module(acts[-1]))
    g = seed
    for module, z in reversed(list(zip(model, acts[:-1]))):
        if isinstance(module, (nn.ReLU, nn.LeakyReLU, nn.PReLU)):
            if name == "guided_backprop":
                g = slope(module, z) * g.clamp(min=0)
            else:
                g = slope(module, g) * g
        else:
            leaf = z.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(module(leaf), leaf, g)
    return g


@pytest.mark.parametrize("name", ["guided_backprop", "deconvolution"])
def test_relu_network_matches_captum(name):
    model = rectifier_net(nn.ReLU)
    x = torch.randn(2, 2, 4, 4, 4, dtype=torch.float64)
    seed = torch.randn(2, 2, 2, 2, 2, dtype=torch.float64)
    ours = METHODS[name]().attribute(model, x, seed).maps
    theirs = captum_map(name, model, x, seed)
    assert float(theirs.abs().max()) > 0
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10 * float(theirs.abs().max()))
    # and both are the hand-written formula
    torch.testing.assert_close(ours, handwritten_backward(name, model, x, seed), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("act", [lambda: nn.LeakyReLU(0.2), lambda: nn.PReLU(4)], ids=["leaky_relu", "prelu"])
@pytest.mark.parametrize("name", ["guided_backprop", "deconvolution"])
def test_leaky_rectifiers_follow_the_formula_where_captum_takes_the_gradient(name, act):
    model = rectifier_net(act)
    x = torch.randn(2, 2, 4, 4, 4, dtype=torch.float64)
    seed = torch.randn(2, 2, 2, 2, 2, dtype=torch.float64)
    ours = METHODS[name]().attribute(model, x, seed).maps
    expected = handwritten_backward(name, model, x, seed)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-15)
    # captum only modifies nn.ReLU: on LeakyReLU / PReLU it returns the plain gradient, which differs
    theirs = captum_map(name, model, x, seed)
    leaf = x.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad((seed * model(leaf)).sum(), leaf)
    torch.testing.assert_close(theirs, gradient, rtol=1e-10, atol=1e-14)
    assert float((ours - theirs).abs().max()) > 1e-3 * float(ours.abs().max())
