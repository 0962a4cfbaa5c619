"""Auto Scaling adapter: find the terminating hook, keep it alive, and complete it.

Two races shape this module (see aws-facts.md):
- IMDS can say `Terminated` before the instance is in `Terminating:Wait` (load balancer
  deregistration runs first). Until Wait is confirmed, "No active Lifecycle Action" means
  "too early": heartbeats and completion retry, bounded by `wait_timeout`. Wait counts as
  confirmed once a heartbeat succeeds or DescribeAutoScalingInstances shows it.
- After Wait is confirmed, the same error means the action expired or was completed
  elsewhere: heartbeats stop for good, and completion reports it instead of retrying.
Heartbeats run only while the work runs (`Heartbeat` is a context manager) and always stop.
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

from instance_agent.errors import LifecycleError, NoActiveLifecycleAction
from instance_agent.logs import fields
from instance_agent.redact import scrub_tokens

log = logging.getLogger(__name__)

TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
WAIT_STATES = ("Terminating:Wait", "Warmed:Terminating:Wait")
BEFORE_WAIT = ("InService", "Terminating", "Warmed:Terminating", "Standby", "Warmed:Running",
               "Warmed:Stopped", "Warmed:Hibernated", "Detaching")
MAX_INTERVAL = 600.0  # AWS keeps a hook up to 100 x HeartbeatTimeout; no need to ping faster
RECHECK = 2.0  # seconds between tries while waiting for Terminating:Wait


class AutoScalingClient(Protocol):
    """The subset of the EC2 Auto Scaling API the agent uses."""

    def describe_auto_scaling_instances(self, **kwargs: Any) -> Mapping[str, Any]: ...
    def describe_lifecycle_hooks(self, **kwargs: Any) -> Mapping[str, Any]: ...
    def record_lifecycle_action_heartbeat(self, **kwargs: Any) -> Mapping[str, Any]: ...
    def complete_lifecycle_action(self, **kwargs: Any) -> Mapping[str, Any]: ...


def _translate(err: Exception, call: str) -> LifecycleError:
    # AWS's messages quote the lifecycle token ("No active Lifecycle Action found with token
    # …"); these texts reach logs, SNS and records, so the token is replaced by a fingerprint.
    if isinstance(err, ClientError):
        e = err.response.get("Error", {})
        code, msg = str(e.get("Code", "")), scrub_tokens(str(e.get("Message", "")))
        if code == "ValidationError" and msg.startswith("No active Lifecycle Action"):
            return NoActiveLifecycleAction(msg)
        return LifecycleError(f"{call}: {code}: {msg}")
    return LifecycleError(scrub_tokens(f"{call}: {type(err).__name__}: {err}"))


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
        raise _translate(err, "DescribeAutoScalingInstances") from None
    for inst in resp.get("AutoScalingInstances", []):
        if inst.get("InstanceId") == instance_id:
            return str(inst["AutoScalingGroupName"]), str(inst.get("LifecycleState", ""))
    return None


def discover(client: AutoScalingClient, instance_id: str, *, group: str | None,
             hook: str | None, token: str | None) -> HookTarget | None:
    """The hook to heartbeat and complete, or None when there is nothing to complete."""
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
        raise _translate(err, "DescribeLifecycleHooks") from None
    if hook:
        match = [h for h in hooks if h.get("LifecycleHookName") == hook]
        if not match:
            raise LifecycleError(f"lifecycle hook {hook!r} not found in group {group!r}")
    else:
        match = sorted((h for h in hooks if h.get("LifecycleTransition") == TERMINATING),
                       key=lambda h: str(h["LifecycleHookName"]))
        if not match:
            return None
        if len(match) > 1:
            names = ", ".join(str(h["LifecycleHookName"]) for h in match)
            raise LifecycleError(f"group {group!r} has several terminating hooks ({names}); "
                                 "set --hook-name")
    chosen = match[0]
    return HookTarget(group=group, hook=str(chosen["LifecycleHookName"]),
                      heartbeat_timeout=int(chosen.get("HeartbeatTimeout", 3600)),
                      instance_id=instance_id, token=token)


def default_interval(heartbeat_timeout: int) -> float:
    """A third of the timeout: two heartbeats may fail before the hook expires."""
    return max(1.0, min(heartbeat_timeout / 3.0, MAX_INTERVAL))


class Lifecycle:
    """Heartbeats and completion for one hook target."""

    def __init__(
        self,
        client: AutoScalingClient,
        target: HookTarget,
        *,
        interval: float | None = None,
        wait_timeout: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.target = target
        self.interval = interval or default_interval(target.heartbeat_timeout)
        self.clock = clock
        self.wait_deadline = clock() + wait_timeout
        self.confirmed = threading.Event()  # Terminating:Wait seen (or a heartbeat succeeded)
        self.gone = threading.Event()  # the action expired or was completed elsewhere
        self.heartbeats = 0

    # -- calls --------------------------------------------------------------------------
    def _call(self, name: str, fn: Callable[..., Any], **kwargs: Any) -> None:
        try:
            fn(**self.target.ids(), **kwargs)
        except (ClientError, BotoCoreError) as err:
            raise _translate(err, name) from None

    def heartbeat(self) -> None:
        self._call("RecordLifecycleActionHeartbeat", self.client.record_lifecycle_action_heartbeat)
        self.heartbeats += 1
        self.confirmed.set()

    def _not_active(self) -> bool:
        """After "No active Lifecycle Action": True if it is final, False to retry later."""
        if self.confirmed.is_set():
            return True
        try:
            found = instance_state(self.client, self.target.instance_id)
        except LifecycleError as err:
            log.warning("cannot read lifecycle state", extra=fields(error=str(err)))
            return self.clock() >= self.wait_deadline
        state = found[1] if found else None
        if state in WAIT_STATES:
            # Wait is confirmed but our call was refused: the action is not ours to keep.
            self.confirmed.set()
            return True
        if state in BEFORE_WAIT:
            log.info("instance not yet in Terminating:Wait; retrying",
                     extra=fields(state=state))
            return self.clock() >= self.wait_deadline
        return True  # Proceed, Terminated, or out of the group: nothing left to complete

    # -- heartbeats ---------------------------------------------------------------------
    def run_heartbeats(self, stop: threading.Event) -> None:
        """Heartbeat now and every `interval` until `stop` is set or the action is gone."""
        wait = 0.0
        failures = 0
        while not stop.wait(wait):
            try:
                self.heartbeat()
                failures = 0
                wait = self.interval
                log.debug("heartbeat sent", extra=fields(count=self.heartbeats))
            except NoActiveLifecycleAction as err:
                if self._not_active():
                    if self.confirmed.is_set():
                        self.gone.set()
                    log.warning("heartbeats stop: no active lifecycle action",
                                extra=fields(error=str(err)))
                    return
                wait = min(RECHECK, self.interval)
            except LifecycleError as err:
                failures += 1
                wait = min(self.interval, 2.0**failures)
                log.warning("heartbeat failed; retrying", extra=fields(error=str(err), wait=wait))

    def heartbeats_while(self) -> Heartbeat:
        return Heartbeat(self)

    # -- completion ---------------------------------------------------------------------
    def complete(self, result: str, timeout: float) -> str | None:
        """CompleteLifecycleAction with retries; returns None on success, else the error.

        The deadline is `timeout` from now, extended to the Wait deadline while Wait is not
        confirmed, so an early completion is retried rather than lost.
        """
        deadline = max(self.clock() + timeout, self.wait_deadline)
        failures = 0
        while True:
            try:
                self._call("CompleteLifecycleAction", self.client.complete_lifecycle_action,
                           LifecycleActionResult=result)
                log.info("lifecycle action completed", extra=fields(result=result,
                         group=self.target.group, hook=self.target.hook))
                return None
            except NoActiveLifecycleAction as err:
                if self._not_active():
                    return str(err)
                wait = RECHECK
                last = str(err)
            except LifecycleError as err:
                failures += 1
                wait = min(2.0**failures, 10.0)
                last = str(err)
                log.warning("completion failed; retrying", extra=fields(error=last))
            if self.clock() + wait > deadline:
                return f"{last} (gave up)"
            time.sleep(wait)


class Heartbeat:
    """`with lifecycle.heartbeats_while():` — a thread that lives only as long as the block."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lifecycle.run_heartbeats, args=(self._stop,),
                                        name="heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
