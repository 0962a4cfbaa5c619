"""Every Auto Scaling lifecycle state, and what it means for a termination handler.

One table, one pure function: a state the table does not know is a bug, not a silent
"in service" (tests/unit/test_lifecycle_unit.py checks the table against botocore's
`LifecycleState` enum, botocore/data/autoscaling/2011-01-01/service-2.json).

Sources for the meanings:
- lifecycle hooks and warm pools: a launching hook holds a new instance in
  `Warmed:Pending:Wait` on its way into the pool; a terminating hook holds an instance that
  goes back to the pool under a reuse policy in the same state
  (https://docs.aws.amazon.com/autoscaling/ec2/userguide/warm-pool-instance-lifecycle.html).
- retention: with an instance lifecycle policy, an abandoned terminating action leaves the
  instance in a `*:Retained` state until someone calls TerminateInstanceInAutoScalingGroup
  (https://docs.aws.amazon.com/autoscaling/ec2/userguide/instance-lifecycle-policy.html).
- root-volume replacement: `ReplacingRootVolume` -> `:Wait` (lifecycle hooks, if any) ->
  `:Proceed` -> `RootVolumeReplaced`
  (https://docs.aws.amazon.com/autoscaling/ec2/userguide/replace-root-volume.html).

All three in our words: docs/aws-behaviour.md, "Lifecycle hooks".
"""

from __future__ import annotations

# What a state means to us.
SERVING = "serving"  # in the group or out of it by an operator's hand: a trigger is ad hoc
LAUNCHING = "launching"  # a launching action's states: never ours to back up or complete
ON_THE_WAY = "on-the-way"  # before a terminating wait (deregistration runs here): wait
TERMINATING_WAIT = "terminating-wait"  # our terminating hook holds the instance
POOL_ENTRY_WAIT = "pool-entry-wait"  # launching hook (fresh launch) or terminating hook (reuse)
PAST_WAIT = "past-wait"  # the action ended: nothing left to complete
WARMED = "warmed"  # resting in the warm pool, or past its entry wait: nothing to do
RETAINED = "retained"  # a terminating action ended in ABANDON; the instance is kept
ROOT_VOLUME = "root-volume"  # root-volume replacement: only its :Wait is ours (lifecycle.locate)

TABLE: dict[str, str] = {
    "Pending": LAUNCHING,
    "Pending:Wait": LAUNCHING,
    "Pending:Proceed": LAUNCHING,
    "Quarantined": SERVING,
    "InService": SERVING,
    "Terminating": ON_THE_WAY,
    "Terminating:Wait": TERMINATING_WAIT,
    "Terminating:Proceed": PAST_WAIT,
    "Terminating:Retained": RETAINED,
    "Terminated": PAST_WAIT,
    "Detaching": SERVING,
    "Detached": SERVING,
    "EnteringStandby": SERVING,
    "Standby": SERVING,
    "ReplacingRootVolume": ROOT_VOLUME,
    "ReplacingRootVolume:Wait": ROOT_VOLUME,
    "ReplacingRootVolume:Proceed": ROOT_VOLUME,
    "RootVolumeReplaced": ROOT_VOLUME,
    # Warmed:Pending is on the way to either hook's wait; only the wait tells them apart.
    "Warmed:Pending": ON_THE_WAY,
    "Warmed:Pending:Wait": POOL_ENTRY_WAIT,
    "Warmed:Pending:Proceed": WARMED,
    "Warmed:Pending:Retained": RETAINED,
    "Warmed:Terminating": ON_THE_WAY,
    "Warmed:Terminating:Wait": TERMINATING_WAIT,
    "Warmed:Terminating:Proceed": PAST_WAIT,
    "Warmed:Terminating:Retained": RETAINED,
    "Warmed:Terminated": PAST_WAIT,
    "Warmed:Stopped": WARMED,
    "Warmed:Running": WARMED,
    "Warmed:Hibernated": WARMED,
}

UNKNOWN = "unknown"  # a state newer than this table: treated like SERVING, and logged


def classify(state: str) -> str:
    """What `state` (an Auto Scaling LifecycleState) means for a termination handler."""
    return TABLE.get(state, UNKNOWN)


def states_of(kind: str) -> tuple[str, ...]:
    return tuple(s for s, k in TABLE.items() if k == kind)
