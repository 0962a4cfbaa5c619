"""Lifecycle against a scripted Auto Scaling: where the instance is, retries, deadlines."""

from __future__ import annotations

import threading

import pytest
from fakes import FakeAutoScaling, FakeClock, client_error, connection_error

from instance_agent import states
from instance_agent.errors import Cancelled, LifecycleError, WaitTimeout
from instance_agent.lifecycle import (
    ACTIVE,
    GONE,
    NOT_TERMINATING,
    REPLACING,
    RETAINED,
    ROOT_VOLUME,
    WARM_RETURN,
    HookTarget,
    Lifecycle,
    default_interval,
    discover,
    translate,
)

TOKEN = "0f8e2b2c-8d1c-4e57-9a51-6c0f3b0e9d11"


def make(fake: FakeAutoScaling, clock: FakeClock, token: str | None = None) -> Lifecycle:
    target = HookTarget("web", "drain", 300, fake.instance_id, token)
    return Lifecycle(fake, target, clock=clock, sleep=clock.sleep)


def test_in_service_without_a_sign_of_leaving_is_ad_hoc_at_once() -> None:
    fake, clock = FakeAutoScaling(states=["InService"]), FakeClock()
    assert make(fake, clock).locate(deadline=clock() + 3900, expect_termination=False) == NOT_TERMINATING
    assert clock.sleeps == [] and fake.count("RecordLifecycleActionHeartbeat") == 0


def test_deregistration_delay_is_waited_out_then_the_action_is_confirmed() -> None:
    # IMDS said Terminated; Auto Scaling lags (InService), deregisters (Terminating) for
    # 300 s, then holds the instance.
    states: list[str | None] = ["InService"] + ["Terminating"] * 30 + ["Terminating:Wait"]
    fake, clock = FakeAutoScaling(states=states), FakeClock()
    lc = make(fake, clock)
    assert lc.locate(deadline=clock() + 3900, expect_termination=True) == ACTIVE
    assert lc.confirmed.is_set()
    assert fake.count("CompleteLifecycleAction") == 0
    # Polling backs off: a 3600 s delay would not cost 1,800 calls.
    assert max(clock.sleeps) == 15.0


def test_wait_that_never_comes_times_out() -> None:
    fake, clock = FakeAutoScaling(states=["Terminating"]), FakeClock()
    with pytest.raises(WaitTimeout):
        make(fake, clock).locate(deadline=clock() + 120, expect_termination=True)
    assert clock() <= 1000 + 120


def test_warm_pool_return_is_told_from_a_launch_into_the_pool() -> None:
    clock = FakeClock()
    ours = FakeAutoScaling(states=["Warmed:Pending:Wait"], live=True)
    assert make(ours, clock).locate(deadline=clock() + 60, expect_termination=False) == WARM_RETURN
    launch = FakeAutoScaling(states=["Warmed:Pending:Wait"], live=False)  # a launching hook's
    assert make(launch, clock).locate(deadline=clock() + 60, expect_termination=False) == NOT_TERMINATING


def test_wait_state_without_a_live_action_of_ours_is_gone() -> None:
    fake, clock = FakeAutoScaling(states=["Terminating:Wait"], live=False), FakeClock()
    assert make(fake, clock).locate(deadline=clock() + 60, expect_termination=True) == GONE


def test_with_a_token_the_probe_decides_even_when_describe_lags() -> None:
    fake, clock = FakeAutoScaling(states=["InService"], live=True), FakeClock()
    lc = make(fake, clock, TOKEN)
    assert lc.locate(deadline=clock() + 60, expect_termination=True) == ACTIVE
    assert fake.calls[-1][1]["LifecycleActionToken"] == TOKEN


def test_transient_describe_errors_are_retried_permanent_ones_raise() -> None:
    fake = FakeAutoScaling(
        states=["Terminating:Wait"],
        errors={
            "DescribeAutoScalingInstances": [client_error("Throttling", "Rate exceeded"), connection_error()]
        },
    )
    clock = FakeClock()
    assert make(fake, clock).locate(deadline=clock() + 60, expect_termination=True) == ACTIVE
    denied = FakeAutoScaling(
        errors={"DescribeAutoScalingInstances": [client_error("AccessDenied", "not authorized", 403)]}
    )
    with pytest.raises(LifecycleError) as info:
        make(denied, clock).locate(deadline=clock() + 60, expect_termination=True)
    assert not info.value.retryable


def test_cancel_ends_the_wait() -> None:
    fake, clock = FakeAutoScaling(states=["Terminating"]), FakeClock()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        make(fake, clock).locate(deadline=clock() + 3900, expect_termination=True, cancel=cancel)


