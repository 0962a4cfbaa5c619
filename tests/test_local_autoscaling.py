"""moto with terminate lifecycle hooks behaves like AWS for the calls the agent makes.

moto's backends are shared by the whole test process, so each test works in its own
uniquely named group and reads the lifecycle records of that group only.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from instance_agent.local import autoscaling, retention
from instance_agent.local.autoscaling import LifecycleCall, LifecycleOutcome
from instance_agent.local.moto_server import MotoServer

HOOK = "backup-on-terminate"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
NO_RETRIES = Config(retries={"total_max_attempts": 1})


class FakeClock:
    """Starts at the real monotonic time, so other groups' deadlines keep their meaning."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    server: MotoServer
    group: str
    asg: Any
    ec2: Any
    clock: FakeClock


@pytest.fixture(scope="module")
def moto_server() -> Iterator[MotoServer]:
    # No reset: another server of this process (a session fixture) may hold state.
    with MotoServer(reset=False) as running:
        yield running


@pytest.fixture
def env(moto_server: MotoServer) -> Iterator[Env]:
    server = moto_server
    group = f"web-{uuid.uuid4().hex[:10]}"
    clock = FakeClock()
    autoscaling.set_clock(clock)
    asg = boto3.client("autoscaling", endpoint_url=server.endpoint, config=NO_RETRIES)
    ec2 = boto3.client("ec2", endpoint_url=server.endpoint, config=NO_RETRIES)
    ec2.create_launch_template(
        LaunchTemplateName=f"lt-{group}",
        LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "t3.micro"},
    )
    asg.create_auto_scaling_group(
        AutoScalingGroupName=group,
        LaunchTemplate={"LaunchTemplateName": f"lt-{group}"},
        MinSize=0,
        MaxSize=4,
        DesiredCapacity=2,
        AvailabilityZones=["us-east-1a"],
    )
    yield Env(server, group, asg, ec2, clock)
    autoscaling.set_clock(time.monotonic)


def put_hook(env: Env, name: str = HOOK, timeout: int = 60, default: str = "CONTINUE") -> None:
    env.asg.put_lifecycle_hook(
        AutoScalingGroupName=env.group,
        LifecycleHookName=name,
        LifecycleTransition=TERMINATING,
        HeartbeatTimeout=timeout,
        DefaultResult=default,
    )


def states(env: Env) -> dict[str, str]:
    instances = env.asg.describe_auto_scaling_instances()["AutoScalingInstances"]
    return {i["InstanceId"]: i["LifecycleState"] for i in instances if i["AutoScalingGroupName"] == env.group}


def calls(env: Env) -> list[LifecycleCall]:
    return autoscaling.calls(group=env.group)


def outcomes(env: Env) -> list[LifecycleOutcome]:
    return autoscaling.outcomes(group=env.group)


def active(env: Env) -> list[autoscaling.ActiveAction]:
    return autoscaling.active_actions(group=env.group)


def group_states(env: Env) -> dict[str, str]:
    group = env.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[env.group])
    return {i["InstanceId"]: i["LifecycleState"] for i in group["AutoScalingGroups"][0]["Instances"]}


def ec2_state(env: Env, instance_id: str) -> str:
    reservations = env.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return str(reservations[0]["Instances"][0]["State"]["Name"])


def scale_in(env: Env) -> str:
    """Lower the desired capacity by one; return the instance now waiting."""
    env.asg.set_desired_capacity(AutoScalingGroupName=env.group, DesiredCapacity=1)
    waiting = [i for i, s in states(env).items() if s == "Terminating:Wait"]
    assert len(waiting) == 1
    return waiting[0]


def complete(env: Env, hook: str = HOOK, result: str = "CONTINUE", **ident: str) -> None:
    env.asg.complete_lifecycle_action(
        AutoScalingGroupName=env.group, LifecycleHookName=hook, LifecycleActionResult=result, **ident
    )


def heartbeat(env: Env, hook: str = HOOK, **ident: str) -> None:
    env.asg.record_lifecycle_action_heartbeat(AutoScalingGroupName=env.group, LifecycleHookName=hook, **ident)


def error_of(call: Any, *args: Any, **kwargs: Any) -> tuple[str, str]:
    with pytest.raises(ClientError) as info:
        call(*args, **kwargs)
    error = info.value.response["Error"]
    return error["Code"], error["Message"]


