"""Models from the command line: how ``segexplain explain --model SPEC`` gets a network, its weights and its inputs.

A model spec is one string:

* ``"reference"`` / ``"reference_unet"``: :func:`SegExplainLib.models.networks.reference_unet` called with ``kwargs``;
* ``"unet3d"``: :class:`SegExplainLib.models.networks.UNet3D` called with ``kwargs``;
* ``"monai:Name"``: any network in ``monai.networks.nets`` (needs MONAI), called with ``kwargs``;
* ``"torch.nn:Name"`` and ``"SegExplainLib.models:Name"``: a layer of PyTorch or a network of this project;
* ``"path/to/file.py:Name"``: a class or factory defined in a Python file, called with ``kwargs``;
* ``"package.module:Name"``: a class or factory in an importable module (``Name`` may be dotted), called with
  ``kwargs``;
* ``"pickle:path/to/model.pt"``: a whole pickled ``nn.Module``.

The first four forms run only the code of SegExplain, PyTorch and MONAI (a ``Name`` without dots that is a
network class or factory function of that package). The last three import or run code of someone else: a model
file runs when it is imported, a module runs when it is imported, and unpickling runs code stored in the file.
:func:`load_model` refuses them, before importing anything, unless the caller passes ``trust_code=True``
(``--trust-model-code`` on the command line). A model card cannot allow this itself, because cards come from other
people; :func:`untrusted_code` says what a spec would run.

Weights are a state dict in ``.pt``/``.pth`` (read with ``torch.load(weights_only=True)``, so no code runs) or
``.safetensors``. A :class:`ModelCard` (YAML or JSON) bundles the spec, its options, the weights, the MRI sequences
the network expects, its classes and the intensity normalization of every sequence.

Example:
    >>> card = ModelCard.read("models/prostate.yaml")
    >>> model = card.load_model()                        # eval mode, weights loaded
    >>> image = card.normalize(raw)                      # (C, D, H, W), one channel per card.sequences
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .allowlist import OTHER_CODE_CLASSES, TRUST_ADVICE
from ..errors import SegExplainError

__all__ = [
    "CARD_SUFFIXES",
    "NORMALIZATION_KINDS",
    "WEIGHT_SUFFIXES",
    "ModelCard",
    "load_model",
    "load_weights",
    "normalize",
    "refuse_untrusted_code",
    "untrusted_code",
]

#: Weight file extensions that :func:`load_weights` reads.
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")
#: Model card file extensions that :meth:`ModelCard.read` reads.
CARD_SUFFIXES = (".yaml", ".yml", ".json")
#: Intensity normalizations that :func:`normalize` applies.
NORMALIZATION_KINDS = ("zscore", "percentile", "window", "none")

_BUILTIN_SPECS = ("reference", "reference_unet", "unet3d")
_SPEC_FORMS = (
    "reference, reference_unet, unet3d, path/to/file.py:Name, package.module:Name, monai:Name or pickle:PATH"
)
#: Spec prefixes whose networks build without trust_code: the prefix and the module that ``Name`` is looked up in.
_LIBRARY_MODULES = {
    "monai": "monai.networks.nets", "torch.nn": "torch.nn", "SegExplainLib.models": "SegExplainLib.models.networks",
}
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_MODULE_COUNTER = itertools.count()
_MAX_KEYS_SHOWN = 3


def _one_line(error: BaseException) -> str:
    """``Type: first line of the message`` of an error raised by code we do not control."""
    lines = str(error).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _show_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    return shown + (f" (+{len(keys) - _MAX_KEYS_SHOWN} more)" if len(keys) > _MAX_KEYS_SHOWN else "")


def _check_kwargs(kwargs: Any, where: str) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise SegExplainError(f"{where} must be a mapping of option names to values, got {kwargs!r}")
    return dict(kwargs)


def _split_spec(spec: str) -> tuple[str, str]:
    """Split ``"left:Name"`` at the last colon, so that Windows drive letters stay in the path."""
    left, colon, name = spec.rpartition(":")
    if not colon or not left or not _DOTTED.fullmatch(name):
        raise SegExplainError(f"model spec {spec!r} matches none of the forms {_SPEC_FORMS}")
    return left, name


def _resolve_attribute(owner: Any, name: str, what: str) -> Any:
    value = owner
    for part in name.split("."):
        if not hasattr(value, part):
            raise SegExplainError(f"{what} has no attribute {name!r}; expected a class or factory function of that name")
        value = getattr(value, part)
    return value


def _import_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise SegExplainError(f"model file {str(path)!r} of spec {spec!r} does not exist")
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"_segexplain_model_{next(_MODULE_COUNTER)}_{stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise SegExplainError(f"model file {str(path)!r} cannot be imported as Python; expected a .py file")
    module = importlib.util.module_from_spec(module_spec)
    # Registered before running it, so that dataclasses, pickling and relative lookups inside the file work.
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise SegExplainError(f"importing model file {str(path)!r} failed: {_one_line(error)}") from error
    return module


def _import_module(module_name: str, spec: str, *, package_hint: str | None = None) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or module_name
        if package_hint is not None and missing.split(".")[0] == package_hint:
            raise SegExplainError(
                f"model spec {spec!r} needs the package {package_hint}, which is not installed; "
                f"install it with pip install {package_hint}"
            ) from error
        raise SegExplainError(
            f"model spec {spec!r}: module {missing!r} not found; expected an importable module"
        ) from error
    except Exception as error:
        raise SegExplainError(f"importing module {module_name!r} of spec {spec!r} failed: {_one_line(error)}") from error


def _call_factory(factory: Any, kwargs: dict[str, Any], spec: str) -> nn.Module:
    if isinstance(factory, nn.Module):
        raise SegExplainError(
            f"model spec {spec!r} names a module instance, not a class or factory; expected something to call with kwargs"
        )
    if not callable(factory):
        raise SegExplainError(f"model spec {spec!r} names a {type(factory).__name__}, expected a class or factory")
    try:
        model = factory(**kwargs)
    except SegExplainError:
        raise
    except Exception as error:
        raise SegExplainError(f"building model {spec!r} with kwargs {kwargs!r} failed: {_one_line(error)}") from error
    if not isinstance(model, nn.Module):
        raise SegExplainError(
            f"model spec {spec!r} returned a {type(model).__name__}, expected a torch.nn.Module"
        )
    return model


def _load_pickle(path: Path, spec: str) -> nn.Module:
    if not path.is_file():
        raise SegExplainError(f"pickled model file {str(path)!r} of spec {spec!r} does not exist")
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise SegExplainError(f"unpickling model file {str(path)!r} failed: {_one_line(error)}") from error
    if not isinstance(model, nn.Module):
        raise SegExplainError(
            f"pickled file {str(path)!r} holds a {type(model).__name__}, expected a whole torch.nn.Module "
            f"(a state dict goes to weights= / --weights instead)"
        )
    return model


def untrusted_code(spec: str) -> str | None:
    """What code of someone else building the model of ``spec`` would import or run, or None when it runs none.

    The built-in names, and ``monai:Name``, ``torch.nn:Name`` and ``SegExplainLib.models:Name`` with a ``Name``
    without dots, run only the code of SegExplain, PyTorch and MONAI (:func:`load_model` checks that ``Name`` is a
    network class or factory function of that package). Every other form runs code that :func:`load_model` builds
    only with ``trust_code=True``. Nothing is imported here.

    Args:
        spec: A model spec, e.g. ``"nets/unet.py:UNet"`` or a model card's ``model``.

    Returns:
        What would run, e.g. ``"the Python file 'nets/unet.py'"``, or None.

    Raises:
        SegExplainError: ``spec`` is no model spec.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SegExplainError(f"model spec must be a non-empty string, got {spec!r}; expected one of {_SPEC_FORMS}")
    if spec.strip().lower() in _BUILTIN_SPECS:
        return None
    if spec.startswith("pickle:"):
        return f"code stored in the pickle {spec[len('pickle:'):]!r}"
    left, name = _split_spec(spec)
    if left.lower().endswith(".py"):
        return f"the Python file {left!r}"
    if not _DOTTED.fullmatch(left):
        raise SegExplainError(f"model spec {spec!r} matches none of the forms {_SPEC_FORMS}")
    if left not in _LIBRARY_MODULES:
        return f"code from the module {left!r}"
    if "." in name or name.startswith("_"):
        return f"code reached through {name!r} of {_LIBRARY_MODULES[left]}"
    return None