def test_access_denied_on_completion_is_not_retried() -> None:
    fake = FakeAutoScaling(
        errors={"CompleteLifecycleAction": [client_error("AccessDenied", "User is not authorized", 403)] * 50}
    )
    clock = FakeClock()
    lc = make(fake, clock)
    lc.confirmed.set()
    error = lc.complete("CONTINUE", timeout=5)
    assert error is not None and "AccessDenied" in error
    assert fake.count("CompleteLifecycleAction") == 1 and clock.sleeps == []


def test_throttled_completion_is_retried_within_complete_timeout() -> None:
    fake = FakeAutoScaling(
        errors={"CompleteLifecycleAction": [client_error("Throttling", "Rate exceeded")] * 100}
    )
    clock = FakeClock()
    lc = make(fake, clock)
    lc.confirmed.set()
    error = lc.complete("CONTINUE", timeout=5)
    assert error is not None and "gave up after 5 s" in error
    assert sum(clock.sleeps) <= 5


def test_throttled_then_accepted_completion_succeeds() -> None:
    fake = FakeAutoScaling(
        errors={
            "CompleteLifecycleAction": [
                client_error("Throttling", "Rate exceeded"),
                client_error("InternalFailure", "x", 500),
            ]
        }
    )
    clock = FakeClock()
    lc = make(fake, clock)
    lc.confirmed.set()
    assert lc.complete("ABANDON", timeout=60) is None
    assert fake.calls[-1][1]["LifecycleActionResult"] == "ABANDON"


