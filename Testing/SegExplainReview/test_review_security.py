"""The app listens on 127.0.0.1 only unless --host says otherwise, and then warns; a web page of another origin cannot
connect, and nothing is served without the run's token (printed in the address)."""

from __future__ import annotations

import asyncio
import itertools
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import aiohttp
import msgpack
import numpy as np
import pytest
import SimpleITK as sitk
from wslink.chunking import UnChunker, generate_chunks

from SegExplainLib.frontends import cli

pytest.importorskip("trame_slicer", reason="the review app needs its extra (pip install -e '.[review]')")
from SegExplainReview.session import CaseVolume  # noqa: E402


def nonLoopbackAddress() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # no packet is sent; this only picks the outgoing interface
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_default_server_is_bound_to_loopback_only(server):
    assert server.boundTo == "127.0.0.1"
    port = urlparse(server.url).port
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    address = nonLoopbackAddress()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    with pytest.raises(OSError), socket.create_connection((address, port), timeout=5):
        pass


def test_other_host_is_explicit_and_warned(monkeypatch, capsys):
    import SegExplainReview.app

    calls = []
    monkeypatch.setattr(SegExplainReview.app, "serve", lambda case, **kwargs: calls.append((case, kwargs)))
    assert cli.main(["review", "--port", "0"]) == 0
    assert calls[-1][1] == {"host": "127.0.0.1", "port": 0}
    assert "warning" not in capsys.readouterr().err
    assert cli.main(["review", "--host", "0.0.0.0", "--port", "9999"]) == 0
    assert calls[-1][1] == {"host": "0.0.0.0", "port": 9999}
    assert "reachable from other machines" in capsys.readouterr().err
    case = calls[-1][0]  # the demo case, in memory
    assert len(case.sequences) == 6 and all(isinstance(v, CaseVolume) for v in (*case.sequences, case.label))


def test_missing_case_folder_is_an_error_line(tmp_path, capsys):
    assert cli.main(["review", str(tmp_path / "nowhere")]) == cli.EXIT_ERROR
    assert capsys.readouterr().err.startswith("error: case folder")


class Wslink:
    """A bare wslink client on a raw websocket: what a script, or a page of another site, could send."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self.socket, self.unchunker, self.ids = socket, UnChunker(), itertools.count(1)
        self.unchunker.set_max_message_size(2**30)

    async def call(self, method: str, *args) -> dict:
        """The server's answer (``result`` or ``error``) to one call; ``wslink.hello`` is a system call."""
        ident = f"{'system' if method == 'wslink.hello' else 'rpc'}:c0:{next(self.ids)}"
        message = msgpack.packb({"wslink": "1.0", "id": ident, "method": method, "args": list(args), "kwargs": {}})
        for chunk in generate_chunks(message, 2**20):
            await self.socket.send_bytes(chunk)
        while True:
            frame = await self.socket.receive(timeout=30)
            assert frame.type == aiohttp.WSMsgType.BINARY, f"the server closed or sent {frame.type}"
            answer = self.unchunker.process_chunk(frame.data)
            if answer and answer.get("id") == ident:
                return answer


def token(server) -> str:
    return parse_qs(urlparse(server.url).query)["secret"][0]


