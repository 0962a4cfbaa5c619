"""The one backup pipeline, used by `instance-agent backup` (the SSM path) and by the watcher.

    lock ─► discover hook ─► heartbeats ┬► tar ─► compress ─► multipart upload (archive)
                                        ├► journalctl export ─► compress ─► upload (journal)
                                        └► manifest ─► PutObject
            ─► SNS report ─► CompleteLifecycleAction (in a finally) ─► record result ─► unlock

It takes small client interfaces, never builds boto3 clients (only the CLI does), and returns
the result object that `--json` prints and SNS carries.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from instance_agent import __version__, journal, keys, manifest, notify
from instance_agent.archive import Archiver
from instance_agent.compress import open_compressor
from instance_agent.config import Config
from instance_agent.errors import (
    EXIT_FAILED,
    EXIT_OK,
    AgentError,
    Cancelled,
    LifecycleError,
    LockTimeout,
    NotifyError,
)
from instance_agent.lifecycle import AutoScalingClient, Lifecycle, discover
from instance_agent.logs import fields
from instance_agent.manifest import ArchiveReport
from instance_agent.notify import SNSClient
from instance_agent.once import TerminationLock
from instance_agent.s3upload import (
    ChainBody,
    MultipartUpload,
    PartSizer,
    S3Client,
    abort_stale_uploads,
    put_small,
)

log = logging.getLogger(__name__)

TERMINATION = "termination"  # the dedupe key shared by the SSM path and the watcher
JOURNAL_SUFFIX = {"zstd": ".zst", "gzip": ".gz", "none": ""}


@dataclass
class Clients:
    s3: S3Client
    sns: SNSClient | None = None
    autoscaling: AutoScalingClient | None = None


@dataclass(frozen=True)
class Identity:
    instance_id: str
    region: str
    hostname: str = field(default_factory=socket.gethostname)


@dataclass
class Outcome:
    result: dict[str, Any]
    exit_code: int


class Interrupted(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT handlers: unwinds through every finally,
    so the upload is aborted, the failure reported and the hook completed."""


def new_result(cfg: Config, ident: Identity) -> dict[str, Any]:
    return {
        "status": "failed",
        "instance_id": ident.instance_id,
        "group": cfg.asg_name,
        "hook": cfg.hook_name,
        "bucket": cfg.bucket,
        "key": None,
        "manifest_key": None,
        "journal_key": None,
        "bytes_read": 0,
        "bytes_uploaded": 0,
        "files": 0,
        "warnings": 0,
        "lifecycle_result": "none",
        "lifecycle_error": None,
        "duration_s": 0.0,
        "error": None,
        "agent_version": __version__,
    }


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
        log.info("progress", extra=fields(bytes_read=report.bytes_read, files=report.files,
                                          mib_per_s=round(rate / 2**20, 1)))


def _s3_extra(cfg: Config) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if cfg.sse:
        extra["ServerSideEncryption"] = cfg.sse
    if cfg.kms_key_id:
        extra["SSEKMSKeyId"] = cfg.kms_key_id
    if cfg.storage_class:
        extra["StorageClass"] = cfg.storage_class
    if cfg.expected_bucket_owner:
        extra["ExpectedBucketOwner"] = cfg.expected_bucket_owner
    return extra


class _CancellableSink:
    """Checks the cancel event on every write, so a stop request ends the stream promptly."""

    def __init__(self, inner: Any, cancel: threading.Event) -> None:
        self._inner, self._cancel = inner, cancel

    def write(self, data: bytes | bytearray | memoryview, /) -> object:
        if self._cancel.is_set():
            raise Cancelled("backup cancelled")
        return self._inner.write(data)


def _upload_stream(cfg: Config, s3: S3Client, key: str, produce: Callable[[Any], None],
                   cancel: threading.Event | None = None) -> tuple[int, int]:
    """Run `produce(compressor)` into a multipart upload. Returns (raw bytes in, bytes sent).

    If `produce` raises, the upload is aborted by MultipartUpload.__exit__ and the error
    propagates: a producer failure can never look like a clean end of stream.
    """
    bucket = cfg.bucket or ""
    upload = MultipartUpload(
        s3, bucket, key, sizer=PartSizer.for_max(cfg.max_archive_size),
        workers=cfg.upload_workers, queue=cfg.upload_queue, extra=_s3_extra(cfg),
    )
    with upload:
        # Both sides check the event: a multithreaded zstd can hold tens of MiB that only
        # reach the upload in close(), after the producer has stopped writing.
        out: Any = _CancellableSink(upload, cancel) if cancel is not None else upload
        comp = open_compressor(cfg.compression, out, cfg.level)
        produce(_CancellableSink(comp, cancel) if cancel is not None else comp)
        comp.close()
        obj = upload.complete()
    return obj.size, upload.bytes_uploaded


