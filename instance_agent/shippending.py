"""The files of the sources not shipped yet: found by a full scan, kept current by the paths
inotify events name (an lstat each), and which of them are complete and due."""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterable, Iterator

from instance_agent.archive import Excluder
from instance_agent.logs import fields
from instance_agent.segment import Target
from instance_agent.settle import Settler
from instance_agent.shipbatch import CANDIDATES, Seen, Sized
from instance_agent.shipjournal import Journal
from instance_agent.shippacked import inode_key
from instance_agent.shipstate import HELD_MOVED, NOT_HELD, Ledger

# Its log lines name the logger they always have: the shipping thread's.
log = logging.getLogger("instance_agent.shipper")

Scanner = Callable[
    [tuple[str, ...], Excluder, "threading.Event | None"], Iterator[tuple[Target, os.stat_result]]
]


def scan(
    sources: tuple[str, ...], excluded: Excluder, stop: threading.Event | None = None
) -> Iterator[tuple[Target, os.stat_result]]:
    """Every regular file under the sources (symlinks not followed), with its lstat; it
    ends early once `stop` is set (a scan of tens of thousands of files must not hold up
    the termination that stops shipping)."""
    for source in sources:
        root = os.path.normpath(os.fsencode(source))
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            if stop is not None and stop.is_set():
                return
            dirnames[:] = [d for d in dirnames if not excluded(os.path.join(dirpath, d))]
            for name in filenames:
                path = os.path.join(dirpath, name)
                if excluded(path):
                    continue
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield Target(root, os.path.relpath(path, root)), st


