"""Prepared holds: the termination archive's journal walk, worked out before the flip.

With a trusted change journal (finalwalk.py) the termination archive still lists every
directory and asks the ledger of every file: about 3 us a file of Python, 0.3-0.6 s at
100,000 shipped files, and that is what still grew with shipped history (issue 21 item 1).
Nothing of it needs the termination: the shipper, each time it goes idle after shipping or
scanning, walks the sources as the journal walk would and keeps, for each directory, what
that walk gives (the files held, as the lines the manifest hashes, a segment at a time, and
the entries left to walk). The termination archive then takes a directory's result as it is,
with no listing and nothing made per file, when all of this holds:

- the same arming of the journal, and no directory created, moved or deleted since
  (`Journal.dirs` unchanged: those make everything below them count as changed);
- the ledger unchanged since (`Ledger.generation`), and the same segments counting where this
  backup goes (`Ledger.here_keys`: the aim, and the retention's refresh age);
- no inode linked now that was not when it was prepared (finalwalk.linked_inodes);
- for the directory itself: the same inode (a directory swapped, or mounted over, is listed
  again), and no event named any entry of it since (`Journal.touched`).

A directory that fails its own test is listed and asked file by file as before; one that
fails a test of the whole leaves all of them to that. Every check is cheap (a dict lookup a
directory), and each follows from what the journal already guarantees: an entry created,
removed, renamed or written in a watched directory is an event on that directory's watch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time

from instance_agent.archive import DIR_FLAGS, Excluder, Listed, Recall, Recalled, list_dir
from instance_agent.finalwalk import linked_inodes, quick_hold
from instance_agent.logs import fields
from instance_agent.manifest import held_line
from instance_agent.shipjournal import DirHold, Journal, Prepared
from instance_agent.shiprecord import Shipped
from instance_agent.shipstate import Ledger

log = logging.getLogger(__name__)


def prepare(journal: Journal, ledger: Ledger) -> Prepared | None:
    """The journal walk of the sources now, by directory; None when the journal cannot be
    trusted now (the termination would not use it either). Run by the shipping thread,
    the only one that changes the ledger and reads the journal."""
    journal.drain()
    if journal.lost is not None or not journal.scanned or journal.fd is None:
        return None
    started = time.monotonic()
    epoch, seq, dirs = journal.epoch, journal.seq, len(journal.dirs)
    generation, here = ledger.generation, ledger.here_keys()
    linked = linked_inodes(journal)
    used: dict[str, Shipped] = {}
    quick = quick_hold(journal, ledger, linked=linked, used=used)
    excluded = Excluder(journal.excludes)
    holds: dict[bytes, DirHold] = {}
    files = 0
    for root, ident in zip(journal.roots, journal.root_ids, strict=True):
        if ident is None:
            continue
        todo = [(root, True)]
        while todo:
            path, is_root = todo.pop()
            listed = _list(path, is_root)
            if listed is None:
                continue
            st, entries, subdirs = listed
            base = path.rstrip(b"/") + b"/"
            todo.extend((base + name, False) for name in reversed(subdirs) if not excluded(base + name))
            held, rest = quick(path, st.st_dev, entries, excluded)
            by_key: dict[str, tuple[int, list[bytes], list[int]]] = {}
            for member, size, key, sha256, segment_files in held:
                group = by_key.get(key)
                if group is None:
                    group = by_key[key] = (segment_files, [], [0])
                group[1].append(held_line(member, sha256))
                group[2][0] += size
            files += len(held)
            holds[path] = DirHold(
                (st.st_dev, st.st_ino),
                tuple((key, n, lines, size[0]) for key, (n, lines, size) in by_key.items()),
                tuple(used[key] for key in by_key),
                tuple(rest),
            )
    # Once per spell of work (a segment, a full scan), not per file: info.
    log.info(
        "termination walk prepared",
        extra=fields(directories=len(holds), files=files, seconds=round(time.monotonic() - started, 3)),
    )
    return Prepared(epoch, seq, dirs, generation, here, frozenset(linked), holds, files)


def _list(path: bytes, is_root: bool) -> tuple[os.stat_result, list[Listed], list[bytes]] | None:
    """A directory's entries as the archive lists them, and its subdirectories: those of the
    entries not listed as regular files that an lstat finds directories, as the walk does."""
    flags = DIR_FLAGS if not is_root else DIR_FLAGS & ~os.O_NOFOLLOW  # a root symlink is followed
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        entries = list_dir(fd)
        subdirs = []
        for name, regular, _ in entries:
            if not regular:
                with contextlib.suppress(OSError):
                    if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                        subdirs.append(name)
    except OSError:
        return None
    finally:
        os.close(fd)
    return st, entries, subdirs


def stale(prepared: Prepared, journal: Journal, ledger: Ledger, linked: set[tuple[int, int]]) -> str | None:
    """None when `prepared` may be recalled directory by directory; else why not (pure)."""
    if prepared.epoch != journal.epoch:
        return "the journal was armed again since"
    if prepared.dirs != len(journal.dirs):
        return "a directory was created, moved or deleted since"
    if prepared.generation != ledger.generation:
        return "the ledger changed since"
    if prepared.here != ledger.here_keys():
        return "other segments count where this backup goes"
    if not linked <= prepared.linked:
        return "a file was hard-linked since"
    return None


def recall(prepared: Prepared, journal: Journal, ledger: Ledger) -> Recall:
    """archive.Recall: a directory's prepared hold, when nothing in it changed since; the
    segments it names go to the ledger's `used` (the manifest names them)."""
    holds, touched, seq, used = prepared.holds, journal.touched, prepared.seq, ledger.used

    def recalled(path: bytes, dev: int, ino: int) -> Recalled | None:
        hold = holds.get(path)
        if hold is None or hold.ident != (dev, ino) or touched.get(path, 0) > seq:
            return None
        for proto in hold.used:
            used[proto.key] = proto
        return hold.segments, hold.rest

    return recalled


def for_archive(journal: Journal, ledger: Ledger, linked: set[tuple[int, int]]) -> Recall | None:
    """The recall for the termination archive trusting `journal`, or None; logs which."""
    handover = ledger.handover
    prepared = handover.prepared if handover is not None else None
    why = "none prepared" if prepared is None else stale(prepared, journal, ledger, linked)
    if prepared is None or why is not None:
        log.info("final archive: nothing prepared to reuse", extra=fields(reason=why))
        return None
    log.info(
        "final archive: reusing the prepared walk",
        extra=fields(directories=len(prepared.holds), files=prepared.files),
    )
    return recall(prepared, journal, ledger)
