"""Exactly once per lifecycle action: a kernel flock, a record, and a decision rule.

The SSM path (`instance-agent backup`) and the watcher take the same lock, so whichever gets
there first runs the whole termination job; the other waits for the lock (bounded) and then
finds the first run's record. A run whose predecessor died without a record (a crash: the
kernel drops the flock even on kill -9) backs up again — a second archive beats none.

A record describes the *action* it answered, not the instance: one instance can see several
actions (warm-pool reuse, a second scale-in), and each needs its own backup. So a record
alone never says "done"; `decide()` weighs it against what Auto Scaling says now:

    no record                                       -> run
    no live action now                              -> duplicate (nothing left to do)
    live action, record's action was completed      -> run (a new action)
    live action, same action, backup ok, not completed -> complete only (no 2nd archive)
    live action, anything else                      -> run

"Same action" is the token's fingerprint when both sides know it, else the record being
younger than the hook's heartbeat timeout: nobody heartbeats an action after its run ends,
so an older uncompleted action has expired by now.

Only runs that answered a termination write a record: an ad-hoc backup on an instance in
service, or a return to the warm pool, never counts as the termination.

The lock lives in the state dir; if that is unusable (read-only, full, missing permissions) it
falls back to the runtime dir (/run/instance-agent, a tmpfs).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from instance_agent import statedir
from instance_agent.errors import Cancelled, LockTimeout
from instance_agent.kinds import Verdict
from instance_agent.logs import fields

log = logging.getLogger(__name__)

RECORD_MAX_AGE = 172_800.0  # AWS's maximum global timeout of a lifecycle action
RECORD_FORMAT = 2

# The verdicts: kinds.Verdict. The names stay for the callers that import them.
RUN, DUPLICATE, COMPLETE_ONLY = Verdict.RUN, Verdict.DUPLICATE, Verdict.COMPLETE_ONLY


@dataclass(frozen=True)
class Record:
    """What a finished termination job leaves behind."""

    recorded_at: float  # epoch seconds
    exit_code: int
    result: dict[str, Any]  # the job's result object, as --json printed it
    backup_ok: bool  # an archive of this action is in S3
    completed: bool  # the action it answered is over (completed, expired, or none to complete)
    lifecycle_result: str  # what it completed (or meant to complete) with
    action: str | None = None  # fingerprint of the action token, when known
    valid_for: float = 0.0  # seconds after recorded_at that an uncompleted action may live
    format: int = RECORD_FORMAT

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Record | None:
        if doc.get("format") != RECORD_FORMAT:
            return None  # a record from before actions were told apart: ignore it
        try:
            return cls(
                recorded_at=float(doc["recorded_at"]),
                exit_code=int(doc["exit_code"]),
                result=dict(doc["result"]),
                backup_ok=bool(doc["backup_ok"]),
                completed=bool(doc["completed"]),
                lifecycle_result=str(doc["lifecycle_result"]),
                action=doc.get("action"),
                valid_for=float(doc.get("valid_for", 0.0)),
            )
        except (KeyError, TypeError, ValueError):
            return None


def decide(record: Record | None, *, live: bool, action: str | None, now: float) -> Verdict:
    """RUN, DUPLICATE or COMPLETE_ONLY for a job that found `record` under the lock, with
    `live` saying whether Auto Scaling holds an action for the instance now and `action`
    the fingerprint of this run's token (None when it has none)."""
    if record is None:
        return RUN
    if not live:
        return DUPLICATE
    if record.completed:
        return RUN
    if record.action is not None and action is not None:
        same = record.action == action
    else:
        same = now - record.recorded_at < record.valid_for
    return COMPLETE_ONLY if same and record.backup_ok else RUN


class TerminationLock:
    def __init__(
        self,
        dirs: tuple[str, ...],
        name: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        cancel: threading.Event | None = None,
    ) -> None:
        self.dirs = dirs
        self.name = name
        self.clock = clock
        self.cancel = cancel or threading.Event()
        self.fd: int | None = None
        self.dir: str | None = None

    def _open(self) -> None:
        for i, d in enumerate(self.dirs):
            try:
                statedir.usable(d)  # owned by us, not group/other-writable (statedir.py)
                fd = statedir.open_or_create(d, self.name + ".lock")
            except OSError as err:
                log.warning(
                    "lock directory unusable",
                    extra=fields(
                        dir=d,
                        error=err.strerror,
                        fallback=self.dirs[i + 1] if i + 1 < len(self.dirs) else None,
                    ),
                )
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
                    log.info(
                        "another run holds the termination lock; waiting",
                        extra=fields(lock=self.name, timeout_s=timeout),
                    )
                    announced = True
                if self.clock() >= deadline:
                    self.release()
                    raise LockTimeout(f"another run still holds {self.name} after {timeout:g} s") from None
                if self.cancel.wait(0.1):
                    self.release()
                    raise Cancelled("stopped while waiting for the termination lock") from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    # -- records ------------------------------------------------------------------------
    def recorded(self) -> Record | None:
        """The newest run's record, from any of the dirs, if recent enough."""
        for d in self.dirs:
            path = os.path.join(d, self.name + ".json")
            try:
                # A planted record would turn this run into a "duplicate". An untrusted dir
                # was already named once, by the lock: skip it here without a second warning.
                statedir.usable(d)
            except OSError:
                continue
            try:
                doc = json.loads(statedir.read(d, self.name + ".json"))
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as err:
                log.warning("unreadable result record ignored", extra=fields(path=path, error=str(err)))
                continue
            rec = Record.from_json(doc) if isinstance(doc, dict) else None
            if rec is None or time.time() - rec.recorded_at > RECORD_MAX_AGE:
                continue
            return rec
        return None

    def record(self, rec: Record) -> None:
        if self.dir is None:
            return
        data = json.dumps(rec.to_json()).encode()
        # A full state dir still takes an empty lock file but not the record: fall back for
        # the record too, or the next run finds none and backs up again.
        for d in self.dirs[self.dirs.index(self.dir) :]:
            path = os.path.join(d, self.name + ".json")
            try:
                statedir.usable(d)
                statedir.write_atomic(d, self.name + ".json", data)
                return
            except OSError as err:
                log.warning(
                    "cannot record the result here; trying the next directory",
                    extra=fields(path=path, error=err.strerror),
                )
        log.warning("cannot record the result anywhere; a later run may back up again")
