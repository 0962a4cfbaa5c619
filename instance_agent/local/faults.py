"""Injected errors for the moto extensions: a queue of faults per API action.

`inject_error(action, code, message, times)` in the Auto Scaling and SSM stand-ins both
append here; the patched action takes the head of its queue before doing any work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class Fault:
    code: str
    message: str
    remaining: int


class FaultQueues(dict[str, list[Fault]]):
    """{action: [Fault, …]}; each fault answers `remaining` calls, then leaves the queue."""

    def add(self, action: str, code: str, message: str, times: int) -> None:
        self.setdefault(action, []).append(Fault(code, message, times))

    def take(self, action: str) -> Fault | None:
        queue = self.get(action)
        if not queue:
            return None
        fault = queue[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            queue.pop(0)
        return fault


def attached(backend: Any, key: str, factory: Callable[[], T], kind: type[T]) -> T:
    """The stand-in's own state kept on a moto backend object (so moto's reset clears it),
    created on first use."""
    value = backend.__dict__.get(key)
    if not isinstance(value, kind):
        value = factory()
        backend.__dict__[key] = value
    return value


class Patches:
    """A stand-in's patches of moto, applied once per process, and the lock that keeps each
    patched request atomic (moto's server is threaded)."""

    def __init__(self, apply: Callable[[], None]) -> None:
        self.lock = threading.RLock()
        self._apply = apply
        self._done = False

    def install(self) -> None:
        with self.lock:
            if not self._done:
                self._apply()
                self._done = True
