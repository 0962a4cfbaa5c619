"""What one run of the termination job does, decided from what it observed: pure.

The run observes (termination.py): how it was started (its trigger and the Answer that
trigger gets), what Auto Scaling holds (`Lifecycle.locate`'s Action), and, under the
termination lock, the record of an earlier run and whether the action is still live. From
those alone, with no I/O and no clock, `choose()` returns one Plan:

    AdHoc           in service, or a notice that is not the termination: back up, nothing more
    Retained        Run Command on a *:Retained instance: back up (the operator's recovery path)
    NothingToDo     a watcher notice with no terminating action of ours behind it
    RetryRetained   the watcher on a retained instance whose record says the other path's
                    backup failed and ended in ABANDON: retry until it lands (retained.py)
    WarmReturn      back into the warm pool: commands, a backup only if asked, CONTINUE
    RootVolume      a root-volume replacement held by our hook: the full job, nothing recorded
    FullTermination the job: drain, commands, archive, report, complete, record
    SpotReclaim     the job with nothing to complete: no hook holds a Spot reclaim
    Duplicate       the action was already answered (then, maybe, RetryRetained's loop)
    CompleteOnly    the earlier run backed up but could not complete: complete, no 2nd archive

Each Plan has one executor (executors.py). `locks()` says whether the run must take the lock
and read the record before choosing; `probes()` whether it must then ask Auto Scaling again
whether the action is live (it may have waited for the lock while the other path finished).
"""

from __future__ import annotations

from dataclasses import dataclass

from instance_agent.kinds import Action, Trigger, Verdict
from instance_agent.once import Record, decide
from instance_agent.states import WARMED, classify

# A Spot reclaim is not held by any hook: a record it leaves may be completed by a Run
# Command for a lifecycle action that arrives within this long, without a second archive.
SPOT_RECORD_VALID = 600.0
# No lifecycle hook delays a Spot reclaim, which comes about 120 s after the notice: a
# backup without its own --max-duration is cut at 100 s, and the drain gate may take 30.
SPOT_MAX_DURATION = 100.0
SPOT_DRAIN_CAP = 30.0


@dataclass(frozen=True)
class Answer:
    """How a trigger is answered."""

    termination: bool  # counts as the termination: locked and recorded
    complete: bool  # look for, heartbeat and complete the terminating lifecycle action
    commands: bool  # drain gate and pre/post commands (never on an ad-hoc run)
    drain_cap: float | None = None  # an upper bound on the drain wait (Spot: 2 minutes)
    max_duration: float | None = None  # a default for --max-duration (Spot)

    @property
    def reclaim(self) -> bool:
        """A termination that no lifecycle hook holds: a Spot reclaim."""
        return self.termination and not self.complete


COMMAND = Answer(termination=True, complete=True, commands=True)
# Recorded as the termination (so the SSM path does not back up again) with nothing to
# complete: no hook holds a Spot reclaim.
SPOT_RECLAIM = Answer(
    termination=True, complete=False, commands=True, drain_cap=SPOT_DRAIN_CAP, max_duration=SPOT_MAX_DURATION
)
# Spot stop/hibernate and rebalance: the instance comes back (or may not go at all); a later
# real termination needs its own backup.
BACKUP_ONLY = Answer(termination=False, complete=False, commands=True)


def answer_for(trigger: Trigger) -> Answer:
    """How the termination job answers each trigger."""
    if trigger in (Trigger.COMMAND, Trigger.TERMINATION, Trigger.WARM_RETURN):
        return COMMAND
    if trigger is Trigger.SPOT_TERMINATE:
        return SPOT_RECLAIM
    return BACKUP_ONLY


@dataclass(frozen=True)
class Seen:
    """What a run observed before choosing."""

    trigger: Trigger
    answer: Answer
    action: Action  # what locate() found (GONE when Auto Scaling could not say)
    hooked: bool  # a hook target was found: there is an action to heartbeat and complete
    imds_state: str | None = None  # the target-lifecycle-state the caller read, if any
    warm_pool_backup: bool = False
    token: str | None = None  # the fingerprint of this run's action token
    record: Record | None = None  # read under the lock: an earlier run's record
    live: bool | None = None  # probed under the lock: is the action still live? (None: not asked)
    now: float = 0.0  # epoch seconds when the record was read


@dataclass(frozen=True)
class AdHoc:
    commands: bool  # drain gate and commands: only for a watcher's notice


@dataclass(frozen=True)
class Retained:
    pass


@dataclass(frozen=True)
class NothingToDo:
    imds_state: str | None = None  # what IMDS said, for the one log line


@dataclass(frozen=True)
class RetryRetained:
    pass


@dataclass(frozen=True)
class WarmReturn:
    commands: bool
    backup: bool  # --warm-pool-backup


