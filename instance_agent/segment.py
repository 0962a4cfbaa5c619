"""Ship complete files as a segment: one tar of many files (a batch the shipper bounds by
bytes and count; a file over the byte budget alone), compressed, in its own object, with its
own small manifest beside it. Packing small files together is what keeps shipping bound by
compression and upload speed rather than by one object's round trips per file.

    files ─► tar (archive.Archiver) ─► compress (in this thread) ─► paced ─► multipart upload
    manifest ─► PutObject
    ledger ◄─ the file's identity, once both are in S3

The file is reached from its source root one directory at a time without following a
symlink (as the termination walk does), so a directory swapped for a link while the watcher
waits cannot make it ship another file. The key is derived from the files' identities
(batch_key) and written create-only: after a crash between the upload and the ledger
write, shipping the same batch again is refused by S3 (PreconditionFailed) and only
recorded, never stored twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from instance_agent import __version__, keys, manifest, s3args
from instance_agent.archive import Archiver
from instance_agent.clients import Clients
from instance_agent.config import Config
from instance_agent.errors import ObjectExists
from instance_agent.fsdir import open_below
from instance_agent.logs import fields
from instance_agent.manifest import path_from_fields
from instance_agent.s3args import write_args
from instance_agent.s3stream import upload_stream
from instance_agent.s3upload import ChainBody, S3Client, put_small
from instance_agent.shiprecord import FileId, Shipped, open_same, tail_digest
from instance_agent.shipstate import Ledger
from instance_agent.tarstream import Sink
from instance_agent.throttle import paced

log = logging.getLogger(__name__)

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class Changed(Exception):
    """The file changed or vanished while it was shipped: not recorded, tried again later."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One file to ship: `root` a source directory, `rel` the path below it."""

    root: bytes
    rel: bytes

    @property
    def path(self) -> bytes:
        return os.path.join(self.root, self.rel)


def open_parent(target: Target) -> int:
    """The directory holding the target, reached from its root with O_NOFOLLOW."""
    root = os.open(target.root, _DIR)  # a source root given as a symlink is followed, by intent
    try:
        return open_below(root, [p for p in os.path.dirname(target.rel).split(b"/") if p])
    finally:
        os.close(root)


class _Counted:
    def __init__(self, inner: Sink) -> None:
        self.inner, self.count = inner, 0

    def write(self, data: bytes | bytearray | memoryview, /) -> object:
        self.count += len(data)
        return self.inner.write(data)


def batch_key(
    cfg: Config, values: dict[str, str], files: list[tuple[Target, FileId]], replaces: int | None = None
) -> str:
    """The segment's key, derived from what it holds: one file keeps its own name and
    identity; a batch is named for its first file, its count and a digest of every
    identity, so the same batch (the shipper picks them in a fixed order) gets the same key
    after a restart and S3's create-only write refuses a second copy.

    A file shipped again because its segment grew old (a retention) gets a new object with
    a new date, where its old key would be refused and keep its old date: `replaces` (the
    date of the newest old segment it replaces) ends the identity. It is the same after a
    restart, as the old record stays until the new one is recorded."""
    suffix = f".r{replaces}" if replaces is not None else ""
    first = os.fsdecode(os.path.basename(files[0][0].rel))
    if len(files) == 1:
        return keys.segment_key(
            cfg.key_template, values, first, files[0][1].token() + suffix, cfg.compression
        )
    h = hashlib.sha256()
    for target, fid in files:
        h.update(target.path + b"\0" + fid.token().encode() + b"\n")
    return keys.segment_key(
        cfg.key_template, values, first, f"{len(files)}files-{h.hexdigest()[:24]}{suffix}", cfg.compression
    )


def _dated(s3: S3Client, cfg: Config, key: str) -> float:
    """S3's date of an object that exists; 0 (too old to count: shipped again) if unknown."""
    try:
        when = s3.head_object(Bucket=cfg.bucket, Key=key, **s3args.owner_args(cfg)).get("LastModified")
    except (ClientError, BotoCoreError):
        return 0.0
    return when.timestamp() if isinstance(when, datetime) else 0.0


