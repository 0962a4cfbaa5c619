"""A byte sink that paces what passes through it to a rate (--ship-bandwidth).

The pacing is on the compressed bytes handed to the upload, whose bounded part buffers pass
them on to the network, so over a segment the upload rate follows. A wait returns early,
with Cancelled, when the stop event is set: a throttled segment never holds up termination.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from instance_agent.errors import Cancelled
from instance_agent.tarstream import Sink


class Paced:
    def __init__(
        self, inner: Sink, rate: int, clock: Callable[[], float], wait: Callable[[float], bool]
    ) -> None:
        """`wait(seconds)` sleeps and returns True when stopped (threading.Event.wait)."""
        self._inner, self._rate, self._clock, self._wait = inner, rate, clock, wait
        self._start = clock()
        self._sent = 0

    def write(self, data: bytes | bytearray | memoryview, /) -> object:
        out = self._inner.write(data)
        self._sent += len(data)
        ahead = self._start + self._sent / self._rate - self._clock()
        if ahead > 0 and self._wait(ahead):
            raise Cancelled("shipping stopped")
        return out


def paced(inner: Sink, rate: int | None, clock: Callable[[], float], stop: threading.Event) -> Sink:
    return inner if rate is None else Paced(inner, rate, clock, stop.wait)
