"""Retained instances (docs/architecture.md, "Retained instances"): after an ABANDON the group
keeps the instance, and the watcher retries the backup until it lands, then lets it go."""

from __future__ import annotations

from functional.conftest import World, command_options, no_backup, the_backup, watcher_options
from functional.fakes import client_error
from instance_agent.poller import TERMINATION

RETAINED = "Terminating:Retained"


def denied(n: int) -> list[Exception]:
    return [client_error("AccessDenied", "Access Denied", 403) for _ in range(n)]


def retain_policy(world: World, proceeding: int = 2) -> None:
    """TerminateHookAbandon: retain. An ABANDON leaves the instance retained, after
    `proceeding` looks at it in Terminating:Proceed ("Manage retained instances": the wait's
    actions wrap up first)."""
    world.asg.after_complete["ABANDON"] = ["Terminating:Proceed"] * proceeding + [RETAINED]


def events(world: World) -> list[tuple[object, object]]:
    return [(m.get("event"), m["status"]) for m in world.messages()]


def test_a_retained_instance_is_retried_until_the_backup_lands_then_terminated_once(world: World) -> None:
    retain_policy(world)
    world.s3.errors["CreateMultipartUpload"] = denied(1)  # the first archive only
    world.asg.set_state("Terminating:Wait")
    out = world.run(watcher_options(world, TERMINATION, "Terminated"))
    assert world.asg.completed == ["ABANDON"]
    key = the_backup(world)
    # The watcher's outcome is the backup that landed, as when it takes over after Run
    # Command's ABANDON: its "response finished" line and the status file say so.
    assert (out.exit_code, out.result.status, out.result.key) == (0, "succeeded", key)
    assert world.asg.terminated == [
        {"InstanceId": world.ident.instance_id, "ShouldDecrementDesiredCapacity": False}
    ]
    assert events(world) == [
        (None, "failed"),
        ("instance_retained", "retained"),
        ("retained_recovered", "succeeded"),
    ]
    first, found, recovered = world.messages()
    assert first["lifecycle_result"] == "ABANDON" and "AccessDenied" in first["error"]
    assert found["attempts"] == 0
    assert (recovered["key"], recovered["attempts"]) == (key, 1)
    assert world.cancel.waits[-1] == 30.0  # retain_first_retry
    assert world.cloudwatch.values("InstanceRetained") == [1.0, 1.0]
    assert world.cloudwatch.values("RetainedRecovered") == [1.0]


def test_retries_back_off_doubling_from_retain_first_retry(world: World) -> None:
    retain_policy(world)
    world.configure(retain_first_retry=10.0)
    world.s3.errors["CreateMultipartUpload"] = denied(4)  # the first archive and three retries
    world.asg.set_state("Terminating:Wait")
    world.run(watcher_options(world, TERMINATION, "Terminated"))
    assert world.cancel.waits[-4:] == [10.0, 20.0, 40.0, 80.0]
    the_backup(world)
    assert world.messages()[-1]["attempts"] == 4
    assert len(world.asg.terminated) == 1


def test_retries_stop_when_retain_retry_for_is_spent(world: World) -> None:
    retain_policy(world)
    world.configure(retain_retry_for=100.0)
    world.s3.errors["CreateMultipartUpload"] = denied(100)
    world.asg.set_state("Terminating:Wait")
    out = world.run(watcher_options(world, TERMINATION, "Terminated"))
    assert out.exit_code == 1
    no_backup(world)
    assert world.asg.terminated == []
    assert events(world) == [
        (None, "failed"),
        ("instance_retained", "retained"),
        ("retained_gave_up", "retained"),
    ]
    assert world.messages()[-1]["attempts"] == 2  # at 30 s and 90 s; a third would start after 100 s
    assert world.clock.elapsed <= 100


def test_retries_end_when_someone_else_lets_the_instance_go(world: World) -> None:
    retain_policy(world)
    world.s3.errors["CreateMultipartUpload"] = denied(100)
    world.asg.set_state("Terminating:Wait")
    world.clock.after(10, lambda: world.asg.set_state("Terminating:Proceed"))
    world.run(watcher_options(world, TERMINATION, "Terminated"))
    assert world.s3.count("CreateMultipartUpload") == 1  # no retry once released
    assert world.asg.terminated == []


def test_a_stop_ends_the_retries(world: World) -> None:
    retain_policy(world)
    world.s3.errors["CreateMultipartUpload"] = denied(100)
    world.asg.set_state("Terminating:Wait")
    world.cancel.cancel_after(10)
    out = world.run(watcher_options(world, TERMINATION, "Terminated"))
    assert out.exit_code == 1
    assert world.s3.count("CreateMultipartUpload") == 1
    assert world.asg.terminated == []


def test_without_the_retain_policy_abandon_ends_it_as_before(world: World) -> None:
    world.s3.errors["CreateMultipartUpload"] = denied(1)
    world.asg.set_state("Terminating:Wait")
    out = world.run(watcher_options(world, TERMINATION, "Terminated"))
    assert out.exit_code == 1
    assert world.asg.completed == ["ABANDON"]
    assert events(world) == [(None, "failed")]
    assert world.asg.terminated == []
    no_backup(world)


