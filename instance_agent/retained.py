"""A retained instance: retry the backup until it lands, then let the instance go.

With the group's instance lifecycle policy `TerminateHookAbandon: retain`, a terminating
action that ended in ABANDON leaves the instance in `Terminating:Retained` (or
`Warmed:Terminating:Retained`, `Warmed:Pending:Retained`) until someone calls
TerminateInstanceInAutoScalingGroup ("Control instance retention with instance lifecycle
policies", https://docs.aws.amazon.com/autoscaling/ec2/userguide/instance-lifecycle-policy.html;
"Manage retained instances",
https://docs.aws.amazon.com/autoscaling/ec2/userguide/manage-retained-instances.html;
docs/aws-behaviour.md, "Lifecycle hooks"). The
disks are still there, so a failed backup is not yet a loss: the agent says so on SNS, retries
with backoff (the first retry after `retain_first_retry`, doubling, capped at 15 minutes) until
a backup succeeds or `retain_retry_for` is spent, and on success terminates its own instance
through Auto Scaling, once.

- **ShouldDecrementDesiredCapacity** is a required Boolean of
  TerminateInstanceInAutoScalingGroup
  (https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_TerminateInstanceInAutoScalingGroup.html;
  docs/aws-behaviour.md, "Lifecycle hooks").
  No AWS page says which value a retained instance needs. Retained instances "do not count
  toward your Auto Scaling group's desired capacity" and the group has already launched their
  replacement (manage-retained-instances.html above), so the agent passes False: True could
  lower the active group's capacity and take a healthy replacement with it.
- **IMDS target-lifecycle-state** while retained is not documented either; the agent does not
  rely on it and asks DescribeAutoScalingInstances (`LifecycleState` ends in `:Retained`).

The schedule is a pure function; the loop takes its effects as callables (tests drive it with
fakes and a fake clock). Metrics: `InstanceRetained` when the instance is found retained and
at every attempt while it still is; `RetainedRecovered` once, after the termination call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol, cast

from botocore.exceptions import BotoCoreError, ClientError

from instance_agent import metrics, notify, status
from instance_agent.awserror import describe
from instance_agent.clients import Clients
from instance_agent.config import Config
from instance_agent.errors import LifecycleError, NotifyError
from instance_agent.identity import Identity
from instance_agent.kinds import Status
from instance_agent.lifecycle import TERMINATING, instance_state
from instance_agent.logs import fields
from instance_agent.metrics import CloudWatchClient

log = logging.getLogger(__name__)

CAP = 900.0  # the backoff's ceiling: an attempt (and an InstanceRetained datum) every 15 minutes
RETAINED_METRIC = "InstanceRetained"
RECOVERED_METRIC = "RetainedRecovered"

RECOVERED = "recovered"
GAVE_UP = "gave_up"
RELEASED = "released"  # no longer retained: someone else terminated it
CANCELLED = "cancelled"
HELD = "held"  # retained with its backup landed, but perhaps by another hook: left alone


def delay(attempt: int, first: float, cap: float = CAP) -> float:
    """Seconds before retry number `attempt` (0 is the first retry): doubling, capped."""
    return float(min(cap, first * (2 ** min(attempt, 32))))


def next_wait(attempt: int, now: float, give_up_at: float, first: float, cap: float = CAP) -> float | None:
    """The wait before the next attempt, or None when that attempt would start after
    `give_up_at` (the retry budget is spent)."""
    wait = delay(attempt, first, cap)
    return None if now + wait > give_up_at else wait


# After its last action ends in ABANDON the instance is in that wait's Proceed state first:
# "When retention is triggered, instances transition through these states: Terminating,
# Terminating:Wait, Terminating:Proceed - Lifecycle actions wrap up (whether they succeeded
# or failed), Terminating:Retained" (manage-retained-instances.html above). Asked once, right
# after the ABANDON, a retained instance reads Proceed; so the agent asks again while the
# state is one of these, until SETTLE_FOR has passed (no page says how long the step takes).
PASSING = frozenset(
    (
        "Terminating",
        "Terminating:Wait",
        "Terminating:Proceed",
        "Warmed:Terminating",
        "Warmed:Terminating:Wait",
        "Warmed:Terminating:Proceed",
        "Warmed:Pending",
        "Warmed:Pending:Wait",
        "Warmed:Pending:Proceed",
    )
)
SETTLE_FOR = 600.0
SETTLE_FIRST = 1.0
SETTLE_CAP = 15.0


def settle_wait(looks: int, waited: float, settle_for: float = SETTLE_FOR) -> float | None:
    """Seconds before the next look at a state still passing through the wait (1, 2, 4 … s,
    capped at SETTLE_CAP), or None once `settle_for` is spent."""
    if waited >= settle_for:
        return None
    return float(min(SETTLE_CAP, SETTLE_FIRST * 2.0 ** min(looks, 16), settle_for - waited))


# What one look at the instance's state found.
UNKNOWN = "unknown"  # Auto Scaling did not answer


def settles_retained(
    look: Callable[[], str | None],
    wait: Callable[[float], bool],
    clock: Callable[[], float],
    settle_for: float = SETTLE_FOR,
) -> bool | None:
    """Whether the instance ends up retained: True, False (it goes on terminating, is in no
    group, or is anywhere else), or None when cancelled. `look` gives the LifecycleState, or
    UNKNOWN when Auto Scaling cannot be asked: that counts as passing, and as retained once
    the time is spent, so that the instance's data stays safe."""
    started = clock()
    looks = 0
    while True:
        state = look()
        if state != UNKNOWN and is_retained(state):
            return True
        if state != UNKNOWN and state not in PASSING:
            return False
        pause = settle_wait(looks, clock() - started, settle_for)
        if pause is None:
            return state == UNKNOWN
        if wait(pause):
            return None
        looks += 1


