"""In-memory S3, SNS, CloudWatch and Auto Scaling for the functional tier, and a clock whose
waits move it instead of sleeping.

The AWS fakes answer in the shapes botocore's models give (botocore/data/<service>/…/
service-2.json) and fail with the error codes AWS documents, raised as botocore's
ClientError, so the code under test takes the same branches it takes against AWS. They
check what the agent relies on (create-only writes, multipart part numbers and ETags, SNS's
subject and size limits) and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from botocore.exceptions import ClientError
from unit.fakes import FakeAutoScaling, FakeClock, client_error

__all__ = [
    "ClockEvent",
    "FakeCloudWatch",
    "FakeGroup",
    "FakeS3",
    "FakeSNS",
    "ScriptedClock",
    "client_error",
]

RUNAWAY = 30 * 86400.0  # fake seconds: a wait loop that never ends fails the test instead


class ScriptedClock(FakeClock):
    """A FakeClock that also runs what a test scheduled (`after`) once time reaches it: the
    world changes while the job waits (a deregistration delay ends, another run releases
    the lock)."""

    def __init__(self, start: float = 1000.0) -> None:
        super().__init__(start)
        self.start = start
        self._due: list[tuple[float, Callable[[], object]]] = []
        self._lock = threading.Lock()

    def after(self, seconds: float, action: Callable[[], object]) -> None:
        self._due.append((self.now + seconds, action))

    def sleep(self, seconds: float) -> bool:
        with self._lock:
            super().sleep(seconds)
            if self.now - self.start > RUNAWAY:
                raise AssertionError(f"runaway wait: {self.now - self.start:.0f} fake seconds")
            due = [d for d in self._due if d[0] <= self.now]
            self._due = [d for d in self._due if d[0] > self.now]
        for _at, action in sorted(due, key=lambda d: d[0]):
            action()
        return False

    @property
    def elapsed(self) -> float:
        return self.now - self.start


class ClockEvent(threading.Event):
    """The job's cancel event. A wait in the thread that made it (the job's) moves the fake
    clock by its timeout instead of sleeping; other threads (the drain gate's interrupt
    waiter) wait for real, so they cannot move the job's clock under it. `cancel_after`
    sets the event once the clock gets there: a stop signal at a chosen moment."""

    def __init__(self, clock: ScriptedClock) -> None:
        super().__init__()
        self.clock = clock
        self.owner = threading.current_thread()
        self.waits: list[float] = []

    def cancel_after(self, seconds: float) -> None:
        self.clock.after(seconds, self.set)

    def wait(self, timeout: float | None = None) -> bool:
        if self.is_set():
            return True
        if timeout is None or threading.current_thread() is not self.owner:
            return super().wait(timeout)
        self.waits.append(timeout)
        self.clock.sleep(timeout)
        return self.is_set()


def _s3_error(code: str, message: str, status: int, **more: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message, **more}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "op",
    )


def precondition_failed() -> ClientError:
    """What S3 answers a create-only write (If-None-Match: *) on an existing key."""
    return _s3_error(
        "PreconditionFailed",
        "At least one of the pre-conditions you specified did not hold",
        412,
        Condition="If-None-Match",
    )


def _read(body: Any) -> bytes:
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    return bytes(body.read())


def _crc32(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def _etag(data: bytes) -> str:
    return '"' + hashlib.md5(data).hexdigest() + '"'


MIN_PART = 5 * 1024 * 1024  # S3: every part but the last is at least 5 MiB (EntityTooSmall)


@dataclass
class StoredObject:
    body: bytes
    etag: str
    args: dict[str, Any]  # the write's other arguments (ContentType, SSE, StorageClass…)
    modified: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


@dataclass
class FakeS3:
    """The S3 calls of the archive pipeline: multipart uploads, create-only PutObject and
    CompleteMultipartUpload, HeadObject, GetObject, ListObjectsV2, ListMultipartUploads.

    `errors[operation]` are raised, first to last, before the call does anything (the
    operation names are the API's: "UploadPart", "PutObject"…)."""

    buckets: set[str] = field(default_factory=lambda: {"backups"})
    objects: dict[tuple[str, str], StoredObject] = field(default_factory=dict)
    uploads: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, list[Exception]] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)  # keys whose upload was aborted
    # Run as an operation starts (a stop signal that arrives just then, say).
    before: dict[str, Callable[[], object]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _enter(self, name: str, kwargs: Mapping[str, Any]) -> None:
        hook = self.before.get(name)
        if hook is not None:
            hook()
        with self._lock:
            self.calls.append((name, {k: v for k, v in kwargs.items() if k != "Body"}))
            queue = self.errors.get(name) or []
            err = queue.pop(0) if queue else None
        if err is not None:
            raise err
        if kwargs["Bucket"] not in self.buckets:
            raise _s3_error("NoSuchBucket", "The specified bucket does not exist", 404)

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.calls if n == name)

    # -- writes -------------------------------------------------------------------------
    def _store(self, bucket: str, key: str, body: bytes, kwargs: Mapping[str, Any]) -> str:
        if kwargs.get("IfNoneMatch") not in (None, "*"):
            raise _s3_error("NotImplemented", "If-None-Match accepts only *", 501)
        etag = _etag(body)
        args = {
            k: v
            for k, v in kwargs.items()
            if k not in ("Bucket", "Key", "Body", "UploadId", "MultipartUpload", "IfNoneMatch")
        }
        with self._lock:
            if kwargs.get("IfNoneMatch") == "*" and (bucket, key) in self.objects:
                raise precondition_failed()
            self.objects[(bucket, key)] = StoredObject(body, etag, args)
        return etag

    def put_object(self, **kwargs: Any) -> Mapping[str, Any]:
        self._enter("PutObject", kwargs)
        body = _read(kwargs.get("Body", b""))
        etag = self._store(kwargs["Bucket"], kwargs["Key"], body, kwargs)
        return {"ETag": etag, "ChecksumCRC32": _crc32(body)}

    def create_multipart_upload(self, **kwargs: Any) -> Mapping[str, Any]:
        self._enter("CreateMultipartUpload", kwargs)
        upload_id = uuid.uuid4().hex
        with self._lock:
            self.uploads[upload_id] = {
                "Bucket": kwargs["Bucket"],
                "Key": kwargs["Key"],
                "parts": {},
                "args": {k: v for k, v in kwargs.items() if k not in ("Bucket", "Key")},
                "Initiated": datetime.now(timezone.utc),
            }
        return {"Bucket": kwargs["Bucket"], "Key": kwargs["Key"], "UploadId": upload_id}

    def _upload(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        up = self.uploads.get(str(kwargs.get("UploadId")))
        if up is None or up["Key"] != kwargs["Key"] or up["Bucket"] != kwargs["Bucket"]:
            raise _s3_error(
                "NoSuchUpload",
                "The specified upload does not exist. The upload ID may be invalid, or the "
                "upload may have been aborted or completed.",
                404,
            )
        return up

    def upload_part(self, **kwargs: Any) -> Mapping[str, Any]:
        self._enter("UploadPart", kwargs)
        body = _read(kwargs["Body"])
        number = int(kwargs["PartNumber"])
        if not 1 <= number <= 10_000:
            raise _s3_error("InvalidArgument", "Part number must be an integer between 1 and 10000", 400)
        with self._lock:
            up = self._upload(kwargs)
            up["parts"][number] = (body, _etag(body))
        return {"ETag": _etag(body), "ChecksumCRC32": _crc32(body)}

    def complete_multipart_upload(self, **kwargs: Any) -> Mapping[str, Any]:
        self._enter("CompleteMultipartUpload", kwargs)
        with self._lock:
            up = self._upload(kwargs)
        listed = kwargs["MultipartUpload"]["Parts"]
        numbers = [int(p["PartNumber"]) for p in listed]
        if numbers != sorted(set(numbers)) or not numbers:
            raise _s3_error("InvalidPartOrder", "The list of parts was not in ascending order.", 400)
        chunks = []
        for i, part in enumerate(listed):
            stored = up["parts"].get(int(part["PartNumber"]))
            if stored is None or stored[1] != part["ETag"]:
                raise _s3_error("InvalidPart", "One or more of the specified parts could not be found.", 400)
            if i < len(listed) - 1 and len(stored[0]) < MIN_PART:
                raise _s3_error(
                    "EntityTooSmall", "Your proposed upload is smaller than the minimum allowed size", 400
                )
            chunks.append(stored[0])
        body = b"".join(chunks)
        etag = self._store(kwargs["Bucket"], kwargs["Key"], body, {**up["args"], **kwargs})
        with self._lock:
            self.uploads.pop(str(kwargs["UploadId"]), None)
        return {"Bucket": kwargs["Bucket"], "Key": kwargs["Key"], "ETag": etag}

    def abort_multipart_upload(self, **kwargs: Any) -> Mapping[str, Any]:
        self._enter("AbortMultipartUpload", kwargs)
        with self._lock:
            self._upload(kwargs)
            self.uploads.pop(str(kwargs["UploadId"]))
            self.aborted.append(str(kwargs["Key"]))
        return {}

    # -- reads --------------------------------------------------------------------------
    def _get(self, kwargs: Mapping[str, Any], missing: ClientError) -> StoredObject:
        found = self.objects.get((kwargs["Bucket"], kwargs["Key"]))
        if found is None:
            raise missing
        return found

    def head_object(self, **kwargs: Any) -> Mapping[str, Any]:
        self._enter("HeadObject", kwargs)
        # HEAD has no body: botocore reports the bare status as the code.
        obj = self._get(kwargs, _s3_error("404", "Not Found", 404))
        return {"ContentLength": len(obj.body), "ETag": obj.etag, "LastModified": obj.modified}

    def get_object(self, **kwargs: Any) -> Mapping[str, Any]:
        import io

        self._enter("GetObject", kwargs)
        obj = self._get(kwargs, _s3_error("NoSuchKey", "The specified key does not exist.", 404))
        return {"Body": io.BytesIO(obj.body), "ContentLength": len(obj.body), "ETag": obj.etag}

    def list_objects_v2(self, **kwargs: Any) -> Mapping[str, Any]:
        self._enter("ListObjectsV2", kwargs)
        prefix, start = kwargs.get("Prefix", ""), kwargs.get("ContinuationToken", "")
        limit = int(kwargs.get("MaxKeys", 1000))
        keys = sorted(
            k for b, k in self.objects if b == kwargs["Bucket"] and k.startswith(prefix) and k > start
        )
        page, rest = keys[:limit], keys[limit:]
        out: dict[str, Any] = {
            "Contents": [
                {
                    "Key": k,
                    "Size": len(self.objects[(kwargs["Bucket"], k)].body),
                    "ETag": self.objects[(kwargs["Bucket"], k)].etag,
                    "LastModified": self.objects[(kwargs["Bucket"], k)].modified,
                }
                for k in page
            ],
            "KeyCount": len(page),
            "IsTruncated": bool(rest),
            "Prefix": prefix,
        }
        if rest:
            out["NextContinuationToken"] = page[-1]
        return out

    def list_multipart_uploads(self, **kwargs: Any) -> Mapping[str, Any]:
        self._enter("ListMultipartUploads", kwargs)
        prefix = kwargs.get("Prefix", "")
        with self._lock:
            ups = [
                {"Key": u["Key"], "UploadId": uid, "Initiated": u["Initiated"]}
                for uid, u in self.uploads.items()
                if u["Bucket"] == kwargs["Bucket"] and u["Key"].startswith(prefix)
            ]
        return {
            "Bucket": kwargs["Bucket"],
            "Uploads": sorted(ups, key=lambda u: u["Key"]),
            "IsTruncated": False,
        }

    # -- for assertions -----------------------------------------------------------------
    def object_keys(self, bucket: str = "backups") -> list[str]:
        return sorted(k for b, k in self.objects if b == bucket)

    def body(self, key: str, bucket: str = "backups") -> bytes:
        return self.objects[(bucket, key)].body


@dataclass
class FakeSNS:
    """Publish, with SNS's limits: the topic must exist, a Subject under 100 characters on one
    line, a message of at most 256 KiB."""

    topics: set[str] = field(default_factory=lambda: {"arn:aws:sns:us-east-1:123456789012:backups"})
    published: list[dict[str, Any]] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)

    def publish(self, **kwargs: Any) -> Mapping[str, Any]:
        if self.errors:
            raise self.errors.pop(0)
        if kwargs.get("TopicArn") not in self.topics:
            raise client_error("NotFound", "Topic does not exist", 404)
        subject = kwargs.get("Subject", "")
        if len(subject) >= 100 or "\n" in subject:
            raise client_error("InvalidParameter", "Invalid parameter: Subject", 400)
        if len(kwargs["Message"].encode()) > 256 * 1024:
            raise client_error("InvalidParameter", "Invalid parameter: Message too long", 400)
        self.published.append(kwargs)
        return {"MessageId": str(uuid.uuid4())}

    def messages(self) -> list[dict[str, Any]]:
        """The bodies, as the subscriber reads them."""
        return [json.loads(p["Message"]) for p in self.published]


