"""The app listens on 127.0.0.1 only unless --host says otherwise, and then warns."""

from __future__ import annotations

import socket
from urllib.parse import urlparse

import pytest

from SegExplainLib import cli


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
    case = calls[-1][0]
    assert [p.name for p in case.sequences][0].endswith("T2.nii.gz") and case.label is not None


def test_missing_case_folder_is_an_error_line(tmp_path, capsys):
    assert cli.main(["review", str(tmp_path / "nowhere")]) == cli.EXIT_ERROR
    assert capsys.readouterr().err.startswith("error: case folder")