def status(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_address_carries_a_random_per_run_token(server):
    assert len(token(server)) >= 40 and token(server) != "wslink-secret"
    assert urlparse(server.url).path == "/"


def test_a_websocket_from_another_origin_is_refused(server):
    """A page on http://evil.example open in the user's browser cannot even open the app's websocket."""
    port = urlparse(server.url).port

    async def handshake(origin: str) -> int:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(f"ws://127.0.0.1:{port}/ws", headers={"Origin": origin}):
                    return 101
            except aiohttp.WSServerHandshakeError as error:
                return error.status

    assert asyncio.run(handshake("http://evil.example")) == 403
    assert asyncio.run(handshake(f"http://localhost:{port + 1}")) == 403
    assert asyncio.run(handshake(f"http://127.0.0.1:{port}")) == 101


def test_without_the_token_the_state_cannot_be_read_nor_a_file_uploaded(server):
    """The library's public default secret, or none, gets nothing; the run's token gets the state."""
    port = urlparse(server.url).port
    upload = {"upload": {"name": "label.nii.gz", "content": b"\x00" * 64}}

    async def session(secret: str | None) -> tuple[dict, dict, dict]:
        async with aiohttp.ClientSession() as http, http.ws_connect(
                f"ws://127.0.0.1:{port}/ws", headers={"Origin": f"http://127.0.0.1:{port}"}, max_msg_size=0) as ws:
            client = Wslink(ws)
            hello = await client.call("wslink.hello", {"secret": secret} if secret is not None else {})
            return hello, await client.call("trame.state.get"), await client.call("trame.state.update", [upload])

    for secret in (None, "wslink-secret", token(server)[:-1]):
        hello, state, update = asyncio.run(session(secret))
        assert "Authentication failed" in str(hello["error"])
        assert "Unauthorized" in str(state["error"]) and "result" not in state
        assert "Unauthorized" in str(update["error"])
    hello, state, _ = asyncio.run(session(token(server)))
    assert "clientID" in hello["result"]
    assert len(state["result"]["state"]["sequences"]) == 6


def resident_bytes(pid: int) -> int:
    """A process's resident memory (VmRSS of /proc/PID/status)."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the server's memory from /proc")
def test_a_message_declaring_more_than_the_largest_upload_is_refused_before_anything_is_allocated(server):
    """One 28-byte chunk whose header declared 2 GB took the server from 0.82 to 2.78 GB (wslink allocates what a
    client with the token declares, up to 4 GB). Messages may now declare no more than the largest upload together:
    the connection is closed, and the server's memory does not grow."""
    port = urlparse(server.url).port
    closed = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)

    async def declare(*sizes: int) -> aiohttp.WSMsgType:
        async with aiohttp.ClientSession() as http, http.ws_connect(
                f"ws://127.0.0.1:{port}/ws", headers={"Origin": f"http://127.0.0.1:{port}"}, max_msg_size=0) as ws:
            assert "clientID" in (await Wslink(ws).call("wslink.hello", {"secret": token(server)}))["result"]
            for ident, size in enumerate(sizes, 1):  # chunk header: message id, offset, declared size; then 16 bytes
                await ws.send_bytes(b"".join(n.to_bytes(4, "little") for n in (ident, 0, size)) + bytes(16))
            return (await ws.receive(timeout=10)).type

    before = resident_bytes(server.process.pid)
    assert asyncio.run(declare(2**31)) in closed
    assert resident_bytes(server.process.pid) - before < 100 * 2**20
    assert asyncio.run(declare(*[200 * 2**20] * 3)) in closed  # each under the cap, together over it
    assert resident_bytes(server.process.pid) - before < 100 * 2**20

    async def state() -> dict:
        async with aiohttp.ClientSession() as http, http.ws_connect(
                f"ws://127.0.0.1:{port}/ws", headers={"Origin": f"http://127.0.0.1:{port}"}, max_msg_size=0) as ws:
            client = Wslink(ws)
            await client.call("wslink.hello", {"secret": token(server)})
            return await client.call("trame.state.get")

    assert len(asyncio.run(state())["result"]["state"]["sequences"]) == 6  # the server still serves