def test_scale_in_waits_for_the_hook(env: Env) -> None:
    put_hook(env)
    waiting = scale_in(env)
    assert sorted(states(env).values()) == ["InService", "Terminating:Wait"]
    assert group_states(env) == states(env)
    assert ec2_state(env, waiting) == "running"
    # No replacement: the desired capacity already counts the leaving instance out.
    # Only this group's instances: moto's EC2 state is shared by every test in the process.
    running = env.ec2.describe_instances(
        Filters=[
            {"Name": "instance-state-name", "Values": ["running"]},
            {"Name": "tag:aws:autoscaling:groupName", "Values": [env.group]},
        ]
    )["Reservations"]
    assert sum(len(r["Instances"]) for r in running) == 2
    [action] = active(env)
    assert (action.group, action.hook, action.instance_id) == (env.group, HOOK, waiting)
    assert action.deadline == env.clock.now + 60


def test_heartbeat_then_complete_terminates(env: Env) -> None:
    put_hook(env)
    waiting = scale_in(env)
    heartbeat(env, InstanceId=waiting)
    complete(env, InstanceId=waiting)

    assert waiting not in states(env)
    assert list(states(env).values()) == ["InService"]
    assert ec2_state(env, waiting) == "terminated"
    assert active(env) == []
    assert outcomes(env) == [LifecycleOutcome(waiting, HOOK, "CONTINUE", "completed")]

    no_action = f"No active Lifecycle Action found with instance ID {waiting}"
    assert error_of(complete, env, InstanceId=waiting) == ("ValidationError", no_action)
    assert error_of(heartbeat, env, InstanceId=waiting) == ("ValidationError", no_action)
    assert calls(env) == [
        LifecycleCall(autoscaling.HEARTBEAT, env.group, HOOK, waiting, None, None, "ok"),
        LifecycleCall(autoscaling.COMPLETE, env.group, HOOK, waiting, None, "CONTINUE", "ok"),
        LifecycleCall(autoscaling.COMPLETE, env.group, HOOK, waiting, None, "CONTINUE", no_action),
        LifecycleCall(autoscaling.HEARTBEAT, env.group, HOOK, waiting, None, None, no_action),
    ]


def test_by_token(env: Env) -> None:
    put_hook(env)
    waiting = scale_in(env)
    [action] = active(env)
    bogus = "0e5d1a3c-0000-4000-8000-000000000000"
    assert error_of(complete, env, LifecycleActionToken=bogus) == (
        "ValidationError",
        f"No active Lifecycle Action found with token {bogus}",
    )
    heartbeat(env, LifecycleActionToken=action.token)
    complete(env, result="ABANDON", LifecycleActionToken=action.token)
    assert ec2_state(env, waiting) == "terminated"
    assert error_of(heartbeat, env, LifecycleActionToken=action.token) == (
        "ValidationError",
        f"No active Lifecycle Action found with token {action.token}",
    )
    assert [c.outcome == "ok" for c in calls(env)] == [False, True, True, False]


def test_early_completion_fails_until_wait(env: Env) -> None:
    """AWS deregisters from load balancers before running hooks: completion fails meanwhile."""
    put_hook(env)
    first = next(iter(states(env)))
    autoscaling.begin_termination(env.group, first, wait_delay=20)
    assert states(env)[first] == "Terminating"
    no_action = f"No active Lifecycle Action found with instance ID {first}"
    assert error_of(complete, env, InstanceId=first) == ("ValidationError", no_action)
    assert error_of(heartbeat, env, InstanceId=first) == ("ValidationError", no_action)

    env.clock.now += 20
    assert states(env)[first] == "Terminating:Wait"
    [action] = active(env)
    assert action.started == env.clock.now  # the wait began when the delay ran out
    complete(env, InstanceId=first)
    assert first not in states(env)
    group = env.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[env.group])
    assert group["AutoScalingGroups"][0]["DesiredCapacity"] == 1


def test_heartbeat_timeout_applies_default_result(env: Env) -> None:
    put_hook(env, timeout=60, default="CONTINUE")
    waiting = scale_in(env)
    env.clock.now += 59
    heartbeat(env, InstanceId=waiting)  # restarts the 60 s timer
    env.clock.now += 59
    assert states(env)[waiting] == "Terminating:Wait"
    env.clock.now += 2
    assert waiting not in states(env)
    assert ec2_state(env, waiting) == "terminated"
    assert outcomes(env) == [LifecycleOutcome(waiting, HOOK, "CONTINUE", "expired")]
    assert error_of(complete, env, InstanceId=waiting) == (
        "ValidationError",
        f"No active Lifecycle Action found with instance ID {waiting}",
    )