def refuse_untrusted_code(spec: str, source: str, *, trusted: bool, advice: str) -> str | None:
    """Raise unless building ``spec`` runs no code of someone else, or the user has allowed it (``trusted``).

    Every front end checks here and names its own way to allow it: the message is
    ``f"{source} would run {what}{advice}"``, e.g. ``"; pass --trust-model-code only if you trust it"``.

    Returns:
        What :func:`untrusted_code` says would run (None when nothing).

    Raises:
        SegExplainError: ``spec`` would run code and ``trusted`` is false, or ``spec`` is no model spec.
    """
    code = untrusted_code(spec)
    if code is not None and not trusted:
        raise SegExplainError(f"{source} would run {code}{advice}")
    return code


def _check_library_network(factory: Any, spec: str, module_name: str, *, trusted: bool) -> None:
    """Refuse anything but a network class or a factory function defined in ``module_name`` (or below it), and,
    unless ``trusted``, the networks that look a name up in another library by themselves
    (:data:`~SegExplainLib.models.allowlist.OTHER_CODE_CLASSES`)."""
    if not trusted and getattr(factory, "__name__", None) in OTHER_CODE_CLASSES:
        raise SegExplainError(f"model spec {spec!r} names {factory.__name__}, which looks names up in another library "
                              f"by itself; {TRUST_ADVICE}")
    if isinstance(factory, type) and issubclass(factory, nn.Module):
        return
    owner = getattr(factory, "__module__", None) or getattr(factory, "__name__", "?")
    if inspect.isfunction(factory) and (owner == module_name or owner.startswith(f"{module_name}.")):
        return
    kind = "function" if inspect.isfunction(factory) else type(factory).__name__
    raise SegExplainError(
        f"model spec {spec!r} names a {kind} of {owner}, expected a network class (torch.nn.Module) or a factory "
        f"function of {module_name}"
    )


