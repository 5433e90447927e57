"""The worker's process tree: started as the root of a tree that can be ended whole, and ended so.

Slicer starts the interpreter through ``PythonSlicer``, a CTK launcher that runs the real interpreter as its own
child and forwards no signal; so the worker is never signalled, and its end kills the whole tree.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from typing import Any

#: Seconds a closing worker is given before its process tree is killed; also the child's grace after its input ends.
CLOSE_GRACE_S = 2.0
_WINDOWS_NEW_PROCESS_GROUP = 0x00000200
_WINDOWS_NO_WINDOW = 0x08000000


def tree_options(system: str = os.name) -> dict[str, Any]:
    """``Popen`` options that make the child the root of a process tree :func:`kill_tree` can end whole: its own
    session (process group) on POSIX; its own process group, without a console window, on Windows."""
    if system == "nt":
        return {"creationflags": _WINDOWS_NEW_PROCESS_GROUP | _WINDOWS_NO_WINDOW}
    return {"start_new_session": True}


def kill_tree(process: subprocess.Popen, *, system: str = os.name, killpg: Callable[[int, int], None] | None = None,
               run: Callable[..., Any] = subprocess.run) -> None:
    """Kill ``process`` and every process it started (a launcher's real interpreter, the interpreter's helpers).

    POSIX: SIGKILL to the process group that :func:`tree_options` made (it outlives its leader). Windows:
    ``taskkill /T /F``, which follows the parent links from ``process``; a grandchild whose launcher is already gone
    ends by the end of its input and by its parent watch instead.
    """
    if system == "nt":
        if process.poll() is None:
            run(["taskkill", "/PID", str(process.pid), "/T", "/F"], capture_output=True,
                creationflags=_WINDOWS_NO_WINDOW, check=False)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (killpg or os.killpg)(process.pid, signal.SIGKILL)


def slicer_python() -> str | None:
    import shutil

    return shutil.which("PythonSlicer")

