"""The retained instance's retry loop and schedule, with fakes and a fake clock."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from instance_agent import retained


def test_schedule_first_retry_within_a_minute_doubling_and_capped_at_15_minutes() -> None:
    waits = [retained.delay(n, 30.0) for n in range(8)]
    assert waits == [30.0, 60.0, 120.0, 240.0, 480.0, 900.0, 900.0, 900.0]
    assert retained.delay(10_000, 30.0) == 900.0


def test_next_wait_stops_when_the_budget_is_spent() -> None:
    assert retained.next_wait(0, now=0.0, give_up_at=100.0, first=30.0) == 30.0
    assert retained.next_wait(2, now=0.0, give_up_at=100.0, first=30.0) is None


def test_retained_states() -> None:
    for s in ("Terminating:Retained", "Warmed:Terminating:Retained", "Warmed:Pending:Retained"):
        assert retained.is_retained(s)
    for s in ("Terminating:Proceed", "InService", "", None):
        assert not retained.is_retained(s)


class Looks:
    """DescribeAutoScalingInstances as `settles_retained` sees it: one state per look, the
    last one from then on; waits advance a fake clock."""

    def __init__(self, *states: str | None, cancel_at: int | None = None) -> None:
        self.states = list(states)
        self.now = 0.0
        self.waits: list[float] = []
        self.looked = 0
        self.cancel_at = cancel_at

    def look(self) -> str | None:
        self.looked += 1
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += seconds
        return self.cancel_at is not None and len(self.waits) >= self.cancel_at

    def settles(self, settle_for: float = retained.SETTLE_FOR) -> bool | None:
        return retained.settles_retained(self.look, self.wait, lambda: self.now, settle_for)


def test_a_retained_instance_seen_in_proceed_first_is_retained() -> None:
    """Right after the ABANDON, AWS shows Terminating:Proceed ("Manage retained instances");
    asked once, the agent took it for not retained and never retried."""
    looks = Looks("Terminating:Proceed", "Terminating:Proceed", "Terminating:Retained")
    assert looks.settles() is True
    assert (looks.looked, looks.waits) == (3, [1.0, 2.0])


def test_the_other_retained_states_after_their_proceed() -> None:
    assert Looks("Warmed:Pending:Proceed", "Warmed:Pending:Retained").settles() is True
    assert Looks("Warmed:Terminating:Proceed", "Warmed:Terminating:Retained").settles() is True


def test_an_instance_that_goes_on_terminating_is_not_retained() -> None:
    assert Looks("Terminating:Proceed", None).settles() is False  # left the group
    assert Looks("Terminating:Proceed", "Terminated").settles() is False
    assert Looks("InService").settles() is False
    assert Looks("Terminating:Retained").settles() is True


def test_looks_back_off_and_stop_when_the_time_is_spent() -> None:
    looks = Looks("Terminating:Proceed")
    assert looks.settles(settle_for=100.0) is False
    assert looks.waits == [1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0, 15.0, 15.0, 10.0]
    assert sum(looks.waits) == 100.0


def test_auto_scaling_unreachable_counts_as_retained_once_the_time_is_spent() -> None:
    """Keep the instance's data safe: the retry loop asks again before every attempt."""
    assert Looks(retained.UNKNOWN).settles(settle_for=30.0) is True
    assert Looks(retained.UNKNOWN, "Terminating:Retained").settles() is True
    assert Looks(retained.UNKNOWN, "Terminated").settles() is False


def test_a_stop_while_waiting_to_tell_is_cancelled() -> None:
    assert Looks("Terminating:Proceed", cancel_at=2).settles() is None


class World:
    def __init__(self, fail_times: int) -> None:
        self.now = 0.0
        self.fail_times = fail_times
        self.backups = 0
        self.terminated = 0
        self.metrics: list[tuple[float, str]] = []
        self.sns: list[dict[str, Any]] = []
        self.still_retained = True

    def backup(self) -> Mapping[str, Any]:
        self.backups += 1
        if self.backups <= self.fail_times:
            return {"status": "failed", "error": "AccessDenied"}
        return {"status": "succeeded", "key": "k/archive.tar.zst"}

    def wait(self, seconds: float) -> bool:
        self.now += seconds
        return False

    def effects(self) -> retained.Effects:
        return retained.Effects(
            backup=self.backup,
            retained=lambda: self.still_retained,
            terminate=lambda: setattr(self, "terminated", self.terminated + 1),
            metric=lambda name: self.metrics.append((self.now, name)),
            notify=lambda msg: self.sns.append(dict(msg)),
            wait=self.wait,
            clock=lambda: self.now,
        )


def test_recovers_after_failures_terminates_once_and_reports_twice() -> None:
    w = World(fail_times=3)
    out = retained.recover(w.effects(), instance_id="i-1", retry_for=86400.0, first=30.0)
    assert out == retained.RECOVERED
    assert w.backups == 4 and w.terminated == 1
    assert [m["event"] for m in w.sns] == ["instance_retained", "retained_recovered"]
    assert w.sns[1]["key"] == "k/archive.tar.zst" and w.sns[1]["attempts"] == 4
    names = [n for _t, n in w.metrics]
    assert names == ["InstanceRetained"] * 5 + ["RetainedRecovered"]
    # attempts at 30, 90, 210, 450 s
    assert [t for t, n in w.metrics if n == "InstanceRetained"] == [0.0, 30.0, 90.0, 210.0, 450.0]


def test_gives_up_when_the_budget_is_spent_and_never_terminates() -> None:
    w = World(fail_times=10_000)
    out = retained.recover(w.effects(), instance_id="i-1", retry_for=3600.0, first=30.0)
    assert out == retained.GAVE_UP
    assert w.terminated == 0
    assert [m["event"] for m in w.sns] == ["instance_retained", "retained_gave_up"]
    assert w.sns[1]["last_error"] == "AccessDenied"
    retained_at = [t for t, n in w.metrics if n == "InstanceRetained"]
    assert all(b - a <= 900.0 for a, b in itertools.pairwise(retained_at))


def test_stops_when_someone_else_released_the_instance() -> None:
    w = World(fail_times=0)
    w.still_retained = False
    assert retained.recover(w.effects(), instance_id="i-1", retry_for=3600.0, first=30.0) == retained.RELEASED
    assert w.backups == 0 and w.terminated == 0


def test_status_shows_a_retained_instance_and_what_it_waits_for() -> None:
    from instance_agent import status

    doc = {
        "started_at": "2026-01-01T00:00:00Z",
        "retained": {
            "attempts": 2,
            "last_error": "AccessDenied",
            "next_retry_in_s": 120.0,
            "give_up_in_s": 86000.0,
        },
    }
    text = status.render("/run/x", doc, status.Assessment(True, "running"), None, 0.0)
    assert (
        "retained (Terminating:Retained): 2 backup retries, last error: AccessDenied; "
        "next retry in 120 s; gives up in 86000 s" in text
    )
