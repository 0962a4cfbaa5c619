"""Seeding a lost shipping ledger from what S3 already holds for this instance.

The ledger lives in the state directory on the root volume. A root-volume replacement
discards that volume and keeps the instance, its id and its other volumes
(https://docs.aws.amazon.com/autoscaling/ec2/userguide/replace-root-volume.html;
docs/aws-behaviour.md, "Lifecycle hooks"): the agent
that the user data installs on the new root starts with no ledger, while files on a kept data
volume are the very ones it already shipped. Without the ledger it would send them all again.

So when the shipper finds no ledger, it lists this instance's segment manifests and reads
back the ledger lines each one carries (`shipped`, written by segment.py). A line is taken
only when the file is still where it was shipped from, as the same file: same inode, size,
modification and inode change times (nothing in userland sets the change time back). Its
device number is the one of this boot, since block devices may be numbered differently
after a reboot. A manifest is trusted only when it names its own segment object, under this
instance's segment prefix, and that object is listed beside it: a file is never left out of
the termination archive on the word of a manifest whose segment is not there. IAM: the
instance role may list the backup prefix and read segment manifests (metadata: paths, sizes,
digests), never a segment's or an archive's content.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from instance_agent import awserror
from instance_agent.logs import fields
from instance_agent.shiprecord import FileId, Shipped
from instance_agent.shipstate import Ledger

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest.json"
MAX_MANIFEST = 64 * 2**20  # a segment's manifest is small; a larger object is not one of ours


class S3Reader(Protocol):
    def list_objects_v2(self, **kwargs: Any) -> Mapping[str, Any]: ...

    def get_object(self, **kwargs: Any) -> Mapping[str, Any]: ...


def seed(ledger: Ledger, s3: S3Reader, bucket: str, prefix: str, instance_id: str) -> tuple[int, int]:
    """Add to `ledger` the files of this instance's segments under `prefix` that are still
    here unchanged; (segments, files) added. S3 errors end the seeding with a warning: the
    files are then shipped again, as without it."""
    segments = files = 0
    try:
        listed = _listing(s3, bucket, prefix)
        for key in sorted(k for k in listed if k.endswith(MANIFEST_SUFFIX) and listed[k][0] <= MAX_MANIFEST):
            segment = key[: -len(MANIFEST_SUFFIX)]
            if segment not in listed:
                continue  # a manifest without its segment (expired, deleted): ship again
            recs = _still_here(
                _read(s3, bucket, key), segment, prefix, instance_id, bucket, listed[segment][1]
            )
            if recs:
                ledger.add_segment(recs)
                segments, files = segments + 1, files + len(recs)
    except (ClientError, BotoCoreError) as err:
        log.warning(
            "shipping ledger not seeded from S3: what it missed is shipped again",
            extra=fields(error=awserror.describe(err), segments=segments, files=files),
        )
        return segments, files
    log.info("shipping ledger seeded from S3", extra=fields(prefix=prefix, segments=segments, files=files))
    return segments, files


def _listing(s3: S3Reader, bucket: str, prefix: str) -> dict[str, tuple[int, float]]:
    """Every key under `prefix`, with its size and S3's date of it (epoch seconds; 0 when
    not given, which a retention treats as too old to count)."""
    found: dict[str, tuple[int, float]] = {}
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    while True:
        page = s3.list_objects_v2(**kwargs)
        for o in page.get("Contents", []):
            when = o.get("LastModified")
            found[str(o["Key"])] = (
                int(o.get("Size", 0)),
                when.timestamp() if isinstance(when, datetime) else 0.0,
            )
        if not page.get("IsTruncated"):
            return found
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def _read(s3: S3Reader, bucket: str, key: str) -> Any:
    body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    try:
        return json.loads(body.read(MAX_MANIFEST + 1))
    except ValueError:
        return None


def _still_here(
    doc: Any, segment: str, prefix: str, instance_id: str, bucket: str, at: float
) -> list[Shipped]:
    """The manifest's ledger lines whose files are unchanged where they were shipped from."""
    if not isinstance(doc, dict) or doc.get("segment_of") != instance_id:
        return []
    if doc.get("key") != segment or not segment.startswith(prefix) or "/" in segment[len(prefix) :]:
        return []  # a manifest that names another object than its own segment
    found = doc.get("totals")
    totals: dict[str, Any] = found if isinstance(found, dict) else {}
    info = {
        "key": segment,
        "bucket": bucket,
        "tar_bytes": totals.get("tar_bytes", 0),
        "compressed_bytes": totals.get("compressed_bytes", 0),
        "at": at,  # S3's date, not the manifest's: the rule expires by S3's
        "count": len(doc.get("shipped") or []),
    }
    recs: list[Shipped] = []
    for line in doc.get("shipped") or []:
        try:
            rec = Shipped.from_json(line, info)
        except (ValueError, KeyError, TypeError):
            continue
        if not rec.path.startswith(b"/") or not rec.ctime_ns:
            continue
        try:
            st = os.lstat(rec.path)
        except OSError:
            continue  # gone, or on the volume that was replaced
        same = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) == (
            rec.fid.ino,
            rec.fid.size,
            rec.fid.mtime_ns,
            rec.ctime_ns,
        )
        if stat.S_ISREG(st.st_mode) and same:
            recs.append(dataclasses.replace(rec, fid=FileId.of(st)))
    return recs
