"""The oneDNN routing of the model's own convolutions: same numbers as torch's kernels, used by every method."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from SegExplainLib.engine import kernels
from SegExplainLib.engine.api import METHODS, explain
from SegExplainLib.engine.kernels import onednn_convolutions
from SegExplainLib.engine.rules import affine
from SegExplainLib.engine.targets import BoxTarget

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.fixture
def onednn_calls(monkeypatch):
    calls = []
    original = torch.mkldnn_convolution

    def counting(*args):
        calls.append(tuple(args[0].shape))
        return original(*args)

    monkeypatch.setattr(torch, "mkldnn_convolution", counting)
    return calls


CONVOLUTIONS = {
    "3d": (F.conv3d, (1, 3, 5, 6, 7), (4, 3, 3, 3, 3), {"padding": 1}),
    "3d_strided_dilated": (F.conv3d, (2, 3, 9, 8, 7), (4, 3, 3, 3, 3), {"stride": 2, "dilation": (1, 2, 1)}),
    "3d_groups_positional": (F.conv3d, (1, 4, 5, 5, 5), (6, 2, 1, 3, 3), (None, 1, (0, 1, 1), 1, 2)),
    "2d": (F.conv2d, (1, 3, 8, 9), (5, 3, 3, 3), {"padding": (1, 0)}),
}


@pytest.mark.parametrize("name", sorted(CONVOLUTIONS))
def test_routed_convolution_matches_torch_with_its_gradients(name, onednn_calls):
    conv, x_shape, w_shape, options = CONVOLUTIONS[name]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=generator, requires_grad=True)
    w = torch.randn(w_shape, generator=generator, requires_grad=True)
    args, kwargs = ((x, w, *options), {}) if isinstance(options, tuple) else ((x, w), options)
    expected = conv(*args, **kwargs)
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, w))
    assert onednn_calls == []
    with onednn_convolutions():
        routed = conv(*args, **kwargs)
    assert len(onednn_calls) == 1
    grads = torch.autograd.grad(routed.square().sum(), (x, w))
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-5)
    for grad, reference in zip(grads, expected_grads):
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-4)


def test_other_cases_stay_with_torch(onednn_calls):
    x = torch.randn(1, 2, 4, 4, 4)
    w = torch.randn(3, 2, 3, 3, 3)
    with onednn_convolutions():
        F.conv3d(x.double(), w.double())  # float64
        F.conv3d(x, w, padding="same")  # string padding
        F.conv1d(x[:, :, 0, 0], w[:, :, 0, 0])  # 1D
        with onednn_convolutions():  # nested: still one routing, not two
            F.conv3d(x, w)
    assert len(onednn_calls) == 1


def test_routing_ends_with_its_block_also_after_an_error(onednn_calls):
    x, w = torch.randn(1, 2, 4, 4, 4), torch.randn(3, 2, 3, 3, 3)
    with pytest.raises(RuntimeError, match="inside"), onednn_convolutions():
        raise RuntimeError("inside")
    F.conv3d(x, w)
    assert onednn_calls == []


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv3d(4, 2, 1)).eval()


OPTIONS = {"gradcam": {"layer": "2"}, "integrated_gradients": {"n_steps": 4, "quadrature": "gausslegendre"},
           "smoothgrad": {"n_samples": 2}, "occlusion": {"window": 4}, "guided_gradcam": {"layer": "2"},
           "deeplift_shap": {"n_baselines": 2}, "gradient_shap": {"n_samples": 2, "n_baselines": 2},
           "score_cam": {"layer": "2"}, "supervoxel_shapley": {"block_size": 4, "n_permutations": 4},
           "rise": {"n_masks": 4}}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_its_float32_convolutions_on_onednn(method, onednn_calls, monkeypatch):
    image = np.random.default_rng(0).normal(size=(2, 6, 8, 8)).astype(np.float32)
    target = BoxTarget((1, 2, 2), (4, 6, 6), class_index=1)
    routed = explain(small_net(), image, target, method, device="cpu", **OPTIONS.get(method, {}))
    assert onednn_calls, f"{method} ran no convolution on oneDNN"
    for module in (kernels, affine):  # the same explanation on torch's own kernels
        monkeypatch.setattr(module, "onednn_eligible", lambda x, weight: False)
    count = len(onednn_calls)
    stock = explain(small_net(), image, target, method, device="cpu", **OPTIONS.get(method, {}))
    assert len(onednn_calls) == count
    scale = np.abs(stock.maps).max()
    np.testing.assert_allclose(routed.maps, stock.maps, rtol=0, atol=1e-4 * scale)
