"""Root-volume replacement of one instance, for the Auto Scaling stand-in.

An instance refresh with the ReplaceRootVolume strategy keeps the instance (same id, same
network, non-root volumes) and replaces its root EBS volume; the instance is rebooted
("Replace root volume", https://docs.aws.amazon.com/autoscaling/ec2/userguide/replace-root-volume.html):

    InService -> ReplacingRootVolume
              -> ReplacingRootVolume:Wait (one action per *terminating* hook, with its own
                 token, heartbeats, timeouts and DefaultResult, as for a termination)
              -> ReplacingRootVolume:Proceed -> RootVolumeReplaced
              -> Pending:Wait (a new action under the group's *launching* hook, if any;
                 launching.py) -> InService

The page's section "Use lifecycle hooks with replace root volume" says which hook holds
which wait, and that the notifications and EventBridge events carry
`"Action": "ReplaceRootVolume"` with Origin and Destination `AutoScalingGroup`
(https://docs.aws.amazon.com/autoscaling/ec2/userguide/instance-refresh-eventbridge-events.html;
in our words: docs/aws-behaviour.md, "Lifecycle hooks").
The pages do not say that ABANDON stops the replacement, so, as for a termination, either
result lets it proceed. Instance retention does not apply (that policy is about
terminations). A later termination is a new action.
"""

from __future__ import annotations

from moto.autoscaling.exceptions import ValidationError

from instance_agent.local import asgactions, asgmodel, autoscaling, launching
from instance_agent.local.faults import attached

ACTION = "ReplaceRootVolume"
DESTINATION = "root-volume"


def install() -> None:
    """Patch moto (idempotent): launching hooks, and the hold after the replacement."""
    launching.install()
    with autoscaling.LOCK:
        if replaced not in asgactions.ROOT_VOLUME_REPLACED:
            asgactions.ROOT_VOLUME_REPLACED.append(replaced)


def replace_root_volume(
    group: str,
    instance_id: str,
    *,
    account_id: str = asgmodel.DEFAULT_ACCOUNT,
    region: str = asgmodel.DEFAULT_REGION,
) -> str | None:
    """Start replacing the root volume of an InService instance; returns the token of the
    first terminating action holding it (None: no terminating hook, so it went on)."""
    install()
    # The Auto Scaling lock first, then launching's, as every request takes them.
    with autoscaling.LOCK, launching.LOCK:
        backend, _asg, state = autoscaling.in_service(group, instance_id, account_id, region)
        state.lifecycle_state = "ReplacingRootVolume"
        _replacements(backend).append((group, instance_id))
        asgactions.enter_wait(backend, group, instance_id, asgmodel.clock(), destination=DESTINATION)
        tokens = [a.token for a in asgmodel.book_of(backend).actions if a.instance_id == instance_id]
        return tokens[0] if tokens else None


def replaced(backend: object, group: str, instance_id: str) -> None:
    """The terminating actions are done: the root volume is replaced and the instance boots
    again, held in Pending:Wait by a launching hook if the group has one."""
    asg = backend.autoscaling_groups.get(group)  # type: ignore[attr-defined]
    state = asgmodel.find_state(asg, instance_id) if asg is not None else None
    if state is None:
        raise ValidationError(f"Instance {instance_id} is not in {group}")
    state.lifecycle_state = "RootVolumeReplaced"
    account_id, region = backend.account_id, backend.region_name  # type: ignore[attr-defined]
    if launching.hold_leaving(group, instance_id, account_id=account_id, region=region) is None:
        state.lifecycle_state = "InService"


def replacements(
    group: str, *, account_id: str = asgmodel.DEFAULT_ACCOUNT, region: str = asgmodel.DEFAULT_REGION
) -> list[str]:
    """The instances of `group` whose root volume replacement began, oldest first."""
    with autoscaling.LOCK:
        backend = asgmodel.backend_for(account_id, region)
        return [i for g, i in _replacements(backend) if g == group]


def _replacements(backend: object) -> list[tuple[str, str]]:
    return attached(backend, "_instance_agent_rootvolume", list, list)
