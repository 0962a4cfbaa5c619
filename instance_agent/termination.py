"""The termination job: one backup and one honest completion per lifecycle action.

Both trigger paths run this same job with the same configuration (the instance's
agent.toml): `instance-agent backup` (Run Command, or an operator) and the watcher. It is

    find the action ─► lock ─► decide ─► drain ─► pre-commands ─► archive ─► post-commands
        ─► report ─► complete ─► record ─► unlock

- **Find the action** (`Lifecycle.locate`): IMDS says `Terminated` up to a deregistration
  delay before Auto Scaling holds the instance in `Terminating:Wait`. Nothing is archived
  before the wait state, so the logs written while connections drain are in the backup.
  An instance in service is an ad-hoc run: it backs up, says `lifecycle_result: none`,
  and never counts as the termination. A return to the warm pool runs the pre- and
  post-commands and completes `CONTINUE`, with no backup unless `warm_pool_backup`.
- **Lock and decide** (once.py): whichever path holds the lock does the whole job; the other
  waits for it and then finds its record. A record whose backup succeeded but whose
  completion failed is completed by the next run, without a second archive.
- **Heartbeats** run from the moment the action is seen live until it is completed, through
  drain, commands and archive: one thread, one `Lifecycle`.
- **Cancel** (a signal, or the watcher's stop grace) ends every wait early. The run then
  reports the failure and, where it owns a live action, completes it with --on-failure on
  a fresh deadline: the instance is never left hanging for the heartbeat timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from instance_agent import handoff_send, keys, metrics, notify, retained
from instance_agent.backup import _s3_extra, archive_and_upload, key_values
from instance_agent.clients import Clients
from instance_agent.commands import Commands
from instance_agent.config import Config
from instance_agent.drain import DrainGate
from instance_agent.errors import (
    EXIT_FAILED,
    EXIT_OK,
    AgentError,
    Cancelled,
    LifecycleError,
    NotifyError,
)
from instance_agent.identity import Identity
from instance_agent.lifecycle import (
    ACTIVE,
    GONE,
    NOT_TERMINATING,
    REPLACING,
    RETAINED,
    ROOT_VOLUME,
    WARM_RETURN,
    Lifecycle,
    discover,
    instance_state,
)
from instance_agent.logs import fields
from instance_agent.once import COMPLETE_ONLY, DUPLICATE, RUN, Record, TerminationLock, decide
from instance_agent.redact import fingerprint
from instance_agent.result import DUPLICATE as STATUS_DUPLICATE
from instance_agent.result import FAILED, SKIPPED, Result
from instance_agent.s3upload import abort_stale_uploads
from instance_agent.shipstate import Ledger
from instance_agent.states import WARMED, classify

log = logging.getLogger(__name__)

LOCK_NAME = "termination"  # shared by the SSM path and the watcher: one lock per instance
TERMINAL_IMDS_STATES = ("Terminated", "Warmed:Terminated")
# A Spot reclaim is not held by any hook: a record it leaves may be completed by a Run
# Command for a lifecycle action that arrives within this long, without a second archive.
SPOT_RECORD_VALID = 600.0


@dataclass(frozen=True)
class Plan:
    """How a trigger is answered."""

    termination: bool  # counts as the termination: locked and recorded
    complete: bool  # look for, heartbeat and complete the terminating lifecycle action
    commands: bool  # drain gate and pre/post commands (never on an ad-hoc run)
    drain_cap: float | None = None  # an upper bound on the drain wait (Spot: 2 minutes)
    max_duration: float | None = None  # a default for --max-duration (Spot)


COMMAND = Plan(termination=True, complete=True, commands=True)
COMPLETING = "completing"  # the on_stage text while CompleteLifecycleAction runs (watch.py reads it)


@dataclass
class Outcome:
    result: Result
    exit_code: int


@dataclass
class Options:
    """What the caller knows that the config does not."""

    trigger: str = "command"
    notice: str | None = None
    imds_state: str | None = None  # the target-lifecycle-state the caller read, if any
    plan: Plan = COMMAND
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    on_stage: Callable[[str], object] = lambda _stage: None
    progress_interval: float = 30.0
    clock: Callable[[], float] = time.monotonic
    # The watcher's shipper's ledger (a view): spares reading the file again at termination.
    shipped: Ledger | None = None


def run(cfg: Config, ident: Identity, clients: Clients, opts: Options | None = None) -> Outcome:
    """Run the job for whatever the instance's lifecycle says now; never raises an
    AgentError (it becomes the failed result)."""
    opts = opts or Options()
    if opts.plan.max_duration is not None and cfg.max_duration is None:
        cfg = dataclasses.replace(cfg, max_duration=opts.plan.max_duration)
    job = _Job(cfg, ident, clients, opts)
    try:
        job.run()
    except AgentError as err:
        job.result.status = FAILED
        job.result.error = str(err)
        log.error("run failed", extra=fields(error=str(err)))
    if not job.result.duration_s:
        job.result.duration_s = round(opts.clock() - job.started, 3)
    # A run that completed an action published before completing (_report_and_complete);
    # any other run publishes now. A metric can neither delay the completion nor change the outcome.
    if not job.metrics_sent:
        metrics.publish(clients.cloudwatch, job.result.to_json())
    return Outcome(job.result, job.exit_code())


class _Job:
    def __init__(self, cfg: Config, ident: Identity, clients: Clients, opts: Options) -> None:
        self.cfg, self.ident, self.clients, self.opts = cfg, ident, clients, opts
        self.clock = opts.clock
        self.started = self.clock()
        self.cancel = opts.cancel
        self.result = Result(
            instance_id=ident.instance_id,
            bucket=cfg.bucket,
            group=cfg.asg_name,
            hook=cfg.hook_name,
            trigger=opts.trigger,
            notice=opts.notice,
            lifecycle_action=_fingerprint(cfg.lifecycle_token),
        )
        self.lc: Lifecycle | None = None
        self.commands = Commands(cfg, opts.trigger, self.cancel)
        self.duplicate_code: int | None = None
        self.completion_failed = False  # a live action this run could not complete
        self.metrics_sent = False  # published before the completion (bounded)
        self.retried: Result | None = None  # a retained instance's backup that landed

    def exit_code(self) -> int:
        """0 when the backup is in S3 and the action (if any) was completed; 1 otherwise.
        A backup whose completion was refused is not a success: the instance still waits
        in Terminating:Wait, and Run Command should show that."""
        if self.duplicate_code is not None:
            return self.duplicate_code
        ok = self.result.ok or self.result.status == SKIPPED
        return EXIT_OK if ok and not self.completion_failed else EXIT_FAILED

    # -- the phases ---------------------------------------------------------------------
    def run(self) -> None:
        try:
            kind = self._find_action()
        except (LifecycleError, Cancelled) as err:
            if isinstance(err, Cancelled) or not self._expected():
                raise
            # The instance is leaving but Auto Scaling cannot tell us about the action
            # (AccessDenied, the wait state never came): a backup without a completion
            # still beats none. It is recorded as the termination.
            self.result.lifecycle_error = str(err)
            log.error("cannot find the lifecycle action; backing up anyway", extra=fields(error=str(err)))
            self.lc, kind = None, GONE
        self.result.action = kind
        if kind == RETAINED and self.opts.trigger != "command" and self._take_over_retries():
            return
        if self._nothing_to_do(kind):
            return
        if kind in (NOT_TERMINATING, RETAINED, REPLACING) or not self.opts.plan.termination:
            # An ad-hoc run, or a Spot stop/rebalance notice: back up, nothing more. Only
            # the watcher's notices run the drain gate and commands: an operator's ad-hoc
            # backup must never stop the application.
            self._backup_only(commands=self.opts.plan.commands and self.opts.trigger != "command")
            return
        lock = TerminationLock(
            (self.cfg.state_dir, self.cfg.runtime_dir),
            f"{LOCK_NAME}-{self.ident.instance_id}",
            cancel=self.cancel,
        )
        lock.acquire(self.cfg.lock_timeout)
        try:
            if kind == WARM_RETURN:
                self._warm_return()
            elif kind == ROOT_VOLUME:
                self._root_volume()
            else:
                self._termination(lock, kind)
        finally:
            lock.release()

    def _nothing_to_do(self, kind: str) -> bool:
        """A watcher notice with no live terminating action of ours behind it: no backup,
        no commands, no report, no metric. A launch into the warm pool reads `Warmed:*` in
        IMDS (the target state) while a launching hook holds it in `Warmed:Pending:Wait`
        (https://docs.aws.amazon.com/autoscaling/ec2/userguide/warm-pool-instance-lifecycle.html);
        a retained instance's action already ended in ABANDON
        (https://docs.aws.amazon.com/autoscaling/ec2/userguide/instance-lifecycle-policy.html).
        Run Command is an explicit ask and still backs up (the operator's recovery path)."""
        if self.opts.trigger == "command":
            return False
        warmed = self.opts.imds_state is not None and classify(self.opts.imds_state) == WARMED
        if not (kind in (RETAINED, REPLACING) or (kind == NOT_TERMINATING and warmed)):
            return False
        log.info(
            "no terminating action of ours is live; nothing to do",
            extra=fields(action=kind, imds_state=self.opts.imds_state),
        )
        self.result.status = SKIPPED
        return True

    def _find_action(self) -> str:
        """ACTIVE, WARM_RETURN, GONE or NOT_TERMINATING, after waiting out a deregistration
        delay. Without Auto Scaling (no client, --no-complete, a Spot notice) the plan says."""
        plan, cfg = self.opts.plan, self.cfg
        if not (plan.complete and cfg.complete and self.clients.autoscaling is not None):
            self._name_group()
            return GONE if plan.termination and not plan.complete else NOT_TERMINATING
        expect = self._expected()
        deadline = self.started + cfg.wait_timeout
        autoscaling = self.clients.autoscaling
        target = self._retrying(
            deadline,
            lambda: discover(
                autoscaling,
                self.ident.instance_id,
                group=cfg.asg_name,
                hook=cfg.hook_name,
                token=cfg.lifecycle_token,
            ),
        )
        if target is None:
            log.info("no terminating lifecycle hook for this instance; nothing to complete")
            return GONE if expect else NOT_TERMINATING
        self.result.group, self.result.hook = target.group, target.hook
        self.lc = Lifecycle(autoscaling, target, interval=cfg.heartbeat_interval, clock=self.clock)
        kind = self.lc.locate(deadline=deadline, expect_termination=expect, cancel=self.cancel)
        if kind == GONE:
            self.result.lifecycle_error = (
                "no active lifecycle action: it was completed elsewhere or expired before this run"
            )
        log.info(
            "lifecycle",
            extra=fields(
                action=kind,
                group=target.group,
                hook=target.hook,
                lifecycle_action=self.result.lifecycle_action,
            ),
        )
        return kind

    def _name_group(self) -> None:
        """The group name for the object key, when no hook discovery finds it."""
        if self.result.group is not None or self.clients.autoscaling is None:
            return
        try:
            found = instance_state(self.clients.autoscaling, self.ident.instance_id)
        except LifecycleError as err:
            log.info("group name unknown; the key says no-group", extra=fields(error=str(err)))
            return
        self.result.group = found[0] if found else None

    def _expected(self) -> bool:
        """Something already said the instance is leaving: a Run Command with an action
        token, IMDS's `Terminated`, or a Spot reclaim."""
        return (
            bool(self.cfg.lifecycle_token)
            or self.opts.imds_state in TERMINAL_IMDS_STATES
            or (self.opts.plan.termination and self.opts.trigger != "command")
        )

    def _retrying(self, deadline: float, call: Callable[[], Any]) -> Any:
        """`call()`, retried with backoff on retryable Auto Scaling errors until `deadline`:
        an outage right after the IMDS flip must not lose the termination."""
        wait = 1.0
        while True:
            try:
                return call()
            except LifecycleError as err:
                if not err.retryable or self.clock() + wait > deadline:
                    raise
                log.warning("Auto Scaling unreachable; retrying", extra=fields(error=str(err), wait_s=wait))
            if self.cancel.wait(wait):
                raise Cancelled("stopped while Auto Scaling was unreachable")
            wait = min(wait * 2, 30.0)

    def _termination(self, lock: TerminationLock, kind: str) -> None:
        record = lock.recorded()
        live = kind == ACTIVE
        if record is not None and self.lc is not None and live:
            # We may have waited for the lock while the other path finished this very action:
            # ask again now.
            live = self.lc.probe(self.clock() + self.cfg.complete_timeout, self.cancel)
        if record is not None and self.lc is None and not self.opts.plan.complete:
            # A Spot reclaim: no Auto Scaling to ask; one backup per reclaim notice window.
            verdict = DUPLICATE if time.time() - record.recorded_at < SPOT_RECORD_VALID else RUN
        else:
            verdict = decide(record, live=live, action=self.result.lifecycle_action, now=time.time())
        if verdict == DUPLICATE:
            assert record is not None
            self._duplicate(record)
            if self._left_to_us(record):
                # Run Command answered this action first and its backup failed: if the
                # instance is now retained, the watcher retries (retained.py).
                self._retry_retained()
            return
        if verdict == COMPLETE_ONLY:
            assert record is not None and self.lc is not None
            self._complete_recorded(lock, record)
            return
        self._full(lock, live_action=live and self.lc is not None)

    def _full(self, lock: TerminationLock, *, live_action: bool) -> None:
        """Drain, pre, archive, post, report, complete, record: the one job."""
        lc = self.lc if live_action else None
        with lc.heartbeats_while() if lc is not None else contextlib.nullcontext():
            fatal = self._before_archive() if self.opts.plan.commands else False
            handoff_error = self._handoff() if self.cfg.handoff_path and not fatal else None
            self._archive(abort_stale=True, cancelled=fatal)
            if handoff_error:
                # The full backup still ran (it holds the state too), but the peer gets
                # nothing: the job failed, and the hook is completed with --on-failure.
                self.result.status = FAILED
                self.result.error = self.result.error or handoff_error
            if self.opts.plan.commands:
                self.commands.post(self.result)
        self.result.commands = self.commands.as_dicts()
        completed = self._report_and_complete(lc)
        if lc is None and not self.opts.plan.complete:
            # A Spot reclaim completes nothing: a lifecycle action that shows up within
            # SPOT_RECORD_VALID is completed by the next run, without a second archive.
            completed = False
        lock.record(
            Record(
                recorded_at=time.time(),
                exit_code=self.exit_code(),
                result=self.result.to_json(),
                backup_ok=self.result.ok,
                completed=completed,
                lifecycle_result=self._planned_result(),
                action=self.result.lifecycle_action,
                valid_for=float(lc.target.heartbeat_timeout) if lc is not None else SPOT_RECORD_VALID,
            )
        )
        if self._planned_result() == "ABANDON" and not self.result.ok and self.opts.trigger != "command":
            # A retained instance keeps its disks: retry until the backup lands (retained.py).
            retained.run_if_retained(
                self.cfg, self.ident, self.clients, self._retry_backup, self.cancel, self.result.group
            )

    def _retry_backup(self) -> dict[str, Any]:
        """One more archive for a retained instance, on a fresh result (the commands already ran)."""
        first, r = self.result, self.result
        self.result = Result(r.instance_id, r.bucket, r.group, r.hook, trigger=r.trigger, notice=r.notice)
        try:
            self._archive(abort_stale=True, cancelled=False)
            self.retried = self.result
            return self.result.to_json()
        finally:
            self.result = first

    def _left_to_us(self, record: Record | None) -> bool:
        """The other path's run (Run Command) ended in ABANDON with its backup failed. On a
        retained instance the watcher is the one that retries: Run Command's execution
        timeout cannot hold a retry loop of hours, and the watcher runs as long as the
        instance does."""
        return (
            record is not None
            and self.opts.trigger != "command"
            and not record.backup_ok
            and record.lifecycle_result == "ABANDON"
        )

    def _retry_retained(self) -> None:
        """retained.py's loop from this run; its result becomes the backup that landed."""
        outcome = retained.run_if_retained(
            self.cfg, self.ident, self.clients, self._retry_backup, self.cancel, self.result.group
        )
        if outcome == retained.RECOVERED and self.retried is not None:
            action, self.result = self.result.action, self.retried
            self.result.action = action

    def _take_over_retries(self) -> bool:
        """A watcher notice on a retained instance: when the record under the lock says the
        terminating action ended in ABANDON after a failed backup, retry it here (True)."""
        lock = TerminationLock(
            (self.cfg.state_dir, self.cfg.runtime_dir),
            f"{LOCK_NAME}-{self.ident.instance_id}",
            cancel=self.cancel,
        )
        lock.acquire(self.cfg.lock_timeout)
        try:
            if not self._left_to_us(lock.recorded()):
                return False
            log.info("retained after the other path's ABANDON; the watcher retries the backup")
            self._retry_retained()
            return True
        finally:
            lock.release()

    def _warm_return(self) -> None:
        """Back into the warm pool: the instance and its disks live on. Commands run (the
        application must let go), a backup only when asked, and the hook is completed
        promptly with CONTINUE. Nothing is recorded: the real termination comes later."""
        assert self.lc is not None
        log.info(
            "returning to the warm pool: not a termination", extra=fields(backup=self.cfg.warm_pool_backup)
        )
        with self.lc.heartbeats_while():
            if self.opts.plan.commands:
                self._before_archive()
            if self.cfg.warm_pool_backup:
                self._archive(abort_stale=False, cancelled=False)
            else:
                self.result.status = SKIPPED
            if self.opts.plan.commands:
                self.commands.post(self.result)
        self.result.commands = self.commands.as_dicts()
        self._report(self.result)
        self._complete(self.lc, "CONTINUE", self.cfg.complete_timeout)

    def _root_volume(self) -> None:
        """A root-volume replacement held by our terminating hook: the instance stays, its
        root volume (and the state directory on it) goes
        (https://docs.aws.amazon.com/autoscaling/ec2/userguide/replace-root-volume.html).
        The same job as a termination (drain gate, commands, a full archive, the report, the
        completion: CONTINUE, or --on-failure when the backup failed), but it is not the
        instance's termination: nothing is recorded (the record would be on the volume that
        goes, and a later termination is a new action that gets its own archive), and a
        failed backup is never retained (retention is about terminations; the replacement
        goes on)."""
        lc = self.lc
        assert lc is not None
        log.info("root-volume replacement: backing up what lives on the root volume before it goes")
        with lc.heartbeats_while():
            fatal = self._before_archive() if self.opts.plan.commands else False
            self._archive(abort_stale=True, cancelled=fatal)
            if self.opts.plan.commands:
                self.commands.post(self.result)
        self.result.commands = self.commands.as_dicts()
        self._report_and_complete(lc)

    def _backup_only(self, *, commands: bool) -> None:
        fatal = self._before_archive() if commands else False
        self._archive(abort_stale=False, cancelled=fatal)
        if commands:
            self.commands.post(self.result)
            self.result.commands = self.commands.as_dicts()
        self._report(self.result)

    # -- steps --------------------------------------------------------------------------
    def _before_archive(self) -> bool:
        """The drain gate, then the pre-commands. True when a pre-command failed and
        --pre-command-fatal asks to fail the backup."""
        cfg = self.cfg
        if cfg.drain_path:
            self.result.drain = self._drain()
        if cfg.pre_command:
            self.opts.on_stage("running pre-commands")
            if not self.commands.pre() and cfg.pre_command_fatal:
                self.result.error = "pre-command failed (--pre-command-fatal)"
                return True
        return False

    def _handoff(self) -> str | None:
        """The hand-off archive, before the full one (handoff_send.py): the error that
        fails the job, or None once the hand-off object is in S3."""
        self.opts.on_stage("handing off")
        try:
            sent = handoff_send.send(
                self.cfg,
                self.ident,
                self.clients,
                group=self.result.group,
                clock=self.clock,
                cancel=self.cancel,
            )
        except AgentError as err:
            log.error("hand-off failed", extra=fields(error=str(err)))
            return str(err)
        except Exception as err:  # a bug must still report and complete, as in _archive
            log.exception("unexpected error during the hand-off")
            return f"hand-off failed: {type(err).__name__}: {err}"
        self.result.handoff_key = sent.key
        return None

    def _drain(self) -> dict[str, Any]:
        cfg = self.cfg
        timeout = cfg.drain_timeout
        if self.opts.plan.drain_cap is not None:
            timeout = min(timeout, self.opts.plan.drain_cap)
        gate = DrainGate(cfg.drain_path)
        log.info(
            "drain gate: waiting for the paths to clear",
            extra=fields(paths=list(cfg.drain_path), timeout_s=timeout),
        )
        self.opts.on_stage("draining: waiting for " + " ".join(cfg.drain_path))
        with _interrupt_on(self.cancel, gate.interrupt):
            out = gate.wait(timeout)
        if out.drained:
            log.info("drain paths clear", extra=fields(waited_s=out.waited_s))
        elif out.cancelled:
            log.warning(
                "drain wait cut short: the agent is stopping",
                extra=fields(busy=list(out.busy), waited_s=out.waited_s),
            )
        else:
            log.warning(
                "drain timeout reached; backing up anyway",
                extra=fields(busy=list(out.busy), waited_s=out.waited_s, timeout_s=timeout),
            )
        return {"drained": out.drained, "waited_s": out.waited_s, "busy": list(out.busy)}

    def _archive(self, *, abort_stale: bool, cancelled: bool) -> None:
        cfg, result = self.cfg, self.result
        if abort_stale:
            # A run killed mid-upload (kill -9, power loss) leaves its multipart upload
            # behind; under the lock no other run of ours for this instance is uploading.
            prefix = keys.listing_prefix(cfg.key_template, key_values(cfg, self.ident, result.group))
            abort_stale_uploads(
                self.clients.s3, cfg.bucket or "", prefix, self.ident.instance_id, extra=_s3_extra(cfg)
            )
        self.opts.on_stage("backing up")
        # A fatal pre-command failure still goes through the pipeline, already cancelled:
        # that is what reports the failure and completes the hook with --on-failure.
        cancel = _set_event() if cancelled else self.cancel
        try:
            if cancel.is_set():
                raise Cancelled("backup cancelled")
            # With shipping on, what the watcher already shipped stays out of the archive;
            # an empty or unreadable ledger means the full archive, exactly as without.
            shipped = None
            if cfg.ship:
                shipped = (
                    self.opts.shipped
                    if self.opts.shipped is not None
                    else Ledger.load(cfg.state_dir, self.ident.instance_id)
                )
            archive_and_upload(
                cfg,
                self.ident,
                self.clients,
                result,
                group=result.group,
                started=self.started,
                clock=self.clock,
                progress_interval=self.opts.progress_interval,
                cancel=cancel,
                shipped=shipped,
            )
        except AgentError as err:
            result.status = FAILED
            result.error = result.error or str(err)
        except Exception as err:  # a bug must still report and complete, never hang the hook
            log.exception("unexpected error during backup")
            result.status = FAILED
            result.error = f"{type(err).__name__}: {err}"
        level = logging.INFO if result.ok else logging.ERROR
        log.log(
            level,
            "backup " + result.status,
            extra=fields(
                key=result.key,
                bytes_read=result.bytes_read,
                bytes_uploaded=result.bytes_uploaded,
                files=result.files,
                warnings=result.warnings,
                error=result.error,
            ),
        )

    def _planned_result(self) -> str:
        return self.cfg.on_success if self.result.ok else self.cfg.on_failure

    def _report_and_complete(self, lc: Lifecycle | None) -> bool:
        """Report, then complete. True when the action is over (completed by us, gone, or
        there was none to complete)."""
        if lc is not None and not lc.gone.is_set():
            self.result.lifecycle_result = self._planned_result()
        self._report(self.result)
        if lc is None:
            return True
        if lc.gone.is_set():
            self.result.lifecycle_result = "none"
            self.result.lifecycle_error = "lifecycle action expired or was completed elsewhere"
            return True
        # Metrics before completing: after it the group shuts the instance down. They
        # describe the result about to be sent, and wait at most metrics.PUBLISH_BOUND.
        # The duration is the backup's, up to the completion, in the metric and the result alike.
        self.result.duration_s = self.result.duration_s or round(self.clock() - self.started, 3)
        metrics.publish_bounded(self.clients.cloudwatch, self.result.to_json())
        self.metrics_sent = True
        done = self._complete(lc, self.result.lifecycle_result, self.cfg.complete_timeout)
        if not done and not lc.gone.is_set():
            self.completion_failed = True
            self._report(dataclasses.replace(self.result, event="lifecycle_completion_failed"))
        return done or lc.gone.is_set()

    def _complete(self, lc: Lifecycle, result: str, timeout: float) -> bool:
        self.opts.on_stage(COMPLETING)
        error = lc.complete(result, timeout, stop=self.cancel)
        if error is None:
            self.result.lifecycle_result = result
            return True
        # What actually happened: nothing was completed by this run.
        self.result.lifecycle_result = "none"
        self.result.lifecycle_error = error
        log.error("lifecycle completion failed", extra=fields(error=error))
        return False

    def _duplicate(self, record: Record) -> None:
        first = record.result
        res = self.result
        for name in ("group", "hook", "key", "manifest_key", "journal_key", "handoff_key", "bucket"):
            if name in first:
                setattr(res, name, first[name])
        res.status = STATUS_DUPLICATE
        res.first_status = first.get("status")
        res.first_exit_code = record.exit_code
        self.duplicate_code = record.exit_code
        log.info(
            "already handled for this lifecycle action; nothing to do",
            extra=fields(key=res.key, first_status=res.first_status),
        )

    def _complete_recorded(self, lock: TerminationLock, record: Record) -> None:
        """The earlier run backed up but could not complete (AccessDenied, an outage):
        complete with its result now, with no second archive."""
        assert self.lc is not None
        self._duplicate(record)
        log.info(
            "completing the action an earlier run backed up", extra=fields(result=record.lifecycle_result)
        )
        done = self._complete(self.lc, record.lifecycle_result, self.cfg.complete_timeout)
        if done:
            self.duplicate_code = EXIT_OK if record.backup_ok else record.exit_code
            lock.record(
                dataclasses.replace(
                    record,
                    completed=True,
                    recorded_at=time.time(),
                    result={**record.result, "lifecycle_result": record.lifecycle_result},
                )
            )
        else:
            self.duplicate_code = EXIT_FAILED
        self._report(self.result)

    def _report(self, result: Result) -> None:
        # The report is the result as --json prints it: its duration ends here, before the
        # completion (which the report announces as planned).
        self.result.duration_s = result.duration_s = round(self.clock() - self.started, 3)
        cfg, sns = self.cfg, self.clients.sns
        if not cfg.topic_arn or sns is None:
            return
        try:
            msg_id = notify.publish(sns, cfg.topic_arn, result.to_json())
            log.info("report published", extra=fields(topic_arn=cfg.topic_arn, message_id=msg_id))
        except NotifyError as err:
            self.result.notify_error = str(err)
            log.error("report not published", extra=fields(error=str(err)))


@contextlib.contextmanager
def _interrupt_on(cancel: threading.Event, interrupt: Callable[[], None]) -> Iterator[None]:
    """Call `interrupt` if `cancel` is set while the block runs (a waiter thread, since the
    block itself is blocked)."""
    done = threading.Event()

    def waiter() -> None:
        while not done.is_set():
            if cancel.wait(0.1):
                interrupt()
                return

    thread = threading.Thread(target=waiter, name="cancel-waiter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=1)


def _fingerprint(token: str | None) -> str | None:
    return fingerprint(token) if token else None


def _set_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


def outcome_fields(outcome: Outcome) -> Mapping[str, Any]:
    """The fields the watcher's log line and status file take from an outcome."""
    r = outcome.result
    return {
        "status": r.status,
        "key": r.key,
        "lifecycle_result": r.lifecycle_result,
        "error": r.error,
        "exit_code": outcome.exit_code,
    }
