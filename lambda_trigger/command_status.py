"""`handler(event, context)`: report each failed Run Command of the backup document on SNS.

The push path sends the backup document and returns; when the command then fails on the
instance (the agent is not installed: exit 127; a bad config: exit 2; a failed backup:
exit 1), times out, is cancelled or never arrives, nothing else would tell anyone. An
EventBridge rule sends this function the "EC2 Command Invocation Status-change
Notification" events of the backup document (source `aws.ssm`, detail `command-id`,
`document-name`, `instance-id`, `requested-date-time`, `status`; see
https://docs.aws.amazon.com/systems-manager/latest/userguide/monitoring-systems-manager-event-examples.html;
docs/aws-behaviour.md, "Systems Manager Run Command").

For each `Failed`, `TimedOut` or `Cancelled` invocation of DOCUMENT_NAME (the
CommandInvocationStatus values that end badly; there is no `Undeliverable` status: an
undeliverable invocation is `Failed`, with StatusDetails `Undeliverable`) it
publishes one SNS message to TOPIC_ARN naming the instance, the command id and the status,
with a hint at the cause. The hint uses the invocation's exit code and status details from
GetCommandInvocation; without them (not allowed, or not visible yet) it goes by the status
alone. Every other status and every other document is ignored with one log line: the rule
filters the same way, this is the second line of defence. A duplicate delivery of one event
publishes twice; a report, unlike a command, may repeat.

No false failure: after a successful backup and CONTINUE the group ends the instance, often
before its SSM agent reports, and the invocation then ends badly. When the command's output
holds the agent's recorded result (`backup --json`) with status succeeded or partial and
lifecycle_result CONTINUE, nothing is published; the log line and the return value name what
was checked (the result's status, the lifecycle result, the archive and manifest keys). The
manifest object itself is not read: this function has no access to the bucket.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lambda_trigger import __version__, settings
from lambda_trigger.clients import AWS_ERRORS, Caller, Clients, deadline, describe_error, get_clients
from lambda_trigger.logs import fields, invocation, log, redact_uuids
from lambda_trigger.report import publish
from lambda_trigger.settings import StatusSettings

SOURCE = "aws.ssm"
DETAIL_TYPE = "EC2 Command Invocation Status-change Notification"
REPORTED = ("Failed", "TimedOut", "Cancelled")
_INSTANCE_ID = re.compile(r"(?:i-[0-9a-f]{8,17}|mi-[0-9a-f]{17})")
_COMMAND_ID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
STDERR_TAIL_CHARS = 300
# The agent's result statuses that mean a backup landed (instance_agent.result.OK_STATUSES;
# the Lambda package does not import the agent).
OK_RESULTS = ("succeeded", "partial")
# What the exit code of the document's one shell step says: the step runs
# `exec instance-agent backup`, so the code is the agent's own (0, 1, 2) unless the shell
# could not run it at all (126, 127: POSIX's "not executable" and "not found").
EXIT_HINTS = {
    127: "exit 127: instance-agent is not installed (command not found); see "
    "/var/log/instance-agent-install.log on the instance, and its launch hook result",
    126: "exit 126: instance-agent is there but cannot be executed; reinstall it",
    2: "exit 2: usage or configuration error; `sudo instance-agent doctor` on the instance "
    "names it (config: /etc/instance-agent/agent.toml)",
    1: "exit 1: the backup failed; the agent's own SNS report carries the error",
}
# Keyed by GetCommandInvocation's StatusDetails (botocore's SSM model, service-2.json; see
# https://docs.aws.amazon.com/systems-manager/latest/userguide/monitor-commands.html;
# docs/aws-behaviour.md, "Systems Manager Run Command"), which the
# API spells without spaces; the spaced spellings of older stand-ins are kept, harmlessly.
_DELIVERY_TIMED_OUT = (
    "the SSM agent did not pick the command up in time: the instance "
    "stopped, its agent is down, or it has no route to SSM"
)
_EXECUTION_TIMED_OUT = (
    "the backup ran longer than the document's executionTimeout (the stack's BackupTimeout)"
)
STATUS_HINTS = {
    "DeliveryTimedOut": _DELIVERY_TIMED_OUT,
    "Delivery Timed Out": _DELIVERY_TIMED_OUT,
    "ExecutionTimedOut": _EXECUTION_TIMED_OUT,
    "Execution Timed Out": _EXECUTION_TIMED_OUT,
    "TimedOut": "the command timed out before it finished",
    "Undeliverable": "the command could not be delivered: the instance is gone, or its "
    "SSM agent is not registered",
    "Cancelled": "the command was cancelled: by an operator, or the instance ended first",
    "Failed": "the command failed",
}


@dataclass(frozen=True)
class Invocation:
    command_id: str
    instance_id: str
    document: str
    status: str
    requested_at: str | None


def handler(event: object, context: object) -> dict[str, Any]:
    """Lambda entry point: settings from the environment, clients built on first use."""
    with invocation(context):
        return handle(event, context, settings=settings.load(StatusSettings.from_env))


def handle(
    event: object,
    context: object,
    *,
    settings: StatusSettings,
    clients: Clients | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Report the event's invocation if it failed: {"status": reported, ignored or malformed, …}."""
    parsed = parse(event)
    if isinstance(parsed, str):
        log.error("malformed event", extra=fields(reason=parsed))
        return {"status": "malformed", "reason": parsed}
    if not _same_document(parsed.document, settings.document):
        log.info("event ignored", extra=fields(reason="another document", document=parsed.document))
        return {"status": "ignored", "reason": "another document"}
    if parsed.status not in REPORTED:
        log.info(
            "event ignored", extra=fields(reason=f"status {parsed.status}", command_id=parsed.command_id)
        )
        return {"status": "ignored", "reason": f"status {parsed.status}"}
    caller = Caller(deadline(context, clock), clock, sleep)
    aws = clients or get_clients()
    details = _details(caller, aws, parsed)
    checked = details.pop("recorded", None)
    if checked is not None:
        # The backup succeeded and the action was completed with CONTINUE: the group then
        # ends the instance, often before its SSM agent reports, so the invocation ends
        # Failed, TimedOut or Cancelled. That is no failed backup, and no report is sent.
        log.info(
            "command status ignored: the backup succeeded",
            extra=fields(
                command_id=parsed.command_id,
                instance_id=parsed.instance_id,
                status=parsed.status,
                checked=checked,
            ),
        )
        return {"status": "ignored", "reason": "the backup succeeded", "checked": checked}
    report = {
        "event": "backup command not successful",
        "instance_id": parsed.instance_id,
        "command_id": parsed.command_id,
        "document": parsed.document,
        "status": parsed.status,
        "requested_at": parsed.requested_at,
        **details,
        "agent_version": __version__,
    }
    log.warning("backup command not successful", extra=fields(**report))
    notify_error = publish(
        caller,
        aws.sns,
        settings.topic_arn,
        f"instance-agent: backup command {parsed.status} on {parsed.instance_id}",
        report,
        {"status": parsed.status, "instance_id": parsed.instance_id},
    )
    return {"status": "reported", "notify_error": notify_error, "report": report}


