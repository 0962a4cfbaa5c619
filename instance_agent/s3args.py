"""The extra arguments S3 calls carry, from the config, written once.

Writes carry encryption, the storage class and the expected owner; every other call (reads,
part uploads, aborts, listings) carries only the expected owner, which S3 checks on each
request (a look-alike bucket in another account answers 403).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from instance_agent.config import Config

OWNER = "ExpectedBucketOwner"


def write_args(cfg: Config) -> dict[str, Any]:
    """CreateMultipartUpload / PutObject arguments: SSE, KMS key, storage class, owner."""
    extra: dict[str, Any] = {}
    if cfg.sse:
        extra["ServerSideEncryption"] = cfg.sse
    if cfg.kms_key_id:
        extra["SSEKMSKeyId"] = cfg.kms_key_id
    if cfg.storage_class:
        extra["StorageClass"] = cfg.storage_class
    extra.update(owner_args(cfg))
    return extra


def owner_args(cfg: Config) -> dict[str, str]:
    """What every other call carries: the expected bucket owner, when configured."""
    return {OWNER: cfg.expected_bucket_owner} if cfg.expected_bucket_owner else {}


def owner_only(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """The part of a write's arguments that must ride on every later call too."""
    return {k: v for k, v in (extra or {}).items() if k == OWNER}