def is_retained(lifecycle_state: str | None) -> bool:
    """`Terminating:Retained`, `Warmed:Terminating:Retained`, `Warmed:Pending:Retained`."""
    return bool(lifecycle_state) and str(lifecycle_state).endswith(":Retained")


@dataclass
class Effects:
    """What the loop does to the world, injected."""

    backup: Callable[[], Mapping[str, Any]]  # one attempt; the result object (status, key, error)
    retained: Callable[[], bool]  # is the instance still retained?
    terminate: Callable[[], None]  # TerminateInstanceInAutoScalingGroup on our own instance
    metric: Callable[[str], None]  # bounded, never raises
    notify: Callable[[Mapping[str, Any]], None]  # never raises
    wait: Callable[[float], bool]  # sleep; True when cancelled
    clock: Callable[[], float]
    on_state: Callable[[Mapping[str, Any]], object] = field(default=lambda _s: None)


def recover(fx: Effects, *, instance_id: str, retry_for: float, first: float, cap: float = CAP) -> str:
    """Run the retry loop for a retained instance; returns RECOVERED, GAVE_UP, RELEASED or
    CANCELLED. Exactly one SNS message when found, one on success (with the archive key), one
    on giving up."""
    started = fx.clock()
    give_up_at = started + retry_for
    state: dict[str, Any] = {
        "event": "instance_retained",
        "instance_id": instance_id,
        "attempts": 0,
        "last_error": None,
        "next_retry_in_s": None,
        "give_up_in_s": retry_for,
    }
    fx.metric(RETAINED_METRIC)
    fx.notify(dict(state))
    log.warning("instance retained after ABANDON; retrying the backup", extra=fields(retry_for_s=retry_for))
    attempt = 0
    while True:
        wait = next_wait(attempt, fx.clock(), give_up_at, first, cap)
        if wait is None:
            final = {**state, "event": "retained_gave_up", "next_retry_in_s": None}
            fx.on_state(final)
            fx.notify(final)
            log.error("retained instance: retry budget spent", extra=fields(attempts=attempt))
            return GAVE_UP
        state["next_retry_in_s"] = wait
        state["give_up_in_s"] = round(give_up_at - fx.clock(), 3)
        fx.on_state(dict(state))
        if fx.wait(wait):
            return CANCELLED
        if not fx.retained():
            log.info("instance no longer retained; stopping the retries", extra=fields(attempts=attempt))
            return RELEASED
        fx.metric(RETAINED_METRIC)
        attempt += 1
        state["attempts"] = attempt
        result = fx.backup()
        if result.get("status") == Status.SUCCEEDED:
            fx.on_state({**state, "event": "retained_recovered", "next_retry_in_s": None})
            fx.terminate()
            fx.metric(RECOVERED_METRIC)
            fx.notify({**result, "event": "retained_recovered", "attempts": attempt})
            log.info("retained instance recovered", extra=fields(key=result.get("key"), attempts=attempt))
            return RECOVERED
        state["last_error"] = result.get("error")
        log.warning("retry of the backup failed", extra=fields(attempt=attempt, error=result.get("error")))