class _Dirs:
    """Parent directories of a batch's files, each opened once (a batch of small files
    mostly shares a few)."""

    def __init__(self) -> None:
        self.fds: dict[tuple[bytes, bytes], int] = {}

    def parent(self, target: Target) -> int:
        where = (target.root, os.path.dirname(target.rel))
        fd = self.fds.get(where)
        if fd is None:
            fd = self.fds[where] = open_parent(target)
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def ship(
    cfg: Config,
    clients: Clients,
    ledger: Ledger,
    targets: list[Target],
    values: dict[str, str],
    *,
    stop: threading.Event,
    clock: Callable[[], float],
    wall: Callable[[], float] = time.time,
) -> list[Shipped]:
    """Upload `targets` as one segment and record the files that arrived whole (one ledger
    line). Raises Changed when none did, or an AgentError."""
    dirs = _Dirs()
    try:
        files: list[tuple[Target, FileId]] = []
        ctimes: dict[bytes, int] = {}
        for target in targets:
            try:
                st = os.stat(os.path.basename(target.rel), dir_fd=dirs.parent(target), follow_symlinks=False)
            except OSError:
                continue  # gone since the scan: nothing to ship
            if stat.S_ISREG(st.st_mode):
                files.append((target, FileId.of(st)))
                ctimes[target.path] = st.st_ctime_ns
        if not files:
            raise Changed("no longer regular files")
        # Before the upload begins: no later than any date S3 gives the object, from which a
        # retention counts (shipstate.refresh_age).
        at = wall()
        aged = [rec.at for _, fid in files if (rec := ledger.aged(fid)) is not None]
        key = batch_key(cfg, values, files, int(max(aged)) if aged else None)
        holder: dict[str, Any] = {}

        def produce(comp: Any) -> None:
            arch = Archiver(comp, clock=clock, hash_name="sha256")
            holder["arch"] = arch
            for target, _ in files:
                arch.add_file_at(dirs.parent(target), os.path.basename(target.rel), target.path)
            arch.finish()

        def wrap(sink: Sink) -> Sink:
            holder["counted"] = counted = _Counted(sink)
            return paced(counted, cfg.ship_bandwidth, clock, stop)

        # One upload worker and one queued part: 3 part buffers (24 MiB) at most, one
        # segment at a time, and compression in this (low-priority) thread.
        one = dataclasses.replace(cfg, upload_workers=1, upload_queue=1)
        existed = False
        try:
            upload_stream(one, clients.s3, key, produce, stop, threads=0, wrap=wrap)
        except ObjectExists:
            existed = True  # shipped by a run killed before it could record it
            if cfg.retention_days:
                at = _dated(clients.s3, cfg, key)  # that run's date, not this one's
        report = holder["arch"].report
        sent = holder["counted"].count
        # Only a file read whole, warning-free and unchanged since is recorded; the others
        # wait to settle again (their bytes in this segment are simply not used).
        warned = {w.path for w in report.warnings}
        read = {path_from_fields(e): e for e in report.entries()}
        recs = []
        for target, fid in files:
            entry = read.get(target.path.lstrip(b"/"))
            if entry is None or target.path in warned or entry["size"] != fid.size:
                continue
            fd = open_same(os.path.basename(target.rel), dirs.parent(target), fid)
            if fd is None:
                continue
            try:
                tail = tail_digest(fd, fid.size)
            finally:
                os.close(fd)
            recs.append(
                Shipped(
                    fid,
                    target.path,
                    str(entry["sha256"]),
                    tail,
                    key,
                    report.tar_bytes,
                    sent,
                    ctimes[target.path],
                    cfg.bucket or "",
                    at=at,
                )
            )
        doc = manifest.build(
            report,
            key=key,
            compression=cfg.compression,
            agent_version=__version__,
            compressed_bytes=sent,
            journal=None,
            instance_id=values["instance_id"],
            region=values["region"],
            group=values["group"],
            segment_of=values["instance_id"],
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            sources=sorted({os.fsdecode(t.root) for t, _ in files}),
            excludes=[],
            # The ledger lines of this segment: an agent whose state directory is gone (a
            # root-volume replacement) reads them back instead of shipping these files
            # again (ledgerseed.py).
            shipped=[r.file_json() for r in recs],
        )
        with contextlib.suppress(ObjectExists):  # the manifest too was written by that run
            put_small(
                clients.s3, cfg.bucket or "", key + ".manifest.json", ChainBody(*doc), extra=write_args(cfg)
            )
    finally:
        dirs.close()
    if not recs:
        raise Changed("; ".join(w.reason for w in report.warnings) or "changed while read")
    ledger.add_segment(recs)
    log.info(
        "segment shipped",
        extra=fields(
            key=key,
            files=len(recs),
            bytes=sum(r.fid.size for r in recs),
            compressed_bytes=sent,
            already_there=existed,
            **({"path": os.fsdecode(recs[0].path)} if len(recs) == 1 else {}),
        ),
    )
    return recs
