"""The steps a termination job is made of: drain gate, pre-commands, hand-off, archive,
report, completion.

Each executor (executors.py) runs some of them, in order, on a result of its own: a step
fills that result (the archive's key and counts, the drain, the completion's outcome) and
returns what the executor needs to go on. Nothing here decides which steps run: that is
decision.choose().
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from instance_agent import handoff_send, keys, metrics, notify
from instance_agent.backup import archive_and_upload, key_values
from instance_agent.clients import Clients
from instance_agent.commands import Commands
from instance_agent.config import Config
from instance_agent.drain import DrainGate
from instance_agent.errors import EXIT_FAILED, EXIT_OK, AgentError, Cancelled, NotifyError
from instance_agent.identity import Identity
from instance_agent.lifecycle import Lifecycle
from instance_agent.logs import fields
from instance_agent.result import FAILED, SKIPPED, Result
from instance_agent.s3args import write_args
from instance_agent.s3upload import abort_stale_uploads
from instance_agent.shipstate import Ledger

log = logging.getLogger(__name__)

COMPLETING = "completing"  # the on_stage text while CompleteLifecycleAction runs (watch.py reads it)


@dataclass(frozen=True)
class Context:
    """What every step of one run reads: the config, the clients, the caller's hooks."""

    cfg: Config
    ident: Identity
    clients: Clients
    commands: Commands  # the run's pre/post commands and their records
    cancel: threading.Event
    on_stage: Callable[[str], object]
    clock: Callable[[], float]
    sleep: Callable[[float], object] | None  # completion retries' pause (None: a real sleep)
    started: float  # clock() when the run began
    progress_interval: float
    shipped: Ledger | None  # the watcher's shipping ledger, when it has one
    drain_cap: float | None  # an upper bound on the drain wait (Spot)


def exit_code(res: Result, *, completion_failed: bool = False) -> int:
    """0 when the backup is in S3 (or none was due) and the action, if any, was completed;
    1 otherwise. A backup whose completion was refused is not a success: the instance still
    waits in Terminating:Wait, and Run Command should show that."""
    ok = res.ok or res.status == SKIPPED
    return EXIT_OK if ok and not completion_failed else EXIT_FAILED


def planned_result(ctx: Context, res: Result) -> str:
    return ctx.cfg.on_success if res.ok else ctx.cfg.on_failure


def before_archive(ctx: Context, res: Result) -> bool:
    """The drain gate, then the pre-commands. True when a pre-command failed and
    --pre-command-fatal asks to fail the backup."""
    cfg = ctx.cfg
    if cfg.drain_path:
        res.drain = _drain(ctx)
    if cfg.pre_command:
        ctx.on_stage("running pre-commands")
        if not ctx.commands.pre() and cfg.pre_command_fatal:
            res.error = "pre-command failed (--pre-command-fatal)"
            return True
    return False


def handoff(ctx: Context, res: Result) -> str | None:
    """The hand-off archive, before the full one (handoff_send.py): the error that
    fails the job, or None once the hand-off object is in S3."""
    ctx.on_stage("handing off")
    try:
        sent = handoff_send.send(
            ctx.cfg, ctx.ident, ctx.clients, group=res.group, clock=ctx.clock, cancel=ctx.cancel
        )
    except AgentError as err:
        log.error("hand-off failed", extra=fields(error=str(err)))
        return str(err)
    except Exception as err:  # a bug must still report and complete, as in archive()
        log.exception("unexpected error during the hand-off")
        return f"hand-off failed: {type(err).__name__}: {err}"
    res.handoff_key = sent.key
    return None


