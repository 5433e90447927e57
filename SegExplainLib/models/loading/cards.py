"""Model cards: a YAML or JSON file with the spec, its options, weights, sequences, classes and normalization."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ...errors import SegExplainError
from .checks import check_kwargs, existing_file, one_line
from .normalization import check_normalization, normalize
from .specs import load_model

#: Model card file extensions that :meth:`ModelCard.read` reads.
CARD_SUFFIXES = (".yaml", ".yml", ".json")

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
        normalization = check_normalization(data.get("normalization", {"kind": "none"}), where("normalization"))
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
            "kwargs": check_kwargs(data.get("kwargs"), where("kwargs")),
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
        suffix = existing_file(card_path, "model card", CARD_SUFFIXES)
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
            raise SegExplainError(f"model card {str(card_path)!r} cannot be parsed: {one_line(error)}") from error
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
