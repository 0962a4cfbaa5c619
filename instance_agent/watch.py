"""`instance-agent watch`: the on-instance daemon that notices its own termination.

Three threads, each with one job:

- the **poller** asks IMDSv2 for the target lifecycle state, the Spot instance action and
  the rebalance recommendation, one request per path per interval, backing off on errors.
  It logs a path only when its answer changes, and emits a notice only on the change into
  a state that calls for action. That change-only rule is the latch: a state that stays
  `Terminated` is never acted on twice (aws-node-termination-handler issue 1100).
- the **job** thread answers one notice: drain gate, pre-commands, `backup.run`,
  post-commands. Jobs run one at a time; notices that arrive meanwhile wait their turn.
- the **main** thread only waits: on a self-pipe that signal handlers and the other two
  threads write to, and on its timers. It sends sd_notify messages (WATCHDOG=1 keeps going
  through drain and backup), reloads the config on SIGHUP, and on SIGTERM either exits at
  once (idle) or lets the job run for `--stop-grace` before cancelling it (the pipeline
  then aborts the upload, reports the failure and completes with `--on-failure`).

boto3 and botocore are imported by the first job, never while idle: the idle daemon stays
small (see benchmarks/watch_footprint.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import queue
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from instance_agent import hooks, status
from instance_agent.config import Config
from instance_agent.drain import DrainGate
from instance_agent.errors import EXIT_FAILED, EXIT_OK, AgentError, IMDSError
from instance_agent.imds import IMDS, IMDSRefused
from instance_agent.logs import fields
from instance_agent.sdnotify import Notifier, watchdog_interval

if TYPE_CHECKING:
    from instance_agent.backup import Clients, Identity, Outcome
    from instance_agent.notify import SNSClient

log = logging.getLogger(__name__)

LIFECYCLE_PATH = "autoscaling/target-lifecycle-state"
SPOT_PATH = "spot/instance-action"
REBALANCE_PATH = "events/recommendations/rebalance"
TERMINAL_STATES = ("Terminated", "Warmed:Terminated")

# Backoff on IMDS errors doubles from the poll interval up to this. 20 s cuts the request
# rate of a struggling (or throttling) IMDS tenfold at a 2 s poll, yet still catches a
# Spot notice well inside its two minutes once IMDS answers again.
MAX_BACKOFF = 20.0
# No lifecycle hook delays a Spot reclaim, which comes about 120 s after the notice: a
# backup without its own --max-duration is cut at 100 s, and the drain gate may take 30.
SPOT_MAX_DURATION = 100.0
SPOT_DRAIN_CAP = 30.0
# The main loop stops vouching for the poller (no more WATCHDOG=1) when it has not finished
# a round for this long: three paths at IMDS's 3 s request timeout, plus generous slack.
POLLER_STALE = 60.0

TERMINATION = "termination"
SPOT_TERMINATE = "spot-terminate"
SPOT_STOP = "spot-stop"
SPOT_HIBERNATE = "spot-hibernate"
REBALANCE = "rebalance"


@dataclass(frozen=True)
class Plan:
    """How a notice is answered."""

    dedupe: str | None  # the exactly-once key shared with `instance-agent backup`, or none
    complete: bool  # heartbeat and complete the terminating lifecycle hook
    priority: int  # lower runs first when several notices wait


PLANS: dict[str, Plan] = {
    TERMINATION: Plan("termination", True, 0),
    # Recorded as the termination (so the SSM path sees it done) but nothing to complete.
    SPOT_TERMINATE: Plan("termination", False, 1),
    # The instance comes back after these: a later real termination needs its own backup.
    SPOT_STOP: Plan(None, False, 2),
    SPOT_HIBERNATE: Plan(None, False, 2),
    REBALANCE: Plan(None, False, 3),
}


@dataclass(frozen=True)
class Notice:
    kind: str
    detail: str  # the lifecycle state, or the notice's time


@dataclass(frozen=True)
class Deps:
    """What the CLI hands the daemon: it alone builds boto3 clients."""

    resolve_identity: Callable[[Config], Identity]
    make_clients: Callable[[Config, str], Clients]
    reload: Callable[[], Config] | None = None


# --- the poller -------------------------------------------------------------------------


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

    def __init__(self, imds: IMDS, cfg: Config, emit: Callable[[Notice | str], None], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
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
                log.log(level, "IMDS request failed; backing off", extra=fields(
                    path=state.path, error=str(err)))
            return
        state.due = started + self.interval
        if state.failures:
            log.info("IMDS answers again", extra=fields(path=state.path,
                                                       failed_polls=state.failures))
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
            log.info("target lifecycle state", extra=fields(
                state=value or "none (404: no lifecycle transition yet)",
                previous=None if first else (previous or "none")))
            if value in TERMINAL_STATES and (first or previous not in TERMINAL_STATES):
                self.emit(Notice(TERMINATION, value))
        elif path == SPOT_PATH:
            if value is None:
                if not first:
                    log.info("spot interruption notice withdrawn")
                return
            action, _, when = value.partition("@")
            log.warning("spot interruption notice", extra=fields(action=action, time=when))
            kind = {"terminate": SPOT_TERMINATE, "stop": SPOT_STOP,
                    "hibernate": SPOT_HIBERNATE}.get(action)
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


# --- one job ------------------------------------------------------------------------------


class Job:
    """The answer to one notice, in its own thread: drain, pre, backup, post."""

    def __init__(self, notice: Notice, cfg: Config, deps: Deps, notifier: Notifier,
                 on_done: Callable[[], None]) -> None:
        self.notice = notice
        self.plan = PLANS[notice.kind]
        self.cfg = cfg
        self.deps = deps
        self.notifier = notifier
        self.on_done = on_done
        self.cancel = threading.Event()  # set by the main thread when the stop grace is over
        self.exit_code: int | None = None
        self.result: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._gate: DrainGate | None = None
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"job-{notice.kind}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def done(self) -> bool:
        return self._finished.is_set()

    def stop_now(self) -> None:
        with self._lock:
            self.cancel.set()
            gate = self._gate
        if gate is not None:
            gate.interrupt()

    def _main(self) -> None:
        try:
            self.exit_code = self._run()
        except Exception:
            log.exception("response failed before the backup could run",
                          extra=fields(trigger=self.notice.kind))
            self.exit_code = EXIT_FAILED
        finally:
            status.write_status(status.status_path(self.cfg), last_backup=status.backup_summary(
                self.result, self.exit_code, self.notice.kind))
            self._finished.set()
            self.on_done()

    def _run(self) -> int:
        from instance_agent import backup

        cfg, kind = self.cfg, self.notice.kind
        ident = self.deps.resolve_identity(cfg)
        clients = self.deps.make_clients(cfg, ident.region)
        if kind == SPOT_TERMINATE and cfg.max_duration is None:
            cfg = dataclasses.replace(cfg, max_duration=SPOT_MAX_DURATION)
        commands = _Commands(cfg, self.notice, self.cancel)
        extra: dict[str, Any] = {"trigger": kind, "notice": self.notice.detail}
        fatal = False
        already = self.plan.dedupe is not None and _recorded(cfg, ident, self.plan.dedupe)
        if already:
            log.info("this termination was already handled; not draining again")
        else:
            with self._prep_heartbeats(cfg, ident, clients) as found:
                if found is not None:
                    cfg = dataclasses.replace(cfg, asg_name=found[0], hook_name=found[1])
                if cfg.drain_path:
                    extra["drain"] = self._drain(cfg)
                if cfg.pre_command:
                    self.notifier.status("running pre-commands")
                    if not commands.pre() and cfg.pre_command_fatal:
                        fatal = True
                        extra["error"] = "pre-command failed (--pre-command-fatal)"
        if cfg.asg_name is None and clients.autoscaling is not None and not self.plan.complete:
            cfg = dataclasses.replace(cfg, asg_name=_group_of(clients, ident.instance_id))
        # A fatal pre-command failure still goes through the pipeline, already cancelled:
        # that is what reports the failure and completes the hook with --on-failure.
        backup_cancel = _set_event() if fatal else self.cancel
        sns = _AugmentedReport(clients.sns, commands, extra) if clients.sns else None
        run_clients = backup.Clients(s3=clients.s3, sns=sns,
                                     autoscaling=clients.autoscaling if self.plan.complete
                                     else None)
        outcome: Outcome = backup.run(cfg, ident, run_clients, dedupe=self.plan.dedupe,
                                      on_stage=commands.stage_hook(self.notifier),
                                      cancel=backup_cancel)
        commands.post(outcome.result)
        result = outcome.result
        result.update(extra, commands=commands.as_dicts())
        self.result = result
        log.info("response finished", extra=fields(
            trigger=kind, status=result.get("status"), key=result.get("key"),
            lifecycle_result=result.get("lifecycle_result"), error=result.get("error"),
            commands=len(commands.records), exit_code=outcome.exit_code))
        return outcome.exit_code

    @contextlib.contextmanager
    def _prep_heartbeats(self, cfg: Config, ident: Identity,
                         clients: Clients) -> Iterator[tuple[str, str] | None]:
        """Heartbeats while the drain gate and pre-commands run, so a long drain cannot let
        the lifecycle action expire. backup.run then takes over with its own heartbeats
        (it owns them while it works); the hand-over gap is one discovery call."""
        if not (self.plan.complete and cfg.complete and clients.autoscaling is not None
                and (cfg.drain_path or cfg.pre_command)):
            yield None
            return
        from instance_agent.errors import LifecycleError
        from instance_agent.lifecycle import Lifecycle, discover

        try:
            target = discover(clients.autoscaling, ident.instance_id, group=cfg.asg_name,
                              hook=cfg.hook_name, token=None)
        except LifecycleError as err:
            log.warning("lifecycle hook discovery failed; draining without heartbeats",
                        extra=fields(error=str(err)))
            target = None
        if target is None:
            yield None
            return
        lc = Lifecycle(clients.autoscaling, target, interval=cfg.heartbeat_interval,
                       wait_timeout=cfg.wait_timeout)
        with lc.heartbeats_while():
            yield target.group, target.hook

    def _drain(self, cfg: Config) -> dict[str, Any]:
        timeout = cfg.drain_timeout
        if self.notice.kind == SPOT_TERMINATE:
            timeout = min(timeout, SPOT_DRAIN_CAP)
        gate = DrainGate(cfg.drain_path)
        with self._lock:
            self._gate = gate
            if self.cancel.is_set():
                gate.interrupt()
        self.notifier.status("draining: waiting for " + " ".join(cfg.drain_path))
        try:
            out = gate.wait(timeout)
        finally:
            with self._lock:
                self._gate = None
        if out.drained:
            log.info("drain paths clear", extra=fields(waited_s=out.waited_s))
        elif out.cancelled:
            log.warning("drain wait cut short: the agent is stopping",
                        extra=fields(busy=list(out.busy), waited_s=out.waited_s))
        else:
            log.warning("drain timeout reached; backing up anyway", extra=fields(
                busy=list(out.busy), waited_s=out.waited_s, timeout_s=timeout))
        return {"drained": out.drained, "waited_s": out.waited_s, "busy": list(out.busy)}


class _Commands:
    """The pre/post commands of one job. Post-commands run once, at the first of: the
    report (right after the archive), the completing stage, or the end of backup.run."""

    def __init__(self, cfg: Config, notice: Notice, cancel: threading.Event) -> None:
        self.cfg = cfg
        self.notice = notice
        self.cancel = cancel
        self.records: list[hooks.CommandRecord] = []
        self._post_done = False
        self._lock = threading.Lock()

    def _env(self, result: Mapping[str, Any] | None) -> dict[str, str]:
        env = {"INSTANCE_AGENT_TRIGGER": self.notice.kind}
        if result is not None:
            for name in ("status", "key", "bucket"):
                if result.get(name) is not None:
                    env[f"INSTANCE_AGENT_{name.upper()}"] = str(result[name])
        return env

    def pre(self) -> bool:
        """Run the pre-commands; True when all succeeded."""
        done = hooks.run_all(self.cfg.pre_command, "pre", timeout=self.cfg.command_timeout,
                             env=self._env(None), cancel=self.cancel)
        self.records.extend(done)
        return all(r.ok for r in done)

    def post(self, result: Mapping[str, Any] | None) -> None:
        with self._lock:
            if self._post_done:
                return
            self._post_done = True
        self.records.extend(hooks.run_all(self.cfg.post_command, "post",
                                          timeout=self.cfg.command_timeout,
                                          env=self._env(result), cancel=self.cancel))

    def stage_hook(self, notifier: Notifier) -> Callable[[str], None]:
        def on_stage(stage: str) -> None:
            if stage == "completing":
                self.post(None)  # no report was sent (no topic): still before completion
            notifier.status(stage)

        return on_stage

    def as_dicts(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.records]


class _AugmentedReport:
    """The SNS client backup.run reports through, with two duties added.

    backup.run publishes right after the archive and before it completes the hook: the
    moment post-commands belong to (after the backup, while the hook still holds the
    instance). So they run here, first; then the report gains what only the watcher knows:
    the trigger, the drain outcome and every command's exit code and output.
    """

    def __init__(self, inner: SNSClient, commands: _Commands, extra: dict[str, Any]) -> None:
        self.inner = inner
        self.commands = commands
        self.extra = extra

    def publish(self, **kwargs: Any) -> Mapping[str, Any]:
        from instance_agent import notify

        try:
            doc = json.loads(kwargs.get("Message", ""))
        except ValueError:
            doc = None
        try:
            self.commands.post(doc if isinstance(doc, dict) else None)
        except Exception:  # the report and the completion after it must still happen
            log.exception("post-commands failed to run")
        if isinstance(doc, dict):
            doc.update(self.extra, commands=self.commands.as_dicts())
            kwargs["Message"] = notify.body_for(doc)
        return self.inner.publish(**kwargs)


def _recorded(cfg: Config, ident: Identity, dedupe: str) -> bool:
    """Whether a finished run already recorded this termination (read without the lock:
    only to skip the drain; backup.run decides under the lock)."""
    from instance_agent.once import TerminationLock

    lock = TerminationLock((cfg.state_dir, cfg.runtime_dir), f"{dedupe}-{ident.instance_id}")
    return lock.recorded() is not None


def _group_of(clients: Clients, instance_id: str) -> str | None:
    """The group name for the object key, when there is no hook discovery to find it."""
    from instance_agent.errors import LifecycleError
    from instance_agent.lifecycle import instance_state

    if clients.autoscaling is None:
        return None
    try:
        found = instance_state(clients.autoscaling, instance_id)
    except LifecycleError as err:
        log.info("group name unknown; the key says no-group", extra=fields(error=str(err)))
        return None
    return found[0] if found else None


def _set_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


# --- the daemon ---------------------------------------------------------------------------


class Watcher:
    def __init__(self, cfg: Config, deps: Deps, *, imds: IMDS | None = None,
                 notifier: Notifier | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.deps = deps
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.watchdog_every = watchdog_interval()
        self._inbox: queue.SimpleQueue[Notice | str] = queue.SimpleQueue()
        self._wake_w: socket.socket | None = None
        self.poller = Poller(imds or IMDS(), cfg, self._post, clock=clock)
        self.job: Job | None = None
        self.pending: list[Notice] = []
        self.ready = False
        self.exit_code = EXIT_OK

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
        previous = {s: signal.signal(s, _noop) for s in (signal.SIGTERM, signal.SIGINT,
                                                        signal.SIGHUP)}
        stop_polling = threading.Event()
        poller = threading.Thread(target=self.poller.run, args=(stop_polling,), name="poller",
                                  daemon=True)
        self.notifier.status("starting: waiting for IMDS")
        poller.start()
        try:
            return self._loop(wake_r, poller)
        finally:
            stop_polling.set()
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
                    log.warning("stop grace over: cancelling the backup", extra=fields(
                        grace_s=self.cfg.stop_grace))
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
                log.warning("second stop signal: cancelling the backup now",
                            extra=fields(signal=name))
                self.job.stop_now()
            return stop_at
        self.notifier.stopping("stopping")
        if self.job is None:
            log.info("stop requested", extra=fields(signal=name))
            return now
        log.warning("stop requested during a backup: letting it run", extra=fields(
            signal=name, trigger=self.job.notice.kind, grace_s=self.cfg.stop_grace))
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
                    self.notifier.ready("watching")
                    log.info("watching", extra=fields(
                        poll_interval_s=self.cfg.poll_interval, spot=self.cfg.spot,
                        on_rebalance=self.cfg.on_rebalance,
                        watchdog_s=self.watchdog_every))
            elif isinstance(item, Notice):
                self._on_notice(item, stopping=stopping)

    def _on_notice(self, notice: Notice, *, stopping: bool) -> None:
        if notice.kind == REBALANCE and self.cfg.on_rebalance == "log":
            return  # the poller logged it; --on-rebalance log asks for nothing more
        if stopping:
            log.warning("notice ignored: the agent is stopping", extra=fields(
                trigger=notice.kind))
            return
        self.pending.append(notice)

    def _start_next(self) -> None:
        self.pending.sort(key=lambda n: PLANS[n.kind].priority)
        notice = self.pending.pop(0)
        log.info("starting the backup", extra=fields(trigger=notice.kind, notice=notice.detail))
        self.notifier.status(f"backing up ({notice.kind})")
        self.job = Job(notice, self.cfg, self.deps, self.notifier, on_done=self._wake)
        self.job.start()

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
            log.error("config reload failed; keeping the running config",
                      extra=fields(error=str(err)))
            return
        changed = [f.name for f in dataclasses.fields(Config)
                   if getattr(new, f.name) != getattr(self.cfg, f.name)]
        self.cfg = new
        self.poller.configure(new)
        logging.getLogger().setLevel(new.log_level.upper())
        log.info("config reloaded", extra=fields(changed=changed, file=new.config_file))


def _noop(signum: int, frame: FrameType | None) -> None:
    """See Watcher.run: the wakeup fd carries the signal."""


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
