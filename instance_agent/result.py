"""The result of one run: what `--json` prints, SNS carries and the record keeps.

One typed object, one `to_json()`: the three consumers can never disagree on a field.
Optional fields that a run did not fill (no drain, no commands, not a duplicate) are left
out of the JSON rather than sent as nulls, as Powertools' logger does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from instance_agent import __version__
from instance_agent.kinds import Action, Status, Trigger

# The statuses: kinds.Status. The names stay for the callers that import them.
SUCCEEDED, PARTIAL, FAILED, DUPLICATE = Status.SUCCEEDED, Status.PARTIAL, Status.FAILED, Status.DUPLICATE
SKIPPED = Status.SKIPPED

OK_STATUSES = (SUCCEEDED, PARTIAL)
# Always present in the JSON, even when None: consumers (and docs/operations.md's table) rely on them.
_CORE = (
    "status",
    "instance_id",
    "group",
    "hook",
    "bucket",
    "key",
    "manifest_key",
    "journal_key",
    "bytes_read",
    "bytes_uploaded",
    "files",
    "warnings",
    "lifecycle_result",
    "lifecycle_error",
    "duration_s",
    "error",
    "agent_version",
)


@dataclass
class Result:
    instance_id: str
    bucket: str | None = None
    group: str | None = None
    hook: str | None = None
    status: Status = FAILED
    key: str | None = None
    manifest_key: str | None = None
    journal_key: str | None = None
    bytes_read: int = 0
    bytes_uploaded: int = 0
    files: int = 0
    warnings: int = 0
    # CONTINUE or ABANDON when this run completed the action; "none" when it completed
    # nothing (no action, or the action was already gone).
    lifecycle_result: str = "none"
    lifecycle_error: str | None = None
    duration_s: float = 0.0
    error: str | None = None
    agent_version: str = __version__
    # What answered (watcher notice kind, or "command"), and what it answered.
    trigger: Trigger | None = None
    notice: str | None = None
    action: Action | None = None  # what Auto Scaling held (kinds.Action)
    lifecycle_action: str | None = None  # the action token's fingerprint, never the token
    first_status: str | None = None  # for duplicates: the first run's
    first_exit_code: int | None = None
    notify_error: str | None = None
    event: str | None = None  # "lifecycle_completion_failed" on the second report
    handoff_key: str | None = None  # the state hand-off archive (handoff_send.py), once in S3
    drain: dict[str, Any] | None = None
    commands: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _CORE or value not in (None, []):
                out[f.name] = value
        return out
