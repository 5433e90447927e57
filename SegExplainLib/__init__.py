"""SegExplainLib: what a 3D medical segmentation network looked at.

Layer-wise Relevance Propagation (LRP), Integrated Gradients and the gradient family, explained for a region of the
output (a segment, a box, a clicked voxel, the predicted region of a class), on the image grid, with the record of
how each map was made. Plain Python (torch, numpy): no Slicer, Qt or VTK import.

Example:
    >>> import SegExplainLib as sx
    >>> unet = sx.reference_unet()                       # 6 MRI sequences in, background/lesion out
    >>> result = sx.explain(unet, image, sx.PredictedRegion(class_index=1), "lrp", composite="epsilon_plus")
    >>> result.maps.shape                                # (6, D, H, W): one relevance map per sequence
    >>> sx.relevance_shares(result.maps)                 # per-sequence share of the positive relevance
"""

from .engine.api import METHODS, explain, make_method
from .engine.baselines import (
                        Baseline,
                        BlurredBaseline,
                        ChannelMinimumBaseline,
                        ConstantBaseline,
                        ZeroBaseline,
                        make_baseline,
)
from .engine.canonizers import Canonizer, MergeBatchNorm
from .engine.composites import Composite, composite_names, get_composite, lrp_defaults, register_composite
from .engine.evaluation import Scorecard, evaluate
from .engine.explanation import Explanation
from .engine.filters import AmplitudeFilter, clamp_filter, pass_filter
from .engine.gradients import GradCAM, Gradient, GradientXInput, IntegratedGradients, Occlusion, SmoothGrad
from .engine.lrp import LRP, Deconvolution, GuidedBackprop
from .engine.method import AttributionMethod, AttributionOutput
from .engine.metrics import (
                        PerturbationCurve,
                        alpha_sweep,
                        binarize,
                        ground_truth_inclusivity,
                        inclusivity,
                        input_inclusivity,
                        perturbation_curve,
                        relevance_mass_in_region,
                        relevance_shares,
)
from .engine.rules import RULES, AlphaBeta, Epsilon, Flat, Gamma, Pass, Rule, WSquare, ZBox, Zero, ZPlus, make_rule
from .engine.segments import SegmentMatrix, segment_matrix
from .engine.targets import BoxTarget, ClassChannel, MaskTarget, PredictedRegion, Target, VoxelTarget
from .errors import SegExplainError, UnsupportedLayerError
from .models.networks import UNet3D, reference_unet, tiny_unet
from .version import __version__ as __version__

__all__ = [
    "AlphaBeta", "AmplitudeFilter", "AttributionMethod", "AttributionOutput", "Baseline", "BlurredBaseline",
    "BoxTarget", "Canonizer", "ChannelMinimumBaseline", "ClassChannel", "Composite", "ConstantBaseline",
    "Deconvolution", "Epsilon", "Explanation", "Flat", "Gamma", "GradCAM", "Gradient", "GradientXInput",
    "GuidedBackprop", "IntegratedGradients", "LRP", "METHODS", "MaskTarget", "MergeBatchNorm", "Occlusion", "Pass",
    "PerturbationCurve", "PredictedRegion", "RULES", "Rule", "Scorecard", "SegExplainError", "SegmentMatrix",
    "SmoothGrad", "Target", "UNet3D",
    "UnsupportedLayerError", "VoxelTarget", "WSquare", "ZBox", "ZPlus", "Zero", "ZeroBaseline", "alpha_sweep",
    "binarize", "clamp_filter", "composite_names", "evaluate", "explain", "get_composite", "ground_truth_inclusivity",
    "inclusivity", "input_inclusivity", "lrp_defaults", "make_baseline", "make_method", "make_rule", "pass_filter",
    "perturbation_curve", "reference_unet", "register_composite", "relevance_mass_in_region", "relevance_shares",
    "segment_matrix", "tiny_unet",
]
