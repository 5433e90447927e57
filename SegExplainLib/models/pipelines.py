"""Pipelines: a trained model with its own preprocessing, from the original images to the network and back.

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

Example:
    >>> pipeline = open_pipeline("nnunet", "Dataset001_Prostate/nnUNetTrainer__nnUNetPlans__3d_fullres")
    >>> image, geometry = read_sequences(["t2.nii.gz", "adc.nii.gz"])
    >>> result = explain_case(pipeline, image, geometry, VoxelTarget((12, 80, 75), class_index=1), "lrp")
    >>> result.maps.shape == image.shape        # on the original grid
    True
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import SegExplainError
from ..engine.targets import ClassChannel, MaskTarget, PredictedRegion, Target

__all__ = ["PIPELINES", "Pipeline", "PreparedCase", "explain_case", "open_pipeline", "region_to_grid",
           "relevance_from_grid", "sequence_names"]


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
        """The case ``image`` (C, D, H, W) on ``geometry`` (an :class:`~SegExplainLib.io.imaging.Geometry`), prepared."""

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


#: Pipeline kinds: the module and function that open one from a path and keyword options.
PIPELINES: dict[str, tuple[str, str]] = {
    "card": ("SegExplainLib.models.network_pipeline", "open_card"),
    "spec": ("SegExplainLib.models.network_pipeline", "open_spec"),
    "nnunet": ("SegExplainLib.models.nnunet", "open_nnunet"),
    "bundle": ("SegExplainLib.models.monai_bundle", "open_bundle"),
}


def open_pipeline(kind: str, path: Any, **options: Any) -> Pipeline:
    """Open a model of any kind as a pipeline.

    Args:
        kind: ``"card"`` (a model card file), ``"spec"`` (a model spec such as ``"reference"`` or
            ``"file.py:Class"``), ``"nnunet"`` (a results folder of nnU-Net v2) or ``"bundle"`` (a MONAI bundle).
        path: The card file, the spec, or the folder.
        **options: Options of that kind: ``trust_code``, ``patch_size``, ``overlap`` for a card (and ``kwargs``,
            ``weights`` for a spec, see :mod:`~SegExplainLib.models.network_pipeline`); e.g.
            ``configuration="3d_fullres", folds=(0, 1)`` for nnU-Net.

    Raises:
        SegExplainError: Unknown kind, or the model cannot be opened, or would run code without ``trust_code``
            (the message says why).
    """
    if kind not in PIPELINES:
        raise SegExplainError(f"unknown pipeline kind {kind!r}; expected one of {', '.join(PIPELINES)}")
    module_name, function = PIPELINES[kind]
    return getattr(importlib.import_module(module_name), function)(path, **options)


def sequence_names(kind: str, path: Any, *, configuration: str | None = None, trust_code: bool = False) -> list[str]:
    """The input sequence names of a model, read from its description files without building the network.

    What a front end needs to match a case's volumes or files to the model's channels, before anything runs: a
    model card's ``sequences``, an nnU-Net results folder's ``dataset.json`` ``channel_names`` (of the model folder of
    ``configuration``, as :func:`open_pipeline` picks it), a MONAI bundle's ``configs/metadata.json``
    (``network_data_format.inputs.<image>.channel_def`` or ``num_channels``). The names are those of
    ``open_pipeline(kind, path).sequences``; only a bundle whose metadata does not give them is opened (its network
    built, which ``trust_code`` may allow to run its code).

    Args:
        kind: ``"card"`` (a model card file), ``"nnunet"`` or ``"bundle"``.
        path: The card file or the model folder.
        configuration: nnU-Net configuration (default ``3d_fullres``) when ``path`` is the dataset folder.
        trust_code: Passed on when a bundle must be opened.

    Raises:
        SegExplainError: Unknown kind, a missing file or folder, or description files that do not name the
            sequences; the message names the path.

    Example:
        >>> sequence_names("nnunet", "nnUNet_results/Dataset001_Prostate/nnUNetTrainer__nnUNetPlans__3d_fullres")
        ['T2', 'ADC']
    """
    import json
    from pathlib import Path

    if kind == "card":
        from .loading import ModelCard

        if not Path(path).is_file():
            raise SegExplainError(f"model card {str(path)!r} is not a file")
        sequences = list(ModelCard.read(path).sequences or [])
        if not sequences:
            raise SegExplainError(f"model card {str(path)!r} lists no sequences")
        return [str(name) for name in sequences]
    if kind == "nnunet":
        from .nnunet import _model_folder, _read_json, channel_names

        folder = _model_folder(Path(path).expanduser().resolve(), configuration)
        return channel_names(_read_json(folder / "dataset.json", "dataset file"), folder / "dataset.json")
    if kind == "bundle":
        from .monai_bundle import _channel_names, _data_format

        metadata_file = Path(path).expanduser().resolve() / "configs" / "metadata.json"
        try:
            _, image, _ = _data_format(json.loads(metadata_file.read_text()))
            sequences = _channel_names(image, None, "channel")
        except (OSError, ValueError, AttributeError, TypeError):
            sequences = []
        if sequences:
            return sequences
    if kind not in PIPELINES:
        raise SegExplainError(f"unknown model kind {kind!r}; expected one of {', '.join(PIPELINES)}")
    return list(open_pipeline(kind, path, trust_code=trust_code).sequences)


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


def _on_network(target: Target, original_shape: tuple[int, ...], prepared: PreparedCase) -> Target:
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


def explain_case(pipeline: Pipeline, image: np.ndarray, geometry: Any, target: Target,
                 method: str = "lrp", *, prepared: PreparedCase | None = None, **options: Any):
    """Explain ``target`` on the original images through the pipeline; maps come back on the original grid.

    Args:
        pipeline: The model (see :func:`open_pipeline`).
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
    from ..engine.api import explain

    image = np.asarray(image)
    channels = len(pipeline.sequences)  # none for a model spec: any number
    if image.ndim != 4 or (channels and image.shape[0] != channels):
        raise SegExplainError(f"image has shape {image.shape}; the model expects (C, D, H, W)" + (
            f" with C = {channels} channels ({', '.join(pipeline.sequences)})" if channels else ""))
    pipeline.check_method(method)
    prepared = prepared or pipeline.prepare(image, geometry)
    if prepared.on_image_grid:  # nothing to map: the record is explain's own
        return explain(prepared.model, prepared.input, target, method, **options)
    network_target = _on_network(target, tuple(image.shape[1:]), prepared)
    result = explain(prepared.model, prepared.input, network_target, method, **options)
    maps = prepared.maps_to_original(result.maps)
    error = None if result.standard_error is None else prepared.maps_to_original(result.standard_error)
    extras = {**result.extras, "network_target": result.target, "network_map_shape": list(result.maps.shape),
              "pipeline": {**pipeline.describe(), **prepared.record}}
    return replace(result, maps=maps, standard_error=error, target=target.describe(), extras=extras)
