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
- **Lock and decide**: whichever path holds the lock (once.py) does the whole job; the other
  waits for it and then finds its record. A record whose backup succeeded but whose
  completion failed is completed by the next run, without a second archive. This module
  only observes (the action, the record, the probe); `decision.choose()` turns what it saw
  into one Plan, purely, and `executors.execute()` runs that Plan's steps (steps.py).
- **Heartbeats** run from the moment the action is seen live until it is completed, through
  drain, commands and archive: one thread, one `Lifecycle`.
- **Cancel** (a signal, or the watcher's stop grace) ends every wait early. The run then
  reports the failure and, where it owns a live action, completes it with --on-failure on
  a fresh deadline: the instance is never left hanging for the heartbeat timeout.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from instance_agent import metrics
from instance_agent.clients import Clients
from instance_agent.commands import Commands
from instance_agent.config import Config
from instance_agent.decision import Answer, Seen, answer_for, choose, locks, probes
from instance_agent.errors import AgentError, Cancelled, LifecycleError
from instance_agent.executors import Done, execute
from instance_agent.identity import Identity
from instance_agent.kinds import TERMINAL_STATES, Action, Trigger
from instance_agent.lifecycle import Lifecycle, discover, instance_state
from instance_agent.logs import fields
from instance_agent.once import TerminationLock
from instance_agent.redact import fingerprint
from instance_agent.result import FAILED, Result
from instance_agent.shipstate import Ledger
from instance_agent.steps import Context, exit_code

log = logging.getLogger(__name__)

LOCK_NAME = "termination"  # shared by the SSM path and the watcher: one lock per instance


@dataclass
class Outcome:
    result: Result
    exit_code: int


@dataclass
class Options:
    """What the caller knows that the config does not."""

    trigger: Trigger = Trigger.COMMAND  # a plain string of a Trigger's value works too
    notice: str | None = None
    imds_state: str | None = None  # the target-lifecycle-state the caller read, if any
    answer: Answer | None = None  # how the trigger is answered (None: decision.answer_for)
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    on_stage: Callable[[str], object] = lambda _stage: None
    progress_interval: float = 30.0
    clock: Callable[[], float] = time.monotonic
    # The pause between completion retries, which a stop must not cut short (so not
    # `cancel.wait`); None is a real sleep. Tests pass a fake that moves `clock`.
    sleep: Callable[[float], object] | None = None
    # The watcher's shipper's ledger (a view): spares reading the file again at termination.
    shipped: Ledger | None = None

    def __post_init__(self) -> None:
        self.trigger = Trigger(self.trigger)


def run(cfg: Config, ident: Identity, clients: Clients, opts: Options | None = None) -> Outcome:
    """Run the job for whatever the instance's lifecycle says now; never raises an
    AgentError (it becomes the failed result)."""
    opts = opts or Options()
    answer = opts.answer or answer_for(opts.trigger)
    if answer.max_duration is not None and cfg.max_duration is None:
        cfg = dataclasses.replace(cfg, max_duration=answer.max_duration)
    ctx = Context(
        cfg=cfg,
        ident=ident,
        clients=clients,
        commands=Commands(cfg, opts.trigger.value, opts.cancel),
        cancel=opts.cancel,
        on_stage=opts.on_stage,
        clock=opts.clock,
        sleep=opts.sleep,
        started=opts.clock(),
        progress_interval=opts.progress_interval,
        shipped=opts.shipped,
        drain_cap=answer.drain_cap,
    )
    # What finding the action learns (group, hook, action, errors) goes here first: a run
    # that fails before its executor still reports it.
    base = Result(
        instance_id=ident.instance_id,
        bucket=cfg.bucket,
        group=cfg.asg_name,
        hook=cfg.hook_name,
        trigger=opts.trigger,
        notice=opts.notice,
        lifecycle_action=fingerprint(cfg.lifecycle_token) if cfg.lifecycle_token else None,
    )
    try:
        done = _decide_and_execute(ctx, opts, answer, base)
    except AgentError as err:
        failed = copy.deepcopy(base)
        failed.status = FAILED
        failed.error = str(err)
        log.error("run failed", extra=fields(error=str(err)))
        done = Done(failed, exit_code(failed))
    res = done.result
    if not res.duration_s:
        res.duration_s = round(opts.clock() - ctx.started, 3)
    # A run that completed an action published before completing (steps.report_and_complete);
    # any other run publishes now. A metric can neither delay the completion nor change the outcome.
    if not done.metrics_sent:
        metrics.publish(clients.cloudwatch, res.to_json())
    return Outcome(res, done.exit_code)


def _decide_and_execute(ctx: Context, opts: Options, answer: Answer, base: Result) -> Done:
    """Observe, choose (decision.py), execute (executors.py)."""
    expected = _expected(ctx, opts, answer)
    try:
        action, lc = _find_action(ctx, answer, base, expected)
    except (LifecycleError, Cancelled) as err:
        if isinstance(err, Cancelled) or not expected:
            raise
        # The instance is leaving but Auto Scaling cannot tell us about the action
        # (AccessDenied, the wait state never came): a backup without a completion
        # still beats none. It is recorded as the termination.
        base.lifecycle_error = str(err)
        log.error("cannot find the lifecycle action; backing up anyway", extra=fields(error=str(err)))
        action, lc = Action.GONE, None
    base.action = action
    seen = Seen(
        trigger=opts.trigger,
        answer=answer,
        action=action,
        hooked=lc is not None,
        imds_state=opts.imds_state,
        warm_pool_backup=ctx.cfg.warm_pool_backup,
        token=base.lifecycle_action,
    )
    if not locks(seen):
        return execute(choose(seen), ctx, base, lc, None)
    lock = TerminationLock(
        (ctx.cfg.state_dir, ctx.cfg.runtime_dir),
        f"{LOCK_NAME}-{ctx.ident.instance_id}",
        clock=ctx.clock,
        cancel=ctx.cancel,
    )
    lock.acquire(ctx.cfg.lock_timeout)
    try:
        seen = dataclasses.replace(seen, record=lock.recorded(), now=time.time())
        if probes(seen):
            # We may have waited for the lock while the other path finished this very
            # action: ask again now.
            assert lc is not None
            live = lc.probe(ctx.clock() + ctx.cfg.complete_timeout, ctx.cancel)
            seen = dataclasses.replace(seen, live=live, now=time.time())
        return execute(choose(seen), ctx, base, lc, lock)
    finally:
        lock.release()


def _find_action(
    ctx: Context, answer: Answer, base: Result, expected: bool
) -> tuple[Action, Lifecycle | None]:
    """ACTIVE, WARM_RETURN, GONE, NOT_TERMINATING, … (lifecycle.locate), after waiting out
    a deregistration delay, with the Lifecycle to heartbeat and complete. Without Auto
    Scaling (no client, --no-complete, a Spot notice) the answer says."""
    cfg = ctx.cfg
    autoscaling = ctx.clients.autoscaling
    if not (answer.complete and cfg.complete and autoscaling is not None):
        _name_group(ctx, base)
        return (Action.GONE if answer.reclaim else Action.NOT_TERMINATING), None
    deadline = ctx.started + cfg.wait_timeout
    target = _retrying(
        ctx,
        deadline,
        lambda: discover(
            autoscaling,
            ctx.ident.instance_id,
            group=cfg.asg_name,
            hook=cfg.hook_name,
            token=cfg.lifecycle_token,
        ),
    )
    if target is None:
        log.info("no terminating lifecycle hook for this instance; nothing to complete")
        return (Action.GONE if expected else Action.NOT_TERMINATING), None
    base.group, base.hook = target.group, target.hook
    lc = Lifecycle(autoscaling, target, interval=cfg.heartbeat_interval, clock=ctx.clock, sleep=ctx.sleep)
    action = lc.locate(deadline=deadline, expect_termination=expected, cancel=ctx.cancel)
    if action is Action.GONE:
        base.lifecycle_error = (
            "no active lifecycle action: it was completed elsewhere or expired before this run"
        )
    log.info(
        "lifecycle",
        extra=fields(
            action=action, group=target.group, hook=target.hook, lifecycle_action=base.lifecycle_action
        ),
    )
    return action, lc


def _name_group(ctx: Context, base: Result) -> None:
    """The group name for the object key, when no hook discovery finds it."""
    if base.group is not None or ctx.clients.autoscaling is None:
        return
    try:
        found = instance_state(ctx.clients.autoscaling, ctx.ident.instance_id)
    except LifecycleError as err:
        log.info("group name unknown; the key says no-group", extra=fields(error=str(err)))
        return
    base.group = found[0] if found else None


def _expected(ctx: Context, opts: Options, answer: Answer) -> bool:
    """Something already said the instance is leaving: a Run Command with an action
    token, IMDS's `Terminated`, or a Spot reclaim."""
    return (
        bool(ctx.cfg.lifecycle_token)
        or opts.imds_state in TERMINAL_STATES
        or (answer.termination and opts.trigger.by_watcher)
    )


def _retrying(ctx: Context, deadline: float, call: Callable[[], Any]) -> Any:
    """`call()`, retried with backoff on retryable Auto Scaling errors until `deadline`:
    an outage right after the IMDS flip must not lose the termination."""
    wait = 1.0
    while True:
        try:
            return call()
        except LifecycleError as err:
            if not err.retryable or ctx.clock() + wait > deadline:
                raise
            log.warning("Auto Scaling unreachable; retrying", extra=fields(error=str(err), wait_s=wait))
        if ctx.cancel.wait(wait):
            raise Cancelled("stopped while Auto Scaling was unreachable")
        wait = min(wait * 2, 30.0)


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
