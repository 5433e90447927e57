"""What an nnU-Net v2 results folder may make nnunetv2 run without the user's word: checkpoints read as data, every
name of ``plans.json`` resolved here, never by nnunetv2.

Checkpoints are read with ``torch.load(weights_only=True)`` (:func:`read_checkpoint`): the only types allowed
besides tensors are the numpy scalars and dtypes that nnU-Net's training log stores, so loading a checkpoint runs no
code. Every name that nnunetv2 would look up in ``plans.json`` (the network class, its layer classes, the
preprocessor, the normalization schemes, the resampling functions, the label manager) is resolved against an exact
allow-list per field (:func:`allow_lists`), and nnunetv2 is handed the objects, never the strings
(:func:`plans_objects`). The checkpoint's ``trainer_name`` is found among nnunetv2's own trainers by reading their
sources, importing only the module that defines it (:func:`find_trainer`). See :mod:`~SegExplainLib.models.nnunet`
for the pipeline.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import importlib
import inspect
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..engine.composites import CATEGORIES
from ..errors import SegExplainError
from .allowlist import TRUST_ADVICE, AllowList

__all__ = ["LAYER_FIELDS", "RESAMPLING_FIELDS", "PlansObjects", "allow_lists", "find_trainer", "import_nnunetv2",
           "plans_objects", "read_checkpoint"]

_INSTALL = ('nnU-Net v2 is not installed; install it with the line in the README (section "nnU-Net and MONAI '
            'bundles"): pip install -e ".[nnunet]" then pip install --no-deps nnunetv2 dynamic-network-architectures')
#: The fields of ``arch_kwargs`` that nnunetv2's planners name classes in (``_kw_requires_import``).
LAYER_FIELDS = ("conv_op", "norm_op", "dropout_op", "nonlin")
#: The resampling functions of a configuration, each called with the options of its ``<field>_kwargs``.
RESAMPLING_FIELDS = ("resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities")


def import_nnunetv2():
    """Import nnunetv2 quietly: it prints advice about unset environment variables to stdout when imported."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import nnunetv2
            from nnunetv2.inference import sliding_window_prediction
            from nnunetv2.utilities.plans_handling import plans_handler
    except ImportError as error:
        raise SegExplainError(f"{_INSTALL} ({error})") from error
    return nnunetv2, plans_handler, sliding_window_prediction


def read_checkpoint(path: Path) -> dict[str, Any]:
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
    * ``nonlin``: the rectifiers and activations SegExplain's rules know
      (:data:`SegExplainLib.engine.composites.CATEGORIES`).
    * ``preprocessor_name``, ``normalization_schemes``, ``resampling_fn_*``, ``label_manager``: nnunetv2's own
      classes and functions of each kind, by the bare names nnunetv2 looks them up by.
    """
    import_nnunetv2()
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
    package = Path(import_nnunetv2()[0].__path__[0])
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
