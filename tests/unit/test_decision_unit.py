"""decision.choose(): every case of the termination job, from what a run observed.

A table: each row is an observation (how the run was started, what Auto Scaling holds, the
record under the lock, the probe) and the Plan it must get. No servers, no clock, no I/O.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import get_args

import pytest
from test_once_unit import NOW, rec

from instance_agent.decision import (
    BACKUP_ONLY,
    COMMAND,
    SPOT_RECLAIM,
    SPOT_RECORD_VALID,
    AdHoc,
    Answer,
    CompleteOnly,
    Duplicate,
    FullTermination,
    NothingToDo,
    Plan,
    Retained,
    RetryRetained,
    RootVolume,
    Seen,
    SpotReclaim,
    WarmReturn,
    answer_for,
    choose,
    locks,
    probes,
)
from instance_agent.kinds import Action, NoticeKind, Status, Trigger, Verdict
from instance_agent.once import Record

TOKEN = "aaaa1111"


def record(*, ok: bool = True, completed: bool = True, result: str = "CONTINUE", age: float = 10.0) -> Record:
    """once.py's test record for this run's action."""
    return replace(rec(completed=completed, backup_ok=ok, action=TOKEN, age=age), lifecycle_result=result)


DONE = record()  # an earlier run backed up and completed
BACKED_UP = record(completed=False)  # backed up, but its completion failed
ABANDONED = record(ok=False, result="ABANDON")  # its backup failed; completed with ABANDON


def seen(
    trigger: Trigger,
    action: Action,
    *,
    hooked: bool = True,
    answer: Answer | None = None,
    imds_state: str | None = None,
    warm_pool_backup: bool = False,
    rec: Record | None = None,
    live: bool | None = None,
) -> Seen:
    return Seen(
        trigger=trigger,
        answer=answer or answer_for(trigger),
        action=action,
        hooked=hooked,
        imds_state=imds_state,
        warm_pool_backup=warm_pool_backup,
        token=TOKEN if trigger is Trigger.COMMAND else None,
        record=rec,
        live=live,
        now=NOW,
    )


CMD, WATCHER = Trigger.COMMAND, Trigger.TERMINATION
FULL_CMD = FullTermination(commands=True, live=True, retry_if_retained=False)
FULL_WATCHER = FullTermination(commands=True, live=True, retry_if_retained=True)

# (what the run saw, whether it takes the lock, the Plan)
TABLE: list[tuple[str, Seen, bool, Plan]] = [
    # -- decided before the lock -----------------------------------------------------------
    ("operator in service: ad hoc", seen(CMD, Action.NOT_TERMINATING), False, AdHoc(commands=False)),
    (
        "Spot stop: back up with the commands",
        seen(Trigger.SPOT_STOP, Action.NOT_TERMINATING, hooked=False),
        False,
        AdHoc(commands=True),
    ),
    (
        "rebalance: back up with the commands",
        seen(Trigger.REBALANCE, Action.NOT_TERMINATING, hooked=False),
        False,
        AdHoc(commands=True),
    ),
    (
        "Run Command on a replacement with no action of ours: ad hoc",
        seen(CMD, Action.REPLACING),
        False,
        AdHoc(commands=False),
    ),
    ("Run Command on a retained instance", seen(CMD, Action.RETAINED), False, Retained()),
    (
        "watcher: a launch into the warm pool",
        seen(Trigger.WARM_RETURN, Action.NOT_TERMINATING, imds_state="Warmed:Stopped"),
        False,
        NothingToDo("Warmed:Stopped"),
    ),
    (
        "watcher: a replacement with no action of ours",
        seen(WATCHER, Action.REPLACING),
        False,
        NothingToDo(),
    ),
    # -- the watcher on a retained instance: under the lock --------------------------------
    ("watcher retained, no record", seen(WATCHER, Action.RETAINED), True, Retained()),
    ("watcher retained, the record succeeded", seen(WATCHER, Action.RETAINED, rec=DONE), True, NothingToDo()),
    (
        "watcher retained, the other path's backup failed and ABANDONed",
        seen(WATCHER, Action.RETAINED, rec=ABANDONED),
        True,
        RetryRetained(),
    ),
    # -- under the lock ----------------------------------------------------------------------
    (
        "warm-pool return (watcher)",
        seen(Trigger.WARM_RETURN, Action.WARM_RETURN, imds_state="Warmed:Stopped"),
        True,
        WarmReturn(commands=True, backup=False),
    ),
    (
        "warm-pool return with --warm-pool-backup",
        seen(CMD, Action.WARM_RETURN, warm_pool_backup=True),
        True,
        WarmReturn(commands=True, backup=True),
    ),
    ("root-volume replacement", seen(CMD, Action.ROOT_VOLUME), True, RootVolume(commands=True)),
    ("Run Command, live action, no record", seen(CMD, Action.ACTIVE), True, FULL_CMD),
    ("watcher, live action, no record", seen(WATCHER, Action.ACTIVE), True, FULL_WATCHER),
    (
        "watcher, the action already gone, no record: back up, complete nothing",
        seen(WATCHER, Action.GONE, hooked=False),
        True,
        FullTermination(commands=True, live=False, retry_if_retained=True),
    ),
    (
        "a completed record and a live action: a new action",
        seen(CMD, Action.ACTIVE, rec=DONE, live=True),
        True,
        FULL_CMD,
    ),
    (
        "a failed backup's record, the action still live: a second chance",
        seen(CMD, Action.ACTIVE, rec=record(ok=False, completed=False), live=True),
        True,
        FULL_CMD,
    ),
    (
        "the other path answered this action meanwhile (probe: gone)",
        seen(CMD, Action.ACTIVE, rec=DONE, live=False),
        True,
        Duplicate(DONE, retry_retained=False),
    ),
    (
        "a record, and Auto Scaling says the action is gone",
        seen(WATCHER, Action.GONE, hooked=False, rec=DONE),
        True,
        Duplicate(DONE, retry_retained=False),
    ),
    (
        "watcher after Run Command's failed backup ended in ABANDON",
        seen(WATCHER, Action.ACTIVE, rec=ABANDONED, live=False),
        True,
        Duplicate(ABANDONED, retry_retained=True),
    ),
    (
        "Run Command after its own failed ABANDON: no retries from Run Command",
        seen(CMD, Action.ACTIVE, rec=ABANDONED, live=False),
        True,
        Duplicate(ABANDONED, retry_retained=False),
    ),
    (
        "same action backed up, its completion failed: complete only",
        seen(CMD, Action.ACTIVE, rec=BACKED_UP, live=True),
        True,
        CompleteOnly(BACKED_UP),
    ),
    # -- Spot: no hook holds a reclaim -------------------------------------------------------
    (
        "Spot reclaim, no record",
        seen(Trigger.SPOT_TERMINATE, Action.GONE, hooked=False),
        True,
        SpotReclaim(commands=True, retry_if_retained=True),
    ),
    (
        "Spot reclaim within the record's window: one backup per notice",
        seen(Trigger.SPOT_TERMINATE, Action.GONE, hooked=False, rec=record(completed=False)),
        True,
        Duplicate(record(completed=False), retry_retained=False),
    ),
    (
        "Spot reclaim after the window: back up again",
        seen(Trigger.SPOT_TERMINATE, Action.GONE, hooked=False, rec=record(age=SPOT_RECORD_VALID + 1)),
        True,
        SpotReclaim(commands=True, retry_if_retained=True),
    ),
]


@pytest.mark.parametrize(("what", "observed", "locked", "plan"), TABLE, ids=[row[0] for row in TABLE])
def test_choose(what: str, observed: Seen, locked: bool, plan: Plan) -> None:
    assert choose(observed) == plan, what
    # Whether the lock (and the record under it) is needed is known before reading it.
    assert locks(replace(observed, record=None, live=None)) is locked, what


def test_every_case_has_a_row() -> None:
    cases = {type(plan) for _, _, _, plan in TABLE}
    assert cases == set(get_args(Plan))


def test_the_probe_is_asked_only_with_a_record_and_a_live_action() -> None:
    assert probes(seen(CMD, Action.ACTIVE, rec=DONE))
    assert not probes(seen(CMD, Action.ACTIVE))  # no record: nothing can have finished it
    assert not probes(seen(CMD, Action.GONE, hooked=False, rec=DONE))
    assert not probes(seen(Trigger.SPOT_TERMINATE, Action.GONE, hooked=False, rec=DONE))


def test_each_trigger_gets_its_answer() -> None:
    assert answer_for(Trigger.COMMAND) == answer_for(Trigger.TERMINATION) == answer_for(Trigger.WARM_RETURN)
    assert answer_for(Trigger.COMMAND) == COMMAND and not COMMAND.reclaim
    assert answer_for(Trigger.SPOT_TERMINATE) == SPOT_RECLAIM and SPOT_RECLAIM.reclaim
    assert SPOT_RECLAIM.drain_cap == 30.0 and SPOT_RECLAIM.max_duration == 100.0
    for trigger in (Trigger.SPOT_STOP, Trigger.SPOT_HIBERNATE, Trigger.REBALANCE):
        assert answer_for(trigger) == BACKUP_ONLY and not BACKUP_ONLY.termination


def test_kinds_are_their_string_values_everywhere() -> None:
    # These values are in JSON results, SNS messages, status files and records on disk.
    assert json.dumps({"action": Action.WARM_RETURN, Status.SKIPPED: Trigger.COMMAND}) == (
        '{"action": "warm-pool-return", "skipped": "command"}'
    )
    assert f"{Action.ACTIVE}|{Verdict.COMPLETE_ONLY:>14}|{NoticeKind.WARM_RETURN}" == (
        "termination| complete-only|warm-pool"
    )
    assert str(Status.DUPLICATE) == "duplicate" and "backup " + Status.FAILED == "backup failed"
    assert Trigger("spot-stop") is Trigger.SPOT_STOP and Trigger.SPOT_STOP == "spot-stop"
    assert {"none": 1}[Action.NOT_TERMINATING] == 1  # hashes as its value too
    # Every notice is also a trigger: the watcher answers it with a run. The launch notice
    # starts no run: the watcher answers the launching hook (launch_gate.answer).
    runs = set(NoticeKind) - {NoticeKind.LAUNCH}
    assert {Trigger(kind.value) for kind in runs} == set(Trigger) - {Trigger.COMMAND}
