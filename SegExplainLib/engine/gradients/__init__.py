"""Gradient-family attribution methods: saliency, Gradient x Input, Integrated Gradients, SmoothGrad, Occlusion,
Grad-CAM, DeepLIFT, DeepLIFT-SHAP, GradientSHAP and Guided Grad-CAM.

Every method explains, for each batch element ``b``, the scalar score ``sum(seed[b] * model(inputs)[b])`` (see
:mod:`SegExplainLib.engine.method`). Gradients are taken w.r.t. the input only (``torch.autograd.grad(score, inputs)``);
parameter gradients are never computed. When ``seed.requires_grad`` is true, the backward passes are built with
``create_graph=True`` so that the returned maps can be differentiated w.r.t. the seed (used by the exact normalized
aggregation); otherwise the maps are detached.

The multi-pass methods (:class:`IntegratedGradients`, :class:`SmoothGrad`, :class:`Occlusion`, :class:`DeepLiftShap`,
:class:`GradientShap`) stack their perturbed
inputs along the batch dimension, ``internal_batch_size`` at a time (chosen from a memory budget when ``None``, see
:mod:`SegExplainLib.engine.batching`); batch elements of ``inputs`` are flattened into the same stream, so ``B > 1`` is
supported at no extra cost.
"""

from .deeplift import DeepLift, DeepLiftShap
from .gradcam import GradCAM
from .gradient_shap import GradientShap
from .guided_gradcam import GuidedGradCAM
from .integrated_gradients import IntegratedGradients
from .occlusion import Occlusion
from .saliency import Gradient, GradientXInput, SmoothGrad

__all__ = [
    "Gradient",
    "GradientXInput",
    "IntegratedGradients",
    "SmoothGrad",
    "Occlusion",
    "GradCAM",
    "DeepLift",
    "DeepLiftShap",
    "GradientShap",
    "GuidedGradCAM",
]
