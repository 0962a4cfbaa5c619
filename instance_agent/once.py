"""Exactly once per termination: a kernel flock plus a recorded result, per instance.

The SSM path (`instance-agent backup`) and the watcher compute the same lock name, so
whichever starts first does the work. A second run waits for the lock (bounded) and then finds
the first run's record: it reports that as `duplicate` and does nothing of its own. A run whose
predecessor died without a record (a crash: the kernel drops the flock even on kill -9) backs up
again — a second archive is better than none.

The lock lives in the state dir; if that is unusable (read-only, full, missing permissions) it
falls back to the runtime dir (/run/instance-agent, a tmpfs). A record older than 48 h is
ignored: no lifecycle action outlives AWS's 172,800 s global timeout, so an older record
belongs to some earlier manual run, not to this termination.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from instance_agent import statedir
from instance_agent.errors import LockTimeout
from instance_agent.logs import fields

log = logging.getLogger(__name__)

RECORD_MAX_AGE = 172_800.0  # AWS's maximum global timeout of a lifecycle action


class TerminationLock:
    def __init__(self, dirs: tuple[str, ...], name: str, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.dirs = dirs
        self.name = name
        self.clock = clock
        self.sleep = sleep
        self.fd: int | None = None
        self.dir: str | None = None

    def _open(self) -> None:
        for i, d in enumerate(self.dirs):
            try:
                statedir.usable(d)  # owned by us, not group/other-writable (statedir.py)
                fd = statedir.open_or_create(d, self.name + ".lock")
            except OSError as err:
                log.warning("lock directory unusable", extra=fields(
                    dir=d, error=err.strerror, fallback=self.dirs[i + 1] if i + 1 < len(self.dirs)
                    else None))
                continue
            self.fd, self.dir = fd, d
            return
        log.warning("no usable lock directory: exactly-once is not guaranteed for this run")

    def acquire(self, timeout: float) -> TerminationLock:
        self._open()
        if self.fd is None:
            return self
        deadline = self.clock() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if not announced:
                    log.info("another run holds the termination lock; waiting",
                             extra=fields(lock=self.name, timeout_s=timeout))
                    announced = True
                if self.clock() >= deadline:
                    raise LockTimeout(f"another run still holds {self.name} after {timeout:g} s") \
                        from None
                self.sleep(0.1)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    # -- records ------------------------------------------------------------------------
    def recorded(self) -> dict[str, Any] | None:
        """The finished run's record, from any of the dirs, if recent enough."""
        for d in self.dirs:
            path = os.path.join(d, self.name + ".json")
            try:
                statedir.usable(d)  # a planted record would turn this run into a "duplicate"
                rec = json.loads(statedir.read(d, self.name + ".json"))
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as err:
                log.warning("unreadable result record ignored", extra=fields(path=path,
                            error=str(err)))
                continue
            if not isinstance(rec, dict) or time.time() - float(rec.get("recorded_at", 0)) > \
                    RECORD_MAX_AGE:
                continue
            return rec
        return None

    def record(self, result: Mapping[str, Any], exit_code: int) -> None:
        if self.dir is None:
            return
        data = json.dumps({"recorded_at": time.time(), "exit_code": exit_code,
                           "result": dict(result)}).encode()
        # A full state dir still takes an empty lock file but not the record: fall back for
        # the record too, or the next run finds none and backs up again.
        for d in self.dirs[self.dirs.index(self.dir):]:
            path = os.path.join(d, self.name + ".json")
            try:
                statedir.usable(d)
                statedir.write_atomic(d, self.name + ".json", data)
                return
            except OSError as err:
                log.warning("cannot record the result here; trying the next directory",
                            extra=fields(path=path, error=err.strerror))
        log.warning("cannot record the result anywhere; a later run may back up again")
