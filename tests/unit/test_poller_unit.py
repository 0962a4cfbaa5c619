"""The watcher's poller against a scripted IMDS: the latch, the backoff, the notices."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fakes import FakeClock

from instance_agent import config
from instance_agent.errors import IMDSError
from instance_agent.poller import (
    LAUNCH,
    LIFECYCLE_PATH,
    MAX_BACKOFF,
    REBALANCE,
    REBALANCE_PATH,
    SPOT_PATH,
    SPOT_STOP,
    SPOT_TERMINATE,
    TERMINATION,
    WARM_RETURN,
    Notice,
    Poller,
)


class FakeIMDS:
    """Answers per path from a dict the test changes; an Exception value is raised."""

    def __init__(self) -> None:
        self.answers: dict[str, str | Exception | None] = {LIFECYCLE_PATH: "InService"}
        self.requests: list[str] = []

    def get(self, path: str, *, timeout: float = 10.0) -> str | None:
        self.requests.append(path)
        value = self.answers.get(path)
        if isinstance(value, Exception):
            raise value
        return value

    def close(self) -> None:
        pass


@pytest.fixture
def setup(tmp_path: Path) -> tuple[FakeIMDS, FakeClock, list[Notice | str], Callable[[], None]]:
    cfg = config.Config.defaults(
        poll_interval=2.0, state_dir=str(tmp_path / "s"), runtime_dir=str(tmp_path / "r")
    )
    imds, clock, seen = FakeIMDS(), FakeClock(), []
    poller = Poller(imds, cfg, seen.append, clock=clock)

    def round_() -> None:
        poller.poll_due()
        clock.now = poller.next_due()

    return imds, clock, seen, round_


def notices(seen: list[Notice | str]) -> list[str]:
    return [n.kind for n in seen if isinstance(n, Notice)]


def test_terminated_is_acted_on_once_however_long_it_stays(setup) -> None:  # type: ignore[no-untyped-def]
    imds, _clock, seen, round_ = setup
    round_()
    imds.answers[LIFECYCLE_PATH] = "Terminated"
    for _ in range(20):
        round_()
    assert notices(seen) == [TERMINATION]
    assert seen[0] == Poller.ANSWERED


def test_a_return_to_the_warm_pool_is_its_own_notice(setup) -> None:  # type: ignore[no-untyped-def]
    imds, _clock, seen, round_ = setup
    round_()
    imds.answers[LIFECYCLE_PATH] = "Warmed:Stopped"
    round_()
    imds.answers[LIFECYCLE_PATH] = "InService"
    round_()
    imds.answers[LIFECYCLE_PATH] = "Terminated"
    round_()
    # Back in service with no boot in between: the launching hook's wait is the watcher's.
    assert notices(seen) == [WARM_RETURN, LAUNCH, TERMINATION]


@pytest.mark.parametrize("pool", ["Warmed:Running", "Warmed:Hibernated"])
def test_leaving_a_running_or_hibernated_pool_is_a_launch_notice(setup, pool: str) -> None:  # type: ignore[no-untyped-def]
    """Such an instance leaves the pool without a boot, so no unit runs the launch gate."""
    imds, _clock, seen, round_ = setup
    imds.answers[LIFECYCLE_PATH] = pool
    round_()
    imds.answers[LIFECYCLE_PATH] = "InService"
    for _ in range(5):
        round_()
    assert notices(seen) == [WARM_RETURN, LAUNCH]


def test_in_service_at_the_start_is_no_launch_notice(setup) -> None:  # type: ignore[no-untyped-def]
    """After a boot (a Stopped pool) the launch unit answers; the watcher's first look is no change."""
    _imds, _clock, seen, round_ = setup
    for _ in range(3):
        round_()
    assert notices(seen) == []


def test_spot_actions_map_to_their_notices_and_rebalance_is_reported(setup) -> None:  # type: ignore[no-untyped-def]
    imds, _clock, seen, round_ = setup
    round_()
    imds.answers[SPOT_PATH] = '{"action": "stop", "time": "2026-11-26T10:02:00Z"}'
    imds.answers[REBALANCE_PATH] = '{"noticeTime": "2026-11-26T10:00:00Z"}'
    round_()
    round_()
    imds.answers[SPOT_PATH] = '{"action": "terminate", "time": "2026-11-26T10:04:00Z"}'
    round_()
    assert sorted(notices(seen)) == sorted([SPOT_STOP, REBALANCE, SPOT_TERMINATE])


def test_the_same_spot_notice_reformatted_is_not_a_second_notice(setup) -> None:  # type: ignore[no-untyped-def]
    imds, _clock, seen, round_ = setup
    imds.answers[SPOT_PATH] = '{"action": "terminate", "time": "2026-11-26T10:02:00Z"}'
    round_()
    imds.answers[SPOT_PATH] = '{ "time": "2026-11-26T10:02:00Z", "action": "terminate" }'
    round_()
    assert notices(seen) == [SPOT_TERMINATE]


def test_errors_back_off_to_the_cap_then_recover(setup) -> None:  # type: ignore[no-untyped-def]
    imds, clock, seen, round_ = setup
    round_()
    imds.answers[LIFECYCLE_PATH] = IMDSError("HTTP 500")
    waits = []
    for _ in range(8):
        before = clock()
        round_()
        waits.append(clock() - before)
    assert max(waits) <= MAX_BACKOFF
    assert imds.requests.count(LIFECYCLE_PATH) < 1 + 8 * 3  # fewer polls than at the interval
    imds.answers[LIFECYCLE_PATH] = "Terminated"
    for _ in range(12):
        round_()
    assert notices(seen) == [TERMINATION]
