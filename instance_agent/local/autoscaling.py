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
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moto.autoscaling.exceptions import AutoscalingClientError, ValidationError
from moto.autoscaling.models import (
    AutoScalingBackend,
    FakeAutoScalingGroup,
    InstanceState,
    LifecycleHook,
    TerminateInstanceActivity,
    autoscaling_backends,
)
from moto.autoscaling.responses import AutoScalingResponse
from moto.core.responses import ActionResult, EmptyResult
from moto.core.utils import camelcase_to_underscores

from instance_agent.local import retention
from instance_agent.local.faults import Fault, FaultQueues, Patches, attached

DEFAULT_ACCOUNT = "123456789012"
DEFAULT_REGION = "us-east-1"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
RESULTS = ("CONTINUE", "ABANDON")
COMPLETE = "CompleteLifecycleAction"
HEARTBEAT = "RecordLifecycleActionHeartbeat"
# AWS ends a lifecycle action after min(48 h, 100 × HeartbeatTimeout), heartbeats or not.
MAX_GLOBAL_TIMEOUT = 172_800
GLOBAL_TIMEOUT_FACTOR = 100

WAIT = "Terminating:Wait"
WARM_WAIT = "Warmed:Pending:Wait"
WARM_PARKED = "Warmed:Stopped"
ROOT_WAIT = "ReplacingRootVolume:Wait"  # root-volume replacement: local/rootvolume.py
WAIT_STATES = (WAIT, WARM_WAIT, ROOT_WAIT)
_UNMODELLED_ERROR = r"Exception\(AutoscalingClientError\) with code "
_STATE_KEY = "_instance_agent_lifecycle"

# moto's server is threaded; one lock keeps each Auto Scaling request and accessor atomic.
_patches = Patches(lambda: _patch())
_lock = _patches.lock
_clock: Callable[[], float] = time.monotonic
_bypass_hooks = False  # set while a group is being deleted: no hooks then


@dataclass(frozen=True)
class LifecycleCall:
    """One CompleteLifecycleAction or RecordLifecycleActionHeartbeat call, as received."""

    action: str
    group: str
    hook: str
    instance_id: str | None
    token: str | None
    result: str | None
    outcome: str  # "ok", or the error message returned
    # When it arrived, on time.monotonic (for ordering against test events); not part of
    # what a call *is*, so equal calls compare equal whenever they came.
    at: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class LifecycleOutcome:
    """A lifecycle action that ended: `how` is "completed" or "expired"."""

    instance_id: str
    hook: str
    result: str
    how: str


@dataclass(frozen=True)
class ActiveAction:
    """A lifecycle action still waiting for completion (times are on the module clock)."""

    token: str
    group: str
    hook: str
    instance_id: str
    started: float
    deadline: float
    global_deadline: float


@dataclass
class _Action:
    token: str
    group: str
    hook: str
    instance_id: str
    heartbeat_timeout: int
    default_result: str
    started: float
    deadline: float
    global_deadline: float
    destination: str = "terminate"  # or "warm-pool", or "root-volume"

    def snapshot(self) -> ActiveAction:
        return ActiveAction(
            self.token,
            self.group,
            self.hook,
            self.instance_id,
            self.started,
            self.deadline,
            self.global_deadline,
        )


@dataclass
class _PendingWait:
    group: str
    instance_id: str
    at: float
    destination: str = "terminate"


@dataclass
class _Book:
    actions: list[_Action] = field(default_factory=list)
    pending: list[_PendingWait] = field(default_factory=list)
    calls: list[LifecycleCall] = field(default_factory=list)
    outcomes: list[tuple[str, LifecycleOutcome]] = field(default_factory=list)  # (group, outcome)
    faults: FaultQueues = field(default_factory=FaultQueues)


# -- public API ------------------------------------------------------------------------


def install() -> None:
    """Patch moto's Auto Scaling classes (idempotent)."""
    _patches.install()


