"""Launching lifecycle hooks for the local Auto Scaling stand-in (Pending:Wait).

`autoscaling` models terminating hooks; this module adds, on top of it, the launching side
that the user data's launch gate answers:

    begin_launch(group, instance, hook)        -> Pending:Wait, one launching action
    begin_launch(..., warm_pool=True)          -> Warmed:Pending:Wait (into a warm pool)
    begin_launch(..., pending_for=s)           -> (Warmed:)Pending for s seconds first
    CompleteLifecycleAction CONTINUE           -> InService (or Warmed:Stopped)
    CompleteLifecycleAction ABANDON            -> Terminating:Proceed (AWS replaces it)

On AWS a launching hook on a warm-pool group fires twice, into the pool and out of it
(https://docs.aws.amazon.com/autoscaling/ec2/userguide/warm-pool-instance-lifecycle.html;
docs/aws-behaviour.md, "Lifecycle hooks"):
a test calls `begin_launch(warm_pool=True)` for the way in, and `autoscaling.leave_warm_pool`
calls `hold_leaving` for the way out, which begins a new action in Pending:Wait. A
CompleteLifecycleAction that matches no launching action goes on to `autoscaling`'s
handler unchanged.

`pending_for` models the instance booting, and its user data running, while Auto Scaling
still shows `Pending` and has no action yet: no AWS page says when the wait begins relative
to the boot, and users report CompleteLifecycleAction from user data failing with "No
active Lifecycle Action found"
(https://github.com/aws-samples/amazon-ec2-auto-scaling-group-examples/issues/5,
https://github.com/kubernetes/kops/issues/16582). State lives on moto's backend objects, so
moto's reset clears it.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from moto.autoscaling.exceptions import ValidationError
from moto.autoscaling.models import AutoScalingBackend, autoscaling_backends
from moto.autoscaling.responses import AutoScalingResponse
from moto.core.responses import ActionResult, EmptyResult

from instance_agent.local import asgmodel, autoscaling
from instance_agent.local.faults import attached

LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
PENDING_WAIT, WARMED_PENDING_WAIT = "Pending:Wait", "Warmed:Pending:Wait"
_STATE_KEY = "_instance_agent_launching"
LOCK = threading.RLock()
_installed = False


@dataclass(frozen=True)
class LaunchOutcome:
    """A launching action that was completed, and the state it left the instance in."""

    instance_id: str
    hook: str
    result: str
    state: str


@dataclass
class _Launch:
    token: str
    group: str
    hook: str
    instance_id: str
    warm_pool: bool


@dataclass
class _Book:
    active: list[_Launch] = field(default_factory=list)
    outcomes: list[LaunchOutcome] = field(default_factory=list)


def install() -> None:
    """Patch moto on top of `autoscaling.install()` (idempotent)."""
    global _installed
    autoscaling.install()
    with LOCK:
        if _installed:
            return
        _installed = True
        autoscaling.LEAVING_WARM_POOL.append(hold_leaving)
        terminating_complete = AutoScalingResponse.complete_lifecycle_action  # type: ignore[attr-defined]

        def complete_lifecycle_action(self: AutoScalingResponse) -> ActionResult:
            # Auto Scaling's lock first: its deadline checks may begin a launching action
            # (rootvolume.py) while holding it.
            with autoscaling.LOCK, LOCK:
                launch = _match(self)
                if launch is None:
                    return terminating_complete(self)  # type: ignore[no-any-return]
                _complete(self.autoscaling_backend, launch, str(self._get_param("LifecycleActionResult")))
                return EmptyResult()

        AutoScalingResponse.complete_lifecycle_action = complete_lifecycle_action  # type: ignore[attr-defined]


def begin_launch(
    group: str,
    instance_id: str,
    hook: str,
    *,
    warm_pool: bool = False,
    pending_for: float = 0.0,
    account_id: str = asgmodel.DEFAULT_ACCOUNT,
    region: str = asgmodel.DEFAULT_REGION,
) -> str:
    """Put the instance in (Warmed:)Pending:Wait under `hook`, after `pending_for` seconds
    in (Warmed:)Pending with no action (module docstring); returns the action's token."""
    with LOCK:
        backend = autoscaling_backends[account_id][region]
        if f"{group}_{hook}" not in backend.lifecycle_hooks:
            raise ValueError(f"group {group} has no hook {hook}")
        if backend.lifecycle_hooks[f"{group}_{hook}"].lifecycle_transition != LAUNCHING:
            raise ValueError(f"hook {hook} is not a launching hook")
        launch = _Launch(str(uuid.uuid4()), group, hook, instance_id, warm_pool)

        def wait() -> None:
            with LOCK:
                _state(backend, group, instance_id).lifecycle_state = (
                    WARMED_PENDING_WAIT if warm_pool else PENDING_WAIT
                )
                _book(backend).active.append(launch)

        if pending_for <= 0:
            wait()
        else:
            _state(backend, group, instance_id).lifecycle_state = "Warmed:Pending" if warm_pool else "Pending"
            timer = threading.Timer(pending_for, wait)
            timer.daemon = True
            timer.start()
        return launch.token


def hold_leaving(
    group: str,
    instance_id: str,
    *,
    account_id: str = asgmodel.DEFAULT_ACCOUNT,
    region: str = asgmodel.DEFAULT_REGION,
) -> str | None:
    """An instance leaving the warm pool: under the group's launching hook it waits in
    Pending:Wait for a new action; returns its token (None: the group has no such hook)."""
    with LOCK:
        backend = autoscaling_backends[account_id][region]
        for hook in backend.lifecycle_hooks.values():
            if hook.auto_scaling_group_name == group and hook.lifecycle_transition == LAUNCHING:
                return begin_launch(group, instance_id, hook.name, account_id=account_id, region=region)
        return None


def outcomes(
    account_id: str = asgmodel.DEFAULT_ACCOUNT, region: str = asgmodel.DEFAULT_REGION
) -> list[LaunchOutcome]:
    with LOCK:
        return list(_book(autoscaling_backends[account_id][region]).outcomes)


def _book(backend: AutoScalingBackend) -> _Book:
    return attached(backend, _STATE_KEY, _Book, _Book)


def _state(backend: AutoScalingBackend, group: str, instance_id: str) -> Any:
    for state in backend.autoscaling_groups[group].instance_states:
        if state.instance.id == instance_id:
            return state
    raise ValueError(f"{instance_id} is not in {group}")


def _match(response: AutoScalingResponse) -> _Launch | None:
    group = response._get_param("AutoScalingGroupName")
    hook = response._get_param("LifecycleHookName")
    token = response._get_param("LifecycleActionToken")
    instance_id = response._get_param("InstanceId")
    for launch in _book(response.autoscaling_backend).active:
        if (launch.group, launch.hook) == (group, hook) and (
            launch.token == token or (not token and launch.instance_id == instance_id)
        ):
            return launch
    return None


def _complete(backend: AutoScalingBackend, launch: _Launch, result: str) -> None:
    if result not in asgmodel.RESULTS:
        raise ValidationError(
            f"Value '{result}' at 'lifecycleActionResult' failed to satisfy "
            "constraint: Member must be one of CONTINUE, ABANDON"
        )
    if result == "CONTINUE":
        state = "Warmed:Stopped" if launch.warm_pool else "InService"
    else:
        state = "Terminating:Proceed"
    _state(backend, launch.group, launch.instance_id).lifecycle_state = state
    book = _book(backend)
    book.active.remove(launch)
    book.outcomes.append(LaunchOutcome(launch.instance_id, launch.hook, result, state))
