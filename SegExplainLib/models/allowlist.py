"""Names that a model file may give, resolved by SegExplain itself against an exact allow-list of objects.

A model file from a stranger (``plans.json`` of nnU-Net, a MONAI bundle's configuration) names classes and functions
as strings. Letting a library resolve such a string (``pydoc.locate``, MONAI's component locator) walks attributes
freely: ``torch.nn.functional.torch.hub.os.system`` starts with ``torch.nn.`` and ends at ``os.system``. An
:class:`AllowList` never walks: a name resolves only when it is, letter for letter, one of the names the table was
built with, and every object in the table was put there on purpose (compared by identity, not by name). The library
is then handed the object, not the string.

Example:
    >>> import torch.nn as nn
    >>> layers = AllowList.of_modules("PyTorch layer classes", [nn], keep=lambda o: o is nn.Conv3d)
    >>> layers.resolve("torch.nn.Conv3d", source="plans.json of 'Dataset004'", field="conv_op") is nn.Conv3d
    True
    >>> layers.resolve("torch.nn.functional.torch.hub.os.system", source="plans.json", field="nonlin")
    Traceback (most recent call last):
    SegExplainError: plans.json names nonlin 'torch.nn.functional.torch.hub.os.system', which is not one of ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any

from ..errors import SegExplainError

__all__ = ["AllowList", "OTHER_CODE_CLASSES", "TRUST_ADVICE"]

#: What every refusal of a name adds: the way to run the model's code all the same.
TRUST_ADVICE = "pass --trust-model-code (trust_code=True in Python) only if you trust this model's code"
#: MONAI transforms and networks that read or write files, or look a name up in another library by themselves
#: (TorchVision's, TorchIO's, cuCIM's transforms, a torchvision model by name): never built from a model card or a
#: bundle without the flag, although they are MONAI's own classes.
OTHER_CODE_CLASSES = frozenset({
    "SaveImage", "SaveImaged", "WriteFileMapping", "WriteFileMappingd", "SaveClassificationd", "CuCIM", "CuCIMd",
    "RandCuCIM", "RandCuCIMd", "TorchVision", "TorchVisiond", "RandTorchVision", "RandTorchVisiond", "TorchIO",
    "TorchIOd", "RandTorchIO", "RandTorchIOd", "TorchVisionFCModel", "MILModel"})


class AllowList:
    """An exact table from names to the objects a model file may name.

    Args:
        what: What the objects are, for messages, e.g. ``"PyTorch layer classes"``.
        names: Each allowed name and its object.
    """

    def __init__(self, what: str, names: Mapping[str, Any]) -> None:
        self.what = what
        self._names = dict(names)
        self._objects = {id(obj): obj for obj in self._names.values()}

    @classmethod
    def of_modules(cls, what: str, modules: Iterable[ModuleType], *, keep: Callable[[Any], bool]) -> AllowList:
        """Every public attribute of ``modules`` that ``keep`` accepts, under each name it is known by.

        An object is listed under the module it is read from (``torch.nn.Conv3d``) and under the module that
        defines it (``torch.nn.modules.conv.Conv3d``), the two spellings model files use.
        """
        names: dict[str, Any] = {}
        for module in modules:
            for attribute, obj in vars(module).items():
                if attribute.startswith("_") or isinstance(obj, ModuleType) or not keep(obj):
                    continue
                names[f"{module.__name__}.{attribute}"] = obj
                defined_in, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
                if isinstance(defined_in, str) and isinstance(qualname, str):
                    names[f"{defined_in}.{qualname}"] = obj
        return cls(what, names)

    def __or__(self, other: AllowList) -> AllowList:
        return AllowList(f"{self.what} or {other.what}", {**self._names, **other._names})

    def allows(self, obj: Any) -> bool:
        """Whether ``obj`` itself (by identity) is one of the allowed objects."""
        return id(obj) in self._objects and self._objects[id(obj)] is obj

    def names(self) -> list[str]:
        """Every name that resolves, sorted."""
        return sorted(self._names)

    def get(self, name: Any) -> Any | None:
        """The object of ``name``, or None when ``name`` is not exactly one of the allowed names."""
        return self._names.get(name) if isinstance(name, str) else None

    def resolve(self, name: Any, *, source: str, field: str) -> Any:
        """The object of ``name``, or an error naming the file, the field and the name.

        Args:
            name: The name as the model file gives it, e.g. ``"torch.nn.modules.conv.Conv3d"``.
            source: The file, e.g. ``"plans.json of 'nnUNet_results/Dataset004_Hippocampus/...'"``.
            field: The field that gave the name, e.g. ``"arch_kwargs.nonlin"``.

        Raises:
            SegExplainError: ``name`` is not exactly one of the allowed names.
        """
        found = self.get(name)
        if found is None:
            raise SegExplainError(f"{source} names {field} {name!r}, which is not one of the {self.what} SegExplain "
                                  f"allows; loading it could run code of someone else; {TRUST_ADVICE}")
        return found
