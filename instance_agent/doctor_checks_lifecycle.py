"""doctor's Auto Scaling checks: the group and its terminating hook, and the permission to
heartbeat it (not probed with --launch, the launching hook's gate)."""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError

from instance_agent import awserror
from instance_agent.doctor_check import FAIL, OK, SKIP, Check, Context, Facts
from instance_agent.errors import AgentError, NoActiveLifecycleAction
from instance_agent.lifecycle import TERMINATING_WAIT, default_interval, discover, instance_state, translate

HOOK_NAME_HINT = "instance-agent-backup"
DESCRIBE_FIX = (
    "allow autoscaling:DescribeAutoScalingInstances and "
    'autoscaling:DescribeLifecycleHooks on "*" in the instance role '
    "(packaging/template.yaml, statement DiscoverHook)"
)


def _describe_failed(err: AgentError, otherwise: str, found: Facts | None = None) -> Check:
    """A describe call of hook discovery failed: the statement to add when it was refused."""
    fix = DESCRIBE_FIX if err.code in awserror.DENIED_CODES else otherwise
    return Check("lifecycle hook", FAIL, str(err), fix, found or Facts())


def check_hook(ctx: Context, facts: Facts) -> Check:
    name, cfg = "lifecycle hook", ctx.cfg
    if not cfg.complete:
        return Check(name, SKIP, "complete = false: this agent completes no lifecycle action")
    if not facts.instance_id or not facts.region:
        return Check(name, SKIP, "needs the instance id and region (see identity)")
    instance_id = facts.instance_id
    client = ctx.clients(facts.region).autoscaling
    try:
        found = instance_state(client, instance_id)
    except AgentError as err:
        return _describe_failed(err, "check the network path to the Auto Scaling endpoint")
    if found is None:
        return Check(
            name,
            FAIL,
            f"instance {instance_id} is in no Auto Scaling group: "
            "nothing will trigger a backup or wait for one",
            f"launch it from the group, or: aws autoscaling attach-instances "
            f"--instance-ids {instance_id} --auto-scaling-group-name <group>; on a "
            "host outside any group, set complete = false",
        )
    group, state = found
    if cfg.asg_name and cfg.asg_name != group:
        return Check(
            name,
            FAIL,
            f"asg_name is {cfg.asg_name!r}, but the instance is in {group!r}",
            f'set asg_name = "{group}", or remove it to discover it',
            Facts(state=state),
        )
    try:
        target = discover(client, instance_id, group=group, hook=cfg.hook_name, token=None)
    except AgentError as err:
        return _describe_failed(err, "set hook_name to the group's terminating hook", Facts(state=state))
    if target is None:
        return Check(
            name,
            FAIL,
            f"group {group} has no terminating lifecycle hook: the instance would be gone before any backup",
            f"aws autoscaling put-lifecycle-hook --auto-scaling-group-name {group} "
            f"--lifecycle-hook-name {HOOK_NAME_HINT} --lifecycle-transition "
            "autoscaling:EC2_INSTANCE_TERMINATING --heartbeat-timeout 900 "
            "--default-result ABANDON",
            Facts(state=state),
        )
    interval = cfg.heartbeat_interval or default_interval(target.heartbeat_timeout)
    return Check(
        name,
        OK,
        f"group {group}, hook {target.hook}, heartbeat timeout "
        f"{target.heartbeat_timeout} s (heartbeats every {interval:g} s); the "
        f"instance is {state}",
        facts=Facts(target=target, state=state),
    )


def check_lifecycle_permission(ctx: Context, facts: Facts) -> Check:
    name, target = "lifecycle permission", facts.target
    if target is None or not facts.region:
        return Check(
            name,
            SKIP,
            "needs the lifecycle hook (see lifecycle hook)" if ctx.cfg.complete else "complete = false",
        )
    if ctx.launch:
        # The probe heartbeats the terminating hook, which has no action while the
        # instance launches; the user data's CompleteLifecycleAction of the launching
        # hook uses the same statement on the same group, and proves it right after.
        return Check(
            name,
            SKIP,
            "--launch: no terminating action to probe; completing the "
            "launching hook proves CompleteLifecycleAction on the group",
        )
    ids = {
        "AutoScalingGroupName": target.group,
        "LifecycleHookName": target.hook,
        "InstanceId": target.instance_id,
    }
    fix = (
        "allow autoscaling:RecordLifecycleActionHeartbeat and "
        "autoscaling:CompleteLifecycleAction on the group in the instance role "
        "(packaging/template.yaml, statement CompleteOwnLifecycleAction)"
    )
    try:
        ctx.clients(facts.region).autoscaling.record_lifecycle_action_heartbeat(**ids)
    except ClientError as err:
        if isinstance(translate(err, "RecordLifecycleActionHeartbeat"), NoActiveLifecycleAction):
            return Check(
                name,
                OK,
                "RecordLifecycleActionHeartbeat is allowed (AWS found no "
                "active action, as expected while the instance is not terminating); "
                "CompleteLifecycleAction is not probed: it would end a real action",
            )
        return Check(
            name,
            FAIL,
            f"RecordLifecycleActionHeartbeat: {awserror.describe(err)}",
            fix if awserror.denied(err) else None,
        )
    except BotoCoreError as err:
        return Check(
            name,
            FAIL,
            f"RecordLifecycleActionHeartbeat: {awserror.describe(err)}",
            "check the network path to the Auto Scaling endpoint",
        )
    terminating = " (the instance is terminating: this heartbeat extended its hook's timeout)"
    return Check(
        name,
        OK,
        "RecordLifecycleActionHeartbeat works" + (terminating if facts.state in TERMINATING_WAIT else ""),
    )