def run_command_abandons(world: World) -> None:
    retain_policy(world)
    world.s3.errors["CreateMultipartUpload"] = denied(1)
    world.asg.set_state("Terminating:Wait")
    out = world.run(command_options(world))
    assert (out.exit_code, out.result.status, world.asg.completed) == (1, "failed", ["ABANDON"])
    # Run Command's execution timeout could not hold hours of retries: it does not retry.
    assert world.asg.terminated == []
    assert events(world) == [(None, "failed")]


def test_after_run_commands_abandon_the_watcher_notice_on_the_retained_instance_retries(world: World) -> None:
    run_command_abandons(world)
    world.asg.set_state(RETAINED)  # the notice comes once the instance is retained
    out = world.run(watcher_options(world, TERMINATION, "Terminated"))
    assert (out.exit_code, out.result.status) == (0, "succeeded")
    key = the_backup(world)
    assert out.result.key == key
    assert len(world.asg.terminated) == 1
    assert world.asg.completed == ["ABANDON"]  # nothing completed again
    assert events(world)[1:] == [("instance_retained", "retained"), ("retained_recovered", "succeeded")]


def test_after_run_commands_abandon_a_watcher_duplicate_retries_once_the_instance_is_retained(
    world: World,
) -> None:
    run_command_abandons(world)
    # The watcher's notice finds the action over (Terminating:Proceed) and the record under
    # the lock: a duplicate, and then the instance shows up retained.
    world.asg.states = ["Terminating:Proceed", "Terminating:Proceed", RETAINED]
    out = world.run(watcher_options(world, TERMINATION, "Terminated"))
    # The backup that landed is the outcome, with its exit code (not the first run's 1).
    assert (out.exit_code, out.result.status) == (0, "succeeded")
    the_backup(world)
    assert len(world.asg.terminated) == 1
    assert world.asg.count("CompleteLifecycleAction") == 1


def test_a_retained_instance_abandoned_by_someone_else_is_left_alone(world: World) -> None:
    world.write_record(backup_ok=True, lifecycle_result="CONTINUE", completed=True)
    world.asg.set_state(RETAINED)
    out = world.run(watcher_options(world, TERMINATION, "Terminated"))
    assert out.result.status == "skipped"
    no_backup(world)
    assert world.asg.terminated == []


def test_a_backup_that_landed_after_its_action_expired_lets_the_retained_instance_go(world: World) -> None:
    """A heartbeat or global timeout whose DefaultResult is ABANDON retains the instance too
    ("Configure instance retention"). The backup is in S3, so the watcher lets it go at once:
    before, the instance stayed retained and billed, and nothing would ever release it."""
    world.asg.set_state("Terminating:Wait")
    world.asg.expired_at_completion = ["Terminating:Proceed", "Terminating:Proceed", RETAINED]
    out = world.run(watcher_options(world, TERMINATION, "Terminated"))
    key = the_backup(world)
    assert (out.exit_code, out.result.status, out.result.key) == (0, "succeeded", key)
    assert out.result.lifecycle_result == "none" and world.asg.completed == []
    assert world.asg.terminated == [
        {"InstanceId": world.ident.instance_id, "ShouldDecrementDesiredCapacity": False}
    ]
    assert events(world) == [(None, "succeeded"), ("retained_recovered", "succeeded")]
    released = world.messages()[1]
    assert (released["key"], released["attempts"]) == (key, 0)
    assert world.cloudwatch.values("InstanceRetained") == [1.0]
    assert world.cloudwatch.values("RetainedRecovered") == [1.0]
    assert world.s3.count("CreateMultipartUpload") == 1  # no second archive


def test_a_backup_that_landed_after_its_action_expired_terminates_as_before_without_retention(
    world: World,
) -> None:
    world.asg.set_state("Terminating:Wait")
    world.asg.expired_at_completion = ["Terminating:Proceed", None]  # gone from the group
    out = world.run(watcher_options(world, TERMINATION, "Terminated"))
    assert (out.exit_code, out.result.status) == (0, "succeeded")
    the_backup(world)
    assert world.asg.terminated == []
    assert events(world) == [(None, "succeeded")]
    assert world.cloudwatch.values("InstanceRetained") == []


def test_a_backup_that_landed_on_an_instance_another_hook_retains_is_left_to_the_operator(
    world: World,
) -> None:
    """Another terminating hook's ABANDON ends ours too and retains the instance for that
    hook's owner: the agent must not terminate it, only say that it is retained."""
    world.asg.hooks.append(
        {"LifecycleHookName": "app-drain", "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING"}
    )
    world.configure(hook_name="drain")  # two terminating hooks: ours is named
    world.asg.set_state("Terminating:Wait")
    world.asg.expired_at_completion = ["Terminating:Proceed", RETAINED]
    out = world.run(watcher_options(world, TERMINATION, "Terminated"))
    key = the_backup(world)
    assert (out.exit_code, out.result.status) == (0, "succeeded")
    assert world.asg.terminated == []
    assert events(world) == [(None, "succeeded"), ("instance_retained", "retained")]
    held = world.messages()[1]
    assert held["key"] == key and "another terminating hook" in held["reason"]
    assert world.cloudwatch.values("InstanceRetained") == [1.0]
    assert world.cloudwatch.values("RetainedRecovered") == []
