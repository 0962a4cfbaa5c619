"""The watcher's answer to one notice, in its own thread: the identity (resolved once and
kept), the clients, and the termination job (termination.py) with the notice as its trigger.

The termination job, and with it boto3 and botocore, is imported by the first job, never
while the watcher is idle (see benchmarks/watch_footprint.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from instance_agent import status
from instance_agent.config import Config
from instance_agent.errors import EXIT_FAILED, AgentError, Cancelled
from instance_agent.kinds import NoticeKind, Trigger
from instance_agent.logs import fields
from instance_agent.poller import Notice
from instance_agent.sdnotify import Notifier

if TYPE_CHECKING:
    from instance_agent.clients import Clients
    from instance_agent.identity import Identity
    from instance_agent.shipstate import Ledger

log = logging.getLogger(__name__)

IDENTITY_RETRY_MAX = 30.0


@dataclass(frozen=True)
class Deps:
    """What the CLI hands the daemon: it alone builds boto3 clients."""

    resolve_identity: Callable[[Config], Identity]
    make_clients: Callable[[Config, str], Clients]
    reload: Callable[[], Config] | None = None
    # Answers a launching wait (launch_gate.answer_from_watcher), for a LAUNCH notice.
    answer_launch: Callable[[Config, Identity], None] | None = None


class IdentityCache:
    """The identity, resolved once and kept; until then resolved with retries."""

    def __init__(self, resolve: Callable[[Config], Identity]) -> None:
        self._resolve = resolve
        self._value: Identity | None = None
        self._lock = threading.Lock()

    def prefetch(self, cfg: Config) -> None:
        with contextlib.suppress(AgentError):
            self.get(cfg, deadline=0.0, cancel=threading.Event())

    def get(self, cfg: Config, *, deadline: float, cancel: threading.Event) -> Identity:
        wait = 1.0
        while True:
            with self._lock:
                if self._value is not None:
                    return self._value
                try:
                    self._value = self._resolve(cfg)
                    return self._value
                except AgentError as err:
                    last = err
            if time.monotonic() + wait > deadline:
                raise last
            log.warning("identity unknown; retrying", extra=fields(error=str(last), wait_s=wait))
            if cancel.wait(wait):
                raise Cancelled("stopped while resolving the identity")
            wait = min(wait * 2, IDENTITY_RETRY_MAX)


class Job:
    """The answer to one notice, in its own thread."""

    def __init__(
        self,
        notice: Notice,
        cfg: Config,
        deps: Deps,
        identity: IdentityCache,
        notifier: Notifier,
        on_done: Callable[[], None],
        before: Callable[[], Ledger | None] | None = None,
    ) -> None:
        self.notice = notice
        self.before = before  # run first, in the job's thread (stops shipping)
        self.cfg = cfg
        self.deps = deps
        self.identity = identity
        self.notifier = notifier
        self.on_done = on_done
        self.cancel = threading.Event()  # set by the main thread when the stop grace is over
        self.stage = ""  # the job's last stage (termination's on_stage), read by the main thread
        self.exit_code: int | None = None
        self.result: dict[str, Any] | None = None
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"job-{notice.kind}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def done(self) -> bool:
        return self._finished.is_set()

    def stop_now(self) -> None:
        self.cancel.set()

    def _main(self) -> None:
        try:
            self.exit_code = self._run()
        except AgentError as err:
            log.error(
                "response failed before the backup could run",
                extra=fields(trigger=self.notice.kind, error=str(err)),
            )
            self.exit_code = EXIT_FAILED
        except Exception:
            log.exception(
                "response failed before the backup could run", extra=fields(trigger=self.notice.kind)
            )
            self.exit_code = EXIT_FAILED
        finally:
            status.write_status(
                status.status_path(self.cfg),
                last_backup=status.backup_summary(self.result, self.exit_code, self.notice.kind),
            )
            self._finished.set()
            self.on_done()

    def _stage(self, text: str) -> None:
        self.stage = text
        self.notifier.status(text)

    def _run(self) -> int:
        from instance_agent import termination

        cfg, kind = self.cfg, self.notice.kind
        shipped = self.before() if self.before is not None else None
        ident = self.identity.get(cfg, deadline=time.monotonic() + cfg.wait_timeout, cancel=self.cancel)
        clients = self.deps.make_clients(cfg, ident.region)
        opts = termination.Options(
            trigger=Trigger(kind),
            notice=self.notice.detail,
            imds_state=self.notice.detail
            if kind in (NoticeKind.TERMINATION, NoticeKind.WARM_RETURN)
            else None,
            cancel=self.cancel,
            on_stage=self._stage,
            shipped=shipped,
        )
        outcome = termination.run(cfg, ident, clients, opts)
        self.result = outcome.result.to_json()
        log.info(
            "response finished",
            extra=fields(
                trigger=kind, **termination.outcome_fields(outcome), commands=len(outcome.result.commands)
            ),
        )
        return outcome.exit_code
