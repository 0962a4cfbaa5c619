"""The stand-in's lifecycle actions as kept on moto's Auto Scaling backend: their types, the
book of one backend (actions, delayed waits, calls, outcomes, injected errors), and the clock.

State lives on moto's backend objects, so moto's reset clears it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from moto.autoscaling.models import (
    AutoScalingBackend,
    FakeAutoScalingGroup,
    InstanceState,
    LifecycleHook,
    autoscaling_backends,
)

from instance_agent.local.faults import FaultQueues, attached

DEFAULT_ACCOUNT = "123456789012"
DEFAULT_REGION = "us-east-1"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
RESULTS = ("CONTINUE", "ABANDON")
COMPLETE = "CompleteLifecycleAction"
HEARTBEAT = "RecordLifecycleActionHeartbeat"
# AWS ends a lifecycle action after min(48 h, 100 × HeartbeatTimeout), heartbeats or not
# (docs/aws-behaviour.md, "Lifecycle hooks").
MAX_GLOBAL_TIMEOUT = 172_800
GLOBAL_TIMEOUT_FACTOR = 100

WAIT = "Terminating:Wait"
WARM_WAIT = "Warmed:Pending:Wait"
WARM_PARKED = "Warmed:Stopped"
ROOT_WAIT = "ReplacingRootVolume:Wait"  # root-volume replacement: local/rootvolume.py
WAIT_STATES = (WAIT, WARM_WAIT, ROOT_WAIT)
_STATE_KEY = "_instance_agent_lifecycle"
_clock: Callable[[], float] = time.monotonic


def clock() -> float:
    """The time on the clock deadlines are kept on (autoscaling.set_clock)."""
    return _clock()


def use_clock(fn: Callable[[], float]) -> None:
    global _clock
    _clock = fn


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
class BookedAction:
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
class PendingWait:
    group: str
    instance_id: str
    at: float
    destination: str = "terminate"


@dataclass
class _Book:
    actions: list[BookedAction] = field(default_factory=list)
    pending: list[PendingWait] = field(default_factory=list)
    # Instances abandoned under a retain policy, still in their wait's Proceed state until
    # `at` (local/retention.py).
    retaining: list[PendingWait] = field(default_factory=list)
    calls: list[LifecycleCall] = field(default_factory=list)
    outcomes: list[tuple[str, LifecycleOutcome]] = field(default_factory=list)  # (group, outcome)
    faults: FaultQueues = field(default_factory=FaultQueues)


def backend_for(account_id: str, region: str) -> AutoScalingBackend:
    backend: AutoScalingBackend = autoscaling_backends[account_id][region]
    return backend


def book_of(backend: AutoScalingBackend) -> _Book:
    return attached(backend, _STATE_KEY, _Book, _Book)


def terminating_hooks(backend: AutoScalingBackend, group: str) -> list[LifecycleHook]:
    return [
        hook
        for hook in backend.lifecycle_hooks.values()
        if hook.auto_scaling_group_name == group and hook.lifecycle_transition == TERMINATING
    ]


def find_state(group: FakeAutoScalingGroup, instance_id: str) -> InstanceState | None:
    return next((s for s in group.instance_states if s.instance.id == instance_id), None)
