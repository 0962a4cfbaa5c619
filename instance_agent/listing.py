"""`instance-agent list`: find the backups under a prefix and describe each from its manifest.

Its S3 reads (`s3://` URLs, manifests, errors) are s3read.py's, which `restore` and `verify`
share; their names are importable from here too.

Listing is paginated (ListObjectsV2, 1,000 keys a page) and stays cheap on large buckets:
- the filters narrow the listed prefix when the key template starts with `{prefix}{group}/`
  (the default), and an instance filter skips keys before any GET, since every key template
  holds `{instance_id}`;
- `--since` skips a manifest whose LastModified is older, before reading it: a manifest is
  written after the backup's `created` time, never before;
- a manifest is read with a ranged GET of its head (s3read.read_manifest_head): the first
  64 KiB nearly always hold all we show.
An archive without a manifest beside it (a run that died after its upload) is listed too,
with the status `no manifest`, because a restore may still want it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from instance_agent import keys
from instance_agent.errors import AgentError, ConfigError

# The S3 reads, importable from here as before.
from instance_agent.s3read import ARCHIVE_SUFFIXES as ARCHIVE_SUFFIXES
from instance_agent.s3read import MANIFEST_SUFFIX as MANIFEST_SUFFIX
from instance_agent.s3read import BackupNotFound as BackupNotFound
from instance_agent.s3read import S3Reader as S3Reader
from instance_agent.s3read import S3ReadError as S3ReadError
from instance_agent.s3read import archive_key_of as archive_key_of
from instance_agent.s3read import is_archive as is_archive
from instance_agent.s3read import parse_s3_url as parse_s3_url
from instance_agent.s3read import read_manifest as read_manifest
from instance_agent.s3read import read_manifest_head as read_manifest_head
from instance_agent.s3read import s3_failure as s3_failure

PAGE_SIZE = 1000  # S3's maximum keys per ListObjectsV2 page
MANIFEST_READERS = 8  # concurrent manifest GETs: a bucket of thousands lists in seconds
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# --- listing ------------------------------------------------------------------------------


@dataclass
class Backup:
    """One archive, described from its manifest when there is one."""

    bucket: str
    key: str
    size: int  # the archive object's size
    last_modified: datetime
    manifest_key: str | None
    status: str  # succeeded | partial | no manifest | unreadable manifest
    created: datetime | None = None
    group: str | None = None
    instance_id: str | None = None
    raw_bytes: int | None = None
    compressed_bytes: int | None = None
    files: int | None = None
    warnings: int | None = None
    agent_version: str | None = None
    error: str | None = None
    segments: list[str] | None = None  # an `incomplete` entry's segments (orphans.py)
    missing: list[str] | None = None  # list --verify: named segments S3 does not hold

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def time(self) -> datetime:
        return self.created or self.last_modified

    def to_json(self) -> dict[str, Any]:
        return {
            "time": _iso(self.time),
            "group": self.group,
            "instance_id": self.instance_id,
            "raw_bytes": self.raw_bytes,
            "compressed_bytes": self.compressed_bytes if self.compressed_bytes is not None else self.size,
            "files": self.files,
            "warnings": self.warnings,
            "status": self.status,
            "url": self.url,
            "key": self.key,
            "manifest_key": self.manifest_key,
            "agent_version": self.agent_version,
            "error": self.error,
            **({"segments": self.segments} if self.segments is not None else {}),
            **({"missing": self.missing} if self.missing is not None else {}),
        }


@dataclass(frozen=True)
class Filters:
    group: str | None = None
    instance_id: str | None = None
    since: datetime | None = None

    def admit(self, backup: Backup) -> bool:
        """The described backup matches every filter given."""
        return (
            (self.group is None or backup.group == self.group)
            and (self.instance_id is None or backup.instance_id == self.instance_id)
            and (self.since is None or backup.time >= self.since)
        )


def _iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`2026-01-31`, `2026-01-31T12:00`, `…Z` or `…+02:00` (a date alone is midnight UTC,
    a time without a zone is UTC), or a duration ago: `90m`, `12h`, `7d`, `2w`."""
    now = now or datetime.now(timezone.utc)
    m = _DURATION.match(text.strip().lower())
    if m:
        return now - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(
            f"--since: cannot read {text!r}: use 2026-01-31, "
            "2026-01-31T12:00Z, or a duration ago such as 12h or 7d"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _created(doc: Mapping[str, Any]) -> datetime | None:
    text = doc.get("created")
    if not isinstance(text, str):
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def narrow_prefix(template: str, prefix: str, filters: Filters) -> tuple[str, bool]:
    """The longest listing prefix the filters allow, and whether it pins the group.

    Only a template that starts `{prefix}{group}/…` (the default) lets a group name a
    "directory"; the instance id can follow it the same way."""
    out, rest, pinned = prefix, template, False
    if not rest.startswith("{prefix}"):
        return out, False
    rest = rest[len("{prefix}") :]
    for var, value in (("group", filters.group), ("instance_id", filters.instance_id)):
        token = "{" + var + "}/"
        if value is None or not rest.startswith(token):
            break
        out += keys.safe_component(value) + "/"
        rest = rest[len(token) :]
        pinned = pinned or var == "group"
    return out, pinned


def iter_objects(
    s3: S3Reader,
    bucket: str,
    prefix: str,
    *,
    page_size: int = PAGE_SIZE,
    extra: Mapping[str, str] | None = None,
) -> Iterator[Mapping[str, Any]]:
    """Every object under `prefix`, one ListObjectsV2 page at a time."""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size, **(extra or {})}
    while True:
        try:
            page = s3.list_objects_v2(**kwargs)
        except (ClientError, BotoCoreError) as err:
            raise s3_failure(err, f"s3://{bucket}/{prefix}") from None
        yield from page.get("Contents", [])
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return
        kwargs["ContinuationToken"] = token