# -- the adapter: the agent's clients as the loop's effects ------------------------------------


class _Terminator(Protocol):
    def terminate_instance_in_auto_scaling_group(self, **kwargs: Any) -> Mapping[str, Any]: ...


METRIC_BOUND = 5.0  # seconds: a metric must never hold the loop


def _put_metric(cloudwatch: CloudWatchClient | None, group: str | None, name: str) -> None:
    if cloudwatch is None or not group:
        return
    datum = {
        "MetricName": name,
        "Dimensions": [{"Name": metrics.DIMENSION, "Value": group}],
        "Timestamp": datetime.now(timezone.utc),
        "Value": 1.0,
        "Unit": "Count",
    }

    def send() -> None:
        try:
            cloudwatch.put_metric_data(Namespace=metrics.NAMESPACE, MetricData=[datum])
        except Exception as err:  # a metric never changes the outcome
            error = f"{type(err).__name__}: {err}"
            log.warning("metric not published", extra=fields(metric=name, error=error))

    thread = threading.Thread(target=send, name="retained-metric", daemon=True)
    thread.start()
    thread.join(METRIC_BOUND)


@dataclass
class _Adapter:
    """The agent's clients as what both entry points below need."""

    look: Callable[[], str | None]
    terminate: Callable[[], None]
    report: Callable[[Mapping[str, Any]], None]
    metric: Callable[[str], None]
    sole_hook: Callable[[], bool]


def _adapter(cfg: Config, ident: Identity, clients: Clients, asg: object, group: str | None) -> _Adapter:
    def look() -> str | None:
        try:
            found = instance_state(cast(Any, asg), ident.instance_id)
        except LifecycleError as err:
            log.warning("cannot tell whether the instance is retained", extra=fields(error=str(err)))
            return UNKNOWN
        return None if found is None else found[1]

    def terminate() -> None:
        # ShouldDecrementDesiredCapacity=False: see the module docstring.
        try:
            cast(_Terminator, asg).terminate_instance_in_auto_scaling_group(
                InstanceId=ident.instance_id, ShouldDecrementDesiredCapacity=False
            )
        except (ClientError, BotoCoreError) as err:
            log.error("TerminateInstanceInAutoScalingGroup failed", extra=fields(error=describe(err)))

    def report(message: Mapping[str, Any]) -> None:
        if not cfg.topic_arn or clients.sns is None:
            return
        body = {"instance_id": ident.instance_id, "group": group, "bucket": cfg.bucket, **message}
        body.setdefault("status", "retained")
        try:
            notify.publish(clients.sns, cfg.topic_arn, body)
        except NotifyError as err:
            log.error("report not published", extra=fields(error=str(err)))

    def sole_hook() -> bool:
        # Ours the group's only terminating hook: its timeout is what retained the instance.
        # With another, that hook's ABANDON (which ends ours too) may hold it for its owner.
        try:
            hooks = (
                cast(Any, asg).describe_lifecycle_hooks(AutoScalingGroupName=group).get("LifecycleHooks", [])
            )
        except (ClientError, BotoCoreError) as err:
            log.warning("cannot list the group's lifecycle hooks", extra=fields(error=describe(err)))
            return False
        return sum(1 for h in hooks if h.get("LifecycleTransition") == TERMINATING) == 1

    def metric(name: str) -> None:
        _put_metric(clients.cloudwatch, group, name)

    return _Adapter(look, terminate, report, metric, sole_hook)


