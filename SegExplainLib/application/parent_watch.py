"""The child side of a worker: end with the process that started it.

``SegExplainLib.frontends.worker.Worker`` runs ``python -m SegExplainLib.frontends.worker`` as a child of Slicer or of the review server,
holding the patient's case in memory. It passes the environment variable :data:`PARENT_PID` (its own pid), and the
child calls :func:`end_with_parent` first. When the parent ends in any way (closed, crashed, killed with SIGKILL),
the child exits with :data:`EXIT_PARENT_GONE`. Two mechanisms notice the parent's end:

- On Linux, when the child is the parent's direct child, the kernel sends it SIGTERM as the parent dies
  (``prctl(PR_SET_PDEATHSIG)``). Linux sends that signal when the *thread* that started the child ends, so a worker
  must be started from a thread that outlives it, such as a GUI's main thread or the server's event loop.
- On every system, a watchdog thread checks every :data:`WATCH_INTERVAL_S` seconds that the parent still runs.
  This also covers a launcher between the two (Slicer's ``PythonSlicer``) and a parent that died before the child
  could ask for the signal. On Windows, it waits on a handle of the parent process (no job object is needed).

A command run by hand (without the variable) is not affected.

The other way round, :func:`remove_with_host` starts a guardian child that removes a folder of files that must not
outlive this process (an uploaded image while it is checked), when this process ends in any way.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

#: Environment variable with the pid of the process whose end ends the worker.
PARENT_PID = "SEGEXPLAIN_PARENT_PID"
#: Seconds between two checks of the watchdog.
WATCH_INTERVAL_S = 0.5
#: Exit status of a child whose parent is gone (128 + SIGTERM, as if terminated).
EXIT_PARENT_GONE = 143

#: The guardian of :func:`remove_with_host`: it waits for the end of its input, then removes the folder.
_GUARDIAN = "import shutil, sys; sys.stdin.buffer.read(); shutil.rmtree(sys.argv[1], ignore_errors=True)"

_PR_SET_PDEATHSIG = 1
_WINDOWS_SYNCHRONIZE = 0x00100000
_WINDOWS_WAIT_TIMEOUT = 0x102


def end_with_parent() -> None:
    """Tie this process to the parent named in :data:`PARENT_PID`; does nothing when that variable is not set.

    Raises:
        ValueError: :data:`PARENT_PID` is set but is not a process id.
    """
    text = os.environ.get(PARENT_PID)
    if text is None:
        return
    if not text.isdigit():
        msg = f"{PARENT_PID} must be the process id of the job's parent, got {text!r}"
        raise ValueError(msg)
    pid = int(text)
    direct = os.getppid() == pid
    signal.signal(signal.SIGTERM, lambda *_: _abandon())
    if direct and sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    threading.Thread(target=_watch, args=(_liveness(pid, direct),), name="segexplain-parent-watch",
                     daemon=True).start()


def _liveness(pid: int, direct: bool) -> Callable[[], bool]:
    """A check of whether the parent still runs."""
    if os.name == "nt":
        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(_WINDOWS_SYNCHRONIZE, False, pid)
        return lambda: bool(handle) and kernel32.WaitForSingleObject(handle, 0) == _WINDOWS_WAIT_TIMEOUT
    if direct:  # an orphan is adopted at once, even while its dead parent is a zombie
        return lambda: os.getppid() == pid
    return lambda: _exists(pid)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch(alive: Callable[[], bool]) -> None:
    while alive():
        time.sleep(WATCH_INTERVAL_S)
    _abandon()


def _abandon() -> None:
    """End the process at once, whatever its threads are doing."""
    os._exit(EXIT_PARENT_GONE)


def remove_with_host(folder: str | Path) -> subprocess.Popen:
    """Start a guardian process that removes ``folder`` when this process ends, however it ends (SIGKILL included).

    The guardian reads a pipe whose writing end only this process holds (not inherited by its other children); the
    system closes that end when this process ends, and the guardian then removes the folder. It runs in a session
    of its own, so that Ctrl+C or closing the terminal, which signal the whole foreground group, do not end it first.

    Returns:
        The guardian; closing its ``stdin`` removes the folder now. Keep a reference to it: its ``stdin`` closes
        when it is garbage-collected.
    """
    return subprocess.Popen([sys.executable, "-c", _GUARDIAN, str(folder)], stdin=subprocess.PIPE,
                            start_new_session=True)