def key_values(cfg: Config, ident: Identity, group: str | None) -> dict[str, str]:
    return {"prefix": cfg.prefix, "group": group or "no-group", "instance_id": ident.instance_id,
            "region": ident.region, "timestamp": keys.timestamp(), "hostname": ident.hostname}


def archive_and_upload(cfg: Config, ident: Identity, clients: Clients, result: dict[str, Any],
                       *, group: str | None, started: float, clock: Callable[[], float],
                       progress_interval: float, cancel: threading.Event | None = None) -> None:
    """Fill `result` with the archive, journal and manifest. Raises on failure."""
    values = key_values(cfg, ident, group)
    try:
        key = keys.render(cfg.key_template, values, cfg.compression)
    except ValueError as err:
        raise AgentError(str(err)) from None
    base = key[: -len(keys.EXTENSIONS[cfg.compression])]
    deadline = started + cfg.max_duration if cfg.max_duration else None
    result["key"] = key
    log.info("backup started", extra=fields(bucket=cfg.bucket, key=key, sources=list(cfg.source)))

    holder: dict[str, Archiver] = {}

    def produce_archive(comp: Any) -> None:
        arch = Archiver(comp, excludes=cfg.exclude, deadline=deadline, clock=clock,
                        hash_name=cfg.hash, progress=Progress(clock, progress_interval),
                        max_file_size=cfg.max_file_size, one_file_system=cfg.one_file_system)
        holder["arch"] = arch
        arch.add_sources(cfg.source)
        arch.finish()

    _, sent = _upload_stream(cfg, clients.s3, key, produce_archive, cancel)
    report = holder["arch"].report
    result.update(bytes_read=report.bytes_read, bytes_uploaded=sent, files=report.files)

    journal_info: dict[str, Any] | None = None
    if cfg.journal_enabled():
        jkey = base + ".journal.export" + JOURNAL_SUFFIX[cfg.compression]
        jwarn: list[str] = []

        def produce_journal(comp: Any) -> None:
            _, w = journal.export(comp, deadline=deadline, clock=clock)
            jwarn.extend(w)

        raw, jsent = _upload_stream(cfg, clients.s3, jkey, produce_journal, cancel)
        for text in jwarn:
            report.warnings.append(manifest.Warning(b"journal", text))
            log.warning("journal", extra=fields(warning=text))
        journal_info = {"key": jkey, "bytes": raw, "compressed_bytes": jsent, "warnings": jwarn}
        result["journal_key"] = jkey
        result["bytes_uploaded"] += jsent

    mkey = key + ".manifest.json"
    doc = manifest.build(report, key=key, compression=cfg.compression,
                         agent_version=__version__, compressed_bytes=sent, journal=journal_info,
                         instance_id=ident.instance_id, region=ident.region, group=group,
                         created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         sources=list(cfg.source), excludes=list(cfg.exclude))
    put_small(clients.s3, cfg.bucket or "", mkey, ChainBody(*doc), extra=_s3_extra(cfg))
    result["manifest_key"] = mkey
    result["warnings"] = len(report.warnings)
    for w in report.warnings[:50]:
        log.warning("skipped or changed", extra=fields(**manifest.path_fields(w.path),
                                                       reason=w.reason))
    if report.stopped_early:
        result["status"] = "partial"
        log.warning("deadline reached: archive closed early",
                    extra=fields(omitted=len(report.omitted)))
    else:
        result["status"] = "succeeded"


@contextmanager
def _heartbeats(lc: Lifecycle | None) -> Iterator[None]:
    if lc is None:
        yield
        return
    with lc.heartbeats_while():
        yield


def run(cfg: Config, ident: Identity, clients: Clients, *, dedupe: str | None = TERMINATION,
        clock: Callable[[], float] = time.monotonic, progress_interval: float = 30.0,
        on_stage: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None) -> Outcome:
    """Back up, report, complete. `dedupe=None` for runs that must not count as the
    termination (ad-hoc --no-complete runs, Spot stop/hibernate). `on_stage` hears
    "backing up" and "completing" (the watcher turns them into sd_notify STATUS=). Setting
    `cancel` stops the archive at the next write: the upload is aborted, the failure
    reported and the hook completed with --on-failure."""
    started = clock()
    result = new_result(cfg, ident)
    stage = on_stage or (lambda _s: None)
    if not cfg.complete:
        dedupe = None
    with ExitStack() as stack:
        lock: TerminationLock | None = None
        if dedupe:
            lock = TerminationLock((cfg.state_dir, cfg.runtime_dir),
                                   f"{dedupe}-{ident.instance_id}", clock=clock)
            try:
                lock.acquire(cfg.lock_timeout)
            except LockTimeout as err:
                result["error"] = str(err)
                result["duration_s"] = round(clock() - started, 3)
                return Outcome(result, EXIT_FAILED)
            stack.callback(lock.release)
            previous = lock.recorded()
            if previous is not None:
                return _duplicate(previous, result, clock() - started)
        outcome = _run_locked(cfg, ident, clients, result, started=started, clock=clock,
                              progress_interval=progress_interval, stage=stage, cancel=cancel,
                              locked=lock is not None)
        if lock is not None:
            lock.record(outcome.result, outcome.exit_code)
        return outcome
    raise AssertionError("unreachable")  # pragma: no cover - ExitStack never swallows here


