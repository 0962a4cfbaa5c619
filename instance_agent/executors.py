"""One executor per case of decision.Plan: it runs that case's steps (steps.py) on a result
of its own and returns it, with the run's exit code.

An executor gets the run's base result (what finding the action learned: group, hook,
action, errors) and starts from a copy of it; the Lifecycle when an action of ours is live;
and the termination lock, held, for the cases that read or write the record.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from dataclasses import dataclass

from instance_agent import decision, retained, steps
from instance_agent.decision import Plan
from instance_agent.errors import EXIT_FAILED, EXIT_OK
from instance_agent.lifecycle import Lifecycle
from instance_agent.logs import fields
from instance_agent.once import Record, TerminationLock
from instance_agent.result import DUPLICATE, FAILED, SKIPPED, Result
from instance_agent.steps import Context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Done:
    """What an executor returns."""

    result: Result
    exit_code: int
    metrics_sent: bool = False  # published before the completion (bounded); else the caller does


def execute(
    plan: Plan, ctx: Context, base: Result, lc: Lifecycle | None, lock: TerminationLock | None
) -> Done:
    """Run `plan`'s executor. `lc` is the hook target found (None when there is none), `lock`
    the termination lock when decision.locks() asked for it."""
    res = copy.deepcopy(base)
    if isinstance(plan, decision.NothingToDo):
        return nothing_to_do(res, plan)
    if isinstance(plan, (decision.AdHoc, decision.Retained)):
        return backup_only(ctx, res, commands=isinstance(plan, decision.AdHoc) and plan.commands)
    if isinstance(plan, decision.WarmReturn):
        assert lc is not None
        return warm_return(ctx, res, lc, plan)
    if isinstance(plan, decision.RootVolume):
        assert lc is not None
        return root_volume(ctx, res, lc, plan)
    assert lock is not None
    if isinstance(plan, decision.FullTermination):
        live = lc if plan.live else None
        return full(ctx, res, live, lock, commands=plan.commands, reclaim=False, retry=plan.retry_if_retained)
    if isinstance(plan, decision.SpotReclaim):
        return full(ctx, res, None, lock, commands=plan.commands, reclaim=True, retry=plan.retry_if_retained)
    if isinstance(plan, decision.Duplicate):
        return duplicate(ctx, res, plan)
    if isinstance(plan, decision.CompleteOnly):
        assert lc is not None
        return complete_only(ctx, res, lc, lock, plan.record)
    assert isinstance(plan, decision.RetryRetained)
    return retry_retained(ctx, res)


def nothing_to_do(res: Result, plan: decision.NothingToDo) -> Done:
    """No backup, no commands, no report, no metric: one log line."""
    log.info(
        "no terminating action of ours is live; nothing to do",
        extra=fields(action=res.action, imds_state=plan.imds_state),
    )
    res.status = SKIPPED
    return Done(res, steps.exit_code(res))


def backup_only(ctx: Context, res: Result, *, commands: bool) -> Done:
    """An ad-hoc run (or a notice that is not the termination): back up and report."""
    fatal = steps.before_archive(ctx, res) if commands else False
    steps.archive(ctx, res, abort_stale=False, cancelled=fatal)
    if commands:
        ctx.commands.post(res)
        res.commands = ctx.commands.as_dicts()
    steps.report(ctx, res)
    return Done(res, steps.exit_code(res))


def warm_return(ctx: Context, res: Result, lc: Lifecycle, plan: decision.WarmReturn) -> Done:
    """Back into the warm pool: the instance and its disks live on. Commands run (the
    application must let go), a backup only when asked, and the hook is completed
    promptly with CONTINUE. Nothing is recorded: the real termination comes later."""
    log.info("returning to the warm pool: not a termination", extra=fields(backup=plan.backup))
    with lc.heartbeats_while():
        if plan.commands:
            steps.before_archive(ctx, res)
        if plan.backup:
            steps.archive(ctx, res, abort_stale=False, cancelled=False)
        else:
            res.status = SKIPPED
        if plan.commands:
            ctx.commands.post(res)
    res.commands = ctx.commands.as_dicts()
    # The report goes out before the completion and announces it, as a termination's does
    # (steps.report_and_complete); complete() sets what actually happened.
    res.lifecycle_result = "CONTINUE"
    steps.report(ctx, res)
    steps.complete(ctx, lc, res, "CONTINUE")
    return Done(res, steps.exit_code(res))


def root_volume(ctx: Context, res: Result, lc: Lifecycle, plan: decision.RootVolume) -> Done:
    """A root-volume replacement held by our terminating hook: the instance stays, its
    root volume (and the state directory on it) goes
    (https://docs.aws.amazon.com/autoscaling/ec2/userguide/replace-root-volume.html;
    docs/aws-behaviour.md, "Lifecycle hooks").
    The same job as a termination (drain gate, commands, a full archive, the report, the
    completion: CONTINUE, or --on-failure when the backup failed), but it is not the
    instance's termination: nothing is recorded (the record would be on the volume that
    goes, and a later termination is a new action that gets its own archive), and a
    failed backup is never retained (retention is about terminations; the replacement
    goes on)."""
    log.info("root-volume replacement: backing up what lives on the root volume before it goes")
    with lc.heartbeats_while():
        fatal = steps.before_archive(ctx, res) if plan.commands else False
        steps.archive(ctx, res, abort_stale=True, cancelled=fatal)
        if plan.commands:
            ctx.commands.post(res)
    res.commands = ctx.commands.as_dicts()
    done = steps.report_and_complete(ctx, lc, res)
    return Done(res, steps.exit_code(res, completion_failed=done.failed), done.metrics_sent)


def full(
    ctx: Context,
    res: Result,
    lc: Lifecycle | None,
    lock: TerminationLock,
    *,
    commands: bool,
    reclaim: bool,
    retry: bool,
) -> Done:
    """Drain, pre, archive, post, report, complete, record: the one job. `lc` is the live
    action to heartbeat and complete (None: nothing to complete)."""
    cfg = ctx.cfg
    with lc.heartbeats_while() if lc is not None else contextlib.nullcontext():
        fatal = steps.before_archive(ctx, res) if commands else False
        handoff_error = steps.handoff(ctx, res) if cfg.handoff_path and not fatal else None
        steps.archive(ctx, res, abort_stale=True, cancelled=fatal)
        if handoff_error:
            # The full backup still ran (it holds the state too), but the peer gets
            # nothing: the job failed, and the hook is completed with --on-failure.
            res.status = FAILED
            res.error = res.error or handoff_error
        if commands:
            ctx.commands.post(res)
    res.commands = ctx.commands.as_dicts()
    done = steps.report_and_complete(ctx, lc, res)
    code = steps.exit_code(res, completion_failed=done.failed)
    planned = steps.planned_result(ctx, res)
    lock.record(
        Record(
            recorded_at=time.time(),
            exit_code=code,
            result=res.to_json(),
            backup_ok=res.ok,
            # A Spot reclaim completes nothing: a lifecycle action that shows up within
            # SPOT_RECORD_VALID is completed by the next run, without a second archive.
            completed=done.over and not reclaim,
            lifecycle_result=planned,
            action=res.lifecycle_action,
            valid_for=float(lc.target.heartbeat_timeout) if lc is not None else decision.SPOT_RECORD_VALID,
        )
    )
    if retry and planned == "ABANDON" and not res.ok:
        # A retained instance keeps its disks: retry until the backup lands (retained.py).
        # The backup that landed is this run's outcome, as when the watcher takes over
        # after Run Command's ABANDON (retry_retained); the record keeps the first run's.
        landed = _retry_retained(ctx, res)
        if landed is not res:
            return Done(landed, steps.exit_code(landed), done.metrics_sent)
    if retry and res.ok and lc is not None and lc.gone.is_set() and not reclaim:
        # The backup landed, but the action was over before this run could complete it:
        # if it expired with DefaultResult ABANDON, the instance is retained with its
        # backup already in S3, and only we know to let it go (retained.py).
        retained.release_if_retained(
            ctx.cfg, ctx.ident, ctx.clients, res.to_json(), ctx.cancel, res.group, clock=ctx.clock
        )
    return Done(res, code, done.metrics_sent)


def duplicate(ctx: Context, res: Result, plan: decision.Duplicate) -> Done:
    """Already handled for this action: the first run's keys and status, its exit code."""
    _as_duplicate(res, plan.record)
    if plan.retry_retained:
        # Run Command answered this action first and its backup failed: if the instance
        # is now retained, the watcher retries (retained.py). A backup that landed is the
        # outcome, with its own exit code, as in retry_retained below.
        landed = _retry_retained(ctx, res)
        if landed is not res:
            return Done(landed, steps.exit_code(landed))
    return Done(res, plan.record.exit_code)