def _drain(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    timeout = cfg.drain_timeout
    if ctx.drain_cap is not None:
        timeout = min(timeout, ctx.drain_cap)
    gate = DrainGate(cfg.drain_path)
    log.info(
        "drain gate: waiting for the paths to clear",
        extra=fields(paths=list(cfg.drain_path), timeout_s=timeout),
    )
    ctx.on_stage("draining: waiting for " + " ".join(cfg.drain_path))
    with _interrupt_on(ctx.cancel, gate.interrupt):
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


def archive(ctx: Context, res: Result, *, abort_stale: bool, cancelled: bool) -> None:
    """The full archive into `res` (its key, counts and status); never raises."""
    cfg = ctx.cfg
    if abort_stale:
        # A run killed mid-upload (kill -9, power loss) leaves its multipart upload
        # behind; under the lock no other run of ours for this instance is uploading.
        prefix = keys.listing_prefix(cfg.key_template, key_values(cfg, ctx.ident, res.group))
        abort_stale_uploads(
            ctx.clients.s3, cfg.bucket or "", prefix, ctx.ident.instance_id, extra=write_args(cfg)
        )
    ctx.on_stage("backing up")
    # A fatal pre-command failure still goes through the pipeline, already cancelled:
    # that is what reports the failure and completes the hook with --on-failure.
    cancel = _set_event() if cancelled else ctx.cancel
    try:
        if cancel.is_set():
            raise Cancelled("backup cancelled")
        # With shipping on, what the watcher already shipped stays out of the archive;
        # an empty or unreadable ledger means the full archive, exactly as without.
        shipped = None
        if cfg.ship:
            shipped = (
                ctx.shipped if ctx.shipped is not None else Ledger.load(cfg.state_dir, ctx.ident.instance_id)
            )
        archive_and_upload(
            cfg,
            ctx.ident,
            ctx.clients,
            res,
            group=res.group,
            started=ctx.started,
            clock=ctx.clock,
            progress_interval=ctx.progress_interval,
            cancel=cancel,
            shipped=shipped,
        )
    except AgentError as err:
        res.status = FAILED
        res.error = res.error or str(err)
    except Exception as err:  # a bug must still report and complete, never hang the hook
        log.exception("unexpected error during backup")
        res.status = FAILED
        res.error = f"{type(err).__name__}: {err}"
    level = logging.INFO if res.ok else logging.ERROR
    log.log(
        level,
        "backup " + res.status,
        extra=fields(
            key=res.key,
            bytes_read=res.bytes_read,
            bytes_uploaded=res.bytes_uploaded,
            files=res.files,
            warnings=res.warnings,
            error=res.error,
        ),
    )


def report(ctx: Context, res: Result, message: Result | None = None) -> None:
    """Publish `message` (default: `res`) on SNS. The report is the result as --json prints
    it: its duration ends here, before the completion (which it announces as planned)."""
    message = message or res
    res.duration_s = message.duration_s = round(ctx.clock() - ctx.started, 3)
    cfg, sns = ctx.cfg, ctx.clients.sns
    if not cfg.topic_arn or sns is None:
        return
    try:
        msg_id = notify.publish(sns, cfg.topic_arn, message.to_json())
        log.info("report published", extra=fields(topic_arn=cfg.topic_arn, message_id=msg_id))
    except NotifyError as err:
        res.notify_error = str(err)
        log.error("report not published", extra=fields(error=str(err)))


def complete(ctx: Context, lc: Lifecycle, res: Result, result: str) -> bool:
    """CompleteLifecycleAction with `result`; `res` says what actually happened."""
    ctx.on_stage(COMPLETING)
    error = lc.complete(result, ctx.cfg.complete_timeout, stop=ctx.cancel)
    if error is None:
        res.lifecycle_result = result
        return True
    # What actually happened: nothing was completed by this run.
    res.lifecycle_result = "none"
    res.lifecycle_error = error
    log.error("lifecycle completion failed", extra=fields(error=error))
    return False


@dataclass(frozen=True)
class Completed:
    """How report_and_complete() ended."""

    over: bool  # the action is over: completed by us, gone, or there was none
    failed: bool  # a live action this run could not complete
    metrics_sent: bool  # published before the completion (bounded)


def report_and_complete(ctx: Context, lc: Lifecycle | None, res: Result) -> Completed:
    """Report, then complete."""
    if lc is not None and not lc.gone.is_set():
        res.lifecycle_result = planned_result(ctx, res)
    report(ctx, res)
    if lc is None:
        return Completed(over=True, failed=False, metrics_sent=False)
    if lc.gone.is_set():
        res.lifecycle_result = "none"
        res.lifecycle_error = "lifecycle action expired or was completed elsewhere"
        return Completed(over=True, failed=False, metrics_sent=False)
    # Metrics before completing: after it the group shuts the instance down. They
    # describe the result about to be sent, and wait at most metrics.PUBLISH_BOUND.
    # The duration is the backup's, up to the completion, in the metric and the result alike.
    res.duration_s = res.duration_s or round(ctx.clock() - ctx.started, 3)
    metrics.publish_bounded(ctx.clients.cloudwatch, res.to_json())
    done = complete(ctx, lc, res, res.lifecycle_result)
    failed = not done and not lc.gone.is_set()
    if failed:
        report(ctx, res, dataclasses.replace(res, event="lifecycle_completion_failed"))
    return Completed(over=done or lc.gone.is_set(), failed=failed, metrics_sent=True)


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


def _set_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event
