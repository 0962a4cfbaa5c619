"""Restore a termination backup made with continuous shipping: the final archive and every
segment its manifest names, assembled into one tree, all or nothing.

Each object goes through the same safe extraction as any archive (restore.py: no member
outside its tree, no link followed, complete streams only, each segment checked against its
`tar_bytes`), into its own directory under one staging directory in DEST. Each segment's one
file is then moved to the path the final manifest gives it (a file renamed by a rotation
after it was shipped is restored under its new name), and only when everything is in place
does the tree move into DEST. On any failure the staging directory is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

from instance_agent import restore
from instance_agent.listing import S3Reader
from instance_agent.manifest import path_from_fields


def holders(manifest: Mapping[str, Any],
            select: restore.Selection | None) -> dict[str, list[str]]:
    """Segment key -> the member names it holds (selected ones only)."""
    known = {str(s.get("key")) for s in manifest.get("segments") or [] if isinstance(s, dict)}
    out: dict[str, list[str]] = {}
    for entry in manifest.get("entries") or []:
        if not isinstance(entry, dict) or not entry.get("object"):
            continue
        key = str(entry["object"])
        if key not in known:
            raise restore.RestoreError(f"the manifest names a segment it does not list: {key}")
        name = os.fsdecode(path_from_fields(entry))
        if select is None or not select or select(name):
            out.setdefault(key, []).append(name)
    return out


def _only_file(tree: str) -> str:
    found = [os.path.join(d, f) for d, _, files in os.walk(tree) for f in files]
    if len(found) != 1:
        raise restore.RestoreError(f"a segment holds {len(found)} files, not one")
    return found[0]


def restore_assembled(s3: S3Reader, bucket: str, key: str, manifest: Mapping[str, Any],
                      dest: str, *, allow_setuid: bool = False,
                      select: restore.Selection | None = None,
                      extra: Mapping[str, str] | None = None) -> restore.RestoreReport:
    """The final archive `key` and its segments into `dest` (new or empty)."""
    restore.check_key(key)
    restore.check_destination(dest)
    segments = {str(s["key"]): s for s in manifest.get("segments") or []}
    wanted = holders(manifest, select)
    totals = manifest.get("totals") or {}
    root, created = restore.prepare_destination(dest)
    staging = tempfile.mkdtemp(prefix=restore.STAGING_PREFIX, dir=root)
    try:
        tree = os.path.join(staging, "tree")
        report = restore.restore_s3(s3, bucket, key, tree, allow_setuid=allow_setuid,
                                    select=select, expected_tar_bytes=totals.get("tar_bytes"),
                                    extra=extra)
        for i, (skey, names) in enumerate(sorted(wanted.items())):
            part = os.path.join(staging, f"segment-{i}")
            got = restore.restore_s3(s3, bucket, skey, part, allow_setuid=allow_setuid,
                                     expected_tar_bytes=segments[skey].get("tar_bytes"),
                                     extra=extra)
            src = _only_file(part)
            # The last name takes the file itself; any earlier (hard links) get copies.
            for n, name in enumerate(names):
                restore.place_file(tree, name, src, move=n == len(names) - 1)
            report.files += len(names)
            report.bytes += got.bytes * len(names)
        for name in os.listdir(tree):
            os.rename(os.path.join(tree, name), os.path.join(root, name))
        shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(root)
        raise
    return report
