"""The worker's messages over a pipe: an 8-byte length, a JSON header, then each array's raw bytes.

:class:`Outbox` writes them from the arrays' own memory and :class:`Inbox` reads them straight into arrays
preallocated from the header, both without blocking on a non-blocking descriptor (the host's, moved by a GUI timer)
and to the end on a blocking one (the child's). No image file is written.
"""

from __future__ import annotations

import json
import os
import select
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

_HEADER = struct.Struct("<Q")
#: Most bytes given to one write: a pipe takes what fits, the rest waits for the next write.
_PIECE = 1 << 20
#: Windows cannot wait on a pipe (select takes sockets only): it checks again after this long.
_WINDOWS_WAIT_S = 0.005


class Outbox:
    """Messages to write to a pipe: an 8-byte length, the JSON header, then each array's raw bytes.

    The arrays are written from their own memory (no copy). On a non-blocking descriptor :meth:`write` writes what the
    pipe takes now and keeps the rest for a later call; on a blocking one it writes everything.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._views: deque[memoryview] = deque()

    @property
    def pending(self) -> bool:
        """Bytes are left to write."""
        return bool(self._views)

    def put(self, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> None:
        arrays = {k: np.ascontiguousarray(v) for k, v in (arrays or {}).items()}
        header = {**header, "arrays": [{"name": k, "dtype": v.dtype.str, "shape": list(v.shape)}
                                       for k, v in arrays.items()]}
        text = json.dumps(header, default=str).encode()
        self._views.append(memoryview(_HEADER.pack(len(text)) + text))
        self._views.extend(memoryview(v.reshape(-1).view(np.uint8)) for v in arrays.values() if v.nbytes)

    def write(self) -> int:
        """Write what the pipe takes; the number of bytes written.

        Raises:
            OSError: The reader is gone (``BrokenPipeError``).
        """
        written = 0
        while self._views:
            try:
                count = os.write(self.fd, self._views[0][:_PIECE])
            except BlockingIOError:
                break
            written += count
            if count == len(self._views[0]):
                self._views.popleft()
            else:
                self._views[0] = self._views[0][count:]
        return written

    def clear(self) -> None:
        self._views.clear()


class Inbox:
    """Messages read from a pipe as their bytes come, each handed to ``on_message(header, arrays)`` when complete.

    An array's bytes are read straight into the array, preallocated from the header, in pieces as large as the pipe
    gives (no chunk list, no copy). On a non-blocking descriptor :meth:`read` reads what the pipe holds now; on a
    blocking one it reads until the stream ends.
    """

    def __init__(self, fd: int, on_message: Callable[[dict[str, Any], dict[str, np.ndarray]], None]) -> None:
        self.fd, self.on_message = fd, on_message
        self.ended = False
        self._expect(bytearray(_HEADER.size), self._length)

    @property
    def partial(self) -> bool:
        """A message has begun and not ended."""
        return self._filled > 0 or self._then != self._length

    def read(self) -> int:
        """Read what the pipe holds (see above); the number of bytes read. At the end of the stream, :attr:`ended`."""
        count = total = 0
        while not self.ended:
            view = self._view[self._filled:]
            try:
                count = read_into(self.fd, view) if view else 0
            except BlockingIOError:
                break
            except OSError:  # e.g. the descriptor was closed by a restart
                count = 0
            if view and not count:
                self.ended = True
                break
            total, self._filled = total + count, self._filled + count
            if self._filled == len(self._view):
                self._then()
        return total

    def _expect(self, buffer: Any, then: Callable[[], None]) -> None:
        self._buffer, self._view, self._filled, self._then = buffer, memoryview(buffer).cast("B"), 0, then

    def _length(self) -> None:
        (length,) = _HEADER.unpack(self._buffer)
        self._expect(bytearray(length), self._header)

    def _header(self) -> None:
        header = json.loads(self._buffer)
        arrays = {spec["name"]: np.empty(spec["shape"], np.dtype(spec["dtype"])) for spec in header.pop("arrays", [])}
        self._message, self._arrays = (header, arrays), iter(arrays.values())
        self._next_array()

    def _next_array(self) -> None:
        array = next(self._arrays, None)
        if array is None:
            self._expect(bytearray(_HEADER.size), self._length)
            self.on_message(*self._message)
        elif array.nbytes == 0:
            self._next_array()
        else:
            self._expect(array.reshape(-1).view(np.uint8), self._next_array)


def read_into(fd: int, view: memoryview) -> int:
    """Read into ``view``; the number of bytes read (0 at the end of the stream)."""
    if hasattr(os, "readv"):
        return os.readv(fd, [view])
    data = os.read(fd, len(view))  # Windows has no readv: one copy
    view[:len(data)] = data
    return len(data)


def wait_ready(readable: int, writable: int | None, timeout: float) -> None:
    """Block until ``readable`` has bytes or ``writable`` takes some, for at most ``timeout`` seconds."""
    if os.name == "nt":  # select works on sockets only there: a short sleep instead
        time.sleep(min(timeout, _WINDOWS_WAIT_S))
        return
    select.select([readable], [] if writable is None else [writable], [], max(timeout, 0.0))