def set_clock(fn: Callable[[], float]) -> None:
    """Use `fn` (seconds, monotonic) for deadlines; `reset()` restores `time.monotonic`."""
    global _clock
    with _lock:
        _clock = fn


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
    with _lock:
        backend, asg, state = _in_service(group, instance_id, account_id, region)
        if should_decrement:
            asg.desired_capacity = max(0, (asg.desired_capacity or 0) - 1)
        _begin(backend, asg, state, wait_delay)
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
    https://docs.aws.amazon.com/autoscaling/ec2/userguide/warm-pool-instance-lifecycle.html)."""
    install()
    with _lock:
        backend, _asg, _state = _in_service(group, instance_id, account_id, region)
        _enter_wait(backend, group, instance_id, _clock(), destination="warm-pool")


def _in_service(
    group: str, instance_id: str, account_id: str, region: str
) -> tuple[AutoScalingBackend, FakeAutoScalingGroup, InstanceState]:
    """The backend, group and state of an instance that must be InService (under _lock)."""
    backend = _backend(account_id, region)
    _tick(backend)
    asg = backend.autoscaling_groups.get(group)
    if asg is None:
        raise ValidationError(f"AutoScalingGroup name not found - {group}")
    state = _find_state(asg, instance_id)
    if state is None or state.lifecycle_state != "InService":
        raise ValidationError(f"Instance {instance_id} is not InService in {group}")
    return backend, asg, state


LEAVING_WARM_POOL: list[Callable[..., object]] = []
# After a root-volume replacement's terminating actions: local/rootvolume.py registers here.
ROOT_VOLUME_REPLACED: list[Callable[[AutoScalingBackend, str, str], object]] = []


def leave_warm_pool(
    group: str,
    instance_id: str,
    *,
    account_id: str = DEFAULT_ACCOUNT,
    region: str = DEFAULT_REGION,
) -> None:
    """A scale-out takes the instance from the warm pool back into service."""
    with _lock:
        backend = _backend(account_id, region)
        _tick(backend)
        asg = backend.autoscaling_groups.get(group)
        state = _find_state(asg, instance_id) if asg is not None else None
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
    with _lock:
        faults = _book(_backend(account_id, region)).faults
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
    with _lock:
        backend = _backend(account_id, region)
        _tick(backend)
        return [c for c in _book(backend).calls if group is None or c.group == group]


def outcomes(
    account_id: str = DEFAULT_ACCOUNT, region: str = DEFAULT_REGION, *, group: str | None = None
) -> list[LifecycleOutcome]:
    """Every lifecycle action that ended, oldest first."""
    with _lock:
        backend = _backend(account_id, region)
        _tick(backend)
        return [o for g, o in _book(backend).outcomes if group is None or g == group]


def active_actions(
    account_id: str = DEFAULT_ACCOUNT, region: str = DEFAULT_REGION, *, group: str | None = None
) -> list[ActiveAction]:
    """Lifecycle actions waiting for completion."""
    with _lock:
        backend = _backend(account_id, region)
        _tick(backend)
        return [a.snapshot() for a in _book(backend).actions if group is None or a.group == group]


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
    with _lock:
        _book(_backend(account_id, region)).faults.add(action, code, message, times)


def reset() -> None:
    """Forget recorded calls and outcomes and pending injected errors in every backend,
    and restore the default clock. Groups, instances and active actions stay: moto's own
    reset clears those."""
    global _clock
    with _lock:
        _clock = time.monotonic
        for account in autoscaling_backends.values():
            for backend in account.values():
                book = _book(backend)
                book.calls.clear()
                book.outcomes.clear()
                book.faults.clear()


# -- the model -------------------------------------------------------------------------


def _backend(account_id: str, region: str) -> AutoScalingBackend:
    backend: AutoScalingBackend = autoscaling_backends[account_id][region]
    return backend


def _book(backend: AutoScalingBackend) -> _Book:
    return attached(backend, _STATE_KEY, _Book, _Book)


def _terminating_hooks(backend: AutoScalingBackend, group: str) -> list[LifecycleHook]:
    return [
        hook
        for hook in backend.lifecycle_hooks.values()
        if hook.auto_scaling_group_name == group and hook.lifecycle_transition == TERMINATING
    ]


