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

Maps come back onto the original grid as sums (see :mod:`SegExplainLib.models.protocol`): back through the resampling
by the transpose of linear interpolation, zero outside nnU-Net's crop, and transposed back.

Checkpoints are read with ``torch.load(weights_only=True)``. The only types allowed besides tensors are the numpy
scalars and dtypes that nnU-Net's training log stores, so loading a checkpoint runs no code. Every name that nnunetv2
would look up in ``plans.json`` (the network class, its layer classes, the preprocessor, the normalization schemes,
the resampling functions, the label manager) is resolved here against an exact allow-list per field
(:func:`allow_lists`), and nnunetv2 is handed the objects, never the strings (:func:`plans_objects`). The checkpoint's
``trainer_name`` is found among nnunetv2's own trainers by reading their sources, importing only the module that
defines it (:func:`find_trainer`). Only ``trust_code=True`` lets nnunetv2 resolve the names itself, and a trainer with
its own ``build_network_architecture`` build the network.

Example:
    >>> pipeline = open_nnunet("nnUNet_results/Dataset004_Hippocampus", configuration="3d_fullres", folds=(0, 1))
    >>> pipeline.sequences, pipeline.classes
    (['MRI'], ['background', 'Anterior', 'Posterior'])
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import functools
import importlib
import inspect
import io
import itertools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .allowlist import TRUST_ADVICE, AllowList
from ..engine.composites import CATEGORIES
from ..errors import SegExplainError
from .protocol import Pipeline, PreparedCase, region_to_grid, relevance_from_grid
from .sliding import SlidingWindow

__all__ = ["CHECKPOINTS", "NnUNetPipeline", "MirroredEnsemble", "PlansObjects", "allow_lists", "find_trainer",
           "open_nnunet", "plans_objects", "read_sequence_names"]

#: Checkpoint files of a fold, as nnU-Net's predictor names them.
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth")
_INSTALL = ('nnU-Net v2 is not installed; install it with the line in the README (section "nnU-Net and MONAI '
            'bundles"): pip install -e ".[nnunet]" then pip install --no-deps nnunetv2 dynamic-network-architectures')
#: The fields of ``arch_kwargs`` that nnunetv2's planners name classes in (``_kw_requires_import``).
LAYER_FIELDS = ("conv_op", "norm_op", "dropout_op", "nonlin")
#: The resampling functions of a configuration, each called with the options of its ``<field>_kwargs``.
RESAMPLING_FIELDS = ("resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities")


