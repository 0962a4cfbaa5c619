"""`instance-agent watch`: the on-instance daemon that notices its own termination.

Three threads, each with one job:

- the **poller** (poller.py) asks IMDSv2 for the lifecycle state, Spot and rebalance notices
  and emits a Notice on each change into a state that calls for action.
- the **job** thread answers one notice with the termination job (termination.py): the same
  lock, drain gate, commands, backup and completion as `instance-agent backup`. Jobs run
  one at a time; notices that arrive meanwhile wait their turn.
- the **main** thread only waits: on a self-pipe that signal handlers and the other two
  threads write to, and on its timers. It sends sd_notify messages (WATCHDOG=1 keeps going
  through drain and backup), reloads the config on SIGHUP, and on SIGTERM either exits at
  once (idle) or lets the job run for `--stop-grace` before cancelling it (the job then
  aborts the upload, reports the failure and completes with `--on-failure`).

The identity (instance id, region) is resolved once IMDS first answers and kept: an IMDS
outage right after the flip to `Terminated` must not lose the termination.

boto3 and botocore are imported by the first job, never while idle: the idle daemon stays
small (see benchmarks/watch_footprint.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import queue
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from instance_agent import handoff_scan, signals
from instance_agent.config import Config
from instance_agent.errors import EXIT_FAILED, EXIT_OK, AgentError
from instance_agent.imds import IMDS
from instance_agent.logs import fields
from instance_agent.poller import (
    LAUNCH,
    REBALANCE,
    SPOT_HIBERNATE,
    SPOT_STOP,
    SPOT_TERMINATE,
    TERMINATION,
    WARM_RETURN,
    Notice,
    Poller,
)
from instance_agent.sdnotify import Notifier, watchdog_interval
from instance_agent.watch_job import Deps, IdentityCache, Job

if TYPE_CHECKING:
    from instance_agent.shipper import Shipper
    from instance_agent.shipstate import Ledger

log = logging.getLogger(__name__)

# The main loop stops vouching for the poller (no more WATCHDOG=1) when it has not finished
# a round for this long: three paths at IMDS's 3 s request timeout, plus generous slack.
POLLER_STALE = 60.0

# Config fields a SIGHUP cannot apply: the identity is resolved once (IdentityCache).
NEEDS_RESTART = ("instance_id", "region")

# Lower runs first when several notices wait.
PRIORITY = {TERMINATION: 0, WARM_RETURN: 0, SPOT_TERMINATE: 1, SPOT_STOP: 2, SPOT_HIBERNATE: 2, REBALANCE: 3}


# --- the daemon ---------------------------------------------------------------------------


class Watcher:
    def __init__(
        self,
        cfg: Config,
        deps: Deps,
        *,
        imds: IMDS | None = None,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.deps = deps
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.watchdog_every = watchdog_interval()
        self._inbox: queue.SimpleQueue[Notice | str] = queue.SimpleQueue()
        self._wake_w: socket.socket | None = None
        self.poller = Poller(imds or IMDS(), cfg, self._post, clock=clock)
        self.identity = IdentityCache(deps.resolve_identity)
        self.job: Job | None = None
        self.pending: list[Notice] = []
        self.ready = False
        self.exit_code = EXIT_OK
        self.shipper: Shipper | None = None
        self._launching: threading.Thread | None = None

    # Called from the poller and job threads: queue, then wake the main loop.
    def _post(self, item: Notice | str) -> None:
        self._inbox.put(item)
        self._wake()

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):  # full: the loop is awake anyway
                self._wake_w.send(b"\0")

    def run(self) -> int:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._wake_w = wake_w
        # Handlers do nothing in Python: the C-level handler writes the signal number to the
        # wakeup fd, and the loop reads it there. Nothing runs inside a handler, so nothing
        # can deadlock on a lock the interrupted code held.
        previous_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        previous = {
            s: signal.signal(s, signals.wakeup_only) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        stop_polling = threading.Event()
        poller = threading.Thread(target=self.poller.run, args=(stop_polling,), name="poller", daemon=True)
        self.notifier.status("starting: waiting for IMDS")
        poller.start()
        self._start_shipping()
        # The fallback delivery of hand-offs (handoff_scan.py): a thread of its own.
        ident = self.identity
        handoff_scan.start(
            self.cfg,
            lambda stop: ident.get(self.cfg, deadline=math.inf, cancel=stop),
            self.deps.make_clients,
            lambda: self.job is not None or bool(self.pending),
            stop_polling,
        )
        try:
            return self._loop(wake_r, poller)
        finally:
            stop_polling.set()
            self._stop_shipping(wait=0.0)  # the watcher exits: a segment in flight is cancelled at once
            # Close IMDS connections cleanly when the poller is between requests; a poller
            # stuck in a request is left to die with the process rather than delay the exit.
            poller.join(timeout=0.3)
            if not poller.is_alive():
                self.poller.imds.close()
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._wake_w = None
            wake_r.close()
            wake_w.close()

    def _loop(self, wake_r: socket.socket, poller: threading.Thread) -> int:
        stop_at: float | None = None
        next_ping = self.clock()
        while True:
            now = self.clock()
            wake_at = next_ping if self.watchdog_every else now + self.cfg.poll_interval
            if stop_at is not None and self.job is not None and not self.job.cancel.is_set():
                wake_at = min(wake_at, stop_at)
            select.select([wake_r], [], [], max(0.0, wake_at - now))
            now = self.clock()
            for signum in _read_wake(wake_r):
                if signum == signal.SIGHUP:
                    self._reload()
                elif signum in (signal.SIGTERM, signal.SIGINT):
                    stop_at = self._on_stop(signum, now, stop_at)
            self._take_inbox(stopping=stop_at is not None)
            if self.job is not None and self.job.done():
                self._finish_job(stopping=stop_at is not None)
            if stop_at is not None:
                if self.job is None:
                    log.info("stopped", extra=fields(exit_code=self.exit_code))
                    return self.exit_code
                if now >= stop_at and not self.job.cancel.is_set():
                    log.warning(
                        "stop grace over: cancelling the backup", extra=fields(grace_s=self.cfg.stop_grace)
                    )
                    self.job.stop_now()
            elif self.job is None and self.pending:
                self._start_next()
            if self.watchdog_every and now >= next_ping:
                if poller.is_alive() and now - self.poller.last_round < POLLER_STALE:
                    self.notifier.watchdog()
                next_ping = now + min(self.watchdog_every, self.cfg.poll_interval)

    def _on_stop(self, signum: int, now: float, stop_at: float | None) -> float:
        name = signal.Signals(signum).name
        if stop_at is not None:
            if self.job is not None and not self.job.cancel.is_set():
                log.warning("second stop signal: cancelling the backup now", extra=fields(signal=name))
                self.job.stop_now()
            return stop_at
        self.notifier.stopping("stopping")
        if self.job is None:
            log.info("stop requested", extra=fields(signal=name))
            return now
        from instance_agent.steps import COMPLETING  # a job runs: the job's modules are loaded

        if self.job.stage == COMPLETING:
            # The backup is over; only CompleteLifecycleAction's retries are left. The stop
            # reaches them at once, and they get lifecycle.STOP_GRACE (20 s) from now, as
            # docs/architecture.md says, never the rest of --complete-timeout.
            log.warning(
                "stop requested while completing: the completion gets 20 s at most",
                extra=fields(signal=name, trigger=self.job.notice.kind),
            )
            self.job.stop_now()
            return now
        log.warning(
            "stop requested during a backup: letting it run",
            extra=fields(signal=name, trigger=self.job.notice.kind, grace_s=self.cfg.stop_grace),
        )
        return now + self.cfg.stop_grace

    def _take_inbox(self, *, stopping: bool) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item == Poller.ANSWERED:
                if not self.ready:
                    self.ready = True
                    # Resolve the identity now, while IMDS answers; a job keeps it.
                    threading.Thread(
                        target=self.identity.prefetch, args=(self.cfg,), name="identity", daemon=True
                    ).start()
                    self.notifier.ready("watching")
                    log.info(
                        "watching",
                        extra=fields(
                            poll_interval_s=self.cfg.poll_interval,
                            spot=self.cfg.spot,
                            on_rebalance=self.cfg.on_rebalance,
                            watchdog_s=self.watchdog_every,
                        ),
                    )
            elif isinstance(item, Notice):
                self._on_notice(item, stopping=stopping)

    def _on_notice(self, notice: Notice, *, stopping: bool) -> None:
        if notice.kind == REBALANCE and self.cfg.on_rebalance == "log":
            return  # the poller logged it; --on-rebalance log asks for nothing more
        if notice.kind == LAUNCH:
            if not stopping:
                self._answer_launch()
            return
        if stopping:
            log.warning("notice ignored: the agent is stopping", extra=fields(trigger=notice.kind))
            return
        self.pending.append(notice)

    def _answer_launch(self) -> None:
        """The launch gate, on a thread of its own: it is no backup, and it may wait through
        Pending for minutes while notices keep coming (launch_gate.answer)."""
        answer = self.deps.answer_launch
        if answer is None or (self._launching is not None and self._launching.is_alive()):
            return
        cfg, identity = self.cfg, self.identity

        def run() -> None:
            try:
                answer(cfg, identity.get(cfg, deadline=math.inf, cancel=threading.Event()))
            except Exception as err:  # the gate's failure is logged; the watch goes on
                log.error("launch gate failed", extra=fields(error=f"{type(err).__name__}: {err}"))

        log.info("left the warm pool with no boot: answering the launching action")
        self._launching = threading.Thread(target=run, name="launch-gate", daemon=True)
        self._launching.start()

    def _start_next(self) -> None:
        self.pending.sort(key=lambda n: PRIORITY[n.kind])
        notice = self.pending.pop(0)
        log.info("starting the backup", extra=fields(trigger=notice.kind, notice=notice.detail))
        self.notifier.status(f"backing up ({notice.kind})")
        # The termination archive must not race a segment: shipping stops first (a few
        # seconds at most), and what it did not finish is archived.
        last = notice.kind in (TERMINATION, SPOT_TERMINATE)
        self.job = Job(
            notice,
            self.cfg,
            self.deps,
            self.identity,
            self.notifier,
            on_done=self._wake,
            before=self._stop_shipping if last else None,
        )
        self.job.start()

    def _start_shipping(self) -> None:
        if not self.cfg.ship:
            return
        from instance_agent.shipper import Shipper

        cfg = self.cfg
        self.shipper = Shipper(
            cfg, lambda stop: self.identity.get(cfg, deadline=math.inf, cancel=stop), self.deps.make_clients
        )
        self.shipper.start()

    def _stop_shipping(self, wait: float | None = None) -> Ledger | None:
        """Stop shipping; what it recorded, for the termination archive to leave out. Before
        a termination job the segment in flight gets a few seconds (the default); `wait` 0
        cancels it at once."""
        shipper, self.shipper = self.shipper, None
        if shipper is None:
            return None
        if wait is None:
            shipper.stop()
        else:
            shipper.stop(wait)
        return shipper.ledger()

    def _finish_job(self, *, stopping: bool) -> None:
        assert self.job is not None
        code = self.job.exit_code if self.job.exit_code is not None else EXIT_FAILED
        self.job = None
        if stopping:
            # A stop that cut a backup short exits with that backup's code; an earlier
            # job's failure was reported then and does not make a later idle stop fail.
            self.exit_code = code
        else:
            self.notifier.status("watching")

    def _reload(self) -> None:
        if self.deps.reload is None:
            log.info("SIGHUP: nothing to reload")
            return
        try:
            new = self.deps.reload()
        except AgentError as err:
            log.error("config reload failed; keeping the running config", extra=fields(error=str(err)))
            return
        old = self.cfg
        # The identity is resolved once and cached (IdentityCache): a new instance_id or
        # region would be logged as changed and never used. Kept, and said so.
        later = [name for name in NEEDS_RESTART if getattr(new, name) != getattr(old, name)]
        if later:
            new = dataclasses.replace(new, **{name: getattr(old, name) for name in later})
            log.warning("config reload: these need a restart; kept as they were", extra=fields(fields=later))
        changed = [f.name for f in dataclasses.fields(Config) if getattr(new, f.name) != getattr(old, f.name)]
        self.cfg = new
        self.poller.configure(new)
        logging.getLogger().setLevel(new.log_level.upper())
        log.info("config reloaded", extra=fields(changed=changed, file=new.config_file))
        if changed:
            self._reship(old)

    def _reship(self, old: Config) -> None:
        """Shipping follows the reloaded config: started when `ship` was turned on, stopped
        when off, and restarted on anything else that changed, since a shipper reads its
        config (bucket, prefix, sources, settle time…) once (issue 19 item 2)."""
        if old.ship and self.shipper is None:
            return  # stopped for the termination archive: it stays stopped
        if not (old.ship or self.cfg.ship):
            return
        if self.shipper is not None:
            self._stop_shipping()  # a segment in flight gets its few seconds, as before a job
        self._start_shipping()
        log.info(
            "shipping " + ("stopped" if not self.cfg.ship else "restarted" if old.ship else "started"),
            extra=fields(reason="config reloaded"),
        )


def _read_wake(sock: socket.socket) -> list[int]:
    """Signal numbers written by the C handler; zero bytes (our own wake-ups) dropped."""
    out: list[int] = []
    while True:
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return out
        if not data:
            return out
        out.extend(b for b in data if b)


def serve(cfg: Config, deps: Deps) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit code."""
    return Watcher(cfg, deps).run()
