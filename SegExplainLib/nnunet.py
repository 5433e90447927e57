"""nnU-Net v2 results folders: the network, preprocessing and inference of nnU-Net, explained on the original images.

:func:`open_nnunet` reads a results folder as nnU-Net's own predictor does, with nnunetv2's own code: the network is
built from ``plans.json`` by the trainer's ``build_network_architecture``, and the case is preprocessed by the plans'
preprocessor. That covers transposition, cropping to the non-zero region, normalization of each channel by its scheme
(z-score, CT clipping with the dataset's foreground statistics...) and resampling to the plans' spacing. Inference
runs inside the explained function, so every method sees what nnU-Net predicts:

* nnU-Net's sliding window: its patch size, its steps (``tile_step_size``, default 0.5) and its Gaussian blend;
* mirroring over the axes the trainer allowed at inference;
* the average over folds.

Mirroring and folds average logits. Each rule and method here is linear in its seed, so the relevance of an average
is the average of the relevances of its members, and the sum rule holds through it.

Maps come back onto the original grid as sums (see :mod:`SegExplainLib.pipelines`): back through the resampling by
the transpose of linear interpolation, zero outside nnU-Net's crop, and transposed back.

Checkpoints are read with ``torch.load(weights_only=True)``. The only types allowed besides tensors are the numpy
scalars and dtypes that nnU-Net's training log stores, so loading a checkpoint runs no code. The network class must
come from ``dynamic_network_architectures`` and its layers from ``torch.nn``. Any other class named in the plans is
code of someone else, imported only with ``trust_code=True``.

Example:
    >>> pipeline = open_nnunet("nnUNet_results/Dataset004_Hippocampus", configuration="3d_fullres", folds=(0, 1))
    >>> pipeline.sequences, pipeline.classes
    (['MRI'], ['background', 'Anterior', 'Posterior'])
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import SegExplainError
from .pipelines import Pipeline, PreparedCase, region_to_grid, relevance_from_grid
from .sliding import SlidingWindow

__all__ = ["CHECKPOINTS", "NnUNetPipeline", "MirroredEnsemble", "open_nnunet"]

#: Checkpoint files of a fold, as nnU-Net's predictor names them.
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth")
_INSTALL = ('nnU-Net v2 is not installed; install it with the line in the README (section "nnU-Net and MONAI '
            'bundles"): pip install -e ".[nnunet]" then pip install --no-deps nnunetv2 dynamic-network-architectures')
_TRUSTED_NETWORK_PACKAGE = "dynamic_network_architectures."
_TRUSTED_LAYER_PACKAGE = "torch.nn."


def _nnunetv2():
    """Import nnunetv2 quietly: it prints advice about unset environment variables to stdout when imported."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import nnunetv2
            from nnunetv2.inference import sliding_window_prediction
            from nnunetv2.utilities import find_class_by_name
            from nnunetv2.utilities.plans_handling import plans_handler
    except ImportError as error:
        raise SegExplainError(f"{_INSTALL} ({error})") from error
    return nnunetv2, plans_handler, find_class_by_name, sliding_window_prediction


