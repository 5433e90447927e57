"""What ``segexplain review`` prints before its address: nothing else, even without a display (issue 19)."""

from __future__ import annotations

import os

from SegExplainLib.application.demo import write_demo_case


def test_without_a_display_the_address_is_the_first_line(start_server, tmp_path):
    write_demo_case(tmp_path, 1000)  # its label map is read too
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("DISPLAY", "WAYLAND_DISPLAY", "VTK_DEFAULT_OPENGL_WINDOW")}
    server = start_server(str(tmp_path), environment=environment)
    try:
        assert server.output.startswith("SegExplain review: serving http://"), server.output[:2000]
        assert server.get("/segexplain/screenshot.png").startswith(b"\x89PNG")  # it renders, offscreen
    finally:
        server.stop()
