"""LRP on the MONAI networks users actually have: UNet, BasicUNet and DynUNet, through ``explain()``.

Every model is tiny (channels 4-16) on a (1, 2, 16, 16, 16) float64 input, with norm layers as after training
(random gains, shifts and running statistics; bias-free variants keep zero shifts and zero running means). The
target is the mask of voxels whose class-1 logit is positive, so the explained score is a sum of positive logits and
|delta| / |expected| is not inflated by cancellation in the output. Each run must give finite maps of the image's
shape, leave outputs and state_dict bit-identical, and stay below the conservation bound of its row.

Measured relative deltas |sum(maps) - score| / |score| (torch 2.13 CPU, monai 1.6.1, seed 0; printed by the tests,
run ``pytest -s`` to see them again):

=============================  ===========  ===================  ==========
model                          epsilon      epsilon_plus_flat    z_plus
=============================  ===========  ===================  ==========
unet_r1_instance               3.2e-01      3.3e-03              3.3e-03
unet_r1_batch                  1.3e+00      3.1e-05              3.1e-05
unet_r2_instance               1.5e-01      4.3e-04              4.3e-04
unet_r2_batch                  3.1e+00      1.3e-03              1.3e-03
unet_r1_instance_bias_free     1.4e-01      3.2e-03              3.2e-03
unet_r1_batch_bias_free        1.7e-05      2.2e-03              2.2e-03
unet_r2_instance_bias_free     1.4e-01      9.3e-04              9.3e-04
unet_r2_batch_bias_free        1.9e-05      1.5e-05              1.6e-05
basic_unet_batch               1.6e-01      1.4e-02              1.4e-02
dynunet                        7.6e-02      3.1e-03              3.1e-03
dynunet_deep_supervision       1.2e+00      3.1e-03              3.1e-03
dynunet_res_block              1.8e+00      5.3e-03              2.3e-02
=============================  ===========  ===================  ==========

``dynunet_res_block`` adds its residual in place (``out += residual``) to the output of a rule; the engine runs
in-place updates of rule outputs out of place during the forward pass, so it works like the others.

Bounds and why:

* z_plus and epsilon_plus_flat: 5e-2 (twice the largest measured value). Both conserve layer by layer (z+
  ignores biases, "pass" on norms and the identity on rectifiers, flat conserves) except for outputs whose z+
  denominator is zero, i.e. with no positive contribution at all: their relevance is dropped. That is frequent only
  in the 1x1 output convolution with 4 signed input channels (about one output voxel in 16); how much of the score
  it costs depends on the head's weights (a few per mille to a few per cent here).
* epsilon, bias-free with centred BatchNorm: 1e-4 (only outputs with |z| ~ epsilon = 1e-6 lose relevance).
* epsilon otherwise: 10. Biases, BatchNorm shifts and InstanceNorm's mean subtraction (a bias in the LRP sense, so
  even the bias-free InstanceNorm UNet absorbs relevance) take a share of the score by design; the bound catches an
  unstable rule (before norm layers got the epsilon rule in this composite, deltas reached 1e10).

There is no bias-free BasicUNet: with ``bias=False`` MONAI still gives its transposed convolutions and its output
convolution biases (measured there: epsilon 1.0, z_plus 1.6e-1, most of it lost in the 1x1 output convolution).
BasicUNet runs with BatchNorm: with its default InstanceNorm and four poolings the 16^3 input leaves one voxel at the
bottom, where MONAI's own forward pass fails ("Expected more than 1 spatial element when training").
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SegExplainLib.engine.api import explain
from SegExplainLib.engine.targets import MaskTarget

monai_nets = pytest.importorskip("monai.networks.nets")


UNET = {"spatial_dims": 3, "in_channels": 2, "out_channels": 2, "channels": (4, 8, 16), "strides": (2, 2)}
DYNUNET = {"spatial_dims": 3, "in_channels": 2, "out_channels": 2, "kernel_size": [3, 3, 3], "strides": [1, 2, 2],
           "upsample_kernel_size": [2, 2], "filters": [4, 8, 16], "norm_name": "instance"}

MODELS = {
    "unet_r1_instance": lambda: monai_nets.UNet(**UNET, num_res_units=1, norm="INSTANCE"),
    "unet_r1_batch": lambda: monai_nets.UNet(**UNET, num_res_units=1, norm="BATCH"),
    "unet_r2_instance": lambda: monai_nets.UNet(**UNET, num_res_units=2, norm="INSTANCE"),
    "unet_r2_batch": lambda: monai_nets.UNet(**UNET, num_res_units=2, norm="BATCH"),
    "unet_r1_instance_bias_free": lambda: monai_nets.UNet(**UNET, num_res_units=1, norm="INSTANCE", bias=False),
    "unet_r1_batch_bias_free": lambda: monai_nets.UNet(**UNET, num_res_units=1, norm="BATCH", bias=False),
    "unet_r2_instance_bias_free": lambda: monai_nets.UNet(**UNET, num_res_units=2, norm="INSTANCE", bias=False),
    "unet_r2_batch_bias_free": lambda: monai_nets.UNet(**UNET, num_res_units=2, norm="BATCH", bias=False),
    "basic_unet_batch": lambda: monai_nets.BasicUNet(3, 2, 2, features=(4, 4, 8, 8, 16, 4), norm="batch"),
    "dynunet": lambda: monai_nets.DynUNet(**DYNUNET, res_block=False),
    "dynunet_deep_supervision": lambda: monai_nets.DynUNet(**DYNUNET, deep_supervision=True),
    "dynunet_res_block": lambda: monai_nets.DynUNet(**DYNUNET, res_block=True),
}
COMPOSITES = ("epsilon", "epsilon_plus_flat", "z_plus")

# relative-delta bound per (model, composite), see the module docstring
BOUNDS = {(model, composite): 5e-2 for model in MODELS for composite in ("epsilon_plus_flat", "z_plus")}
BOUNDS.update({(model, "epsilon"): 10.0 for model in MODELS})
BOUNDS.update({("unet_r1_batch_bias_free", "epsilon"): 1e-4, ("unet_r2_batch_bias_free", "epsilon"): 1e-4})


def prepare(name: str) -> torch.nn.Module:
    """The model in float64 and eval mode, norm layers as after training (centred for bias-free variants)."""
    model = MODELS[name]().double().eval()
    centred = name.endswith("bias_free")
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "weight", None) is not None and isinstance(
                    module, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.0 if centred else 0.2)
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.normal_(0.0, 0.0 if centred else 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


CASES = [pytest.param(name, composite, id=f"{name}-{composite}")
         for name in MODELS for composite in COMPOSITES]


@pytest.mark.parametrize("name, composite", CASES)
def test_lrp_runs_conserves_and_leaves_the_model_unchanged(name, composite):
    model = prepare(name)
    image = torch.randn(2, 16, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        logits = model(image[None])
    assert isinstance(logits, torch.Tensor) and logits.shape == (1, 2, 16, 16, 16)
    before = state(model)
    mask = (logits[0, 1] > 0).numpy()
    assert mask.any()

    result = explain(model, image, MaskTarget(mask, class_index=1), "lrp", composite=composite, device="cpu")

    assert result.maps.shape == (2, 16, 16, 16) and np.isfinite(result.maps).all()
    assert abs(result.expected_sum - float(logits[0, 1][torch.from_numpy(mask)].sum())) <= 1e-9 * abs(
        result.expected_sum)
    with torch.no_grad():
        assert torch.equal(model(image[None]), logits)
    after = state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not model.training
    print(f"\n{name:28s} {composite:18s} relative delta {result.relative_delta:.1e}")
    assert result.relative_delta < BOUNDS[(name, composite)]


def test_dynunet_deep_supervision_returns_one_tensor_in_eval_mode():
    """In training mode it stacks the deep-supervision heads; explain() puts it in eval mode and gets the logits."""
    model = prepare("dynunet_deep_supervision")
    x = torch.randn(1, 2, 16, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert model(x).shape == (1, 2, 16, 16, 16)
        model.train()
        assert model(x).shape == (1, 2, 2, 16, 16, 16)  # (N, 1 + deep_supr_num, K, ...): not explainable as is
    model.eval()
