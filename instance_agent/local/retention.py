"""The group's instance lifecycle policy (instance retention), for the Auto Scaling stand-in.

`InstanceLifecyclePolicy.RetentionTriggers.TerminateHookAbandon` is `retain` or `terminate`
(API RetentionTriggers,
https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_RetentionTriggers.html; CloudFormation
AWS::AutoScaling::AutoScalingGroup InstanceLifecyclePolicy,
https://docs.aws.amazon.com/AWSCloudFormation/latest/TemplateReference/aws-properties-autoscaling-autoscalinggroup-instancelifecyclepolicy.html).
With `retain`, a terminating lifecycle action that ends in ABANDON (explicitly, or by a
heartbeat or global timeout whose DefaultResult is ABANDON) does not terminate the instance:
it goes through `Terminating:Proceed` to `Terminating:Retained` and stays until someone calls
TerminateInstanceInAutoScalingGroup. The stand-in keeps it in `Terminating:Proceed` for
PROCEED_FOR seconds of its clock first ("When retention is triggered, instances transition
through these states: Terminating, Terminating:Wait, Terminating:Proceed - Lifecycle actions
wrap up (whether they succeeded or failed), Terminating:Retained", "Manage retained
instances"; no page says for how long), so a caller that asks once, right after its ABANDON,
sees what it would see on AWS. A return to the warm pool passes through
`Warmed:Pending:Proceed` to `Warmed:Pending:Retained` the same way: the pages name only the
retained state, and the Proceed step is taken by analogy. CONTINUE is never retained, and
without a terminating hook the policy has no effect ("Configure instance retention",
https://docs.aws.amazon.com/autoscaling/ec2/userguide/configure-instance-retention.html).
Retained instances do not count toward the desired capacity: the group launches a
replacement, and both instances are billed ("Manage retained instances",
https://docs.aws.amazon.com/autoscaling/ec2/userguide/manage-retained-instances.html;
"Control instance retention with instance lifecycle policies",
https://docs.aws.amazon.com/autoscaling/ec2/userguide/instance-lifecycle-policy.html).
All of this in our words: docs/aws-behaviour.md, "Lifecycle hooks".

The pages say nothing of a ShouldDecrementDesiredCapacity value that AWS refuses for a
retained instance, so the stand-in refuses none and applies the flag as it reads: True
lowers the desired capacity of the active group. The agent passes False, since the retained
instance is no longer part of that capacity.

The policy is read from CreateAutoScalingGroup and UpdateAutoScalingGroup requests and kept
on moto's backend (moto 5.2 ignores the parameter), so moto's reset clears it.
"""

from __future__ import annotations

from typing import Any

from moto.autoscaling.models import AutoScalingBackend, FakeAutoScalingGroup

from instance_agent.local.asgmodel import PendingWait, book_of, clock, find_state
from instance_agent.local.faults import attached

RETAIN = "retain"
PROCEED_FOR = 2.0  # seconds in the wait's Proceed state before the instance is retained
TERMINATE = "terminate"
_KEY = "_instance_agent_retention"

# Where an abandoned terminating action leaves the instance, by where it was going: a
# termination, or (instance reuse policy) back into the warm pool.
_PROCEED_BY_DESTINATION = {
    "terminate": "Terminating:Proceed",
    "warm-pool": "Warmed:Pending:Proceed",
}
_RETAINED_BY_DESTINATION = {
    "terminate": "Terminating:Retained",
    "warm-pool": "Warmed:Pending:Retained",
}
RETAINED_STATES = ("Terminating:Retained", "Warmed:Terminating:Retained", "Warmed:Pending:Retained")


def _policies(backend: AutoScalingBackend) -> dict[str, str]:
    return attached(backend, _KEY, dict, dict)


def record(backend: AutoScalingBackend, action: str, params: dict[str, Any]) -> None:
    """Keep the policy of a CreateAutoScalingGroup or UpdateAutoScalingGroup request that
    succeeded. A create without the parameter has AWS's default (terminate); an update
    without it leaves the policy as it was."""
    group = str(params.get("AutoScalingGroupName") or "")
    policy = params.get("InstanceLifecyclePolicy")
    if not group or (policy is None and action != "CreateAutoScalingGroup"):
        return
    triggers = (policy or {}).get("RetentionTriggers") or {}
    value = str(triggers.get("TerminateHookAbandon") or TERMINATE)
    _policies(backend)[group] = value
    asg = backend.autoscaling_groups.get(group)
    if asg is not None and policy is not None:
        # DescribeAutoScalingGroups renders the attribute named for the API's member.
        asg.instance_lifecycle_policy = {"RetentionTriggers": {"TerminateHookAbandon": value}}  # type: ignore[attr-defined]


def policy_of(backend: AutoScalingBackend, group: str) -> str:
    """`retain` or `terminate` (the default) for `group`."""
    return _policies(backend).get(group, TERMINATE)


def forget(backend: AutoScalingBackend, group: str) -> None:
    """The group was deleted."""
    _policies(backend).pop(group, None)


def retains(backend: AutoScalingBackend, group: str, result: str) -> bool:
    """Whether an instance whose last terminating action ended with `result` is retained."""
    return result == "ABANDON" and policy_of(backend, group) == RETAIN


def begin(
    backend: AutoScalingBackend, group: FakeAutoScalingGroup, instance_id: str, destination: str
) -> None:
    """The instance's last action ended in ABANDON under `retain`: Proceed now, retained
    PROCEED_FOR seconds later (asgactions.tick calls `retain`)."""
    state = find_state(group, instance_id)
    if state is None:
        return
    state.lifecycle_state = _PROCEED_BY_DESTINATION.get(destination, "Terminating:Proceed")
    leaving = PendingWait(group.name, instance_id, clock() + PROCEED_FOR, destination)
    book_of(backend).retaining.append(leaving)


def retain(
    backend: AutoScalingBackend, group: FakeAutoScalingGroup, instance_id: str, destination: str
) -> None:
    """Keep the instance, and let the group replace it (it no longer counts as capacity)."""
    state = find_state(group, instance_id)
    if state is None:
        return
    state.lifecycle_state = _RETAINED_BY_DESTINATION.get(destination, "Terminating:Retained")
    # moto counts only InService instances as capacity, so this launches the replacement
    # when the termination did not lower the desired capacity.
    group.set_desired_capacity(group.desired_capacity)
    backend.update_attached_elbs(group.name)
    backend.update_attached_target_groups(group.name)
