"""A format-2 final manifest's segments, expanded into one entry per held file.

At termination the final manifest does not repeat the entries of the files its segments
hold (manifest.py, HeldFiles): it says, for each segment, how many of its shipped files
belong to the backup, which when not all, which were renamed since, and a digest of their
names and content digests. Restore and verify need the entries, so here each segment's own
manifest is read and its held files become entries naming it as `object`, exactly the
entries a format-1 manifest lists; the assembled restore and verify then check them file by
file as before (assemble.py, verify.py).

Nothing is taken on trust: a segment key must be one of this instance's segments before its
manifest is read (manifest_check), the segment manifest must name that segment and this
instance, and the files taken from it must be as many as the final manifest says, with the
same digest. A missing or altered segment manifest fails the restore or verify in one line
naming the segment; an altered segment object fails the restore's size check or verify's
content check of each file, which names the segment too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from instance_agent.errors import AgentError
from instance_agent.listing import MANIFEST_SUFFIX, BackupNotFound, S3Reader, read_manifest
from instance_agent.manifest import held_digest, is_guard, path_fields, path_from_fields
from instance_agent.manifest_check import UnsafeManifest, segment_key_problem
from instance_agent.orphans import shipped_entries


class SegmentMismatch(AgentError):
    """A segment's manifest is missing or does not hold what the final manifest recorded."""


def held_segments(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The segments of `doc` that hold files by count and digest (format 2)."""
    return [s for s in doc.get("segments") or [] if isinstance(s, dict) and "held" in s]


def expand(
    s3: S3Reader, bucket: str, key: str, doc: Mapping[str, Any], extra: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """`doc` (the final manifest of archive `key`) with the entries of every file its
    segments hold appended; a format-1 manifest comes back as it is."""
    segments = held_segments(doc)
    if not segments:
        return dict(doc)
    instance = str(doc.get("instance_id") or "")
    entries = [e for e in doc.get("entries") or [] if not is_guard(e)]
    for seg in segments:
        skey = str(seg.get("key"))
        # Before anything is read: only this instance's segments (manifest_check.py).
        problem = segment_key_problem(key, instance, skey)
        if problem:
            raise UnsafeManifest(f"refusing the manifest: it names segment {skey!r}: {problem}")
        try:
            sdoc = read_manifest(s3, bucket, skey + MANIFEST_SUFFIX, extra)
        except BackupNotFound:
            raise SegmentMismatch(
                f"segment s3://{bucket}/{skey}: its manifest is missing, so the "
                f"{seg.get('held')} files the backup holds there cannot be checked"
            ) from None
        entries.extend(_held_entries(bucket, skey, seg, sdoc, instance))
    return {**doc, "entries": entries}


def _held_entries(
    bucket: str, skey: str, seg: Mapping[str, Any], sdoc: Mapping[str, Any], instance: str
) -> list[dict[str, Any]]:
    where = f"segment s3://{bucket}/{skey}"
    if sdoc.get("key") != skey or str(sdoc.get("segment_of") or sdoc.get("instance_id") or "") != instance:
        raise SegmentMismatch(f"{where}: its manifest is not this instance's manifest of that segment")
    shipped: dict[bytes, dict[str, Any]] = {}
    for entry in shipped_entries(skey, sdoc):
        try:
            shipped.setdefault(path_from_fields(entry), entry)
        except (KeyError, ValueError):
            raise UnsafeManifest(f"refusing the manifest: {where} has an entry with no valid path") from None
    try:
        wanted = [path_from_fields(m) for m in seg["members"]] if "members" in seg else list(shipped)
        renames = [(path_from_fields(r), path_from_fields(r, "member")) for r in seg.get("renamed") or []]
    except (KeyError, ValueError, TypeError):
        raise UnsafeManifest(f"refusing the manifest: {where}: a held member has no valid name") from None
    picked: list[dict[str, Any]] = []
    for member in wanted:
        found = shipped.get(member)
        if found is None:
            raise SegmentMismatch(
                f"{where} does not hold {os.fsdecode(member)!r}, which the backup says it does"
            )
        picked.append(dict(found))
    if len(picked) != seg.get("held") or held_digest(
        [(path_from_fields(e), str(e.get("sha256") or "")) for e in picked]
    ) != seg.get("held_sha256"):
        raise SegmentMismatch(
            f"{where}: its manifest does not match the backup's record of it "
            f"({len(picked)} files found, {seg.get('held')} recorded, or another digest)"
        )
    # A file renamed since it was shipped: its entry takes the name it has in the backup,
    # and names where it is in the segment (as format 1 did).
    unnamed: dict[bytes, list[int]] = {}
    for n, entry in enumerate(picked):
        unnamed.setdefault(path_from_fields(entry), []).append(n)
    for now, member in renames:
        slots = unnamed.get(member)
        if not slots:
            raise SegmentMismatch(
                f"{where} does not hold {os.fsdecode(member)!r}, renamed {os.fsdecode(now)!r}"
            )
        entry = picked[slots.pop()]
        for name in ("path", "path_b64", "member", "member_b64"):
            entry.pop(name, None)
        entry.update(path_fields(now))
        entry.update(path_fields(member, "member"))
    return picked
