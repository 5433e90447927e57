"""Opening the model a :class:`~SegExplainLib.application.model_source.ModelSource` names: one function for all.

``segexplain explain`` (:func:`~SegExplainLib.application.case_run.run_case`), the warm worker's session and the Ray
cohort's actors open their model with :func:`open_model` and explain through the :class:`OpenedModel` it returns,
whatever the kind: a model card or spec (a network, run by overlapping windows when it has a patch size) or a
pipeline (an nnU-Net results folder, a MONAI bundle) with its own preprocessing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .model_source import TRUST_ADVICE, ModelSource


@dataclasses.dataclass
class OpenedModel:
    """A model ready to explain cases.

    Attributes:
        source: What was opened.
        pipeline: The pipeline of an nnU-Net folder or bundle, else None.
        network: The network of a card or spec (in its sliding window when it has a patch size), else None.
        card: The model card, else None.
    """

    source: ModelSource
    pipeline: Any = None
    network: Any = None
    card: Any = None

    @property
    def sequences(self) -> list[str]:
        """The model's input sequences (empty when it names none: a spec)."""
        return list(self.pipeline.sequences if self.pipeline else self.card.sequences if self.card else [])

    def description(self) -> dict[str, Any]:
        """What ``summary.json`` says of the model: the pipeline's description, or the spec, weights and card."""
        if self.pipeline:
            return self.pipeline.describe()
        spec = self.source.location if self.card else self.source.spec
        return {"spec": spec, "weights": self.source.weights, "card": self.card.to_dict() if self.card else None}

    def fields(self) -> dict[str, Any]:
        """The model's entries of ``summary.json``: its description, whether the input was normalized, its
        sliding window."""
        window = self.network if hasattr(self.network, "patch_size") else None
        sliding = {"patch_size": list(window.patch_size), "overlap": window.overlap} if window else None
        return {"model": self.description(), "normalized_input": self.card is not None or self.pipeline is not None,
                "sliding_window": sliding}

    def preview(self) -> OpenedModel | None:
        """The pipeline's cheaper stand-in for a first answer (:meth:`Pipeline.preview`), or None."""
        preview = self.pipeline.preview() if self.pipeline else None
        return OpenedModel(self.source, pipeline=preview) if preview else None

    def prepare(self, image: np.ndarray, geometry: Any):
        """The case (C, D, H, W) as the network sees it: a :class:`~SegExplainLib.models.pipelines.PreparedCase`."""
        from ..models.pipelines import PreparedCase

        if self.pipeline:
            return self.pipeline.prepare(image, geometry)
        model_input = self.card.normalize(image) if self.card else image
        return PreparedCase(self.network, np.ascontiguousarray(model_input, np.float32), np.copy, np.copy)

    def explain(self, image: np.ndarray, geometry: Any, target: Any, method: str, *, prepared: Any = None,
                **options: Any):
        """Explain ``target`` of the case ``image`` on ``geometry``; the maps come back on the case's grid.

        Args:
            image: The case as read (C, D, H, W).
            geometry: Its grid.
            target: The engine's target on the case's grid.
            method: The engine's method.
            prepared: The case prepared earlier by :meth:`prepare` (reused across clicks), or None.
            **options: As for :func:`~SegExplainLib.engine.api.explain`.
        """
        from ..engine.api import explain
        from ..models.pipelines import explain_case

        if self.pipeline:
            return explain_case(self.pipeline, image, geometry, target, method, prepared=prepared, **options)
        prepared = prepared or self.prepare(image, geometry)
        return explain(prepared.model, prepared.input, target, method, **options)


def open_model(source: ModelSource) -> OpenedModel:
    """Open the model ``source`` names, refusing code of someone else unless ``source.trust_code``.

    Raises:
        SegExplainError: A missing or broken file, a model that would run code without the user's word.
    """
    from ..models.loading import ModelCard, load_model, refuse_untrusted_code
    from ..models.pipelines import open_pipeline
    from ..models.sliding import SlidingWindow

    trust = source.trust_code
    if source.kind == "nnunet":
        folds = [fold if fold == "all" else int(fold) for fold in source.folds] or None
        return OpenedModel(source, pipeline=open_pipeline(
            "nnunet", source.path, configuration=source.configuration or None, folds=folds,
            checkpoint=source.checkpoint, mirroring=source.mirroring, trust_code=trust))
    if source.kind == "bundle":
        return OpenedModel(source, pipeline=open_pipeline("bundle", source.path, trust_code=trust))
    card = ModelCard.read(source.location) if source.kind == "card" else None
    refuse_untrusted_code(card.model if card else source.spec,
                          f"model card {source.location!r}" if card else f"--model {source.spec!r}", trusted=trust,
                          advice=TRUST_ADVICE)
    if card:
        network = card.load_model(trust_code=trust)
    else:
        network = load_model(source.spec, kwargs=source.kwargs, weights=source.weights, trust_code=trust)
    patch_size = source.patch_size or (card.patch_size if card else None)
    if patch_size:  # a network trained on patches runs (and is explained) by overlapping windows
        network = SlidingWindow(network, patch_size, overlap=source.overlap)
    return OpenedModel(source, network=network, card=card)
