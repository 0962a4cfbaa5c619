"""Spot notices (docs/architecture.md, "Where each path joins it"): a reclaim is recorded as
the termination with nothing completed, and a lifecycle action that arrives within 600 s is
completed without a second archive; a stop, hibernate or rebalance backs up only."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from functional.conftest import INSTANCE, World, command_options, the_backup, the_message, watcher_options
from instance_agent.poller import REBALANCE, SPOT_HIBERNATE, SPOT_STOP, SPOT_TERMINATE

NOTICE_TIME = "2026-12-04T21:50:00Z"


def reclaim(world: World) -> str:
    world.asg.set_state("InService")  # Auto Scaling knows nothing of a Spot reclaim yet
    out = world.run(watcher_options(world, SPOT_TERMINATE, NOTICE_TIME))
    assert out.exit_code == 0
    return the_backup(world)


def test_a_spot_reclaim_is_backed_up_recorded_and_completes_nothing(world: World) -> None:
    key = reclaim(world)
    assert world.asg.count("CompleteLifecycleAction") == 0
    assert world.asg.count("RecordLifecycleActionHeartbeat") == 0  # no hook holds a reclaim
    msg = the_message(world)
    assert (msg["trigger"], msg["notice"], msg["status"], msg["key"]) == (
        "spot-terminate",
        NOTICE_TIME,
        "succeeded",
        key,
    )
    assert msg["lifecycle_result"] == "none"
    assert key.startswith(f"web/{INSTANCE}/")  # the group named, for the key
    record = world.record()
    assert record is not None
    assert (record["backup_ok"], record["completed"], record["valid_for"]) == (True, False, 600.0)


def test_a_lifecycle_action_within_600_s_of_a_reclaim_is_completed_without_a_second_archive(
    world: World,
) -> None:
    key = reclaim(world)
    # Then the group's terminating hook fires and the Lambda's Run Command arrives.
    world.asg.set_state("Terminating:Wait")
    out = world.run(command_options(world, imds_state="Terminated"))
    assert out.exit_code == 0
    assert world.asg.completed == ["CONTINUE"]  # exactly once
    assert world.archives() == [key]
    assert out.result.status == "duplicate"


def test_a_lifecycle_action_long_after_a_reclaim_gets_its_own_archive(world: World) -> None:
    reclaim(world)
    path = Path(world.cfg.state_dir) / f"termination-{INSTANCE}.json"
    doc = json.loads(path.read_text())
    doc["recorded_at"] = time.time() - 700
    path.write_text(json.dumps(doc))
    world.configure(prefix="later/")  # see test_job_once.second_archive_prefix
    world.asg.set_state("Terminating:Wait")
    out = world.run(command_options(world, imds_state="Terminated"))
    assert out.exit_code == 0
    assert len(world.archives()) == 2
    assert world.asg.completed == ["CONTINUE"]


def test_a_second_reclaim_notice_within_the_window_is_a_duplicate(world: World) -> None:
    key = reclaim(world)
    out = world.run(watcher_options(world, SPOT_TERMINATE, NOTICE_TIME))
    assert out.result.status == "duplicate"
    assert world.archives() == [key]
    assert len(world.messages()) == 1


def test_a_spot_reclaim_without_auto_scaling_backs_up_under_no_group(world: World) -> None:
    world.with_autoscaling = False
    out = world.run(watcher_options(world, SPOT_TERMINATE, NOTICE_TIME))
    assert out.exit_code == 0
    key = the_backup(world)
    assert key.startswith(f"no-group/{INSTANCE}/")
    assert world.record() is not None


@pytest.mark.parametrize(
    ("kind", "max_duration", "status"),
    [(SPOT_TERMINATE, None, "partial"), (SPOT_TERMINATE, 600.0, "succeeded"), (SPOT_STOP, None, "succeeded")],
)
def test_a_spot_reclaim_archive_is_closed_at_100_seconds_unless_max_duration_says_otherwise(
    world: World, kind: str, max_duration: float | None, status: str
) -> None:
    # The archive starts 150 s into the job (a slow drain, say): past a reclaim's 100 s.
    world.configure(max_duration=max_duration)
    world.asg.set_state("InService")
    world.s3.before["CreateMultipartUpload"] = lambda: world.clock.sleep(150)
    out = world.run(watcher_options(world, kind, NOTICE_TIME))
    assert out.result.status == status
    manifest = json.loads(world.s3.body(str(out.result.key) + ".manifest.json"))
    left_out = manifest["totals"]["omitted"] + manifest["totals"]["cut_short"]
    assert (left_out > 0) == (status == "partial")


@pytest.mark.parametrize("kind", [SPOT_STOP, SPOT_HIBERNATE, REBALANCE])
def test_a_spot_stop_hibernate_or_rebalance_backs_up_only(world: World, kind: str) -> None:
    world.asg.set_state("InService")
    out = world.run(watcher_options(world, kind, NOTICE_TIME))
    assert out.exit_code == 0
    key = the_backup(world)
    msg = the_message(world)
    assert (msg["trigger"], msg["status"], msg["lifecycle_result"], msg["key"]) == (
        kind,
        "succeeded",
        "none",
        key,
    )
    assert world.asg.count("CompleteLifecycleAction") == 0
    assert world.asg.count("RecordLifecycleActionHeartbeat") == 0
    assert world.record() is None  # the instance comes back: a later termination needs its own


@pytest.mark.parametrize("kind", [SPOT_STOP, REBALANCE])
def test_a_stop_notice_then_a_real_termination_gets_a_second_archive(world: World, kind: str) -> None:
    world.asg.set_state("InService")
    world.run(watcher_options(world, kind, NOTICE_TIME))
    world.configure(prefix="later/")
    world.asg.set_state("Terminating:Wait")
    out = world.run(command_options(world, imds_state="Terminated"))
    assert out.result.status == "succeeded"
    assert len(world.archives()) == 2
    assert world.asg.completed == ["CONTINUE"]
