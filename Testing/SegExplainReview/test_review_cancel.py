"""The Explain button starts a background job with a progress bar; Cancel stops it and adds nothing."""

from __future__ import annotations

from review_page import setState


def test_cancel_stops_the_job(page):
    setState(page, method="occlusion", region_kind="class")
    count = len(page.evaluate("window.trame.state.get('explanations')"))
    page.evaluate("document.querySelector('#explain-button').click()")
    page.waitFor("window.trame.state.get('running')", timeout=10)
    assert page.evaluate("!!document.querySelector('#progress')")
    page.evaluate("document.querySelector('#cancel-button').click()")
    page.waitFor("!window.trame.state.get('running') && window.trame.state.get('message') === 'Cancelled'",
                 timeout=30)
    assert len(page.evaluate("window.trame.state.get('explanations')")) == count
    assert page.evaluate("window.trame.state.get('error')") == ""
