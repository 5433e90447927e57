"""Opening the model a :class:`~SegExplainLib.application.model_source.ModelSource` names: one function for all.

``segexplain explain`` (:func:`~SegExplainLib.application.case_run.run_case`), the warm worker's session and the Ray
cohort's actors open their model with :func:`open_model`: a
:class:`~SegExplainLib.models.protocol.Pipeline` whatever the kind (a model card or spec, an nnU-Net results folder,
a MONAI bundle), explained with :func:`~SegExplainLib.models.pipelines.explain_case`.
"""

from __future__ import annotations

from typing import Any

from .model_source import ModelSource


def open_model(source: ModelSource):
    """Open the model ``source`` names as a pipeline, refusing code of someone else unless ``source.trust_code``.

    Raises:
        SegExplainError: A missing or broken file, a model that would run code without the user's word.
    """
    from ..models.pipelines import open_pipeline

    options: dict[str, Any] = {"trust_code": source.trust_code}
    if source.kind in ("card", "spec"):
        options.update(patch_size=source.patch_size, overlap=source.overlap)
    if source.kind == "spec":
        options.update(kwargs=source.kwargs, weights=source.weights)
    if source.kind == "nnunet":
        options.update(configuration=source.configuration or None, checkpoint=source.checkpoint,
                       mirroring=source.mirroring,
                       folds=[fold if fold == "all" else int(fold) for fold in source.folds] or None)
    return open_pipeline(source.kind, source.spec if source.kind == "spec" else source.location, **options)


def model_fields(pipeline: Any) -> dict[str, Any]:
    """The model's entries of ``summary.json``: the pipeline's description, whether its input was normalized, its
    sliding window."""
    return {"model": pipeline.describe(), "normalized_input": pipeline.normalized_input,
            "sliding_window": pipeline.sliding_window}
