"""A worker's child process ends with the process named as its parent, even behind a launcher.

Here the parent is a stand-in that is *not* the child's direct parent, as Slicer is behind its ``PythonSlicer``
launcher, so only the watchdog can notice its end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from SegExplainLib.application import parent_watch as _parent_watch

CHILD = ("from SegExplainLib.application.parent_watch import end_with_parent; end_with_parent(); print('watching', flush=True); "
         "import time; time.sleep(60)")


def test_the_child_of_a_launcher_ends_with_the_named_parent():
    parent = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    environment = dict(os.environ, **{_parent_watch.PARENT_PID: str(parent.pid)})
    child = subprocess.Popen([sys.executable, "-c", CHILD], env=environment, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "watching\n"
        assert child.poll() is None, "the child runs while its parent does"
        parent.stdin.close()  # the parent ends
        parent.wait()
        assert child.wait(5 + 2 * _parent_watch.WATCH_INTERVAL_S) == _parent_watch.EXIT_PARENT_GONE
    finally:
        for process in (parent, child):
            if process.poll() is None:
                process.kill()


def test_without_the_variable_nothing_is_watched(monkeypatch):
    monkeypatch.delenv(_parent_watch.PARENT_PID, raising=False)
    threads = threading.active_count()
    _parent_watch.end_with_parent()
    assert threading.active_count() == threads


def test_a_bad_parent_pid_is_named(monkeypatch):
    monkeypatch.setenv(_parent_watch.PARENT_PID, "slicer")
    with pytest.raises(ValueError, match=r"SEGEXPLAIN_PARENT_PID must be the process id .*, got 'slicer'"):
        _parent_watch.end_with_parent()



GUARDED = ("import sys, time; from pathlib import Path; from SegExplainLib.application.parent_watch import remove_with_host; "
           "folder = Path(sys.argv[1]); guardian = remove_with_host(folder); "
           "(folder / 'upload.nii.gz').write_bytes(b'1'); print('guarded', flush=True); time.sleep(60)")


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL and process groups are POSIX")
@pytest.mark.parametrize("ending", ["SIGKILL", "Ctrl+C"])
def test_a_guarded_folder_is_removed_when_its_host_ends(tmp_path, ending):
    """SIGKILL of the host, or Ctrl+C in its terminal (SIGINT to its whole process group, which the guardian has
    left): the folder goes with the host, and stays while the host runs."""
    folder = tmp_path / "uploads"
    folder.mkdir()
    host = subprocess.Popen([sys.executable, "-c", GUARDED, str(folder)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)  # the foreground group of a terminal of its own
    try:
        assert host.stdout.readline() == "guarded\n"
        time.sleep(0.5)
        assert (folder / "upload.nii.gz").is_file()
        if ending == "SIGKILL":
            host.kill()
        else:
            os.killpg(host.pid, signal.SIGINT)
        host.wait(10)
    finally:
        if host.poll() is None:
            host.kill()
    deadline = time.monotonic() + 10
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not folder.exists()
