"""What continuous shipping has put in S3, remembered in the state directory.

A file is known by its identity: device, inode, size and modification time (ns), plus two
content digests taken while it was shipped: the SHA-256 of the whole file (the manifest's
`sha256`, which `verify` checks after a restore) and the SHA-256 of its last 64 KiB.

- The watcher records a file only once its segment and the segment's manifest are in S3, so
  the ledger never claims what S3 does not hold; a file is shipped again only when its
  identity changed (it was written to since).
- At termination a file is left out of the archive only when its lstat matches a record and
  either its inode change time is the one recorded (nothing, not even `touch -d`, can set
  it back) or, the change time having moved, its last 64 KiB and then its whole content
  still hash the same. A rewrite in place that kept the size, put the modification time
  back and left the tail alone is caught only by the whole-file SHA-256; that costs reading
  the file (renamed, rotated files pay it at termination), never uploading it again.
- The ledger names the instance it belongs to: one baked into an AMI is ignored.
- Each segment line names the bucket it went to, and its key carries the prefix. A record
  counts only while the agent ships to that bucket and segment prefix (`aim`): after a
  reload or a restart with another bucket or prefix, the termination archive holds those
  files again and the shipper ships them again, so no backup names objects in a bucket it
  is not in (issue 19 item 2). Format 3 added the bucket; an older ledger is seeded again
  from S3 (ledgerseed.py), as a lost one is.
- With a retention (`retention_days`, the bucket's expiration rule), a record counts only
  while its segment is younger than half of it (`refresh_age`): an unchanged file is then
  shipped again, or archived at termination, before the rule can expire the segment that
  holds it, and a backup never names a segment older than half the retention (issue 19
  item 3).

The file is `ship-ledger.jsonl`, append-only, so recording a segment costs one line
whatever the ledger's size (a full rewrite per segment made shipping many small files take
hours):

- the first line names the format and the instance; each later line is one shipped segment
  (its key, sizes and files) or a list of files forgotten (gone from the sources);
- a line is appended with one write() and fsync'd only after the segment and its manifest
  are in S3; a torn last line (a watcher killed mid-write) is ignored when read, and its
  files are shipped again, which S3's create-only write turns into a record only;
- the shipper compacts it when it starts, and while running once it holds many more lines
  than live records (`needs_compaction`; statedir.write_atomic: old or new, never half);
- like every file of the state directory it is opened with O_NOFOLLOW, and created O_EXCL.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import stat
import struct
import threading
import time
from array import array
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from instance_agent import statedir
from instance_agent.logs import fields
from instance_agent.manifest import Held

log = logging.getLogger(__name__)

LEDGER_FILE = "ship-ledger.jsonl"
FORMAT = 3
TAIL = 64 * 1024
COMPACT_AFTER = 10_000  # ledger lines beyond twice the live records before a rewrite
DAY = 86_400.0


def refresh_age(retention_days: int) -> float | None:
    """How old a segment may be and still hold a file for a new backup; None: no limit.

    S3 expires an object `Days` after its creation, rounded up to the next midnight UTC
    (https://docs.aws.amazon.com/AmazonS3/latest/userguide/intro-lifecycle-rules.html), so
    a segment is safe for at least `retention_days` from `Shipped.at`. Half of that: a
    backup written now names only segments at most half the retention old, so it stays
    whole for at least the other half, and an unchanged file costs one more upload every
    half retention. A backup older than that may have lost segments; `list --verify` says
    which."""
    return retention_days * DAY / 2 if retention_days > 0 else None


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


# In memory the shipped files are packed, not one Python object each: a dict of Shipped
# dataclasses cost about 2.7 KiB a file (347 MiB RSS at 100,000 files, issue 19 item 6).
# Each file is one fixed row (_ROW: identity, change time, its segment's number, both
# digests) and its path; a segment's own fields (key, bucket, sizes) are held once, in a
# prototype record the rows name by number. Most rows sit in a sorted base (one array of
# inodes to search, one bytearray of rows, one of paths and its offsets: about 130 bytes a
# file with its path); the latest changes go to a small dict (`recent`) that is merged into
# the base once it passes a share of it, or when the shipper goes idle.
_ROW = struct.Struct("<QQqqqI32s32s")  # dev, ino, size, mtime_ns, ctime_ns, segment, sha256, tail
_SEG_AT = 40  # the segment number's offset in a row
_SEG = struct.Struct("<I")
_KEY = struct.Struct("<QQqq")  # dev, ino, size, mtime_ns: a row's head
_INO = (1 << 64) - 1
_NO_FID = FileId(0, 0, 0, 0)
MERGE_MIN = 4096  # recent rows before a merge is worth its O(files) cost


def inode_key(dev: int, ino: int) -> int:
    """A file's key in the ledger: its device and inode as one int."""
    return dev << 64 | ino


class _Records:
    """The shipped files by inode, packed (see _ROW)."""

    def __init__(self) -> None:
        # The base: sorted by (inode, device); its arrays are replaced by a merge, never
        # changed in place (a view shares them), except `dead`.
        self.inos = array("Q")
        self.fixed = bytearray()
        self.paths = bytearray()
        self.offsets = array("Q", [0])
        self.dead = bytearray()  # 1: removed since the merge
        self.dead_count = 0
        self.recent: dict[int, bytes] = {}  # key -> row + path, newer than the base
        self.segments: list[Shipped] = []  # a segment's fields; the per-file ones blank
        self.index: dict[Shipped, int] = {}
        self.files: list[int] = []  # per segment: live rows, and the bytes of their files
        self.bytes: list[int] = []

    def __len__(self) -> int:
        return len(self.inos) - self.dead_count + len(self.recent)

    def copy(self) -> _Records:
        out = _Records()
        out.inos, out.fixed, out.paths, out.offsets = self.inos, self.fixed, self.paths, self.offsets
        out.dead, out.dead_count = bytearray(self.dead), self.dead_count
        out.recent = dict(self.recent)
        out.segments, out.index = list(self.segments), dict(self.index)
        out.files, out.bytes = list(self.files), list(self.bytes)
        return out

    # -- finding a row --------------------------------------------------------------------
    def _find(self, k: int) -> int:
        """The base index of live key `k`, or -1."""
        dev, ino = k >> 64, k & _INO
        inos = self.inos
        i = bisect.bisect_left(inos, ino)
        while i < len(inos) and inos[i] == ino:
            if not self.dead[i] and _KEY.unpack_from(self.fixed, i * _ROW.size)[0] == dev:
                return i
            i += 1
        return -1

    def _where(self, k: int) -> tuple[bytes | bytearray, int, int] | None:
        """Where key `k`'s row is: (buffer, offset, base index), the index -1 for a recent
        row (its buffer is the row itself, its path after it)."""
        found = self.recent.get(k)
        if found is not None:
            return found, 0, -1
        i = self._find(k)
        return None if i < 0 else (self.fixed, i * _ROW.size, i)

    def row(self, k: int) -> tuple[bytes, bytes] | None:
        """The fixed row and the path of key `k`."""
        where = self._where(k)
        if where is None:
            return None
        buf, at, i = where
        if i < 0:
            return bytes(buf[: _ROW.size]), bytes(buf[_ROW.size :])
        return bytes(buf[at : at + _ROW.size]), bytes(self.paths[self.offsets[i] : self.offsets[i + 1]])

    def at(self, i: int) -> Shipped:
        """The record of the base's row `i`."""
        at = i * _ROW.size
        return self._build(self.fixed[at : at + _ROW.size], self.paths[self.offsets[i] : self.offsets[i + 1]])

    def record(self, k: int) -> Shipped | None:
        found = self.row(k)
        return self._build(*found) if found is not None else None

    def _build(self, fixed: bytes | bytearray, path: bytes | bytearray) -> Shipped:
        dev, ino, size, mtime_ns, ctime_ns, seg, sha, tail = _ROW.unpack(fixed)
        rec: Shipped = dataclasses.replace(
            self.segments[seg],
            fid=FileId(dev, ino, size, mtime_ns),
            path=bytes(path),
            sha256=sha.hex(),
            tail_sha256=tail.hex(),
            ctime_ns=ctime_ns,
        )
        return rec

    def matches(self, k: int, size: int, mtime_ns: int) -> Shipped | None:
        """The segment prototype of key `k` when its record has this size and time."""
        where = self._where(k)
        if where is None:
            return None
        buf, at, _ = where
        if _KEY.unpack_from(buf, at)[2:] != (size, mtime_ns):
            return None
        return self.segments[int(_SEG.unpack_from(buf, at + _SEG_AT)[0])]

    def live_keys(self) -> Iterator[int]:
        """Every live key (the base's, then the recent ones)."""
        for i in range(len(self.inos)):
            if not self.dead[i]:
                dev, ino = _KEY.unpack_from(self.fixed, i * _ROW.size)[:2]
                yield inode_key(dev, ino)
        yield from list(self.recent)

    # -- changing -------------------------------------------------------------------------
    def _segment(self, rec: Shipped) -> int:
        proto = dataclasses.replace(rec, fid=_NO_FID, path=b"", sha256="", tail_sha256="", ctime_ns=0)
        n = self.index.get(proto)
        if n is None:
            n = self.index[proto] = len(self.segments)
            self.segments.append(proto)
            self.files.append(0)
            self.bytes.append(0)
        return n

    def put(self, rec: Shipped) -> bool:
        """Hold `rec` (replacing the inode's earlier record); False when it cannot be held
        (digests that are not SHA-256 hex: never ours), so the file is shipped again."""
        fid = rec.fid
        try:
            sha, tail = bytes.fromhex(rec.sha256), bytes.fromhex(rec.tail_sha256)
            if len(sha) != 32 or len(tail) != 32:
                return False
            row = _ROW.pack(fid.dev, fid.ino, fid.size, fid.mtime_ns, rec.ctime_ns, 0, sha, tail)
        except (ValueError, struct.error):
            return False
        seg = self._segment(rec)
        k = inode_key(fid.dev, fid.ino)
        self.pop(k)
        self.recent[k] = row[:_SEG_AT] + _SEG.pack(seg) + row[_SEG_AT + 4 :] + rec.path
        self.files[seg] += 1
        self.bytes[seg] += fid.size
        if len(self.recent) > max(MERGE_MIN, len(self.inos) // 8):
            self.merge()
        return True

    def pop(self, k: int) -> None:
        where = self._where(k)
        if where is None:
            return
        buf, at, i = where
        if i < 0:
            del self.recent[k]
        else:
            self.dead[i] = 1
            self.dead_count += 1
        seg = _SEG.unpack_from(buf, at + _SEG_AT)[0]
        self.files[seg] -= 1
        self.bytes[seg] -= _KEY.unpack_from(buf, at)[2]

    def merge(self) -> None:
        """Fold the recent rows into a new base and drop the dead ones: O(files), in new
        arrays (a view may hold the old ones)."""
        if not self.recent and not self.dead_count:
            return
        recent = sorted(self.recent.items(), key=lambda kv: (kv[0] & _INO, kv[0] >> 64))
        inos, fixed, paths, offsets = array("Q"), bytearray(), bytearray(), array("Q", [0])
        old_inos, old_fixed, old_paths, old_offsets = self.inos, self.fixed, self.paths, self.offsets
        size = _ROW.size
        j = 0
        for i in range(len(old_inos)):
            if self.dead[i]:
                continue
            at = i * size
            ino = old_inos[i]
            dev = _KEY.unpack_from(old_fixed, at)[0]
            while j < len(recent) and (recent[j][0] & _INO, recent[j][0] >> 64) < (ino, dev):
                k, row = recent[j]
                inos.append(k & _INO)
                fixed += row[:size]
                paths += row[size:]
                offsets.append(len(paths))
                j += 1
            inos.append(ino)
            fixed += old_fixed[at : at + size]
            paths += old_paths[old_offsets[i] : old_offsets[i + 1]]
            offsets.append(len(paths))
        for k, row in recent[j:]:
            inos.append(k & _INO)
            fixed += row[:size]
            paths += row[size:]
            offsets.append(len(paths))
        self.inos, self.fixed, self.paths, self.offsets = inos, fixed, paths, offsets
        self.dead, self.dead_count = bytearray(len(inos)), 0
        self.recent = {}

    def renumber(self) -> None:
        """Drop the segments no row names any more (file churn leaves many)."""
        live = [n for n, count in enumerate(self.files) if count > 0]
        if len(live) == len(self.segments):
            return
        new = {old: n for n, old in enumerate(live)}
        self.merge()  # every row in the base, then renumbered in a copy of it
        fixed = bytearray(self.fixed)
        for at in range(0, len(fixed), _ROW.size):
            seg = _SEG.unpack_from(fixed, at + _SEG_AT)[0]
            _SEG.pack_into(fixed, at + _SEG_AT, new[seg])
        self.fixed = fixed
        self.segments = [self.segments[n] for n in live]
        self.index = {proto: n for n, proto in enumerate(self.segments)}
        self.files = [self.files[n] for n in live]
        self.bytes = [self.bytes[n] for n in live]


class Ledger:
    """The shipped files of one instance, by (device, inode)."""

    def __init__(
        self,
        state_dir: str | None,
        instance_id: str,
        records: Iterable[Shipped] = (),
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state_dir = state_dir  # None: kept in memory only (an unusable state dir)
        self.instance_id = instance_id
        self._records = _Records()
        for r in records:
            self._records.put(r)
        self._lock = threading.Lock()
        self._fd: int | None = None  # the ledger opened for appending, once needed
        self.lines = 0  # lines read at load: compact() is worth it when many are stale
        self.used: dict[str, Shipped] = {}  # segments a termination archive named
        # No ledger of this instance was found (a first start, or a state directory lost
        # with its root volume): ledgerseed.py may rebuild it from S3.
        self.fresh = False
        # Where shipping goes now (aim): None counts every record.
        self._target: tuple[str, str] | None = None
        self._max_age: float | None = None  # refresh_age of the retention; None: no limit
        self._clock = clock  # wall time: segment ages are compared with S3's dates

    def aim(self, bucket: str, prefix: str, max_age: float | None = None) -> None:
        """Count only records shipped to `bucket` under the segment prefix `prefix`, and,
        with `max_age`, only while their segment is younger than that (refresh_age)."""
        self._target = (bucket, prefix)
        self._max_age = max_age

    def _aimed(self, rec: Shipped) -> bool:
        target = self._target
        return target is None or (rec.bucket == target[0] and rec.key.startswith(target[1]))

    def _young(self, rec: Shipped) -> bool:
        return self._max_age is None or self._clock() - rec.at < self._max_age

    def _here(self, rec: Shipped) -> bool:
        return self._aimed(rec) and self._young(rec)

    @classmethod
    def load(cls, state_dir: str, instance_id: str) -> Ledger:
        """The ledger in `state_dir`, or an empty one (absent, unreadable, another
        instance's, or an untrusted directory: each means "archive everything")."""
        try:
            statedir.usable(state_dir)
            lines = _read_lines(state_dir)
            head = json.loads(next(lines, b""))
            if head.get("instance_id") != instance_id or head.get("format") != FORMAT:
                lines.close()
                log.warning(
                    "shipping ledger of another instance or format ignored",
                    extra=fields(ledger_instance=head.get("instance_id"), ledger_format=head.get("format")),
                )
                ledger = cls(state_dir, instance_id)
                ledger._discard()
                ledger.fresh = True
                return ledger
            ledger = cls(state_dir, instance_id)
            n = 1
            # Read a line at a time: the whole file and its split lines at once were twice
            # its size in memory (33 MB at 100,000 files).
            for n, line in enumerate(lines, start=2):
                if not line.strip():
                    continue
                try:
                    ledger._apply(json.loads(line))
                # RecursionError: a line nested thousands deep (json's parser is recursive);
                # never ours, and it must not stop shipping (issue 19 item 8).
                except (ValueError, KeyError, TypeError, RecursionError) as err:
                    # A torn last line (killed mid-append): its files are shipped again,
                    # and S3's create-only write makes that a record only.
                    log.warning(
                        "shipping ledger line unreadable: its files are shipped again",
                        extra=fields(line=n, error=str(err)),
                    )
            ledger.lines = n
            return ledger
        except FileNotFoundError:
            ledger = cls(state_dir, instance_id)
            ledger.fresh = True
            return ledger
        except statedir.Untrusted as err:
            log.warning(
                "state directory not trusted: shipping remembered in memory only",
                extra=fields(error=str(err)),
            )
            return cls(None, instance_id)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning(
                "shipping ledger unreadable: everything is archived at termination",
                extra=fields(error=str(err)),
            )
            ledger = cls(state_dir, instance_id)
            ledger._discard()
            return ledger

    def _apply(self, obj: dict[str, Any]) -> None:
        if "forget" in obj:
            for dev, ino in obj["forget"]:
                self._records.pop(inode_key(int(dev), int(ino)))
            return
        recs = [Shipped.from_json(f, obj) for f in obj["files"]]
        for r in recs:
            self._records.put(r)

    # -- reading ------------------------------------------------------------------------
    def get(self, fid: FileId) -> Shipped | None:
        with self._lock:
            rec = self._records.record(inode_key(fid.dev, fid.ino))
        return rec if rec is not None and rec.fid == fid and self._here(rec) else None

    def aged(self, fid: FileId) -> Shipped | None:
        """The record of this very file, in this bucket and prefix, that counts no more only
        because its segment grew past the retention's horizon (segment.batch_key)."""
        with self._lock:
            rec = self._records.record(inode_key(fid.dev, fid.ino))
        if rec is None or rec.fid != fid or not self._aimed(rec) or self._young(rec):
            return None
        return rec

    def holds(self, dev: int, ino: int, size: int, mtime_ns: int) -> bool:
        """get() is not None, without building the record: the shipper asks it of every
        file a full scan finds."""
        with self._lock:
            proto = self._records.matches(inode_key(dev, ino), size, mtime_ns)
        return proto is not None and self._here(proto)

    def totals(self) -> tuple[int, int]:
        """Files and bytes recorded where shipping goes now: counted per segment, not per
        file, as the status block asks for it at every pass of the loop."""
        with self._lock:
            live = [n for n, proto in enumerate(self._records.segments) if self._here(proto)]
            return sum(self._records.files[n] for n in live), sum(self._records.bytes[n] for n in live)

    def held(self, path: bytes, st: os.stat_result, dir_fd: int | None, name: bytes) -> Held | None:
        """archive.Skip: the segment holding this file, if it is unchanged since shipped."""
        # No lock: the archive runs with the shipper stopped (or on a view()), and this is
        # called once per file of the sources, tens of thousands of times.
        rec = self._records.record(inode_key(st.st_dev, st.st_ino))
        if rec is None or not self._here(rec):
            return None  # never shipped, or shipped where this backup does not go
        fid = rec.fid
        if fid.size != st.st_size or fid.mtime_ns != st.st_mtime_ns:
            return None
        if rec.ctime_ns and rec.ctime_ns == st.st_ctime_ns:
            return self._use(rec, path)  # untouched since shipped: nothing to read
        # The inode changed since (a rename, a chmod, or a write whose time was put back):
        # only the content can tell. The tail first (cheap, catches appends and most
        # rewrites), then the whole file against the SHA-256 it was shipped with: a
        # rewrite in place that kept the size, the time and the last 64 KiB is caught
        # only there. Reading a file costs far less than archiving and uploading it.
        fd = open_same(name, dir_fd, fid)
        if fd is None:
            return None
        try:
            same = tail_digest(fd, fid.size) == rec.tail_sha256 and full_digest(fd, fid.size) == rec.sha256
        except OSError:
            same = False
        finally:
            os.close(fd)
        if not same:
            log.info(
                "changed since shipped (same time, new content): archived",
                extra=fields(path=os.fsdecode(path)),
            )
            return None
        return self._use(rec, path)

    def _use(self, rec: Shipped, path: bytes) -> Held:
        self.used[rec.key] = rec
        # The member name only when renamed since: tens of thousands of entries each
        # repeating their own path would swell the manifest uploaded at termination.
        member = rec.path.lstrip(b"/")
        return Held(rec.key, rec.sha256, member if member != path.lstrip(b"/") else None, rec.segment_files)

    def view(self) -> Ledger:
        """What is recorded now, in memory only, for one termination archive: the watcher
        hands its shipper's ledger to the job instead of reading the file again."""
        seen = Ledger(None, self.instance_id, clock=self._clock)
        with self._lock:
            seen._records = self._records.copy()  # the base's arrays are shared, not copied
        seen._target, seen._max_age = self._target, self._max_age
        return seen

    def segments(self) -> list[dict[str, Any]]:
        """The segments `held` named, for the manifest."""
        return [rec.segment_info() for _, rec in sorted(self.used.items())]

    # -- writing ------------------------------------------------------------------------
    def add(self, rec: Shipped) -> None:
        self.add_segment([rec])

    def add_segment(self, recs: list[Shipped]) -> None:
        """Record the files of one segment (all with the same key): one appended line."""
        if not recs:
            return
        count = recs[0].segment_files or len(recs)  # seeded records carry their segment's
        with self._lock:
            recs = [r for r in (replace(r, segment_files=count) for r in recs) if self._records.put(r)]
        if not recs:
            return
        first = recs[0]
        self._append(
            {
                "key": first.key,
                "bucket": first.bucket,
                "tar_bytes": first.tar_bytes,
                "compressed_bytes": first.compressed_bytes,
                "at": first.at,
                "count": count,
                "files": [r.file_json() for r in recs],
            }
        )

    def keep_only(self, present: set[tuple[int, int]]) -> None:
        """Forget files that are gone (rotated away for good): the ledger stays small."""
        self.keep_only_keys({inode_key(dev, ino) for dev, ino in present})

    def keep_only_keys(self, present: set[int]) -> None:
        """keep_only() by inode_key(): a set of ints is a third the size of one of tuples."""
        with self._lock:
            gone = [k for k in self._records.live_keys() if k not in present]
            for k in gone:
                self._records.pop(k)
        if gone:
            self._append({"forget": [[k >> 64, k & _INO] for k in gone]})

    def tidy(self) -> None:
        """The shipper going idle after work: fold recent records into the packed base once
        there are enough to be worth it (a merge costs about 0.14 s at 100,000 files)."""
        with self._lock:
            if len(self._records.recent) >= MERGE_MIN // 4:
                self._records.merge()

    def needs_compaction(self) -> bool:
        """Many more lines than live records: file churn (rotated files shipped, then
        forgotten) grows an append-only ledger without end, and a 400 MB one took 8.5 s and
        782 MiB to load. The shipper compacts while running once this says so; the bound
        keeps a rewrite (O(records)) rare next to the appends it saves."""
        with self._lock:
            live = len(self._records)
        return self.lines > COMPACT_AFTER + 2 * live

    def compact(self) -> None:
        """Rewrite the ledger as what it holds now: one line per segment, nothing forgotten.
        Atomic (old or new ledger), so a watcher killed meanwhile loses nothing. Called by
        the shipper's thread, the only one that changes the records; the file is written
        a segment's line at a time, never built whole in memory."""
        if self.state_dir is None:
            return
        with self._lock:
            self._records.renumber()
            self._records.merge()  # every row in the base: grouped by segment below
        records = self._records
        by_segment: dict[int, list[int]] = {}
        for i in range(len(records.inos)):
            seg = _SEG.unpack_from(records.fixed, i * _ROW.size + _SEG_AT)[0]
            by_segment.setdefault(seg, []).append(i)
        written = [0]

        def lines() -> Iterator[bytes]:
            yield self._header()
            for seg, ks in by_segment.items():
                first = records.segments[seg]
                yield _line(
                    {
                        "key": first.key,
                        "bucket": first.bucket,
                        "tar_bytes": first.tar_bytes,
                        "compressed_bytes": first.compressed_bytes,
                        "at": first.at,
                        **({"count": first.segment_files} if first.segment_files else {}),
                        "files": [records.at(i).file_json() for i in ks],
                    }
                )
                written[0] += 1

        self.close()
        try:
            statedir.write_atomic(self.state_dir, LEDGER_FILE, lines())
            self.lines = 1 + written[0]
        except OSError as err:
            _warn_write(err)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _header(self) -> bytes:
        return _line({"format": FORMAT, "instance_id": self.instance_id})

    def _discard(self) -> None:
        """Start over: another instance's or an unreadable ledger is replaced, not appended to."""
        if self.state_dir is not None:
            with contextlib.suppress(OSError):
                statedir.write_atomic(self.state_dir, LEDGER_FILE, self._header())

    def _append(self, obj: dict[str, Any]) -> None:
        if self.state_dir is None:
            return
        data = _line(obj)
        try:
            if self._fd is None:
                self._fd = self._open()
            # One write() of the whole line to an O_APPEND file: lines never interleave, and a
            # kill leaves at most a torn last line, which load() ignores.
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
            self.lines += 1
        except OSError as err:
            # Not fatal: what is not remembered is archived again at termination.
            _warn_write(err)

    def _open(self) -> int:
        assert self.state_dir is not None
        flags = os.O_RDWR | os.O_APPEND
        try:
            fd = statedir.create_exclusive(self.state_dir, LEDGER_FILE, flags)
        except FileExistsError:
            fd = statedir.open_nofollow(self.state_dir, LEDGER_FILE, flags)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise OSError(errno.EINVAL, "not a regular file", LEDGER_FILE)
                # A torn last line (killed mid-append) is ended first, or the next line
                # would be glued to it and lost with it.
                if st.st_size and os.pread(fd, 1, st.st_size - 1) != b"\n":
                    os.write(fd, b"\n")
            except OSError:
                os.close(fd)
                raise
            return fd
        try:
            os.write(fd, self._header())
        except OSError:
            os.close(fd)
            raise
        return fd


def _read_lines(state_dir: str) -> Generator[bytes, None, None]:
    """The ledger's lines, read a piece at a time, never through a symlink."""
    fd = statedir.open_nofollow(state_dir, LEDGER_FILE, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb", buffering=2**20) as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", LEDGER_FILE)
        for line in fh:
            yield line.rstrip(b"\n")


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _warn_write(err: OSError) -> None:
    log.warning(
        "cannot write the shipping ledger",
        extra=fields(error=err.strerror or errno.errorcode.get(err.errno or 0, str(err))),
    )