@dataclass(frozen=True)
class RootVolume:
    commands: bool


@dataclass(frozen=True)
class FullTermination:
    commands: bool
    live: bool  # a live action of ours: heartbeat it and complete it
    retry_if_retained: bool  # the watcher retries a failed backup that ends retained


@dataclass(frozen=True)
class SpotReclaim:
    commands: bool
    retry_if_retained: bool


@dataclass(frozen=True)
class Duplicate:
    record: Record
    retry_retained: bool  # then RetryRetained's loop (the other path's backup failed)


@dataclass(frozen=True)
class CompleteOnly:
    record: Record


Plan = (
    AdHoc
    | Retained
    | NothingToDo
    | RetryRetained
    | WarmReturn
    | RootVolume
    | FullTermination
    | SpotReclaim
    | Duplicate
    | CompleteOnly
)


def locks(seen: Seen) -> bool:
    """Whether the run takes the termination lock and reads the record before choosing:
    every case that may count as the termination, and the watcher on a retained instance
    (the record says whether the retries are its to do)."""
    if seen.action is Action.RETAINED and seen.trigger.by_watcher:
        return True
    return _before_lock(seen) is None


def probes(seen: Seen) -> bool:
    """Whether to ask Auto Scaling again, under the lock, whether the action is live: a
    record was found, so the other path may have finished this very action meanwhile."""
    return seen.record is not None and seen.hooked and seen.action is Action.ACTIVE


def _before_lock(seen: Seen) -> Plan | None:
    """The cases decided without the lock: nothing to do, retained, ad hoc."""
    action, watcher = seen.action, seen.trigger.by_watcher
    # A launch into the warm pool reads `Warmed:*` in IMDS (the target state) while a
    # launching hook holds it in `Warmed:Pending:Wait`; a retained instance's action already
    # ended in ABANDON (docs/aws-behaviour.md, "Lifecycle hooks"). Run Command is an
    # explicit ask and still backs up.
    warmed = seen.imds_state is not None and classify(seen.imds_state) == WARMED
    if watcher and (action is Action.REPLACING or (action is Action.NOT_TERMINATING and warmed)):
        return NothingToDo(seen.imds_state)
    if action is Action.RETAINED and not watcher:
        return Retained()
    if action in (Action.NOT_TERMINATING, Action.REPLACING) or not seen.answer.termination:
        # Only the watcher's notices run the drain gate and commands: an operator's ad-hoc
        # backup must never stop the application.
        return AdHoc(commands=seen.answer.commands and watcher)
    return None


def _left_to_us(seen: Seen) -> bool:
    """The other path's run (Run Command) ended in ABANDON with its backup failed. On a
    retained instance the watcher is the one that retries: Run Command's execution timeout
    cannot hold a retry loop of hours, and the watcher runs as long as the instance does."""
    record = seen.record
    return (
        record is not None
        and seen.trigger.by_watcher
        and not record.backup_ok
        and record.lifecycle_result == "ABANDON"
    )


def choose(seen: Seen) -> Plan:
    """The one Plan for what `seen` says."""
    if seen.action is Action.RETAINED and seen.trigger.by_watcher:
        if _left_to_us(seen):
            return RetryRetained()
        # No record at all: a watcher killed before it recorded (the hook then timed out
        # with ABANDON), or none ran. The disks are still there and a second archive beats
        # none; nothing is completed or let go, since the retention may be another hook's.
        return Retained() if seen.record is None else NothingToDo(seen.imds_state)
    early = _before_lock(seen)
    if early is not None:
        return early
    commands = seen.answer.commands
    if seen.action is Action.WARM_RETURN:
        return WarmReturn(commands=commands, backup=seen.warm_pool_backup)
    if seen.action is Action.ROOT_VOLUME:
        return RootVolume(commands=commands)
    record = seen.record
    live = seen.live if seen.live is not None else seen.action is Action.ACTIVE
    if record is not None and seen.answer.reclaim:
        # No Auto Scaling to ask: one backup per reclaim notice window.
        fresh = seen.now - record.recorded_at < SPOT_RECORD_VALID
        verdict = Verdict.DUPLICATE if fresh else Verdict.RUN
    else:
        verdict = decide(record, live=live, action=seen.token, now=seen.now)
    if verdict is Verdict.DUPLICATE:
        assert record is not None
        return Duplicate(record, retry_retained=_left_to_us(seen))
    if verdict is Verdict.COMPLETE_ONLY:
        assert record is not None
        return CompleteOnly(record)
    if seen.answer.reclaim:
        return SpotReclaim(commands=commands, retry_if_retained=seen.trigger.by_watcher)
    return FullTermination(
        commands=commands, live=live and seen.hooked, retry_if_retained=seen.trigger.by_watcher
    )