def find_backups(
    s3: S3Reader,
    bucket: str,
    prefix: str,
    filters: Filters,
    *,
    key_template: str = "{prefix}{group}/{instance_id}/{timestamp}",
    page_size: int = PAGE_SIZE,
    extra: Mapping[str, str] | None = None,
    shipped: dict[str, Mapping[str, Any]] | None = None,
) -> list[Backup]:
    """The backups under `prefix` that pass `filters`, oldest first. Shipped segments with
    a manifest beside them go into `shipped` (key -> listed object), if given (orphans.py)."""
    extra = dict(extra or {})
    listed_prefix, group_pinned = narrow_prefix(key_template, prefix, filters)
    wanted_id = keys.safe_component(filters.instance_id) if filters.instance_id else None
    archives: dict[str, Mapping[str, Any]] = {}
    manifests: dict[str, Mapping[str, Any]] = {}
    segments: dict[str, Mapping[str, Any]] = {}
    for obj in iter_objects(s3, bucket, listed_prefix, page_size=page_size, extra=extra):
        key = str(obj["Key"])
        if wanted_id and wanted_id not in key:
            continue
        if f"/{keys.HANDOFF_DIR}/" in key:
            continue  # a state hand-off (handoff.py) is not a backup: restore --latest never picks it
        if key.endswith(MANIFEST_SUFFIX) and is_archive(key[: -len(MANIFEST_SUFFIX)]):
            manifests[key[: -len(MANIFEST_SUFFIX)]] = obj
        elif is_archive(key):
            # A shipped segment is counted in the termination backup that names it, or in
            # its instance's `incomplete` entry when none does (orphans.py).
            (segments if f"/{keys.SEGMENT_DIR}/" in key else archives)[key] = obj

    found: list[Backup] = []
    to_read: list[Backup] = []
    for key, obj in archives.items():
        modified = obj["LastModified"]
        man = manifests.get(key)
        backup = Backup(
            bucket,
            key,
            int(obj.get("Size", 0)),
            modified,
            key + MANIFEST_SUFFIX if man else None,
            "no manifest" if man is None else "unknown",
        )
        if filters.since and max(modified, man["LastModified"] if man else modified) < filters.since:
            continue
        if man is None:
            # Without a manifest only the key can tell: keep it when the listed prefix already
            # pinned the group, drop it when a group filter cannot be checked.
            _from_key(backup, key_template, prefix)
            if (filters.group is None or group_pinned) and not (
                filters.since and backup.time < filters.since
            ):
                found.append(backup)
            continue
        to_read.append(backup)

    def describe(backup: Backup) -> Backup:
        try:
            head = read_manifest_head(s3, bucket, backup.manifest_key or "", extra)
        except AgentError as err:
            backup.status, backup.error = "unreadable manifest", str(err)
            return backup
        _fill(backup, head)
        return backup

    with ThreadPoolExecutor(MANIFEST_READERS, thread_name_prefix="manifest") as pool:
        described = list(pool.map(describe, to_read))
    if shipped is not None:
        shipped.update({k: obj for k, obj in segments.items() if k in manifests})
    for backup in described:
        if backup.status == "unreadable manifest":
            if filters.group is not None and not group_pinned:
                continue
        elif not filters.admit(backup):
            continue
        found.append(backup)
    found.sort(key=lambda b: (b.time, b.key))
    return found


