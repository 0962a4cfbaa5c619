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

The file's format and how it is written are in ledgerfile.py; the records' packed form in
shippacked.py; a record and its digests in shiprecord.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from instance_agent import ledgerfile, statedir
from instance_agent.ledgerfile import LEDGER_FILE
from instance_agent.logs import fields
from instance_agent.manifest import Held
from instance_agent.shippacked import INO, MERGE_MIN, Records, inode_key
from instance_agent.shiprecord import FileId, Shipped, full_digest, open_same, tail_digest

if TYPE_CHECKING:
    from instance_agent.shipjournal import Handover

log = logging.getLogger(__name__)

NOT_HELD, HELD, HELD_MOVED = 0, 1, 2  # Ledger.standing
COMPACT_AFTER = 10_000  # ledger lines beyond twice the live records before a rewrite
DAY = 86_400.0


def refresh_age(retention_days: int) -> float | None:
    """How old a segment may be and still hold a file for a new backup; None: no limit.

    S3 expires an object `Days` after its creation, rounded up to the next midnight UTC
    (https://docs.aws.amazon.com/AmazonS3/latest/userguide/intro-lifecycle-rules.html;
    docs/aws-behaviour.md, "S3"), so
    a segment is safe for at least `retention_days` from `Shipped.at`. Half of that: a
    backup written now names only segments at most half the retention old, so it stays
    whole for at least the other half, and an unchanged file costs one more upload every
    half retention. A backup older than that may have lost segments; `list --verify` says
    which."""
    return retention_days * DAY / 2 if retention_days > 0 else None


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
        self._records = Records()
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
        # Set on the view a stopped shipper hands to the termination archive (finalwalk.py).
        self.handover: Handover | None = None

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
            lines = ledgerfile.read_lines(state_dir)
            head = json.loads(next(lines, b""))
            if head.get("instance_id") != instance_id or head.get("format") != ledgerfile.FORMAT:
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

    def standing(self, st: os.stat_result) -> int:
        """For the full scan: NOT_HELD, HELD (held, and its inode change time is the one
        recorded: a journal walk may trust it, finalwalk.py), or HELD_MOVED (held by size
        and time, but its change time moved or was not recorded, or it is hard-linked: only
        Ledger.held, from an lstat, may decide it)."""
        with self._lock:
            found = self._records.ctime(inode_key(st.st_dev, st.st_ino), st.st_size, st.st_mtime_ns)
        if found is None or not self._here(found[0]):
            return NOT_HELD
        ctime = found[1]
        return HELD if ctime and ctime == st.st_ctime_ns and st.st_nlink == 1 else HELD_MOVED

    def settled(self, path: bytes, st: os.stat_result) -> bool:
        """`st` (an lstat of `path` now) is exactly what this file's record says, at the path
        it was shipped from, and it is not hard-linked: nothing changed it since it was
        shipped (the change journal may stop naming it, shippending.refresh)."""
        rec = self.get(FileId.of(st))
        return (
            rec is not None
            and rec.path == path
            and rec.ctime_ns != 0
            and rec.ctime_ns == st.st_ctime_ns
            and st.st_nlink == 1
        )

    @property
    def generation(self) -> int:
        """Changes whenever a record is added or dropped (finalprep.py's validity)."""
        return self._records.generation

    def here_keys(self) -> frozenset[str]:
        """The segments that count where this backup goes now (aim, and their age)."""
        return frozenset(proto.key for proto in self._records.segments if self._here(proto))

    def unseen(
        self, used: dict[str, Shipped] | None = None
    ) -> Callable[[bytes, int, int], tuple[Shipped, int, bytes] | None]:
        """The journal walk's test of a file it did not lstat (finalwalk.py): (path, dev,
        ino as the directory listing gave it) -> its segment, size and SHA-256, only when
        that inode's record was shipped from this very path to where this backup goes.
        Whether a segment counts (`_here`) is asked once per segment, not per file. Each
        segment found is noted in `used` (the ledger's own, which the manifest names, unless
        another is given: finalprep.py works ahead of any archive)."""
        lookup = self._records.by_path()
        used = self.used if used is None else used
        here = {n: proto for n, proto in enumerate(self._records.segments) if self._here(proto)}

        def held(path: bytes, dev: int, ino: int) -> tuple[Shipped, int, bytes] | None:
            found = lookup(path, dev, ino)
            if found is None:
                return None
            proto = here.get(found[0])
            if proto is None:
                return None
            used[proto.key] = proto
            return proto, found[1], found[2]

        return held

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
            self._append({"forget": [[k >> 64, k & INO] for k in gone]})

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
        by_segment = records.by_segment()
        written = [0]

        def lines() -> Iterator[bytes]:
            yield self._header()
            for seg, ks in by_segment.items():
                first = records.segments[seg]
                yield ledgerfile.line(
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
            ledgerfile.warn_write(err)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _header(self) -> bytes:
        return ledgerfile.header(self.instance_id)

    def _discard(self) -> None:
        """Start over: another instance's or an unreadable ledger is replaced, not appended to."""
        if self.state_dir is not None:
            with contextlib.suppress(OSError):
                statedir.write_atomic(self.state_dir, LEDGER_FILE, self._header())

    def _append(self, obj: dict[str, Any]) -> None:
        if self.state_dir is None:
            return
        data = ledgerfile.line(obj)
        try:
            if self._fd is None:
                self._fd = ledgerfile.open_append(self.state_dir, self._header())
            # One write() of the whole line to an O_APPEND file: lines never interleave, and a
            # kill leaves at most a torn last line, which load() ignores.
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
            self.lines += 1
        except OSError as err:
            # Not fatal: what is not remembered is archived again at termination.
            ledgerfile.warn_write(err)
