"""``explain()``: one verb from a model, an image and a target to relevance maps with their record."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator, Sequence
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import SegExplainError
from .deployment import check_walkable, deployed, statistics_record
from .explanation import Explanation
from .gradients import (
    DeepLift,
    DeepLiftShap,
    GradCAM,
    Gradient,
    GradientShap,
    GradientXInput,
    GuidedGradCAM,
    IntegratedGradients,
    Occlusion,
    SmoothGrad,
)
from .kernels import onednn_convolutions
from .lrp import LRP, Deconvolution, GuidedBackprop
from .method import AttributionMethod
from .perturbation import Rise, ScoreCAM, SequenceShapley, SupervoxelShapley
from .regional import RegionalModel
from .targets import Target, bounds_of

METHODS: dict[str, type[AttributionMethod]] = {
    cls.name: cls for cls in (LRP, IntegratedGradients, Gradient, GradientXInput, SmoothGrad, GuidedBackprop,
                              Deconvolution, Occlusion, GradCAM, DeepLift, DeepLiftShap, GradientShap, GuidedGradCAM,
                              SequenceShapley, SupervoxelShapley, Rise, ScoreCAM)
}

# A voxel whose map sums to less than this fraction of the largest map sum cannot be normalized reliably.
NEAR_ZERO_SUM = 1e-6


def make_method(method: str | AttributionMethod, **options: Any) -> AttributionMethod:
    """A method instance from its registry name and constructor options (or an instance as it is)."""
    if isinstance(method, AttributionMethod):
        if options:
            msg = f"options {sorted(options)} cannot be combined with an already built {type(method).__name__}"
            raise SegExplainError(msg)
        return method
    if method not in METHODS:
        msg = f"unknown method {method!r}; expected one of {sorted(METHODS)}"
        raise SegExplainError(msg)
    try:
        return METHODS[method](**options)
    except TypeError as error:
        msg = f"method {method!r} does not take options {sorted(options)}: {error}"
        raise SegExplainError(msg) from None


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else must name an available device.

    CUDA comes back with its index (``cuda`` is the current GPU, ``cuda:0`` as a tensor there reports it), so that a
    model already on that GPU is used as it is, not copied for every explanation.
    """
    try:
        resolved = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    except (RuntimeError, TypeError):
        msg = f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}"
        raise SegExplainError(msg) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        msg = f"device {device!r} was requested but CUDA is not available here; use 'cpu' or 'auto'"
        raise SegExplainError(msg)
    if resolved.type == "cuda" and resolved.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return resolved


def check_image(image: Any) -> torch.Tensor:
    """The image as a float tensor (C, D, H, W), or an error naming what is wrong with it."""
    tensor = torch.as_tensor(image) if not isinstance(image, torch.Tensor) else image
    if tensor.dim() != 4:
        msg = f"image must have shape (C, D, H, W) (one channel per MRI sequence), got shape {tuple(tensor.shape)}"
        raise SegExplainError(msg)
    if not tensor.is_floating_point():
        msg = f"image must be floating point (normalized intensities), got dtype {tensor.dtype}"
        raise SegExplainError(msg)
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = (~finite).flatten(1).sum(1)
        channels = [int(c) for c in torch.nonzero(bad).flatten()]
        msg = f"image has {int(bad.sum())} NaN/Inf voxels (in channels {channels}); clean or mask them first"
        raise SegExplainError(msg)
    return tensor


def _expected_in_channels(model: nn.Module) -> tuple[str, int] | None:
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            return name, (module.in_channels if hasattr(module, "in_channels") else module.in_features)
    return None