_KEY_TIME = re.compile(r"(\d{8}T\d{6}Z)")


def _from_key(backup: Backup, template: str, prefix: str) -> None:
    """What the key tells of a backup without a manifest: its start time (keys.timestamp),
    and its group and instance when the template starts `{prefix}{group}/{instance_id}/`."""
    m = _KEY_TIME.search(backup.key.rsplit("/", 1)[-1])
    if m:
        backup.created = datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    if template.startswith("{prefix}{group}/{instance_id}/") and backup.key.startswith(prefix):
        parts = backup.key[len(prefix) :].split("/")
        if len(parts) >= 3:
            backup.group, backup.instance_id = parts[0], parts[1]


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _fill(backup: Backup, head: Mapping[str, Any]) -> None:
    raw = head.get("totals")
    totals: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
    backup.created = _created(head)
    group = head.get("group")
    backup.group = str(group) if group is not None else None
    backup.instance_id = str(head.get("instance_id")) if head.get("instance_id") else None
    backup.raw_bytes = _int(totals.get("bytes_read"))
    backup.compressed_bytes = _int(totals.get("compressed_bytes"))
    backup.files = _int(totals.get("files"))
    # Continuous shipping: the backup is the archive plus the segments it names.
    held, seg = _int(totals.get("held_bytes")), _int(totals.get("segment_bytes"))
    if held is not None and backup.raw_bytes is not None:
        backup.raw_bytes += held
    if seg is not None and backup.compressed_bytes is not None:
        backup.compressed_bytes += seg
    held_files = _int(totals.get("held_files"))
    if held_files is not None and backup.files is not None:
        backup.files += held_files
    backup.warnings = _int(totals.get("warnings"))
    backup.agent_version = str(head.get("agent_version")) if head.get("agent_version") else None
    stopped = (_int(totals.get("omitted")) or 0) + (_int(totals.get("cut_short")) or 0)
    backup.status = "partial" if stopped > 0 else "succeeded"


def latest(backups: Sequence[Backup]) -> Backup:
    """The newest backup that has a readable manifest, else the newest at all."""
    if not backups:
        raise BackupNotFound("no backup matches")
    described = [b for b in backups if b.manifest_key and b.status in ("succeeded", "partial")]
    # Shipped segments alone are a fallback: a complete backup, when there is one, holds them.
    shipped = [b for b in backups if b.status == "incomplete"]
    return max(described or shipped or backups, key=lambda b: (b.time, b.key))


# --- output -------------------------------------------------------------------------------


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def render_table(backups: Sequence[Backup]) -> str:
    header = ("TIME", "GROUP", "INSTANCE", "RAW", "COMPRESSED", "FILES", "STATUS", "ARCHIVE")
    rows = [header] + [
        (
            b.time.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ"),
            b.group or "-",
            b.instance_id or "-",
            human_size(b.raw_bytes),
            human_size(b.compressed_bytes if b.compressed_bytes is not None else b.size),
            "-" if b.files is None else str(b.files),
            b.status + (f" ({b.warnings} warnings)" if b.warnings else ""),
            b.url,
        )
        for b in backups
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    right = {3, 4, 5}  # sizes and counts line up on the right
    lines = []
    for row in rows:
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row[:-1])]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines) + "\n"


def render_json(backups: Sequence[Backup]) -> str:
    """A JSON array with one backup per line: valid JSON, and still greppable."""
    if not backups:
        return "[]\n"
    return "[\n" + ",\n".join(json.dumps(b.to_json(), ensure_ascii=False) for b in backups) + "\n]\n"
