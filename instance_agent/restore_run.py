"""Carrying out a restore_plan.RestorePlan: DEST checked, the manifest read as the plan says
(and expanded into the entries of the segments it names), then the archive, or the archive
with its segments, or the segments alone, extracted into DEST, all or nothing."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from instance_agent import assemble, orphans, restore_plan, segrefs
from instance_agent.restore import RestoreReport, Selection, restore_s3
from instance_agent.restore_plan import RestorePlan
from instance_agent.restore_tree import RestoreError, UnsafeArchive, check_destination
from instance_agent.s3read import MANIFEST_SUFFIX, BackupNotFound, S3Reader, read_manifest, read_manifest_head


@dataclass(frozen=True)
class Restored:
    plan: RestorePlan
    report: RestoreReport
    manifest: dict[str, Any] | None  # what --verify compares the tree with (None: there is none)


def execute(
    plan: RestorePlan,
    s3: S3Reader,
    extra: Mapping[str, str],
    *,
    select: Selection | None,
    allow_setuid: bool,
    say: Callable[[str], object],
) -> Restored:
    """Restore as `plan` says; `say` takes the notes for the operator (stderr)."""
    if plan.announce:
        say(plan.announce)
    check_destination(plan.dest)  # before anything is fetched
    if plan.warning:
        say(plan.warning)
    if plan.backup is not None and plan.manifest == restore_plan.LISTED:
        manifest = orphans.manifest_of(s3, plan.backup, extra)
        return Restored(
            plan, _assembled(plan, s3, extra, manifest, select, allow_setuid, final=False), manifest
        )
    found = _manifest(plan, s3, extra, say)
    how = restore_plan.layout(found)
    if how.assembled and found is not None:
        if how.read_whole:
            found = read_manifest(s3, plan.bucket, plan.key + MANIFEST_SUFFIX, extra)
        manifest = segrefs.expand(s3, plan.bucket, plan.key, found, extra)  # format 2: entries from segments
        return Restored(
            plan, _assembled(plan, s3, extra, manifest, select, allow_setuid, final=True), manifest
        )
    with _nothing_restored(plan):
        report = restore_s3(
            s3,
            plan.bucket,
            plan.key,
            plan.dest,
            allow_setuid=allow_setuid,
            select=select,
            expected_tar_bytes=how.expected_tar_bytes,
            extra=extra,
            digests=_digests(plan, found),
        )
    return Restored(plan, report, found)


@contextlib.contextmanager
def _nothing_restored(plan: RestorePlan) -> Iterator[None]:
    """A failed extraction says that DEST holds nothing of it (restore.py is all or nothing)."""
    try:
        yield
    except (RestoreError, UnsafeArchive) as err:
        raise type(err)(f"{err}; nothing was restored into {plan.dest}") from None


def _digests(plan: RestorePlan, manifest: Mapping[str, Any] | None) -> bool:
    """Whether to hash each file's bytes as they are written: only for --verify, and only
    when the manifest has digests to compare them with."""
    if not plan.verify or manifest is None:
        return False
    return any(isinstance(e, dict) and e.get("sha256") for e in manifest.get("entries") or [])


def _manifest(
    plan: RestorePlan, s3: S3Reader, extra: Mapping[str, str], say: Callable[[str], object]
) -> dict[str, Any] | None:
    read = read_manifest if plan.manifest == restore_plan.WHOLE else read_manifest_head
    try:
        return read(s3, plan.bucket, plan.key + MANIFEST_SUFFIX, extra)
    except BackupNotFound:
        say(restore_plan.without_manifest(plan))
        return None


def _assembled(
    plan: RestorePlan,
    s3: S3Reader,
    extra: Mapping[str, str],
    manifest: Mapping[str, Any],
    select: Selection | None,
    allow_setuid: bool,
    *,
    final: bool,
) -> RestoreReport:
    with _nothing_restored(plan):
        return assemble.restore_assembled(
            s3,
            plan.bucket,
            plan.key,
            manifest,
            plan.dest,
            allow_setuid=allow_setuid,
            select=select,
            extra=extra,
            final=final,
            digests=_digests(plan, manifest),
        )
