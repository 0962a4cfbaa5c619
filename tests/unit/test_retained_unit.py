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