def _build_model(spec: str, kwargs: dict[str, Any], *, trust_code: bool) -> nn.Module:
    from . import networks as models  # late: keeps import of this module cheap and avoids cycles

    code = refuse_untrusted_code(spec, f"model spec {spec!r}", trusted=trust_code, advice="; pass trust_code=True "
                                 "only if you trust it (a model card cannot allow this itself)")
    key = spec.strip().lower()
    if key in ("reference", "reference_unet"):
        return _call_factory(models.reference_unet, kwargs, spec)
    if key == "unet3d":
        return _call_factory(models.UNet3D, kwargs, spec)
    if spec.startswith("pickle:"):
        if kwargs:
            raise SegExplainError(f"model spec {spec!r} loads a whole model and takes no kwargs, got {kwargs!r}")
        path_text = spec[len("pickle:"):]
        if not path_text:
            raise SegExplainError(f"model spec {spec!r} names no file; expected pickle:PATH")
        return _load_pickle(Path(path_text).expanduser(), spec)
    left, name = _split_spec(spec)
    if left.lower().endswith(".py"):
        path = Path(left).expanduser()
        factory = _resolve_attribute(_import_file(path, spec), name, f"model file {str(path)!r}")
    else:
        module_name = _LIBRARY_MODULES.get(left, left)
        module = _import_module(module_name, spec, package_hint="monai" if left == "monai" else None)
        what = module_name if left == "monai" else f"module {left!r}"
        factory = _resolve_attribute(module, name, what)
        if code is None:
            _check_library_network(factory, spec, module_name, trusted=trust_code)
    return _call_factory(factory, kwargs, spec)


