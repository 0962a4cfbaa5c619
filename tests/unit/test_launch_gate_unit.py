"""The launch gate's decision: answer a launching wait once per (boot, state), else nothing."""

from __future__ import annotations

import pytest

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
