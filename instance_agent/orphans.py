"""Shipped segments that no backup names: what `list` shows as `incomplete`, and what
`restore --latest` falls back on when an instance has no complete backup.

When the final backup fails (S3 down, then ABANDON), the segments the instance shipped while
it ran are the only copy of those files, yet only a final manifest names them. So `list`
gathers, per instance, the segments that no listed backup's manifest references, and
describes them from their own manifests (`<segment>.manifest.json`, written by segment.py).
A restore of them builds one manifest in the shape of a final one (its entries each naming
their segment as `object`) and goes through the same assembled restore, with the same
hostile-manifest checks (manifest_check.py), as a complete backup.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from typing import Any

from instance_agent import keys
from instance_agent.errors import AgentError
from instance_agent.listing import MANIFEST_SUFFIX, Backup, Filters, S3Reader, find_backups, read_manifest
from instance_agent.manifest import path_from_fields

STATUS = "incomplete"
MISSING = "missing segments"  # list --verify: the backup names segments S3 no longer holds
_DIR = f"/{keys.SEGMENT_DIR}/"


def is_segment(key: str) -> bool:
    return _DIR in key


def anchor(segment: str) -> str:
    """The segments "directory" of a segment key: what an incomplete entry's key is."""
    return segment[: segment.rindex(_DIR) + len(_DIR)]


def named(
    s3: S3Reader, bucket: str, backups: Iterable[Backup], extra: Mapping[str, str]
) -> dict[str, list[Any]]:
    """Backup key -> the segments its manifest lists (read whole: the list follows the head
    that `list` reads). Only backups of continuous shipping name any."""
    found: dict[str, list[Any]] = {}
    for b in backups:
        if not b.manifest_key or b.status not in ("succeeded", "partial"):
            continue
        try:
            doc = read_manifest(s3, bucket, b.manifest_key, extra)
        except AgentError:
            continue
        found[b.key] = [s for s in doc.get("segments") or [] if isinstance(s, dict)]
    return found


def check_whole(
    backups: Iterable[Backup], segments_of: Mapping[str, list[Any]], listed: Mapping[str, Any]
) -> None:
    """`list --verify`: a backup whose manifest names a segment that is not in the bucket
    (expired by a retention rule, deleted), or not at the size it was shipped at, cannot be
    restored whole; it says so instead of `succeeded`. `listed` holds every segment listed
    with its manifest beside it."""
    for b in backups:
        missing = []
        for seg in segments_of.get(b.key, []):
            key = str(seg.get("key"))
            size = seg.get("compressed_bytes")
            obj = listed.get(key)
            if obj is None or (isinstance(size, int) and size and int(obj.get("Size", -1)) != size):
                missing.append(key)
        if missing:
            b.status = MISSING
            b.missing = missing
            b.error = (
                f"{len(missing)} of {len(segments_of[b.key])} segments missing or changed, first {missing[0]}"
            )


def shipped_entries(segment: str, doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The segment's entries for the files it recorded as shipped (a file that changed
    while it was read is in the tar but was shipped again later), each naming `segment`."""
    lines = doc.get("shipped")
    paths = None
    if isinstance(lines, list):
        paths = {base64.b64decode(str(x.get("path", ""))).lstrip(b"/") for x in lines if isinstance(x, dict)}
    out = []
    for entry in doc.get("entries") or []:
        if not isinstance(entry, dict):
            continue
        try:
            if paths is not None and path_from_fields(entry) not in paths:
                continue
        except (KeyError, ValueError):
            pass  # kept: manifest_check refuses it, in one line, before anything is restored
        out.append({**entry, "object": segment})
    return out


def incomplete(
    s3: S3Reader,
    bucket: str,
    segments: Mapping[str, Mapping[str, Any]],
    taken: set[str],
    extra: Mapping[str, str],
) -> list[Backup]:
    """One `incomplete` Backup per instance for the listed `segments` (key -> listed
    object, each with a manifest beside it) that are not in `taken`."""
    by_instance: dict[str, Backup] = {}
    for key in sorted(segments):
        if key in taken:
            continue
        try:
            doc = read_manifest(s3, bucket, key + MANIFEST_SUFFIX, extra)
        except AgentError:
            continue
        instance = str(doc.get("segment_of") or doc.get("instance_id") or "")
        if not instance or keys.safe_component(instance) not in key:
            continue  # not this instance's segment, whatever its manifest says
        obj = segments[key]
        entries = shipped_entries(key, doc)
        b = by_instance.get(instance)
        if b is None:
            b = by_instance[instance] = Backup(
                bucket, anchor(key), 0, obj["LastModified"], None, STATUS, instance_id=instance
            )
            b.group = str(doc["group"]) if doc.get("group") is not None else None
            b.raw_bytes = b.compressed_bytes = b.files = 0
            b.segments = []
        assert b.segments is not None and b.files is not None and b.raw_bytes is not None
        b.segments.append(key)
        b.last_modified = max(b.last_modified, obj["LastModified"])
        b.size += int(obj.get("Size", 0))
        b.compressed_bytes = b.size
        b.files += len(entries)
        b.raw_bytes += sum(int(e.get("size") or 0) for e in entries)
    return list(by_instance.values())


def manifest_of(s3: S3Reader, backup: Backup, extra: Mapping[str, str]) -> dict[str, Any]:
    """A manifest in the shape of a final one for an incomplete entry's segments: every
    entry names its segment, and every segment is listed with its tar size."""
    segments, entries = [], []
    for key in backup.segments or []:
        doc = read_manifest(s3, backup.bucket, key + MANIFEST_SUFFIX, extra)
        raw = doc.get("totals")
        totals: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
        segments.append({"key": key, "tar_bytes": totals.get("tar_bytes")})
        entries.extend(shipped_entries(key, doc))
    return {"format": 1, "instance_id": backup.instance_id, "segments": segments, "entries": entries}


def _shipped_by(instance_id: str, segments: Iterable[str]) -> bool:
    return any(keys.safe_component(instance_id) in k for k in segments)


def find_all(
    s3: S3Reader, bucket: str, prefix: str, filters: Filters, *, verify: bool = False, **kwargs: Any
) -> list[Backup]:
    """listing.find_backups, and after them each instance's `incomplete` entry; with
    `verify`, every backup's named segments are looked for in the listing (check_whole)."""
    segments: dict[str, Mapping[str, Any]] = {}
    found = find_backups(s3, bucket, prefix, filters, shipped=segments, **kwargs)
    extra = kwargs.get("extra") or {}
    # Only an instance that shipped segments has a backup that may name them; to verify,
    # every backup is read, since one whose segments have all expired names them still.
    readers = (
        found if verify else [b for b in found if b.instance_id and _shipped_by(b.instance_id, segments)]
    )
    segments_of = named(s3, bucket, readers, extra)
    if verify:
        check_whole(found, segments_of, segments)
    if not segments:
        return found
    taken = {str(seg.get("key")) for segs in segments_of.values() for seg in segs}
    found.extend(b for b in incomplete(s3, bucket, segments, taken, extra) if filters.admit(b))
    found.sort(key=lambda b: (b.time, b.key))
    return found