def _find_state(group: FakeAutoScalingGroup, instance_id: str) -> InstanceState | None:
    return next((s for s in group.instance_states if s.instance.id == instance_id), None)


def _begin(
    backend: AutoScalingBackend,
    group: FakeAutoScalingGroup,
    state: InstanceState,
    wait_delay: float,
) -> None:
    now = _clock()
    if wait_delay > 0:
        state.lifecycle_state = "Terminating"
        _book(backend).pending.append(_PendingWait(group.name, state.instance.id, now + wait_delay))
    else:
        _enter_wait(backend, group.name, state.instance.id, now)


def _enter_wait(
    backend: AutoScalingBackend,
    group_name: str,
    instance_id: str,
    at: float,
    destination: str = "terminate",
) -> None:
    group = backend.autoscaling_groups.get(group_name)
    state = _find_state(group, instance_id) if group is not None else None
    if group is None or state is None:
        return
    hooks = _terminating_hooks(backend, group_name)
    if not hooks:
        _proceed(backend, group_name, instance_id, destination)
        return
    state.lifecycle_state = {"warm-pool": WARM_WAIT, "root-volume": ROOT_WAIT}.get(destination, WAIT)
    for hook in hooks:
        timeout = int(hook.heartbeat_timeout)
        _book(backend).actions.append(
            _Action(
                token=str(uuid.uuid4()),
                group=group_name,
                hook=hook.name,
                instance_id=instance_id,
                heartbeat_timeout=timeout,
                default_result=hook.default_result,
                started=at,
                deadline=at + timeout,
                global_deadline=at + _global_timeout(timeout),
                destination=destination,
            )
        )


