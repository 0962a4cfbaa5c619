"""One instance, several lifecycle actions in a row: each gets its own archive and its own
completion, and nothing that was not a termination counts as one."""

from __future__ import annotations

from functional.conftest import TOKEN, World, command_options, watcher_options
from instance_agent.poller import SPOT_STOP, TERMINATION


def next_archive(world: World, n: int) -> None:
    # Keys have one-second resolution; a prefix per run keeps them apart without a real
    # sleep (see test_job_once.second_archive_prefix).
    world.configure(prefix=f"run{n}/")


def test_an_ad_hoc_run_then_the_real_termination_two_archives_one_continue(world: World) -> None:
    world.asg.set_state("InService")
    adhoc = world.run(command_options(world))
    assert (adhoc.result.status, adhoc.result.lifecycle_result, adhoc.result.action) == (
        "succeeded",
        "none",
        "none",
    )
    assert world.asg.completed == []
    next_archive(world, 2)
    world.asg.set_state("Terminating:Wait")  # the scale-in
    real = world.run(command_options(world))
    assert (real.result.status, real.result.lifecycle_result) == ("succeeded", "CONTINUE")
    assert world.archives() == sorted([str(adhoc.result.key), str(real.result.key)])
    assert world.asg.completed == ["CONTINUE"]


def test_a_warm_pool_return_then_a_scale_in_two_archives_two_continues(world: World) -> None:
    world.configure(warm_pool_backup=True, lifecycle_token=TOKEN)
    world.asg.set_state("Warmed:Pending:Wait")
    world.asg.after_complete["CONTINUE"] = ["Warmed:Stopped"]
    first = world.run(command_options(world, imds_state="Warmed:Stopped"))
    assert (first.result.action, first.result.lifecycle_result) == ("warm-pool-return", "CONTINUE")
    assert world.record() is None  # not the termination
    # Back in service, then a real scale-in, answered the watcher's way (no token): the
    # completed first action must not make it a duplicate.
    world.configure(lifecycle_token=None)
    next_archive(world, 2)
    world.asg.live = True
    world.asg.set_state("Terminating:Wait")
    second = world.run(watcher_options(world, TERMINATION, "Terminated"))
    assert (second.result.status, second.result.lifecycle_result) == ("succeeded", "CONTINUE")
    assert world.archives() == sorted([str(first.result.key), str(second.result.key)])
    assert world.asg.completed == ["CONTINUE", "CONTINUE"]
    assert [m["action"] for m in world.messages()] == ["warm-pool-return", "termination"]


def test_a_root_volume_replacement_then_the_termination_gets_its_own_archive(world: World) -> None:
    world.configure(lifecycle_token=TOKEN)
    world.asg.set_state("ReplacingRootVolume:Wait")
    world.asg.after_complete["CONTINUE"] = ["InService"]
    rrv = world.run(command_options(world))
    assert (rrv.result.action, rrv.result.lifecycle_result) == ("root-volume", "CONTINUE")
    world.configure(lifecycle_token=None)
    next_archive(world, 2)
    world.asg.live = True
    world.asg.set_state("Terminating:Wait")
    real = world.run(command_options(world))
    assert (real.result.action, real.result.lifecycle_result) == ("termination", "CONTINUE")
    assert len(world.archives()) == 2
    assert world.asg.completed == ["CONTINUE", "CONTINUE"]
    assert [m["action"] for m in world.messages()] == ["root-volume", "termination"]


def test_a_spot_stop_then_the_termination_reports_both_and_completes_once(world: World) -> None:
    world.asg.set_state("InService")
    stopped = world.run(watcher_options(world, SPOT_STOP, "2026-12-04T22:00:00Z"))
    next_archive(world, 2)
    world.asg.set_state("Terminating:Wait")
    terminated = world.run(watcher_options(world, TERMINATION, "Terminated"))
    assert world.archives() == sorted([str(stopped.result.key), str(terminated.result.key)])
    assert [m["trigger"] for m in world.messages()] == ["spot-stop", "termination"]
    assert world.asg.completed == ["CONTINUE"]
