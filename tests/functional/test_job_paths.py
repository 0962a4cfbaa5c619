"""Where the termination job goes from *Find* (docs/architecture.md, "A termination job" and
"Every lifecycle state, classified"): ad hoc, nothing to do, retained, probe live or not,
warm-pool return, root-volume replacement."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from functional.conftest import (
    INSTANCE,
    TOKEN,
    World,
    command_options,
    no_backup,
    the_backup,
    the_message,
    watcher_options,
)
from functional.fakes import client_error
from instance_agent.poller import TERMINATION, WARM_RETURN
from instance_agent.termination import Options

MakeOptions = Callable[[World], Options]

SERVING = ["InService", "Quarantined", "Standby", "EnteringStandby", "Detaching", "Detached"]
LAUNCHING = ["Pending", "Pending:Wait", "Pending:Proceed"]
WARMED = ["Warmed:Stopped", "Warmed:Running", "Warmed:Hibernated", "Warmed:Pending:Proceed"]
RETAINED = ["Terminating:Retained", "Warmed:Terminating:Retained", "Warmed:Pending:Retained"]
PAST_WAIT = ["Terminating:Proceed", "Terminated", "Warmed:Terminating:Proceed", "Warmed:Terminated"]


def completions(world: World) -> int:
    return world.asg.count("CompleteLifecycleAction")


# -- ad hoc -------------------------------------------------------------------------------------


AD_HOC = (
    [(state, "none") for state in SERVING + LAUNCHING + WARMED]
    + [(state, "retained") for state in RETAINED]
    + [(state, "replacing-root-volume") for state in ("RootVolumeReplaced", "ReplacingRootVolume:Proceed")]
)


@pytest.mark.parametrize(("state", "action"), AD_HOC)
def test_an_operator_backup_with_no_live_action_of_ours_is_ad_hoc(
    world: World, state: str, action: str
) -> None:
    # Not leaving, or retained (the operator's recovery path), or a root-volume replacement
    # past its wait: Run Command backs up, says what it found, and completes nothing.
    world.asg.set_state(state)
    out = world.run(command_options(world))
    assert out.exit_code == 0
    key = the_backup(world)
    msg = the_message(world)
    assert (msg["status"], msg["lifecycle_result"], msg["action"], msg["key"]) == (
        "succeeded",
        "none",
        action,
        key,
    )
    # Never the termination: no lock record, no heartbeat (a retained action cannot be
    # revived), no completion, and no TerminateInstanceInAutoScalingGroup.
    assert world.record() is None
    assert world.asg.count("RecordLifecycleActionHeartbeat") == 0
    assert completions(world) == 0
    assert world.asg.terminated == []


def test_an_ad_hoc_backup_is_counted_in_the_metrics(world: World) -> None:
    world.asg.set_state("InService")
    world.run(command_options(world))
    assert world.cloudwatch.values("BackupSucceeded") == [1.0]
    assert world.cloudwatch.values("LifecycleAbandoned") == [0.0]
    assert world.cloudwatch.values("BytesUploaded") == [float(world.messages()[0]["bytes_uploaded"])]


def test_an_instance_in_no_group_backs_up_under_no_group(world: World) -> None:
    world.asg.set_state(None)
    out = world.run(command_options(world))
    assert out.exit_code == 0
    key = the_backup(world)
    assert key.startswith(f"no-group/{INSTANCE}/")
    assert the_message(world)["group"] is None
    assert world.cloudwatch.calls == []  # metrics are per group


def test_with_no_complete_a_terminating_instance_is_backed_up_and_nothing_completed(world: World) -> None:
    world.configure(complete=False)
    world.asg.set_state("Terminating:Wait")
    out = world.run(command_options(world, imds_state="Terminated"))
    assert out.exit_code == 0
    the_backup(world)
    assert world.asg.count("RecordLifecycleActionHeartbeat") == completions(world) == 0


# -- nothing to do (watcher) --------------------------------------------------------------------


def nothing_happened(world: World, out: object) -> None:
    assert getattr(out, "exit_code") == 0
    assert getattr(out, "result").status == "skipped"
    no_backup(world)
    assert world.messages() == []
    assert world.cloudwatch.calls == []
    assert completions(world) == 0
    assert world.record() is None


@pytest.mark.parametrize("imds", ["Warmed:Stopped", "Warmed:Running", "Warmed:Hibernated"])
def test_a_launch_into_the_warm_pool_does_nothing(world: World, imds: str) -> None:
    # A launching hook holds the instance: the probe of our terminating hook finds nothing.
    world.asg.set_state("Warmed:Pending:Wait")
    world.asg.live = False
    nothing_happened(world, world.run(watcher_options(world, WARM_RETURN, imds)))
    assert world.asg.count("RecordLifecycleActionHeartbeat") == 1  # the probe, and only it


@pytest.mark.parametrize("state", WARMED)
def test_a_warmed_notice_after_its_hooks_does_nothing(world: World, state: str) -> None:
    world.asg.set_state(state)
    nothing_happened(world, world.run(watcher_options(world, WARM_RETURN, "Warmed:Stopped")))


@pytest.mark.parametrize("state", RETAINED)
def test_a_watcher_notice_on_a_retained_instance_with_no_record_backs_up_once(
    world: World, state: str
) -> None:
    """No record at all: the watcher died before it recorded (killed mid-backup, and the hook
    timed out with ABANDON while it was down), or never ran. The instance's disks are still
    there, and a second archive beats none (as after a killed run, docs/architecture.md): one
    backup, reported with action `retained`; nothing completed, nothing let go, since the
    retention may be another hook's. It used to do nothing, and no one backed it up."""
    world.asg.set_state(state)
    out = world.run(watcher_options(world, TERMINATION, "Terminated"))
    key = the_backup(world)
    assert (out.exit_code, out.result.status, out.result.key) == (0, "succeeded", key)
    msg = the_message(world)
    assert (msg["status"], msg["action"], msg["key"]) == ("succeeded", "retained", key)
    assert completions(world) == 0
    assert world.asg.terminated == []


