"""The explained function is the one the user deploys: norm statistics as the user runs them, dropout off, the model
untouched afterwards (buffers bit for bit); TorchScript models get the methods that need no modules."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import SegExplainLib as sx
from SegExplainLib.engine.method import rule_free_methods
from SegExplainLib.errors import SegExplainError
from SegExplainLib.models.realnets import nnunet_like


def _user_forward(model: nn.Module, image: np.ndarray) -> torch.Tensor:
    """The user's own forward pass of one image, on a copy (train-mode norms would move their statistics), with
    dropout off: the deployed function."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.eval()
    with torch.no_grad():
        return copied(torch.as_tensor(image)[None])


def _bn_unet(mode: str) -> nn.Module:
    torch.manual_seed(0)
    model = sx.tiny_unet(in_channels=4, norm="batch")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.running_mean.normal_(0.0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    if mode == "eval":
        model.eval()
    elif mode == "untracked":  # eval, but without running statistics: BatchNorm normalizes with the batch's
        model = sx.tiny_unet(in_channels=4, norm="batch")
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.track_running_stats = False
                module.running_mean = module.running_var = module.num_batches_tracked = None
        model.eval()
    return model


DEPLOYMENTS = {
    # name: (model factory, statistics the record reports)
    "instance_norm_train": (lambda: nnunet_like(norm_mode="train"), {"InstanceNorm3d": "instance"}),
    "instance_norm_eval": (lambda: nnunet_like(norm_mode="eval"), {"InstanceNorm3d": "running"}),
    "batch_norm_train": (lambda: _bn_unet("train"), {"BatchNorm3d": "instance"}),
    "batch_norm_eval": (lambda: _bn_unet("eval"), {"BatchNorm3d": "running"}),
    "batch_norm_untracked": (lambda: _bn_unet("untracked"), {"BatchNorm3d": "instance"}),
}
BOX = sx.BoxTarget((1, 2, 1), (7, 6, 8), class_index=1)
METHODS = {"lrp": {"composite": "epsilon_plus"}, "gradient": {}, "integrated_gradients": {"n_steps": 4},
           "guided_backprop": {}}


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(4, 8, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_the_target_score_is_the_users_own_forward_and_the_model_comes_back_bit_for_bit(name, method, image):
    make, statistics = DEPLOYMENTS[name]
    model = make()
    buffers = {key: value.clone() for key, value in model.state_dict().items()}
    modes = {key: module.training for key, module in model.named_modules()}
    logits = _user_forward(model, image)
    result = sx.explain(model, image, BOX, method, device="cpu", **METHODS[method])
    assert result.target_score == pytest.approx(float(logits[0, 1, 1:7, 2:6, 1:8].sum()), rel=1e-5, abs=1e-4)
    assert result.norm_statistics == statistics
    if method == "lrp":  # the rules ran the same function: conservation is of the user's score
        assert result.expected_sum == pytest.approx(result.target_score, rel=1e-5, abs=1e-4)
    for key, value in model.state_dict().items():
        assert torch.equal(value, buffers[key]), key  # running statistics, counters and weights bit for bit
    assert {key: module.training for key, module in model.named_modules()} == modes


def test_integrated_gradients_end_scores_use_each_samples_own_statistics_in_batched_passes(image):
    """With BatchNorm in train mode, a batch of IG steps must not share batch statistics."""
    model = _bn_unet("train")
    # not a constant baseline: after a convolution it has no variance, and norms then amplify rounding noise
    baseline = sx.BlurredBaseline(1.0)(torch.as_tensor(image)[None])[0].numpy()
    logits, base = _user_forward(model, image), _user_forward(model, baseline)
    result = sx.explain(model, image, BOX, "integrated_gradients", device="cpu", n_steps=4, baseline="blur:1",
                        internal_batch_size=4)
    expected = float(logits[0, 1, 1:7, 2:6, 1:8].sum() - base[0, 1, 1:7, 2:6, 1:8].sum())
    assert result.expected_sum == pytest.approx(expected, rel=1e-5)


def test_a_train_mode_batch_norm_is_explained_as_an_instance_norm_with_its_parameters(image):
    """The per-sample statistics of a train-mode BatchNorm reach the rules too: LRP equals that of the same network
    with InstanceNorm layers carrying the BatchNorm's affine parameters."""
    model = _bn_unet("train")
    twin = copy.deepcopy(model).eval()
    for parent in twin.modules():
        for key, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm3d):
                norm = nn.InstanceNorm3d(child.num_features, eps=child.eps, affine=True)
                norm.load_state_dict({"weight": child.weight, "bias": child.bias})
                setattr(parent, key, norm)
    target = sx.ClassChannel(class_index=1)
    for composite in ("epsilon", "epsilon_plus"):
        ours = sx.explain(model, image, target, "lrp", composite=composite, device="cpu", dtype=torch.float64)
        reference = sx.explain(twin, image, target, "lrp", composite=composite, device="cpu", dtype=torch.float64)
        np.testing.assert_allclose(ours.maps, reference.maps, rtol=1e-9, atol=1e-12)


def test_dropout_left_in_train_mode_is_off(image):
    model = nnunet_like(norm_mode="eval")
    for module in model.modules():
        if isinstance(module, nn.Dropout3d):
            module.train()
    runs = [sx.explain(model, image, sx.ClassChannel(class_index=1), "gradient", device="cpu").maps for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert all(m.training for m in model.modules() if isinstance(m, nn.Dropout3d))


# ---------------------------------------------------------------------------------------------------------------
# TorchScript


def _scripted(kind: str, model: nn.Module, image: np.ndarray) -> torch.jit.ScriptModule:
    return torch.jit.script(model) if kind == "script" else torch.jit.trace(model, torch.as_tensor(image)[None])


@pytest.mark.parametrize("kind", ["script", "trace"])
@pytest.mark.parametrize("method, options", [("gradient", {}), ("gradient_x_input", {}),
                                             ("integrated_gradients", {"n_steps": 4}),
                                             ("smoothgrad", {"n_samples": 2}), ("occlusion", {"window": 4})])
def test_torchscript_models_get_the_methods_that_need_no_modules(kind, method, options, image):
    model = nnunet_like(norm_mode="eval")
    scripted = _scripted(kind, model, image)
    target = sx.BoxTarget((2, 2, 2), (6, 6, 6), class_index=1)
    ours = sx.explain(scripted, image, target, method, device="cpu", dtype=torch.float64, **options)
    python = sx.explain(model, image, target, method, device="cpu", dtype=torch.float64, **options)
    np.testing.assert_allclose(ours.maps, python.maps, rtol=1e-9, atol=1e-12 * np.abs(python.maps).max())


@pytest.mark.parametrize("method, options", [("lrp", {}), ("guided_backprop", {}), ("deconvolution", {}),
                                             ("gradcam", {"layer": "seg_layer"})])
def test_torchscript_models_refuse_the_methods_that_walk_modules_saying_what_they_need(method, options, image):
    scripted = torch.jit.script(nnunet_like(norm_mode="eval"))
    with pytest.raises(SegExplainError, match=rf"method '{method}' attaches rules to the network's Python modules.*"
                                              r"TorchScript.*integrated_gradients"):
        sx.explain(scripted, image, sx.ClassChannel(class_index=1), method, device="cpu", **options)
    with pytest.raises(SegExplainError, match="TorchScript"):
        sx.make_method(method, **options).attribute(scripted, torch.as_tensor(image)[None],
                                                     torch.ones(1, 3, 8, 8, 8))


def test_a_scripted_batch_norm_in_train_mode_is_an_error(image):
    scripted = torch.jit.script(nn.Sequential(nn.Conv3d(4, 2, 3, padding=1), nn.BatchNorm3d(2)))
    with pytest.raises(SegExplainError, match=r"TorchScript model has a BatchNorm3d in train mode.*\.eval\(\)"):
        sx.explain(scripted, image, sx.ClassChannel(class_index=1), "gradient", device="cpu")


def test_torchscript_advice_names_the_rule_free_methods_as_lrps_refusals_do(image):
    scripted = torch.jit.script(nnunet_like(norm_mode="eval"))
    with pytest.raises(SegExplainError) as refusal:
        sx.explain(scripted, image, sx.ClassChannel(class_index=1), "lrp", device="cpu")
    assert f"use {rule_free_methods()}, or load" in str(refusal.value)
