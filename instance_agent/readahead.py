"""Reading a byte stream ahead in a thread of its own, a bounded number of chunks ahead.

A restore does three things to each byte: download it, decompress it, and write it into a
file. In one thread they take turns, and the time the kernel spends creating and writing
files (most of a restore of many files) leaves the network and the decompressor idle. The
shell pipeline `s5cmd cat | zstd -d | tar -x` runs them at once, one process each. Here the
download and the decompression run in this thread (socket reads and zstd both release the
GIL) while the caller parses and writes. Memory stays bounded: at most `depth` chunks wait.

An exception the stream raises in the thread is raised again, the same object, from the
`read` that reaches it, so the caller maps errors exactly as it would without read-ahead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType

CHUNK = 1 << 20
DEPTH = 8
_STOP_POLL = 0.1  # seconds: how often a blocked producer looks whether the reader has gone
_JOIN = 5.0  # seconds to wait for the producer when the reader stops early


class ReadAhead:
    """`read(n)` over what `source(CHUNK)` returns, fetched ahead in a daemon thread.

    Use it as a context manager (or call `close`): leaving stops the thread."""

    def __init__(self, source: Callable[[int], bytes], *, chunk: int = CHUNK, depth: int = DEPTH) -> None:
        self._source = source
        self._chunk = chunk
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._current = b""
        self._pos = 0
        self._ended = False
        self._thread = threading.Thread(target=self._produce, name="read-ahead", daemon=True)
        self._thread.start()

    def _put(self, item: bytes | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_STOP_POLL)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._source(self._chunk)
                if not self._put(bytes(data)) or not data:
                    return
        except BaseException as err:  # handed to the reader, raised there
            self._put(err)

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (all that is left for a negative size); b"" at the end."""
        if size < 0:
            parts = []
            while chunk := self.read(self._chunk):
                parts.append(chunk)
            return b"".join(parts)
        if self._pos >= len(self._current):
            if self._ended or size == 0:
                return b""
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._ended = True
                raise item
            if not item:
                self._ended = True
                return b""
            self._current, self._pos = item, 0
        start = self._pos
        self._pos = min(start + size, len(self._current))
        if start == 0 and self._pos == len(self._current):
            return self._current  # the whole chunk: no copy
        return self._current[start : self._pos]

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(_JOIN)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
