"""Helpers of the review app's browser tests: the page's state and the overlay's pixels."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def reddish(pixels: np.ndarray) -> np.ndarray:
    """Where an RGB(A) image shows the positive (red) end of the diverging overlay over grey anatomy."""
    rgb = pixels[..., :3].astype(int)
    return (rgb[..., 0] > rgb[..., 1] + 40) & (rgb[..., 0] > rgb[..., 2] + 25)


def setState(page, **values) -> None:
    """Change page state as the controls would, and wait until the server has it."""
    page.evaluate(f"window.trame.state.update({json.dumps(values)})")
    page.waitFor("window.trame.state.dirtyKeys.size === 0 && !window.trame.state.get('trame__busy')", timeout=30)


def explained(page) -> None:
    """Make sure the page shows an explanation: click the middle of the axial view once if there is none yet."""
    if page.evaluate("window.trame.state.get('current')") is not None:
        return
    rect = page.evaluate("(() => { const r = document.querySelectorAll('.layout-grid-item')[0].getBoundingClientRect();"
                         " return [r.x, r.y, r.width, r.height]; })()")
    page.click(rect[0] + rect[2] / 2, rect[1] + rect[3] / 2)
    page.waitFor("(window.trame.state.get('current') !== null && !window.trame.state.get('running')) || "
                 "window.trame.state.get('error')", timeout=120)
    assert page.evaluate("window.trame.state.get('error')") == ""


def until(produce: Callable[[], Any], accept: Callable[[Any], bool], timeout: float = 30.0,
          interval: float = 0.25) -> Any:
    """Call ``produce`` until ``accept`` takes its value or ``timeout`` s pass; returns the last value.

    For what arrives on its own time, e.g. a view image streamed to the browser after the server rendered it.
    """
    deadline = time.monotonic() + timeout
    value = produce()
    while not accept(value) and time.monotonic() < deadline:
        time.sleep(interval)
        value = produce()
    return value
