"""Exactly once (docs/architecture.md, "Exactly once"): the lock, the record, and the three
verdicts. The record is left by an earlier run of the job itself wherever a run can leave it.

The two verdicts that must never be swapped: a *duplicate* completes nothing and writes no
archive (test_a_second_run_for_a_completed_action_is_a_duplicate_*); a *complete-only*
completes the action exactly once and writes no second archive
(test_a_backup_whose_completion_failed_is_completed_by_the_next_run_*)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from functional.conftest import (
    INSTANCE,
    TOKEN,
    World,
    command_options,
    leaving,
    no_backup,
    the_backup,
)
from functional.fakes import client_error


def first_run(world: World) -> str:
    """The watcher answers the action: one archive, CONTINUE, recorded."""
    world.asg.set_state("Terminating:Wait")
    out = world.run(leaving(world))
    assert out.exit_code == 0
    assert world.asg.completed == ["CONTINUE"]
    return the_backup(world)


def run_whose_completion_fails(world: World, **configure: object) -> str:
    """A run that backs up but whose completion is refused (AccessDenied): exit 1."""
    world.configure(**configure)
    world.asg.set_state("Terminating:Wait")
    world.asg.errors["CompleteLifecycleAction"] = [client_error("AccessDenied", "not allowed", 403)]
    out = world.run(command_options(world))
    assert out.exit_code == 1
    assert world.asg.completed == []
    record = world.record()
    assert record is not None
    assert (record["backup_ok"], record["completed"]) == (True, False)
    return the_backup(world)


# -- duplicate ----------------------------------------------------------------------------------


@pytest.mark.parametrize("then", ["Terminating:Proceed", "Terminating:Wait"])
def test_a_second_run_for_a_completed_action_is_a_duplicate_and_does_nothing(world: World, then: str) -> None:
    # Run Command arrives after the watcher: Describe… may still say Terminating:Wait (it is
    # eventually consistent); the probe says the action is over.
    key = first_run(world)
    messages = len(world.messages())
    world.asg.set_state(then)
    out = world.run(command_options(world, imds_state="Terminated"))
    assert out.exit_code == 0
    assert (out.result.status, out.result.key, out.result.first_status) == ("duplicate", key, "succeeded")
    assert world.archives() == [key]  # no second archive
    assert world.asg.count("CompleteLifecycleAction") == 1  # not even attempted again
    assert len(world.messages()) == messages
    assert world.cloudwatch.values("BackupSucceeded") == [1.0]  # the termination counted once


def test_a_duplicate_of_a_failed_run_exits_with_its_code(world: World) -> None:
    world.s3.errors["CreateMultipartUpload"] = [client_error("AccessDenied", "Access Denied", 403)]
    world.asg.set_state("Terminating:Wait")
    assert world.run(leaving(world)).exit_code == 1
    assert world.asg.completed == ["ABANDON"]
    out = world.run(command_options(world, imds_state="Terminated"))
    assert (out.exit_code, out.result.status, out.result.first_status) == (1, "duplicate", "failed")
    no_backup(world)
    assert world.asg.count("CompleteLifecycleAction") == 1


def test_a_run_that_waited_for_the_lock_finds_the_other_paths_record_and_is_a_duplicate(world: World) -> None:
    # The watcher holds the lock while Run Command's run arrives; when it lets go, it has
    # backed up and completed the very action this run probed live a moment ago.
    world.configure(lifecycle_token=TOKEN)
    world.asg.set_state("Terminating:Wait")
    lock = hold_the_lock(world)

    def other_path_finishes() -> None:
        world.write_record(completed=True, lifecycle_result="CONTINUE")
        world.asg.live = False
        os.close(lock)

    world.clock.after(50, other_path_finishes)
    out = world.run(command_options(world))
    assert out.exit_code == 0
    assert out.result.status == "duplicate"
    assert out.result.key == "backups/earlier.tar"
    no_backup(world)
    assert world.asg.count("CompleteLifecycleAction") == 0
    assert world.clock.elapsed >= 50


# -- complete only ------------------------------------------------------------------------------


def test_a_backup_whose_completion_failed_is_completed_by_the_next_run_without_a_second_archive(
    world: World,
) -> None:
    key = run_whose_completion_fails(world)
    world.asg.errors.clear()
    out = world.run(command_options(world))
    assert out.exit_code == 0
    assert world.asg.completed == ["CONTINUE"]  # exactly once
    assert world.archives() == [key]  # no second archive
    assert (out.result.status, out.result.key, out.result.lifecycle_result) == ("duplicate", key, "CONTINUE")
    record = world.record()
    assert record is not None
    assert (record["completed"], record["lifecycle_result"]) == (True, "CONTINUE")


def test_a_backup_whose_completion_failed_is_completed_by_the_next_run_with_the_same_token(
    world: World,
) -> None:
    key = run_whose_completion_fails(world, lifecycle_token=TOKEN)
    world.asg.errors.clear()
    out = world.run(command_options(world))
    assert out.exit_code == 0
    assert world.asg.completed == ["CONTINUE"]
    assert world.archives() == [key]


def test_a_complete_only_run_whose_completion_fails_again_exits_1_and_stays_uncompleted(world: World) -> None:
    key = run_whose_completion_fails(world)
    world.asg.errors["CompleteLifecycleAction"] = [client_error("AccessDenied", "not allowed", 403)]
    out = world.run(command_options(world))
    assert out.exit_code == 1
    assert world.asg.completed == []
    assert world.archives() == [key]
    record = world.record()
    assert record is not None and record["completed"] is False


def test_the_complete_only_run_reports_once_what_it_completed(world: World) -> None:
    run_whose_completion_fails(world)
    before = len(world.messages())
    world.asg.errors.clear()
    world.run(command_options(world))
    after = world.messages()[before:]
    assert len(after) == 1
    assert (after[0]["status"], after[0]["lifecycle_result"], after[0]["first_status"]) == (
        "duplicate",
        "CONTINUE",
        "succeeded",
    )


# -- run again ----------------------------------------------------------------------------------


def second_archive_prefix(world: World) -> None:
    # Keys have one-second resolution: a second archive within the same wall-clock second
    # would move to the next second with a real sleep (backup._free_key). A prefix of its
    # own keeps the two keys apart without one.
    world.configure(prefix="again/")


def test_a_new_action_after_a_completed_one_gets_its_own_archive_and_completion(world: World) -> None:
    first = first_run(world)
    second_archive_prefix(world)
    world.asg.set_state("Terminating:Wait")
    world.asg.live = True  # a new action: warm-pool reuse, a second scale-in
    out = world.run(leaving(world))
    assert out.exit_code == 0
    assert len(world.archives()) == 2 and first in world.archives()
    assert world.asg.completed == ["CONTINUE", "CONTINUE"]
    assert out.result.status == "succeeded"


def test_a_record_of_a_failed_backup_is_run_again_while_the_action_lives(world: World) -> None:
    # The first run's archive and completion both failed: the action still waits.
    world.s3.errors["CreateMultipartUpload"] = [client_error("AccessDenied", "Access Denied", 403)]
    world.asg.errors["CompleteLifecycleAction"] = [client_error("AccessDenied", "not allowed", 403)]
    world.asg.set_state("Terminating:Wait")
    assert world.run(command_options(world)).exit_code == 1
    no_backup(world)
    out = world.run(command_options(world))
    assert out.exit_code == 0
    the_backup(world)
    assert world.asg.completed == ["CONTINUE"]


def test_a_record_of_another_token_is_a_new_action(world: World) -> None:
    run_whose_completion_fails(world, lifecycle_token="00000000-1111-2222-3333-444444444444")
    world.asg.errors.clear()
    second_archive_prefix(world)
    world.configure(lifecycle_token=TOKEN)
    out = world.run(command_options(world))
    assert out.exit_code == 0
    assert len(world.archives()) == 2
    assert world.asg.completed == ["CONTINUE"]
    assert out.result.status == "succeeded"


def test_an_uncompleted_record_older_than_the_heartbeat_timeout_is_a_new_action(world: World) -> None:
    world.write_record(recorded_at=time.time() - 400, valid_for=300.0, completed=False)
    world.asg.set_state("Terminating:Wait")
    out = world.run(leaving(world))
    assert out.exit_code == 0
    the_backup(world)
    assert world.asg.completed == ["CONTINUE"]


@pytest.mark.parametrize(
    "record",
    [
        {"recorded_at": time.time() - 3 * 86400, "completed": False, "valid_for": 10 * 86400.0},
        {"format": 1},
    ],
    ids=["older-than-48h", "old-format"],
)
def test_a_record_that_cannot_describe_this_action_is_ignored(
    world: World, record: dict[str, object]
) -> None:
    world.write_record(**record)
    world.asg.set_state("Terminating:Wait")
    out = world.run(leaving(world))
    assert out.exit_code == 0
    the_backup(world)
    assert world.asg.completed == ["CONTINUE"]


# -- the lock -----------------------------------------------------------------------------------


def hold_the_lock(world: World) -> int:
    """The other path's flock on the termination lock."""
    state = Path(world.cfg.state_dir)
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(state / f"termination-{INSTANCE}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


@contextlib.contextmanager
def held_lock(world: World) -> Iterator[None]:
    fd = hold_the_lock(world)
    try:
        yield
    finally:
        os.close(fd)


def test_a_run_that_cannot_get_the_lock_within_lock_timeout_fails_and_leaves_the_action_to_the_holder(
    world: World,
) -> None:
    world.configure(lock_timeout=30.0)
    world.asg.set_state("Terminating:Wait")
    with held_lock(world):
        out = world.run(leaving(world))
    assert out.exit_code == 1
    assert out.result.status == "failed"
    assert 30 <= world.clock.elapsed < 31
    no_backup(world)
    assert world.asg.count("CompleteLifecycleAction") == 0


def test_an_unusable_state_dir_falls_back_to_the_runtime_dir_and_still_runs_once(world: World) -> None:
    Path(world.cfg.state_dir).write_text("not a directory")
    key = first_run(world)
    assert (Path(world.cfg.runtime_dir) / f"termination-{INSTANCE}.json").exists()
    out = world.run(command_options(world, imds_state="Terminated"))
    assert out.result.status == "duplicate"
    assert world.archives() == [key]
    assert world.asg.count("CompleteLifecycleAction") == 1


def test_a_killed_runs_multipart_upload_is_aborted_before_the_new_archive(world: World) -> None:
    mine = world.s3.create_multipart_upload(Bucket="backups", Key=f"web/{INSTANCE}/20260101T000000Z.tar")
    other = world.s3.create_multipart_upload(
        Bucket="backups", Key="web/i-0fedcba9876543210/20260101T000000Z.tar"
    )
    first_run(world)
    assert world.s3.aborted == [f"web/{INSTANCE}/20260101T000000Z.tar"]
    assert list(world.s3.uploads) == [other["UploadId"]]  # another instance's upload is safe
    assert mine["UploadId"] not in world.s3.uploads


def test_a_stop_while_waiting_for_the_lock_ends_the_run_without_a_backup(world: World) -> None:
    world.asg.set_state("Terminating:Wait")
    world.cancel.cancel_after(5)
    with held_lock(world):
        out = world.run(command_options(world))
    assert out.exit_code == 1
    assert "lock" in (out.result.error or "")
    assert world.clock.elapsed < 6
    no_backup(world)
    assert world.asg.count("CompleteLifecycleAction") == 0


def test_no_complete_runs_are_never_deduplicated(world: World) -> None:
    world.configure(complete=False)
    world.asg.set_state("Terminating:Wait")
    world.run(command_options(world))
    second_archive_prefix(world)
    out = world.run(command_options(world))
    assert out.result.status == "succeeded"
    assert len(world.archives()) == 2
    assert len(world.messages()) == 2
    assert world.asg.count("CompleteLifecycleAction") == 0