def test_heartbeats_cannot_pass_the_global_timeout(env: Env) -> None:
    put_hook(env, timeout=30, default="ABANDON")
    hooks = env.asg.describe_lifecycle_hooks(AutoScalingGroupName=env.group)["LifecycleHooks"]
    assert hooks[0]["GlobalTimeout"] == 3000  # min(172800, 100 × 30)
    waiting = scale_in(env)
    started = env.clock.now
    while env.clock.now + 25 < started + 3000:
        env.clock.now += 25
        heartbeat(env, InstanceId=waiting)
    [action] = active(env)
    assert action.deadline == started + 3000
    env.clock.now = started + 3000
    assert outcomes(env) == [LifecycleOutcome(waiting, HOOK, "ABANDON", "expired")]
    assert waiting not in states(env)


def test_every_terminating_hook_must_finish(env: Env) -> None:
    put_hook(env, name="first")
    put_hook(env, name="second")
    env.asg.put_lifecycle_hook(
        AutoScalingGroupName=env.group,
        LifecycleHookName="on-launch",
        LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING",
    )
    waiting = scale_in(env)
    assert sorted(a.hook for a in active(env)) == ["first", "second"]
    complete(env, hook="first", InstanceId=waiting)
    assert states(env)[waiting] == "Terminating:Wait"
    complete(env, hook="second", InstanceId=waiting)
    assert waiting not in states(env)


def test_abandon_skips_the_remaining_hooks(env: Env) -> None:
    put_hook(env, name="first")
    put_hook(env, name="second")
    waiting = scale_in(env)
    complete(env, hook="first", result="ABANDON", InstanceId=waiting)
    assert waiting not in states(env)
    assert active(env) == []


def retain_on_abandon(env: Env, value: str = "retain") -> None:
    env.asg.update_auto_scaling_group(
        AutoScalingGroupName=env.group,
        InstanceLifecyclePolicy={"RetentionTriggers": {"TerminateHookAbandon": value}},
    )


def test_retain_policy_keeps_an_abandoned_instance_until_terminated(env: Env) -> None:
    retain_on_abandon(env)
    [described] = env.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[env.group])["AutoScalingGroups"]
    assert described["InstanceLifecyclePolicy"] == {"RetentionTriggers": {"TerminateHookAbandon": "retain"}}
    put_hook(env)
    waiting = scale_in(env)
    complete(env, result="ABANDON", InstanceId=waiting)
    # First the wait's Proceed step ("Manage retained instances"), still in the capacity.
    assert sorted(states(env).values()) == ["InService", "Terminating:Proceed"]
    env.clock.now += retention.PROCEED_FOR
    # Retained, still running, out of the capacity (desired 1, one InService besides it).
    assert states(env)[waiting] == "Terminating:Retained"
    assert sorted(states(env).values()) == ["InService", "Terminating:Retained"]
    assert ec2_state(env, waiting) == "running"
    assert outcomes(env) == [LifecycleOutcome(waiting, HOOK, "ABANDON", "completed")]
    assert active(env) == []
    assert error_of(complete, env, InstanceId=waiting) == (
        "ValidationError",
        f"No active Lifecycle Action found with instance ID {waiting}",
    )

    env.asg.terminate_instance_in_auto_scaling_group(InstanceId=waiting, ShouldDecrementDesiredCapacity=False)
    assert waiting not in states(env)
    assert ec2_state(env, waiting) == "terminated"
    assert list(states(env).values()) == ["InService"]
    group = env.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[env.group])
    assert group["AutoScalingGroups"][0]["DesiredCapacity"] == 1


def test_retained_instance_is_replaced_when_capacity_was_kept(env: Env) -> None:
    retain_on_abandon(env)
    put_hook(env)
    first, _second = states(env)
    env.asg.terminate_instance_in_auto_scaling_group(InstanceId=first, ShouldDecrementDesiredCapacity=False)
    complete(env, result="ABANDON", InstanceId=first)
    env.clock.now += retention.PROCEED_FOR
    # Both are billed: two InService for the desired 2, and the retained one.
    assert sorted(states(env).values()) == ["InService", "InService", "Terminating:Retained"]
    assert ec2_state(env, first) == "running"


