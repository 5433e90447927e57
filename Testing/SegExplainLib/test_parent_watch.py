"""A worker's child process ends with the process named as its parent, even behind a launcher.

Here the parent is a stand-in that is *not* the child's direct parent, as Slicer is behind its ``PythonSlicer``
launcher, so only the watchdog can notice its end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from SegExplainLib import _parent_watch

CHILD = ("from SegExplainLib._parent_watch import end_with_parent; end_with_parent(); print('watching', flush=True); "
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
