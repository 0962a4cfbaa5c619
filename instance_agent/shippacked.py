"""The shipping ledger's records packed in memory: a fixed row per file, its segment's fields once."""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import struct
from array import array
from collections.abc import Callable, Iterator

from instance_agent.shiprecord import FileId, Shipped

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
_KEY_CTIME = struct.Struct("<QQqqq")  # and ctime_ns
INO = (1 << 64) - 1
_NO_FID = FileId(0, 0, 0, 0)
MERGE_MIN = 4096  # recent rows before a merge is worth its O(files) cost


def inode_key(dev: int, ino: int) -> int:
    """A file's key in the ledger: its device and inode as one int."""
    return dev << 64 | ino


class Records:
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
        # Counts every change of what a lookup answers (put, pop): a termination archive
        # may reuse what was worked out from these records only while it is unchanged
        # (finalprep.py). A merge or a renumbering answers the same and does not count.
        self.generation = 0

    def __len__(self) -> int:
        return len(self.inos) - self.dead_count + len(self.recent)

    def copy(self) -> Records:
        out = Records()
        out.inos, out.fixed, out.paths, out.offsets = self.inos, self.fixed, self.paths, self.offsets
        out.dead, out.dead_count = bytearray(self.dead), self.dead_count
        out.recent = dict(self.recent)
        out.segments, out.index = list(self.segments), dict(self.index)
        out.files, out.bytes = list(self.files), list(self.bytes)
        out.generation = self.generation
        return out

    # -- finding a row --------------------------------------------------------------------
    def _find(self, k: int) -> int:
        """The base index of live key `k`, or -1."""
        dev, ino = k >> 64, k & INO
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

    def ctime(self, k: int, size: int, mtime_ns: int) -> tuple[Shipped, int] | None:
        """matches(), with the change time recorded (0: none was)."""
        where = self._where(k)
        if where is None:
            return None
        buf, at, _ = where
        fields = _KEY_CTIME.unpack_from(buf, at)
        if fields[2:4] != (size, mtime_ns):
            return None
        return self.segments[int(_SEG.unpack_from(buf, at + _SEG_AT)[0])], fields[4]

    def by_path(self) -> Callable[[bytes, int, int], tuple[int, int, bytes] | None]:
        """A lookup for the termination archive's journal walk (finalwalk.py), asked of every
        shipped file with no lstat: (path, dev, ino) -> (segment number, size, SHA-256) of
        the live record shipped from `path`, when it is that inode's. Built once over the
        arrays as they are now (a view's: nothing merges them meanwhile): a dict by path,
        about 0.2 us a row, then one dict lookup a file instead of a search by inode."""
        size, row_of = _ROW.size, _ROW.unpack_from
        fixed, dead, offsets = self.fixed, self.dead, self.offsets
        whole = bytes(self.paths)
        # map/zip over C iterators: a third of the time of a comprehension's loop. The
        # recent rows (newer than the base) replace a base row of the same path; they are
        # numbered from -1 down, into `rows`.
        index = dict(zip(map(whole.__getitem__, map(slice, offsets[:-1], offsets[1:])), itertools.count()))
        rows = list(self.recent.values())
        index.update((row[size:], -1 - j) for j, row in enumerate(rows))

        def lookup(path: bytes, dev: int, ino: int) -> tuple[int, int, bytes] | None:
            i = index.get(path)
            if i is None:
                return None
            if i < 0:
                rdev, rino, fsize, _, _, seg, sha, _ = row_of(rows[-1 - i], 0)
            elif dead[i]:
                return None
            else:
                rdev, rino, fsize, _, _, seg, sha, _ = row_of(fixed, i * size)
            # Another inode at that path now, or a stale row: the lstat decides.
            return (seg, fsize, sha) if rino == ino and rdev == dev else None

        return lookup

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
        self.generation += 1
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
        self.generation += 1
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
        recent = sorted(self.recent.items(), key=lambda kv: (kv[0] & INO, kv[0] >> 64))
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
            while j < len(recent) and (recent[j][0] & INO, recent[j][0] >> 64) < (ino, dev):
                k, row = recent[j]
                inos.append(k & INO)
                fixed += row[:size]
                paths += row[size:]
                offsets.append(len(paths))
                j += 1
            inos.append(ino)
            fixed += old_fixed[at : at + size]
            paths += old_paths[old_offsets[i] : old_offsets[i + 1]]
            offsets.append(len(paths))
        for k, row in recent[j:]:
            inos.append(k & INO)
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

    def by_segment(self) -> dict[int, list[int]]:
        """The base's rows by segment number (after a merge: every row), for a rewrite."""
        by_segment: dict[int, list[int]] = {}
        for i in range(len(self.inos)):
            seg = _SEG.unpack_from(self.fixed, i * _ROW.size + _SEG_AT)[0]
            by_segment.setdefault(seg, []).append(i)
        return by_segment