def _existing_file(path: Path, what: str, suffixes: Sequence[str]) -> str:
    """The lower-case suffix of ``path`` after checking that it is one of ``suffixes`` and that the file exists."""
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise SegExplainError(
            f"{what} {str(path)!r} has extension {suffix or '(none)'!r}; expected one of {', '.join(suffixes)}"
        )
    if not path.is_file():
        raise SegExplainError(f"{what} {str(path)!r} does not exist")
    return suffix


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    suffix = _existing_file(path, "weights file", WEIGHT_SUFFIXES)
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise SegExplainError(
                f"weights file {str(path)!r} needs the package safetensors, which is not installed; "
                f"install it with pip install safetensors"
            ) from error
        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as error:
            raise SegExplainError(f"reading safetensors file {str(path)!r} failed: {_one_line(error)}") from error
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SegExplainError(
            f"weights file {str(path)!r} is not a plain state dict (torch.load weights_only=True refused it: "
            f"{_one_line(error)}); if it holds a whole pickled model, use --model pickle:{path} with --trust-model-code"
        ) from error
    # Training checkpoints often wrap the state dict: {"state_dict": {...}, "epoch": ...}; MONAI's checkpoint
    # saver writes {"model": {...}, "optimizer": ...}.
    wrapper = next((k for k in ("state_dict", "model") if isinstance(loaded, Mapping)
                    and isinstance(loaded.get(k), Mapping)), None)
    if wrapper is not None:
        loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise SegExplainError(
            f"weights file {str(path)!r} holds a {type(loaded).__name__} that is not a state dict; "
            f"expected a mapping of parameter names to tensors"
        )
    return dict(loaded)


