"""A producer's bytes, compressed, as one multipart upload: the shape every archive object
takes (the termination archive, its journal, a shipped segment, a hand-off).

The producer writes into the compressor, the compressor into the upload; a cancel event is
checked on both sides, and any failure aborts the upload (MultipartUpload.__exit__).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from instance_agent import s3args
from instance_agent.compress import open_compressor
from instance_agent.config import Config
from instance_agent.errors import Cancelled
from instance_agent.partsize import PartSizer
from instance_agent.s3upload import MultipartUpload, S3Client


class _CancellableSink:
    """Checks the cancel event on every write, so a stop request ends the stream promptly."""

    def __init__(self, inner: Any, cancel: threading.Event) -> None:
        self._inner, self._cancel = inner, cancel

    def write(self, data: bytes | bytearray | memoryview, /) -> object:
        if self._cancel.is_set():
            raise Cancelled("backup cancelled")
        return self._inner.write(data)


def upload_stream(
    cfg: Config,
    s3: S3Client,
    key: str,
    produce: Callable[[Any], None],
    cancel: threading.Event | None = None,
    *,
    threads: int | None = None,
    wrap: Callable[[Any], Any] | None = None,
) -> tuple[int, int]:
    """Run `produce(compressor)` into a multipart upload. Returns (raw bytes in, bytes sent).

    If `produce` raises, the upload is aborted by MultipartUpload.__exit__ and the error
    propagates: a producer failure can never look like a clean end of stream. `threads`
    sets the compressor's (0: in the calling thread) and `wrap` wraps the compressed
    stream before the upload (shipping paces and counts it there).
    """
    bucket = cfg.bucket or ""
    upload = MultipartUpload(
        s3,
        bucket,
        key,
        sizer=PartSizer.for_max(cfg.max_archive_size),
        workers=cfg.upload_workers,
        queue=cfg.upload_queue,
        extra=s3args.write_args(cfg),
    )
    with upload:
        # Both sides check the event: a multithreaded zstd can hold tens of MiB that only
        # reach the upload in close(), after the producer has stopped writing.
        out: Any = _CancellableSink(upload, cancel) if cancel is not None else upload
        comp = open_compressor(cfg.compression, wrap(out) if wrap else out, cfg.level, threads)
        produce(_CancellableSink(comp, cancel) if cancel is not None else comp)
        comp.close()
        obj = upload.complete()
    return obj.size, upload.bytes_uploaded
