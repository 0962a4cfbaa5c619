"""The termination archive's journal walk (issue 21 item 1): when the change journal is
trusted (a pure decision, each condition on its own), and that with it the archive holds and
leaves out exactly what the full walk does, on a real tree with a real inotify journal."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import pytest

from instance_agent import finalprep, finalwalk
from instance_agent.archive import Archiver, Excluder
from instance_agent.finalwalk import Facts, verdict
from instance_agent.manifest import ArchiveReport, held_line
from instance_agent.settle import Settler
from instance_agent.shipjournal import Handover, Journal, Prepared
from instance_agent.shippending import Pending, scan
from instance_agent.shiprecord import FileId, Shipped, full_digest, tail_digest
from instance_agent.shipstate import Ledger

INSTANCE = "i-0123456789abcdef0"
TRUSTED = Facts(
    mode="journal",
    handed_over=True,
    inotify=True,
    stopped_clean=True,
    scanned=True,
    lost=None,
    same_sources=True,
    roots_same=True,
)


def test_the_journal_is_trusted_only_when_every_condition_holds() -> None:
    assert verdict(TRUSTED) is None
    broken: dict[str, Any] = {
        "mode": "walk",
        "handed_over": False,
        "inotify": False,
        "stopped_clean": False,
        "scanned": False,
        "lost": "inotify lost events (its queue overflowed)",
        "same_sources": False,
        "roots_same": False,
    }
    for name, value in broken.items():
        why = verdict(dataclasses.replace(TRUSTED, **{name: value}))
        assert why, f"{name}={value!r} must send the archive to the full walk"
    assert verdict(dataclasses.replace(TRUSTED, mode="walk")) == "ship_final is walk"
    assert "overflowed" in (verdict(dataclasses.replace(TRUSTED, lost=broken["lost"])) or "")


class _Null:
    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        return len(data)


def _ship_all(root: Path, ledger: Ledger) -> None:
    """Record every file under `root` as shipped, two segments, as the shipper would."""
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    for n, half in enumerate((paths[::2], paths[1::2])):
        recs = []
        for p in half:
            st = os.lstat(p)
            fd = os.open(p, os.O_RDONLY)
            try:
                tail, whole = tail_digest(fd, st.st_size), full_digest(fd, st.st_size)
            finally:
                os.close(fd)
            key = f"b/i/segments/s{n}.tar.zst"
            recs.append(Shipped(FileId.of(st), os.fsencode(p), whole, tail, key, 1, 1, st.st_ctime_ns))
        ledger.add_segment(recs)


def _tree(root: Path) -> None:
    for d in range(3):
        (root / f"d{d}").mkdir(parents=True)
        for i in range(20):
            path = root / f"d{d}" / f"app.log.{i}"
            path.write_bytes(b"request %d served\n" % i * (1 + i))
            os.utime(path, (time.time() - 3600,) * 2)


def _archive(src: Path, ledger: Ledger, journal: Journal | None) -> ArchiveReport:
    view = ledger.view()
    quick = finalwalk.quick_hold(journal, view) if journal is not None else None
    arch = Archiver(_Null(), clock=time.monotonic, hash_name="sha256", skip=view.held, quick=quick)
    arch.add_sources([str(src)])
    return arch.finish()


def _what(report: ArchiveReport) -> dict[str, Any]:
    """What a restore gets from the archive: its entries, and each held file by segment."""
    return {
        "entries": sorted((e["path"], e["type"], e.get("size"), e.get("sha256")) for e in report.entries()),
        # Each held file as the manifest hashes it, however the walk gathered it.
        "held": {
            k: (sorted([held_line(m, d) for m, d in h.files] + h.lines), sorted(h.renamed))
            for k, h in report.held.items()
        },
        "held_files": report.held_files,
        "held_bytes": report.held_bytes,
    }


def test_the_journal_walk_archives_and_holds_exactly_what_the_full_walk_does(tmp_path: Path) -> None:
    src = tmp_path / "logs"
    _tree(src)
    ledger = Ledger(None, INSTANCE)
    _ship_all(src, ledger)
    (src / "d0" / "new.log").write_bytes(b"not shipped before the scan\n")
    pending = Pending((str(src),), Excluder(()), Settler(60.0), scan)
    journal = pending.journal = Journal((str(src),), ())
    assert pending.full_scan(ledger, 0.0, _never(), 3600.0)
    assert journal.scanned and journal.lost is None

    # After the scan: an append, a rename, a deletion, a new file, a new directory with a
    # file, a chmod (same content: still held), and most files left alone.
    with open(src / "d0" / "app.log.3", "ab") as fh:
        fh.write(b"one more line\n")
    os.rename(src / "d1" / "app.log.4", src / "d1" / "app.log.4.1")
    os.unlink(src / "d1" / "app.log.5")
    (src / "d2" / "fresh.log").write_bytes(b"written after the scan\n")
    (src / "d3").mkdir()
    (src / "d3" / "inside.log").write_bytes(b"in a new directory\n")
    os.chmod(src / "d2" / "app.log.7", 0o600)
    # A hard link made since, and written through: no event names the first name.
    os.link(src / "d2" / "app.log.8", src / "d0" / "linked")
    with open(src / "d0" / "linked", "ab") as fh:
        fh.write(b"written through the other name\n")

    journal.drain()
    assert journal.lost is None
    by_journal, by_walk = _what(_archive(src, ledger, journal)), _what(_archive(src, ledger, None))
    assert by_journal == by_walk
    entries = {e[0] for e in by_walk["entries"]}
    held = {line.split(b"\0")[0].decode() for lines, _ in by_walk["held"].values() for line in lines}
    root = os.fsencode(src).lstrip(b"/").decode()
    assert {f"{root}/d0/app.log.3", f"{root}/d0/new.log", f"{root}/d2/fresh.log"} <= entries
    assert f"{root}/d3/inside.log" in entries
    assert f"{root}/d1/app.log.5" not in entries | held
    assert f"{root}/d1/app.log.4" in held  # held by its new name: renamed
    assert f"{root}/d2/app.log.7" in held and f"{root}/d2/app.log.10" in held
    assert f"{root}/d2/app.log.8" in entries and f"{root}/d0/linked" in entries
    assert by_walk["held_files"] == 60 - 3  # all shipped but the two appended and the deleted one


def test_a_file_changed_before_the_scan_is_never_trusted_unseen(tmp_path: Path) -> None:
    """The ledger's size and time are only trusted for files the completed scan found
    held: one written to before the scan (and so not held) is looked at, with no event."""
    src = tmp_path / "logs"
    _tree(src)
    ledger = Ledger(None, INSTANCE)
    _ship_all(src, ledger)
    with open(src / "d1" / "app.log.2", "ab") as fh:
        fh.write(b"appended before the scan\n")
    # A hard link: a write through either name changes both, with an event on one only.
    os.link(src / "d2" / "app.log.1", src / "d2" / "linked")
    pending = Pending((str(src),), Excluder(()), Settler(60.0), scan)
    journal = pending.journal = Journal((str(src),), ())
    assert pending.full_scan(ledger, 0.0, _never(), 3600.0)
    journal.drain()
    report = _archive(src, ledger, journal)
    assert _what(report) == _what(_archive(src, ledger, None))
    assert any(e["path"].endswith("d1/app.log.2") for e in report.entries())
    assert {os.fsencode(src / "d2" / "app.log.1"), os.fsencode(src / "d2" / "linked")} <= journal.paths


def _shipped_and_scanned(tmp_path: Path) -> tuple[Path, Ledger, Journal]:
    src = tmp_path / "logs"
    _tree(src)
    ledger = Ledger(None, INSTANCE)
    _ship_all(src, ledger)
    pending = Pending((str(src),), Excluder(()), Settler(60.0), scan)
    journal = pending.journal = Journal((str(src),), ())
    assert pending.full_scan(ledger, 0.0, _never(), 3600.0)
    return src, ledger, journal


def test_the_journal_is_lost_when_a_source_is_replaced_and_the_walk_is_chosen(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, ledger, journal = _shipped_and_scanned(tmp_path)
    view = ledger.view()
    view.handover = Handover(journal, stopped_clean=True)
    caplog.set_level("INFO")
    assert finalwalk.choose("journal", view, (str(src),), ()) is journal
    assert finalwalk.choose("walk", view, (str(src),), ()) is None
    assert finalwalk.choose("journal", view, (str(src), "/var/tmp"), ()) is None

    os.rename(src, tmp_path / "old")
    src.mkdir()
    assert finalwalk.choose("journal", view, (str(src),), ()) is None
    assert journal.lost is not None
    walked = [r for r in caplog.records if r.getMessage() == "final archive: walking every file"]
    assert len(walked) == 3


def _never() -> Any:
    import threading

    return threading.Event()


def test_a_directory_reached_by_two_source_paths_is_not_trusted(tmp_path: Path) -> None:
    """Its events would name it by one path only, while the walk may list it by the other."""
    (tmp_path / "logs" / "app").mkdir(parents=True)
    (tmp_path / "app-link").symlink_to(tmp_path / "logs" / "app")
    overlapping = Journal((str(tmp_path / "logs"), str(tmp_path / "app-link")), ())
    overlapping.arm()
    assert overlapping.lost is not None and "watched once" in overlapping.lost
    nested = Journal((str(tmp_path / "logs"), str(tmp_path / "logs" / "app")), ())
    nested.arm()
    assert nested.lost is None  # the same directory by the same path: one watch, one name


# -- prepared holds (finalprep.py): the journal walk worked out by the idle shipper --------


def _archive_prepared(
    src: Path, ledger: Ledger, journal: Journal, prepared: Prepared | None
) -> ArchiveReport:
    """The termination archive as backup.py makes it: the journal trusted, `prepared` handed over."""
    view = ledger.view()
    view.handover = Handover(journal, True, prepared)
    journal.drain()
    linked = finalwalk.linked_inodes(journal)
    quick = finalwalk.quick_hold(journal, view, linked=linked)
    recall = finalprep.for_archive(journal, view, linked)
    arch = Archiver(
        _Null(), clock=time.monotonic, hash_name="sha256", skip=view.held, quick=quick, recall=recall
    )
    arch.add_sources([str(src)])
    report = arch.finish()
    # The segments the manifest names are those the walk found holding files.
    assert sorted(view.used) == sorted(report.held)
    return report


def test_a_prepared_walk_holds_exactly_what_the_full_walk_does_with_nothing_made_per_file(
    tmp_path: Path,
) -> None:
    src, ledger, journal = _shipped_and_scanned(tmp_path)
    prepared = finalprep.prepare(journal, ledger)
    assert prepared is not None and prepared.files == 60
    report = _archive_prepared(src, ledger, journal, prepared)
    assert _what(report) == _what(_archive(src, ledger, None))
    assert report.held_files == report.held_prepared == 60
    # The manifest's segment blocks are the same bytes as from the walk's own tuples.
    walked = _archive(src, ledger, None)
    assert {k: h.to_json() for k, h in report.held.items()} == {
        k: h.to_json() for k, h in walked.held.items()
    }


def test_a_directory_changed_after_the_walk_was_prepared_is_listed_again(tmp_path: Path) -> None:
    src, ledger, journal = _shipped_and_scanned(tmp_path)
    prepared = finalprep.prepare(journal, ledger)
    assert prepared is not None
    # After it was prepared, in d0 only: an append, a new file, a rename and a deletion.
    with open(src / "d0" / "app.log.3", "ab") as fh:
        fh.write(b"one more line\n")
    (src / "d0" / "fresh.log").write_bytes(b"written after the walk was prepared\n")
    os.rename(src / "d0" / "app.log.4", src / "d0" / "app.log.4.1")
    os.unlink(src / "d0" / "app.log.5")
    report = _archive_prepared(src, ledger, journal, prepared)
    assert _what(report) == _what(_archive(src, ledger, None))
    assert report.held_prepared == 40  # d1 and d2 as prepared; d0 looked at again
    entries = {e["path"].rsplit("/", 2)[-2:][-1] for e in report.entries() if e["type"] == "file"}
    assert entries == {"app.log.3", "fresh.log"}


def _grow_ledger(src: Path, ledger: Ledger, journal: Journal) -> None:
    (src / "d1" / "late.log").write_bytes(b"shipped after the walk was prepared\n")
    st = os.lstat(src / "d1" / "late.log")
    sha = full_digest_of(src / "d1" / "late.log")
    rec = Shipped(
        FileId.of(st), os.fsencode(src / "d1" / "late.log"), sha, sha, "b/i/segments/s9.tar.zst", 1, 1, 0
    )
    ledger.add_segment([rec])


def full_digest_of(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return full_digest(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _new_directory(src: Path, ledger: Ledger, journal: Journal) -> None:
    (src / "d9").mkdir()
    (src / "d9" / "inside.log").write_bytes(b"a new directory\n")


def _rearmed(src: Path, ledger: Ledger, journal: Journal) -> None:
    journal.arm()
    journal.scan_done([])


def _linked(src: Path, ledger: Ledger, journal: Journal) -> None:
    # A link made in d0 to a file of d1, then written through: d1 has no event.
    os.link(src / "d1" / "app.log.6", src / "d0" / "other-name")
    with open(src / "d0" / "other-name", "ab") as fh:
        fh.write(b"written through the new name\n")


def _aimed_elsewhere(src: Path, ledger: Ledger, journal: Journal) -> None:
    ledger.aim("b", "b/i/segments/s0")  # the second segment no longer counts here


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (_grow_ledger, "the ledger changed since"),
        (_new_directory, "a directory was created, moved or deleted since"),
        (_rearmed, "the journal was armed again since"),
        (_linked, "a file was hard-linked since"),
        (_aimed_elsewhere, "other segments count where this backup goes"),
    ],
)
def test_what_invalidates_the_whole_prepared_walk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, change: Any, why: str
) -> None:
    src, ledger, journal = _shipped_and_scanned(tmp_path)
    prepared = finalprep.prepare(journal, ledger)
    assert prepared is not None
    change(src, ledger, journal)
    caplog.set_level("INFO")
    report = _archive_prepared(src, ledger, journal, prepared)
    assert report.held_prepared == 0
    reasons = [
        getattr(r, "fields", {}).get("reason") for r in caplog.records if "nothing prepared" in r.getMessage()
    ]
    assert reasons == [why]
    view = ledger.view()
    assert _what(report) == _what(_archive(src, view, None))


def test_a_walk_prepared_from_one_journal_is_never_reused_with_another(tmp_path: Path) -> None:
    """A shipping attempt after an error starts a new journal: what was prepared from the
    old one (armed as many times) must not pass for the new one's."""
    src, ledger, old = _shipped_and_scanned(tmp_path)
    prepared = finalprep.prepare(old, ledger)
    assert prepared is not None
    with open(src / "d1" / "app.log.6", "ab") as fh:
        fh.write(b"changed between the two attempts\n")
    pending = Pending((str(src),), Excluder(()), Settler(60.0), scan)
    new = pending.journal = Journal((str(src),), ())
    assert pending.full_scan(ledger, 0.0, _never(), 3600.0)
    assert finalprep.stale(prepared, new, ledger, set()) == "the journal was armed again since"
    report = _archive_prepared(src, ledger, new, prepared)
    assert report.held_prepared == 0
    assert _what(report) == _what(_archive(src, ledger, None))


def test_nothing_is_prepared_from_a_journal_that_is_not_trusted(tmp_path: Path) -> None:
    src, ledger, journal = _shipped_and_scanned(tmp_path)
    journal.lose("inotify lost events (its queue overflowed)")
    assert finalprep.prepare(journal, ledger) is None
    unscanned = Journal((str(src),), ())
    unscanned.arm()
    assert finalprep.prepare(unscanned, ledger) is None