def _nnunetv2():
    """Import nnunetv2 quietly: it prints advice about unset environment variables to stdout when imported."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import nnunetv2
            from nnunetv2.inference import sliding_window_prediction
            from nnunetv2.utilities.plans_handling import plans_handler
    except ImportError as error:
        raise SegExplainError(f"{_INSTALL} ({error})") from error
    return nnunetv2, plans_handler, sliding_window_prediction


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
    return _nnunetv2()[2].compute_steps_for_sliding_window(tuple(spatial), tuple(patch), tile_step_size)


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
    trained = [str(c.relative_to(path)) for name in CHECKPOINTS for c in sorted(path.glob(f"fold_*/{name}"))]
    if trained:
        raise SegExplainError(f"nnU-Net model folder {str(path)!r} has {trained[0]} but no plans.json; copy the "
                              f"plans.json and dataset.json the model was trained with into it")
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


def read_sequence_names(path: Any, *, configuration: str | None = None) -> list[str]:
    """The input channels' names of a results folder, from the ``dataset.json`` of its model folder of
    ``configuration`` (as :func:`open_nnunet` picks it), without building the network."""
    folder = _model_folder(Path(path).expanduser().resolve(), configuration)
    return channel_names(_read_json(folder / "dataset.json", "dataset file"), folder / "dataset.json")


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


def _classes_of(module: Any, base: type) -> dict[str, type]:
    """The public classes that ``module`` itself defines and that derive from ``base``, by their own names."""
    return {name: obj for name, obj in vars(module).items()
            if not name.startswith("_") and isinstance(obj, type) and issubclass(obj, base)
            and obj.__module__ == module.__name__ and not inspect.isabstract(obj)}


def _layers(what: str, classes: Sequence[type]) -> AllowList:
    return AllowList.of_modules(what, [nn], keep=lambda obj: any(obj is c for c in classes))


@functools.cache
def allow_lists() -> dict[str, AllowList]:
    """The objects that each name-taking field of ``plans.json`` may name, by field.

    * ``network_class_name``: the U-Nets of ``dynamic_network_architectures.architectures.unet`` that nnU-Net's
      planners write (``PlainConvUNet``, ``ResidualEncoderUNet``, ``ResidualUNet``), by their dotted names.
    * ``conv_op``, ``norm_op``, ``dropout_op``: the ``torch.nn`` classes that the helpers of
      ``dynamic_network_architectures`` choose for 1, 2 or 3 dimensions (convolutions; instance and batch norms, which
      the building blocks call as ``norm_op(channels, **kwargs)``; dropouts), by ``torch.nn.X`` and
      ``torch.nn.modules.<file>.X``.
    * ``nonlin``: the rectifiers and activations SegExplain's rules know (:data:`SegExplainLib.engine.composites.CATEGORIES`).
    * ``preprocessor_name``, ``normalization_schemes``, ``resampling_fn_*``, ``label_manager``: nnunetv2's own
      classes and functions of each kind, by the bare names nnunetv2 looks them up by.
    """
    _nnunetv2()
    from dynamic_network_architectures.architectures import unet
    from nnunetv2.preprocessing.normalization import default_normalization_schemes as normalization
    from nnunetv2.preprocessing.preprocessors import default_preprocessor
    from nnunetv2.preprocessing.resampling import default_resampling, no_resampling, resample_torch
    from nnunetv2.utilities.label_handling import label_handling

    resampling = AllowList("nnU-Net resampling functions", {function.__name__: function for function in (
        default_resampling.resample_data_or_seg_to_shape, resample_torch.resample_torch_fornnunet,
        no_resampling.no_resampling_hack)})
    return {
        "network_class_name": AllowList("nnU-Net network classes of dynamic_network_architectures",
                                        {f"{unet.__name__}.{name}": obj
                                         for name, obj in _classes_of(unet, nn.Module).items()}),
        "conv_op": _layers("PyTorch convolutions", (nn.Conv1d, nn.Conv2d, nn.Conv3d)),
        "norm_op": _layers("PyTorch norms", (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
                                             nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)),
        "dropout_op": _layers("PyTorch dropouts", (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)),
        "nonlin": _layers("PyTorch nonlinearities", (*CATEGORIES["rectifier"], *CATEGORIES["activation"])),
        "preprocessor_name": AllowList("nnU-Net preprocessors", _classes_of(
            default_preprocessor, default_preprocessor.DefaultPreprocessor)),
        "normalization_schemes": AllowList("nnU-Net normalization schemes", _classes_of(
            normalization, normalization.ImageNormalization)),
        **{field: resampling for field in RESAMPLING_FIELDS},
        "label_manager": AllowList("nnU-Net label managers", _classes_of(label_handling, label_handling.LabelManager)),
    }


@dataclasses.dataclass(frozen=True)
class PlansObjects:
    """The objects SegExplain resolved for the names of one configuration of ``plans.json``.

    Attributes:
        network: The network class.
        arch_kwargs: The network's options, with the layer classes in place of their names.
        preprocessor: The preprocessor class.
        normalizers: The normalization class of each channel.
        resampling: Each resampling field's function, bound to the options of its ``<field>_kwargs``.
        label_manager: The label manager class.
    """

    network: type
    arch_kwargs: dict[str, Any]
    preprocessor: type
    normalizers: tuple[type, ...]
    resampling: dict[str, Callable]
    label_manager: type


def plans_objects(plans_json: dict[str, Any], configuration: dict[str, Any], *, source: str,
                  trust_code: bool) -> PlansObjects | None:
    """Resolve every name of ``configuration`` (and the plans' ``label_manager``) against :func:`allow_lists`.

    Args:
        plans_json: The whole ``plans.json``.
        configuration: One configuration of it, inheritance resolved (``ConfigurationManager.configuration``).
        source: The file and configuration, for messages.
        trust_code: Resolve nothing and return None: nnunetv2 looks the names up itself.

    Raises:
        SegExplainError: A name is not exactly one of its field's allowed names, or ``_kw_requires_import`` lists a
            field other than :data:`LAYER_FIELDS`; the message names the file, the field and the name.
    """
    if trust_code:
        return None
    lists = allow_lists()
    architecture = configuration.get("architecture") or {}
    arch_kwargs = dict(architecture.get("arch_kwargs") or {})
    for field in architecture.get("_kw_requires_import") or ():
        if field not in LAYER_FIELDS:
            raise SegExplainError(f"{source} names architecture._kw_requires_import {field!r}, which is not one of "
                                  f"{', '.join(LAYER_FIELDS)}; {TRUST_ADVICE}")
        if arch_kwargs.get(field) is not None:
            arch_kwargs[field] = lists[field].resolve(arch_kwargs[field], source=source,
                                                      field=f"architecture.arch_kwargs.{field}")
    schemes = configuration.get("normalization_schemes")
    if not isinstance(schemes, list):
        raise SegExplainError(f"{source} has normalization_schemes {schemes!r}; expected a list of names")
    return PlansObjects(
        network=lists["network_class_name"].resolve(architecture.get("network_class_name"), source=source,
                                                    field="architecture.network_class_name"),
        arch_kwargs=arch_kwargs,
        preprocessor=lists["preprocessor_name"].resolve(configuration.get("preprocessor_name"), source=source,
                                                        field="preprocessor_name"),
        normalizers=tuple(lists["normalization_schemes"].resolve(name, source=source,
                                                                 field=f"normalization_schemes[{index}]")
                          for index, name in enumerate(schemes)),
        resampling={field: functools.partial(lists[field].resolve(configuration.get(field), source=source,
                                                                  field=field),
                                             **(configuration.get(f"{field}_kwargs") or {}))
                    for field in RESAMPLING_FIELDS},
        # nnunetv2's default when the plans name none
        label_manager=lists["label_manager"].resolve(plans_json.get("label_manager", "LabelManager"), source=source,
                                                     field="label_manager"),
    )


@functools.cache
def _trainer_modules() -> dict[str, str]:
    """Each class name defined in nnunetv2's trainer modules, and the first module defining it, read without import.

    Importing every trainer module, as nnunetv2's ``recursive_find_python_class`` does, fails on the first one whose
    dependencies are missing (the Primus trainers need timm), whatever the trainer asked for.
    """
    package = Path(_nnunetv2()[0].__path__[0])
    modules: dict[str, str] = {}
    for file in sorted((package / "training" / "nnUNetTrainer").rglob("*.py")):
        module = ".".join(("nnunetv2", *file.relative_to(package).with_suffix("").parts))
        for node in ast.parse(file.read_bytes()).body:
            if isinstance(node, ast.ClassDef):
                modules.setdefault(node.name, module)
    return modules


def find_trainer(name: Any, *, source: str, trust_code: bool) -> type:
    """The installed nnunetv2's trainer class ``name``, importing only the module that defines it.

    Without ``trust_code`` the trainer must build its network with ``nnUNetTrainer.build_network_architecture``,
    which SegExplain replaces by the same construction from the objects of :func:`plans_objects`: a trainer with its
    own build (nnUNetTrainerBN, the Primus trainers) looks names of ``plans.json`` up itself.

    Args:
        name: The checkpoint's ``trainer_name``.
        source: The checkpoint file, for messages.
        trust_code: Allow a trainer with its own ``build_network_architecture``.

    Raises:
        SegExplainError: No trainer module of nnunetv2 defines ``name``, its module cannot be imported, or its build is
            its own and ``trust_code`` is false.
    """
    module = _trainer_modules().get(name) if isinstance(name, str) else None
    if module is None:
        raise SegExplainError(f"{source} names trainer_name {name!r}, which is not a trainer of the installed "
                              f"nnunetv2; install the nnunetv2 that trained the model (trainers of nnUNet_extTrainer "
                              f"folders are not looked up)")
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            trainer = getattr(importlib.import_module(module), name)
    except ImportError as error:
        raise SegExplainError(f"trainer {name!r} of {source} is defined in {module}, which cannot be imported: "
                              f"{error}") from error
    if not (isinstance(trainer, type) and issubclass(trainer, nnUNetTrainer)):
        raise SegExplainError(f"{source} names trainer_name {name!r}, which is not an nnUNetTrainer class of nnunetv2")
    if not trust_code and trainer.build_network_architecture is not nnUNetTrainer.build_network_architecture:
        raise SegExplainError(f"{source} names trainer_name {name!r}, which builds its network with its own "
                              f"build_network_architecture, looking names of plans.json up itself; {TRUST_ADVICE}")
    return trainer


class _ResolvedConfiguration:
    """nnunetv2's ConfigurationManager, with the objects of :func:`plans_objects` in place of the names it looks up.

    Its other properties (patch size, spacing, ...) are the manager's own.
    """

    def __init__(self, manager: Any, objects: PlansObjects) -> None:
        self.manager, self.objects = manager, objects
        self.preprocessor_class = objects.preprocessor
        for field, function in objects.resampling.items():
            setattr(self, field, function)

    def __getattr__(self, name: str) -> Any:
        if name in ("manager", "objects"):  # not yet set (copy, pickle)
            raise AttributeError(name)
        return getattr(self.manager, name)


def _normalize(normalizers: Sequence[type], data: np.ndarray, seg: np.ndarray, configuration: Any,
               intensity_properties: dict) -> np.ndarray:
    """``DefaultPreprocessor._normalize`` with the resolved normalization classes (it looks each up by name)."""
    for channel in range(data.shape[0]):
        normalizer = normalizers[channel](use_mask_for_norm=configuration.use_mask_for_norm[channel],
                                          intensityproperties=intensity_properties[str(channel)])
        data[channel] = normalizer.run(data[channel], seg[0])
    return data


class NnUNetPipeline(Pipeline):
    """A trained nnU-Net v2 model (one configuration, one or several folds) with its preprocessing and inference.

    Built by :func:`open_nnunet`; see the module documentation.
    """

    kind = "nnunet"

    def __init__(self, folder: Path, configuration: str, fold_folders: list[Path], checkpoint: str, *,
                 mirroring: bool, tile_step_size: float, trust_code: bool) -> None:
        _, plans_handler, sliding = _nnunetv2()
        self.folder, self.checkpoint, self.mirroring, self.tile_step_size = folder, checkpoint, mirroring, \
            tile_step_size
        self.plans_json = _read_json(folder / "plans.json", "plans file")
        self.dataset_json = _read_json(folder / "dataset.json", "dataset file")
        self.plans = plans_handler.PlansManager(self.plans_json)
        if configuration not in self.plans_json.get("configurations", {}):
            raise SegExplainError(f"configuration {configuration!r} is not in {str(folder / 'plans.json')!r}; "
                                  f"expected one of {', '.join(self.plans_json.get('configurations', {}))}")
        self.configuration_name = configuration
        manager = self.plans.get_configuration(configuration)
        self.objects = plans_objects(self.plans_json, manager.configuration, trust_code=trust_code,
                                     source=f"plans file {str(folder / 'plans.json')!r} (configuration "
                                            f"{configuration!r})")
        self.configuration = manager if self.objects is None else _ResolvedConfiguration(manager, self.objects)
        if len(self.configuration.patch_size) != 3:
            raise SegExplainError(f"configuration {configuration!r} is two-dimensional (patch size "
                                  f"{list(self.configuration.patch_size)}); SegExplain explains 3D configurations "
                                  f"(3d_fullres, 3d_lowres)")
        if self.configuration.previous_stage_name is not None:
            raise SegExplainError(f"configuration {configuration!r} is a cascade stage: its input includes the "
                                  f"segmentation of {self.configuration.previous_stage_name!r}, which SegExplain does "
                                  f"not run; explain {self.configuration.previous_stage_name!r} or 3d_fullres")
        self.labels = self.plans.get_label_manager(self.dataset_json) if self.objects is None else \
            self.objects.label_manager(label_dict=self.dataset_json["labels"],
                                       regions_class_order=self.dataset_json.get("regions_class_order"))
        self.sequences = channel_names(self.dataset_json, folder / "dataset.json")
        self.classes = self._class_names()
        checkpoints = [_safe_checkpoint(f / checkpoint) for f in fold_folders]
        self.trainer_name = checkpoints[0]["trainer_name"]
        trainer = find_trainer(self.trainer_name, source=f"checkpoint {str(fold_folders[0] / checkpoint)!r}",
                               trust_code=trust_code)
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
        self.networks = networks
        self.model = self._sliding_window(networks, self.mirror_axes)

    def _sliding_window(self, networks: Sequence[nn.Module], mirror_axes: Sequence[int]) -> SlidingWindow:
        """nnU-Net's inference over ``networks`` (one per fold): its windows, mirroring and Gaussian blend."""
        return SlidingWindow(
            MirroredEnsemble(networks, mirror_axes), self.configuration.patch_size,
            positions=functools.partial(_nnunet_steps, tile_step_size=self.tile_step_size), weight=self._gaussian(),
            pad_to_patch=True)

    def preview(self) -> NnUNetPipeline | None:
        """The first fold without mirroring, in the same windows and on the same preprocessed case: one network
        pass per window instead of ``folds x mirrorings`` (16 for two folds mirrored on three axes). None when this
        is one fold without mirroring already."""
        if len(self.networks) == 1 and not self.mirror_axes:
            return None
        preview = copy.copy(self)  # the plans, labels and preprocessing are shared, never changed
        preview.networks, preview.folds, preview.mirror_axes = self.networks[:1], self.folds[:1], ()
        preview.model = self._sliding_window(preview.networks, ())
        return preview

    @property
    def ensemble(self) -> str:
        """What the explained function averages, e.g. ``"2 folds (0, 1) x 8 mirrorings"`` or ``"fold 0 without
        mirroring"``."""
        folds = f"fold {self.folds[0]}" if len(self.folds) == 1 else \
            f"{len(self.folds)} folds ({', '.join(self.folds)})"
        return f"{folds} x {2 ** len(self.mirror_axes)} mirrorings" if self.mirror_axes else \
            f"{folds} without mirroring"

    def _build(self, trainer: type) -> nn.Module:
        """The network for inference: from the resolved objects as ``get_network_from_plans`` builds it, or (trusted
        code) by the trainer's ``build_network_architecture``, of either signature.

        Without deep supervision. nnunetv2's weight initialization is left out: the checkpoint's weights replace it.
        """
        heads = self.labels.num_segmentation_heads
        if self.objects is not None:
            return self.objects.network(input_channels=len(self.sequences), num_classes=heads,
                                        **{**self.objects.arch_kwargs, "deep_supervision": False})
        if "plans_manager" in inspect.signature(trainer.build_network_architecture).parameters:
            return trainer.build_network_architecture(self.plans, self.configuration, len(self.sequences), heads,
                                                      enable_deep_supervision=False)
        return trainer.build_network_architecture(  # the signature of nnunetv2 before 2.6
            self.configuration.network_arch_class_name, self.configuration.network_arch_init_kwargs,
            self.configuration.network_arch_init_kwargs_req_import, len(self.sequences), heads,
            enable_deep_supervision=False)

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
        if self.objects is not None:  # its own _normalize would look each scheme up by name
            preprocessor._normalize = functools.partial(_normalize, self.objects.normalizers)
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
        """The model's folder, configuration, folds, trainer, checkpoint, mirroring, sliding window and ensemble."""
        return {
            "kind": self.kind, "folder": str(self.folder), "configuration": self.configuration_name,
            "folds": self.folds, "trainer": self.trainer_name, "checkpoint": self.checkpoint,
            "mirror_axes": list(self.mirror_axes), "patch_size": [int(p) for p in self.configuration.patch_size],
            "tile_step_size": self.tile_step_size, "ensemble": self.ensemble, "sequences": self.sequences,
            "classes": self.classes,
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
        trust_code: Let nnunetv2 look up the names of ``plans.json`` itself (a name outside the allow-lists may
            run code) and the checkpoint's trainer build the network with its own code.

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