@pytest.mark.parametrize("state", ["ReplacingRootVolume:Proceed", "RootVolumeReplaced"])
def test_a_root_volume_replacement_with_no_action_of_ours_does_nothing_for_the_watcher(
    world: World, state: str
) -> None:
    world.asg.set_state(state)
    nothing_happened(world, world.run(watcher_options(world, TERMINATION, "Terminated")))


# -- probe: live, not live ----------------------------------------------------------------------


@pytest.mark.parametrize("state", ["Terminating:Wait", "Warmed:Terminating:Wait"])
@pytest.mark.parametrize(
    "opts",
    [lambda w: watcher_options(w, TERMINATION, "Terminated"), lambda w: command_options(w)],
    ids=["watcher", "run-command"],
)
def test_a_live_terminating_action_is_backed_up_then_completed_continue_once(
    world: World, state: str, opts: MakeOptions
) -> None:
    world.asg.set_state(state)
    out = world.run(opts(world))
    assert out.exit_code == 0
    key = the_backup(world)
    assert world.asg.completed == ["CONTINUE"]
    assert completions(world) == 1
    msg = the_message(world)
    assert (msg["status"], msg["action"], msg["lifecycle_result"], msg["key"]) == (
        "succeeded",
        "termination",
        "CONTINUE",
        key,
    )
    record = world.record()
    assert record is not None
    assert (record["backup_ok"], record["completed"], record["lifecycle_result"], record["exit_code"]) == (
        True,
        True,
        "CONTINUE",
        0,
    )
    assert record["result"]["key"] == key


def test_run_command_with_a_token_completes_by_token_and_records_its_fingerprint(world: World) -> None:
    world.configure(lifecycle_token=TOKEN, asg_name="web", hook_name="drain")
    world.asg.set_state("Terminating:Wait")
    out = world.run(command_options(world))
    assert out.exit_code == 0
    the_backup(world)
    (call,) = [kw for name, kw in world.asg.calls if name == "CompleteLifecycleAction"]
    assert call["LifecycleActionToken"] == TOKEN
    assert "InstanceId" not in call
    record = world.record()
    assert record is not None and record["action"] == out.result.lifecycle_action
    assert TOKEN not in str(world.messages())  # the token never leaves the instance


