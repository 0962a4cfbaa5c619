"""The tar stream into a byte sink: buffered output, and one regular file's data copied at
exactly the size its header gave.

- a file that shrinks mid-read is padded with zeros to the size in its header, and one that
  grows is cut at that size: the header is written before the data, so the size is fixed;
- a file being read when the deadline (--max-duration) passes is cut there: its header
  already holds its size, so the rest is written as zeros (no read; zstd takes zeros at
  about 4 GB/s on one core), and its entry says where (cut_at), with no digest. So the
  overrun is one read plus that padding, whatever the file's size, where it used to be the
  whole file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any, Protocol

from instance_agent import tarheader
from instance_agent.manifest import ArchiveReport, Warning

# 1 MiB reads: large enough that per-call overhead vanishes, small enough to stay in cache.
READ_SIZE = 1 << 20
# The tar stream is gathered in a buffer of READ_SIZE and handed to the sink a full buffer at a
# time; file data is read straight into its free tail. A tree of small files would otherwise
# cost three sink writes per file (header, data, padding), each a compressor call that drops
# and retakes the GIL. Below this much free space, the buffer is handed on before a read.
MIN_READ = 64 << 10
_ZEROS = bytes(tarheader.BLOCK)


class Sink(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> object: ...


class TarStream:
    """The output half of an archiver: what it writes, and the report of what it wrote."""

    def __init__(
        self, sink: Sink, *, deadline: float | None, clock: Callable[[], float], hash_name: str
    ) -> None:
        self._sink = sink
        self._deadline = deadline
        self._clock = clock
        self._hash = hash_name == "sha256"
        self._buf = bytearray(READ_SIZE)
        self._view = memoryview(self._buf)
        self._fill = 0  # bytes of the tar stream in _buf, not yet handed to the sink
        self.report = ArchiveReport()

    # -- output -------------------------------------------------------------------------
    def _write(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        self.report.tar_bytes += n
        if self._fill + n > len(self._buf):
            self._flush()
            if n >= len(self._buf):
                self._sink.write(data)
                return
        self._buf[self._fill : self._fill + n] = data
        self._fill += n

    def _flush(self) -> None:
        """Hand the buffered tar stream to the sink (which consumes it before returning)."""
        if self._fill:
            self._sink.write(memoryview(self._buf)[: self._fill])
            self._fill = 0

    def _warn(self, path: bytes, reason: str) -> None:
        self.report.warnings.append(Warning(path, reason))

    def _past_deadline(self) -> bool:
        return self._deadline is not None and self._clock() >= self._deadline

    def finish(self) -> ArchiveReport:
        self._write(tarheader.end_of_archive(self.report.tar_bytes))
        self._flush()
        return self.report

    # -- file data ----------------------------------------------------------------------
    def _copy(self, fd: int, path: bytes, size: int, sparse: bool = False) -> tuple[str | None, int | None]:
        """Exactly `size` bytes of the file into the sink, then the block padding; returns
        its digest (when hashing), and where the deadline cut it (None: read whole).

        Reads ask for one byte more than is left, so a file that grew is noticed without an
        extra syscall (most log files fit in one read)."""
        pad = -size % tarheader.BLOCK
        start = self._fill
        if not sparse and start + size + 1 + pad <= len(self._buf):
            # A file that fits the buffer, as most of a tree of small files do: one read, and
            # done if it gave exactly `size` bytes. Anything else (an error, a file that shrank
            # or grew) is read again from its start by the general loop below, which words it.
            try:
                got = os.readv(fd, [self._view[start : start + size + 1]])
            except OSError:
                got = -1
            if got == size:
                end = start + size
                self._buf[end : end + pad] = _ZEROS[:pad]
                self._fill = end + pad
                self.report.tar_bytes += size + pad
                self.report.bytes_read += size
                if self._hash:
                    return hashlib.sha256(self._view[start:end]).hexdigest(), None
                return None, None
            if got > 0:
                os.lseek(fd, 0, os.SEEK_SET)
        h = hashlib.sha256() if self._hash else None
        view = memoryview(self._buf)
        left = size
        grew = eof_seen = False
        while left:
            if left < size and self._past_deadline():
                return None, self._cut(path, size - left, size)
            if sparse:
                hole = self._skip_hole(fd, size - left, left, h)
                if hole:
                    left -= hole
                    continue
            if len(view) - self._fill < MIN_READ:
                self._flush()
            start = self._fill
            want = min(left + 1, len(view) - start)
            try:
                got = os.readv(fd, [view[start : start + want]])
            except OSError as err:
                self._warn(
                    path, f"read error after {size - left} bytes ({err.strerror}); rest padded with zeros"
                )
                self._pad(left, h)
                eof_seen = True
                break
            if got == 0:
                self._warn(path, f"shrank during read from {size} to {size - left} bytes; padded with zeros")
                self._pad(left, h)
                eof_seen = True
                break
            if got > left:
                got, grew = left, True
            elif got < want:
                eof_seen = True  # a short read of a regular file is its end
            # The data is in the buffer already: count it in, as _write would.
            self._fill += got
            self.report.tar_bytes += got
            if h:
                h.update(view[start : start + got])
            left -= got
            self.report.bytes_read += got
        if not grew and not eof_seen:
            try:
                grew = bool(os.read(fd, 1))
            except OSError:
                grew = False
        if grew:
            self._warn(path, f"grew during read; cut at {size} bytes")
        self._write(b"\0" * tarheader.padding(size))
        return (h.hexdigest() if h else None), None

    def _cut(self, path: bytes, kept: int, size: int) -> int:
        """The deadline passed `kept` bytes into the file: zeros for the rest, unread."""
        self._warn(path, f"cut short at {kept} of {size} bytes by --max-duration; the rest is zeros")
        self.report.cut.append((path, kept, size))
        self._pad(size - kept, None)
        self._write(b"\0" * tarheader.padding(size))
        return kept

    def _skip_hole(self, fd: int, offset: int, left: int, h: Any) -> int:
        """At a hole: write its zeros (up to the next data or the end), seek past it, and
        return its length; 0 when data starts at `offset`."""
        try:
            data_at = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole remains up to EOF
            data_at = offset + left
        hole = min(data_at, offset + left) - offset
        os.lseek(fd, offset + max(hole, 0), os.SEEK_SET)
        if hole <= 0:
            return 0
        self._pad(hole, h)
        return hole

    def _pad(self, count: int, h: Any) -> None:
        zeros = bytes(min(count, READ_SIZE))
        while count:
            n = min(count, len(zeros))
            self._write(zeros[:n])
            if h:
                h.update(zeros[:n])
            count -= n
