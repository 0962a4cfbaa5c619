"""The watcher's poller: IMDSv2 states, the latch, and the backoff.

It asks IMDSv2 for the target lifecycle state, the Spot instance action and the rebalance
recommendation, one request per path per interval, backing off on errors. It logs a path
only when its answer changes, and emits a notice only on the change into a state that calls
for action. That change-only rule is the latch: a state that stays `Terminated` is never
acted on twice (aws-node-termination-handler issue 1100).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from instance_agent import status
from instance_agent.config import Config
from instance_agent.errors import IMDSError
from instance_agent.imds import IMDSRefused
from instance_agent.kinds import TERMINAL_STATES, NoticeKind
from instance_agent.logs import fields

log = logging.getLogger(__name__)

LIFECYCLE_PATH = "autoscaling/target-lifecycle-state"
SPOT_PATH = "spot/instance-action"
REBALANCE_PATH = "events/recommendations/rebalance"
# Into a warm pool: a return under an instance reuse policy fires the terminating hook; a
# fresh launch into the pool fires the launching one, and IMDS already shows the target
# state (https://docs.aws.amazon.com/autoscaling/ec2/userguide/warm-pool-instance-lifecycle.html;
# docs/aws-behaviour.md, "Lifecycle hooks"). The job tells them apart and does nothing for a launch.
WARM_STATES = ("Warmed:Stopped", "Warmed:Running", "Warmed:Hibernated")

# Backoff on IMDS errors doubles from the poll interval up to this. 20 s cuts the request
# rate of a struggling (or throttling) IMDS tenfold at a 2 s poll, yet still catches a
# Spot notice well inside its two minutes once IMDS answers again (docs/aws-behaviour.md,
# "Instance metadata (IMDS)").
MAX_BACKOFF = 20.0

# The notices: kinds.NoticeKind. The names stay for the callers that import them.
TERMINATION, WARM_RETURN, REBALANCE = NoticeKind.TERMINATION, NoticeKind.WARM_RETURN, NoticeKind.REBALANCE
SPOT_TERMINATE, SPOT_STOP = NoticeKind.SPOT_TERMINATE, NoticeKind.SPOT_STOP
SPOT_HIBERNATE = NoticeKind.SPOT_HIBERNATE
LAUNCH = NoticeKind.LAUNCH


class MetadataReader(Protocol):
    """What the poller needs of IMDS (imds.IMDS is the real one)."""

    def get(self, path: str, *, timeout: float = 10.0) -> str | None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Notice:
    kind: NoticeKind
    detail: str  # the lifecycle state, or the notice's time


@dataclass
class _PathState:
    path: str
    value: str | None = None  # the last answer, normalised; None is a 404
    answered: bool = False
    failures: int = 0
    due: float = 0.0


class Poller:
    """One round: each due path once. `emit` receives Notices and the first-answer marker."""

    ANSWERED = "answered"  # emitted once, when IMDS has answered any path

    def __init__(
        self,
        imds: MetadataReader,
        cfg: Config,
        emit: Callable[[Notice | str], None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.imds = imds
        self.emit = emit
        self.clock = clock
        self.last_round = clock()
        self._answered = False
        self._states: dict[str, _PathState] = {}
        self.configure(cfg)

    def configure(self, cfg: Config) -> None:
        self.interval = cfg.poll_interval
        self.status_file = status.status_path(cfg)
        paths = [LIFECYCLE_PATH] + ([SPOT_PATH, REBALANCE_PATH] if cfg.spot else [])
        self._states = {p: self._states.get(p) or _PathState(p) for p in paths}

    def next_due(self) -> float:
        return min(s.due for s in self._states.values())

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.poll_due()
            except Exception:  # a bug here must not end the watch; the log shows it once
                log.exception("poll round failed")
                for state in self._states.values():
                    state.due = self.clock() + self.interval
            self.last_round = self.clock()
            # For `instance-agent status`; write_status never raises.
            status.write_status(self.status_file, last_poll=time.time(), poll_interval=self.interval)
            stop.wait(max(0.0, self.next_due() - self.clock()))

    def poll_due(self) -> None:
        for state in list(self._states.values()):
            if state.due <= self.clock():
                self._poll(state)

    def _poll(self, state: _PathState) -> None:
        started = self.clock()
        try:
            # timeout=0: exactly one request; the backoff is ours, across rounds.
            text = self.imds.get(state.path, timeout=0)
        except IMDSError as err:
            state.failures += 1
            backoff = min(self.interval * 2.0**state.failures, max(MAX_BACKOFF, self.interval))
            state.due = started + backoff
            if state.failures == 1:
                level = logging.ERROR if isinstance(err, IMDSRefused) else logging.WARNING
                log.log(
                    level, "IMDS request failed; backing off", extra=fields(path=state.path, error=str(err))
                )
            return
        state.due = started + self.interval
        if state.failures:
            log.info("IMDS answers again", extra=fields(path=state.path, failed_polls=state.failures))
            state.failures = 0
        if not self._answered:
            self._answered = True
            self.emit(self.ANSWERED)
        value = _normalise(state.path, text)
        first, previous = not state.answered, state.value
        state.answered = True
        if first or value != previous:
            state.value = value
            self._changed(state.path, previous, value, first)

    def _changed(self, path: str, previous: str | None, value: str | None, first: bool) -> None:
        if path == LIFECYCLE_PATH:
            status.write_status(self.status_file, imds_state=value or "none")
            log.info(
                "target lifecycle state",
                extra=fields(
                    state=value or "none (404: no lifecycle transition yet)",
                    previous=None if first else (previous or "none"),
                ),
            )
            if value in TERMINAL_STATES and (first or previous not in TERMINAL_STATES):
                self.emit(Notice(TERMINATION, value))
            elif value in WARM_STATES and (first or previous not in WARM_STATES):
                self.emit(Notice(WARM_RETURN, value))
            elif value == "InService" and not first and previous in WARM_STATES:
                # Out of the pool with no boot (Running or Hibernated pool): the launching
                # hook's Pending:Wait is for the watcher to have answered (launch_gate.py).
                self.emit(Notice(LAUNCH, value))
        elif path == SPOT_PATH:
            if value is None:
                if not first:
                    log.info("spot interruption notice withdrawn")
                return
            action, _, when = value.partition("@")
            log.warning("spot interruption notice", extra=fields(action=action, time=when))
            kind = {"terminate": SPOT_TERMINATE, "stop": SPOT_STOP, "hibernate": SPOT_HIBERNATE}.get(action)
            if kind is None:
                log.warning("unknown spot action; ignored", extra=fields(action=action))
            else:
                self.emit(Notice(kind, when))
        elif value is not None:
            log.warning("rebalance recommendation", extra=fields(notice_time=value))
            self.emit(Notice(REBALANCE, value))


def _normalise(path: str, text: str | None) -> str | None:
    """The part of an answer that identifies a state: two answers that differ only in
    formatting are the same notice."""
    if text is None:
        return None
    if path == LIFECYCLE_PATH:
        return text.strip()
    try:
        doc = json.loads(text)
    except ValueError:
        return text.strip()
    if not isinstance(doc, dict):
        return text.strip()
    if path == SPOT_PATH:
        return f"{doc.get('action', '')}@{doc.get('time', '')}"
    return str(doc.get("noticeTime", text.strip()))
