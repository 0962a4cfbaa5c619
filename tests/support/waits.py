"""Waiting on state instead of sleeping: a test that needs something to have happened polls
for that very thing, with a deadline, and goes on as soon as it holds.

A fixed `time.sleep` is either too long (the suite waits for nothing) or too short on a
loaded machine (the test flakes); `until` is neither. The deadline is generous: reaching it
fails the test with what was awaited, it never passes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

TIMEOUT = 60.0
INTERVAL = 0.02


def until(what: Callable[[], T], description: str, timeout: float = TIMEOUT, interval: float = INTERVAL) -> T:
    """Poll `what` until it returns something truthy and return that; AssertionError naming
    `description` if it has not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = what()
        if found:
            return found
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {description}")
        time.sleep(interval)


def next_second() -> None:
    """Wait until the wall clock is in a later second than now, so that whatever was stamped
    to the second before the call (archive keys, manifests' `created`) sorts before whatever
    is stamped after it. Half a second on average, where a fixed sleep took more than one."""
    now = int(time.time())
    until(lambda: int(time.time()) > now, "the next second of the wall clock", timeout=5, interval=0.01)
