"""S3 adapter: a write-only stream that becomes a multipart upload, with bounded memory.

Bytes written are cut into numbered parts; each full part goes to a worker pool that uploads
it with a CRC32 checksum. A semaphore admits at most `workers + queue` parts in flight, so
the writer blocks (and memory stays at about (workers + queue + 1) × part size) whatever the
size of the stream. Any failure, ours or the producer's, aborts the upload: `__exit__` with
an exception waits for in-flight parts, then calls AbortMultipartUpload.

Part buffers are allocated once and reused (a pool of workers + queue + 1), and a part is
handed to botocore as a read-only view, never copied: fresh 8 MiB allocations per part made
glibc's dynamic mmap threshold keep freed parts in per-thread arenas, and RSS grew with the
size of the stream.

Part sizes come from partsize.PartSizer (pure arithmetic, shared with the config's check).
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from instance_agent import awserror, s3args
from instance_agent.errors import ArchiveTooLarge, ObjectExists, UploadError
from instance_agent.partsize import MAX_PARTS, PartSizer

log = logging.getLogger(__name__)

# Conditional writes: with If-None-Match '*', PutObject and CompleteMultipartUpload create the
# key only if it does not exist yet, else S3 answers 412 PreconditionFailed ("How to prevent
# object overwrites with conditional writes", Amazon S3 user guide,
# https://docs.aws.amazon.com/AmazonS3/latest/userguide/conditional-writes.html;
# docs/aws-behaviour.md, "S3"). A backup must never replace an earlier one.
CREATE_ONLY = {"IfNoneMatch": "*"}
# What list and restore read must stay readable at once, so only the archive itself takes the
# configured storage class: a GLACIER manifest or journal would need a restore request first.
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tar.zst")


class S3Client(Protocol):
    """The subset of the S3 API the agent uses."""

    def create_multipart_upload(self, **kwargs: Any) -> Mapping[str, Any]: ...
    def upload_part(self, **kwargs: Any) -> Mapping[str, Any]: ...
    def complete_multipart_upload(self, **kwargs: Any) -> Mapping[str, Any]: ...
    def abort_multipart_upload(self, **kwargs: Any) -> Mapping[str, Any]: ...
    def put_object(self, **kwargs: Any) -> Mapping[str, Any]: ...
    def head_object(self, **kwargs: Any) -> Mapping[str, Any]: ...
    def list_multipart_uploads(self, **kwargs: Any) -> Mapping[str, Any]: ...
    # Reading back this instance's segment manifests (ledgerseed.py).
    def list_objects_v2(self, **kwargs: Any) -> Mapping[str, Any]: ...
    def get_object(self, **kwargs: Any) -> Mapping[str, Any]: ...


_EXISTS_CODES = ("PreconditionFailed", "412")  # a create-only write met an existing object


def describe_client_error(err: Exception) -> str:
    if awserror.code_of(err) in _EXISTS_CODES:
        return (
            "PreconditionFailed: an object already exists at this key; an earlier backup is never overwritten"
        )
    return awserror.describe(err)


def upload_error(what: str, err: Exception) -> UploadError:
    """Our error for a failed S3 call: ObjectExists for a create-only conflict, so that a
    caller that expects one (a segment shipped again) tests the type, never the text."""
    kind = ObjectExists if awserror.code_of(err) in _EXISTS_CODES else UploadError
    return kind(f"{what}: {describe_client_error(err)}", code=awserror.code_of(err))


def extra_for(key: str, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """The request arguments for `key`: StorageClass only on archives (ARCHIVE_SUFFIXES)."""
    out = dict(extra or {})
    if not key.endswith(ARCHIVE_SUFFIXES):
        out.pop("StorageClass", None)
    return out


class ChainBody(io.RawIOBase):
    """A seekable, read-only file over one or more buffers: botocore reads it (for the
    checksum, for the request, again on a retry) without the data ever being joined or copied
    whole. A part is one buffer; the manifest is its head, the entries text and its tail."""

    def __init__(self, *views: memoryview | bytes) -> None:
        super().__init__()
        self._views = [memoryview(v).cast("B") for v in views if len(v)]
        self._size = sum(len(v) for v in self._views)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def __len__(self) -> int:
        return self._size

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, min(base + offset, self._size))
        return self._pos

    def _slices(self, start: int, end: int) -> list[memoryview]:
        out, offset = [], 0
        for view in self._views:
            lo, hi = max(start - offset, 0), min(end - offset, len(view))
            if lo < hi:
                out.append(view[lo:hi])
            offset += len(view)
        return out

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        n = 0
        for piece in self._slices(self._pos, min(self._pos + len(target), self._size)):
            target[n : n + len(piece)] = piece
            n += len(piece)
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._pos + size, self._size)
        data = b"".join(self._slices(self._pos, end))
        self._pos = end
        return data


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
        workers: int = 3,
        queue: int = 1,
        extra: Mapping[str, Any] | None = None,
        content_type: str = "application/octet-stream",
    ) -> None:
        self.bucket, self.key = bucket, key
        self._client = client
        self._sizer = sizer
        self._extra = extra_for(key, extra)
        # ExpectedBucketOwner (and only it) must ride on every call, not just the create.
        self._owner = s3args.owner_only(self._extra)
        self._content_type = content_type
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="upload")
        self._slots = threading.BoundedSemaphore(workers + queue)
        # Free part buffers; one more than the slots, for the part being filled.
        self._free: list[bytearray] = []
        self._buf = bytearray(0)
        self._fill = 0
        self._next = 1
        self._parts: dict[int, dict[str, Any]] = {}
        self._futures: list[Future[None]] = []
        self._error: UploadError | None = None
        self._lock = threading.Lock()
        self.upload_id: str | None = None
        self.bytes_written = 0
        self.bytes_uploaded = 0

    # -- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> MultipartUpload:
        try:
            resp = self._client.create_multipart_upload(
                Bucket=self.bucket,
                Key=self.key,
                ChecksumAlgorithm="CRC32",
                ContentType=self._content_type,
                **self._extra,
            )
        except (ClientError, BotoCoreError) as err:
            self._pool.shutdown(wait=False)
            raise upload_error(f"s3://{self.bucket}/{self.key}: CreateMultipartUpload failed", err) from None
        self.upload_id = str(resp["UploadId"])
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self.abort()

    # -- writing ------------------------------------------------------------------------
    def _buffer_for(self, size: int) -> bytearray:
        with self._lock:
            while self._free:
                buf = self._free.pop()
                if len(buf) >= size:
                    return buf
        return bytearray(size)  # the first parts, or the part size just stepped up

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            size = self._sizer.size(self._next)
            if not self._buf:
                self._buf, self._fill = self._buffer_for(size), 0
            n = min(size - self._fill, len(view))
            self._buf[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill >= size:
                self._submit_current()
        self.bytes_written += total
        return total

    def _submit_current(self) -> None:
        buf, fill = self._buf, self._fill
        self._buf, self._fill = bytearray(0), 0
        self._submit(buf, fill)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err = self._error
            raise type(err)(f"s3://{self.bucket}/{self.key}: {err}", code=err.code)

    def _submit(self, buf: bytearray, length: int) -> None:
        n = self._next
        if n > MAX_PARTS:
            raise ArchiveTooLarge(
                f"archive exceeds --max-archive-size ({self._sizer.capacity()} bytes in "
                f"{MAX_PARTS} parts); raise it"
            )
        self._next += 1
        # Wait for a slot, but notice a failed part while waiting instead of blocking forever.
        while not self._slots.acquire(timeout=0.5):
            self._raise_if_failed()
        self._raise_if_failed()
        fut = self._pool.submit(self._upload_part, n, buf, length)
        fut.add_done_callback(lambda _f: self._slots.release())
        self._futures.append(fut)

    def _upload_part(self, n: int, buf: bytearray, length: int) -> None:
        try:
            self._send_part(n, memoryview(buf)[:length])
        finally:
            with self._lock:
                self._free.append(buf)

    def _send_part(self, n: int, body: memoryview) -> None:
        if self._error is not None:
            return  # another part failed: the upload will be aborted, don't add to it
        try:
            resp = self._client.upload_part(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                PartNumber=n,
                Body=ChainBody(body),
                ChecksumAlgorithm="CRC32",
                **self._owner,
            )
        except Exception as err:
            with self._lock:
                if self._error is None:
                    self._error = upload_error(f"UploadPart {n} failed", err)
            return
        with self._lock:
            self._parts[n] = {
                "PartNumber": n,
                "ETag": resp["ETag"],
                "ChecksumCRC32": resp.get("ChecksumCRC32"),
            }
            self.bytes_uploaded += len(body)

    def _drain(self) -> None:
        for fut in self._futures:
            fut.result()
        self._pool.shutdown(wait=True)

    def complete(self) -> UploadedObject:
        """Send the last part, wait for all, and complete. Raises UploadError on any failure."""
        if self._fill or self._next == 1:
            if not self._buf:
                self._buf = bytearray(0)
            self._submit_current()
        self._drain()
        self._raise_if_failed()
        parts = []
        for n in sorted(self._parts):
            part = {k: v for k, v in self._parts[n].items() if v is not None}
            parts.append(part)
        try:
            resp = self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": parts},
                **CREATE_ONLY,
                **self._owner,
            )
        except (ClientError, BotoCoreError) as err:
            raise upload_error(
                f"s3://{self.bucket}/{self.key}: CompleteMultipartUpload failed", err
            ) from None
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
            self._client.abort_multipart_upload(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, **self._owner
            )
            log.info("multipart upload aborted", extra={"fields": {"key": self.key}})
        except (ClientError, BotoCoreError) as err:
            log.error(
                "abort of multipart upload failed",
                extra={"fields": {"key": self.key, "error": describe_client_error(err)}},
            )


def put_small(
    client: S3Client,
    bucket: str,
    key: str,
    body: bytes | ChainBody,
    *,
    extra: Mapping[str, Any] | None = None,
    content_type: str = "application/json",
) -> None:
    """One PutObject, for the manifest."""
    try:
        client.put_object(
            Bucket=bucket,
            Key=key,
            Body=body,
            ContentType=content_type,
            ChecksumAlgorithm="CRC32",
            **CREATE_ONLY,
            **extra_for(key, extra),
        )
    except (ClientError, BotoCoreError) as err:
        raise upload_error(f"s3://{bucket}/{key}: PutObject failed", err) from None


def abort_stale_uploads(
    client: S3Client, bucket: str, prefix: str, must_contain: str, *, extra: Mapping[str, Any] | None = None
) -> int:
    """Abort incomplete multipart uploads left by a killed run of this instance.

    Only keys under `prefix` that contain `must_contain` (the instance id) are touched, so
    other instances' uploads in flight are safe. Failures are logged, never raised: the
    bucket's AbortIncompleteMultipartUpload rule is the backstop.
    """
    owner = s3args.owner_only(extra)
    aborted = 0
    marker: dict[str, str] = {}
    try:
        while True:
            resp = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix, **marker, **owner)
            for up in resp.get("Uploads", []):
                key = str(up["Key"])
                if must_contain in key:
                    client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=up["UploadId"], **owner)
                    aborted += 1
                    log.warning(
                        "aborted a stale multipart upload of an earlier run", extra={"fields": {"key": key}}
                    )
            if not resp.get("IsTruncated"):
                return aborted
            marker = {
                "KeyMarker": str(resp.get("NextKeyMarker", "")),
                "UploadIdMarker": str(resp.get("NextUploadIdMarker", "")),
            }
    except (ClientError, BotoCoreError) as err:
        log.warning(
            "cannot list or abort stale multipart uploads",
            extra={"fields": {"prefix": prefix, "error": describe_client_error(err)}},
        )
        return aborted