# States the stand-in does not reach on its own yet, which a test may put an instance in.
# Retained: a terminating action ended in ABANDON under an instance lifecycle policy; the
# instance stays until TerminateInstanceInAutoScalingGroup, with no action left to complete
# (https://docs.aws.amazon.com/autoscaling/ec2/userguide/instance-lifecycle-policy.html).
# Root volume: an instance refresh with the ReplaceRootVolume strategy
# (https://docs.aws.amazon.com/autoscaling/ec2/userguide/replace-root-volume.html).
HELD_STATES = (
    "Terminating:Retained",
    "Warmed:Terminating:Retained",
    "Warmed:Pending:Retained",
    "ReplacingRootVolume",
    "ReplacingRootVolume:Wait",
    "ReplacingRootVolume:Proceed",
    "RootVolumeReplaced",
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
    with _lock:
        backend = _backend(account_id, region)
        _tick(backend)
        asg = backend.autoscaling_groups.get(group)
        state = _find_state(asg, instance_id) if asg is not None else None
        if state is None:
            raise ValidationError(f"Instance {instance_id} is not in {group}")
        book = _book(backend)
        book.actions = [a for a in book.actions if a.instance_id != instance_id]
        state.lifecycle_state = state_name


def _global_timeout(heartbeat_timeout: int) -> int:
    return min(MAX_GLOBAL_TIMEOUT, GLOBAL_TIMEOUT_FACTOR * heartbeat_timeout)


def _finish(backend: AutoScalingBackend, action: _Action, result: str, how: str) -> None:
    book = _book(backend)
    book.actions.remove(action)
    book.outcomes.append((action.group, LifecycleOutcome(action.instance_id, action.hook, result, how)))
    same_instance = [a for a in book.actions if a.instance_id == action.instance_id]
    if result == "ABANDON":
        # ABANDON skips the instance's remaining hooks.
        for other in same_instance:
            book.actions.remove(other)
        same_instance = []
    if not same_instance:
        group = backend.autoscaling_groups.get(action.group)
        retained = action.destination != "root-volume" and retention.retains(backend, action.group, result)
        if group is not None and retained:
            retention.retain(backend, group, action.instance_id, action.destination)
        else:
            _proceed(backend, action.group, action.instance_id, action.destination)


def _proceed(
    backend: AutoScalingBackend, group_name: str, instance_id: str, destination: str = "terminate"
) -> None:
    """Terminating:Proceed: leave the group and terminate in EC2, with no replacement; or,
    for a return to the warm pool, park the instance there."""
    group = backend.autoscaling_groups.get(group_name)
    if group is None:
        return
    state = _find_state(group, instance_id)
    if state is None:
        return
    if destination == "warm-pool":
        state.lifecycle_state = WARM_PARKED
        return
    if destination == "root-volume":
        state.lifecycle_state = "ReplacingRootVolume:Proceed"
        for replaced in ROOT_VOLUME_REPLACED:
            replaced(backend, group_name, instance_id)
        return
    state.lifecycle_state = "Terminating:Proceed"
    group.instance_states = [s for s in group.instance_states if s is not state]
    backend.ec2_backend.terminate_instances([instance_id])
    backend.update_attached_elbs(group_name)
    backend.update_attached_target_groups(group_name)


def _tick(backend: AutoScalingBackend) -> None:
    """Apply everything whose time has come: delayed waits, then expired heartbeats."""
    book = _book(backend)
    now = _clock()
    for pending in sorted(book.pending, key=lambda p: p.at):
        if pending.at <= now:
            book.pending.remove(pending)
            _enter_wait(backend, pending.group, pending.instance_id, pending.at)
    for action in sorted(book.actions, key=lambda a: a.deadline):
        if action in book.actions and action.deadline <= now:
            _finish(backend, action, action.default_result, "expired")
    # Actions of instances that left the group another way (EC2 TerminateInstances,
    # DetachInstances, group deletion) can no longer be completed.
    book.actions = [a for a in book.actions if _still_waiting(backend, a)]


def _still_waiting(backend: AutoScalingBackend, action: _Action) -> bool:
    group = backend.autoscaling_groups.get(action.group)
    state = _find_state(group, action.instance_id) if group is not None else None
    return state is not None and state.lifecycle_state in WAIT_STATES


def _lookup(
    backend: AutoScalingBackend,
    group: str,
    hook: str,
    token: str | None,
    instance_id: str | None,
) -> _Action:
    if group not in backend.autoscaling_groups:
        raise ValidationError(f"AutoScalingGroup name not found - {group}")
    if f"{group}_{hook}" not in backend.lifecycle_hooks:
        raise ValidationError(f"No Lifecycle Hook found with name {hook} for group {group}")
    actions = [a for a in _book(backend).actions if a.group == group and a.hook == hook]
    if token:
        found = next((a for a in actions if a.token == token), None)
        if found is None:
            raise ValidationError(f"No active Lifecycle Action found with token {token}")
        return found
    if instance_id:
        found = next((a for a in actions if a.instance_id == instance_id), None)
        if found is None:
            raise ValidationError(f"No active Lifecycle Action found with instance ID {instance_id}")
        return found
    raise ValidationError("Either LifecycleActionToken or InstanceId must be specified")


def _take_fault(backend: AutoScalingBackend, action: str) -> Fault | None:
    return _book(backend).faults.take(action)


def _lifecycle_call(
    response: AutoScalingResponse,
    action: str,
    apply: Callable[[AutoScalingBackend, _Action], None],
) -> ActionResult:
    group = response._get_param("AutoScalingGroupName") or ""
    hook = response._get_param("LifecycleHookName") or ""
    token = response._get_param("LifecycleActionToken")
    instance_id = response._get_param("InstanceId")
    result = response._get_param("LifecycleActionResult") if action == COMPLETE else None
    backend = response.autoscaling_backend
    book = _book(backend)

    def record(outcome: str) -> None:
        book.calls.append(
            LifecycleCall(action, group, hook, instance_id, token, result, outcome, time.monotonic())
        )

    fault = _take_fault(backend, action)
    if fault is not None:
        record(fault.message)
        raise AutoscalingClientError(fault.code, fault.message)
    try:
        if action == COMPLETE and result not in RESULTS:
            raise ValidationError(
                f"Value '{result}' at 'lifecycleActionResult' failed to satisfy constraint: "
                "Member must be one of CONTINUE, ABANDON"
            )
        apply(backend, _lookup(backend, group, hook, token, instance_id))
    except AutoscalingClientError as err:
        record(str(err.message))
        raise
    record("ok")
    return EmptyResult()


def _complete(result: str) -> Callable[[AutoScalingBackend, _Action], None]:
    def apply(backend: AutoScalingBackend, action: _Action) -> None:
        _finish(backend, action, result, "completed")

    return apply


def _heartbeat(backend: AutoScalingBackend, action: _Action) -> None:
    action.deadline = min(_clock() + action.heartbeat_timeout, action.global_deadline)


def _instance_count_for(group: FakeAutoScalingGroup, desired: int) -> int:
    """How many instances moto runs for `desired` capacity (mirrors its mixed-policy math)."""
    policy = group.mixed_instances_policy or {}
    overrides = policy.get("LaunchTemplate", {}).get("Overrides", [])
    if not overrides:
        return desired
    distribution = policy.get("InstancesDistribution", {})
    base = int(distribution.get("OnDemandBaseCapacity", 0))
    percent = int(distribution.get("OnDemandPercentageAboveBaseCapacity", 100))
    weight_text = str(overrides[0].get("WeightedCapacity", "1"))
    weight = (int(weight_text) if weight_text.isdigit() else 1) or 1
    if base >= desired:
        on_demand, spot = desired, 0
    else:
        above = desired - base
        on_demand_above = int(above * percent) / 100.0
        spot = int(above - on_demand_above)
        on_demand = int(base + on_demand_above)
    return -(-on_demand // weight) + -(-spot // weight)


# -- patching --------------------------------------------------------------------------


def _patch() -> None:
    original_set_desired = FakeAutoScalingGroup.set_desired_capacity
    original_terminate = AutoScalingBackend.terminate_instance
    original_delete = AutoScalingBackend.delete_auto_scaling_group
    original_call_action = AutoScalingResponse.call_action
    original_hook_init = LifecycleHook.__init__

    def set_desired_capacity(self: FakeAutoScalingGroup, new_capacity: int | None) -> None:
        with _lock:
            backend = self.autoscaling_backend
            if _bypass_hooks or not _terminating_hooks(backend, self.name):
                original_set_desired(self, new_capacity)
                return
            desired = self.min_size if new_capacity is None else new_capacity
            target = _instance_count_for(self, desired or 0)
            in_service = [s for s in self.instance_states if s.lifecycle_state == "InService"]
            excess = len(in_service) - target
            if excess > 0:
                leaving = [s for s in in_service if not s.protected_from_scale_in][:excess]
                for state in leaving:
                    _begin(backend, self, state, 0.0)
            # moto's own scale-in must not pick instances that are already leaving.
            others = [s for s in self.instance_states if s.lifecycle_state != "InService"]
            saved = [s.protected_from_scale_in for s in others]
            for state in others:
                state.protected_from_scale_in = True
            try:
                original_set_desired(self, new_capacity)
            finally:
                for state, protected in zip(others, saved, strict=True):
                    state.protected_from_scale_in = protected

    def terminate_instance(
        self: AutoScalingBackend, instance_id: str, should_decrement: bool
    ) -> TerminateInstanceActivity:
        with _lock:
            state = next(
                (
                    s
                    for group in self.autoscaling_groups.values()
                    for s in group.instance_states
                    if s.instance.id == instance_id
                ),
                None,
            )
            if state is not None and state.lifecycle_state in retention.RETAINED_STATES:
                return _terminate_retained(self, state, should_decrement)
            if state is None or not _terminating_hooks(self, state.auto_scaling_group_name):
                return original_terminate(self, instance_id, should_decrement)
            group = self.autoscaling_groups[state.auto_scaling_group_name]
            original_size = group.desired_capacity or 0
            if state.lifecycle_state != "InService":
                # Already leaving: AWS doesn't start a second termination.
                return TerminateInstanceActivity(state.instance, original_size)
            if should_decrement:
                group.desired_capacity = original_size - 1
            activity = TerminateInstanceActivity(state.instance, original_size)
            _begin(self, group, state, 0.0)
            # Launches the replacement when the capacity was not decremented.
            group.set_desired_capacity(group.desired_capacity)
            return activity

    def delete_auto_scaling_group(self: AutoScalingBackend, group_name: str) -> None:
        global _bypass_hooks
        with _lock:
            _bypass_hooks = True
            try:
                original_delete(self, group_name)
            finally:
                _bypass_hooks = False
            book = _book(self)
            book.actions = [a for a in book.actions if a.group != group_name]
            book.pending = [p for p in book.pending if p.group != group_name]
            retention.forget(self, group_name)

    def call_action(self: AutoScalingResponse) -> Any:
        with _lock:
            backend = self.autoscaling_backend
            _tick(backend)
            action = self._get_action()
            if action not in (COMPLETE, HEARTBEAT):
                fault = _take_fault(backend, action)
                if fault is not None:
                    # An instance attribute shadows the class's method for this request only.
                    setattr(self, camelcase_to_underscores(action), _raiser(fault))
            with warnings.catch_warnings():
                # moto warns when an error code (e.g. an injected Throttling) is not in the
                # service model; the error is still rendered the way AWS renders it.
                warnings.filterwarnings("ignore", message=_UNMODELLED_ERROR, category=UserWarning)
                response = original_call_action(self)
            if action in ("CreateAutoScalingGroup", "UpdateAutoScalingGroup"):
                retention.record(backend, action, self._get_params())
            return response

    def complete_lifecycle_action(self: AutoScalingResponse) -> ActionResult:
        result = str(self._get_param("LifecycleActionResult"))
        return _lifecycle_call(self, COMPLETE, _complete(result))

    def record_lifecycle_action_heartbeat(self: AutoScalingResponse) -> ActionResult:
        return _lifecycle_call(self, HEARTBEAT, _heartbeat)

    def hook_init(self: LifecycleHook, *args: Any, **kwargs: Any) -> None:
        original_hook_init(self, *args, **kwargs)
        self.global_timeout = _global_timeout(int(self.heartbeat_timeout))

    FakeAutoScalingGroup.set_desired_capacity = set_desired_capacity  # type: ignore[method-assign]
    AutoScalingBackend.terminate_instance = terminate_instance  # type: ignore[method-assign]
    AutoScalingBackend.delete_auto_scaling_group = delete_auto_scaling_group  # type: ignore[method-assign]
    AutoScalingBackend.begin_termination = _backend_begin_termination  # type: ignore[attr-defined]
    AutoScalingResponse.call_action = call_action  # type: ignore[method-assign]
    AutoScalingResponse.complete_lifecycle_action = complete_lifecycle_action  # type: ignore[attr-defined]
    AutoScalingResponse.record_lifecycle_action_heartbeat = record_lifecycle_action_heartbeat  # type: ignore[attr-defined]
    LifecycleHook.__init__ = hook_init  # type: ignore[method-assign]


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


def _terminate_retained(
    backend: AutoScalingBackend, state: InstanceState, should_decrement: bool
) -> TerminateInstanceActivity:
    """TerminateInstanceInAutoScalingGroup on a retained instance: it has no lifecycle
    action left, so it terminates now (see retention.py for ShouldDecrementDesiredCapacity)."""
    group = backend.autoscaling_groups[state.auto_scaling_group_name]
    original_size = group.desired_capacity or 0
    if should_decrement:
        group.desired_capacity = max(0, original_size - 1)
    activity = TerminateInstanceActivity(state.instance, original_size)
    _proceed(backend, group.name, state.instance.id)
    group.set_desired_capacity(group.desired_capacity)
    return activity


def _raiser(fault: Fault) -> Callable[[], ActionResult]:
    def fail() -> ActionResult:
        raise AutoscalingClientError(fault.code, fault.message)

    return fail