def test_early_completion_is_retried_until_the_wait_state() -> None:
    # The early-Terminated race: "No active …" while Auto Scaling is still deregistering.
    fake = FakeAutoScaling(states=["Terminating", "Terminating:Wait"], live=False)
    clock = FakeClock()
    lc = make(fake, clock)
    calls = {"n": 0}
    original = fake.complete_lifecycle_action

    def complete(**kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            fake.live = True  # the action begins
        return original(**kwargs)

    fake.complete_lifecycle_action = complete  # type: ignore[method-assign]
    assert lc.complete("CONTINUE", timeout=60) is None
    assert calls["n"] == 2


def test_no_active_action_after_confirmation_is_final() -> None:
    fake, clock = FakeAutoScaling(live=False), FakeClock()
    lc = make(fake, clock)
    lc.confirmed.set()
    error = lc.complete("CONTINUE", timeout=60)
    assert error is not None and error.startswith("No active Lifecycle Action")
    assert lc.gone.is_set() and fake.count("CompleteLifecycleAction") == 1


def test_stop_shortens_completion_retries() -> None:
    fake = FakeAutoScaling(
        errors={"CompleteLifecycleAction": [client_error("Throttling", "Rate exceeded")] * 1000}
    )
    clock = FakeClock()
    lc = make(fake, clock)
    lc.confirmed.set()
    stop = threading.Event()
    stop.set()
    assert lc.complete("ABANDON", timeout=600, stop=stop) is not None
    assert sum(clock.sleeps) <= 20


def test_token_never_appears_in_an_error_text() -> None:
    err = translate(
        client_error("ValidationError", f"No active Lifecycle Action found with token {TOKEN}"),
        "CompleteLifecycleAction",
        TOKEN,
    )
    assert TOKEN not in str(err) and "<token " in str(err)


def test_heartbeat_interval_is_a_third_of_the_timeout_within_bounds() -> None:
    assert default_interval(300) == 100.0
    assert default_interval(7200) == 600.0
    assert default_interval(1) == 1.0


def test_discover_refuses_two_terminating_hooks_without_a_name() -> None:
    fake = FakeAutoScaling()
    fake.hooks = [
        *fake.hooks,
        {"LifecycleHookName": "other", "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING"},
    ]
    with pytest.raises(LifecycleError, match="several terminating hooks"):
        discover(fake, fake.instance_id, group="web", hook=None, token=None)
    assert discover(fake, fake.instance_id, group="web", hook="other", token=None) is not None


# --- every LifecycleState of the botocore model, classified on purpose --------------------


def _botocore_lifecycle_states() -> list[str]:
    import botocore.session

    model = botocore.session.get_session().get_service_model("autoscaling")
    return list(model.shape_for("LifecycleState").enum)


def test_the_state_table_knows_every_state_of_the_botocore_model() -> None:
    # Fails when botocore gains a state that instance_agent/states.py does not classify.
    assert sorted(_botocore_lifecycle_states()) == sorted(states.TABLE)


EXPECTED_KIND = {
    "Pending": states.LAUNCHING,
    "Pending:Wait": states.LAUNCHING,
    "Pending:Proceed": states.LAUNCHING,
    "Quarantined": states.SERVING,
    "InService": states.SERVING,
    "Terminating": states.ON_THE_WAY,
    "Terminating:Wait": states.TERMINATING_WAIT,
    "Terminating:Proceed": states.PAST_WAIT,
    "Terminating:Retained": states.RETAINED,
    "Terminated": states.PAST_WAIT,
    "Detaching": states.SERVING,
    "Detached": states.SERVING,
    "EnteringStandby": states.SERVING,
    "Standby": states.SERVING,
    "ReplacingRootVolume": states.ROOT_VOLUME,
    "ReplacingRootVolume:Wait": states.ROOT_VOLUME,
    "ReplacingRootVolume:Proceed": states.ROOT_VOLUME,
    "RootVolumeReplaced": states.ROOT_VOLUME,
    "Warmed:Pending": states.ON_THE_WAY,
    "Warmed:Pending:Wait": states.POOL_ENTRY_WAIT,
    "Warmed:Pending:Proceed": states.WARMED,
    "Warmed:Pending:Retained": states.RETAINED,
    "Warmed:Terminating": states.ON_THE_WAY,
    "Warmed:Terminating:Wait": states.TERMINATING_WAIT,
    "Warmed:Terminating:Proceed": states.PAST_WAIT,
    "Warmed:Terminating:Retained": states.RETAINED,
    "Warmed:Terminated": states.PAST_WAIT,
    "Warmed:Stopped": states.WARMED,
    "Warmed:Running": states.WARMED,
    "Warmed:Hibernated": states.WARMED,
}


@pytest.mark.parametrize("state", sorted(EXPECTED_KIND))
def test_each_state_is_classified(state: str) -> None:
    assert states.classify(state) == EXPECTED_KIND[state]


def test_a_state_newer_than_the_table_is_unknown() -> None:
    assert states.classify("Warmed:Something:New") == states.UNKNOWN


# What locate() answers in each state, with no sign of leaving (an ad-hoc look) and no live
# action of ours: retained and root-volume states are never "in service", so no later
# trigger takes them for an ad-hoc run.
LOCATE_NO_ACTION = {
    states.SERVING: NOT_TERMINATING,
    states.LAUNCHING: NOT_TERMINATING,
    states.POOL_ENTRY_WAIT: NOT_TERMINATING,
    states.TERMINATING_WAIT: GONE,
    states.PAST_WAIT: GONE,
    states.WARMED: NOT_TERMINATING,
    states.RETAINED: RETAINED,
    states.ROOT_VOLUME: REPLACING,
}


@pytest.mark.parametrize("state", sorted(s for s, k in EXPECTED_KIND.items() if k != states.ON_THE_WAY))
def test_locate_answers_every_settled_state_deliberately(state: str) -> None:
    fake, clock = FakeAutoScaling(states=[state], live=False), FakeClock()
    found = make(fake, clock).locate(deadline=clock() + 60, expect_termination=False)
    assert found == LOCATE_NO_ACTION[states.classify(state)]


def test_a_live_root_volume_wait_is_ours_and_its_approach_is_waited_for() -> None:
    # Our terminating hook holds the replacement in ReplacingRootVolume:Wait
    # (replace-root-volume.html): a live probe makes it ROOT_VOLUME, never a termination.
    fake, clock = FakeAutoScaling(states=["ReplacingRootVolume:Wait"], live=True), FakeClock()
    assert make(fake, clock).locate(deadline=clock() + 60, expect_termination=False) == ROOT_VOLUME
    # With a token, the state before the wait is waited out, not taken for "gone".
    fake = FakeAutoScaling(states=["ReplacingRootVolume", "ReplacingRootVolume", "ReplacingRootVolume:Wait"])
    found = make(fake, clock, TOKEN).locate(deadline=clock() + 60, expect_termination=True)
    assert found == ROOT_VOLUME and fake.count("DescribeAutoScalingInstances") == 3
    # Without any sign, it is not ours to wait for.
    fake = FakeAutoScaling(states=["ReplacingRootVolume"], live=True)
    assert make(fake, clock).locate(deadline=clock() + 60, expect_termination=False) == REPLACING
    assert fake.count("RecordLifecycleActionHeartbeat") == 0


@pytest.mark.parametrize("state", states.states_of(states.RETAINED))
def test_retained_is_retained_even_with_a_token_and_completes_nothing(state: str) -> None:
    fake, clock = FakeAutoScaling(states=[state], live=False), FakeClock()
    assert make(fake, clock, TOKEN).locate(deadline=clock() + 60, expect_termination=True) == RETAINED
    assert fake.count("CompleteLifecycleAction") == 0 and fake.count("RecordLifecycleActionHeartbeat") == 0
