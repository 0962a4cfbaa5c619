"""Streaming compressors with one shape: `write(data)` and `close()`, output into a sink.

zstd runs multithreaded inside libzstd (it releases the GIL), so compression of one block
overlaps reading the next and the uploads; gzip is single-threaded zlib; none passes through.
"""

from __future__ import annotations

import os
import zlib
from typing import Any, Protocol, cast

from instance_agent.tarstream import Sink

DEFAULT_LEVELS = {"zstd": 3, "gzip": 6}
OUT_SIZE = 2 << 20  # zstd's output buffer: see _Zstd


class Compressor(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> object: ...

    def close(self) -> None: ...


class _Plain:
    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def write(self, data: bytes | bytearray | memoryview, /) -> object:
        return self._sink.write(data)

    def close(self) -> None:
        return None


class _Gzip:
    def __init__(self, sink: Sink, level: int) -> None:
        self._sink = sink
        # wbits 31: a gzip wrapper (header + CRC32 trailer), so `gzip -t` and `tar -xzf` work.
        self._z = zlib.compressobj(level, zlib.DEFLATED, 31)

    def write(self, data: bytes | bytearray | memoryview, /) -> object:
        out = self._z.compress(data)
        if out:
            self._sink.write(out)
        return None

    def close(self) -> None:
        self._sink.write(self._z.flush())


class _Zstd:
    def __init__(self, sink: Sink, level: int, threads: int) -> None:
        import zstandard

        cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
        # zstandard's stubs ask for IO[bytes]; it only ever calls sink.write().
        # write_size is the output buffer, and each write() hands on at most one of it once
        # its input is taken: with the default 128 KiB, 1 MiB writes drained less than the
        # workers produced, so compressed output piled up inside libzstd and reached the
        # upload in a burst at close(), leaving parts to upload after compression was done.
        self._writer = cctx.stream_writer(cast(Any, sink), write_size=OUT_SIZE, closefd=False)

    def write(self, data: bytes | bytearray | memoryview, /) -> object:
        return self._writer.write(data)

    def close(self) -> None:
        self._writer.close()  # type: ignore[no-untyped-call]  # ends the frame (with its checksum); the sink stays open


def open_compressor(
    kind: str, sink: Sink, level: int | None = None, threads: int | None = None
) -> Compressor:
    if kind == "none":
        return _Plain(sink)
    lvl = DEFAULT_LEVELS[kind] if level is None else level
    if kind == "gzip":
        return _Gzip(sink, max(0, min(lvl, 9)))
    if kind == "zstd":
        return _Zstd(sink, lvl, threads if threads is not None else (os.cpu_count() or 1))
    raise ValueError(f"unknown compression {kind!r}")
