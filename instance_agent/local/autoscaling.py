"""Terminate lifecycle hooks for moto's Auto Scaling backend.

moto 5.2 terminates a scaled-in instance at once and has neither `CompleteLifecycleAction`
nor `RecordLifecycleActionHeartbeat`. `install()` patches moto so that, for a group with an
`autoscaling:EC2_INSTANCE_TERMINATING` hook, the instance waits the way it does on AWS:

    InService -> Terminating (optional, `begin_termination(wait_delay=…)`: the load
                 balancer's deregistration delay, during which IMDS already says
                 `Terminated` and completing by instance id fails)
              -> Terminating:Wait (one lifecycle action per terminating hook)
              -> Terminating:Proceed -> terminated in moto's EC2 backend

and, for a group whose warm pool has an instance reuse policy (`return_to_warm_pool`):

    InService -> Warmed:Pending:Wait (the *terminating* hooks fire, Destination WarmPool)
              -> Warmed:Stopped (the instance stays, with its disks)
              -> InService again (`leave_warm_pool`; Pending:Wait first under a launching
                 hook, launching.py): the next termination is a new action

An action ends when it is completed, or when its heartbeat deadline passes and the hook's
DefaultResult applies. ABANDON ends the instance's other actions too. The instance proceeds
once it has no action left; under a group's instance lifecycle policy `retain`, an
instance whose last action ended in ABANDON is retained instead (local/retention.py).
Deadlines are checked lazily, on every Auto Scaling request and
every accessor call, against a clock tests can replace (`set_clock`).

Every CompleteLifecycleAction and RecordLifecycleActionHeartbeat call is recorded, rejected
ones included (`calls()`), and so is every finished action (`outcomes()`). `inject_error()`
makes the next calls of an Auto Scaling action fail, e.g. with Throttling (transient) or
AccessDenied (permanent: pass a large `times`, and `clear_errors()` when the permission is
"fixed").

Without a terminating hook, moto's own behaviour is unchanged. State lives on moto's
backend objects, so moto's reset clears it.

This module is the stand-in's Auto Scaling API for tests and the demo; the book it keeps is in
asgmodel.py, the lifecycle actions in asgactions.py, the patches of moto in asgpatch.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from moto.autoscaling.exceptions import ValidationError
from moto.autoscaling.models import (
    AutoScalingBackend,
    FakeAutoScalingGroup,
    InstanceState,
    autoscaling_backends,
)

from instance_agent.local import asgpatch
from instance_agent.local.asgactions import begin_action, enter_wait, tick
from instance_agent.local.asgmodel import COMPLETE as COMPLETE
from instance_agent.local.asgmodel import DEFAULT_ACCOUNT as DEFAULT_ACCOUNT
from instance_agent.local.asgmodel import DEFAULT_REGION as DEFAULT_REGION
from instance_agent.local.asgmodel import HEARTBEAT as HEARTBEAT
from instance_agent.local.asgmodel import WARM_PARKED, backend_for, book_of, clock, find_state, use_clock
from instance_agent.local.asgmodel import ActiveAction as ActiveAction
from instance_agent.local.asgmodel import LifecycleCall as LifecycleCall
from instance_agent.local.asgmodel import LifecycleOutcome as LifecycleOutcome
from instance_agent.local.faults import Patches

# moto's server is threaded; one lock keeps each Auto Scaling request and accessor atomic.
_patches: Patches = Patches(lambda: asgpatch.patch(_patches.lock, _backend_begin_termination))
LOCK = _patches.lock


# -- public API ------------------------------------------------------------------------


def install() -> None:
    """Patch moto's Auto Scaling classes (idempotent)."""
    _patches.install()


def set_clock(fn: Callable[[], float]) -> None:
    """Use `fn` (seconds, monotonic) for deadlines; `reset()` restores `time.monotonic`."""
    with LOCK:
        use_clock(fn)


