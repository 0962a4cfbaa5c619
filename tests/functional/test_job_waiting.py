"""Waiting: the deregistration delay, its poll backoff, --wait-timeout, Auto Scaling outages
while finding the action, and a stop that ends a wait. Every wait moves the fake clock."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from unit.fakes import connection_error

from functional.conftest import (
    TOKEN,
    command_options,
    leaving,
    no_backup,
    the_backup,
    the_message,
    watcher_options,
)
from functional.fakes import client_error
from instance_agent.poller import TERMINATION, WARM_RETURN

if TYPE_CHECKING:
    from functional.conftest import World


def test_the_backup_waits_out_the_deregistration_delay_and_holds_the_logs_written_meanwhile(
    world: World,
) -> None:
    # IMDS says Terminated while the load balancer drains: Auto Scaling still says InService,
    # then Terminating, and holds the instance in Terminating:Wait only after the delay.
    log = world.source / "logs" / "app.log"
    world.asg.set_state("InService")
    world.clock.after(20, lambda: world.asg.set_state("Terminating"))
    world.clock.after(150, lambda: log.write_bytes(log.read_bytes() + b"connection drained\n"))
    world.clock.after(300, lambda: world.asg.set_state("Terminating:Wait"))
    out = world.run(leaving(world))
    assert out.exit_code == 0
    key = the_backup(world)  # what is on disk now, the drained connection's line included
    assert b"connection drained\n" in world.archive_files(key)["logs/app.log"]
    assert world.clock.elapsed >= 300
    assert world.asg.completed == ["CONTINUE"]


def test_the_wait_for_the_wait_state_backs_off_from_2_to_15_seconds(world: World) -> None:
    world.asg.set_state("Terminating")
    world.clock.after(120, lambda: world.asg.set_state("Terminating:Wait"))
    world.run(leaving(world))
    assert world.cancel.waits[:6] == [2.0, 3.0, 4.5, 6.75, 10.125, 15.0]
    assert set(world.cancel.waits[6:]) == {15.0}
    # About 250 calls for a 3600 s delay, not 1,800: here a handful.
    assert world.asg.count("DescribeAutoScalingInstances") <= 14


def test_wait_timeout_backs_up_anyway_records_and_completes_nothing(world: World) -> None:
    world.configure(wait_timeout=600.0)
    world.asg.set_state("Terminating")  # the wait state never comes
    out = world.run(leaving(world))
    assert out.exit_code == 0
    the_backup(world)
    assert 580 <= world.clock.elapsed <= 600
    assert world.asg.count("CompleteLifecycleAction") == 0
    msg = the_message(world)
    assert "wait timeout" in msg["lifecycle_error"]
    assert (msg["status"], msg["lifecycle_result"]) == ("succeeded", "none")
    record = world.record()
    assert record is not None and record["backup_ok"] is True


def test_the_default_wait_timeout_is_3900_seconds(world: World) -> None:
    world.asg.set_state("Terminating")
    world.run(leaving(world))
    assert 3880 <= world.clock.elapsed <= 3900
    the_backup(world)


def test_run_command_with_a_token_waits_while_describe_still_says_in_service(world: World) -> None:
    world.configure(lifecycle_token=TOKEN)
    world.asg.set_state("InService")
    world.clock.after(10, lambda: world.asg.set_state("Terminating:Wait"))
    out = world.run(command_options(world))
    assert out.exit_code == 0
    the_backup(world)
    assert world.asg.completed == ["CONTINUE"]
    assert the_message(world)["action"] == "termination"


def test_an_operator_run_in_service_does_not_wait(world: World) -> None:
    world.asg.set_state("InService")
    world.run(command_options(world))
    assert world.cancel.waits == []
    assert world.clock.elapsed == 0


@pytest.mark.parametrize(
    "error",
    [
        lambda: client_error("Throttling", "Rate exceeded"),
        lambda: client_error("InternalFailure", "internal error", 500),
        connection_error,
    ],
)
def test_auto_scaling_outages_while_finding_the_action_are_retried_with_backoff(
    world: World, error: Callable[[], Exception]
) -> None:
    world.asg.errors["DescribeAutoScalingInstances"] = [error(), error(), error()]
    world.asg.set_state("Terminating:Wait")
    out = world.run(leaving(world))
    assert out.exit_code == 0
    assert world.cancel.waits[:3] == [1.0, 2.0, 4.0]
    the_backup(world)
    assert world.asg.completed == ["CONTINUE"]


def test_an_outage_longer_than_the_wait_timeout_backs_up_without_completing(world: World) -> None:
    world.configure(wait_timeout=120.0)
    world.asg.errors["DescribeAutoScalingInstances"] = [client_error("Throttling", "Rate exceeded")] * 100
    world.asg.set_state("Terminating:Wait")
    out = world.run(leaving(world))
    assert out.exit_code == 0
    the_backup(world)
    assert world.clock.elapsed <= 120
    assert world.asg.count("CompleteLifecycleAction") == 0
    assert "Throttling" in the_message(world)["lifecycle_error"]


def test_a_probe_that_is_throttled_is_retried_and_then_finds_the_action(world: World) -> None:
    world.asg.errors["RecordLifecycleActionHeartbeat"] = [client_error("Throttling", "Rate exceeded")] * 2
    world.asg.set_state("Terminating:Wait")
    out = world.run(leaving(world))
    assert out.exit_code == 0
    assert world.cancel.waits[:2] == [2.0, 4.0]
    assert world.asg.completed == ["CONTINUE"]


def test_a_stop_during_the_deregistration_wait_ends_the_run_without_a_backup(world: World) -> None:
    world.asg.set_state("Terminating")
    world.cancel.cancel_after(100)
    out = world.run(leaving(world))
    assert out.exit_code == 1
    assert out.result.status == "failed"
    assert "wait state" in (out.result.error or "")
    assert world.clock.elapsed < 120  # the wait returned on the stop
    no_backup(world)
    assert world.asg.count("CompleteLifecycleAction") == 0  # no live action was ever ours
    assert world.cloudwatch.values("BackupFailed") == [1.0]


def test_a_stop_while_auto_scaling_is_unreachable_ends_the_retries(world: World) -> None:
    world.asg.errors["DescribeAutoScalingInstances"] = [client_error("Throttling", "Rate exceeded")] * 100
    world.cancel.cancel_after(5)
    out = world.run(leaving(world))
    assert out.exit_code == 1
    assert world.clock.elapsed < 10
    no_backup(world)


def test_run_command_arriving_before_the_wait_state_completes_once_it_comes(world: World) -> None:
    world.asg.set_state("Terminating")  # IMDS says Terminated; Auto Scaling is not in Wait yet
    world.clock.after(4, lambda: world.asg.set_state("Terminating:Wait"))
    out = world.run(command_options(world, imds_state="Terminated"))
    assert out.exit_code == 0
    assert (out.result.lifecycle_result, out.result.lifecycle_error) == ("CONTINUE", None)
    assert world.asg.completed == ["CONTINUE"]
    assert world.asg.count("CompleteLifecycleAction") == 1  # no early, refused completion


@pytest.mark.parametrize(
    ("on_the_way", "wait_state", "kind", "notice", "archives"),
    [
        ("Terminating", "Terminating:Wait", TERMINATION, "Terminated", 1),
        ("Warmed:Terminating", "Warmed:Terminating:Wait", TERMINATION, "Warmed:Terminated", 1),
        ("Warmed:Pending", "Warmed:Pending:Wait", WARM_RETURN, "Warmed:Stopped", 0),
    ],
)
def test_every_state_on_the_way_is_waited_out_until_its_wait_state(
    world: World, on_the_way: str, wait_state: str, kind: str, notice: str, archives: int
) -> None:
    world.asg.set_state(on_the_way)
    world.clock.after(30, lambda: world.asg.set_state(wait_state))
    out = world.run(watcher_options(world, kind, notice))
    assert out.exit_code == 0
    assert world.clock.elapsed >= 30
    assert len(world.archives()) == archives  # a warm return backs up only when asked
    assert world.asg.completed == ["CONTINUE"]


def test_a_state_nobody_knows_is_treated_as_in_service(world: World) -> None:
    world.asg.set_state("Frobnicating:Wait")  # a state botocore's model does not list
    out = world.run(command_options(world))
    assert out.exit_code == 0
    assert (out.result.action, out.result.lifecycle_result) == ("none", "none")
    the_backup(world)
    assert world.asg.count("CompleteLifecycleAction") == 0