def test_http_routes_need_the_token_and_the_apps_own_host(server):
    """Downloads and the page need the token (or the cookie the page set); a foreign Host (DNS rebinding) gets 403."""
    base = server.url.split("?")[0].rstrip("/")
    secret = token(server)
    assert status(f"{base}/segexplain/screenshot.png") == 403
    assert status(f"{base}/segexplain/screenshot.png?secret=wslink-secret") == 403
    assert status(f"{base}/segexplain/screenshot.png?secret={secret}") == 200
    assert status(f"{base}/") == 403
    assert status(f"{base}/?secret={secret}") == 200
    port = urlparse(server.url).port
    assert status(f"{base}/?secret={secret}", {"Host": f"evil.example:{port}"}) == 403
    with urllib.request.urlopen(f"{base}/?secret={secret}", timeout=30) as response:
        cookie = response.headers["Set-Cookie"]
    assert secret in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert status(f"{base}/segexplain/screenshot.png", {"Cookie": cookie.split(";")[0]}) == 200


def test_the_page_reloads_without_the_token_in_its_address(server, browser):
    """The page drops the token from its address once read; a reload (or the bare address) gets it from the cookie."""
    ready = "window.trame?.state?.get('sequences')?.length === 6"
    browser.navigate(server.url)
    browser.waitFor(ready, timeout=60)
    assert token(server) not in browser.evaluate("window.location.href")
    browser.evaluate("window.loadedBefore = true")  # to tell the reloaded page from this one
    browser.navigate(server.url.split("?")[0])
    browser.waitFor(f"!window.loadedBefore && {ready}", timeout=60)
    assert token(server) not in browser.evaluate("window.location.href")


@pytest.mark.parametrize("ending", [signal.SIGKILL, signal.SIGHUP])
def test_a_4d_case_leaves_no_file_behind_however_the_server_ends(tmp_path, monkeypatch, ending, start_server):
    """The sequences of a 4D case were written as NRRD files to the temporary folder, and stayed after SIGKILL or
    SIGHUP (closing the terminal); they are now kept in memory."""
    from SegExplainLib.application.demo import make_case

    image, _ = make_case(1001)
    stacked = sitk.GetImageFromArray(np.moveaxis(image, 0, -1), isVector=True)
    stacked.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(stacked, str(tmp_path / "case.nrrd"))
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))
    server = start_server(str(tmp_path / "case.nrrd"))
    server.process.send_signal(ending)
    server.process.wait(30)
    written = [p.relative_to(temporary) for p in temporary.rglob("*") if p.suffix in (".nrrd", ".nii", ".gz", ".mha")]
    assert written == [], written


def test_the_demo_case_and_the_upload_folder_leave_nothing_behind_when_the_server_is_killed(tmp_path, monkeypatch,
                                                                                           start_server):
    """The demo case (no CASE given) was written to the temporary folder and stayed after SIGKILL, and so did an
    upload being checked in that instant. The demo is now kept in memory, and uploads are checked in a folder that a
    guardian process removes when the server ends (trame-slicer's own cache folder, empty, stays)."""
    import time

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))
    server = start_server()
    port = urlparse(server.url).port

    async def upload() -> None:
        async with aiohttp.ClientSession() as http, http.ws_connect(
                f"ws://127.0.0.1:{port}/ws", headers={"Origin": f"http://127.0.0.1:{port}"}, max_msg_size=0) as ws:
            client = Wslink(ws)
            await client.call("wslink.hello", {"secret": token(server)})
            upload = {"name": "label.nii.gz", "content": bytes(64)}  # refused, after being written to be checked
            assert "error" not in await client.call("trame.state.update", [{"key": "upload", "value": upload}])

    def leftovers() -> list[Path]:
        return [p.relative_to(temporary) for p in temporary.rglob("*")
                if p.name.startswith("segexplain-") or p.suffix in (".nrrd", ".nii", ".gz", ".mha")]

    try:
        asyncio.run(upload())
        deadline = time.monotonic() + 30
        while not list(temporary.glob("segexplain-scratch-*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(list(temporary.glob("segexplain-scratch-*"))) == 1
    finally:
        server.process.kill()
        server.process.wait(30)
    deadline = time.monotonic() + 10  # the guardian notices the server's end at once; give it time to run
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers() == []