def begin_termination(
    group: str,
    instance_id: str,
    wait_delay: float = 0.0,
    *,
    should_decrement: bool = True,
    account_id: str = DEFAULT_ACCOUNT,
    region: str = DEFAULT_REGION,
) -> None:
    """Start terminating an InService instance as a scale-in would.

    The instance is `Terminating` for `wait_delay` seconds (AWS deregisters it from load
    balancers before it runs hooks; completing by instance id fails meanwhile), then
    `Terminating:Wait`. Without a terminating hook it is then terminated.
    """
    install()
    with LOCK:
        backend, asg, state = in_service(group, instance_id, account_id, region)
        if should_decrement:
            asg.desired_capacity = max(0, (asg.desired_capacity or 0) - 1)
        begin_action(backend, asg, state, wait_delay)
        asg.set_desired_capacity(asg.desired_capacity)


def return_to_warm_pool(
    group: str,
    instance_id: str,
    *,
    account_id: str = DEFAULT_ACCOUNT,
    region: str = DEFAULT_REGION,
) -> None:
    """Scale in under an instance reuse policy: the instance goes back to the warm pool.

    The group's terminating hooks fire and hold it in `Warmed:Pending:Wait`; once they are
    done it is `Warmed:Stopped`, still in the group (the EventBridge event says
    `"Destination": "WarmPool"`; "Use lifecycle hooks with a warm pool",
    https://docs.aws.amazon.com/autoscaling/ec2/userguide/warm-pool-instance-lifecycle.html;
    docs/aws-behaviour.md, "Lifecycle hooks")."""
    install()
    with LOCK:
        backend, _asg, _state = in_service(group, instance_id, account_id, region)
        enter_wait(backend, group, instance_id, clock(), destination="warm-pool")


def in_service(
    group: str, instance_id: str, account_id: str, region: str
) -> tuple[AutoScalingBackend, FakeAutoScalingGroup, InstanceState]:
    """The backend, group and state of an instance that must be InService (under LOCK)."""
    backend = backend_for(account_id, region)
    tick(backend)
    asg = backend.autoscaling_groups.get(group)
    if asg is None:
        raise ValidationError(f"AutoScalingGroup name not found - {group}")
    state = find_state(asg, instance_id)
    if state is None or state.lifecycle_state != "InService":
        raise ValidationError(f"Instance {instance_id} is not InService in {group}")
    return backend, asg, state


LEAVING_WARM_POOL: list[Callable[..., object]] = []


def leave_warm_pool(
    group: str,
    instance_id: str,
    *,
    account_id: str = DEFAULT_ACCOUNT,
    region: str = DEFAULT_REGION,
) -> None:
    """A scale-out takes the instance from the warm pool back into service."""
    with LOCK:
        backend = backend_for(account_id, region)
        tick(backend)
        asg = backend.autoscaling_groups.get(group)
        state = find_state(asg, instance_id) if asg is not None else None
        if state is None or state.lifecycle_state != WARM_PARKED:
            raise ValidationError(f"Instance {instance_id} is not in the warm pool of {group}")
        state.lifecycle_state = "InService"
    # A launching hook holds it in Pending:Wait on its way out of the pool: launching.py,
    # which builds on this module, registers that here.
    for hold in LEAVING_WARM_POOL:
        hold(group, instance_id, account_id=account_id, region=region)


def clear_errors(
    action: str | None = None,
    *,
    account_id: str = DEFAULT_ACCOUNT,
    region: str = DEFAULT_REGION,
) -> None:
    """Drop the injected errors of `action` (all actions when None): the permission is
    fixed, the outage over."""
    with LOCK:
        faults = book_of(backend_for(account_id, region)).faults
        if action is None:
            faults.clear()
        else:
            faults.pop(action, None)


def scaled_clock(factor: float) -> Callable[[], float]:
    """A clock running `factor` times faster than `time.monotonic`, starting from now.

    It is continuous with the default clock, so deadlines set before `set_clock` keep
    their meaning (a bare `monotonic() * factor` jumps ahead and expires them all)."""
    origin = time.monotonic()
    return lambda: origin + (time.monotonic() - origin) * factor


def calls(
    account_id: str = DEFAULT_ACCOUNT, region: str = DEFAULT_REGION, *, group: str | None = None
) -> list[LifecycleCall]:
    """Every CompleteLifecycleAction and RecordLifecycleActionHeartbeat call, oldest first."""
    with LOCK:
        backend = backend_for(account_id, region)
        tick(backend)
        return [c for c in book_of(backend).calls if group is None or c.group == group]