def complete_only(ctx: Context, res: Result, lc: Lifecycle, lock: TerminationLock, record: Record) -> Done:
    """The earlier run backed up but could not complete (AccessDenied, an outage):
    complete with its result now, with no second archive."""
    _as_duplicate(res, record)
    log.info("completing the action an earlier run backed up", extra=fields(result=record.lifecycle_result))
    if steps.complete(ctx, lc, res, record.lifecycle_result):
        code = EXIT_OK if record.backup_ok else record.exit_code
        lock.record(
            dataclasses.replace(
                record,
                completed=True,
                recorded_at=time.time(),
                result={**record.result, "lifecycle_result": record.lifecycle_result},
            )
        )
    else:
        code = EXIT_FAILED
    steps.report(ctx, res)
    return Done(res, code)


def retry_retained(ctx: Context, res: Result) -> Done:
    """The watcher on a retained instance after the other path's failed backup ended in
    ABANDON: retry until it lands (retained.py)."""
    log.info("retained after the other path's ABANDON; the watcher retries the backup")
    res = _retry_retained(ctx, res)
    return Done(res, steps.exit_code(res))


def _as_duplicate(res: Result, record: Record) -> None:
    first = record.result
    for name in ("group", "hook", "key", "manifest_key", "journal_key", "handoff_key", "bucket"):
        if name in first:
            setattr(res, name, first[name])
    res.status = DUPLICATE
    res.first_status = first.get("status")
    res.first_exit_code = record.exit_code
    log.info(
        "already handled for this lifecycle action; nothing to do",
        extra=fields(key=res.key, first_status=res.first_status),
    )


def _retry_backup(ctx: Context, first: Result) -> Result:
    """One more archive for a retained instance, on a fresh result (the commands already ran)."""
    res = Result(
        first.instance_id, first.bucket, first.group, first.hook, trigger=first.trigger, notice=first.notice
    )
    steps.archive(ctx, res, abort_stale=True, cancelled=False)
    return res


def _retry_retained(ctx: Context, res: Result) -> Result:
    """retained.py's loop from this run; the backup that landed becomes the result."""
    attempts: list[Result] = []

    def attempt() -> dict[str, object]:
        attempts.append(_retry_backup(ctx, res))
        return attempts[-1].to_json()

    outcome = retained.run_if_retained(
        ctx.cfg, ctx.ident, ctx.clients, attempt, ctx.cancel, res.group, clock=ctx.clock
    )
    if outcome == retained.RECOVERED and attempts:
        landed = attempts[-1]
        landed.action = res.action
        return landed
    return res
