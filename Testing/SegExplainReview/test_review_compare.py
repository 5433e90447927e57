"""Side-by-side comparison, shares chart, ground-truth inclusivity and the report download."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from review_page import explained, reddish, setState, until


def test_compare_shows_the_same_explanation_with_another_filter(server, page):
    explained(page)
    setState(page, filter_kind="none", compare_filter_kind="pass", compare_alpha1=0.6, compare_on=True)
    page.waitFor("document.querySelectorAll('.layout-grid-item img.image-display-area').length === 6", timeout=30)
    widths = page.evaluate("[...document.querySelectorAll('.layout-grid-item')].map(e => "
                           "Math.floor(e.getBoundingClientRect().width))")
    columns = widths[0] + widths[3]  # the screenshot is laid out as the page: a column of three views on each side
    # the new views render at their default size until the browser reports theirs
    shot = until(lambda: np.asarray(Image.open(io.BytesIO(server.get("/segexplain/screenshot.png"))).convert("RGBA")),
                 lambda image: abs(image.shape[1] - columns) <= 8, interval=0.5)
    assert abs(shot.shape[1] - columns) <= 8, (shot.shape, widths)
    half = shot.shape[1] // 2  # three left views (main group) then three right views (comparison group)
    left, right = int(reddish(shot[:, :half]).sum()), int(reddish(shot[:, half:]).sum())
    assert left > 100 and 0 < right < 0.8 * left, (left, right)
    setState(page, compare_on=False)
    page.waitFor("document.querySelectorAll('.layout-grid-item').length === 4", timeout=30)


def test_shares_chart_and_inclusivity(page):
    explained(page)
    bars = page.waitFor("document.querySelectorAll('#shares div.d-flex').length", timeout=10)
    assert bars == 6
    page.evaluate("document.querySelector('#inclusivity').click()")
    values = page.waitFor("Object.keys(window.trame.state.get('inclusivity')).length && "
                          "window.trame.state.get('inclusivity')", timeout=30)
    assert set(values) == {s["title"] for s in page.evaluate("window.trame.state.get('sequences')")}
    assert all(0.0 <= v <= 1.0 for v in values.values()) and max(values.values()) > 0
    header = page.waitFor("document.querySelector('#share-table').innerText.includes('Inclusivity') && "
                          "document.querySelector('#share-table').innerText", timeout=10)
    assert "Positive" in header


def test_report_download(server, page):
    explained(page)
    href = page.evaluate("document.querySelector('#report').getAttribute('href')")
    report = server.get(href)
    assert report[:5] == b"%PDF-" and len(report) > 10000


def test_a_warning_of_the_engine_is_shown_on_the_page(page):
    """IG with two fixed nodes from a zero baseline misses completeness: the page shows the engine's warning."""
    setState(page, method="integrated_gradients", n_steps=2, baseline="zero", region_kind="predicted",
             advanced_options='{"quadrature": "gausslegendre"}')
    count = page.evaluate("window.trame.state.get('explanations').length")
    try:
        page.evaluate("document.querySelector('#explain-button').click()")
        page.waitFor(f"(window.trame.state.get('explanations').length > {count} && "
                     "!window.trame.state.get('running')) || window.trame.state.get('error')", timeout=120)
        assert page.evaluate("window.trame.state.get('error')") == ""
        text = page.waitFor("document.querySelector('#warning') && document.querySelector('#warning').innerText",
                            timeout=15)
        assert "misses completeness" in text
    finally:
        setState(page, method="lrp", n_steps=64, baseline="blur:5", region_kind="point", advanced_options="")