class MirroredEnsemble(nn.Module):
    """The average logits of several networks (folds), each also run on the input mirrored along allowed axes.

    As nnU-Net's predictor: for every fold, the network's logits plus those of every mirrored input mirrored back,
    divided by their number; then the mean over folds.

    Args:
        networks: One network per fold.
        mirror_axes: Spatial axes (0 = first spatial axis) that may be mirrored; empty for no mirroring.
    """

    def __init__(self, networks: Sequence[nn.Module], mirror_axes: Sequence[int] = ()) -> None:
        super().__init__()
        self.networks = nn.ModuleList(networks)
        axes = [int(a) + 2 for a in mirror_axes]
        self.flips = [combination for count in range(1, len(axes) + 1)
                      for combination in itertools.combinations(axes, count)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - documented in the class
        total = None
        for network in self.networks:
            logits = network(x)
            for axes in self.flips:
                logits = logits + torch.flip(network(torch.flip(x, axes)), axes)
            total = logits if total is None else total + logits
        return total / (len(self.networks) * (len(self.flips) + 1))


def _nnunet_steps(spatial: Sequence[int], patch: Sequence[int], *, tile_step_size: float) -> list[list[int]]:
    """nnU-Net's window starts per axis (a module-level function, so that the explained model can be copied)."""
    return _nnunetv2()[3].compute_steps_for_sliding_window(tuple(spatial), tuple(patch), tile_step_size)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise SegExplainError(f"{what} {str(path)!r} does not exist; an nnU-Net v2 results folder holds plans.json, "
                              f"dataset.json and fold_N/checkpoint_final.pth")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise SegExplainError(f"{what} {str(path)!r} is not valid JSON: {error}") from error


def channel_names(dataset_json: dict[str, Any], path: Path) -> list[str]:
    """The input channels' names of ``dataset.json`` (``channel_names``, or ``modality`` of older datasets)."""
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    if not isinstance(channels, dict) or not channels:
        raise SegExplainError(f"dataset file {str(path)!r} has no channel_names")
    return [str(channels[key]) for key in sorted(channels, key=int)]


def _model_folder(path: Path, configuration: str | None) -> Path:
    """The trainer folder (``Trainer__Plans__configuration``) of ``path``, which may also be the dataset folder."""
    if not path.is_dir():
        raise SegExplainError(f"nnU-Net results folder {str(path)!r} is not a folder")
    if (path / "plans.json").is_file():
        return path
    wanted = configuration or "3d_fullres"
    candidates = sorted(p for p in path.iterdir() if p.is_dir() and (p / "plans.json").is_file())
    matching = [p for p in candidates if p.name.split("__")[-1] == wanted]
    if len(matching) == 1:
        return matching[0]
    found = ", ".join(p.name for p in candidates) or "none"
    if not matching:
        raise SegExplainError(f"nnU-Net results folder {str(path)!r} has no trained model of configuration "
                              f"{wanted!r}; its trained models (Trainer__Plans__configuration): {found}")
    raise SegExplainError(f"nnU-Net results folder {str(path)!r} has several models of configuration {wanted!r} "
                          f"({found}); pass the one to explain as the folder")


def _fold_folders(folder: Path, folds: Sequence[int | str] | None, checkpoint: str) -> list[Path]:
    available = sorted(p for p in folder.glob("fold_*") if (p / checkpoint).is_file())
    if folds is None:
        if not available:
            raise SegExplainError(f"nnU-Net model folder {str(folder)!r} has no fold_N/{checkpoint}; train a fold "
                                  f"first or pass --checkpoint checkpoint_best.pth")
        return available
    chosen = []
    for fold in folds:
        if not (fold == "all" or (isinstance(fold, (int, np.integer)) and not isinstance(fold, bool) and fold >= 0)):
            raise SegExplainError(f"fold {fold!r} is not a fold number (0, 1, ...) or 'all'")
        fold_folder = folder / f"fold_{fold}"
        if not (fold_folder / checkpoint).is_file():
            have = ", ".join(p.name for p in available) or "none"
            raise SegExplainError(f"fold {fold!r} has no {checkpoint} in {str(folder)!r} (folds with one: {have})")
        chosen.append(fold_folder)
    if not chosen:
        raise SegExplainError("folds is empty; pass at least one fold, or None for all trained folds")
    return chosen


def _safe_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint read without running code: tensors, plain types, and the numpy scalars nnU-Net's log holds."""
    allowed = [np.dtype, type(np.dtype(np.float32)), type(np.dtype(np.float64)), type(np.dtype(np.int64))]
    try:
        allowed.append(np._core.multiarray.scalar)
    except AttributeError:  # numpy 1
        allowed.append(np.core.multiarray.scalar)
    try:
        with torch.serialization.safe_globals(allowed):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SegExplainError(f"checkpoint {str(path)!r} cannot be read as weights only (no code may run while "
                              f"loading): {str(error).splitlines()[0]}") from error
    missing = [key for key in ("network_weights", "trainer_name") if key not in checkpoint]
    if missing:
        raise SegExplainError(f"checkpoint {str(path)!r} lacks {', '.join(missing)}; expected a checkpoint written "
                              f"by an nnU-Net v2 trainer")
    return checkpoint


class NnUNetPipeline(Pipeline):
    """A trained nnU-Net v2 model (one configuration, one or several folds) with its preprocessing and inference.

    Built by :func:`open_nnunet`; see the module documentation.
    """

    kind = "nnunet"

    def __init__(self, folder: Path, configuration: str, fold_folders: list[Path], checkpoint: str, *,
                 mirroring: bool, tile_step_size: float, trust_code: bool) -> None:
        nnunetv2, plans_handler, find_class, sliding = _nnunetv2()
        self.folder, self.checkpoint, self.mirroring, self.tile_step_size = folder, checkpoint, mirroring, \
            tile_step_size
        self.plans_json = _read_json(folder / "plans.json", "plans file")
        self.dataset_json = _read_json(folder / "dataset.json", "dataset file")
        self.plans = plans_handler.PlansManager(self.plans_json)
        if configuration not in self.plans_json.get("configurations", {}):
            raise SegExplainError(f"configuration {configuration!r} is not in {str(folder / 'plans.json')!r}; "
                                  f"expected one of {', '.join(self.plans_json.get('configurations', {}))}")
        self.configuration_name = configuration
        self.configuration = self.plans.get_configuration(configuration)
        if len(self.configuration.patch_size) != 3:
            raise SegExplainError(f"configuration {configuration!r} is two-dimensional (patch size "
                                  f"{list(self.configuration.patch_size)}); SegExplain explains 3D configurations "
                                  f"(3d_fullres, 3d_lowres)")
        if self.configuration.previous_stage_name is not None:
            raise SegExplainError(f"configuration {configuration!r} is a cascade stage: its input includes the "
                                  f"segmentation of {self.configuration.previous_stage_name!r}, which SegExplain does "
                                  f"not run; explain {self.configuration.previous_stage_name!r} or 3d_fullres")
        self._check_classes_trusted(trust_code)
        self.labels = self.plans.get_label_manager(self.dataset_json)
        self.sequences = channel_names(self.dataset_json, folder / "dataset.json")
        self.classes = self._class_names()
        checkpoints = [_safe_checkpoint(f / checkpoint) for f in fold_folders]
        self.trainer_name = checkpoints[0]["trainer_name"]
        package = Path(nnunetv2.__path__[0])  # nnunetv2's own trainers only: no nnUNet_extTrainer folders
        trainer = find_class.recursive_find_python_class(str(package / "training" / "nnUNetTrainer"),
                                                         self.trainer_name, "nnunetv2.training.nnUNetTrainer",
                                                         str(package))
        if trainer is None:
            raise SegExplainError(f"trainer {self.trainer_name!r} of {str(folder)!r} is not part of the installed "
                                  f"nnunetv2; install the nnunetv2 that trained the model")
        networks = []
        for fold_folder, state in zip(fold_folders, checkpoints):
            network = self._build(trainer)
            try:
                network.load_state_dict(state["network_weights"])
            except RuntimeError as error:
                raise SegExplainError(f"weights of {str(fold_folder / checkpoint)!r} do not fit the network of "
                                      f"plans.json: {str(error).splitlines()[0]}") from error
            networks.append(network.eval())
        self.folds = [f.name.removeprefix("fold_") for f in fold_folders]
        self.mirror_axes = tuple(checkpoints[0].get("inference_allowed_mirroring_axes") or ()) if mirroring else ()
        self._sliding = sliding
        self.model = SlidingWindow(
            MirroredEnsemble(networks, self.mirror_axes), self.configuration.patch_size,
            positions=functools.partial(_nnunet_steps, tile_step_size=tile_step_size), weight=self._gaussian(),
            pad_to_patch=True)

    def _build(self, trainer: type) -> nn.Module:
        """The trainer's network for inference, by either signature of ``build_network_architecture``."""
        heads = self.labels.num_segmentation_heads
        if "plans_manager" in inspect.signature(trainer.build_network_architecture).parameters:
            return trainer.build_network_architecture(self.plans, self.configuration, len(self.sequences), heads,
                                                      enable_deep_supervision=False)
        return trainer.build_network_architecture(  # the signature of nnunetv2 before 2.6
            self.configuration.network_arch_class_name, self.configuration.network_arch_init_kwargs,
            self.configuration.network_arch_init_kwargs_req_import, len(self.sequences), heads,
            enable_deep_supervision=False)

    def _check_classes_trusted(self, trust_code: bool) -> None:
        """Refuse classes outside dynamic_network_architectures and torch.nn unless the user trusts the model."""
        if trust_code:
            return
        named = [("network_class_name", self.configuration.network_arch_class_name, _TRUSTED_NETWORK_PACKAGE)]
        kwargs = self.configuration.network_arch_init_kwargs
        named += [(key, kwargs[key], _TRUSTED_LAYER_PACKAGE)
                  for key in self.configuration.network_arch_init_kwargs_req_import if kwargs.get(key) is not None]
        for key, name, package in named:
            if not str(name).startswith(package):
                raise SegExplainError(
                    f"plans.json of {str(self.folder)!r} names {key} {name!r}, outside {package.rstrip('.')}: "
                    f"importing it runs code of someone else; pass --trust-model-code only if you trust it")

    def _class_names(self) -> list[str]:
        if self.labels.has_regions:
            names = {tuple(np.atleast_1d(v).tolist()): k for k, v in self.dataset_json["labels"].items()}
            return [names.get(tuple(np.atleast_1d(region).tolist()), f"region{i}")
                    for i, region in enumerate(self.labels.foreground_regions)]
        by_value = {int(v): k for k, v in self.dataset_json["labels"].items() if not isinstance(v, list)}
        return [by_value.get(int(v), f"label{v}") for v in self.labels.all_labels]

    def _gaussian(self) -> torch.Tensor:
        return self._sliding.compute_gaussian(tuple(self.configuration.patch_size), sigma_scale=1.0 / 8,
                                              value_scaling_factor=10, dtype=torch.float32,
                                              device=torch.device("cpu")).clone()

    def prepare(self, image: np.ndarray, geometry: Any) -> PreparedCase:
        """Preprocess ``image`` (C, D, H, W) on ``geometry`` with the plans' preprocessor.

        Raises:
            SegExplainError: The image has another number of channels than the model's ``channel_names``.
        """
        image = np.asarray(image)
        if image.ndim != 4 or image.shape[0] != len(self.sequences):
            raise SegExplainError(f"image has shape {image.shape}; the nnU-Net model expects (C, D, H, W) with C = "
                                  f"{len(self.sequences)} channels ({', '.join(self.sequences)})")
        spacing_dhw = [float(s) for s in reversed(geometry.spacing)]  # nnU-Net's SimpleITK reader: (z, y, x)
        properties: dict[str, Any] = {"spacing": spacing_dhw}
        preprocessor = self.configuration.preprocessor_class(verbose=False)
        with contextlib.redirect_stdout(io.StringIO()):
            data, _, properties = preprocessor.run_case_npy(image, None, properties, self.plans, self.configuration,
                                                            self.dataset_json)
        forward = [int(a) for a in self.plans.transpose_forward]
        backward = [int(a) for a in self.plans.transpose_backward]
        bbox = [[int(a), int(b)] for a, b in properties["bbox_used_for_cropping"]]
        cropped_shape = tuple(int(n) for n in properties["shape_after_cropping_and_before_resampling"])
        transposed_shape = tuple(int(n) for n in properties["shape_before_cropping"])
        network_shape = tuple(int(n) for n in data.shape[1:])
        crop = tuple(slice(a, b) for a, b in bbox)

        def region_to_network(region: np.ndarray) -> np.ndarray:
            return region_to_grid(np.transpose(region, forward)[crop], network_shape)

        def maps_to_original(maps: np.ndarray) -> np.ndarray:
            cropped = relevance_from_grid(maps, cropped_shape)
            full = np.zeros((maps.shape[0], *transposed_shape), dtype=cropped.dtype)
            full[(slice(None), *crop)] = cropped
            return np.ascontiguousarray(np.transpose(full, [0, *[a + 1 for a in backward]]))

        record = {
            "crop": bbox, "transpose_forward": forward, "original_spacing_dhw": spacing_dhw,
            "network_spacing": [float(s) for s in self.configuration.spacing], "network_shape": list(network_shape),
            "normalization": list(self.configuration.normalization_schemes),
            "resampling": {key: self.configuration.configuration.get(key)
                           for key in ("resampling_fn_data", "resampling_fn_data_kwargs")},
            "maps_back": "sums: transpose of linear interpolation, zero outside the crop",
        }
        return PreparedCase(self.model, np.ascontiguousarray(data, dtype=np.float32), region_to_network,
                            maps_to_original, record)

    def describe(self) -> dict[str, Any]:
        """The model's folder, configuration, folds, trainer, checkpoint, mirroring and sliding window."""
        return {
            "kind": self.kind, "folder": str(self.folder), "configuration": self.configuration_name,
            "folds": self.folds, "trainer": self.trainer_name, "checkpoint": self.checkpoint,
            "mirror_axes": list(self.mirror_axes), "patch_size": [int(p) for p in self.configuration.patch_size],
            "tile_step_size": self.tile_step_size, "sequences": self.sequences, "classes": self.classes,
        }


def open_nnunet(path: str | Path, *, configuration: str | None = None, folds: Sequence[int | str] | None = None,
                checkpoint: str = "checkpoint_final.pth", mirroring: bool = True, tile_step_size: float = 0.5,
                trust_code: bool = False) -> NnUNetPipeline:
    """Open an nnU-Net v2 results folder.

    Args:
        path: The model folder (``nnUNet_results/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres``,
            holding ``plans.json``) or its dataset folder (``nnUNet_results/Dataset004_Hippocampus``).
        configuration: ``"3d_fullres"`` (default) or ``"3d_lowres"``; must match the model folder when given.
        folds: Folds to average, e.g. ``(0, 1, 2, 3, 4)`` or ``("all",)``; default: every fold with a checkpoint.
        checkpoint: ``"checkpoint_final.pth"`` or ``"checkpoint_best.pth"``.
        mirroring: Average over the mirrored inputs the trainer allowed (nnU-Net's default), or not.
        tile_step_size: Step of the sliding window as a fraction of the patch (nnU-Net's default 0.5).
        trust_code: Allow plans that name network or layer classes outside ``dynamic_network_architectures`` and
            ``torch.nn`` (importing them runs their code).

    Raises:
        SegExplainError: nnunetv2 is missing, the folder is not a results folder, the configuration, a fold or a
            checkpoint is missing, or the plans name untrusted code; the message says which.
    """
    if checkpoint not in CHECKPOINTS:
        raise SegExplainError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    if isinstance(tile_step_size, bool) or not isinstance(tile_step_size, (int, float)) or not (
            0 < tile_step_size <= 1):
        raise SegExplainError(f"tile_step_size must lie in (0, 1], got {tile_step_size!r}")
    folder = _model_folder(Path(path).expanduser().resolve(), configuration)
    configuration_name = folder.name.split("__")[-1]
    if configuration is not None and configuration != configuration_name:
        raise SegExplainError(f"nnU-Net model folder {str(folder)!r} holds configuration {configuration_name!r}, not "
                              f"the {configuration!r} asked for")
    return NnUNetPipeline(folder, configuration_name, _fold_folders(folder, folds, checkpoint), checkpoint,
                          mirroring=bool(mirroring), tile_step_size=float(tile_step_size), trust_code=trust_code)
