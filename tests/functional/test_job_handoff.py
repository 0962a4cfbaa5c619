"""The state hand-off (docs/architecture.md, "State hand-off"): on a termination the hand-off
paths go out first as an archive of their own, then the full backup; a hand-off that fails
fails the job (--on-failure) though the full backup still lands."""

from __future__ import annotations

from functional.conftest import World, command_options, the_message, watcher_options
from functional.fakes import client_error
from instance_agent.poller import TERMINATION


def hand_off_app(world: World) -> dict[str, bytes]:
    world.configure(handoff_path=(str(world.source / "app"),))
    world.asg.set_state("Terminating:Wait")
    return {k: v for k, v in world.on_disk().items() if k.startswith("app/")}


def split(world: World) -> tuple[list[str], list[str]]:
    handoffs = [k for k in world.archives() if "/handoff/" in k]
    return handoffs, [k for k in world.archives() if k not in handoffs]


def test_a_termination_hands_off_its_state_then_backs_up_everything(world: World) -> None:
    state = hand_off_app(world)
    out = world.run(watcher_options(world, TERMINATION, "Terminated"))
    assert out.exit_code == 0
    (handoff,), (full,) = split(world)
    assert world.archive_files(handoff) == state  # the hand-off paths, and only them
    assert world.archive_files(full) == world.on_disk()
    msg = the_message(world)
    assert (msg["handoff_key"], msg["key"], msg["status"]) == (handoff, full, "succeeded")
    assert world.asg.completed == ["CONTINUE"]


def test_a_hand_off_that_fails_fails_the_job_though_the_full_backup_lands(world: World) -> None:
    hand_off_app(world)
    world.s3.errors["CreateMultipartUpload"] = [client_error("AccessDenied", "Access Denied", 403)]
    out = world.run(watcher_options(world, TERMINATION, "Terminated"))
    assert out.exit_code == 1
    handoffs, (full,) = split(world)
    assert handoffs == []
    assert world.archive_files(full) == world.on_disk()
    msg = the_message(world)
    assert (msg["status"], msg["lifecycle_result"]) == ("failed", "ABANDON")
    assert world.asg.completed == ["ABANDON"]


def test_an_operators_ad_hoc_backup_hands_off_nothing(world: World) -> None:
    hand_off_app(world)
    world.asg.set_state("InService")
    out = world.run(command_options(world))
    assert out.exit_code == 0
    handoffs, fulls = split(world)
    assert (handoffs, len(fulls)) == ([], 1)
    assert out.result.handoff_key is None
