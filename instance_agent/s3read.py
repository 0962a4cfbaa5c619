"""The S3 read adapter that `list`, `restore` and `verify` share: `s3://` URLs, manifest reads
(whole, or its head from a ranged GET), and the translation of botocore errors into one-line
AgentErrors.

A manifest is read with a ranged GET of its head when only its head is needed (a listing):
the writer puts `totals` before the long lists (warnings, omitted, entries), so the first
64 KiB nearly always hold it; otherwise the whole manifest is read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from instance_agent import awserror, keys
from instance_agent.errors import AgentError, ConfigError

ARCHIVE_SUFFIXES = tuple(sorted(set(keys.EXTENSIONS.values()), key=len, reverse=True))
MANIFEST_SUFFIX = ".manifest.json"
HEAD_BYTES = 64 * 1024  # enough for a manifest's head with dozens of sources and warnings
_HEAD_END = b',"journal":'  # the first key after `totals` in the manifest writer's order


class S3Reader(Protocol):
    """The subset of the S3 API that reading backups uses."""

    def list_objects_v2(self, **kwargs: Any) -> Mapping[str, Any]: ...
    def get_object(self, **kwargs: Any) -> Mapping[str, Any]: ...


class S3ReadError(AgentError):
    """S3 refused or failed a read (list or get)."""


class BackupNotFound(AgentError):
    """No backup matches, or the named object does not exist."""


def s3_failure(err: Exception, what: str) -> AgentError:
    """One line for a failed S3 read; `what` names the object, e.g. `s3://b/k`."""
    if isinstance(err, ClientError):
        code, msg = awserror.code_of(err), awserror.message_of(err)
        if code in ("NoSuchKey", "404", "NotFound"):
            return BackupNotFound(f"{what} does not exist")
        if code == "NoSuchBucket":
            return BackupNotFound(f"{what}: the bucket does not exist")
        if code in ("AccessDenied", "403", "Forbidden"):
            return S3ReadError(
                f"{what}: access denied (the credentials lack s3:GetObject or "
                "s3:ListBucket there, or the bucket belongs to another account)"
            )
        return S3ReadError(f"{what}: {code}: {msg}".rstrip(": "))
    return S3ReadError(f"{what}: {type(err).__name__}: {err}")


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`; ConfigError for anything else."""
    if not url.startswith("s3://"):
        raise ConfigError(f"not an s3:// URL: {url!r} (expected s3://bucket/key)")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket or not key:
        raise ConfigError(f"{url!r} needs a bucket and a key: s3://bucket/key")
    return bucket, key


def archive_key_of(key: str) -> str:
    """The archive key for an archive or manifest key (either may be given to restore)."""
    return key[: -len(MANIFEST_SUFFIX)] if key.endswith(MANIFEST_SUFFIX) else key


def is_archive(key: str) -> bool:
    return key.endswith(ARCHIVE_SUFFIXES)


# --- manifests --------------------------------------------------------------------------


def _get(
    s3: S3Reader, bucket: str, key: str, extra: Mapping[str, str], byte_range: str | None = None
) -> bytes:
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, **extra}
    if byte_range:
        kwargs["Range"] = byte_range
    try:
        body = s3.get_object(**kwargs)["Body"]
        data: bytes = body.read()
    except (ClientError, BotoCoreError) as err:
        raise s3_failure(err, f"s3://{bucket}/{key}") from None
    return data


def read_manifest(
    s3: S3Reader, bucket: str, key: str, extra: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The whole manifest at `key` (entries included)."""
    data = _get(s3, bucket, key, extra or {})
    return _parse(data, bucket, key)


def read_manifest_head(
    s3: S3Reader, bucket: str, key: str, extra: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The manifest without its long lists, from a ranged GET when that is enough."""
    data = _get(s3, bucket, key, extra or {}, f"bytes=0-{HEAD_BYTES - 1}")
    cut = data.find(_HEAD_END)
    if cut > 0:
        try:
            head = json.loads(data[:cut] + b"}")
        except ValueError:
            head = None
        if isinstance(head, dict) and isinstance(head.get("totals"), dict):
            return head
    # A short answer is the whole object already.
    doc = _parse(data, bucket, key) if len(data) < HEAD_BYTES else read_manifest(s3, bucket, key, extra)
    doc.pop("entries", None)
    return doc


def _parse(data: bytes, bucket: str, key: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as err:
        raise S3ReadError(f"s3://{bucket}/{key} is not a manifest: {err}") from None
    if not isinstance(doc, dict) or "format" not in doc:
        raise S3ReadError(f"s3://{bucket}/{key} is not a manifest (no 'format' field)")
    return doc
