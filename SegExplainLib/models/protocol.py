"""The Pipeline protocol: a model with its own preprocessing, from the original images to the network and back.

A model card's network sees the case on the image grid (:mod:`~SegExplainLib.models.network_pipeline`). The
networks of nnU-Net results folders and MONAI bundles see a preprocessed case: cropped, reoriented, resampled to
another spacing, normalized. A :class:`Pipeline` turns a case into a :class:`PreparedCase`: the explained function
(sliding window, mirroring and fold ensemble inside it), its input, and the two ways between the grids. A region
drawn on the original images goes to the network's grid; relevance maps come back onto the original grid.

Relevance maps come back as **sums**. Relevance is an amount: the total of the map is what the method's sum rule
says (the explained score for LRP, the score difference for IG). The way back keeps that total exactly. A
network-grid voxel's relevance is shared among the original voxels its input value was interpolated from, in
proportion to their interpolation weights: this is the transpose of linear interpolation. Cropped-away voxels get
zero. Reorienting (permutations and flips) moves values without changing them. The sum over any region is then the
relevance of that region. It is not a density: a voxel twice as large holds twice the relevance.

This module knows no kind of model; :mod:`~SegExplainLib.models.pipelines` opens them by name.

Example:
    >>> pipeline = open_pipeline("nnunet", "Dataset001_Prostate/nnUNetTrainer__nnUNetPlans__3d_fullres")
    >>> image, geometry = read_sequences(["t2.nii.gz", "adc.nii.gz"])
    >>> result = explain_case(pipeline, image, geometry, VoxelTarget((12, 80, 75), class_index=1), "lrp")
    >>> result.maps.shape == image.shape        # on the original grid
    True
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..engine.api import explain
from ..engine.segments import SegmentMatrix, segment_matrix
from ..engine.targets import ClassChannel, MaskTarget, PredictedRegion, Target
from ..errors import SegExplainError

__all__ = ["Pipeline", "PreparedCase", "explain_case", "network_target", "region_to_grid", "relevance_from_grid",
           "segment_matrix_case"]


@dataclass
class PreparedCase:
    """One case as the network sees it, and the ways between its grid and the original image grid.

    Attributes:
        model: The explained function: input (1, C, d, h, w) on the network grid to logits (1, K, d, h, w) on the
            same grid. Sliding window, mirroring and fold averaging run inside it.
        input: The preprocessed case (C, d, h, w), float32.
        region_to_network: A boolean region (D, H, W) on the original grid to one (d, h, w) on the network grid.
        maps_to_original: Maps (C, d, h, w) on the network grid to (C, D, H, W) on the original grid, as sums.
        record: What was done (crop box, spacings, transposition, resampling, normalization, windows), JSON-friendly.
        on_image_grid: The network sees the case on the original grid (a model card's network): nothing is mapped,
            and :func:`explain_case` gives the record :func:`~SegExplainLib.engine.api.explain` gives.
    """

    model: nn.Module
    input: np.ndarray
    region_to_network: Callable[[np.ndarray], np.ndarray]
    maps_to_original: Callable[[np.ndarray], np.ndarray]
    record: dict[str, Any] = field(default_factory=dict)
    on_image_grid: bool = False


class Pipeline(abc.ABC):
    """A trained model with its preprocessing.

    Attributes:
        kind: Registry name, e.g. ``"nnunet"``.
        sequences: Names of the input channels (MRI sequences), in order, e.g. ``["T2", "ADC"]``.
        classes: Names of the output channels, e.g. ``["background", "lesion"]``.
        normalized_input: Whether the network's input is the case normalized by the model's own preprocessing
            (``summary.json``'s ``normalized_input``).
        sliding_window: The sliding window the project runs the network in, ``{"patch_size", "overlap"}``, or None
            (none, or the model's own, as in nnU-Net and MONAI bundles).
    """

    kind: str
    sequences: list[str]
    classes: list[str]
    normalized_input: bool = True
    sliding_window: dict[str, Any] | None = None

    @abc.abstractmethod
    def prepare(self, image: np.ndarray, geometry: Any) -> PreparedCase:
        """The case ``image`` (C, D, H, W) on ``geometry`` (an :class:`~SegExplainLib.io.imaging.Geometry`),
        prepared."""

    def check_method(self, method: Any) -> None:  # noqa: B027 - a hook: only pipelines that refuse methods override it
        """Raise, before any case is prepared, when this model cannot be explained with ``method`` (a registry name
        or a method instance); every method is fine unless a pipeline says otherwise."""

    def preview(self) -> Pipeline | None:
        """A cheaper stand-in for a first answer while this pipeline's exact one is computed, or None (the default).

        The stand-in prepares cases as this pipeline does, so a case prepared by this one serves it with the
        stand-in's ``model`` in place (what the warm worker does); only the explained function is cheaper (nnU-Net:
        the first fold without mirroring). Its :meth:`describe` says what it computes.
        """
        return None

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """The model as JSON-friendly values (source folder, configuration, folds...), for the record."""


def _interpolation(source_shape: Sequence[int], target_shape: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Linear interpolation of (N, *source_shape) volumes onto target_shape, voxel centres aligned (half-pixel)."""
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(source_shape)]

    def interpolate(volume: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(volume[None], size=tuple(target_shape), mode=mode, align_corners=False)[0]

    return interpolate


def relevance_from_grid(maps: np.ndarray, original_shape: Sequence[int]) -> np.ndarray:
    """Relevance (C, *network_shape) brought back onto a grid of ``original_shape`` covering the same extent.

    The transpose of linear interpolation from the original grid to the network grid: each network voxel's
    relevance is shared among the original voxels its value was interpolated from, in proportion to the weights.
    Every row of the interpolation sums to one, so the total relevance is kept exactly.

    Example:
        >>> relevance_from_grid(np.ones((1, 2, 2, 2)), (1, 4, 4)).sum()     # 8 units of relevance, still 8
        8.0
    """
    maps = np.asarray(maps)
    original_shape = tuple(int(n) for n in original_shape)
    if tuple(maps.shape[1:]) == original_shape:
        return maps.copy()
    dtype = torch.float64 if maps.dtype == np.float64 else torch.float32
    source = torch.zeros((maps.shape[0], *original_shape), dtype=dtype, requires_grad=True)
    forward = _interpolation(original_shape, maps.shape[1:])(source)
    (back,) = torch.autograd.grad(forward, source, torch.as_tensor(maps, dtype=dtype))
    return back.numpy().astype(maps.dtype, copy=False)


def region_to_grid(region: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A boolean region resampled onto a grid of ``shape`` covering the same extent.

    A network voxel belongs to the region when at least half of its linearly interpolated value comes from region
    voxels. A region smaller than one network voxel (a click on a coarser grid) keeps the network voxels that take
    the most from it, so that a click never vanishes.
    """
    region = np.asarray(region, bool)
    shape = tuple(int(n) for n in shape)
    if region.shape == shape:
        return region.copy()
    share = _interpolation(region.shape, shape)(torch.as_tensor(region, dtype=torch.float64)[None])[0].numpy()
    resampled = share >= 0.5
    if not resampled.any() and share.max() > 0:
        resampled = share >= share.max() * (1 - 1e-9)
    return resampled


def network_target(target: Target, original_shape: tuple[int, ...], prepared: PreparedCase) -> Target:
    """``target`` on the network grid: regions drawn on the images are mapped; the network's own ones stay."""
    if isinstance(target, (PredictedRegion, ClassChannel)):
        return target
    region = target.grid_region(original_shape)
    if region is None or not region.any():
        raise SegExplainError(f"the {target.describe()['kind']} target is empty on the image grid {original_shape}")
    mapped = prepared.region_to_network(region)
    if not mapped.any():
        raise SegExplainError(
            f"the {target.describe()['kind']} target lies outside the part of the image the network sees "
            f"(the model's preprocessing crops to {prepared.record.get('crop', 'its input')})")
    return MaskTarget(mapped, class_index=target.class_index, aggregation=target.aggregation)


def _checked_image(pipeline: Pipeline, image: Any) -> np.ndarray:
    """The case as an array (C, D, H, W) with one channel per sequence of the pipeline, or an error saying so."""
    image = np.asarray(image)
    channels = len(pipeline.sequences)  # none for a model spec: any number
    if image.ndim != 4 or (channels and image.shape[0] != channels):
        raise SegExplainError(f"image has shape {image.shape}; the model expects (C, D, H, W)" + (
            f" with C = {channels} channels ({', '.join(pipeline.sequences)})" if channels else ""))
    return image


def explain_case(pipeline: Pipeline, image: np.ndarray, geometry: Any, target: Target,
                 method: str = "lrp", *, prepared: PreparedCase | None = None, **options: Any):
    """Explain ``target`` on the original images through the pipeline; maps come back on the original grid.

    Args:
        pipeline: The model (see :func:`~SegExplainLib.models.pipelines.open_pipeline`).
        image: The case as read, (C, D, H, W), one channel per sequence of ``pipeline.sequences``.
        geometry: The image grid.
        target: The region on the original grid (:class:`MaskTarget`, ``BoxTarget``, ``VoxelTarget``), or the
            network's own prediction (``PredictedRegion``, ``ClassChannel``, on the network grid).
        method: As for :func:`~SegExplainLib.engine.api.explain`.
        prepared: The case prepared earlier by ``pipeline.prepare`` (reused across clicks), or None.
        **options: As for :func:`~SegExplainLib.engine.api.explain` (``device``, ``composite``, ``n_steps``...).

    Returns:
        The explanation, with ``maps`` on the original grid (sums, see the module docs; a sampled aggregation's
        standard error is mapped the same way, which bounds the error of each original voxel from above),
        ``target`` as given on
        the original grid, the network-grid target in ``extras["network_target"]`` and the pipeline's record in
        ``extras["pipeline"]``.
    """
    image = _checked_image(pipeline, image)
    pipeline.check_method(method)
    prepared = prepared or pipeline.prepare(image, geometry)
    if prepared.on_image_grid:  # nothing to map: the record is explain's own
        return explain(prepared.model, prepared.input, target, method, **options)
    on_network = network_target(target, tuple(image.shape[1:]), prepared)
    result = explain(prepared.model, prepared.input, on_network, method, **options)
    maps = prepared.maps_to_original(result.maps)
    error = None if result.standard_error is None else prepared.maps_to_original(result.standard_error)
    extras = {**result.extras, "network_target": result.target, "network_map_shape": list(result.maps.shape),
              "pipeline": {**pipeline.describe(), **prepared.record}}
    return replace(result, maps=maps, standard_error=error, target=target.describe(), extras=extras)


def segment_matrix_case(pipeline: Pipeline, image: np.ndarray, geometry: Any, method: str = "lrp", *,
                        segmentation: np.ndarray | None = None, prepared: PreparedCase | None = None, case: str = "",
                        **options: Any) -> SegmentMatrix:
    """The segment x segment matrix (:func:`~SegExplainLib.engine.segments.segment_matrix`) of a case, through the
    pipeline, with the model's class names.

    Args:
        pipeline, image, geometry, method, prepared: As for :func:`explain_case`.
        segmentation: A label map (D, H, W) on the original grid, whose segments are the columns; the maps are
            brought onto that grid as sums. None: the network's predicted segmentation, summed on the network's grid.
        case: The case's name, for the figure's title.
        **options: As for :func:`~SegExplainLib.engine.segments.segment_matrix` (``device``, the method's options).
    """
    image = _checked_image(pipeline, image)
    pipeline.check_method(method)
    prepared = prepared or pipeline.prepare(image, geometry)
    return segment_matrix(prepared.model, prepared.input, method=method, segmentation=segmentation,
                          class_names=pipeline.classes, case=case,
                          maps_to_grid=None if prepared.on_image_grid else prepared.maps_to_original, **options)
