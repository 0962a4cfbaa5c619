"""The watcher's fallback delivery of state hand-offs: a running receiver looks for them.

Without the trigger Lambda (or when it found no receiver), a hand-off would wait for a
launching instance. A watcher with `handoff_scan_interval` > 0 (and `handoff_path`, and
`handoff_to` running or any) therefore lists its group's `handoff/` prefix about that often
and adopts the oldest claimable one (handoff_adopt.adopt_first: the same claim protocol, so
a scan racing the Lambda's receiver still adopts once). It costs ONE listing per interval
per instance, whatever the group holds:

- the first scan comes at a random point of the first interval, and each next one after the
  interval ± JITTER, so a fleet started together (1,000 instances after a deployment) is
  spread evenly instead of listing the prefix in step (`Schedule`, pure: a fake clock and
  a fake random source test it);
- a hand-off younger than PUSH_GRACE is left to the push path, which delivers in seconds;
- the age of the oldest unclaimed hand-off goes out as HandoffUnclaimedAgeSeconds, only
  while there is one (metrics.py), for the template's alarm;
- no scan while the watcher has a termination job or notices waiting (`busy`): an instance
  that is leaving must not take a peer's state.

It runs in a daemon thread of its own (`start`), so the watcher's loop is unchanged; boto3
(through handoff_adopt) is imported by the first scan, never before.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from instance_agent import handoff, metrics
from instance_agent.config import Config
from instance_agent.errors import AgentError
from instance_agent.logs import fields

if TYPE_CHECKING:
    from instance_agent.clients import Clients
    from instance_agent.identity import Identity

log = logging.getLogger(__name__)

JITTER = 0.1  # each interval is the configured one ± 10 %
PUSH_GRACE = 60.0  # seconds a new hand-off is left to the Lambda's receiver


@dataclass
class Schedule:
    """When the scans are due: the first at a random point of the first interval, then
    every `interval` ± `jitter` (fractions of it)."""

    interval: float
    jitter: float = JITTER
    rand: Callable[[], float] = field(default=random.random)

    def first(self, now: float) -> float:
        return now + self.interval * self.rand()

    def after(self, now: float) -> float:
        return now + self.interval * (1 - self.jitter + 2 * self.jitter * self.rand())


def oldest_unclaimed_age(listed: Mapping[str, float], now: float, lease: float) -> float | None:
    """Seconds the oldest claimable hand-off of a listing has waited, None when there is none."""
    waiting = handoff.unclaimed(listed, now, lease)
    return max(0.0, now - listed[waiting[0]]) if waiting else None


def enabled(cfg: Config) -> bool:
    return (
        cfg.handoff_scan_interval > 0
        and bool(cfg.handoff_path)
        and handoff.may_receive(cfg.handoff_to, "running")
    )


def scan_once(
    cfg: Config, ident: Identity, clients: Clients, group: str, now: float
) -> dict[str, Any] | None:
    """One scan: one listing, the unclaimed age metric, at most one adoption (its result)."""
    from instance_agent import handoff_adopt  # boto3 comes with it: only once a scan is due

    listed = handoff_adopt.list_group(cfg, clients, group)
    if listed is None:
        return None
    age = oldest_unclaimed_age(listed, now, cfg.handoff_lease)
    if age is not None:
        metrics.publish_one(clients.cloudwatch, group, metrics.UNCLAIMED_AGE, age, "Seconds")
    return handoff_adopt.adopt_first(
        cfg,
        ident,
        clients,
        listed,
        role="running",
        now=now,
        min_age=min(PUSH_GRACE, cfg.handoff_scan_interval),
    )


def start(
    cfg: Config,
    identity: Callable[[threading.Event], Identity],
    make_clients: Callable[[Config, str], Clients],
    busy: Callable[[], bool],
    stop: threading.Event,
) -> threading.Thread | None:
    """The scanner thread (None when scanning is off), until `stop` is set."""
    if not enabled(cfg):
        return None

    def run() -> None:
        schedule = Schedule(cfg.handoff_scan_interval)
        due = schedule.first(time.monotonic())
        group: str | None = None
        clients: Clients | None = None
        while not stop.wait(max(0.0, due - time.monotonic())):
            due = schedule.after(time.monotonic())
            if busy():
                continue
            try:
                ident = identity(stop)
                clients = clients or make_clients(cfg, ident.region)
                group = group or _group_of(cfg, clients, ident.instance_id)
                if group is None:
                    continue
                result = scan_once(cfg, ident, clients, group, time.time())
            except AgentError as err:
                log.warning("hand-off scan failed", extra=fields(error=str(err)))
                continue
            if result is not None:
                log.info("hand-off scan", extra=fields(key=result.get("key"), status=result.get("status")))

    thread = threading.Thread(target=run, name="handoff-scan", daemon=True)
    thread.start()
    return thread


def _group_of(cfg: Config, clients: Clients, instance_id: str) -> str | None:
    """The instance's group: --asg-name, else DescribeAutoScalingInstances (asked once)."""
    if cfg.asg_name:
        return cfg.asg_name
    if clients.autoscaling is None:
        return None
    try:
        resp = clients.autoscaling.describe_auto_scaling_instances(InstanceIds=[instance_id])
    except Exception as err:  # botocore's errors, not imported here: the scan only waits for the next
        log.warning(
            "hand-off scan: cannot find the group", extra=fields(error=f"{type(err).__name__}: {err}")
        )
        return None
    found = [i for i in resp.get("AutoScalingInstances", []) if i.get("InstanceId") == instance_id]
    return str(found[0]["AutoScalingGroupName"]) if found else None