def placed(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> tuple[nn.Module, torch.dtype]:
    """The model on ``device``/``dtype``: the model itself when it is there already, else a copy moved there.

    Copying leaves the user's model, its parameters and its buffers untouched (no tensor is replaced).
    """
    tensors = list(model.parameters()) + list(model.buffers())
    float_dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    devices = {t.device for t in tensors}
    if len(devices) > 1 or len(float_dtypes) > 1:
        msg = "the model's parameters are spread over several devices or float types; place it on one first"
        raise SegExplainError(msg)
    current_dtype = float_dtypes.pop() if float_dtypes else torch.get_default_dtype()
    target_dtype = dtype or current_dtype
    if devices in (set(), {device}) and target_dtype == current_dtype:
        return model, target_dtype
    try:
        with torch.no_grad():  # a TorchScript copy made with grad enabled has parameters with a grad history
            copy = deepcopy(model)
            return copy.to(device=device, dtype=target_dtype), target_dtype
    except Exception as error:  # noqa: BLE001 - any failure to copy means the same thing to the user
        msg = f"could not copy the model to move it to {device}/{target_dtype}: {error}; place it there first"
        raise SegExplainError(msg) from None


def explain(model: nn.Module, image: Any, target: Target, method: str | AttributionMethod = "lrp", *,
            device: str | torch.device = "auto", dtype: torch.dtype | None = None, samples: int | None = None,
            sampling_seed: int = 0, voxel_batch_size: int = 8, **options: Any) -> Explanation:
    """Explain what a segmentation network looked at to segment a target region.

    Args:
        model: A ``torch.nn.Module`` returning logits (N, K, D, H, W); it is left exactly as it was (mode,
            device, dtype, parameters, hooks), also when an error is raised. A
            :class:`~SegExplainLib.models.sliding.SlidingWindow` (any :class:`~SegExplainLib.engine.regional.RegionalModel`) runs
            only the windows that reach the region's bounding box when the method is ``seed_local`` (all but
            Grad-CAM, Guided Grad-CAM and Score-CAM), with the same maps; ``extras`` records ``windows_run`` and
            ``windows_total``.
        image: Float array or tensor (C, D, H, W), one channel per MRI sequence, normalized as the model expects.
        target: What to explain: a :class:`~SegExplainLib.engine.targets.MaskTarget` (segment), ``BoxTarget``,
            ``VoxelTarget`` (click), ``PredictedRegion`` or ``ClassChannel``, with its class and aggregation.
        method: Registry name (``"lrp"``, ``"integrated_gradients"``, ``"gradient"``, ``"gradient_x_input"``,
            ``"smoothgrad"``, ``"guided_backprop"``, ``"deconvolution"``, ``"occlusion"``, ``"gradcam"``,
            ``"deeplift"``, ``"deeplift_shap"``, ``"gradient_shap"``, ``"guided_gradcam"``, ``"sequence_shapley"``,
            ``"supervoxel_shapley"``, ``"rise"``, ``"score_cam"``) or a method instance.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda:N"``.
        dtype: Computation type, e.g. ``torch.float64`` for reference-grade numbers; default: the model's.
        samples: For ``aggregation="normalized"``: estimate from this many randomly drawn region voxels instead of
            all of them, and report the standard error. ``None`` computes the exact aggregation.
        sampling_seed: Seed of that draw.
        voxel_batch_size: Output voxels explained together in one batched pass when voxels are explained one by one
            (normalized aggregation of methods that are not linear in the seed, and sampling).
        **options: Options of the method's constructor, e.g. ``composite="z_plus"`` or ``n_steps=64``.

    Returns:
        The :class:`~SegExplainLib.engine.explanation.Explanation`: maps (C, D, H, W) on the image grid and the record.

    Example:
        >>> explanation = explain(unet, mri, PredictedRegion(class_index=1), "lrp", composite="epsilon_plus")
        >>> explanation.maps.shape, explanation.relative_delta
    """
    started = time.perf_counter()
    attribution = make_method(method, **options)
    if attribution.walks_modules:
        check_walkable(model, attribution.name)
    if samples is not None and (target.aggregation != "normalized" or isinstance(samples, bool) or samples < 1):
        msg = f"samples={samples!r} needs a positive integer and aggregation='normalized'"
        raise SegExplainError(msg)
    if voxel_batch_size < 1:
        msg = f"voxel_batch_size must be >= 1, got {voxel_batch_size!r}"
        raise SegExplainError(msg)
    norm_statistics = statistics_record(model)
    # the method's own forward pass gives the logits, and the region read off them, when one pass explains the target
    one_pass = attribution if _explains_in_one_pass(attribution) else None
    with prepared_run(model, image, target, device, dtype, restrict=attribution.seed_local, one_pass=one_pass) as (
            model, x, logits, region, windows, finish):
        score = float(logits[0, target.class_index][region].sum())
        aggregate = _Aggregator(attribution, model, x, logits, target, region, voxel_batch_size)
        if target.aggregation == "sum":
            maps, expected, delta, extras, warns, error = aggregate.summed(finish)
        elif samples is not None:
            maps, expected, delta, extras, warns, error = aggregate.sampled(samples, sampling_seed)
        elif attribution.linear_in_seed:
            maps, expected, delta, extras, warns, error = aggregate.exact_normalized()
        else:
            maps, expected, delta, extras, warns, error = aggregate.voxelwise_normalized()
    if "region_delta" in extras:  # the normalized form's own sum rule counts voxels; the method's is the region's
        warns = [*warns, *attribution.sum_rule_warnings(extras["region_delta"], extras["region_expected"])]
    elif target.aggregation == "sum":
        warns = [*warns, *attribution.sum_rule_warnings(delta, expected)]
    first_layer = getattr(getattr(attribution, "composite", None), "first_layer", None)
    if first_layer is not None and first_layer.name in ("flat", "w_square") and int(image.shape[0]) > 1:
        # these rules ignore the image in the first layer, so they cannot tell the sequences apart
        warns = [*warns, f"the first-layer rule {first_layer.name!r} ignores the input values: per-sequence "
                         "shares of this map reflect the rule, not the image; use epsilon_plus or "
                         "epsilon_plus_z_box to compare sequences"]
    for warning in warns:
        warnings.warn(warning, stacklevel=2)
    return Explanation(
        maps=maps[0].detach().cpu().numpy(), method=attribution.name, options=attribution.options(),
        target=target.describe(), target_score=score, region_voxels=int(region.sum()), expected_sum=expected,
        delta=delta, seconds=time.perf_counter() - started, device=str(x.device),
        dtype=str(x.dtype).replace("torch.", ""), norm_statistics=norm_statistics, warnings=warns,
        extras={**attribution.details(), **extras, **windows},
        standard_error=None if error is None else error[0].cpu().numpy())


def explain_layers(model: nn.Module, image: Any, target: Target, layers: Sequence[str],
                   method: str | AttributionMethod = "lrp", *, device: str | torch.device = "auto",
                   dtype: torch.dtype | None = None, **options: Any) -> dict[str, np.ndarray]:
    """Layer-wise attribution: where each named layer's relevance (or Guided Backprop signal) lies.

    The per-layer figure of Chatterjee et al.: for every layer, the signal at its output summed over its channels
    and resampled (trilinear) onto the image grid, so that layers of every depth can be shown side by side as MIPs.

    Args:
        layers: Names from ``model.named_modules()`` (e.g. the encoder blocks and the bottleneck).
        method: ``"lrp"``, ``"guided_backprop"`` or ``"deconvolution"`` (or such an instance).
        Other arguments: as for :func:`explain` (the target is explained with the ``"sum"`` aggregation).

    Returns:
        Per layer name, an array (D, H, W) on the image grid.
    """
    attribution = make_method(method, **options)
    if not hasattr(attribution, "attribute_layers"):
        msg = f"layer-wise attribution needs 'lrp', 'guided_backprop' or 'deconvolution', got {attribution.name!r}"
        raise SegExplainError(msg)
    check_walkable(model, attribution.name)
    # a layer's signal is read beyond the seeded outputs, so every window of a sliding window must run
    with prepared_run(model, image, target, device, dtype, restrict=False) as (model, x, logits, region, _, _):
        seed = torch.zeros_like(logits)
        seed[0, target.class_index] = region.to(x.dtype)
        signals = attribution.attribute_layers(model, x, seed, list(layers))
    maps = {}
    for name, signal in signals.items():
        summed = signal.sum(1, keepdim=True)
        if summed.dim() == x.dim() and summed.shape[2:] != x.shape[2:]:
            mode = {3: "linear", 4: "bilinear", 5: "trilinear"}[summed.dim()]
            summed = torch.nn.functional.interpolate(summed, size=x.shape[2:], mode=mode, align_corners=False)
        maps[name] = summed[0, 0].detach().cpu().numpy()
    return maps


@contextlib.contextmanager
def prepared_run(model: nn.Module, image: Any, target: Target, device: str | torch.device,
                 dtype: torch.dtype | None, *, restrict: bool, one_pass: AttributionMethod | None = None,
                 ) -> Iterator[tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, dict, Any]]:
    """Validate, place the model, run it once: yields the placed model, the batched input, its logits, the region,
    what a :class:`~SegExplainLib.engine.regional.RegionalModel` ran (``{}`` for other models) and ``finish``.

    With ``one_pass`` (a method with ``seeded_by_output``), the ``"sum"`` aggregation and a model that is not
    regional, that method's forward pass is the one run: ``finish(seed)`` then completes its explanation; otherwise
    ``finish`` is ``None``.

    With ``restrict``, a regional model runs only what the region depends on, in this first pass when the region
    follows from the grid and in every pass inside the block; the logits are then exact inside the region only.
    """
    image_tensor = check_image(image)
    if not isinstance(target, Target):
        msg = f"target must be a SegExplainLib target (MaskTarget, BoxTarget, ...), got {type(target).__name__}"
        raise SegExplainError(msg)
    first = _expected_in_channels(model)
    if first is not None and first[1] != image_tensor.shape[0]:
        msg = (f"the model expects {first[1]} input channels (first layer '{first[0]}'), "
               f"got an image with {image_tensor.shape[0]}")
        raise SegExplainError(msg)
    run_device = resolve_device(device)
    model, run_dtype = placed(model, run_device, dtype)
    # a regional model (a sliding window) runs only the windows that reach the region, when the method allows it
    regional = isinstance(model, RegionalModel)
    with deployed(model), contextlib.ExitStack() as stack:
        x = image_tensor.to(device=run_device, dtype=run_dtype)[None]
        known = target.grid_region(tuple(x.shape[2:])) if regional and restrict else None
        finish = None
        with torch.no_grad(), onednn_convolutions():
            try:
                if one_pass is not None and target.aggregation == "sum" and not regional:
                    with torch.enable_grad():
                        logits, finish = stack.enter_context(one_pass.seeded_by_output(model, x))
                elif not regional:
                    logits = model(x)
                elif known is not None:
                    with model.restricted_to(bounds_of(known)):
                        logits = model(x)
                else:  # the region is read from the prediction: the whole volume, stored for the next explanation
                    logits = model.whole_volume(x)
            except (RuntimeError, ValueError) as error:  # torch reports shapes a layer cannot take as either
                first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
                msg = f"the model failed on an image of shape {tuple(image_tensor.shape)}: {first_line}"
                raise SegExplainError(msg) from None
        if not isinstance(logits, torch.Tensor) or logits.dim() != x.dim() or logits.shape[0] != 1:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            msg = f"the model must return logits (N, K, D, H, W) for input {tuple(x.shape)}, got {shape}"
            raise SegExplainError(msg)
        region = target.region(logits[0])
        restriction = (model.restricted_to(bounds_of(region) if restrict else None) if regional
                       else contextlib.nullcontext({}))
        with restriction as windows:
            yield model, x, logits, torch.as_tensor(region, device=run_device), windows, finish


