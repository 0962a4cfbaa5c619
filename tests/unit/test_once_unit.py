"""The exactly-once rule: records, the lock, and decide()."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from instance_agent.errors import Cancelled, LockTimeout
from instance_agent.once import COMPLETE_ONLY, DUPLICATE, RUN, Record, TerminationLock, decide

NOW = 1_800_000_000.0


def rec(
    *,
    completed: bool,
    backup_ok: bool = True,
    action: str | None = None,
    age: float = 10.0,
    valid_for: float = 300.0,
) -> Record:
    return Record(
        recorded_at=NOW - age,
        exit_code=0 if backup_ok else 1,
        result={"status": "succeeded" if backup_ok else "failed", "key": "k"},
        backup_ok=backup_ok,
        completed=completed,
        lifecycle_result="CONTINUE",
        action=action,
        valid_for=valid_for,
    )


def test_no_record_runs() -> None:
    assert decide(None, live=True, action=None, now=NOW) == RUN


def test_no_live_action_is_a_duplicate() -> None:
    assert decide(rec(completed=True), live=False, action=None, now=NOW) == DUPLICATE


def test_a_completed_action_is_never_the_current_one() -> None:
    assert decide(rec(completed=True), live=True, action=None, now=NOW) == RUN
    assert decide(rec(completed=True, action="aaaa1111"), live=True, action="aaaa1111", now=NOW) == RUN


def test_an_uncompleted_backup_of_the_same_action_is_completed_only() -> None:
    assert decide(rec(completed=False), live=True, action=None, now=NOW) == COMPLETE_ONLY
    assert (
        decide(rec(completed=False, action="aaaa1111"), live=True, action="aaaa1111", now=NOW)
        == COMPLETE_ONLY
    )


def test_another_action_or_an_expired_one_runs_again() -> None:
    assert decide(rec(completed=False, action="aaaa1111"), live=True, action="bbbb2222", now=NOW) == RUN
    # Older than the heartbeat timeout: that action expired; this one is new.
    assert decide(rec(completed=False, age=400.0), live=True, action=None, now=NOW) == RUN


def test_a_failed_backup_gets_a_second_chance() -> None:
    assert decide(rec(completed=False, backup_ok=False), live=True, action=None, now=NOW) == RUN


def test_record_round_trip_and_old_formats_ignored(tmp_path: Path) -> None:
    lock = TerminationLock((str(tmp_path / "state"),), "termination-i-1")
    lock.acquire(1.0)
    written = Record(
        recorded_at=time.time(),
        exit_code=0,
        result={"key": "k"},
        backup_ok=True,
        completed=False,
        lifecycle_result="CONTINUE",
        action="aaaa1111",
        valid_for=300.0,
    )
    lock.record(written)
    assert lock.recorded() == written
    lock.release()
    (tmp_path / "state" / "termination-i-1.json").write_text(
        '{"recorded_at": 1, "exit_code": 0, "result": {}}'
    )  # the format before actions
    assert lock.recorded() is None


def test_second_lock_waits_then_times_out(tmp_path: Path) -> None:
    first = TerminationLock((str(tmp_path),), "t").acquire(1.0)
    ticks = iter(range(1000))
    second = TerminationLock((str(tmp_path),), "t", clock=lambda: float(next(ticks)))
    with pytest.raises(LockTimeout):
        second.acquire(3.0)
    first.release()
    assert TerminationLock((str(tmp_path),), "t").acquire(1.0).fd is not None


def test_cancel_ends_the_lock_wait(tmp_path: Path) -> None:
    first = TerminationLock((str(tmp_path),), "t").acquire(1.0)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        TerminationLock((str(tmp_path),), "t", cancel=cancel).acquire(3600.0)
    first.release()


def test_unusable_state_dir_falls_back_to_the_runtime_dir(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    lock = TerminationLock((str(blocked / "state"), str(tmp_path / "run")), "t").acquire(1.0)
    assert lock.dir == str(tmp_path / "run")
    lock.release()
