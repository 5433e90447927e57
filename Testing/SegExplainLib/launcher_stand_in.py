"""A stand-in for Slicer's ``PythonSlicer``: ``python launcher_stand_in.py ARGS...`` runs ``python ARGS...``.

As CTK's AppLauncher (``ctkAppLauncher::runProcess``: ``QProcess::start`` with ``ForwardedChannels`` and
``ForwardedInputChannel``), it runs the real interpreter as its own child, which shares its standard input, output
and error and stays in its process group; it forwards no signal, and exits with the child's exit code (1 when the
child was killed, as the launcher's ``CrashExit``).
"""

from __future__ import annotations

import subprocess
import sys

if __name__ == "__main__":
    code = subprocess.Popen([sys.executable, *sys.argv[1:]]).wait()
    sys.exit(code if code >= 0 else 1)