def load_weights(model: nn.Module, weights: str | Path) -> nn.Module:
    """Load a state dict from ``.pt``/``.pth`` (no code runs) or ``.safetensors`` into ``model``, strictly.

    A ``{"state_dict": {...}}`` or ``{"model": {...}}`` (MONAI) checkpoint is unwrapped, and a ``module.`` prefix on
    every key (``DataParallel``) is dropped when the model's keys lack it.

    Args:
        model: The network; its parameters and buffers are overwritten in place.
        weights: The weights file.

    Returns:
        ``model``.

    Raises:
        SegExplainError: The file is missing, of another type, not a state dict, or its keys or shapes differ from
            the model's (the message names the first few).
    """
    path = Path(weights).expanduser()
    state = _read_state_dict(path)
    expected = model.state_dict()
    prefix = "module."
    if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
        state = {k[len(prefix):]: v for k, v in state.items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} in file vs {tuple(expected[k].shape)} in model"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_show_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_show_keys(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatch {_show_keys(wrong_shape)}")
    if problems:
        raise SegExplainError(
            f"weights file {str(path)!r} does not match {type(model).__name__}: {'; '.join(problems)}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except Exception as error:
        raise SegExplainError(f"loading weights file {str(path)!r} failed: {_one_line(error)}") from error
    return model


def load_model(
    spec: str,
    *,
    kwargs: Mapping[str, Any] | None = None,
    weights: str | Path | None = None,
    trust_code: bool = False,
) -> nn.Module:
    """Build the network that ``spec`` names, load ``weights`` into it and return it in eval mode.

    Args:
        spec: ``"reference"``, ``"reference_unet"``, ``"unet3d"``, ``"monai:Name"``, ``"torch.nn:Name"``,
            ``"SegExplainLib.models:Name"``, ``"path/to/file.py:Name"``, ``"package.module:Name"`` or
            ``"pickle:PATH"`` (see the module docstring).
        kwargs: Options passed to the class or factory; not allowed with ``"pickle:"``.
        weights: Optional state dict file (``.pt``, ``.pth`` or ``.safetensors``), loaded strictly; no code runs.
        trust_code: Allow the specs that import or run code of someone else (a model file, another module, a
            pickle; see :func:`untrusted_code`). Set it only on the word of the person running the program, never
            from a model card.

    Returns:
        The model, on the CPU, in eval mode.

    Raises:
        SegExplainError: The spec matches no form or would run code without ``trust_code``, a file, module or
            attribute is missing, the factory fails or returns no ``nn.Module``, MONAI is missing, or the weights
            do not fit.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SegExplainError(f"model spec must be a non-empty string, got {spec!r}; expected one of {_SPEC_FORMS}")
    options = _check_kwargs(kwargs, "kwargs")
    if not isinstance(trust_code, bool):
        raise SegExplainError(f"trust_code must be True or False, got {trust_code!r}")
    if weights is not None and not isinstance(weights, (str, Path)):
        raise SegExplainError(f"weights must be a path to a {', '.join(WEIGHT_SUFFIXES)} file, got {weights!r}")
    model = _build_model(spec, options, trust_code=trust_code)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


# --------------------------------------------------------------------------------------------------- normalization


def _check_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SegExplainError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _check_norm_spec(spec: Any, where: str) -> dict[str, Any]:
    """Validate one normalization spec and return it with defaults filled in."""
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise SegExplainError(f"{where} must be a mapping with a 'kind' ({', '.join(NORMALIZATION_KINDS)}), got {spec!r}")
    kind = spec["kind"]
    if kind not in NORMALIZATION_KINDS:
        raise SegExplainError(f"{where} kind must be one of {', '.join(NORMALIZATION_KINDS)}, got {kind!r}")
    allowed = {"kind", "low", "high"} if kind in ("percentile", "window") else {"kind"}
    unknown = sorted(str(k) for k in spec if k not in allowed)
    if unknown:
        raise SegExplainError(
            f"{where} of kind {kind!r} has unknown key(s) {', '.join(unknown)}; expected only {', '.join(sorted(allowed))}"
        )
    if kind == "percentile":
        low = _check_number(spec.get("low", 0.5), f"{where} low")
        high = _check_number(spec.get("high", 99.5), f"{where} high")
        if not 0.0 <= low < high <= 100.0:
            raise SegExplainError(f"{where} percentiles must satisfy 0 <= low < high <= 100, got low={low}, high={high}")
        return {"kind": kind, "low": low, "high": high}
    if kind == "window":
        if "low" not in spec or "high" not in spec:
            raise SegExplainError(f"{where} of kind 'window' needs both low and high, got {dict(spec)!r}")
        low = _check_number(spec["low"], f"{where} low")
        high = _check_number(spec["high"], f"{where} high")
        if not low < high:
            raise SegExplainError(f"{where} window must satisfy low < high, got low={low}, high={high}")
        return {"kind": kind, "low": low, "high": high}
    return {"kind": kind}


def _check_normalization(specs: Any, where: str) -> dict[str, Any] | list[dict[str, Any]]:
    if isinstance(specs, Mapping):
        return _check_norm_spec(specs, where)
    if isinstance(specs, (list, tuple)) and specs:
        return [_check_norm_spec(s, f"{where}[{i}]") for i, s in enumerate(specs)]
    raise SegExplainError(f"{where} must be one spec or a non-empty list of per-channel specs, got {specs!r}")


def _scale(channel: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:  # a constant channel: nothing to scale
        return np.zeros_like(channel)
    return (np.clip(channel, low, high) - low) / (high - low)


def normalize(image: np.ndarray, specs: Mapping[str, Any] | list[Mapping[str, Any]]) -> np.ndarray:
    """Normalize every channel of ``image`` by its spec.

    Kinds: ``{"kind": "zscore"}`` gives ``(x - mean) / std`` (zeros for a constant channel);
    ``{"kind": "percentile", "low": 0.5, "high": 99.5}`` clips to the channel's ``low``/``high`` percentiles and
    scales that range to ``[0, 1]`` (the defaults are 0.5 and 99.5); ``{"kind": "window", "low": L, "high": H}``
    clips to ``[L, H]`` and scales to ``[0, 1]``; ``{"kind": "none"}`` leaves the values as they are.

    Args:
        image: ``(C, *spatial)``, e.g. ``(C, D, H, W)``, one channel per MRI sequence; finite values.
        specs: One spec for every channel, or a list of ``C`` specs.

    Returns:
        A new array of ``image``'s shape; float arrays keep their dtype, other dtypes become float32.

    Raises:
        SegExplainError: ``image`` is not an array of at least 2 axes, has non-finite values, or the specs are
            invalid or not one per channel.
    """
    if not isinstance(image, np.ndarray) or image.ndim < 2:
        raise SegExplainError(
            f"image must be a numpy array (C, D, H, W), got {type(image).__name__} "
            f"{getattr(image, 'shape', '')}".rstrip()
        )
    if not (np.issubdtype(image.dtype, np.number) and not np.issubdtype(image.dtype, np.complexfloating)):
        raise SegExplainError(f"image must hold real numbers, got dtype {image.dtype}")
    checked = _check_normalization(specs, "normalization")
    per_channel = checked if isinstance(checked, list) else [checked] * image.shape[0]
    if len(per_channel) != image.shape[0]:
        raise SegExplainError(
            f"normalization lists {len(per_channel)} specs but the image has {image.shape[0]} channels; expected one per channel"
        )
    out_dtype = image.dtype if np.issubdtype(image.dtype, np.floating) else np.dtype(np.float32)
    out = np.empty(image.shape, dtype=out_dtype)
    for c, spec in enumerate(per_channel):
        x = image[c].astype(np.float64)
        if not np.isfinite(x).all():
            raise SegExplainError(f"image channel {c} has NaN or infinite values; expected finite intensities")
        kind = spec["kind"]
        if kind == "zscore":
            std = x.std()
            y = (x - x.mean()) / std if std > 0 else np.zeros_like(x)
        elif kind == "percentile":
            low, high = np.percentile(x, [spec["low"], spec["high"]])
            y = _scale(x, float(low), float(high))
        elif kind == "window":
            y = _scale(x, spec["low"], spec["high"])
        else:
            y = x
        out[c] = y
    return out


# --------------------------------------------------------------------------------------------------- model card

_CARD_REQUIRED = ("model", "sequences", "classes")
_CARD_FIELDS = (
    "model", "kwargs", "weights", "sequences", "classes", "normalization", "patch_size", "name", "description",
)
#: Read from older cards and ignored: a card cannot allow code to run (only :meth:`ModelCard.load_model`'s caller can).
_IGNORED_CARD_FIELDS = ("trust_pickle",)


def _check_names(value: Any, where: str) -> list[str]:
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(v, str) and v.strip() for v in value)
    ):
        raise SegExplainError(f"{where} must be a non-empty list of non-empty strings, got {value!r}")
    duplicates = sorted({v for v in value if list(value).count(v) > 1})
    if duplicates:
        raise SegExplainError(f"{where} must not repeat names, got {', '.join(duplicates)} more than once")
    return list(value)


def _check_patch_size(value: Any, where: str) -> tuple[int, int, int] | None:
    if value is None:
        return None
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        raise SegExplainError(f"{where} must be 3 ints >= 1 (D, H, W) or null, got {value!r}")
    return (value[0], value[1], value[2])


def _is_file_spec(spec: str) -> bool:
    if spec.startswith("pickle:"):
        return True
    left, colon, _ = spec.rpartition(":")
    return bool(colon) and left.lower().endswith(".py")


def _rebase_spec(spec: str, folder: Path) -> str:
    """Make the file of a ``file.py:Name`` or ``pickle:PATH`` spec relative to ``folder`` (the card's)."""
    if spec.startswith("pickle:"):
        path = Path(spec[len("pickle:"):]).expanduser()
        return spec if path.is_absolute() or not str(path) else f"pickle:{folder / path}"
    left, _, name = spec.rpartition(":")
    path = Path(left).expanduser()
    return spec if path.is_absolute() else f"{folder / path}:{name}"


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to run a segmentation network on a case: spec, options, weights, inputs and outputs.

    Attributes:
        model: Model spec string for :func:`load_model`.
        kwargs: Options for the model's class or factory.
        weights: State dict file, or None (e.g. for a pickled model or an untrained network).
        sequences: Names of the MRI sequences, one per input channel, in channel order (e.g. ``["T2", "T1"]``).
        classes: Names of the output classes, one per logit channel (e.g. ``["background", "lesion"]``).
        normalization: One normalization spec for all channels, or a list of one per sequence (see
            :func:`normalize`), with defaults filled in.
        patch_size: Spatial patch size ``(D, H, W)`` the network was trained on, or None.
        name: Short name of the model.
        description: Free text.
    """

    model: str
    sequences: list[str]
    classes: list[str]
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: Path | None = None
    normalization: dict[str, Any] | list[dict[str, Any]] = field(default_factory=lambda: {"kind": "none"})
    patch_size: tuple[int, int, int] | None = None
    name: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        values = self._validated(
            {name: getattr(self, name) for name in _CARD_FIELDS}, source="ModelCard"
        )
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @staticmethod
    def _validated(data: Mapping[str, Any], *, source: str) -> dict[str, Any]:
        def where(name: str) -> str:
            return f"{source}: field {name!r}"

        model = data["model"]
        if not isinstance(model, str) or not model.strip():
            raise SegExplainError(f"{where('model')} must be a non-empty model spec string, got {model!r}")
        weights = data.get("weights")
        if weights is not None and not (isinstance(weights, (str, Path)) and str(weights).strip()):
            raise SegExplainError(f"{where('weights')} must be a path string or null, got {weights!r}")
        sequences = _check_names(data["sequences"], where("sequences"))
        normalization = _check_normalization(data.get("normalization", {"kind": "none"}), where("normalization"))
        if isinstance(normalization, list) and len(normalization) != len(sequences):
            raise SegExplainError(
                f"{where('normalization')} lists {len(normalization)} specs for {len(sequences)} sequences; "
                f"expected one spec, or one per sequence"
            )
        for text in ("name", "description"):
            if not isinstance(data.get(text, ""), str):
                raise SegExplainError(f"{where(text)} must be a string, got {data[text]!r}")
        return {
            "model": model,
            "kwargs": _check_kwargs(data.get("kwargs"), where("kwargs")),
            "weights": None if weights is None else Path(weights),
            "sequences": sequences,
            "classes": _check_names(data["classes"], where("classes")),
            "normalization": normalization,
            "patch_size": _check_patch_size(data.get("patch_size"), where("patch_size")),
            "name": data.get("name", ""),
            "description": data.get("description", ""),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: str | Path | None = None, source: str = "model card"
                  ) -> ModelCard:
        """Build a card from parsed YAML/JSON.

        A ``trust_pickle`` field (older cards have it) is ignored: whoever loads the card decides whether its code
        may run (:meth:`load_model`).

        Args:
            data: The card's fields; ``model``, ``sequences`` and ``classes`` are required.
            base_dir: Folder that relative ``weights`` and model file paths are relative to (the card's folder).
            source: Named in error messages (the card file).

        Raises:
            SegExplainError: A field is missing, unknown or invalid; the message names the field and ``source``.
        """
        if not isinstance(data, Mapping):
            raise SegExplainError(f"{source} must hold a mapping of fields, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k not in _IGNORED_CARD_FIELDS}
        unknown = sorted(str(k) for k in data if k not in _CARD_FIELDS)
        if unknown:
            raise SegExplainError(
                f"{source} has unknown field(s) {', '.join(unknown)}; expected any of {', '.join(_CARD_FIELDS)}"
            )
        missing = [k for k in _CARD_REQUIRED if k not in data]
        if missing:
            raise SegExplainError(f"{source} lacks required field(s) {', '.join(missing)}")
        values = cls._validated(data, source=source)
        if base_dir is not None:
            folder = Path(base_dir).expanduser().resolve()
            if values["weights"] is not None and not values["weights"].expanduser().is_absolute():
                values["weights"] = (folder / values["weights"].expanduser()).resolve()
            if _is_file_spec(values["model"]):
                values["model"] = _rebase_spec(values["model"], folder)
        return cls(**values)

    @classmethod
    def read(cls, path: str | Path) -> ModelCard:
        """Read a card from YAML (``.yaml``/``.yml``) or JSON (``.json``).

        Relative ``weights`` and model file paths are relative to the card's folder; ``name`` defaults to the
        file name without extension.

        Raises:
            SegExplainError: The file is missing, of another type, unparsable, or a field is invalid; the message
                names the file and the field.
        """
        card_path = Path(path).expanduser()
        suffix = _existing_file(card_path, "model card", CARD_SUFFIXES)
        text = card_path.read_text(encoding="utf-8")
        try:
            if suffix == ".json":
                data = json.loads(text)
            else:
                try:
                    import yaml
                except ImportError as error:
                    raise SegExplainError(
                        f"model card {str(card_path)!r} needs the package PyYAML, which is not installed; "
                        f"install it with pip install pyyaml, or write the card as JSON"
                    ) from error
                data = yaml.safe_load(text)
        except SegExplainError:
            raise
        except Exception as error:
            raise SegExplainError(f"model card {str(card_path)!r} cannot be parsed: {_one_line(error)}") from error
        source = f"model card {str(card_path)!r}"
        if isinstance(data, Mapping) and "name" not in data:
            data = {**data, "name": card_path.name[: -len(card_path.suffix)]}
        return cls.from_dict(data, base_dir=card_path.parent, source=source)

    def load_model(self, *, trust_code: bool = False) -> nn.Module:
        """The card's network with its weights, in eval mode (see :func:`load_model`).

        Args:
            trust_code: Allow a model that imports or runs code of someone else (a model file, another module, a
                pickle): the word of the person running the program, such as ``--trust-model-code``.
        """
        return load_model(self.model, kwargs=self.kwargs, weights=self.weights, trust_code=trust_code)

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """Normalize ``image`` ``(C, D, H, W)``, one channel per sequence of the card, by the card's normalization.

        Raises:
            SegExplainError: The channel count differs from the card's sequences, or see :func:`normalize`.
        """
        if isinstance(image, np.ndarray) and image.ndim >= 1 and image.shape[0] != len(self.sequences):
            raise SegExplainError(
                f"image has {image.shape[0]} channels but model card {self.name or self.model!r} lists "
                f"{len(self.sequences)} sequences ({', '.join(self.sequences)}); expected one channel per sequence"
            )
        return normalize(image, self.normalization)

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-friendly fields; ``ModelCard.from_dict(card.to_dict())`` gives an equal card."""
        return {
            "model": self.model,
            "kwargs": dict(self.kwargs),
            "weights": None if self.weights is None else str(self.weights),
            "sequences": list(self.sequences),
            "classes": list(self.classes),
            "normalization": (
                [dict(s) for s in self.normalization]
                if isinstance(self.normalization, list)
                else dict(self.normalization)
            ),
            "patch_size": None if self.patch_size is None else list(self.patch_size),
            "name": self.name,
            "description": self.description,
        }