class Pending:
    """What the shipping loop knows of the files of its sources."""

    def __init__(
        self, sources: tuple[str, ...], excluded: Excluder, settler: Settler, scanner: Scanner
    ) -> None:
        self.sources = sources
        self.excluded = excluded
        self.settler = settler
        self._scan = scanner
        self.events: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        # The sources as scan() names them, and what the loop knows of them: the files
        # not shipped (path -> (root index, size, mtime_ns)), the paths events named since
        # the last pass, and when the next full scan is due.
        self.roots = tuple(os.path.normpath(os.fsencode(source)) for source in sources)
        self.files: dict[bytes, tuple[int, int, int]] = {}
        self.peak = 0
        self.dirty: set[bytes] = set()
        self.full_due = True
        self.next_full = 0.0
        # The change journal for the termination archive (shipjournal.py), while inotify
        # watches: armed by each full scan, read at each pass, files shipped leave it.
        self.journal: Journal | None = None

    def root_ids(self) -> list[tuple[int, int] | None]:
        """Each source directory's identity (None: not a directory now)."""
        ids: list[tuple[int, int] | None] = []
        for root in self.roots:
            try:
                st = os.stat(root)  # a source given as a symlink is followed, by intent
            except OSError:
                ids.append(None)
                continue
            ids.append((st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None)
        return ids

    def new_journal(self, excludes: tuple[str, ...] | None) -> None:
        """A shipping attempt knows nothing of what happened before it: a fresh journal
        (None: inotify does not watch), not trusted until its first full scan completes."""
        if self.journal is not None:
            self.journal.close()
        self.journal = Journal(self.sources, excludes) if excludes is not None else None

    def take_events(self, now: float) -> None:
        if self.journal is not None and self.journal.drain():
            # The termination archive would not trust it now: a full scan arms it again.
            log.warning(
                "change journal not trusted: a full scan of the sources follows",
                extra=fields(reason=self.journal.lost),
            )
            self.full_due = True
        while True:
            try:
                kind, path = self.events.get_nowait()
            except queue.Empty:
                return
            path = os.path.normpath(path)
            if kind == "lost":
                if not self.full_due:
                    log.warning(
                        "inotify lost events (its queue overflowed): a full scan of the sources follows",
                        extra=fields(path=os.fsdecode(path)),
                    )
                self.full_due = True
                continue
            if kind == "gone_dir":
                below = path + b"/"
                for gone in [p for p in self.files if p.startswith(below)]:
                    del self.files[gone]
                continue
            if kind == "moved_to":
                self.settler.moved_to(path)
            elif kind == "moved_from":
                self.settler.moved_from(path)
            elif kind == "closed":
                self.settler.closed(path, now)
            self.dirty.add(path)

    def root_of(self, path: bytes, real: dict[bytes, bool]) -> int | None:
        """The index of the source `path` is in, as scan() would find it: below a source
        directory, through no excluded directory and no symlink (`real` caches the
        directories already looked at); None otherwise."""
        for i, root in enumerate(self.roots):
            below = root if root.endswith(b"/") else root + b"/"
            if not path.startswith(below) or self.excluded(path):
                continue
            parts = path[len(below) :].split(b"/")
            parent = root
            for part in parts[:-1]:
                parent = os.path.join(parent, part)
                ok = real.get(parent)
                if ok is None:
                    try:
                        ok = stat.S_ISDIR(os.lstat(parent).st_mode) and not self.excluded(parent)
                    except OSError:
                        ok = False
                    real[parent] = ok
                if not ok:
                    break
            else:
                return i
        return None

    def refresh(self, ledger: Ledger, paths: Iterable[bytes]) -> None:
        """Look again at `paths` (an lstat each): pending if a regular file not shipped. A
        path whose lstat now matches its own ledger record exactly (Ledger.settled: a file
        just shipped, most often) leaves the journal: whatever changes it after this lstat
        queues a new event, which names it again."""
        real: dict[bytes, bool] = {}
        journal = self.journal
        for path in paths:
            where = self.root_of(path, real)
            st = None
            if where is not None:
                with contextlib.suppress(OSError):
                    st = os.lstat(path)
            if (
                where is None
                or st is None
                or not stat.S_ISREG(st.st_mode)
                or ledger.holds(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            ):
                self.files.pop(path, None)
                if journal is not None and st is not None and where is not None and ledger.settled(path, st):
                    journal.forget(path)
            else:
                self.files[path] = (where, st.st_size, st.st_mtime_ns)

    def full_scan(self, ledger: Ledger, now: float, stop: threading.Event, rescan_in: float) -> bool:
        """Every file of the sources: what is pending, and the ledger forgets what is gone.
        False when a stop cut it short. The journal is armed first and, once the scan
        completed, told which files were not certainly unchanged shipped ones."""
        journal = self.journal
        index = {root: i for i, root in reversed(list(enumerate(self.roots)))}
        present: set[int] = set()
        pending: dict[bytes, tuple[int, int, int]] = {}
        unsure: list[bytes] = []  # held, but the journal walk must not trust it (Ledger.standing)
        self.dirty.clear()  # the scan looks at them all anyway
        if journal is not None:
            journal.arm()
        for target, st in self._scan(self.sources, self.excluded, stop):
            present.add(inode_key(st.st_dev, st.st_ino))
            standing = ledger.standing(st)
            if standing == NOT_HELD:
                pending[target.path] = (index.get(target.root, 0), st.st_size, st.st_mtime_ns)
            elif standing == HELD_MOVED:
                unsure.append(target.path)
        if stop.is_set():
            return False
        ledger.keep_only_keys(present)
        if journal is not None:
            journal.scan_done([*pending, *unsure])
        self.files, self.peak = pending, len(pending)
        self.full_due = False
        self.next_full = now + rescan_in
        return True

    def complete(
        self, now: float, retry_at: dict[bytes, tuple[float, int]]
    ) -> tuple[tuple[int, int], list[tuple[bytes, Sized]]]:
        """The complete files (count, bytes), and the oldest of those due, from which the
        next batch is picked: at most CANDIDATES, not a list of every file of a backlog of
        hundreds of thousands at every pass."""
        settler, counts = self.settler, [0, 0]

        def due() -> Iterator[tuple[bytes, Sized]]:
            for path, (_, size, mtime_ns) in self.files.items():
                if settler.reason(path, mtime_ns / 1e9, now) is None:
                    continue
                counts[0] += 1
                counts[1] += size
                if retry_at.get(path, (0.0, 0))[0] <= now:
                    yield path, Seen(size, mtime_ns)

        oldest = heapq.nsmallest(CANDIDATES, due(), key=lambda d: (d[1].st_mtime_ns, d[0]))
        return (counts[0], counts[1]), oldest

    def target(self, path: bytes, where: int) -> Target:
        root = self.roots[where]
        return Target(root, path[len(root if root.endswith(b"/") else root + b"/") :])
