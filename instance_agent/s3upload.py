"""S3 adapter: a write-only stream that becomes a multipart upload, with bounded memory.

Bytes written are cut into numbered parts; each full part goes to a worker pool that uploads
it with a CRC32 checksum. A semaphore admits at most `workers + queue` parts in flight, so
the writer blocks (and memory stays at about (workers + queue + 1) × part size) whatever the
size of the stream. Any failure, ours or the producer's, aborts the upload: `__exit__` with
an exception waits for in-flight parts, then calls AbortMultipartUpload.

Part sizes grow linearly from 8 MiB so that 10,000 parts (S3's limit) reach
`max_archive_size`: small archives get small parts, and a stream of unknown length can still
reach the configured maximum.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from instance_agent.errors import ArchiveTooLarge, UploadError

log = logging.getLogger(__name__)

MIN_PART = 8 * 1024 * 1024  # above S3's 5 MiB minimum; the size most S3 clients default to
MAX_PART = 5 * 1024**3  # S3's maximum part size
MAX_PARTS = 10_000  # S3's maximum part count
MAX_OBJECT = 5 * 1024**4  # S3's maximum object size


class S3Client(Protocol):
    """The subset of the S3 API the agent uses."""

    def create_multipart_upload(self, **kwargs: Any) -> Mapping[str, Any]: ...
    def upload_part(self, **kwargs: Any) -> Mapping[str, Any]: ...
    def complete_multipart_upload(self, **kwargs: Any) -> Mapping[str, Any]: ...
    def abort_multipart_upload(self, **kwargs: Any) -> Mapping[str, Any]: ...
    def put_object(self, **kwargs: Any) -> Mapping[str, Any]: ...


def describe_client_error(err: Exception) -> str:
    if isinstance(err, ClientError):
        e = err.response.get("Error", {})
        return f"{e.get('Code', 'Error')}: {e.get('Message', '')}".strip()
    return f"{type(err).__name__}: {err}"


@dataclass(frozen=True)
class PartSizer:
    """Part n (1-based) is `base + (n - 1) * growth` bytes."""

    base: int
    growth: int

    @classmethod
    def for_max(cls, max_size: int, base: int = MIN_PART) -> PartSizer:
        if max_size > MAX_OBJECT:
            raise ValueError(f"max archive size {max_size} exceeds S3's 5 TiB object limit")
        extra = max_size - MAX_PARTS * base
        if extra <= 0:
            return cls(base, 0)
        # Sum of sizes over 10,000 parts = N*base + growth*N*(N-1)/2 >= max_size.
        n = MAX_PARTS
        growth = -(-2 * extra // (n * (n - 1)))
        return cls(base, growth)

    def size(self, n: int) -> int:
        return min(self.base + (n - 1) * self.growth, MAX_PART)

    def capacity(self) -> int:
        return sum(self.size(n) for n in range(1, MAX_PARTS + 1))


@dataclass(frozen=True)
class UploadedObject:
    key: str
    size: int
    parts: int
    etag: str


class MultipartUpload:
    def __init__(
        self,
        client: S3Client,
        bucket: str,
        key: str,
        *,
        sizer: PartSizer,
        workers: int = 4,
        queue: int = 2,
        extra: Mapping[str, Any] | None = None,
        content_type: str = "application/octet-stream",
        on_part: Callable[[int, int], None] | None = None,
    ) -> None:
        self.bucket, self.key = bucket, key
        self._client = client
        self._sizer = sizer
        self._extra = dict(extra or {})
        # ExpectedBucketOwner (and only it) must ride on every call, not just the create.
        self._owner = {k: v for k, v in self._extra.items() if k == "ExpectedBucketOwner"}
        self._content_type = content_type
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="upload")
        self._slots = threading.BoundedSemaphore(workers + queue)
        self._buf = bytearray()
        self._next = 1
        self._parts: dict[int, dict[str, Any]] = {}
        self._futures: list[Future[None]] = []
        self._error: Exception | None = None
        self._lock = threading.Lock()
        self._on_part = on_part
        self.upload_id: str | None = None
        self.bytes_written = 0
        self.bytes_uploaded = 0

    # -- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> MultipartUpload:
        try:
            resp = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=self.key, ChecksumAlgorithm="CRC32",
                ContentType=self._content_type, **self._extra,
            )
        except (ClientError, BotoCoreError) as err:
            self._pool.shutdown(wait=False)
            raise UploadError(f"s3://{self.bucket}/{self.key}: CreateMultipartUpload failed: "
                              f"{describe_client_error(err)}") from None
        self.upload_id = str(resp["UploadId"])
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            self.abort()

    # -- writing ------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            size = self._sizer.size(self._next)
            room = size - len(self._buf)
            self._buf += view[:room]
            view = view[room:]
            if len(self._buf) >= size:
                self._submit(bytes(self._buf))
                self._buf = bytearray()
        self.bytes_written += total
        return total

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise UploadError(f"s3://{self.bucket}/{self.key}: {self._error}")

    def _submit(self, body: bytes) -> None:
        n = self._next
        if n > MAX_PARTS:
            raise ArchiveTooLarge(
                f"archive exceeds --max-archive-size ({self._sizer.capacity()} bytes in "
                f"{MAX_PARTS} parts); raise it")
        self._next += 1
        # Wait for a slot, but notice a failed part while waiting instead of blocking forever.
        while not self._slots.acquire(timeout=0.5):
            self._raise_if_failed()
        self._raise_if_failed()
        fut = self._pool.submit(self._upload_part, n, body)
        fut.add_done_callback(lambda _f: self._slots.release())
        self._futures.append(fut)

    def _upload_part(self, n: int, body: bytes) -> None:
        if self._error is not None:
            return  # another part failed: the upload will be aborted, don't add to it
        try:
            resp = self._client.upload_part(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=n,
                Body=body, ChecksumAlgorithm="CRC32", **self._owner,
            )
        except Exception as err:
            with self._lock:
                if self._error is None:
                    self._error = UploadError(f"UploadPart {n} failed: {describe_client_error(err)}")
            return
        with self._lock:
            self._parts[n] = {"PartNumber": n, "ETag": resp["ETag"],
                              "ChecksumCRC32": resp.get("ChecksumCRC32")}
            self.bytes_uploaded += len(body)
        if self._on_part:
            self._on_part(n, len(body))

    def _drain(self) -> None:
        for fut in self._futures:
            fut.result()
        self._pool.shutdown(wait=True)

    def complete(self) -> UploadedObject:
        """Send the last part, wait for all, and complete. Raises UploadError on any failure."""
        if self._buf or self._next == 1:
            self._submit(bytes(self._buf))
            self._buf = bytearray()
        self._drain()
        self._raise_if_failed()
        parts = []
        for n in sorted(self._parts):
            part = {k: v for k, v in self._parts[n].items() if v is not None}
            parts.append(part)
        try:
            resp = self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                MultipartUpload={"Parts": parts}, **self._owner,
            )
        except (ClientError, BotoCoreError) as err:
            raise UploadError(f"s3://{self.bucket}/{self.key}: CompleteMultipartUpload failed: "
                              f"{describe_client_error(err)}") from None
        return UploadedObject(self.key, self.bytes_written, len(parts), str(resp.get("ETag", "")))

    def abort(self) -> None:
        """Stop, wait for in-flight parts (an abort racing a part upload can leave the part
        behind), then abort. Failure to abort is logged: the bucket's
        AbortIncompleteMultipartUpload rule is the backstop."""
        with self._lock:
            if self._error is None:
                self._error = UploadError("aborted")
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.upload_id is None:
            return
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=self.key,
                                                UploadId=self.upload_id, **self._owner)
            log.info("multipart upload aborted", extra={"fields": {"key": self.key}})
        except (ClientError, BotoCoreError) as err:
            log.error("abort of multipart upload failed",
                      extra={"fields": {"key": self.key, "error": describe_client_error(err)}})


def put_small(client: S3Client, bucket: str, key: str, body: bytes, *,
              extra: Mapping[str, Any] | None = None,
              content_type: str = "application/json") -> None:
    """One PutObject, for the manifest."""
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type,
                          ChecksumAlgorithm="CRC32", **dict(extra or {}))
    except (ClientError, BotoCoreError) as err:
        raise UploadError(f"s3://{bucket}/{key}: PutObject failed: "
                          f"{describe_client_error(err)}") from None
