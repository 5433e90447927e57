"""The child side of a background job: end with the process that started it and leave none of its files behind.

``SegExplainMRML.job`` runs ``python -m SegExplainLib explain ...`` as a child of Slicer or of the review server, on
the patient's images written to a temporary job folder. It passes two environment variables, :data:`PARENT_PID`
(its own pid) and :data:`JOB_FOLDER`. ``python -m SegExplainLib`` calls :func:`end_with_parent` first. When the
parent ends in any way (closed, crashed, killed with SIGKILL), the child then deletes the job folder and exits with
:data:`EXIT_PARENT_GONE`. Two mechanisms notice the parent's end:

- On Linux, when the child is the parent's direct child, the kernel sends it SIGTERM as the parent dies
  (``prctl(PR_SET_PDEATHSIG)``). Linux sends that signal when the *thread* that started the child ends, so a job
  must be started from a thread that outlives it, such as a GUI's main thread or the server's event loop.
- On every system, a watchdog thread checks every :data:`WATCH_INTERVAL_S` seconds that the parent still runs.
  This also covers a launcher between the two (Slicer's ``PythonSlicer``) and a parent that died before the child
  could ask for the signal. On Windows, it waits on a handle of the parent process (no job object is needed).

A SIGTERM from elsewhere ends the child in the same way, because a terminated job has no use for its folder. An
explanation run by hand (without the variables) is not affected.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

#: Environment variable with the pid of the process whose end ends the job.
PARENT_PID = "SEGEXPLAIN_PARENT_PID"
#: Environment variable with the job's temporary folder, deleted when the parent is gone.
JOB_FOLDER = "SEGEXPLAIN_JOB_FOLDER"
#: Seconds between two checks of the watchdog.
WATCH_INTERVAL_S = 0.5
#: Exit status of a child whose parent is gone (128 + SIGTERM, as if terminated).
EXIT_PARENT_GONE = 143

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
    folder = Path(os.environ[JOB_FOLDER]) if os.environ.get(JOB_FOLDER) else None
    direct = os.getppid() == pid
    signal.signal(signal.SIGTERM, lambda *_: _abandon(folder))
    if direct and sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    alive = _liveness(pid, direct)
    atexit.register(lambda: alive() or _remove(folder))  # the parent died while this process was finishing
    threading.Thread(target=_watch, args=(alive, folder), name="segexplain-parent-watch", daemon=True).start()


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


def _watch(alive: Callable[[], bool], folder: Path | None) -> None:
    while alive():
        time.sleep(WATCH_INTERVAL_S)
    _abandon(folder)


def _remove(folder: Path | None) -> None:
    """Delete the job folder; it is renamed first, so that files the job writes at this moment cannot land in it."""
    if folder is None:
        return
    doomed = folder.with_name(f"{folder.name}.abandoned")
    try:
        folder.rename(doomed)
    except OSError:  # already gone, or (Windows) a file in it is open: delete it in place
        doomed = folder
    shutil.rmtree(doomed, ignore_errors=True)


def _abandon(folder: Path | None) -> None:
    """Delete the job folder and end the process at once, whatever its threads are doing."""
    _remove(folder)
    os._exit(EXIT_PARENT_GONE)
