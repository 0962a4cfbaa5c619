"""moto's Auto Scaling classes patched for lifecycle hooks: a scale-in, a terminate, a group
deleted, the two lifecycle calls moto lacks, and injected errors on any other action."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

from moto.autoscaling.exceptions import AutoscalingClientError
from moto.autoscaling.models import (
    AutoScalingBackend,
    FakeAutoScalingGroup,
    LifecycleHook,
    TerminateInstanceActivity,
)
from moto.autoscaling.responses import AutoScalingResponse
from moto.core.responses import ActionResult
from moto.core.utils import camelcase_to_underscores

from instance_agent.local import retention
from instance_agent.local.asgactions import (
    begin_action,
    complete_with,
    global_timeout_for,
    lifecycle_call,
    record_heartbeat,
    take_fault,
    terminate_retained,
    tick,
)
from instance_agent.local.asgmodel import COMPLETE, HEARTBEAT, book_of, terminating_hooks
from instance_agent.local.faults import Fault

_UNMODELLED_ERROR = r"Exception\(AutoscalingClientError\) with code "
_bypass_hooks = False  # set while a group is being deleted: no hooks then


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


def patch(_lock: threading.RLock, begin_termination: Callable[..., None]) -> None:
    """Patch the classes (once: autoscaling.install); `_lock` keeps each request atomic."""
    original_set_desired = FakeAutoScalingGroup.set_desired_capacity
    original_terminate = AutoScalingBackend.terminate_instance
    original_delete = AutoScalingBackend.delete_auto_scaling_group
    original_call_action = AutoScalingResponse.call_action
    original_hook_init = LifecycleHook.__init__

    def set_desired_capacity(self: FakeAutoScalingGroup, new_capacity: int | None) -> None:
        with _lock:
            backend = self.autoscaling_backend
            if _bypass_hooks or not terminating_hooks(backend, self.name):
                original_set_desired(self, new_capacity)
                return
            desired = self.min_size if new_capacity is None else new_capacity
            target = _instance_count_for(self, desired or 0)
            in_service = [s for s in self.instance_states if s.lifecycle_state == "InService"]
            excess = len(in_service) - target
            if excess > 0:
                leaving = [s for s in in_service if not s.protected_from_scale_in][:excess]
                for state in leaving:
                    begin_action(backend, self, state, 0.0)
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
                return terminate_retained(self, state, should_decrement)
            if state is None or not terminating_hooks(self, state.auto_scaling_group_name):
                return original_terminate(self, instance_id, should_decrement)
            group = self.autoscaling_groups[state.auto_scaling_group_name]
            original_size = group.desired_capacity or 0
            if state.lifecycle_state != "InService":
                # Already leaving: AWS doesn't start a second termination.
                return TerminateInstanceActivity(state.instance, original_size)
            if should_decrement:
                group.desired_capacity = original_size - 1
            activity = TerminateInstanceActivity(state.instance, original_size)
            begin_action(self, group, state, 0.0)
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
            book = book_of(self)
            book.actions = [a for a in book.actions if a.group != group_name]
            book.pending = [p for p in book.pending if p.group != group_name]
            retention.forget(self, group_name)

    def call_action(self: AutoScalingResponse) -> Any:
        with _lock:
            backend = self.autoscaling_backend
            tick(backend)
            action = self._get_action()
            if action not in (COMPLETE, HEARTBEAT):
                fault = take_fault(backend, action)
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
        return lifecycle_call(self, COMPLETE, complete_with(result))

    def record_lifecycle_action_heartbeat(self: AutoScalingResponse) -> ActionResult:
        return lifecycle_call(self, HEARTBEAT, record_heartbeat)

    def hook_init(self: LifecycleHook, *args: Any, **kwargs: Any) -> None:
        original_hook_init(self, *args, **kwargs)
        self.global_timeout = global_timeout_for(int(self.heartbeat_timeout))

    FakeAutoScalingGroup.set_desired_capacity = set_desired_capacity  # type: ignore[method-assign]
    AutoScalingBackend.terminate_instance = terminate_instance  # type: ignore[method-assign]
    AutoScalingBackend.delete_auto_scaling_group = delete_auto_scaling_group  # type: ignore[method-assign]
    AutoScalingBackend.begin_termination = begin_termination  # type: ignore[attr-defined]
    AutoScalingResponse.call_action = call_action  # type: ignore[method-assign]
    AutoScalingResponse.complete_lifecycle_action = complete_lifecycle_action  # type: ignore[attr-defined]
    AutoScalingResponse.record_lifecycle_action_heartbeat = record_lifecycle_action_heartbeat  # type: ignore[attr-defined]
    LifecycleHook.__init__ = hook_init  # type: ignore[method-assign]


def _raiser(fault: Fault) -> Callable[[], ActionResult]:
    def fail() -> ActionResult:
        raise AutoscalingClientError(fault.code, fault.message)

    return fail
