"""Restore a termination backup made with continuous shipping: the final archive and every
segment its manifest names, assembled into one tree, all or nothing.

Each object goes through the same safe extraction as any archive (restore.py: no member
outside its tree, no link followed, complete streams only, each segment checked against its
`tar_bytes`), into its own directory under one staging directory in DEST. A segment packs
many files; each file the final manifest holds there is moved from its `member` name in the
segment to the path the final manifest gives it (a file renamed by a rotation after it was
shipped is restored under its new name), and only when everything is in place does the tree
move into DEST (restore.staged). On any failure the staging directory is removed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from instance_agent import manifest_check, restore
from instance_agent.listing import S3Reader
from instance_agent.manifest import path_from_fields


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


def _only_file(tree: str) -> str:
    found = [os.path.join(d, f) for d, _, files in os.walk(tree) for f in files]
    if len(found) != 1:
        raise restore.RestoreError(f"a segment holds {len(found)} files, not one")
    return found[0]


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
    manifest_check.check(key, manifest)  # before anything is downloaded or moved
    segments = {str(s["key"]): s for s in manifest.get("segments") or []}
    wanted = holders(manifest, select)
    totals = manifest.get("totals") or {}
    with restore.staged(dest, "tree") as staging:
        tree = os.path.join(staging, "tree")
        if not final:
            os.mkdir(tree)
            report = restore.RestoreReport(written={} if digests else None)
        else:
            report = restore.restore_s3(
                s3,
                bucket,
                key,
                tree,
                allow_setuid=allow_setuid,
                select=select,
                expected_tar_bytes=totals.get("tar_bytes"),
                extra=extra,
                digests=digests,
            )
        for i, (skey, files) in enumerate(sorted(wanted.items())):
            part = os.path.join(staging, f"segment-{i}")
            got = restore.restore_s3(
                s3,
                bucket,
                skey,
                part,
                allow_setuid=allow_setuid,
                expected_tar_bytes=segments[skey].get("tar_bytes"),
                extra=extra,
                digests=digests,
            )
            # The last name of a member takes the file itself; any earlier (hard links, or
            # one content shipped once and found under two names) get copies.
            last = {m: n for n, (_, m, _) in enumerate(files)}
            with restore.Placer(tree) as placer:
                for n, (name, member, size) in enumerate(files):
                    src, held = os.path.join(part, member), member
                    if not os.path.lexists(src):
                        src = _only_file(part)  # a one-file segment renamed since (older agents)
                        held = os.path.relpath(src, part)
                    copied = placer.place(name, src, move=last[member] == n, digest=digests)
                    if report.written is not None and got.written is not None:
                        done = copied or got.written.get(restore.tree_path(restore.member_parts(held)))
                        if done is not None:
                            report.written[restore.tree_path(restore.member_parts(name))] = done
                    report.files += 1
                    report.bytes += size
    return report