def test_retain_policy_applies_to_an_abandon_timeout(env: Env) -> None:
    retain_on_abandon(env)
    put_hook(env, timeout=60, default="ABANDON")
    waiting = scale_in(env)
    env.clock.now += 61
    assert states(env)[waiting] == "Terminating:Proceed"
    env.clock.now += retention.PROCEED_FOR
    assert states(env)[waiting] == "Terminating:Retained"
    assert outcomes(env) == [LifecycleOutcome(waiting, HOOK, "ABANDON", "expired")]


@pytest.mark.parametrize(
    ("policy", "result"),
    [("retain", "CONTINUE"), ("terminate", "ABANDON")],
    ids=["retain-never-applies-to-continue", "terminate-policy-abandon-terminates-as-before"],
)
def test_no_retention_terminates(env: Env, policy: str, result: str) -> None:
    retain_on_abandon(env)
    retain_on_abandon(env, policy)  # an update replaces the policy
    put_hook(env)
    waiting = scale_in(env)
    complete(env, result=result, InstanceId=waiting)
    assert waiting not in states(env)
    assert ec2_state(env, waiting) == "terminated"


def test_retain_policy_on_a_return_to_the_warm_pool(env: Env) -> None:
    retain_on_abandon(env)
    put_hook(env)
    first, _second = states(env)
    autoscaling.return_to_warm_pool(env.group, first)
    assert states(env)[first] == "Warmed:Pending:Wait"
    complete(env, result="ABANDON", InstanceId=first)
    assert states(env)[first] == "Warmed:Pending:Proceed"
    env.clock.now += retention.PROCEED_FOR
    assert states(env)[first] == "Warmed:Pending:Retained"


def test_terminate_instance_in_group(env: Env) -> None:
    put_hook(env)
    first, second = states(env)
    env.asg.terminate_instance_in_auto_scaling_group(InstanceId=first, ShouldDecrementDesiredCapacity=False)
    # Not decremented: a replacement launches while the old instance waits.
    after = states(env)
    assert after[first] == "Terminating:Wait"
    assert sorted(after.values()) == ["InService", "InService", "Terminating:Wait"]

    env.asg.terminate_instance_in_auto_scaling_group(InstanceId=second, ShouldDecrementDesiredCapacity=True)
    assert sorted(states(env).values()) == ["InService", "Terminating:Wait", "Terminating:Wait"]
    group = env.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[env.group])
    assert group["AutoScalingGroups"][0]["DesiredCapacity"] == 1


def test_without_a_hook_moto_terminates_at_once(env: Env) -> None:
    before = set(states(env))
    env.asg.set_desired_capacity(AutoScalingGroupName=env.group, DesiredCapacity=1)
    after = states(env)
    assert list(after.values()) == ["InService"]
    [gone] = before - set(after)
    assert ec2_state(env, gone) == "terminated"
    assert active(env) == []


def test_bad_requests_are_validation_errors(env: Env) -> None:
    put_hook(env)
    waiting = scale_in(env)
    code, message = error_of(complete, env, result="MAYBE", InstanceId=waiting)
    assert code == "ValidationError"
    assert "CONTINUE" in message
    code, _ = error_of(complete, env, hook="no-such-hook", InstanceId=waiting)
    assert code == "ValidationError"
    missing = f"missing-{env.group}"
    code, _ = error_of(
        env.asg.record_lifecycle_action_heartbeat,
        AutoScalingGroupName=missing,
        LifecycleHookName=HOOK,
        InstanceId=waiting,
    )
    assert code == "ValidationError"
    assert states(env)[waiting] == "Terminating:Wait"  # nothing changed
    assert [c.hook for c in calls(env)] == [HOOK, "no-such-hook"]
    assert all(c.outcome != "ok" for c in calls(env))
    [rejected] = autoscaling.calls(group=missing)
    assert rejected.outcome.startswith("AutoScalingGroup name not found")


def test_injected_throttling_is_returned_and_recorded(env: Env) -> None:
    put_hook(env)
    waiting = scale_in(env)
    autoscaling.inject_error(autoscaling.HEARTBEAT, "Throttling", "Rate exceeded", times=2)
    for _ in range(2):
        assert error_of(heartbeat, env, InstanceId=waiting) == ("Throttling", "Rate exceeded")
    heartbeat(env, InstanceId=waiting)
    assert [c.outcome for c in calls(env)] == ["Rate exceeded", "Rate exceeded", "ok"]