def run_if_retained(
    cfg: Config,
    ident: Identity,
    clients: Clients,
    backup: Callable[[], Mapping[str, Any]],
    cancel: threading.Event,
    group: str | None,
    *,
    clock: Callable[[], float] = time.monotonic,
    settle_for: float = SETTLE_FOR,
) -> str | None:
    """After a terminating action ended in ABANDON: when DescribeAutoScalingInstances shows
    the instance `*:Retained` (once it has passed through the wait's Proceed state:
    `settles_retained`), run the retry loop; None when it is not retained (no policy: the
    instance terminates as before), CANCELLED when stopped while waiting to tell."""
    asg = clients.autoscaling
    if asg is None:
        return None
    fx = _adapter(cfg, ident, clients, asg, group)

    def still_retained() -> bool:
        # Auto Scaling unreachable: keep the instance's data safe and try again later.
        state = fx.look()
        return state == UNKNOWN or is_retained(state)

    settled = settles_retained(fx.look, cancel.wait, clock, settle_for)
    if settled is None:
        return CANCELLED
    if not settled:
        return None
    effects = Effects(
        backup=backup,
        retained=still_retained,
        terminate=fx.terminate,
        metric=fx.metric,
        notify=fx.report,
        wait=cancel.wait,
        clock=clock,
        # `instance-agent status` shows what the retained instance is waiting for.
        on_state=lambda state: status.write_status(status.status_path(cfg), retained=dict(state)),
    )
    return recover(
        effects, instance_id=ident.instance_id, retry_for=cfg.retain_retry_for, first=cfg.retain_first_retry
    )


def release_if_retained(
    cfg: Config,
    ident: Identity,
    clients: Clients,
    landed: Mapping[str, Any],
    cancel: threading.Event,
    group: str | None,
    *,
    clock: Callable[[], float] = time.monotonic,
    settle_for: float = SETTLE_FOR,
) -> str | None:
    """After a backup (`landed`, its result object) that succeeded when the terminating
    action was already over: a heartbeat or global timeout whose DefaultResult is ABANDON
    retains the instance as an explicit ABANDON does ("Configure instance retention",
    https://docs.aws.amazon.com/autoscaling/ec2/userguide/configure-instance-retention.html),
    and nothing else would let it go. When it settles retained, its backup is already in S3:
    TerminateInstanceInAutoScalingGroup once, one SNS message (`retained_recovered`, with the
    key and 0 attempts), InstanceRetained and RetainedRecovered. Only when ours is the group's
    only terminating hook: another hook's ABANDON ends ours too and retains the instance for
    that hook's owner, so then it says so (`instance_retained`) and lets the operator decide
    (HELD). RECOVERED, None when it is not retained, CANCELLED when stopped waiting to tell."""
    asg = clients.autoscaling
    if asg is None:
        return None
    fx = _adapter(cfg, ident, clients, asg, group)
    settled = settles_retained(fx.look, cancel.wait, clock, settle_for)
    if settled is None:
        return CANCELLED
    if not settled:
        return None
    fx.metric(RETAINED_METRIC)
    if group is None or not fx.sole_hook():
        log.warning("instance retained although its backup landed; another terminating hook may hold it")
        fx.report(
            {
                **landed,
                "event": "instance_retained",
                "status": "retained",
                "attempts": 0,
                "reason": "retained after the lifecycle action was over, and the group has another "
                "terminating hook (or its hooks could not be listed), so the agent does not let it go: "
                "TerminateInstanceInAutoScalingGroup when done with it",
            }
        )
        return HELD
    log.warning("instance retained although its backup landed (the action had expired); letting it go")
    done = {**landed, "event": "retained_recovered", "attempts": 0, "instance_id": ident.instance_id}
    status.write_status(status.status_path(cfg), retained={**done, "next_retry_in_s": None})
    fx.terminate()
    fx.metric(RECOVERED_METRIC)
    fx.report(done)
    return RECOVERED