def test_a_wait_state_whose_action_is_not_live_is_backed_up_recorded_and_completes_nothing(
    world: World,
) -> None:
    # Answered elsewhere or expired: the backup still beats none, and it is the termination.
    world.asg.set_state("Terminating:Wait")
    world.asg.live = False
    out = world.run(watcher_options(world, TERMINATION, "Terminated"))
    assert out.exit_code == 0
    the_backup(world)
    assert completions(world) == 0
    msg = the_message(world)
    assert (msg["action"], msg["lifecycle_result"]) == ("gone", "none")
    assert msg["lifecycle_error"]
    record = world.record()
    assert record is not None and record["backup_ok"] is True


@pytest.mark.parametrize("state", PAST_WAIT)
def test_a_watcher_notice_past_the_wait_backs_up_and_completes_nothing(world: World, state: str) -> None:
    world.asg.set_state(state)
    out = world.run(watcher_options(world, TERMINATION, "Terminated"))
    assert out.exit_code == 0
    the_backup(world)
    assert completions(world) == 0
    assert world.asg.count("RecordLifecycleActionHeartbeat") == 0
    assert the_message(world)["action"] == "gone"
    assert world.record() is not None


def test_no_terminating_hook_in_the_group_still_backs_up_a_leaving_instance(world: World) -> None:
    world.asg.hooks = []
    world.asg.set_state("Terminating:Wait")
    out = world.run(watcher_options(world, TERMINATION, "Terminated"))
    assert out.exit_code == 0
    the_backup(world)
    assert completions(world) == 0
    assert world.record() is not None


def test_several_terminating_hooks_without_hook_name_back_up_a_leaving_instance_anyway(world: World) -> None:
    second = {**world.asg.hooks[0], "LifecycleHookName": "other"}
    world.asg.hooks = [*world.asg.hooks, second]
    world.asg.set_state("Terminating:Wait")
    out = world.run(watcher_options(world, TERMINATION, "Terminated"))
    assert out.exit_code == 0
    the_backup(world)
    assert completions(world) == 0
    assert "set --hook-name" in the_message(world)["lifecycle_error"]


def test_an_operator_run_that_cannot_find_its_hook_fails_without_a_backup(world: World) -> None:
    world.configure(hook_name="missing")
    world.asg.set_state("InService")
    out = world.run(command_options(world))
    assert out.exit_code == 1
    assert out.result.status == "failed"
    no_backup(world)
    assert completions(world) == 0


def test_access_denied_on_discovery_backs_up_a_leaving_instance_anyway(world: World) -> None:
    world.asg.errors["DescribeAutoScalingInstances"] = [client_error("AccessDenied", "not allowed", 403)]
    world.asg.set_state("Terminating:Wait")
    out = world.run(watcher_options(world, TERMINATION, "Terminated"))
    assert out.exit_code == 0
    the_backup(world)
    assert completions(world) == 0
    assert "AccessDenied" in the_message(world)["lifecycle_error"]
    assert world.record() is not None


# -- warm-pool return ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts",
    [lambda w: watcher_options(w, WARM_RETURN, "Warmed:Stopped"), lambda w: command_options(w)],
    ids=["watcher", "run-command"],
)
def test_a_warm_pool_return_completes_continue_with_no_backup_and_no_record(
    world: World, opts: MakeOptions
) -> None:
    world.asg.set_state("Warmed:Pending:Wait")
    out = world.run(opts(world))
    assert out.exit_code == 0
    no_backup(world)
    assert world.asg.completed == ["CONTINUE"]
    assert (out.result.status, out.result.lifecycle_result) == ("skipped", "CONTINUE")
    msg = the_message(world)
    assert (msg["status"], msg["action"]) == ("skipped", "warm-pool-return")
    # The report announces the completion it precedes, as a termination's does.
    assert msg["lifecycle_result"] == "CONTINUE"
    assert world.record() is None  # the real termination comes later


def test_a_warm_pool_return_with_warm_pool_backup_archives_then_completes_continue(world: World) -> None:
    world.configure(warm_pool_backup=True)
    world.asg.set_state("Warmed:Pending:Wait")
    out = world.run(watcher_options(world, WARM_RETURN, "Warmed:Stopped"))
    assert out.exit_code == 0
    key = the_backup(world)
    assert world.asg.completed == ["CONTINUE"]
    msg = the_message(world)
    assert (msg["status"], msg["action"], msg["key"]) == ("succeeded", "warm-pool-return", key)
    assert msg["lifecycle_result"] == "CONTINUE"
    assert world.record() is None


