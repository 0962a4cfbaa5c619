"""The shipping ledger (identity, restart, never twice) and the settle/rotation decisions,
in process with a fake clock."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from fakes import FakeClock

from instance_agent.ledgerfile import LEDGER_FILE
from instance_agent.segment import Target
from instance_agent.settle import Settler
from instance_agent.shipbatch import batch
from instance_agent.shiprecord import FileId, Shipped, full_digest, open_same, tail_digest
from instance_agent.shipstate import Ledger

INSTANCE = "i-0123456789abcdef0"


def _record(path: Path, key: str = "b/i/segments/x.tar.zst") -> Shipped:
    st = os.lstat(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        tail, whole = tail_digest(fd, st.st_size), full_digest(fd, st.st_size)
    finally:
        os.close(fd)
    return Shipped(FileId.of(st), os.fsencode(path), whole, tail, key, 2048, 100, st.st_ctime_ns)


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
    (state / "ship-ledger.jsonl").write_text("{not json")
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


def test_the_ledger_grows_by_one_line_per_segment_and_survives_a_torn_line(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    logs = []
    for i in range(6):
        p = tmp_path / f"job-{i}.log"
        p.write_bytes(b"x" * (i + 1))
        logs.append(p)
    ledger = Ledger.load(state, INSTANCE)
    ledger.add_segment([_record(p, "k/seg-1") for p in logs[:3]])  # one segment, three files
    ledger.add_segment([_record(p, "k/seg-2") for p in logs[3:5]])
    ledger.close()
    path = Path(state) / LEDGER_FILE
    lines = path.read_bytes().splitlines()
    assert len(lines) == 3  # the header, then one line per segment: nothing rewritten
    with open(path, "ab") as fh:  # a watcher killed in the middle of its next append
        fh.write(b'{"key":"k/seg-3","tar_bytes":2048,"files":[{"fid"')

    again = Ledger.load(state, INSTANCE)
    assert again.totals() == (5, 1 + 2 + 3 + 4 + 5)
    assert again.get(FileId.of(os.lstat(logs[5]))) is None  # the torn one: shipped again
    assert _held(again, logs[4]) == "k/seg-2"
    assert again.segments() == [
        {
            "key": "k/seg-2",
            "manifest_key": "k/seg-2.manifest.json",
            "tar_bytes": 2048,
            "compressed_bytes": 100,
        }
    ]

    st = os.lstat(logs[0])
    again.keep_only({(os.lstat(p).st_dev, os.lstat(p).st_ino) for p in logs[1:]})
    again.close()
    assert len(path.read_bytes().splitlines()) == 5  # the torn line, then one "forget" line
    compacted = Ledger.load(state, INSTANCE)
    compacted.compact()  # what a starting shipper does
    assert path.read_bytes().count(b"\n") == 3  # header and the two segments, whole
    assert compacted.totals() == (4, 2 + 3 + 4 + 5)
    assert Ledger.load(state, INSTANCE).get(FileId.of(st)) is None
    assert (os.stat(state).st_mode & 0o777) == 0o700


def test_the_ledger_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    (state / LEDGER_FILE).symlink_to(victim)
    log = tmp_path / "a.log"
    log.write_bytes(b"a")
    ledger = Ledger.load(str(state), INSTANCE)
    ledger.add(_record(log))  # the append fails (ELOOP): remembered in memory only
    assert victim.read_bytes() == b"precious\n"
    assert ledger.get(FileId.of(os.lstat(log))) is not None


def _due(tmp_path: Path, sizes: list[int]) -> list[tuple[Target, os.stat_result]]:
    out = []
    for i, size in enumerate(sizes):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"x" * size)
        os.utime(p, (1000 + i, 1000 + i))
        out.append((Target(os.fsencode(tmp_path), os.fsencode(p.name)), os.lstat(p)))
    return out


def test_a_segment_packs_small_files_up_to_the_budget_and_a_big_one_goes_alone(tmp_path: Path) -> None:
    due = _due(tmp_path, [10, 20, 30, 500, 30, 5])
    names = [t.rel for t in batch(due, max_bytes=100, max_files=10)]
    assert names == [b"f0", b"f1", b"f2", b"f4", b"f5"]  # f3 is over the budget
    assert [t.rel for t in batch(list(reversed(due)), max_bytes=100, max_files=10)] == names
    assert [t.rel for t in batch(due, max_bytes=100, max_files=2)] == [b"f0", b"f1"]
    assert [t.rel for t in batch(due[3:], max_bytes=100, max_files=10)] == [b"f3"]


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


def test_a_ledger_line_nested_deep_is_skipped_and_shipping_goes_on(tmp_path: Path) -> None:
    """Issue 19 item 8: json's parser is recursive; a line nested 100,000 levels deep raised
    RecursionError out of load() and stopped shipping for good."""
    state = str(tmp_path / "state")
    log = tmp_path / "app.log"
    log.write_bytes(b"line\n" * 100)
    ledger = Ledger.load(state, INSTANCE)
    ledger.add(_record(log))
    ledger.close()
    with open(os.path.join(state, LEDGER_FILE), "ab") as fh:
        fh.write(b"[" * 100_000 + b"\n")
    again = Ledger.load(state, INSTANCE)
    assert again.get(FileId.of(os.lstat(log))) is not None


def test_churn_compacts_the_ledger_while_running(tmp_path: Path) -> None:
    """Issue 19 item 8: an append-only ledger grows with every rotated file shipped and then
    forgotten; past the bound the shipper compacts it, and nothing live is lost."""
    import instance_agent.shipstate as shipstate

    state = str(tmp_path / "state")
    keep = tmp_path / "keep.log"
    keep.write_bytes(b"k" * 1000)
    ledger = Ledger.load(state, INSTANCE)
    ledger.add(_record(keep, key="b/i/segments/keep.tar.zst"))
    churn = tmp_path / "churn.log"
    churn.write_bytes(b"c" * 10)
    live = (os.lstat(keep).st_dev, os.lstat(keep).st_ino)
    rounds = 0
    while not ledger.needs_compaction():
        ledger.add(_record(churn, key=f"b/i/segments/c{rounds}.tar.zst"))
        ledger.keep_only({live})  # rotated away for good
        rounds += 1
        assert rounds < shipstate.COMPACT_AFTER
    size = os.path.getsize(os.path.join(state, LEDGER_FILE))
    ledger.compact()
    assert not ledger.needs_compaction()
    assert os.path.getsize(os.path.join(state, LEDGER_FILE)) < size // 100
    ledger.add(_record(churn, key="b/i/segments/after.tar.zst"))  # appends go on after it
    ledger.close()
    again = Ledger.load(state, INSTANCE)
    assert again.get(FileId.of(os.lstat(keep))) is not None
    assert again.get(FileId.of(os.lstat(churn))) is not None
    assert again.totals()[0] == 2


def _synthetic(n: int, key: str, first_ino: int = 1000, dev: int = 2049, count: int = 0) -> list[Shipped]:
    return [
        Shipped(
            FileId(dev, first_ino + i, 100 + i, 1_764_000_000_000_000_000 + i),
            b"/var/log/app/%07d.log.1" % (first_ino + i),
            "%064x" % (first_ino + i),
            "%064x" % (7 * (first_ino + i)),
            key,
            4096,
            512,
            1_764_000_000_000_000_001 + i,
            "bk",
            at=1_764_000_000.0,
            segment_files=count or n,
        )
        for i in range(n)
    ]


def test_the_packed_ledger_gives_back_every_record_as_it_was_added(tmp_path: Path) -> None:
    """Issue 19 item 6: the records are packed in memory (no object per file), merged as
    they grow; each reads back whole, a replaced or forgotten one is gone, and a view
    handed to the termination archive does not move with later changes."""
    import instance_agent.shipstate as shipstate

    state = str(tmp_path / "state")
    ledger = Ledger.load(state, INSTANCE)
    one = _synthetic(shipstate.MERGE_MIN + 10, "b/i/segments/one.tar.zst")
    two = _synthetic(3000, "b/i/segments/two.tar.zst", first_ino=1000 + len(one), count=3005)
    other_dev = _synthetic(5, "b/i/segments/two.tar.zst", first_ino=1000, dev=2050, count=3005)
    ledger.add_segment(one)  # past MERGE_MIN: merged into the packed base
    ledger.add_segment(two + other_dev)  # recent
    view = ledger.view()
    rewritten = dataclasses.replace(one[7], fid=dataclasses.replace(one[7].fid, size=1), key="b/i/segments/3")
    ledger.add(rewritten)
    ledger.keep_only({(r.fid.dev, r.fid.ino) for r in one + two + other_dev if r is not one[8]})

    for rec in one[:7] + one[9:] + two + other_dev:
        assert ledger.get(rec.fid) == rec
        assert view.get(rec.fid) == rec
    assert ledger.get(one[7].fid) is None and ledger.get(rewritten.fid) == rewritten
    assert ledger.get(one[8].fid) is None and view.get(one[8].fid) == one[8]
    assert view.get(rewritten.fid) is None
    everything = one + two + other_dev
    assert ledger.totals() == (len(everything) - 1, sum(r.fid.size for r in everything) - 107 - 108 + 1)
    ledger.aim("bk", "b/i/segments/t")  # only segment "two" is under this prefix
    assert ledger.totals() == (len(two) + len(other_dev), sum(r.fid.size for r in two + other_dev))
    assert ledger.get(one[0].fid) is None and ledger.get(two[0].fid) == two[0]

    ledger.compact()
    ledger.close()
    again = Ledger.load(state, INSTANCE)
    for rec in one[:7] + one[9:] + two + other_dev + [rewritten]:
        assert again.get(rec.fid) == rec
    assert again.totals()[0] == len(everything) - 1


def test_a_record_whose_digests_are_not_sha256_is_not_held() -> None:
    """Never ours (a forged segment manifest read back by ledgerseed): the file is shipped
    again rather than held on a digest that cannot be checked."""
    ledger = Ledger(None, INSTANCE)
    good, bad = _synthetic(2, "b/i/segments/x.tar.zst")
    ledger.add_segment([good, dataclasses.replace(bad, sha256="not a digest")])
    assert ledger.get(good.fid) == good
    assert ledger.get(bad.fid) is None
    assert ledger.totals() == (1, good.fid.size)
