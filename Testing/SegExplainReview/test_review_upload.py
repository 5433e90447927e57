"""File upload on the page: a bad file gives a message on the page and the server keeps answering; a label works."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from SegExplainLib.application.demo import write_demo_case


def upload(page, path) -> None:
    page.evaluate("window.trame.state.set('upload_error', ''), window.trame.state.set('upload_message', '')")
    page.setFiles("#upload", [str(path)])
    page.waitFor("window.trame.state.get('upload_error') || window.trame.state.get('upload_message')", timeout=30)


def test_bad_file_shows_a_message_and_the_server_keeps_answering(server, page, tmp_path):
    bad = tmp_path / "T2.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file")
    upload(page, bad)
    message = page.waitFor("document.querySelector('#upload-error') && "
                           "document.querySelector('#upload-error').innerText", timeout=10)
    assert "T2.nii.gz" in message and "segexplain-upload" not in message, "the user's file, not the server's copy"
    assert page.evaluate("window.trame.state.get('upload_message')") == ""
    assert server.process.poll() is None
    assert server.get("/segexplain/screenshot.png")[:8] == b"\x89PNG\r\n\x1a\n"

    offGrid = tmp_path / "T1.nii.gz"
    sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkFloat32), str(offGrid))
    upload(page, offGrid)
    assert "grid" in page.evaluate("window.trame.state.get('upload_error')")


def test_label_upload_adds_a_segmentation(page, tmp_path):
    _, label = write_demo_case(tmp_path, 1001)
    named = tmp_path / "second_opinion.nii.gz"
    image = sitk.ReadImage(str(label))
    sitk.WriteImage(sitk.Cast(image, sitk.sitkUInt8), str(named))
    upload(page, named)
    assert page.evaluate("window.trame.state.get('upload_error')") == ""
    assert "segmentation" in page.evaluate("window.trame.state.get('upload_message')")
    assert len(page.evaluate("window.trame.state.get('segments')")) == len(np.unique(sitk.GetArrayFromImage(image))) - 1
