"""The archive pipeline: sources and journal into S3, with a manifest.

    tar ─► compress ─► multipart upload (archive)
    journalctl export ─► compress ─► upload (journal)
    manifest ─► PutObject

It takes small client interfaces, never builds boto3 clients (only the CLI does), and fills
the `Result` in place. What happens around it (lock, drain, commands, report, lifecycle
completion) is the termination job's business: see termination.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from instance_agent import __version__, finalprep, finalwalk, journal, keys, manifest, s3args
from instance_agent.archive import Archiver, Quick, Recall
from instance_agent.clients import Clients
from instance_agent.config import Config
from instance_agent.errors import AgentError
from instance_agent.identity import Identity
from instance_agent.logs import fields
from instance_agent.manifest import ArchiveReport
from instance_agent.result import PARTIAL, SUCCEEDED, Result
from instance_agent.s3stream import upload_stream
from instance_agent.s3upload import ChainBody, S3Client, put_small
from instance_agent.shipstate import Ledger, refresh_age

log = logging.getLogger(__name__)

KEY_TRIES = 3
JOURNAL_SUFFIX = {"zstd": ".zst", "gzip": ".gz", "none": ""}


class Progress:
    """Rate-limited progress lines: bytes, rate and files (every 5 s on a TTY, else 30 s)."""

    def __init__(self, clock: Callable[[], float], interval: float) -> None:
        self.clock, self.interval = clock, interval
        self.start = self.last = clock()

    def __call__(self, report: ArchiveReport) -> None:
        now = self.clock()
        if now - self.last < self.interval:
            return
        self.last = now
        rate = report.bytes_read / max(now - self.start, 1e-6)
        log.info(
            "progress",
            extra=fields(bytes_read=report.bytes_read, files=report.files, mib_per_s=round(rate / 2**20, 1)),
        )


def key_values(cfg: Config, ident: Identity, group: str | None) -> dict[str, str]:
    return {
        "prefix": cfg.prefix,
        "group": group or "no-group",
        "instance_id": ident.instance_id,
        "region": ident.region,
        "timestamp": keys.timestamp(),
        "hostname": ident.hostname,
    }


def _free_key(cfg: Config, ident: Identity, s3: S3Client, group: str | None) -> str:
    """The archive key, moved to the next second when an object already holds it.

    Keys have one-second resolution and every write is create-only (IfNoneMatch), so two
    runs of one instance within a second (an ad-hoc run beside a Spot stop, say) would
    otherwise fail the second one at CompleteMultipartUpload, after all its data was sent.
    Best effort: a role without s3:GetObject gets 403 here, and the create-only write is
    still the guard."""
    tries = KEY_TRIES if "{timestamp" in cfg.key_template else 1
    for attempt in range(tries):
        try:
            key = keys.render(cfg.key_template, key_values(cfg, ident, group), cfg.compression)
        except ValueError as err:
            raise AgentError(str(err)) from None
        if attempt == tries - 1:
            return key  # the last chance: the create-only write decides
        try:
            s3.head_object(Bucket=cfg.bucket or "", Key=key, **s3args.owner_args(cfg))
        except Exception:  # 404 (free), 403 (cannot tell), or anything else: go ahead
            return key
        log.info("key already taken; moving to the next second", extra=fields(key=key))
        time.sleep(1.0 - time.time() % 1.0 + 0.01)
    return key


def archive_and_upload(
    cfg: Config,
    ident: Identity,
    clients: Clients,
    result: Result,
    *,
    group: str | None,
    started: float,
    clock: Callable[[], float],
    progress_interval: float,
    cancel: threading.Event | None = None,
    shipped: Ledger | None = None,
) -> None:
    """Fill `result` with the archive, journal and manifest. Raises on failure.

    With `shipped` (continuous shipping), files unchanged since their segment was shipped
    are left out, and the manifest names the segment holding each."""
    key = _free_key(cfg, ident, clients.s3, group)
    base = key[: -len(keys.EXTENSIONS[cfg.compression])]
    deadline = started + cfg.max_duration if cfg.max_duration else None
    result.key = key
    if shipped is not None:
        # Only what was shipped to this bucket and prefix may stay out of this archive: a
        # ledger kept from another bucket would make a backup that names objects elsewhere.
        shipped.aim(
            cfg.bucket or "",
            keys.segment_prefix(cfg.key_template, key_values(cfg, ident, group)),
            refresh_age(cfg.retention_days),
        )
    log.info("backup started", extra=fields(bucket=cfg.bucket, key=key, sources=list(cfg.source)))
    quick: Quick | None = None
    recall: Recall | None = None
    if shipped is not None:
        # The journal, when trusted, spares the lstat of every unchanged shipped file; any
        # surprise on the way there leaves the full walk, which needs none of it.
        try:
            changes = finalwalk.choose(cfg.ship_final, shipped, cfg.source, cfg.exclude)
            if changes is not None:
                linked = finalwalk.linked_inodes(changes)
                quick = finalwalk.quick_hold(changes, shipped, linked=linked)
                recall = finalprep.for_archive(changes, shipped, linked)
        except Exception:
            log.exception("change journal unusable: walking every file")
            quick = recall = None

    holder: dict[str, Archiver] = {}

    def produce_archive(comp: Any) -> None:
        arch = Archiver(
            comp,
            excludes=cfg.exclude,
            deadline=deadline,
            clock=clock,
            hash_name=cfg.hash,
            progress=Progress(clock, progress_interval),
            max_file_size=cfg.max_file_size,
            one_file_system=cfg.one_file_system,
            skip=shipped.held if shipped is not None else None,
            quick=quick,
            recall=recall,
        )
        holder["arch"] = arch
        arch.add_sources(cfg.source)
        arch.finish()

    try:
        _, sent = upload_stream(cfg, clients.s3, key, produce_archive, cancel)
    finally:
        if shipped is not None and shipped.handover is not None and shipped.handover.journal is not None:
            shipped.handover.journal.close()
    report = holder["arch"].report
    result.bytes_read, result.bytes_uploaded, result.files = report.bytes_read, sent, report.files
    if report.held_files:
        log.info(
            "left out: shipped earlier",
            extra=fields(
                files=report.held_files,
                bytes=report.held_bytes,
                not_lstat=report.held_unseen,
                prepared=report.held_prepared,
            ),
        )

    journal_info: dict[str, Any] | None = None
    if cfg.journal_enabled():
        jkey = base + ".journal.export" + JOURNAL_SUFFIX[cfg.compression]
        jwarn: list[str] = []

        def produce_journal(comp: Any) -> None:
            _, w = journal.export(comp, deadline=deadline, clock=clock, cancel=cancel)
            jwarn.extend(w)

        raw, jsent = upload_stream(cfg, clients.s3, jkey, produce_journal, cancel)
        for text in jwarn:
            report.warnings.append(manifest.Warning(b"journal", text))
            log.warning("journal", extra=fields(warning=text))
        journal_info = {"key": jkey, "bytes": raw, "compressed_bytes": jsent, "warnings": jwarn}
        result.journal_key = jkey
        result.bytes_uploaded += jsent

    mkey = key + ".manifest.json"
    doc = manifest.build(
        report,
        key=key,
        compression=cfg.compression,
        agent_version=__version__,
        compressed_bytes=sent,
        journal=journal_info,
        segments=shipped.segments() if shipped is not None else None,
        instance_id=ident.instance_id,
        region=ident.region,
        group=group,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        sources=list(cfg.source),
        excludes=list(cfg.exclude),
    )
    put_small(clients.s3, cfg.bucket or "", mkey, ChainBody(*doc), extra=s3args.write_args(cfg))
    result.manifest_key = mkey
    result.warnings = len(report.warnings)
    for w in report.warnings[:50]:
        log.warning("skipped or changed", extra=fields(**manifest.path_fields(w.path), reason=w.reason))
    if report.stopped_early:
        result.status = PARTIAL
        log.warning(
            "deadline reached: archive closed early",
            extra=fields(omitted=len(report.omitted), cut_short=len(report.cut)),
        )
    else:
        result.status = SUCCEEDED