@dataclass
class FakeCloudWatch:
    """PutMetricData: at most 1,000 data per call (CloudWatch's limit)."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)

    def put_metric_data(self, **kwargs: Any) -> Mapping[str, Any]:
        if self.errors:
            raise self.errors.pop(0)
        if len(kwargs["MetricData"]) > 1000:
            raise client_error("InvalidParameterValue", "The collection MetricData must not exceed 1000", 400)
        self.calls.append(kwargs)
        return {}

    def values(self, name: str) -> list[float]:
        return [d["Value"] for c in self.calls for d in c["MetricData"] if d["MetricName"] == name]


@dataclass
class FakeGroup(FakeAutoScaling):
    """FakeAutoScaling with what the retained path calls, and the state after completion
    the group would show (`after_complete`: a result to the next lifecycle state)."""

    # The states DescribeAutoScalingInstances shows after a completion with that result, one
    # per call, the last one from then on.
    after_complete: dict[str, list[str | None]] = field(
        default_factory=lambda: {"CONTINUE": ["Terminating:Proceed"], "ABANDON": ["Terminating:Proceed"]}
    )
    terminated: list[dict[str, Any]] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)  # the results Auto Scaling accepted
    # Set: the action has expired by the time of the completion (its heartbeat or global
    # timeout), which finds no action, and DescribeAutoScalingInstances shows these states.
    expired_at_completion: list[str | None] | None = None

    def set_state(self, state: str | None) -> None:
        self.states = [state]

    def complete_lifecycle_action(self, **kwargs: Any) -> Mapping[str, Any]:
        if self.expired_at_completion is not None:
            self.live = False
            self.states = list(self.expired_at_completion)
        out = super().complete_lifecycle_action(**kwargs)
        self.completed.append(kwargs["LifecycleActionResult"])
        self.states = list(self.after_complete.get(kwargs["LifecycleActionResult"], ["Terminating:Proceed"]))
        return out

    def terminate_instance_in_auto_scaling_group(self, **kwargs: Any) -> Mapping[str, Any]:
        self._enter("TerminateInstanceInAutoScalingGroup", kwargs)
        self.terminated.append(kwargs)
        self.set_state("Terminating")
        return {"Activity": {"ActivityId": str(uuid.uuid4()), "StatusCode": "InProgress"}}
