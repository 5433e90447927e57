"""A click's quick preview of an nnU-Net ensemble (first fold, no mirroring), then its exact answer, in the warm worker.

On the real model of the session fixture ``nnunet_model`` (``Testing/nnunet_fixture.py``: two folds trained by
nnunetv2, mirroring on three axes). The worker's exact answers use the two folds without mirroring, to stay fast:
its preview is then fold 0 alone; the mirrored ensemble's preview is checked on the explained function.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from test_nnunet import _case

from SegExplainLib.application.model_source import ModelSource
from SegExplainLib.application.requests import ExplainRequest
from SegExplainLib.engine.targets import VoxelTarget
from SegExplainLib.errors import SegExplainError
from SegExplainLib.frontends.worker import WarmSession, Worker
from SegExplainLib.models.nnunet import open_nnunet
from SegExplainLib.models.pipelines import explain_case

GRADIENT = ["--method", "gradient", "--device", "cpu"]


def ask(*words: str, preview: bool = False) -> ExplainRequest:
    """A request from the words of ``segexplain explain``, with the worker's preview choice."""
    return ExplainRequest(**{**ExplainRequest.from_arguments(words).to_json(), "preview": preview})


@pytest.fixture(scope="module")
def case():
    return _case((16, 28, 24))


def test_the_preview_of_the_mirrored_ensemble_is_its_first_fold_without_mirroring(nnunet_model, case):
    """The same windows on the same prepared case, one network pass per window instead of 2 folds x 8 mirrorings;
    each says what it computes. One fold without mirroring has no preview."""
    image, geometry, _ = case
    ensemble = open_nnunet(nnunet_model)
    single = open_nnunet(nnunet_model, folds=(0,), mirroring=False)
    preview = ensemble.preview()
    assert ensemble.ensemble == "2 folds (0, 1) x 8 mirrorings" and ensemble.describe()["ensemble"] == ensemble.ensemble
    assert preview.ensemble == "fold 0 without mirroring" and preview.describe()["folds"] == ["0"]
    assert preview.describe()["mirror_axes"] == [] and ensemble.describe()["mirror_axes"] == [0, 1, 2]
    assert single.preview() is None
    x = torch.as_tensor(ensemble.prepare(image, geometry).input)[None]
    with torch.no_grad():
        expected = single.model(x)
        np.testing.assert_allclose(preview.model(x).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ensemble.model(x), expected, atol=1e-4)  # the preview is not the ensemble


def test_a_click_answers_the_preview_then_the_exact_ensemble(nnunet_model, case):
    """The preview (fold 0's own explanation) comes first as its own event, the exact answer of the same request
    after it; each record says which it is. Without preview a request answers only the exact maps."""
    image, geometry, centre = case
    click = ["--voxel", *(str(v) for v in centre), *GRADIENT]
    target = VoxelTarget(centre, class_index=1)
    fold0 = explain_case(open_nnunet(nnunet_model, folds=(0,), mirroring=False), image, geometry, target, "gradient",
                         device="cpu")
    with Worker(ModelSource("nnunet", str(nnunet_model), folds="0 1", mirroring=False)) as worker:
        worker.start()
        worker.wait(worker.set_case(image, geometry), timeout=300)
        request = worker.explain(ask(*click, preview=True))
        events = []
        while worker.answer(request) is None:
            events += [e["event"] for e in worker.poll(0.5) if e.get("request") == request and "event" in e]
        assert events.index("preview") < events.index("answer")
        preview, exact = worker.preview(request), worker.wait(request)
        np.testing.assert_allclose(preview.maps, fold0.maps, rtol=1e-4, atol=1e-6)
        assert preview.record["preview"] is True and exact.record["preview"] is False
        assert preview.record["ensemble"] == "preview: fold 0 without mirroring, of 2 folds (0, 1) without mirroring"
        assert exact.record["ensemble"] == "2 folds (0, 1) without mirroring"
        assert preview.record["extras"]["pipeline"]["folds"] == ["0"]
        assert exact.record["extras"]["pipeline"]["folds"] == ["0", "1"]
        assert not np.allclose(preview.maps, exact.maps)

        without = worker.explain(ask(*click))  # preview off: the default of a request
        answer = worker.wait(without)
        assert worker.preview(without) is None and answer.record["preview"] is False
        np.testing.assert_array_equal(answer.maps, exact.maps)


def test_cancel_during_the_refinement_keeps_the_preview_and_the_worker(nnunet_model, case):
    """Fold 0 mirrored on three axes refines for 8 passes: a cancel after the preview stops it, and the same worker
    answers the next click."""
    image, geometry, centre = case
    click = ["--voxel", *(str(v) for v in centre), *GRADIENT]
    with Worker(ModelSource("nnunet", str(nnunet_model), folds="0")) as worker:
        worker.start()
        worker.wait(worker.set_case(image, geometry), timeout=300)
        request = worker.explain(ask(*click, preview=True))
        deadline = time.monotonic() + 120
        while worker.preview(request) is None and time.monotonic() < deadline:
            worker.poll(0.2)
        assert worker.preview(request) is not None and worker.answer(request) is None
        started = time.monotonic()
        worker.cancel(request)
        assert worker.wait(request, timeout=30).state == "cancelled"
        assert time.monotonic() - started < 30
        assert worker.preview(request).record["preview"] is True
        following = worker.explain(ask(*click, preview=True))
        while worker.preview(following) is None and worker.answer(following) is None:
            worker.poll(0.2)
        np.testing.assert_array_equal(worker.preview(following).maps, worker.preview(request).maps)
        worker.cancel(following)
        assert worker.wait(following, timeout=30).state == "cancelled" and worker.starts == 1


def test_a_model_without_a_preview_answers_only_the_exact_answer(nnunet_model, case):
    image, geometry, centre = case
    session = WarmSession(ModelSource("nnunet", str(nnunet_model), folds="0", mirroring=False))
    session.set_case(image, geometry)
    assert session.preview is None and session.shown(preview=False) == {}
    with pytest.raises(SegExplainError, match="this model has no preview"):
        session.explain(ask("--voxel", *(str(v) for v in centre), *GRADIENT), preview=True)
    with pytest.raises(SegExplainError, match="preview must be True or False, got 'yes'"):
        ExplainRequest(preview="yes")