def test_a_warm_pool_return_whose_backup_fails_still_continues_and_exits_1(world: World) -> None:
    world.configure(warm_pool_backup=True)
    world.s3.errors["CreateMultipartUpload"] = [client_error("AccessDenied", "Access Denied", 403)]
    world.asg.set_state("Warmed:Pending:Wait")
    out = world.run(watcher_options(world, WARM_RETURN, "Warmed:Stopped"))
    assert out.exit_code == 1
    no_backup(world)
    assert world.asg.completed == ["CONTINUE"]  # the instance and its disks live on
    assert the_message(world)["status"] == "failed"


# -- root-volume replacement --------------------------------------------------------------------


def test_a_root_volume_replacement_held_by_our_hook_is_backed_up_then_continued(world: World) -> None:
    world.asg.set_state("ReplacingRootVolume:Wait")
    out = world.run(watcher_options(world, TERMINATION, "Terminated"))
    assert out.exit_code == 0
    key = the_backup(world)
    assert world.asg.completed == ["CONTINUE"]
    msg = the_message(world)
    assert (msg["action"], msg["lifecycle_result"], msg["key"]) == ("root-volume", "CONTINUE", key)
    assert world.record() is None  # the state dir is on the volume that goes


def test_a_root_volume_backup_that_fails_completes_on_failure_and_is_never_retained(world: World) -> None:
    world.s3.errors["CreateMultipartUpload"] = [client_error("AccessDenied", "Access Denied", 403)]
    world.asg.set_state("ReplacingRootVolume:Wait")
    world.asg.after_complete["ABANDON"] = ["Terminating:Proceed", "Terminating:Retained"]
    out = world.run(watcher_options(world, TERMINATION, "Terminated"))
    assert out.exit_code == 1
    no_backup(world)
    assert world.asg.completed == ["ABANDON"]
    msg = the_message(world)
    assert (msg["status"], msg["lifecycle_result"]) == ("failed", "ABANDON")
    assert world.asg.terminated == []
    assert world.record() is None


def test_run_command_with_a_token_waits_in_replacing_root_volume_for_the_wait(world: World) -> None:
    world.configure(lifecycle_token=TOKEN)
    world.asg.set_state("ReplacingRootVolume")
    world.clock.after(40, lambda: world.asg.set_state("ReplacingRootVolume:Wait"))
    out = world.run(command_options(world))
    assert out.exit_code == 0
    the_backup(world)
    assert world.clock.elapsed >= 40
    assert world.asg.completed == ["CONTINUE"]
    assert the_message(world)["action"] == "root-volume"


def test_an_operator_backup_during_the_replacement_wait_completes_it_too(world: World) -> None:
    world.asg.set_state("ReplacingRootVolume:Wait")  # no token: found by the instance id
    out = world.run(command_options(world))
    assert out.exit_code == 0
    the_backup(world)
    assert world.asg.completed == ["CONTINUE"]
    assert (out.result.action, out.result.lifecycle_result) == ("root-volume", "CONTINUE")


# -- the drain gate: the watcher's, never an operator's ------------------------------------------


def test_the_watchers_termination_runs_the_drain_gate_first(world: World) -> None:
    world.configure(drain_path=(str(world.tmp / "busy.marker"),))  # not there: drained
    world.asg.set_state("Terminating:Wait")
    world.run(watcher_options(world, TERMINATION, "Terminated"))
    drain = the_message(world)["drain"]
    assert (drain["drained"], drain["busy"]) == (True, [])


def test_an_operators_ad_hoc_backup_never_runs_the_drain_gate(world: World) -> None:
    marker = world.tmp / "busy.marker"
    marker.write_text("a job in flight")
    # A short timeout: were the gate to run, it would show in the report after 1 s.
    world.configure(drain_path=(str(marker),), drain_timeout=1.0)
    world.asg.set_state("InService")
    out = world.run(command_options(world))
    assert out.exit_code == 0
    assert the_message(world).get("drain") is None  # the application was never asked to stop
    the_backup(world)
