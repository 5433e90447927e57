"""Fixtures of the review app's tests: the app serving the demo case (a subprocess per test file, so that each
file starts from the demo as loaded) and one headless Chromium.

The server runs as ``segexplain review --port 0`` with offscreen EGL rendering; the tests talk to it over HTTP and
through Chromium's DevTools protocol (``cdp.py``), as a user's browser would, at the address it prints (with the
run's access token).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytest.importorskip("trame_slicer", reason="the review app needs its extra (pip install -e '.[review]')")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cdp import CHROMIUM, Chromium  # noqa: E402

SERVING = re.compile(r"SegExplain review: serving (http://\S+) \(bound to ([^;)]+)")


class Server:
    """``segexplain review`` in a subprocess; ``url`` (with the token) once it serves, ``output`` what it printed."""

    def __init__(self, *arguments: str, environment: dict[str, str] | None = None) -> None:
        environment = environment or dict(os.environ, VTK_DEFAULT_OPENGL_WINDOW="vtkEGLRenderWindow")
        self.process = subprocess.Popen([sys.executable, "-m", "SegExplainLib", "review", "--port", "0", *arguments],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
        self.output = ""
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 90
        while not SERVING.search(self.output):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"segexplain review did not start:\n{self.output[-3000:]}")
            time.sleep(0.1)
        self.url, self.boundTo = SERVING.search(self.output).groups()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.output += line

    def get(self, path: str) -> bytes:
        """GET a path of the app, e.g. ``/segexplain/screenshot.png``, with the token."""
        address = urlsplit(self.url)
        url = f"{address.scheme}://{address.netloc}{path}{'&' if '?' in path else '?'}{address.query}"
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def start_server():
    """Start another server with arguments of its own: ``start_server(case_path)``. A fixture, because a test
    module's ``from conftest import Server`` finds the conftest of another folder when both are collected."""
    return Server


@pytest.fixture(scope="module")
def server():
    server = Server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail("the browser tests need Chromium: run the README's set-up command (apt-get install chromium)")
    with Chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def page(server, browser):
    """The demo page loaded in Chromium, its four views streamed."""
    browser.navigate(server.url)
    browser.waitFor("document.querySelectorAll('.layout-grid-item img.image-display-area').length >= 4 && "
                    "window.trame && window.trame.state.get('sequences').length === 6", timeout=60)
    return browser

