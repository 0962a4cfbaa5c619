"""The kinds the agent tells apart, each written once: what started a run, what the poller
noticed, what Auto Scaling holds, what the record under the lock says, how a run ended.

Every value is a string that leaves the process (the `--json` result, SNS messages, the
status file, the record on disk), so the values never change. Python 3.10 has no StrEnum:
each kind is a `str` Enum whose `str()` and `format()` give the bare value on every version
(3.12 changed the mixin's `format()`), and `json.dumps` writes a member as its value. A
member compares equal to its value, so a plain string passed in still works.
"""

from __future__ import annotations

import enum


class _Kind(str, enum.Enum):
    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class NoticeKind(_Kind):
    """What the watcher's poller noticed in IMDS (poller.py)."""

    TERMINATION = "termination"  # target-lifecycle-state Terminated / Warmed:Terminated
    WARM_RETURN = "warm-pool"  # target-lifecycle-state Warmed:*
    SPOT_TERMINATE = "spot-terminate"
    SPOT_STOP = "spot-stop"
    SPOT_HIBERNATE = "spot-hibernate"
    REBALANCE = "rebalance"
    # target-lifecycle-state InService right after Warmed:*: the instance leaves a warm pool
    # without a boot (pool state Running or Hibernated), so no unit runs the launch gate
    LAUNCH = "launch"


class Trigger(_Kind):
    """How a run was started: `instance-agent backup` (Run Command, or an operator at a
    shell), or the watcher answering one of its notices (the trigger is the notice's kind)."""

    COMMAND = "command"
    TERMINATION = NoticeKind.TERMINATION.value
    WARM_RETURN = NoticeKind.WARM_RETURN.value
    SPOT_TERMINATE = NoticeKind.SPOT_TERMINATE.value
    SPOT_STOP = NoticeKind.SPOT_STOP.value
    SPOT_HIBERNATE = NoticeKind.SPOT_HIBERNATE.value
    REBALANCE = NoticeKind.REBALANCE.value

    @property
    def by_watcher(self) -> bool:
        """The watcher answers a notice; Run Command and an operator run `backup`."""
        return self is not Trigger.COMMAND


class Action(_Kind):
    """What `Lifecycle.locate()` found Auto Scaling doing with the instance."""

    ACTIVE = "termination"  # a terminating action is live: back up, then complete
    WARM_RETURN = "warm-pool-return"  # the instance goes back to the warm pool, disks kept
    NOT_TERMINATING = "none"  # in service (an ad-hoc run), or the live action is not ours
    GONE = "gone"  # past the wait: the action ended (completed elsewhere, or expired)
    RETAINED = "retained"  # a terminating action ended in ABANDON and the group keeps the instance
    ROOT_VOLUME = "root-volume"  # a root-volume replacement held by our hook: back up, then CONTINUE
    REPLACING = "replacing-root-volume"  # a root-volume replacement with no action of ours live


class Verdict(_Kind):
    """What the record under the lock, weighed against Auto Scaling, says (once.decide)."""

    RUN = "run"
    DUPLICATE = "duplicate"
    COMPLETE_ONLY = "complete-only"


class Status(_Kind):
    """How a run ended: the result's `status`."""

    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    DUPLICATE = "duplicate"
    SKIPPED = (
        "skipped"  # nothing to back up: a warm-pool return without --warm-pool-backup, or no action of ours
    )


# The IMDS target-lifecycle-state values that say the instance is leaving for good
# (docs/aws-behaviour.md, "Instance metadata (IMDS)").
TERMINAL_STATES = ("Terminated", "Warmed:Terminated")
