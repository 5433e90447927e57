"""A click on an nnU-Net ensemble in the scene: the preview's overlay at once, replaced by the exact answer's.

On the real model of the session fixture ``nnunet_model`` (two folds trained by nnunetv2), in a real MRML scene.
"""

from __future__ import annotations

import json
import time

import numpy as np
import slicer
from SegExplainMRML import job, results, workflow
from test_mrml_models import _nnunetCase, _ras

GRADIENT = job.ExplainSettings(method="gradient", device="cpu")


def _click(explainer, volumes, model, centre, settings=GRADIENT):
    region = job.Region("point", pointRas=_ras(volumes[0], centre), radius=2.0, description="lesion centre")
    return workflow.startExplanation(explainer, volumes, ["T2", "ADC"], region, settings, model, trustModelCode=False)


def _untilPreview(run, timeout=180):
    deadline = time.monotonic() + timeout
    while run.preview is None and run.running and time.monotonic() < deadline:
        run.poll(0.2)
    assert run.preview is not None, run.error


def _shownRecord(scene, explanation):
    shNode = results.subjectHierarchy(scene)
    return (json.loads(shNode.GetItemAttribute(explanation.folderItem, results.RECORD_ATTRIBUTE)),
            json.loads(shNode.GetItemAttribute(explanation.folderItem, "SegExplain.ensemble")),
            json.loads(shNode.GetItemAttribute(explanation.folderItem, "SegExplain.preview")))


def test_the_overlay_shows_the_preview_then_the_exact_answer_in_its_place(scene, nnunet_model):
    """The preview loads as an explanation folder whose record says it is one; the exact answer then replaces its
    maps, overlay, shares and record in the same folder. Without preview, only the exact answer is loaded."""
    volumes, centre = _nnunetCase(scene)
    model = job.ModelSource("nnunet", str(nnunet_model), folds="0 1", mirroring=False)
    parameters = type("Controls", (), {"displayedSequence": 0, "filterKind": "none", "filterLow": 0.0,
                                       "filterHigh": 1.0, "overlayOpacity": 0.6})()
    explainer = job.WarmExplainer()
    try:
        run = _click(explainer, volumes, model, centre)
        _untilPreview(run)
        preview = workflow.previewExplanation(run, volumes)
        assert workflow.previewExplanation(run, volumes) is None  # loaded once
        workflow.showExplanation(preview, parameters, [])
        previewMaps, previewOverlay = preview.maps(), slicer.util.arrayFromVolume(preview.overlay).copy()
        record, ensemble, shown = _shownRecord(scene, preview)
        assert shown is True and record["preview"] is True
        assert ensemble == "preview: fold 0 without mirroring, of 2 folds (0, 1) without mirroring"
        np.testing.assert_array_equal(previewOverlay, previewMaps[0])

        assert run.wait(300) == "done", run.error
        final = workflow.finishExplanation(run, volumes)
        workflow.showExplanation(final, parameters, [])
        assert final.folderItem == preview.folderItem and results.explanationFolders(scene) == [final.folderItem]
        record, ensemble, shown = _shownRecord(scene, final)
        assert shown is False and record["preview"] is False and ensemble == "2 folds (0, 1) without mirroring"
        assert record["relevance_shares"] == run.record()["relevance_shares"]
        np.testing.assert_allclose(final.maps(), run.answer.maps, rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(final.overlay), run.answer.maps[0])
        assert not np.allclose(final.maps(), previewMaps)
        assert results.explanationOf(scene, final.folderItem).record["preview"] is False

        exact = _click(explainer, volumes, model, centre, job.ExplainSettings(method="gradient", device="cpu",
                                                                              preview=False))
        assert exact.wait(300) == "done" and exact.preview is None
        np.testing.assert_array_equal(exact.answer.maps, run.answer.maps)
        assert workflow.previewExplanation(exact, volumes) is None
        assert workflow.finishExplanation(exact, volumes).folderItem != final.folderItem
    finally:
        explainer.close()


def test_a_new_click_cancels_the_refinement_and_keeps_its_preview(scene, nnunet_model):
    """Fold 0 mirrored on three axes refines for 8 passes; the next click cancels it at once, the first click's
    preview stays in the scene saying it is a preview, and the worker stays warm for the new click."""
    volumes, centre = _nnunetCase(scene)
    model = job.ModelSource("nnunet", str(nnunet_model), folds="0")
    explainer = job.WarmExplainer()
    try:
        first = _click(explainer, volumes, model, centre)
        _untilPreview(first)
        kept = workflow.previewExplanation(first, volumes)
        assert first.refining
        started = time.monotonic()
        second = _click(explainer, volumes, model, (centre[0], centre[1] + 2, centre[2]))
        assert first.state == "cancelled" and not first.refining and time.monotonic() - started < 30
        assert _shownRecord(scene, kept)[2] is True
        with_preview = first.record()
        assert with_preview["ensemble"] == "preview: fold 0 without mirroring, of fold 0 x 8 mirrorings"
        _untilPreview(second)
        assert second.refining and explainer.worker.starts == 1
        second.cancel()
        assert second.state == "cancelled" and second.preview is not None
    finally:
        explainer.close()
