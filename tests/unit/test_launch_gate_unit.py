"""The launch gate's decision: answer a launching wait once per (boot, state), else nothing."""

from __future__ import annotations

import pytest

from instance_agent import launch_gate
from instance_agent.launch_gate import action_key, decide


@pytest.mark.parametrize("state", ["Pending:Wait", "Warmed:Pending:Wait"])
def test_a_launching_wait_not_yet_answered_is_answered(state: str) -> None:
    assert decide(state, action_key("boot-1", state), []).answer


@pytest.mark.parametrize("state", [None, "InService", "Warmed:Stopped", "Pending", "Terminating:Wait"])
def test_no_launching_wait_answers_nothing(state: str | None) -> None:
    decision = decide(state, action_key("boot-1", state), [])
    assert not decision.answer and "no launching action" in decision.reason


def test_the_same_action_is_not_answered_twice_but_the_next_boots_is() -> None:
    first = action_key("boot-1\n", "Warmed:Pending:Wait")
    assert not decide("Warmed:Pending:Wait", first, [first]).answer
    # Out of the pool on the next boot: a new action.
    assert decide("Pending:Wait", action_key("boot-2", "Pending:Wait"), [first]).answer
    assert decide("Pending:Wait", action_key("boot-1", "Pending:Wait"), [first]).answer


class _Group:
    """DescribeAutoScalingInstances from a script of states (the last repeats)."""

    def __init__(self, *states: str) -> None:
        self.states = list(states)

    def describe_auto_scaling_instances(self, **_: object) -> dict[str, object]:
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return {"AutoScalingInstances": [{"LifecycleState": state, "AutoScalingGroupName": "web"}]}


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _settle(group: _Group, clock: _Clock) -> str:
    [found] = launch_gate._settled(group, "i-1", sleep=clock.sleep, clock=lambda: clock.now)
    return str(found["LifecycleState"])


@pytest.mark.parametrize(
    ("before", "wait"), [("Pending", "Pending:Wait"), ("Warmed:Pending", "Warmed:Pending:Wait")]
)
def test_the_gate_waits_through_pending_for_the_launching_wait(before: str, wait: str) -> None:
    clock = _Clock()
    assert _settle(_Group(before, before, wait), clock) == wait
    assert clock.sleeps == [1.0, 2.0]


def test_the_gate_does_not_wait_for_a_state_past_pending() -> None:
    clock = _Clock()
    assert _settle(_Group("InService"), clock) == "InService"
    assert clock.sleeps == []


def test_the_gate_stops_waiting_after_pending_for() -> None:
    clock = _Clock()
    assert _settle(_Group("Pending"), clock) == "Pending"
    assert sum(clock.sleeps) == launch_gate.PENDING_FOR
