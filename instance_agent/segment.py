"""Ship one complete file as a segment: a one-file tar, compressed, in its own object, with
its own small manifest beside it.

    file ─► tar (archive.Archiver) ─► compress (in this thread) ─► paced ─► multipart upload
    manifest ─► PutObject
    ledger ◄─ the file's identity, once both are in S3

The file is reached from its source root one directory at a time without following a
symlink (as the termination walk does), so a directory swapped for a link while the watcher
waits cannot make it ship another file. The key is derived from the file's identity
(keys.segment_key) and written create-only: after a crash between the upload and the
ledger write, shipping the same file again is refused by S3 (PreconditionFailed) and only
recorded, never stored twice.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from instance_agent import __version__, keys, manifest
from instance_agent.archive import Archiver, Sink
from instance_agent.backup import Clients, _s3_extra, _upload_stream
from instance_agent.config import Config
from instance_agent.errors import UploadError
from instance_agent.logs import fields
from instance_agent.s3upload import ChainBody, put_small
from instance_agent.shipstate import FileId, Ledger, Shipped, open_same, tail_digest
from instance_agent.throttle import paced

log = logging.getLogger(__name__)

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_EXISTS = "PreconditionFailed"  # s3upload.describe_client_error's words for a create-only refusal


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
    fd = os.open(target.root, _DIR)  # a source root given as a symlink is followed, by intent
    try:
        for part in [p for p in os.path.dirname(target.rel).split(b"/") if p]:
            nxt = os.open(part, _DIR | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Counted:
    def __init__(self, inner: Sink) -> None:
        self.inner, self.count = inner, 0

    def write(self, data: bytes | bytearray | memoryview, /) -> object:
        self.count += len(data)
        return self.inner.write(data)


def ship(cfg: Config, clients: Clients, ledger: Ledger, target: Target, values: dict[str, str],
         *, stop: threading.Event, clock: Callable[[], float]) -> Shipped:
    """Upload `target` as a segment and record it. Raises Changed, or an AgentError."""
    name = os.path.basename(target.rel)
    dir_fd = open_parent(target)
    try:
        before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISREG(before.st_mode):
            raise Changed("no longer a regular file")
        fid = FileId.of(before)
        key = keys.segment_key(cfg.key_template, values, os.fsdecode(name), fid.token(),
                               cfg.compression)
        holder: dict[str, Any] = {}

        def produce(comp: Any) -> None:
            arch = Archiver(comp, clock=clock, hash_name="sha256")
            holder["arch"] = arch
            arch.add_file_at(dir_fd, name, target.path)
            arch.finish()

        def wrap(sink: Sink) -> Sink:
            holder["counted"] = counted = _Counted(sink)
            return paced(counted, cfg.ship_bandwidth, clock, stop)

        # One upload worker and one queued part: 3 part buffers (24 MiB) at most, one file at
        # a time, and compression in this (low-priority) thread.
        one = dataclasses.replace(cfg, upload_workers=1, upload_queue=1)
        existed = False
        try:
            _upload_stream(one, clients.s3, key, produce, stop, threads=0, wrap=wrap)
        except UploadError as err:
            if _EXISTS not in str(err):
                raise
            existed = True  # shipped by a run killed before it could record it
        report = holder["arch"].report
        entries = report.entries()
        if report.warnings or len(entries) != 1 or entries[0]["size"] != fid.size:
            raise Changed("; ".join(w.reason for w in report.warnings) or "changed while read")
        sent = holder["counted"].count
        doc = manifest.build(report, key=key, compression=cfg.compression,
                             agent_version=__version__, compressed_bytes=sent, journal=None,
                             instance_id=values["instance_id"], region=values["region"],
                             group=values["group"], segment_of=values["instance_id"],
                             created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             sources=[os.fsdecode(target.path)], excludes=[])
        try:
            put_small(clients.s3, cfg.bucket or "", key + ".manifest.json", ChainBody(*doc),
                      extra=_s3_extra(cfg))
        except UploadError as err:
            if _EXISTS not in str(err):
                raise
        fd = open_same(name, dir_fd, fid)
        if fd is None:
            raise Changed("changed while shipped")
        try:
            tail = tail_digest(fd, fid.size)
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)
    rec = Shipped(fid, target.path, str(entries[0]["sha256"]), tail, key, report.tar_bytes, sent)
    ledger.add(rec)
    log.info("segment shipped", extra=fields(path=os.fsdecode(target.path), key=key,
                                             bytes=fid.size, compressed_bytes=sent,
                                             already_there=existed))
    return rec