def parse(event: object) -> Invocation | str:
    """The invocation an EventBridge event is about, or why it is not one."""
    if not isinstance(event, dict):
        return "the event is not a JSON object"
    if event.get("source") != SOURCE or event.get("detail-type") != DETAIL_TYPE:
        return f"not an {SOURCE} {DETAIL_TYPE!r} event"
    detail = event.get("detail")
    if not isinstance(detail, dict):
        return "detail is not a JSON object"
    values = {key: detail.get(key) for key in ("command-id", "instance-id", "document-name", "status")}
    for key, value in values.items():
        if not isinstance(value, str) or not value:
            return f"detail.{key} is missing or not a string"
    if not _COMMAND_ID.fullmatch(str(values["command-id"])):
        return "detail.command-id is not a command id"
    if not _INSTANCE_ID.fullmatch(str(values["instance-id"])):
        return "detail.instance-id is not an instance id"
    requested = detail.get("requested-date-time")
    return Invocation(
        str(values["command-id"]),
        str(values["instance-id"]),
        str(values["document-name"]),
        str(values["status"]),
        requested if isinstance(requested, str) else None,
    )


def _same_document(name: str, document: str) -> bool:
    # A document shared from another account is named by its ARN; ours by its name.
    return name == document or name.endswith(f":document/{document}")


def _details(caller: Caller, clients: Clients, inv: Invocation) -> dict[str, Any]:
    """Exit code, status details, the last line of stderr and a hint at the cause."""
    details: dict[str, Any] = {
        "response_code": None,
        "status_details": None,
        "stderr_tail": None,
        "details_error": None,
    }
    try:
        resp = caller.call(
            "GetCommandInvocation",
            clients.ssm.get_command_invocation,
            CommandId=inv.command_id,
            InstanceId=inv.instance_id,
        )
    except AWS_ERRORS as err:
        details["details_error"] = describe_error(err)
        log.warning(
            "no invocation details", extra=fields(command_id=inv.command_id, error=describe_error(err))
        )
    else:
        code = resp.get("ResponseCode")
        details["response_code"] = code if isinstance(code, int) and code >= 0 else None
        details["status_details"] = resp.get("StatusDetails") or None
        lines = [line for line in str(resp.get("StandardErrorContent") or "").splitlines() if line.strip()]
        # The command line carried the lifecycle token; nothing echoes it, but be sure.
        details["stderr_tail"] = redact_uuids(lines[-1])[:STDERR_TAIL_CHARS] if lines else None
        details["recorded"] = recorded_success(str(resp.get("StandardOutputContent") or ""))
    details["hint"] = hint(inv.status, details["response_code"], details["status_details"])
    return details


def recorded_success(stdout: str) -> dict[str, Any] | None:
    """What was checked, when the agent's recorded result (`backup --json`'s one object, the
    last JSON line of the command's output) says the backup succeeded and the lifecycle
    action was completed with CONTINUE; None otherwise (no result, or not a success)."""
    for line in reversed(stdout.splitlines()):
        try:
            doc = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(doc, dict):
            continue
        if doc.get("status") in OK_RESULTS and doc.get("lifecycle_result") == "CONTINUE":
            return {
                "agent_result": doc.get("status"),
                "lifecycle_result": "CONTINUE",
                "bucket": doc.get("bucket"),
                "key": doc.get("key"),
                "manifest_key": doc.get("manifest_key"),
            }
        return None
    return None


def hint(status: str, response_code: int | None, status_details: str | None) -> str:
    """One sentence on the likely cause, most specific first."""
    if status == "Failed" and response_code in EXIT_HINTS:
        return EXIT_HINTS[response_code]
    return STATUS_HINTS.get(status_details or "") or STATUS_HINTS.get(status) or f"the command ended {status}"