def _explains_in_one_pass(method: AttributionMethod) -> bool:
    """Whether ``method.seeded_by_output`` explains what ``method.attribute`` does: both come from the same class.

    A subclass that changes ``attribute`` alone (to post-process its maps, say) would otherwise be bypassed.
    """
    def owner(name: str) -> type | None:
        return next((cls for cls in type(method).__mro__ if name in vars(cls)), None)

    return owner("seeded_by_output") is not None and owner("seeded_by_output") is owner("attribute")


def _as_float(value: torch.Tensor | None) -> float | None:
    return None if value is None else float(value.detach().sum())


class _Aggregator:
    """The four ways of turning a target into maps; each returns (maps, expected, delta, extras, warnings, error)."""

    def __init__(self, method: AttributionMethod, model: nn.Module, x: torch.Tensor, logits: torch.Tensor,
                 target: Target, region: torch.Tensor, voxel_batch_size: int) -> None:
        self.method, self.model, self.x, self.logits = method, model, x, logits
        self.target, self.region, self.batch = target, region, voxel_batch_size

    def _seed(self, weights: torch.Tensor) -> torch.Tensor:
        seed = torch.zeros_like(self.logits)
        seed[0, self.target.class_index] = weights
        return seed

    def summed(self, finish=None):
        seed = self._seed(self.region.to(self.x.dtype))
        out = self.method.attribute(self.model, self.x, seed) if finish is None else finish(seed)
        return out.maps, _as_float(out.expected), _as_float(out.delta), out.extras, [], None

    def _for_region(self) -> AttributionMethod:
        """The method with its data-dependent choices made once for the whole region (shared by every pass)."""
        return self.method.for_target(self.model, self.x, self._seed(self.region.to(self.x.dtype)))

    def exact_normalized(self):
        """M_A = L(mask / s) with s = L^T 1 read off one differentiable pass: a constant number of passes."""
        method = self._for_region()
        seed = self._seed(self.region.to(self.x.dtype)).requires_grad_(True)
        summed = method.attribute(self.model, self.x, seed)
        (sums,) = torch.autograd.grad(summed.maps.sum(), seed)
        sums = sums[0, self.target.class_index].detach()
        weights, warns, excluded = self._inverse_sums(sums)
        out = method.attribute(self.model, self.x, self._seed(weights))
        valid = int(self.region.sum()) - excluded
        # the sum-form pass carries the method's own sum rule (conservation/completeness) for the whole region
        extras = {**summed.extras, "excluded_voxels": excluded, "region_delta": _as_float(summed.delta),
                  "region_expected": _as_float(summed.expected), "passes": 2}
        return out.maps, float(valid), float(out.maps.sum()) - valid, extras, warns, None

    def _inverse_sums(self, sums: torch.Tensor) -> tuple[torch.Tensor, list[str], int]:
        in_region = sums[self.region]
        tolerance = NEAR_ZERO_SUM * float(in_region.abs().max()) if in_region.numel() else 0.0
        valid = self.region & (sums.abs() > tolerance)
        excluded = int(self.region.sum() - valid.sum())
        warns = []
        if excluded:
            warns.append(f"{excluded} of {int(self.region.sum())} target voxels have a map summing to about zero "
                         "and were left out of the normalized aggregation")
        if not bool(valid.any()):
            raise SegExplainError("no target voxel has a map with a non-zero sum; use aggregation='sum'")
        weights = torch.where(valid, 1.0 / torch.where(valid, sums, torch.ones_like(sums)), torch.zeros_like(sums))
        return weights, warns, excluded

    def _voxel_maps(self, method: AttributionMethod,
                    voxels: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Maps and their sums for region voxels (flat indices), ``batch`` voxels per forward/backward pass."""
        for start in range(0, len(voxels), self.batch):
            chunk = voxels[start:start + self.batch]
            seed = torch.zeros((len(chunk), *self.logits.shape[1:]), dtype=self.x.dtype, device=self.x.device)
            seed[:, self.target.class_index].view(len(chunk), -1)[torch.arange(len(chunk)), chunk] = 1.0
            maps = method.attribute(self.model, self.x.expand(len(chunk), *self.x.shape[1:]), seed).maps
            yield maps, maps.flatten(1).sum(1)

    def voxelwise_normalized(self):
        """Exact for any method: every region voxel explained separately, batched along the batch axis."""
        voxels = torch.nonzero(self.region.flatten()).flatten()
        chunks = list(self._voxel_maps(self.method, voxels))
        sums = torch.cat([chunk_sums for _, chunk_sums in chunks])
        tolerance = NEAR_ZERO_SUM * float(sums.abs().max())
        total, excluded = torch.zeros_like(self.x), 0
        for maps, chunk_sums in chunks:
            valid = chunk_sums.abs() > tolerance
            excluded += int((~valid).sum())
            weights = torch.where(valid, 1.0 / torch.where(valid, chunk_sums, 1.0), 0.0)
            total = total + (maps * weights.reshape(-1, *[1] * (maps.dim() - 1))).sum(0, keepdim=True)
        warns = [] if not excluded else [
            f"{excluded} of {len(voxels)} target voxels have a map summing to about zero and were left out"]
        valid_count = len(voxels) - excluded
        extras = {"excluded_voxels": excluded, "passes": -(-len(voxels) // self.batch)}
        return total, float(valid_count), float(total.sum()) - valid_count, extras, warns, None

    def sampled(self, samples: int, sampling_seed: int):
        """Unbiased estimate from ``samples`` voxels drawn without replacement, with its standard error."""
        voxels = torch.nonzero(self.region.flatten()).flatten()
        population = len(voxels)
        draw = min(samples, population)
        generator = torch.Generator().manual_seed(sampling_seed)
        chosen = voxels[torch.randperm(population, generator=generator)[:draw].to(voxels.device)]
        mean = torch.zeros_like(self.x[0])
        square = torch.zeros_like(self.x[0])
        excluded = 0
        for maps, sums in self._voxel_maps(self._for_region(), chosen):
            valid = sums.abs() > NEAR_ZERO_SUM * float(sums.abs().max())
            excluded += int((~valid).sum())
            normalized = maps[valid] / sums[valid].reshape(-1, *[1] * (maps.dim() - 1))
            mean = mean + normalized.sum(0)
            square = square + (normalized ** 2).sum(0)
        used = draw - excluded
        if used < 1:
            raise SegExplainError("no sampled voxel has a map with a non-zero sum; use aggregation='sum'")
        mean, square = mean / used, square / used
        variance = (square - mean ** 2).clamp(min=0) * used / max(used - 1, 1)
        correction = 1.0 - draw / population  # finite population: sampling everything leaves no error
        estimate = population * mean
        error = population * torch.sqrt(variance / used * correction)
        norm = float(estimate.norm())
        extras = {"samples": draw, "population": population, "excluded_voxels": excluded, "sampling_seed":
                  sampling_seed, "relative_standard_error": float(error.norm()) / norm if norm else None}
        warns = [] if not excluded else [f"{excluded} of {draw} sampled voxels have a map summing to about zero"]
        return estimate[None], float(population), float(estimate.sum()) - population, extras, warns, error[None]
