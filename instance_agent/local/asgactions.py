"""Lifecycle actions on the stand-in: a wait begun (one action per terminating hook), a
heartbeat, a completion, a deadline passed, and what follows the last one (terminated, parked
in the warm pool, a root volume replaced, or retained: local/retention.py)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from moto.autoscaling.exceptions import AutoscalingClientError, ValidationError
from moto.autoscaling.models import (
    AutoScalingBackend,
    FakeAutoScalingGroup,
    InstanceState,
    TerminateInstanceActivity,
)
from moto.autoscaling.responses import AutoScalingResponse
from moto.core.responses import ActionResult, EmptyResult

from instance_agent.local import retention
from instance_agent.local.asgmodel import (
    COMPLETE,
    GLOBAL_TIMEOUT_FACTOR,
    MAX_GLOBAL_TIMEOUT,
    RESULTS,
    ROOT_WAIT,
    WAIT,
    WAIT_STATES,
    WARM_PARKED,
    WARM_WAIT,
    BookedAction,
    LifecycleCall,
    LifecycleOutcome,
    PendingWait,
    book_of,
    clock,
    find_state,
    terminating_hooks,
)
from instance_agent.local.faults import Fault

# After a root-volume replacement's terminating actions: local/rootvolume.py registers here.
ROOT_VOLUME_REPLACED: list[Callable[[AutoScalingBackend, str, str], object]] = []


def begin_action(
    backend: AutoScalingBackend,
    group: FakeAutoScalingGroup,
    state: InstanceState,
    wait_delay: float,
) -> None:
    now = clock()
    if wait_delay > 0:
        state.lifecycle_state = "Terminating"
        book_of(backend).pending.append(PendingWait(group.name, state.instance.id, now + wait_delay))
    else:
        enter_wait(backend, group.name, state.instance.id, now)


def enter_wait(
    backend: AutoScalingBackend,
    group_name: str,
    instance_id: str,
    at: float,
    destination: str = "terminate",
) -> None:
    group = backend.autoscaling_groups.get(group_name)
    state = find_state(group, instance_id) if group is not None else None
    if group is None or state is None:
        return
    hooks = terminating_hooks(backend, group_name)
    if not hooks:
        _proceed(backend, group_name, instance_id, destination)
        return
    state.lifecycle_state = {"warm-pool": WARM_WAIT, "root-volume": ROOT_WAIT}.get(destination, WAIT)
    for hook in hooks:
        timeout = int(hook.heartbeat_timeout)
        book_of(backend).actions.append(
            BookedAction(
                token=str(uuid.uuid4()),
                group=group_name,
                hook=hook.name,
                instance_id=instance_id,
                heartbeat_timeout=timeout,
                default_result=hook.default_result,
                started=at,
                deadline=at + timeout,
                global_deadline=at + global_timeout_for(timeout),
                destination=destination,
            )
        )


def global_timeout_for(heartbeat_timeout: int) -> int:
    return min(MAX_GLOBAL_TIMEOUT, GLOBAL_TIMEOUT_FACTOR * heartbeat_timeout)


def _finish(backend: AutoScalingBackend, action: BookedAction, result: str, how: str) -> None:
    book = book_of(backend)
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
            retention.begin(backend, group, action.instance_id, action.destination)
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
    state = find_state(group, instance_id)
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


def tick(backend: AutoScalingBackend) -> None:
    """Apply everything whose time has come: delayed waits, then expired heartbeats."""
    book = book_of(backend)
    now = clock()
    for pending in sorted(book.pending, key=lambda p: p.at):
        if pending.at <= now:
            book.pending.remove(pending)
            enter_wait(backend, pending.group, pending.instance_id, pending.at)
    for action in sorted(book.actions, key=lambda a: a.deadline):
        if action in book.actions and action.deadline <= now:
            _finish(backend, action, action.default_result, "expired")
    for leaving in sorted(book.retaining, key=lambda r: r.at):
        if leaving.at <= now:
            book.retaining.remove(leaving)
            group = backend.autoscaling_groups.get(leaving.group)
            if group is not None:
                retention.retain(backend, group, leaving.instance_id, leaving.destination)
    # Actions of instances that left the group another way (EC2 TerminateInstances,
    # DetachInstances, group deletion) can no longer be completed.
    book.actions = [a for a in book.actions if _still_waiting(backend, a)]


def _still_waiting(backend: AutoScalingBackend, action: BookedAction) -> bool:
    group = backend.autoscaling_groups.get(action.group)
    state = find_state(group, action.instance_id) if group is not None else None
    return state is not None and state.lifecycle_state in WAIT_STATES


def _lookup(
    backend: AutoScalingBackend,
    group: str,
    hook: str,
    token: str | None,
    instance_id: str | None,
) -> BookedAction:
    if group not in backend.autoscaling_groups:
        raise ValidationError(f"AutoScalingGroup name not found - {group}")
    if f"{group}_{hook}" not in backend.lifecycle_hooks:
        raise ValidationError(f"No Lifecycle Hook found with name {hook} for group {group}")
    actions = [a for a in book_of(backend).actions if a.group == group and a.hook == hook]
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


def take_fault(backend: AutoScalingBackend, action: str) -> Fault | None:
    return book_of(backend).faults.take(action)


def lifecycle_call(
    response: AutoScalingResponse,
    action: str,
    apply: Callable[[AutoScalingBackend, BookedAction], None],
) -> ActionResult:
    group = response._get_param("AutoScalingGroupName") or ""
    hook = response._get_param("LifecycleHookName") or ""
    token = response._get_param("LifecycleActionToken")
    instance_id = response._get_param("InstanceId")
    result = response._get_param("LifecycleActionResult") if action == COMPLETE else None
    backend = response.autoscaling_backend
    book = book_of(backend)

    def record(outcome: str) -> None:
        book.calls.append(
            LifecycleCall(action, group, hook, instance_id, token, result, outcome, time.monotonic())
        )

    fault = take_fault(backend, action)
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


def complete_with(result: str) -> Callable[[AutoScalingBackend, BookedAction], None]:
    def apply(backend: AutoScalingBackend, action: BookedAction) -> None:
        _finish(backend, action, result, "completed")

    return apply


def record_heartbeat(backend: AutoScalingBackend, action: BookedAction) -> None:
    action.deadline = min(clock() + action.heartbeat_timeout, action.global_deadline)


def terminate_retained(
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