def test_injected_error_on_any_action(env: Env) -> None:
    autoscaling.inject_error("DescribeAutoScalingInstances", "Throttling", "Rate exceeded", 1)
    with pytest.raises(ClientError) as info:
        env.asg.describe_auto_scaling_instances()
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert info.value.response["Error"]["Code"] == "Throttling"
    assert len(states(env)) == 2  # only the next call failed


def test_botocore_retries_through_injected_throttling(env: Env) -> None:
    put_hook(env)
    waiting = scale_in(env)
    autoscaling.inject_error(autoscaling.COMPLETE, "Throttling", "Rate exceeded", times=1)
    retrying = boto3.client(
        "autoscaling",
        endpoint_url=env.server.endpoint,
        config=Config(retries={"mode": "standard", "total_max_attempts": 3}),
    )
    retrying.complete_lifecycle_action(
        AutoScalingGroupName=env.group,
        LifecycleHookName=HOOK,
        LifecycleActionResult="CONTINUE",
        InstanceId=waiting,
    )
    assert [c.outcome for c in calls(env)] == ["Rate exceeded", "ok"]
    assert waiting not in states(env)


def test_force_delete_drops_waiting_instances(env: Env) -> None:
    put_hook(env)
    waiting = scale_in(env)
    env.asg.delete_auto_scaling_group(AutoScalingGroupName=env.group, ForceDelete=True)
    assert states(env) == {}
    assert ec2_state(env, waiting) == "terminated"
    assert active(env) == []


def test_sns_messages_and_api_calls(env: Env) -> None:
    sns = boto3.client("sns", endpoint_url=env.server.endpoint)
    topic = sns.create_topic(Name=f"topic-{env.group}")["TopicArn"]
    sns.publish(
        TopicArn=topic,
        Message='{"status": "ok"}',
        Subject="backup done",
        MessageAttributes={"instance": {"DataType": "String", "StringValue": "i-1"}},
    )
    [message] = env.server.sns_messages(topic)
    assert message["message"] == '{"status": "ok"}'
    assert message["subject"] == "backup done"
    assert message["message_attributes"] == {"instance": {"Type": "String", "Value": "i-1"}}
    actions = [call.action for call in env.server.api_calls()]
    assert actions[-2:] == ["CreateTopic", "Publish"]
    assert "CreateAutoScalingGroup" in actions


def put_launching_hook(env: Env, name: str = "gate-on-launch") -> None:
    env.asg.put_lifecycle_hook(
        AutoScalingGroupName=env.group,
        LifecycleHookName=name,
        LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING",
        HeartbeatTimeout=60,
        DefaultResult="ABANDON",
    )


def test_root_volume_replacement_is_held_by_both_hooks(env: Env) -> None:
    from instance_agent.local import launching, rootvolume

    launching.install()
    put_hook(env)
    put_launching_hook(env)
    first, second = states(env)
    token = rootvolume.replace_root_volume(env.group, first)
    assert states(env)[first] == "ReplacingRootVolume:Wait"
    assert [a.token for a in active(env)] == [token]
    heartbeat(env, LifecycleActionToken=token)
    complete(env, InstanceId=first)
    # The terminating action ends; the instance keeps its id and is held again, now under
    # the launching hook, with a new action.
    assert outcomes(env) == [LifecycleOutcome(first, HOOK, "CONTINUE", "completed")]
    assert states(env) == {first: "Pending:Wait", second: "InService"}
    assert ec2_state(env, first) == "running"
    complete(env, hook="gate-on-launch", InstanceId=first)
    assert states(env)[first] == "InService"
    # A termination afterwards is a new action.
    assert rootvolume.replacements(env.group) == [first]


def test_root_volume_replacement_timeout_applies_default_result(env: Env) -> None:
    from instance_agent.local import rootvolume

    put_hook(env, timeout=30, default="ABANDON")
    first, _second = states(env)
    rootvolume.replace_root_volume(env.group, first)
    env.clock.now += 31
    # Without a launching hook it goes straight back into service, root volume replaced.
    assert states(env)[first] == "InService"
    assert outcomes(env) == [LifecycleOutcome(first, HOOK, "ABANDON", "expired")]
