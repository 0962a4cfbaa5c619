"""Auto Scaling adapter: find this instance's lifecycle action, keep it alive, complete it.

Three facts of real deployments shape this module (sources: the Auto Scaling user guide's
"Amazon EC2 Auto Scaling lifecycle hooks" and "Use lifecycle hooks with a warm pool"):

- IMDS says `Terminated` before the instance is in `Terminating:Wait`: behind a load
  balancer the group first deregisters it, and that lasts the target group's deregistration
  delay (300 s by default, up to 3600 s). `locate()` waits, bounded by --wait-timeout, for
  Auto Scaling to report a wait state before anything is archived, so the logs written
  while connections drain are in the backup.
- One instance can see several actions (warm-pool reuse, a second scale-in). Whether an
  action is live *now* is answered by Auto Scaling itself: a heartbeat succeeds only while
  one is. `probe()` is that question; a record on disk can never answer it.
- Calls fail briefly (throttling, 5xx, a dropped connection) or for good (AccessDenied).
  Only the first kind is retried; the second ends the retries at once.

Heartbeats run only while the work runs (`heartbeats_while()` is a context manager) and
always stop. `complete()` has its own deadline and ignores cancellation: it is what
releases the instance, so it runs even while the agent stops (as lifecycled does).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from instance_agent import awserror, states
from instance_agent.errors import (
    Cancelled,
    LifecycleError,
    NoActiveLifecycleAction,
    WaitTimeout,
)
from instance_agent.kinds import Action
from instance_agent.logs import fields
from instance_agent.redact import scrub, scrub_tokens

log = logging.getLogger(__name__)

TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
# Where a terminating hook holds an instance. `Warmed:Pending:Wait` is the return to a warm
# pool under an instance reuse policy: the terminating hook fires, but the instance is kept
# ("Use lifecycle hooks with a warm pool", Auto Scaling user guide; docs/aws-behaviour.md,
# "Lifecycle hooks"). Every state's meaning lives in one table, instance_agent/states.py.
TERMINATING_WAIT = states.states_of(states.TERMINATING_WAIT)
ROOT_VOLUME_BEFORE = "ReplacingRootVolume"  # on the way to the wait below
ROOT_VOLUME_WAIT = "ReplacingRootVolume:Wait"  # held by the group's terminating hooks
WARM_RETURN_WAIT = "Warmed:Pending:Wait"
# On the way to a terminating wait: deregistration from load balancers runs here.
ON_THE_WAY = states.states_of(states.ON_THE_WAY)
# Past the wait: nothing is left to complete.
PAST_WAIT = states.states_of(states.PAST_WAIT)
MAX_INTERVAL = 600.0  # AWS keeps a hook up to 100 x HeartbeatTimeout; no need to ping faster
RECHECK = 2.0  # first pause between looks while waiting for a wait state
RECHECK_MAX = 15.0  # a 3600 s deregistration delay costs about 250 calls, not 1,800
MAX_BACKOFF = 10.0  # between retries of a failed call
STOP_GRACE = 20.0  # completion retries left once the agent is told to stop


class AutoScalingClient(Protocol):
    """The subset of the EC2 Auto Scaling API the agent uses."""

    def describe_auto_scaling_instances(self, **kwargs: Any) -> Mapping[str, Any]: ...
    def describe_lifecycle_hooks(self, **kwargs: Any) -> Mapping[str, Any]: ...
    def record_lifecycle_action_heartbeat(self, **kwargs: Any) -> Mapping[str, Any]: ...
    def complete_lifecycle_action(self, **kwargs: Any) -> Mapping[str, Any]: ...


# The calls that name one lifecycle action. To them AWS answers ValidationError when the ids
# name no live action: none for this instance or token (not yet, or no longer), or the hook
# or group gone since discover() found them. Every id was checked before the call (the
# config's rules, discover()), so on these calls the code says it; the message ("No active
# Lifecycle Action found with …") is prose, and is never read (docs/aws-behaviour.md,
# "Lifecycle hooks").
ACTION_CALLS = frozenset({"RecordLifecycleActionHeartbeat", "CompleteLifecycleAction"})


def translate(err: Exception, call: str, token: str | None = None) -> LifecycleError:
    """One line for a botocore error, classified; the action token never appears in it."""
    msg = scrub_tokens(scrub(awserror.message_of(err), token))
    code = awserror.code_of(err)
    if code == "ValidationError" and call in ACTION_CALLS:
        return NoActiveLifecycleAction(msg or f"{call}: {code}", code=code)
    return LifecycleError(f"{call}: {code}: {msg}".rstrip(": "), retryable=awserror.retryable(err), code=code)


@dataclass(frozen=True)
class HookTarget:
    group: str
    hook: str
    heartbeat_timeout: int
    instance_id: str
    token: str | None = None

    def ids(self) -> dict[str, str]:
        out = {"AutoScalingGroupName": self.group, "LifecycleHookName": self.hook}
        if self.token:
            out["LifecycleActionToken"] = self.token
        else:
            out["InstanceId"] = self.instance_id
        return out


def instance_state(client: AutoScalingClient, instance_id: str) -> tuple[str, str] | None:
    """(group, lifecycle state) of the instance, or None when it is in no group."""
    try:
        resp = client.describe_auto_scaling_instances(InstanceIds=[instance_id])
    except (ClientError, BotoCoreError) as err:
        raise translate(err, "DescribeAutoScalingInstances") from None
    for inst in resp.get("AutoScalingInstances", []):
        if inst.get("InstanceId") == instance_id:
            return str(inst["AutoScalingGroupName"]), str(inst.get("LifecycleState", ""))
    return None


def discover(
    client: AutoScalingClient, instance_id: str, *, group: str | None, hook: str | None, token: str | None
) -> HookTarget | None:
    """The terminating hook to heartbeat and complete, or None when there is none."""
    if group is None:
        found = instance_state(client, instance_id)
        if found is None:
            return None
        group = found[0]
    try:
        kwargs: dict[str, Any] = {"AutoScalingGroupName": group}
        if hook:
            kwargs["LifecycleHookNames"] = [hook]
        hooks = client.describe_lifecycle_hooks(**kwargs).get("LifecycleHooks", [])
    except (ClientError, BotoCoreError) as err:
        raise translate(err, "DescribeLifecycleHooks") from None
    if hook:
        match = [h for h in hooks if h.get("LifecycleHookName") == hook]
        if not match:
            raise LifecycleError(f"lifecycle hook {hook!r} not found in group {group!r}")
    else:
        match = sorted(
            (h for h in hooks if h.get("LifecycleTransition") == TERMINATING),
            key=lambda h: str(h["LifecycleHookName"]),
        )
        if not match:
            return None
        if len(match) > 1:
            names = ", ".join(str(h["LifecycleHookName"]) for h in match)
            raise LifecycleError(f"group {group!r} has several terminating hooks ({names}); set --hook-name")
    chosen = match[0]
    return HookTarget(
        group=group,
        hook=str(chosen["LifecycleHookName"]),
        heartbeat_timeout=int(chosen.get("HeartbeatTimeout", 3600)),
        instance_id=instance_id,
        token=token,
    )


def default_interval(heartbeat_timeout: int) -> float:
    """A third of the timeout: two heartbeats may fail before the hook expires."""
    return max(1.0, min(heartbeat_timeout / 3.0, MAX_INTERVAL))


# What `locate()` found: kinds.Action. The names stay for the callers that import them.
ACTIVE, WARM_RETURN, NOT_TERMINATING = Action.ACTIVE, Action.WARM_RETURN, Action.NOT_TERMINATING
GONE, RETAINED, ROOT_VOLUME, REPLACING = Action.GONE, Action.RETAINED, Action.ROOT_VOLUME, Action.REPLACING


class Lifecycle:
    """Probe, heartbeats and completion for one hook target."""

    def __init__(
        self,
        client: AutoScalingClient,
        target: HookTarget,
        *,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        self.client = client
        self.target = target
        self.interval = interval or default_interval(target.heartbeat_timeout)
        self.clock = clock
        # Waits go through an Event so that a cancel can cut them short; tests pass a fake.
        self._sleep = sleep or threading.Event().wait
        self.confirmed = threading.Event()  # a heartbeat succeeded: the action is live
        self.gone = threading.Event()  # the action expired or was completed elsewhere
        self.heartbeats = 0
        self.calls = 0  # Auto Scaling requests made, for logs and tests

    # -- calls --------------------------------------------------------------------------
    def _call(self, name: str, fn: Callable[..., Any], **kwargs: Any) -> None:
        self.calls += 1
        try:
            fn(**self.target.ids(), **kwargs)
        except (ClientError, BotoCoreError) as err:
            raise translate(err, name, self.target.token) from None

    def heartbeat(self) -> None:
        self._call("RecordLifecycleActionHeartbeat", self.client.record_lifecycle_action_heartbeat)
        self.heartbeats += 1
        self.confirmed.set()

    def _state(self) -> str | None:
        found = instance_state(self.client, self.target.instance_id)
        return found[1] if found else None

    # -- where is the instance? ---------------------------------------------------------
    def probe(self, deadline: float, cancel: threading.Event | None = None) -> bool:
        """Is a lifecycle action of this hook live for the instance (or token) right now?

        A heartbeat is the one question Auto Scaling answers exactly: it succeeds only while
        the action is live, and costs nothing but a restarted timer. Retryable errors are
        retried until `deadline`; a permanent one raises."""
        failures = 0
        while True:
            try:
                self.heartbeat()
                return True
            except NoActiveLifecycleAction:
                return False
            except LifecycleError as err:
                if not err.retryable:
                    raise
                failures += 1
                wait = min(2.0**failures, MAX_BACKOFF)
                if self.clock() + wait > deadline or (cancel is not None and cancel.is_set()):
                    raise
                log.warning("heartbeat failed; retrying", extra=fields(error=str(err), wait_s=wait))
                self._pause(wait, cancel)

    def _pause(self, seconds: float, cancel: threading.Event | None) -> None:
        """Sleep, cut short by `cancel` (waits before the work; never completion's)."""
        if cancel is not None:
            cancel.wait(seconds)
        else:
            self._sleep(seconds)

    def locate(
        self, *, deadline: float, expect_termination: bool, cancel: threading.Event | None = None
    ) -> Action:
        """Wait until the instance's lifecycle is decided; returns ACTIVE, WARM_RETURN,
        ROOT_VOLUME, REPLACING, RETAINED, NOT_TERMINATING or GONE.

        `expect_termination` says that something already told us the instance is leaving
        (IMDS said `Terminated`, or Run Command carries an action token): then `InService`
        means Auto Scaling has not caught up yet, and we wait for the wait state instead of
        calling the run ad hoc. Raises WaitTimeout at `deadline`, and Cancelled once `cancel`
        is set."""
        pause, failures, announced = RECHECK, 0, False
        while True:
            try:
                state = self._state()
                failures = 0
            except LifecycleError as err:
                if not err.retryable:
                    raise
                failures += 1
                state = "unknown"
                log.warning(
                    "cannot read the lifecycle state; retrying",
                    extra=fields(error=str(err), failures=failures),
                )
            kind = states.classify(state) if state is not None and state != "unknown" else None
            if kind == states.RETAINED:
                # The action already ended in ABANDON; a heartbeat cannot revive it, and
                # there is nothing to complete (instance-lifecycle-policy.html).
                return RETAINED
            if kind == states.ROOT_VOLUME:
                # The group's terminating hooks hold a root-volume replacement in
                # ReplacingRootVolume:Wait (replace-root-volume.html, "Use lifecycle hooks
                # with replace root volume"). Only the wait is ours to answer; before it,
                # with a sign that it comes, we wait for it; after it, nothing is live.
                if state == ROOT_VOLUME_WAIT and self.probe(deadline, cancel):
                    return ROOT_VOLUME
                if state != ROOT_VOLUME_BEFORE or not (expect_termination or self.target.token):
                    log.info("root-volume replacement: no action of ours is live", extra=fields(state=state))
                    return REPLACING
            if kind == states.UNKNOWN:
                log.warning("unknown lifecycle state; treated as in service", extra=fields(state=state))
            if state == ROOT_VOLUME_BEFORE:
                pass  # a replacement whose wait is coming: wait for it, below
            elif state in TERMINATING_WAIT or (
                self.target.token and state not in ON_THE_WAY and state != "unknown"
            ):
                # With a token the probe is exact whatever the state says: Describe… is
                # eventually consistent, the heartbeat is not. Without one, a wait state
                # whose probe fails is another hook's, or ours completed a moment ago.
                if self.probe(deadline, cancel):
                    return WARM_RETURN if state == WARM_RETURN_WAIT else ACTIVE
                return GONE
            elif state == WARM_RETURN_WAIT:
                # Into the warm pool: a launching hook (fresh instance) or our terminating
                # hook (a return under a reuse policy). Only the probe can tell them apart.
                return WARM_RETURN if self.probe(deadline, cancel) else NOT_TERMINATING
            elif state is None:
                return GONE if expect_termination or self.target.token else NOT_TERMINATING
            elif state in PAST_WAIT:
                return GONE
            elif not (
                state in ON_THE_WAY
                or state == "unknown"
                or (state == "InService" and (expect_termination or self.target.token))
            ):
                # InService with no sign of leaving (an ad-hoc run), Standby, Warmed:Stopped
                # after its hooks, …: nothing of ours to wait for. InService *with* a sign is
                # Auto Scaling's API lagging behind IMDS or the event: wait.
                return NOT_TERMINATING
            if not announced:
                log.info(
                    "waiting for Auto Scaling to hold the instance in a wait state",
                    extra=fields(state=state, wait_timeout_s=round(deadline - self.clock())),
                )
                announced = True
            if self.clock() + pause > deadline:
                raise WaitTimeout(
                    f"instance still {state} after the wait timeout; no lifecycle action to complete"
                )
            self._pause(pause, cancel)
            if cancel is not None and cancel.is_set():
                raise Cancelled("stopped while waiting for the lifecycle wait state")
            pause = min(pause * 1.5, RECHECK_MAX)

    # -- heartbeats ---------------------------------------------------------------------
    def run_heartbeats(self, stop: threading.Event) -> None:
        """Heartbeat every `interval` until `stop` is set or the action is gone."""
        wait = self.interval if self.confirmed.is_set() else 0.0
        failures = 0
        while not stop.wait(wait):
            try:
                self.heartbeat()
                failures = 0
                wait = self.interval
                log.debug("heartbeat sent", extra=fields(count=self.heartbeats))
            except NoActiveLifecycleAction as err:
                self.gone.set()
                log.warning("heartbeats stop: no active lifecycle action", extra=fields(error=str(err)))
                return
            except LifecycleError as err:
                failures += 1
                wait = min(self.interval, 2.0**failures)
                log.warning("heartbeat failed; retrying", extra=fields(error=str(err), wait=wait))

    def heartbeats_while(self) -> Heartbeat:
        return Heartbeat(self)

    # -- completion ---------------------------------------------------------------------
    def complete(self, result: str, timeout: float, stop: threading.Event | None = None) -> str | None:
        """CompleteLifecycleAction with retries; None on success, else the error.

        Only retryable errors are retried, within `timeout`; once `stop` is set (the agent is
        stopping) within STOP_GRACE at most. A permanent error (AccessDenied) returns at
        once. "No active Lifecycle Action" is final once the action was seen live, and
        retried within `timeout` otherwise (the early-`Terminated` race)."""
        deadline = self.clock() + timeout
        failures = 0
        while True:
            try:
                self._call(
                    "CompleteLifecycleAction",
                    self.client.complete_lifecycle_action,
                    LifecycleActionResult=result,
                )
                log.info(
                    "lifecycle action completed",
                    extra=fields(result=result, group=self.target.group, hook=self.target.hook),
                )
                return None
            except NoActiveLifecycleAction as err:
                last = str(err)
                if self.confirmed.is_set() or not self._may_still_come():
                    self.gone.set()
                    return last
                wait = RECHECK
            except LifecycleError as err:
                last = str(err)
                if not err.retryable:
                    log.error("completion refused; not retrying", extra=fields(error=last))
                    return last
                failures += 1
                wait = min(2.0**failures, MAX_BACKOFF)
                log.warning("completion failed; retrying", extra=fields(error=last, wait_s=wait))
            if stop is not None and stop.is_set():
                deadline = min(deadline, self.clock() + STOP_GRACE)
            if self.clock() + wait > deadline:
                return f"{last} (gave up after {timeout:g} s)"
            self._sleep(wait)

    def _may_still_come(self) -> bool:
        """After "No active …" before any heartbeat succeeded: is a wait state ahead?"""
        try:
            state = self._state()
        except LifecycleError:
            return True
        return state in ON_THE_WAY or state in TERMINATING_WAIT


class Heartbeat:
    """`with lifecycle.heartbeats_while():` — a thread that lives only as long as the block."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=lifecycle.run_heartbeats, args=(self._stop,), name="heartbeat", daemon=True
        )

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
