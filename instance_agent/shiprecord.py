"""What the shipping ledger remembers of one shipped file, and the digests that tell it unchanged.

A file is known by its identity (`FileId`: device, inode, size and modification time, ns)
and two SHA-256 digests taken while it was shipped: of the whole file (the manifest's
`sha256`) and of its last TAIL bytes. `Shipped` adds the segment that holds it; the ledger's
rules for when a record counts are in shipstate.py.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import asdict, dataclass
from typing import Any

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
    # The inode change time when shipped (0: unknown). Userland cannot set it back: any
    # write, utime, chmod or rename moves it, so while it is unchanged the content is too
    # and the tail need not be read again at termination.
    ctime_ns: int = 0
    bucket: str = ""  # where the segment is ("" only in records made in memory by tests)
    # When the segment's upload began (epoch seconds; 0: unknown, as in lines written before
    # it was recorded): no later than any date S3 gives the object, from which a lifecycle
    # rule counts its days (refresh_age).
    at: float = 0.0
    # How many files the segment shipped (its manifest's `shipped` list; 0: unknown, a line
    # written before the count was kept): a final manifest that holds them all need not
    # name them (manifest.HeldFiles).
    segment_files: int = 0

    def file_json(self) -> dict[str, Any]:
        """This file on its segment's ledger line (the segment's own fields are there once)."""
        return {
            "fid": asdict(self.fid),
            "path": base64.b64encode(self.path).decode("ascii"),
            "sha256": self.sha256,
            "tail_sha256": self.tail_sha256,
            "ctime_ns": self.ctime_ns,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], segment: dict[str, Any]) -> Shipped:
        return cls(
            FileId(**obj["fid"]),
            base64.b64decode(obj["path"]),
            str(obj["sha256"]),
            str(obj["tail_sha256"]),
            str(segment["key"]),
            int(segment["tar_bytes"]),
            int(segment["compressed_bytes"]),
            int(obj.get("ctime_ns", 0)),
            str(segment.get("bucket", "")),
            at=float(segment.get("at", 0.0)),
            segment_files=int(segment.get("count", 0)),
        )

    def segment_info(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "manifest_key": self.key + ".manifest.json",
            "tar_bytes": self.tar_bytes,
            "compressed_bytes": self.compressed_bytes,
        }


def full_digest(fd: int, size: int) -> str:
    """SHA-256 of the first `size` bytes of `fd` (the manifest's `sha256` of a file that
    size), read in 1 MiB blocks."""
    h = hashlib.sha256()
    offset = 0
    while offset < size:
        block = os.pread(fd, min(2**20, size - offset), offset)
        if not block:
            break
        h.update(block)
        offset += len(block)
    return h.hexdigest()


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
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != (
        fid.dev,
        fid.ino,
        fid.size,
        fid.mtime_ns,
    ):
        os.close(fd)
        return None
    return fd
