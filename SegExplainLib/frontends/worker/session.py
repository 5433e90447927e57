"""The warm session: a model opened once and the current case prepared once, in this process.

The worker's child serves one (:mod:`.serving`), and so does each Ray actor of ``segexplain cohort --workers``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from ...application.model_source import ModelSource
from ...application.requests import EvaluationRequest, ExplainRequest
from ...errors import SegExplainError


class WarmSession:
    """A model opened once, and the current case prepared once, in this process.

    Args:
        model: The model, e.g. ``ModelSource("card", "prostate.yaml")`` or ``ModelSource("nnunet",
            "Dataset004_Hippocampus", folds="0 1")``, with the user's word on its code (``trust_code``).

    Raises:
        SegExplainError: As ``segexplain explain`` for the same model (missing files, untrusted code...).
    """

    def __init__(self, model: ModelSource) -> None:
        from ...application.opening import open_model

        if not isinstance(model, ModelSource):
            raise SegExplainError(f"model must be a ModelSource, got {model!r}")
        self.source = model
        self.pipeline = open_model(model)
        self.sequences = list(self.pipeline.sequences)
        self.description = self.pipeline.describe()
        #: The pipeline's cheaper stand-in for a first answer (:meth:`Pipeline.preview`), or None.
        self.preview = self.pipeline.preview()
        self.image = self.geometry = self.prepared = self.preview_prepared = None

    def set_case(self, image: np.ndarray, geometry: Any) -> dict[str, Any]:
        """Make ``image`` (C, D, H, W) on ``geometry`` the current case: preprocess it and predict the whole volume.

        Returns:
            What was prepared: ``{"shape", "network_shape", "seconds"}``.
        """
        import torch

        started = time.perf_counter()
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 4 or (self.sequences and image.shape[0] != len(self.sequences)):
            raise SegExplainError(f"image has shape {image.shape}; expected (C, D, H, W) with one channel per sequence "
                                  f"of the model ({', '.join(self.sequences) or 'any'})")
        prepared = self.pipeline.prepare(image, geometry)
        # the preview prepares cases as its pipeline does: the same case with its cheaper model
        preview_prepared = replace(prepared, model=self.preview.model) if self.preview else None
        for model in (prepared.model, preview_prepared.model if preview_prepared else None):
            whole_volume = getattr(model, "whole_volume", None)
            if whole_volume is not None:  # kept by the sliding window for the predicted region of every click
                with torch.no_grad():
                    whole_volume(torch.as_tensor(prepared.input)[None])
        self.image, self.geometry, self.prepared, self.preview_prepared = image, geometry, prepared, preview_prepared
        return {"shape": list(image.shape), "network_shape": list(prepared.input.shape),
                "seconds": time.perf_counter() - started}

    def explain(self, request: ExplainRequest, *, mask: np.ndarray | None = None, preview: bool = False):
        """Explain a region of the current case.

        Args:
            request: The region and method, e.g. ``ExplainRequest(voxel=(9, 24, 24), method="integrated_gradients",
                n_steps=32)``.
            mask: A segment (D, H, W) on the case's grid, instead of the request's region.
            preview: Explain the model's cheaper stand-in (:attr:`preview`) instead of the model.

        Returns:
            The :class:`~SegExplainLib.engine.explanation.Explanation`, maps on the case's grid.
        """
        import torch

        from ...models.pipelines import explain_case

        self._check_ready(request, ExplainRequest)
        if preview and self.preview is None:
            raise SegExplainError("this model has no preview (it is one network pass per window already)")
        target = request.target(self.geometry, self._checked_mask(mask))
        torch.manual_seed(request.seed)
        pipeline, prepared = (self.preview, self.preview_prepared) if preview else (self.pipeline, self.prepared)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # each warning is in the result's record
            return explain_case(pipeline, self.image, self.geometry, target, request.method, prepared=prepared,
                                **request.engine_options())

    def segment_matrix(self, request: ExplainRequest, *, labels: np.ndarray | None = None):
        """The segment x segment matrix of the current case with the request's method and options (its region is
        not used: every predicted segment is explained).

        Args:
            request: The method and its options, the device and the seed.
            labels: A label map (D, H, W) on the case's grid whose segments are the columns; None: the prediction's.

        Returns:
            The :class:`~SegExplainLib.engine.segments.SegmentMatrix`.
        """
        import torch

        from ...models.pipelines import segment_matrix_case

        self._check_ready(request, ExplainRequest)
        torch.manual_seed(request.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # each warning is in the explanations' records
            return segment_matrix_case(self.pipeline, self.image, self.geometry, request.method, segmentation=labels,
                                       prepared=self.prepared, device=request.device, **request.method_options())

    def evaluate(self, request: EvaluationRequest, *, mask: np.ndarray | None = None,
                 progress: Callable[[str, float], None] | None = None):
        """The scorecard of the request's methods on the current case and region, as ``segexplain evaluate`` scores
        them: on the network's own grid, through the model the pipeline deploys.

        Args:
            request: The region, the methods and the scoring options.
            mask: A segment (D, H, W) on the case's grid, instead of the request's region.
            progress: Told each step's name and the fraction done (:func:`~SegExplainLib.engine.evaluation.evaluate`).

        Returns:
            The :class:`~SegExplainLib.engine.evaluation.Scorecard`.
        """
        from ...application.evaluation import score_case

        self._check_ready(request, EvaluationRequest)
        for method in request.methods:
            self.pipeline.check_method(method)
        target = request.request.target(self.geometry, self._checked_mask(mask))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # each warning is in the scorecard's rows
            return score_case(self.pipeline, self.prepared, self.image.shape[1:], target, request.methods,
                              seed=request.request.seed, sequence_names=self.sequences or None,
                              options=request.evaluation_options(), progress=progress)

    def shown(self, *, preview: bool) -> dict[str, Any]:
        """What an answer's record says it shows, for a model that has a preview: ``{"preview": True, "ensemble":
        "preview: fold 0 without mirroring, of 2 folds (0, 1) x 8 mirrorings"}``, or the exact ensemble with
        ``"preview": False``; nothing for a model without one."""
        if self.preview is None:
            return {}
        exact = self.description.get("ensemble", self.pipeline.kind)
        if not preview:
            return {"preview": False, "ensemble": exact}
        return {"preview": True, "ensemble": f"preview: {self.preview.describe().get('ensemble', 'cheaper model')}, "
                                             f"of {exact}"}

    def _check_ready(self, request: Any, kind: type) -> None:
        """Refuse a request of another type than ``kind``, or any before the first case."""
        if not isinstance(request, kind):
            raise SegExplainError(f"request must be an {kind.__name__}, got {request!r}")
        if self.prepared is None:
            raise SegExplainError("no case yet: call set_case first")

    def _checked_mask(self, mask: np.ndarray | None) -> np.ndarray | None:
        if mask is None:
            return None
        mask = np.asarray(mask, bool)
        if mask.shape != self.image.shape[1:]:
            raise SegExplainError(f"mask has shape {mask.shape}; expected the case's grid {self.image.shape[1:]}")
        return mask
