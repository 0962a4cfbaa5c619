"""How the termination archive learns which shipped files are unchanged: the journal or the walk.

The walk (always right, and the fallback) lstats every file of the sources and asks
Ledger.held of each. The journal walk lists the directories the same way but lstats only the
files the shipper's change journal names (shipjournal.py) and those the ledger does not know
by the inode the listing gives, at the path it was shipped from; every other file is held on
the ledger's word (its size, digest and segment). That is right only when the journal saw
every change since a full scan, so it is used only when all of these hold (`verdict`, pure):

- `ship_final` is "journal" (the default);
- the shipper handed its journal over in-process (the watcher's termination path; a
  `backup` run reads the ledger file and has no journal);
- the shipper watched with inotify (not its periodic scan) and stopped cleanly: no segment
  was cancelled and its thread ended, so nothing changes the ledger or the journal after;
- a full scan completed after the journal was armed, and nothing since made it `lost`
  (an inotify queue overflow, a source root deleted, moved or unmounted, a watch that could
  not be added);
- the sources and excludes are the ones the journal watched, and each source root is still
  the directory it watched.

Otherwise the walk, as before; the log says which one and why.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from instance_agent.archive import Listed, Quick
from instance_agent.logs import fields
from instance_agent.shipjournal import Journal, root_ids
from instance_agent.shiprecord import Shipped
from instance_agent.shipstate import Ledger

log = logging.getLogger(__name__)

JOURNAL, WALK = "journal", "walk"


@dataclass(frozen=True)
class Facts:
    """What the journal's trust depends on, observed at the start of the archive."""

    mode: str  # cfg.ship_final
    handed_over: bool  # the shipper's journal came with the ledger, in-process
    inotify: bool = False  # the shipper watched with inotify, not a periodic scan
    stopped_clean: bool = False  # no segment cancelled, the shipping thread ended
    scanned: bool = False  # a full scan completed since the journal was armed
    lost: str | None = None  # why the journal missed events, if it did
    same_sources: bool = False  # the job's sources and excludes are the journal's
    roots_same: bool = False  # each source root is the directory the journal watched


def verdict(facts: Facts) -> str | None:
    """None: the journal may be trusted; else why the walk is used."""
    if facts.mode != JOURNAL:
        return "ship_final is walk"
    if not facts.handed_over:
        return "no change journal handed over (not the watcher's termination path)"
    if not facts.inotify:
        return "the shipper did not watch with inotify"
    if not facts.stopped_clean:
        return "the shipper did not stop cleanly"
    if facts.lost is not None:
        return facts.lost
    if not facts.scanned:
        return "no full scan completed since the journal started"
    if not facts.same_sources:
        return "the sources or excludes changed since the journal started"
    if not facts.roots_same:
        return "a source directory appeared or was replaced"
    return None


def observe(mode: str, ledger: Ledger, sources: Sequence[str], excludes: Sequence[str]) -> Facts:
    """The Facts now, after reading the journal to the end (the barrier: every change made
    before this call is named by it)."""
    handover = ledger.handover
    if handover is None:
        return Facts(mode=mode, handed_over=False)
    journal = handover.journal
    if journal is not None:
        journal.drain()
    return Facts(
        mode=mode,
        handed_over=True,
        inotify=journal is not None,
        stopped_clean=handover.stopped_clean,
        scanned=journal is not None and journal.scanned,
        lost=journal.lost if journal is not None else None,
        same_sources=journal is not None
        and (journal.sources, journal.excludes) == (tuple(sources), tuple(excludes)),
        roots_same=journal is not None and root_ids(journal.roots) == journal.root_ids,
    )


def choose(mode: str, ledger: Ledger, sources: Sequence[str], excludes: Sequence[str]) -> Journal | None:
    """The journal to walk by, or None for the full walk; logs which, and why."""
    facts = observe(mode, ledger, sources, excludes)
    why = verdict(facts)
    handover = ledger.handover
    journal = handover.journal if handover is not None else None
    if why is None and journal is not None:
        log.info(
            "final archive: changes from the journal",
            extra=fields(final_walk=JOURNAL, changed=len(journal.paths), changed_dirs=len(journal.dirs)),
        )
        return journal
    log.info("final archive: walking every file", extra=fields(final_walk=WALK, reason=why))
    return None


def linked_inodes(journal: Journal) -> set[tuple[int, int]]:
    """The inodes of the paths the journal names that have other links now. A write through
    one name of a hard-linked file is an event on that name only, so these are looked at
    under every name (a link made since the scan inside the sources; docs/shipping.md says
    what is left, a link from outside)."""
    linked: set[tuple[int, int]] = set()
    for path in journal.paths:
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if st.st_nlink > 1:
                linked.add((st.st_dev, st.st_ino))
    return linked


def quick_hold(
    journal: Journal,
    ledger: Ledger,
    *,
    linked: set[tuple[int, int]] | None = None,
    used: dict[str, Shipped] | None = None,
) -> Quick:
    """archive.Quick: of a directory's listed regular files, those the journal does not
    name and the ledger holds by the inode listed, at the path it was shipped from, are
    held with no lstat; every other entry is walked (the lstat, then Ledger.held). The
    segments found go to `used` (the ledger's own unless given: finalprep.py)."""
    changed, find = journal.paths, ledger.unseen(used)
    names = journal.names if journal.dirs else None  # directories changed: a slower test
    if linked is None:
        linked = linked_inodes(journal)

    def quick(
        parent: bytes, dev: int, entries: list[Listed], must_walk: Callable[[bytes], bool]
    ) -> tuple[list[tuple[bytes, int, str, str, int]], list[Listed]]:
        held: list[tuple[bytes, int, str, str, int]] = []
        rest: list[Listed] = []
        base = parent.rstrip(b"/") + b"/"
        for entry in entries:
            name, regular, ino = entry
            path = base + name
            found = None
            if (
                regular
                and path not in changed
                and not (names is not None and names(path))
                and not (linked and (dev, ino) in linked)
            ):
                found = find(path, dev, ino)
            if found is None or must_walk(path):
                rest.append(entry)
                continue
            proto, size, sha = found
            held.append((path.lstrip(b"/"), size, proto.key, sha.hex(), proto.segment_files))
        return held, rest

    return quick
