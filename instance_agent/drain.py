"""The drain gate: before the backup, wait until every drain path is gone or an empty dir.

A drain path is how a worker says "busy": a marker file, or a folder of in-flight jobs.
The wait is event-driven (watchdog's inotify observer): it watches each busy path's parent
(where the path itself disappears) and, for a directory, the path itself (where its last
entry disappears), and re-checks on every event. So the backup starts as soon as the worker
lets go, not at the next tick of a sleep loop.

`RECHECK` is only a safety net for events inotify cannot see (a path on NFS, a watch limit
reached, a parent created after we looked): the gate then still opens, just later.

The gate is bounded by the drain timeout; the caller runs it inside a heartbeat context,
so a long drain does not let the lifecycle action expire.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from instance_agent.logs import fields

if TYPE_CHECKING:
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers.api import BaseObserver, ObservedWatch

log = logging.getLogger(__name__)

RECHECK = 5.0  # seconds; see the module docstring


def is_busy(path: str) -> bool:
    """True while `path` exists and is not an empty directory."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            with os.scandir(path) as entries:
                return any(True for _ in entries)
        return os.path.lexists(path)
    except FileNotFoundError:
        return False
    except OSError as err:
        # Unreadable: we cannot tell it is drained, so treat it as busy (the timeout bounds it).
        log.warning("drain path unreadable", extra=fields(path=path, error=err.strerror))
        return True


def busy_paths(paths: Sequence[str]) -> list[str]:
    return [p for p in paths if is_busy(p)]


@dataclass(frozen=True)
class DrainOutcome:
    drained: bool
    waited_s: float
    busy: tuple[str, ...]  # paths still busy when the wait ended
    cancelled: bool = False


class DrainGate:
    """`DrainGate(paths).wait(timeout)`; `interrupt()` from another thread ends a wait early."""

    def __init__(self, paths: Sequence[str], *, clock: Callable[[], float] = time.monotonic) -> None:
        self.paths = [os.path.abspath(p) for p in paths]
        self._clock = clock
        self._changed = threading.Event()
        self._interrupted = threading.Event()

    def interrupt(self) -> None:
        self._interrupted.set()
        self._changed.set()

    def wait(self, timeout: float) -> DrainOutcome:
        started = self._clock()
        busy = busy_paths(self.paths)
        if not busy:
            return DrainOutcome(True, 0.0, ())
        log.info("waiting for drain paths", extra=fields(busy=busy, timeout_s=timeout))
        deadline = started + timeout
        observer = _start_observer()
        watched: dict[str, ObservedWatch] = {}
        try:
            while True:
                if self._interrupted.is_set():
                    return self._outcome(False, started, busy, cancelled=True)
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return self._outcome(False, started, busy)
                # Clear, watch, then look: an event after the clear re-arms the wait, so a
                # removal between the look and the wait is never missed.
                self._changed.clear()
                if observer is not None:
                    self._watch(observer, watched, busy)
                busy = busy_paths(self.paths)
                if not busy:
                    return self._outcome(True, started, busy)
                self._changed.wait(min(remaining, RECHECK))
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=2)

    def _outcome(
        self, drained: bool, started: float, busy: list[str], *, cancelled: bool = False
    ) -> DrainOutcome:
        return DrainOutcome(drained, round(self._clock() - started, 3), tuple(busy), cancelled)

    def _watch(self, observer: BaseObserver, watched: dict[str, ObservedWatch], busy: list[str]) -> None:
        wanted = set()
        for path in busy:
            wanted.add(os.path.dirname(path) or "/")
            if os.path.isdir(path) and not os.path.islink(path):
                wanted.add(path)
        for directory in [d for d in watched if not os.path.isdir(d)]:
            # Its inotify watch died with it; forget it so a re-created one is watched anew.
            with contextlib.suppress(KeyError, OSError):
                observer.unschedule(watched[directory])
            del watched[directory]
        for directory in sorted(wanted - set(watched)):
            try:
                watched[directory] = observer.schedule(_poke(self._changed), directory, recursive=False)
            except OSError as err:
                # Gone meanwhile, or out of inotify watches: RECHECK still covers it.
                log.debug("cannot watch drain directory", extra=fields(path=directory, error=str(err)))


def _poke(changed: threading.Event) -> FileSystemEventHandler:
    """A handler that only says "something changed": the gate re-checks the paths itself."""
    from watchdog.events import FileSystemEventHandler

    class Poke(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            changed.set()

    return Poke()


def _start_observer() -> BaseObserver | None:
    try:
        from watchdog.observers import Observer

        observer = Observer()
        observer.start()
    except (ImportError, OSError) as err:
        log.warning(
            f"no file system events; re-checking drain paths every {RECHECK:g} s instead",
            extra=fields(error=str(err)),
        )
        return None
    return observer
