"""What continuous shipping has put in S3, remembered in the state directory.

A file is known by its identity: device, inode, size and modification time (ns), plus two
content digests taken while it was shipped: the SHA-256 of the whole file (the manifest's
`sha256`, which `verify` checks after a restore) and the SHA-256 of its last 64 KiB.

- The watcher records a file only once its segment and the segment's manifest are in S3, so
  the ledger never claims what S3 does not hold; a file is shipped again only when its
  identity changed (it was written to since).
- At termination a file is left out of the archive only when its lstat matches a record and
  its last 64 KiB still hash the same. Any write moves the modification time; the tail
  digest also catches a rewrite that put the time back (`touch -d`). Hashing the whole file
  again would cost as much reading as archiving it, which is what shipping saves.
- The ledger names the instance it belongs to: one baked into an AMI is ignored.

The file is `ship-ledger.json`, replaced atomically (statedir.write_atomic) after each
segment: a watcher killed at any moment leaves either the old ledger or the new one.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import os
import stat
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from instance_agent import statedir
from instance_agent.logs import fields
from instance_agent.manifest import Held

log = logging.getLogger(__name__)

LEDGER_FILE = "ship-ledger.json"
FORMAT = 1
TAIL = 64 * 1024
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(frozen=True)
class FileId:
    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileId:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def token(self) -> str:
        """A short, stable text form for object keys."""
        return f"{self.dev:x}-{self.ino:x}-{self.size:x}-{self.mtime_ns:x}"


@dataclass(frozen=True)
class Shipped:
    fid: FileId
    path: bytes  # where the file was when shipped (it may have been renamed since)
    sha256: str
    tail_sha256: str
    key: str  # the segment object
    tar_bytes: int
    compressed_bytes: int

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["fid"] = asdict(self.fid)
        out["path"] = base64.b64encode(self.path).decode("ascii")
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Shipped:
        return cls(FileId(**obj["fid"]), base64.b64decode(obj["path"]), str(obj["sha256"]),
                   str(obj["tail_sha256"]), str(obj["key"]), int(obj["tar_bytes"]),
                   int(obj["compressed_bytes"]))

    def segment_info(self) -> dict[str, Any]:
        return {"key": self.key, "manifest_key": self.key + ".manifest.json",
                "tar_bytes": self.tar_bytes, "compressed_bytes": self.compressed_bytes}


def tail_digest(fd: int, size: int) -> str:
    """SHA-256 of the last TAIL bytes of the first `size` bytes of `fd`."""
    start = max(0, size - TAIL)
    h = hashlib.sha256()
    while start < size:
        chunk = os.pread(fd, size - start, start)
        if not chunk:
            break
        h.update(chunk)
        start += len(chunk)
    return h.hexdigest()


def open_same(name: bytes, dir_fd: int | None, fid: FileId) -> int | None:
    """`name` opened (never through a symlink) only if it still has identity `fid`."""
    try:
        fd = os.open(name, _OPEN, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    if not stat.S_ISREG(st.st_mode) or FileId.of(st) != fid:
        os.close(fd)
        return None
    return fd


class Ledger:
    """The shipped files of one instance, by (device, inode)."""

    def __init__(self, state_dir: str | None, instance_id: str,
                 records: Iterable[Shipped] = ()) -> None:
        self.state_dir = state_dir  # None: kept in memory only (an unusable state dir)
        self.instance_id = instance_id
        self._by_inode: dict[tuple[int, int], Shipped] = {
            (r.fid.dev, r.fid.ino): r for r in records}
        self._lock = threading.Lock()
        self.used: dict[str, Shipped] = {}  # segments a termination archive named

    @classmethod
    def load(cls, state_dir: str, instance_id: str) -> Ledger:
        """The ledger in `state_dir`, or an empty one (absent, unreadable, another
        instance's, or an untrusted directory: each means "archive everything")."""
        try:
            statedir.usable(state_dir)
            doc = json.loads(statedir.read(state_dir, LEDGER_FILE))
            if doc.get("instance_id") != instance_id or doc.get("format") != FORMAT:
                log.warning("shipping ledger of another instance ignored",
                            extra=fields(ledger_instance=doc.get("instance_id")))
                return cls(state_dir, instance_id)
            return cls(state_dir, instance_id,
                       [Shipped.from_json(r) for r in doc.get("files", [])])
        except FileNotFoundError:
            return cls(state_dir, instance_id)
        except statedir.Untrusted as err:
            log.warning("state directory not trusted: shipping remembered in memory only",
                        extra=fields(error=str(err)))
            return cls(None, instance_id)
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("shipping ledger unreadable: everything is archived at termination",
                        extra=fields(error=str(err)))
            return cls(state_dir, instance_id)

    # -- reading ------------------------------------------------------------------------
    def get(self, fid: FileId) -> Shipped | None:
        with self._lock:
            rec = self._by_inode.get((fid.dev, fid.ino))
        return rec if rec is not None and rec.fid == fid else None

    def totals(self) -> tuple[int, int]:
        with self._lock:
            return len(self._by_inode), sum(r.fid.size for r in self._by_inode.values())

    def held(self, path: bytes, st: os.stat_result, dir_fd: int | None,
             name: bytes) -> Held | None:
        """archive.Skip: the segment holding this file, if it is unchanged since shipped."""
        fid = FileId.of(st)
        rec = self.get(fid)
        if rec is None:
            return None
        fd = open_same(name, dir_fd, fid)
        if fd is None:
            return None
        try:
            same = tail_digest(fd, fid.size) == rec.tail_sha256
        except OSError:
            same = False
        finally:
            os.close(fd)
        if not same:
            log.info("changed since shipped (same time, new content): archived",
                     extra=fields(path=os.fsdecode(path)))
            return None
        self.used[rec.key] = rec
        return Held(rec.key, rec.sha256)

    def segments(self) -> list[dict[str, Any]]:
        """The segments `held` named, for the manifest."""
        return [rec.segment_info() for _, rec in sorted(self.used.items())]

    # -- writing ------------------------------------------------------------------------
    def add(self, rec: Shipped) -> None:
        with self._lock:
            self._by_inode[(rec.fid.dev, rec.fid.ino)] = rec
        self._save()

    def keep_only(self, present: set[tuple[int, int]]) -> None:
        """Forget files that are gone (rotated away for good): the ledger stays small."""
        with self._lock:
            gone = [k for k in self._by_inode if k not in present]
            for k in gone:
                del self._by_inode[k]
        if gone:
            self._save()

    def _save(self) -> None:
        if self.state_dir is None:
            return
        with self._lock:
            doc = {"format": FORMAT, "instance_id": self.instance_id,
                   "files": [r.to_json() for r in self._by_inode.values()]}
        try:
            statedir.write_atomic(self.state_dir, LEDGER_FILE, json.dumps(doc).encode())
        except OSError as err:
            # Not fatal: what is not remembered is archived again at termination.
            log.warning("cannot write the shipping ledger", extra=fields(
                error=err.strerror or errno.errorcode.get(err.errno or 0, str(err))))
