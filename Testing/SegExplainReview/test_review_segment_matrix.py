"""The segment matrix action: computed by the warm worker for the loaded case, shown as a figure, downloaded as CSV."""

from __future__ import annotations

import base64
import csv
import io
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image
from review_page import setState


def test_segment_matrix_shows_its_figure_and_downloads_its_csv(server, page):
    setState(page, method="gradient")
    try:
        assert page.evaluate("document.querySelector('#segment-matrix-csv')") is None  # nothing to download yet
        with pytest.raises(urllib.error.HTTPError) as missing:
            server.get("/segexplain/segment_matrix.csv")
        assert missing.value.code == 404
        page.evaluate("document.querySelector('#segment-matrix').click()")
        page.waitFor("(window.trame.state.get('segment_matrix_png') && !window.trame.state.get("
                     "'segment_matrix_running')) || window.trame.state.get('error')", timeout=120)
        assert page.evaluate("window.trame.state.get('error')") == ""
        assert "Segment matrix in" in page.evaluate("window.trame.state.get('message')")
        shown = page.waitFor("document.querySelector('#segment-matrix-figure') && "
                             "document.querySelector('#segment-matrix-figure').naturalWidth", timeout=15)
        source = page.evaluate("document.querySelector('#segment-matrix-figure').getAttribute('src')")
        figure = Image.open(io.BytesIO(base64.b64decode(source.partition(",")[2])))
        assert shown == figure.size[0] > 400
        assert (np.asarray(figure.convert("RGB"))[..., 0] > 200).any()  # the red cells of the heatmap
        href = page.evaluate("document.querySelector('#segment-matrix-csv').getAttribute('href')")
        rows = list(csv.reader(io.StringIO(server.get(href).decode())))
        assert rows[0] == ["output segment \\ input segment", "background", "lesion", "positive relevance",
                           "negative share", "status"]
        assert [row[0] for row in rows[1:]] == ["background", "lesion"] and rows[2][-1] == "explained"
        assert abs(float(rows[2][1]) + float(rows[2][2]) - 1.0) < 1e-4
        with pytest.raises(urllib.error.HTTPError) as refused:  # the download needs the run's token
            urllib.request.urlopen(f"{server.url.split('?')[0].rstrip('/')}{href}", timeout=30)
        assert refused.value.code == 403
    finally:
        setState(page, method="lrp")
