"""The change journal: which paths of the sources changed since the shipper's last full scan.

The termination archive leaves out the shipped files that are unchanged. The full walk
learns that from an lstat of every file (about 5.5 us a file, 0.6 s at 100,000 shipped
files, issue 21 item 1). With this journal it lstats only the files that changed: the
journal holds every path an inotify event named since the full scan began, every file that
scan found not shipped (or shipped but with a moved change time, or hard-linked), and every
directory created, moved or deleted since (everything below it counts as changed).

Why an inotify instance of its own, beside watchdog's: the journal is read as a barrier. The
kernel queues an inotify event inside the system call that made the change, so a
non-blocking read of this descriptor until it is empty, right before the archive walks,
holds every change made before that moment. Watchdog hands events over through threads of
its own, at the shipping thread's nice 19, so what it has delivered at a given moment says
nothing certain about what happened before it.

It is armed again at the start of every full scan (one watch per directory of the sources:
about a hundred at 100,000 files), read at every pass of the shipping loop (so its queue
does not overflow) and once more at termination. A queue overflow, a source root deleted,
moved or unmounted, or a watch that cannot be added make it `lost`: not trusted until the
next full scan (which the shipper then runs). What inotify cannot see at all is listed in
docs/shipping.md ("What changed, without an lstat of every file"); `ship_final = "walk"` is
the choice there.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from instance_agent.archive import Excluder, HeldGroup, Listed
from instance_agent.shiprecord import Shipped

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_UNMOUNT, IN_Q_OVERFLOW, IN_IGNORED = 0x400, 0x800, 0x2000, 0x4000, 0x8000
IN_ONLYDIR, IN_DONT_FOLLOW, IN_ISDIR = 0x01000000, 0x02000000, 0x40000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then the name, NUL-padded to len
_READ = 64 * 1024
_EPOCHS = itertools.count(1)


@dataclass(frozen=True)
class DirHold:
    """One directory as the journal walk found it, before the termination (finalprep.py)."""

    ident: tuple[int, int]  # its (device, inode)
    segments: tuple[HeldGroup, ...]  # as archive.Recalled has them
    used: tuple[Shipped, ...]  # the segments those files are in, for the manifest
    rest: tuple[Listed, ...]  # entries the walk must still look at


@dataclass(frozen=True)
class Prepared:
    """The journal walk of every directory, and what it depended on (finalprep.stale)."""

    epoch: int  # Journal.epoch
    seq: int  # Journal.seq when the walk began
    dirs: int  # len(Journal.dirs) then
    generation: int  # Ledger.generation
    here: frozenset[str]  # Ledger.here_keys()
    linked: frozenset[tuple[int, int]]
    holds: dict[bytes, DirHold]
    files: int  # held, over all directories


@dataclass
class Handover:
    """What a stopped shipper gives the termination archive beside its ledger."""

    journal: Journal | None  # None: it did not watch with inotify, or its journal is gone
    stopped_clean: bool  # no segment cancelled, and the shipping thread ended
    prepared: Prepared | None = None  # the journal walk worked out ahead (finalprep.py)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


class Journal:
    """What changed under `sources` since the last `arm()`; see the module docstring."""

    def __init__(self, sources: Iterable[str], excludes: Iterable[str]) -> None:
        self.sources = tuple(sources)
        self.excludes = tuple(excludes)
        self._excluded = Excluder(self.excludes)
        self.roots = tuple(os.path.normpath(os.fsencode(s)) for s in self.sources)
        self.fd: int | None = None
        self._wds: dict[int, bytes] = {}
        self._root_wds: set[int] = set()
        self.root_ids: list[tuple[int, int] | None] = []
        self.paths: set[bytes] = set()  # files named since the scan began (or found pending)
        self.dirs: set[bytes] = set()  # directories created, moved or deleted since: all below changed
        self._peak = 0
        self.scanned = False  # a full scan completed since the last arm()
        self.lost: str | None = None  # why it cannot be trusted until the next arm(), if so
        # For finalprep.py: which arming this is, a count of the reads that brought events,
        # and for each watched directory the count at its latest event (any entry of it
        # created, changed, moved or deleted).
        self.epoch = 0
        self.seq = 0
        self.touched: dict[bytes, int] = {}

    # -- the shipper's side ---------------------------------------------------------------
    def arm(self) -> None:
        """Start over, right before a full scan: a new inotify instance watching every
        directory of the sources now, and nothing named yet."""
        self.close()
        self.paths, self.dirs, self.scanned, self.lost = set(), set(), False, None
        self._wds, self._root_wds = {}, set()
        # Unique across journals: a shipping attempt after an error makes a new one, and
        # what was prepared from the old one must not pass for this one's.
        self.epoch = next(_EPOCHS)
        self.touched = {}
        libc = _libc()
        fd = int(libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        if fd < 0:
            self.lost = f"inotify_init1: {os.strerror(ctypes.get_errno())}"
            return
        self.fd = fd
        self.root_ids = root_ids(self.roots)
        for root, ident in zip(self.roots, self.root_ids, strict=True):
            if ident is None:
                continue  # not a directory now: a source appearing later is a new root
            wd = self._watch(libc, root, IN_ONLYDIR)  # a root given as a symlink is followed
            if wd is None:
                return
            self._root_wds.add(wd)
            self._watch_below(libc, root)

    def _watch(self, libc: ctypes.CDLL, path: bytes, flags: int) -> int | None:
        """The watch descriptor; -1 for a directory gone or swapped since it was listed (its
        parent's watch names that change); None when the journal failed (`lost`)."""
        wd = int(libc.inotify_add_watch(self.fd, path, MASK | flags))
        if wd >= 0:
            if self._wds.get(wd, path) != path:
                # One directory reached by two paths (overlapping sources through a symlink,
                # a bind mount): its events would name only one of them.
                self.lost = f"{os.fsdecode(path)} is also {os.fsdecode(self._wds[wd])}: watched once"
                return None
            self._wds[wd] = path
            return wd
        err = ctypes.get_errno()
        if err in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP) and path not in self.roots:
            return -1
        self._fail(path, err)
        return None

    def _fail(self, path: bytes, err: int) -> None:
        self.lost = f"cannot watch {os.fsdecode(path)}: {os.strerror(err)}"

    def _watch_below(self, libc: ctypes.CDLL, root: bytes) -> None:
        todo = [root]
        while todo and self.lost is None:
            parent = todo.pop()
            try:
                with os.scandir(parent) as listing:
                    subdirs = [os.fsencode(e.path) for e in listing if e.is_dir(follow_symlinks=False)]
            except OSError as err:
                self._fail(parent, err.errno or errno.EIO)
                return
            for path in subdirs:
                if self._excluded(path):
                    continue
                wd = self._watch(libc, path, IN_ONLYDIR | IN_DONT_FOLLOW)
                if wd is None:
                    return
                if wd >= 0:
                    todo.append(path)

    def scan_done(self, changed: Iterable[bytes]) -> None:
        """The full scan begun after arm() completed; `changed` are the files it found not
        shipped, or not certainly unchanged: the walk looks at each of them."""
        self.drain()
        self.paths.update(changed)
        self._peak = len(self.paths)
        self.scanned = True

    def forget(self, path: bytes) -> None:
        """`path` is unchanged since shipped now (Ledger.settled): the walk may trust it."""
        self.paths.discard(path)
        if len(self.paths) < self._peak // 4:
            # A set never gives back its table: one sized for a first start's 100,000
            # files would stay (about 4 MB).
            self.paths = set(self.paths)
            self._peak = len(self.paths)

    def drain(self) -> bool:
        """Read every event queued: after this, every change made before it is named. True
        when it became `lost` now, after a completed scan (the shipper then scans again)."""
        fd, was = self.fd, self.lost
        while fd is not None:
            try:
                data = os.read(fd, _READ)
            except BlockingIOError:
                break
            except OSError as err:
                self.lost = f"inotify read: {err.strerror}"
                break
            if not data:
                break
            self.seq += 1
            self._apply(data)
        return self.scanned and was is None and self.lost is not None

    def _apply(self, data: bytes) -> None:
        at = 0
        while at + _EVENT.size <= len(data):
            wd, mask, _, size = _EVENT.unpack_from(data, at)
            name = data[at + _EVENT.size : at + _EVENT.size + size].rstrip(b"\0")
            at += _EVENT.size + size
            if mask & IN_Q_OVERFLOW:
                self.lost = "inotify lost events (its queue overflowed)"
                continue
            parent = self._wds.get(wd)
            if parent is None:
                continue  # a watch already removed
            self.touched[parent] = self.seq
            if not name:
                if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED):
                    if wd in self._root_wds:
                        self.lost = f"source {os.fsdecode(parent)} deleted, moved or unmounted"
                    self.dirs.add(parent)
                    del self._wds[wd]
                continue
            path = parent.rstrip(b"/") + b"/" + name
            if mask & IN_ISDIR:
                # A directory created, moved or deleted: it is not watched (or its watch
                # names its old path now), so everything below it counts as changed.
                if mask & (IN_CREATE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE):
                    self.dirs.add(path)
                continue
            self.paths.add(path)

    def lose(self, why: str) -> None:
        """Not trusted until the next arm() (the first reason is kept)."""
        if self.lost is None:
            self.lost = why

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        # A journal no archive took (a reload restarting the shipper) gives its descriptor
        # back with it.
        self.close()

    # -- the termination archive's side ---------------------------------------------------
    def names(self, path: bytes) -> bool:
        """True when `path` may have changed since the scan: the walk must lstat it."""
        if path in self.paths:
            return True
        if self.dirs:
            parent = os.path.dirname(path)
            while len(parent) > 1:
                if parent in self.dirs:
                    return True
                parent = os.path.dirname(parent)
        return False


def root_ids(roots: Iterable[bytes]) -> list[tuple[int, int] | None]:
    """Each source's identity when it is a directory (followed if a symlink), else None."""
    ids: list[tuple[int, int] | None] = []
    for root in roots:
        try:
            st = os.stat(root)
        except OSError:
            ids.append(None)
            continue
        ids.append((st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None)
    return ids
