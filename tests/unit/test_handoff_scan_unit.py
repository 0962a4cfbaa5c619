"""The watcher's hand-off scan, the pure part: its schedule over a fake clock (one listing
per interval per instance, a fleet spread over the interval) and what a listing tells it."""

from __future__ import annotations

import itertools
import random
from collections import Counter

from instance_agent import config, handoff, handoff_scan

KEY = "backups/web/handoff/i-0abc1234/20260131T120000Z.tar.zst"
INTERVAL = 300.0


def scans(schedule: handoff_scan.Schedule, start: float, end: float) -> list[float]:
    """The times one instance lists the prefix between start and end, on a fake clock."""
    out, due = [], schedule.first(start)
    while due < end:
        out.append(due)
        due = schedule.after(due)
    return out


def test_one_instance_lists_once_per_interval_give_or_take_the_jitter() -> None:
    times = scans(handoff_scan.Schedule(INTERVAL, rand=random.Random(7).random), 0.0, 86_400.0)
    assert 0 <= times[0] < INTERVAL
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= INTERVAL * 0.9 and max(gaps) <= INTERVAL * 1.1
    assert abs(len(times) - 86_400 / INTERVAL) <= 2


def test_the_extremes_of_the_random_source_stay_within_the_jitter() -> None:
    for value in (0.0, 0.999999):
        schedule = handoff_scan.Schedule(INTERVAL, rand=lambda v=value: v)
        assert 0 <= schedule.first(100.0) - 100.0 < INTERVAL
        assert INTERVAL * 0.9 <= schedule.after(100.0) - 100.0 <= INTERVAL * 1.1


def test_a_fleet_of_1000_started_together_is_spread_over_the_interval() -> None:
    rng = random.Random(22)
    fleet = [scans(handoff_scan.Schedule(INTERVAL, rand=rng.random), 0.0, 3600.0) for _ in range(1000)]
    # About one listing per instance per interval, however big the group's prefix.
    total = sum(len(t) for t in fleet)
    assert 1000 * 3600 / (INTERVAL * 1.1) <= total <= 1000 * 3600 / (INTERVAL * 0.9) + 1000
    # No burst: in any 10-second slot of the hour, at most 3 times the mean rate.
    per_slot = Counter(int(t // 10) for times in fleet for t in times)
    mean = total / 360
    assert max(per_slot.values()) <= 3 * mean


def listing(*names: str, at: float = 1000.0) -> dict[str, float]:
    return {KEY + n: at for n in names}


def test_the_oldest_unclaimed_age_is_what_a_listing_shows_waiting() -> None:
    assert handoff_scan.oldest_unclaimed_age(listing("", ".manifest.json"), 1600.0, 600.0) == 600.0
    assert handoff_scan.oldest_unclaimed_age(listing("", ".manifest.json", ".adopted"), 1600.0, 600.0) is None
    assert handoff_scan.oldest_unclaimed_age(listing(""), 1600.0, 600.0) is None  # no manifest yet
    live = listing("", ".manifest.json") | {handoff.claim_key(KEY, 1): 1500.0}
    assert handoff_scan.oldest_unclaimed_age(live, 1600.0, 600.0) is None
    # A claim whose lease is over counts as waiting again.
    assert handoff_scan.oldest_unclaimed_age(live, 2200.0, 600.0) == 1200.0


def test_scanning_needs_an_interval_a_handoff_path_and_a_running_receiver() -> None:
    on = config.Config.defaults(handoff_path=("/srv/spool",), handoff_scan_interval=300.0)
    assert handoff_scan.enabled(on)
    assert not handoff_scan.enabled(
        config.Config.defaults(handoff_path=("/srv/spool",), handoff_scan_interval=0.0)
    )
    assert not handoff_scan.enabled(config.Config.defaults(handoff_scan_interval=300.0))
    assert not handoff_scan.enabled(
        config.Config.defaults(
            handoff_path=("/srv/spool",), handoff_scan_interval=300.0, handoff_to="launching"
        )
    )
    assert (
        config.Config.defaults().handoff_scan_interval == 300.0
        and config.Config.defaults().handoff_wait == 0.0
    )