def _duplicate(previous: dict[str, Any], result: dict[str, Any], elapsed: float) -> Outcome:
    first = previous.get("result", {})
    code = int(previous.get("exit_code", EXIT_FAILED))
    result.update({k: first.get(k) for k in ("group", "hook", "key", "manifest_key",
                                               "journal_key", "bucket") if k in first})
    result.update(status="duplicate", first_status=first.get("status"), first_exit_code=code,
                  duration_s=round(elapsed, 3))
    log.info("already backed up for this termination; nothing to do",
             extra=fields(key=result["key"], first_status=first.get("status")))
    return Outcome(result, code)


def _run_locked(cfg: Config, ident: Identity, clients: Clients, result: dict[str, Any], *,
                started: float, clock: Callable[[], float], progress_interval: float,
                stage: Callable[[str], None], cancel: threading.Event | None,
                locked: bool) -> Outcome:
    lc: Lifecycle | None = None
    group = cfg.asg_name
    if cfg.complete and clients.autoscaling is not None:
        try:
            target = discover(clients.autoscaling, ident.instance_id, group=cfg.asg_name,
                              hook=cfg.hook_name, token=cfg.lifecycle_token)
        except LifecycleError as err:
            target = None
            result["lifecycle_error"] = str(err)
            log.error("lifecycle hook discovery failed; backing up anyway",
                      extra=fields(error=str(err)))
        if target is not None:
            group = target.group
            result.update(group=target.group, hook=target.hook)
            lc = Lifecycle(clients.autoscaling, target, interval=cfg.heartbeat_interval,
                           wait_timeout=cfg.wait_timeout, clock=clock)
        else:
            log.info("no terminating lifecycle hook for this instance; nothing to complete")
    result["group"] = group
    if locked:
        # A run killed mid-upload (kill -9, power loss) leaves its multipart upload behind;
        # under the lock no other run of ours for this instance is uploading.
        prefix = keys.listing_prefix(cfg.key_template, key_values(cfg, ident, group))
        abort_stale_uploads(clients.s3, cfg.bucket or "", prefix, ident.instance_id,
                            extra=_s3_extra(cfg))
    try:
        stage("backing up")
        with _heartbeats(lc):
            try:
                archive_and_upload(cfg, ident, clients, result, group=group, started=started,
                                   clock=clock, progress_interval=progress_interval,
                                   cancel=cancel)
            except AgentError as err:
                result.update(status="failed", error=str(err))
            except Interrupted:
                # Not re-raised: the finally below must still report and complete, and the
                # caller gets an ordinary failed outcome to print and record.
                result.update(status="failed", error="interrupted by signal")
            except Exception as err:
                log.exception("unexpected error during backup")
                result.update(status="failed", error=f"{type(err).__name__}: {err}")
    finally:
        ok = result["status"] in ("succeeded", "partial")
        if lc is not None and not lc.gone.is_set():
            result["lifecycle_result"] = cfg.on_success if ok else cfg.on_failure
        result["duration_s"] = round(clock() - started, 3)
        level = logging.INFO if ok else logging.ERROR
        log.log(level, "backup " + result["status"], extra=fields(
            key=result["key"], bytes_read=result["bytes_read"],
            bytes_uploaded=result["bytes_uploaded"], files=result["files"],
            warnings=result["warnings"], error=result["error"]))
        _report(cfg, clients, result)
        if lc is not None:
            stage("completing")
            if lc.gone.is_set():
                result["lifecycle_error"] = "lifecycle action expired or was completed elsewhere"
            else:
                error = lc.complete(result["lifecycle_result"], cfg.complete_timeout)
                if error:
                    result["lifecycle_error"] = error
                    log.error("lifecycle completion failed", extra=fields(error=error))
                    _report(cfg, clients, {**result, "status": result["status"],
                                           "event": "lifecycle_completion_failed"})
    code = EXIT_OK if result["status"] in ("succeeded", "partial") else EXIT_FAILED
    return Outcome(result, code)


def _report(cfg: Config, clients: Clients, result: dict[str, Any]) -> None:
    if not cfg.topic_arn or clients.sns is None:
        return
    try:
        msg_id = notify.publish(clients.sns, cfg.topic_arn, result)
        log.info("report published", extra=fields(topic_arn=cfg.topic_arn, message_id=msg_id))
    except NotifyError as err:
        result["notify_error"] = str(err)
        log.error("report not published", extra=fields(error=str(err)))

