"""Model specs: which network a spec string names, what code it would run, and building it."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import SegExplainError
from ..allowlist import OTHER_CODE_CLASSES, TRUST_ADVICE
from .checks import check_kwargs, one_line
from .weights import WEIGHT_SUFFIXES, load_weights

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
        raise SegExplainError(f"importing model file {str(path)!r} failed: {one_line(error)}") from error
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
        raise SegExplainError(f"importing module {module_name!r} of spec {spec!r} failed: {one_line(error)}") from error


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
        raise SegExplainError(f"building model {spec!r} with kwargs {kwargs!r} failed: {one_line(error)}") from error
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
        raise SegExplainError(f"unpickling model file {str(path)!r} failed: {one_line(error)}") from error
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
    from .. import networks as models  # late: keeps import of this module cheap and avoids cycles

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
    options = check_kwargs(kwargs, "kwargs")
    if not isinstance(trust_code, bool):
        raise SegExplainError(f"trust_code must be True or False, got {trust_code!r}")
    if weights is not None and not isinstance(weights, (str, Path)):
        raise SegExplainError(f"weights must be a path to a {', '.join(WEIGHT_SUFFIXES)} file, got {weights!r}")
    model = _build_model(spec, options, trust_code=trust_code)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()