def outcomes(
    account_id: str = DEFAULT_ACCOUNT, region: str = DEFAULT_REGION, *, group: str | None = None
) -> list[LifecycleOutcome]:
    """Every lifecycle action that ended, oldest first."""
    with LOCK:
        backend = backend_for(account_id, region)
        tick(backend)
        return [o for g, o in book_of(backend).outcomes if group is None or g == group]


def active_actions(
    account_id: str = DEFAULT_ACCOUNT, region: str = DEFAULT_REGION, *, group: str | None = None
) -> list[ActiveAction]:
    """Lifecycle actions waiting for completion."""
    with LOCK:
        backend = backend_for(account_id, region)
        tick(backend)
        return [a.snapshot() for a in book_of(backend).actions if group is None or a.group == group]


def inject_error(
    action: str,
    code: str,
    message: str,
    times: int = 1,
    *,
    account_id: str = DEFAULT_ACCOUNT,
    region: str = DEFAULT_REGION,
) -> None:
    """Make the next `times` calls of Auto Scaling `action` (e.g. "CompleteLifecycleAction")
    fail with error `code` and `message` (HTTP 400, like AWS's Throttling)."""
    with LOCK:
        book_of(backend_for(account_id, region)).faults.add(action, code, message, times)


def reset() -> None:
    """Forget recorded calls and outcomes and pending injected errors in every backend,
    and restore the default clock. Groups, instances and active actions stay: moto's own
    reset clears those."""
    with LOCK:
        use_clock(time.monotonic)
        for account in autoscaling_backends.values():
            for backend in account.values():
                book = book_of(backend)
                book.calls.clear()
                book.outcomes.clear()
                book.faults.clear()


# States the stand-in does not reach on its own yet, which a test may put an instance in.
# Retained: a terminating action ended in ABANDON under an instance lifecycle policy; the
# instance stays until TerminateInstanceInAutoScalingGroup, with no action left to complete
# (https://docs.aws.amazon.com/autoscaling/ec2/userguide/instance-lifecycle-policy.html).
# Root volume: an instance refresh with the ReplaceRootVolume strategy
# (https://docs.aws.amazon.com/autoscaling/ec2/userguide/replace-root-volume.html).
# Both in our words: docs/aws-behaviour.md, "Lifecycle hooks".
HELD_STATES = (
    "Terminating:Retained",
    "Warmed:Terminating:Retained",
    "Warmed:Pending:Retained",
    "ReplacingRootVolume",
    "ReplacingRootVolume:Wait",
    "ReplacingRootVolume:Proceed",
    "RootVolumeReplaced",
    # Parked in a warm pool whose pool state is Running or Hibernated (the stand-in's own
    # return_to_warm_pool parks in Warmed:Stopped).
    "Warmed:Running",
    "Warmed:Hibernated",
)


def hold_in_state(
    group: str,
    instance_id: str,
    state_name: str,
    *,
    account_id: str = DEFAULT_ACCOUNT,
    region: str = DEFAULT_REGION,
) -> None:
    """Put an instance of `group` in one of HELD_STATES, with no lifecycle action live:
    a heartbeat or completion for it fails as it would on AWS."""
    if state_name not in HELD_STATES:
        raise ValueError(f"{state_name} is not one of {HELD_STATES}")
    install()
    with LOCK:
        backend = backend_for(account_id, region)
        tick(backend)
        asg = backend.autoscaling_groups.get(group)
        state = find_state(asg, instance_id) if asg is not None else None
        if state is None:
            raise ValidationError(f"Instance {instance_id} is not in {group}")
        book = book_of(backend)
        book.actions = [a for a in book.actions if a.instance_id != instance_id]
        state.lifecycle_state = state_name


def _backend_begin_termination(
    self: AutoScalingBackend,
    group: str,
    instance_id: str,
    wait_delay: float = 0.0,
    should_decrement: bool = True,
) -> None:
    begin_termination(
        group,
        instance_id,
        wait_delay,
        should_decrement=should_decrement,
        account_id=self.account_id,
        region=self.region_name,
    )
