"""The shipping ledger (identity, restart, never twice) and the settle/rotation decisions,
in process with a fake clock."""

from __future__ import annotations

import os
from pathlib import Path

from fakes import FakeClock

from instance_agent.settle import Settler
from instance_agent.shipstate import FileId, Ledger, Shipped, open_same, tail_digest

INSTANCE = "i-0123456789abcdef0"


def _record(path: Path, key: str = "b/i/segments/x.tar.zst") -> Shipped:
    st = os.lstat(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        tail = tail_digest(fd, st.st_size)
    finally:
        os.close(fd)
    return Shipped(FileId.of(st), os.fsencode(path), "ab" * 32, tail, key, 2048, 100)


def _held(ledger: Ledger, path: Path) -> str | None:
    found = ledger.held(os.fsencode(path), os.lstat(path), None, os.fsencode(path))
    return found.key if found else None


def test_a_shipped_file_is_held_after_a_restart_and_by_its_new_name(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    log = tmp_path / "app.log"
    log.write_bytes(b"line\n" * 1000)
    Ledger.load(state, INSTANCE).add(_record(log))

    again = Ledger.load(state, INSTANCE)  # a restarted watcher, or the termination job
    assert again.get(FileId.of(os.lstat(log))) is not None  # never shipped twice
    rotated = tmp_path / "app.log.1"
    os.rename(log, rotated)  # same inode, size and time: the same file
    assert _held(again, rotated) == "b/i/segments/x.tar.zst"
    assert again.segments()[0]["key"] == "b/i/segments/x.tar.zst"
    assert again.totals() == (1, 5000)


def test_a_file_written_since_is_archived_again(tmp_path: Path) -> None:
    ledger = Ledger(None, INSTANCE)
    log = tmp_path / "app.log"
    log.write_bytes(b"a" * 100_000)
    ledger.add(_record(log))
    with open(log, "ab") as fh:
        fh.write(b"one more line\n")
    assert _held(ledger, log) is None


def test_same_size_and_time_but_new_tail_is_archived_again(tmp_path: Path) -> None:
    ledger = Ledger(None, INSTANCE)
    log = tmp_path / "app.log"
    log.write_bytes(b"a" * 100_000)
    st = os.lstat(log)
    ledger.add(_record(log))
    with open(log, "r+b") as fh:  # rewritten in place, and its time put back
        fh.seek(99_000)
        fh.write(b"b" * 1000)
    os.utime(log, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert FileId.of(os.lstat(log)) == FileId.of(st)
    assert _held(ledger, log) is None


def test_empty_other_instance_or_garbage_ledger_means_full_archive(tmp_path: Path) -> None:
    state = tmp_path / "state"
    log = tmp_path / "app.log"
    log.write_bytes(b"x" * 10)
    assert _held(Ledger.load(str(state), INSTANCE), log) is None  # no ledger yet
    Ledger.load(str(state), "i-0fedcba9876543210").add(_record(log))
    assert _held(Ledger.load(str(state), INSTANCE), log) is None  # baked into an AMI
    (state / "ship-ledger.json").write_text("{not json")
    assert _held(Ledger.load(str(state), INSTANCE), log) is None


def test_gone_files_are_forgotten(tmp_path: Path) -> None:
    ledger = Ledger(None, INSTANCE)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    ledger.add(_record(a, "k/a"))
    ledger.add(_record(b, "k/b"))
    st = os.lstat(a)
    ledger.keep_only({(st.st_dev, st.st_ino)})
    assert ledger.totals() == (1, 1)


def test_open_same_refuses_a_symlink_or_another_file(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.write_bytes(b"x")
    fid = FileId.of(os.lstat(real))
    link = tmp_path / "link"
    link.symlink_to(real)
    assert open_same(os.fsencode(link), None, fid) is None
    other = tmp_path / "other"
    other.write_bytes(b"x")
    assert open_same(os.fsencode(other), None, fid) is None


# --- settle -------------------------------------------------------------------------------


def test_live_file_waits_for_settle_and_old_files_go_at_once() -> None:
    clock = FakeClock(10_000.0)
    s = Settler(settle=60.0)
    assert s.reason(b"/l/old.1", mtime=clock() - 3600, now=clock()) == "settled"
    assert s.reason(b"/l/app.log", mtime=clock() - 1, now=clock()) is None
    assert s.wake_in(b"/l/app.log", mtime=clock() - 1, now=clock()) == 59.0
    clock.sleep(59.0)
    assert s.reason(b"/l/app.log", mtime=clock() - 60, now=clock()) == "settled"


def test_a_rename_is_complete_at_once_and_the_old_name_forgotten() -> None:
    clock = FakeClock()
    s = Settler(settle=60.0)
    s.closed(b"/l/app.log", clock())
    s.moved_from(b"/l/app.log")
    s.moved_to(b"/l/app.log.1")
    assert s.reason(b"/l/app.log.1", mtime=clock(), now=clock()) == "renamed"
    assert s.reason(b"/l/app.log", mtime=clock(), now=clock()) is None  # the new live file


def test_closed_after_write_needs_a_quiet_spell() -> None:
    clock = FakeClock()
    s = Settler(settle=60.0)
    s.closed(b"/l/a.gz", clock())
    assert s.reason(b"/l/a.gz", mtime=clock(), now=clock()) is None
    clock.sleep(2.0)  # written again (a `>>` writer closes after every line)
    s.closed(b"/l/a.gz", clock())
    clock.sleep(4.0)
    assert s.reason(b"/l/a.gz", mtime=clock() - 4.0, now=clock()) is None
    clock.sleep(1.0)
    assert s.reason(b"/l/a.gz", mtime=clock() - 5.0, now=clock()) == "closed"
    s.forget(b"/l/a.gz")  # shipped: only a new close or the settle time counts now
    assert s.reason(b"/l/a.gz", mtime=clock() - 5.0, now=clock()) is None


def test_a_short_settle_bounds_the_close_quiet_spell() -> None:
    clock = FakeClock()
    s = Settler(settle=2.0)
    s.closed(b"/l/a", clock())
    clock.sleep(2.0)
    assert s.reason(b"/l/a", mtime=clock() - 2.0, now=clock()) is not None
