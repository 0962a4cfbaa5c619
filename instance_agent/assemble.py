"""Restore a termination backup made with continuous shipping: the final archive and every
segment its manifest names, assembled into one tree, all or nothing.

Each object goes through the same safe extraction as any archive (restore.py: no member
outside its tree, no link followed, complete streams only, each segment checked against its
`tar_bytes`), all into one staged tree in DEST. A segment packs many files; each file the
final manifest holds there is written, as it streams in, straight to the path the final
manifest gives it (restore_held.py; a file renamed by a rotation after it was shipped is
restored under its new name), and the segment's other members are skipped. Only when
everything is in place does the tree move into DEST (restore.staged); on any failure the
staging directory is removed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from instance_agent import manifest_check, restore, restore_tree
from instance_agent.listing import S3Reader
from instance_agent.manifest import path_from_fields
from instance_agent.restore_held import Held


def holders(
    manifest: Mapping[str, Any], select: restore.Selection | None
) -> dict[str, list[tuple[str, str, int]]]:
    """Segment key -> (name, member name in the segment, size) of each file it holds
    (selected ones only). An entry names its member only when it was renamed since it was
    shipped (a one-file segment of an older agent may not name it even then)."""
    known = {str(s.get("key")) for s in manifest.get("segments") or [] if isinstance(s, dict)}
    out: dict[str, list[tuple[str, str, int]]] = {}
    for entry in manifest.get("entries") or []:
        if not isinstance(entry, dict) or not entry.get("object"):
            continue
        key = str(entry["object"])
        if key not in known:
            raise restore.RestoreError(f"the manifest names a segment it does not list: {key}")
        name = os.fsdecode(path_from_fields(entry))
        member = name
        if "member" in entry or "member_b64" in entry:
            member = os.fsdecode(path_from_fields(entry, "member"))
        if select is None or not select or select(name):
            out.setdefault(key, []).append((name, member, int(entry.get("size") or 0)))
    return out


def restore_assembled(
    s3: S3Reader,
    bucket: str,
    key: str,
    manifest: Mapping[str, Any],
    dest: str,
    *,
    allow_setuid: bool = False,
    select: restore.Selection | None = None,
    extra: Mapping[str, str] | None = None,
    final: bool = True,
    digests: bool = False,
) -> restore.RestoreReport:
    """The final archive `key` and its segments into `dest` (new or empty). Without
    `final` (its final archive is missing: orphans.py), only the segments, and `key` is
    their segments "directory", against which manifest_check checks every object. With
    `digests`, the report says what was written into each file, by its path in the tree."""
    if final:
        restore.check_key(key)
    restore.check_destination(dest)
    manifest_check.check(key, manifest)  # before anything is downloaded or written
    segments = {str(s["key"]): s for s in manifest.get("segments") or []}
    wanted = holders(manifest, select)
    totals = manifest.get("totals") or {}
    with restore.staged(dest) as staging:
        into = restore.Extractor(staging, allow_setuid=allow_setuid, digests=digests)
        try:
            if final:
                with restore.fetched(s3, bucket, key, extra) as stream:
                    into.add(stream, select=select, expected_tar_bytes=totals.get("tar_bytes"))
            for skey, files in sorted(wanted.items()):
                held = _held(f"segment s3://{bucket}/{skey}", files)
                with restore.fetched(s3, bucket, skey, extra) as stream:
                    into.add(stream, expected_tar_bytes=segments[skey].get("tar_bytes"), held=held)
            into.finish()
        finally:
            into.close()
    restore.set_dir_modes(os.path.dirname(staging), into.dir_modes)
    return into.report


def _held(label: str, files: list[tuple[str, str, int]]) -> Held:
    """What a segment holds: each member's names in the tree, in the manifest's order."""
    names: dict[restore_tree.Parts, list[restore_tree.Parts]] = {}
    for name, member, _ in files:
        names.setdefault(restore.member_parts(member.rstrip("/")), []).append(
            restore.member_parts(name.rstrip("/"))
        )
    # An older agent's one-file segment may hold its file under the name it had when shipped.
    return Held(label, names, any_name=len(names) == 1)
