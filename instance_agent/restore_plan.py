"""`restore`'s policy, pure: which backup (the KEY given, or the newest one listed with
--latest), how its manifest is read, and which way it is restored (one archive; the final
archive with the segments its manifest names; or an instance's shipped segments alone, when
its final archive is missing). Decided from the flags and from what was listed and read, with
no I/O: restore_run.py carries the plan out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from instance_agent.errors import ConfigError
from instance_agent.listing import Backup, BackupNotFound, Filters, archive_key_of, latest, parse_s3_url
from instance_agent.restore_stream import check_key

# How the manifest beside the archive is read.
WHOLE = "whole"  # entries included: --verify compares the tree with them
HEAD = "head"  # a ranged GET of its head: only the totals are needed
LISTED = "listed"  # an `incomplete` entry: rebuilt from its segments' manifests (orphans.py)


@dataclass(frozen=True)
class Request:
    """What the operator asked for: `restore (s3://BUCKET/KEY | --latest) DEST` and its flags."""

    paths: tuple[str, ...]
    latest: bool = False
    group: str | None = None  # --asg-name, with --latest
    instance_id: str | None = None  # --instance-id, with --latest
    verify: bool = False


def check_request(request: Request) -> None:
    """The usage errors, raised before anything is read (ConfigError)."""
    if request.latest:
        if len(request.paths) != 1:
            raise ConfigError("with --latest give only DEST")
        return
    if request.group or request.instance_id:
        raise ConfigError("--asg-name and --instance-id choose a backup only with --latest")
    if len(request.paths) != 2:
        raise ConfigError(
            "give the archive and DEST: restore s3://bucket/key DEST (or "
            "restore --latest --instance-id ID DEST)"
        )


@dataclass(frozen=True)
class RestorePlan:
    """Which backup goes where, and what is said about it."""

    bucket: str
    key: str  # the archive's key (an `incomplete` entry's: its first segment's)
    dest: str
    manifest: str  # WHOLE, HEAD or LISTED
    verify: bool = False
    backup: Backup | None = None  # the listed backup --latest chose
    segments: tuple[str, ...] | None = None  # shipped segments alone: the final archive is missing
    announce: str | None = None  # said first: which backup --latest chose
    warning: str | None = None  # said once DEST is known to be usable: what is missing

    @property
    def url(self) -> str:
        return self.backup.url if self.backup else f"s3://{self.bucket}/{self.key}"


def choose(
    request: Request,
    listed: Sequence[Backup] | None = None,
    *,
    filters: Filters | None = None,
    where: str = "",
) -> RestorePlan:
    """The plan for a checked `request`; with --latest, from the backups `listed` under
    `where` (s3://bucket/prefix) with `filters`. BackupNotFound when none was; ConfigError
    when the key names no archive."""
    dest = request.paths[-1]
    manifest = WHOLE if request.verify else HEAD
    if not request.latest:
        bucket, key = parse_s3_url(request.paths[0])
        key = archive_key_of(key)
        check_key(key)
        return RestorePlan(bucket, key, dest, manifest, request.verify)
    if not listed:
        narrowed = " ".join(
            f"{k} {v}"
            for k, v in (
                ("of group", filters.group if filters else None),
                ("of instance", filters.instance_id if filters else None),
            )
            if v
        )
        raise BackupNotFound(f"no backup {narrowed + ' ' if narrowed else ''}under {where}")
    chosen = latest(listed)
    if chosen.status == "incomplete":
        segments = tuple(chosen.segments or ())
        return RestorePlan(
            chosen.bucket,
            chosen.key,
            dest,
            LISTED,
            request.verify,
            backup=chosen,
            segments=segments,
            warning=f"warning: restoring shipped segments only from {chosen.url} "
            f"({count(len(segments), 'segment')}): the final archive is missing\n",
        )
    check_key(chosen.key)
    return RestorePlan(
        chosen.bucket,
        chosen.key,
        dest,
        manifest,
        request.verify,
        backup=chosen,
        announce=f"latest backup: {chosen.url} (created {chosen.time.strftime('%Y-%m-%d %H:%M:%SZ')})\n",
    )


def without_manifest(plan: RestorePlan) -> str:
    """No manifest beside the archive: the note to say, or BackupNotFound with --verify,
    which has nothing to compare the tree with."""
    if plan.verify:
        raise BackupNotFound(f"cannot verify: no manifest beside {plan.url}")
    return f"note: no manifest beside {plan.url}; restoring without its size check\n"


@dataclass(frozen=True)
class Layout:
    """What the manifest says of how to restore the archive."""

    assembled: bool  # files shipped as segments (continuous shipping) are part of the backup
    read_whole: bool  # those are named only in the entries, which a head read leaves out
    expected_tar_bytes: int | None  # the archive's tar stream, exactly; None: unknown


def layout(manifest: Mapping[str, Any] | None) -> Layout:
    totals = manifest.get("totals") if manifest else None
    if manifest is None or not isinstance(totals, dict):
        return Layout(False, False, None)
    shipped = bool(totals.get("held_files"))
    tar_bytes = totals.get("tar_bytes")
    return Layout(
        shipped, shipped and "entries" not in manifest, tar_bytes if isinstance(tar_bytes, int) else None
    )


def count(n: int, one: str, many: str | None = None) -> str:
    """`1 file`, `2 files`: a count with its noun."""
    return f"{n} {one if n == 1 else many or one + 's'}"
