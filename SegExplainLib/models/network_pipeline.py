"""Model cards and model specs as pipelines: a network that sees the case on the image grid.

A model card names a network, its weights, its sequences and classes and the intensity normalization of each
sequence; a model spec (``"reference"``, ``"monai:UNet"``, ``"file.py:Class"``...) names only the network. Either
opens as a :class:`NetworkPipeline`: ``prepare`` normalizes the case as the card says (a spec's input is the image as
read) and the network runs on the image grid, by overlapping windows (:class:`~SegExplainLib.models.sliding.
SlidingWindow`) when it was trained on patches. Nothing lies between the grids, so :func:`~SegExplainLib.models.
pipelines.explain_case` gives the record :func:`~SegExplainLib.engine.api.explain` gives.

A card or spec that would import or run code of someone else is refused while it is opened, before anything of it
is imported, unless ``trust_code`` (the user's word, ``--trust-model-code``); a card cannot allow this itself.

Example:
    >>> pipeline = open_card("models/prostate.yaml")
    >>> result = explain_case(pipeline, image, geometry, VoxelTarget((12, 80, 75), class_index=1), "lrp")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..errors import SegExplainError
from .loading import ModelCard, load_model, refuse_untrusted_code
from .protocol import Pipeline, PreparedCase
from .sliding import SlidingWindow

__all__ = ["NetworkPipeline", "open_card", "open_spec", "read_sequence_names"]

#: What the refusal of a card's or spec's code adds: the way to allow it.
CODE_ADVICE = "; pass --trust-model-code only if you trust it (a model card cannot allow this itself)"


class NetworkPipeline(Pipeline):
    """A network on the image grid, with a model card's normalization or none.

    Attributes:
        kind: ``"card"`` or ``"spec"``.
        model: The network as it runs: in a :class:`SlidingWindow` when a patch size was given or the card has one.
        card: The model card, or None for a spec.
        sequences: The card's sequences; empty for a spec (any number of channels).
        classes: The card's classes; empty for a spec.
    """

    def __init__(self, kind: str, source: str, model: nn.Module, *, card: ModelCard | None,
                 weights: str | None) -> None:
        self.kind, self.source, self.model, self.card, self.weights = kind, source, model, card, weights
        self.sequences = list(card.sequences) if card else []
        self.classes = list(card.classes) if card else []
        self.normalized_input = card is not None
        self.sliding_window = ({"patch_size": list(model.patch_size), "overlap": model.overlap}
                               if isinstance(model, SlidingWindow) else None)

    def prepare(self, image: np.ndarray, geometry: Any) -> PreparedCase:
        """The case normalized as the card says (as read for a spec), on the image grid."""
        image = np.asarray(image)
        model_input = self.card.normalize(image) if self.card else image
        return PreparedCase(self.model, model_input, np.copy, np.copy, on_image_grid=True)

    def describe(self) -> dict[str, Any]:
        """``{"spec", "weights", "card"}``: the card file or spec as given, the weights given, the card's fields."""
        return {"spec": self.source, "weights": self.weights, "card": self.card.to_dict() if self.card else None}


def read_sequence_names(path: str | Path) -> list[str]:
    """The sequences a model card lists, without building its network.

    Raises:
        SegExplainError: ``path`` is no file, no valid card, or the card lists no sequences.
    """
    if not Path(path).is_file():
        raise SegExplainError(f"model card {str(path)!r} is not a file")
    sequences = list(ModelCard.read(path).sequences or [])
    if not sequences:
        raise SegExplainError(f"model card {str(path)!r} lists no sequences")
    return [str(name) for name in sequences]


def _windowed(model: nn.Module, patch_size: Sequence[int] | None, overlap: float) -> nn.Module:
    # a network trained on patches runs (and is explained) by overlapping windows
    return SlidingWindow(model, patch_size, overlap=overlap) if patch_size else model


def open_card(path: str | Path, *, trust_code: bool = False, patch_size: Sequence[int] | None = None,
              overlap: float = 0.5) -> NetworkPipeline:
    """Open a model card (YAML or JSON) as a pipeline.

    Args:
        path: The card file.
        trust_code: Allow a card whose model imports or runs code of someone else; the user's word only.
        patch_size: Run the network by overlapping windows of this size (default: the card's ``patch_size``).
        overlap: Overlap of the windows.

    Raises:
        SegExplainError: The card is missing or invalid, its model would run code without ``trust_code``
            (``"model card 'PATH' would run ..."``), or the network or its weights cannot be loaded.
    """
    card = ModelCard.read(path)
    refuse_untrusted_code(card.model, f"model card {str(path)!r}", trusted=trust_code, advice=CODE_ADVICE)
    model = _windowed(card.load_model(trust_code=trust_code), patch_size or card.patch_size, overlap)
    return NetworkPipeline("card", str(path), model, card=card, weights=None)


def open_spec(spec: str, *, kwargs: Mapping[str, Any] | None = None, weights: str | Path | None = None,
              trust_code: bool = False, patch_size: Sequence[int] | None = None,
              overlap: float = 0.5) -> NetworkPipeline:
    """Open a model spec (see :func:`~SegExplainLib.models.loading.load_model`) with its weights as a pipeline.

    Args:
        spec: E.g. ``"reference"``, ``"monai:UNet"`` or ``"nets/unet.py:UNet"``.
        kwargs: Keyword arguments of the network's class or factory.
        weights: A state dict file, or None.
        trust_code: Allow a spec that imports or runs code of someone else; the user's word only.
        patch_size: Run the network by overlapping windows of this size, or None.
        overlap: Overlap of the windows.

    Raises:
        SegExplainError: The spec would run code without ``trust_code`` (``"--model 'SPEC' would run ..."``), or
            the network or its weights cannot be loaded.
    """
    refuse_untrusted_code(spec, f"--model {spec!r}", trusted=trust_code, advice=CODE_ADVICE)
    model = _windowed(load_model(spec, kwargs=kwargs, weights=weights, trust_code=trust_code), patch_size, overlap)
    return NetworkPipeline("spec", spec, model, card=None, weights=None if weights is None else str(weights))
