"""The terminate trigger's flow for one lifecycle action: checks, SendCommand, delivery.

1. The SSM document exists (DescribeDocument). A "yes" is cached per container.
2. The instance is managed and online (DescribeInstanceInformation).
3. No command for this lifecycle action exists yet: ListCommands for the instance, matching
   the Comment, which carries the token's fingerprint (never the token: see `logs`). The
   check asks SSM, not this process, so it holds across Lambda containers. Two deliveries
   racing past it both send; the agent's exactly-once lock on the instance is the backstop.
4. SendCommand with the token, the hook name, the group name when the document's pattern
   admits it (otherwise the agent discovers the group), and the execution timeout.
5. Optionally, a bounded wait until the invocation shows up (`InProgress`). It never waits
   for the backup: the agent completes the lifecycle action itself.

An unreachable instance (not managed, not online, InvalidInstanceId, no document, or a hook
name the document refuses) is left to the on-instance watcher (ON_UNREACHABLE=leave, the
default: completing early would kill the instance mid-backup) or completed with ABANDON at
once (complete, for deployments without the watcher). Either way the reason is published
to TOPIC_ARN.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from lambda_trigger import __version__, events
from lambda_trigger.clients import AWS_ERRORS, Caller, Clients, describe_error, error_code
from lambda_trigger.logs import fields, fingerprint, log
from lambda_trigger.report import report_result
from lambda_trigger.settings import COMPLETE, LEAVE, Settings

COMMENT_PREFIX = "instance-agent lifecycle sha256:"  # + 8 hex digits: well within SSM's 100
# The hook and group names the document admits (its allowedPattern, in Python form, for
# fullmatch); tests check that both accept exactly the same strings.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_/-]{0,254}")
# SendCommand's delivery timeout. The instance answered as Online a moment ago; if the
# agent has not picked the command up in 10 minutes, the watcher owns the termination.
DELIVERY_TIMEOUT = 600
CONFIRM_POLL = 1.0
NOT_YET = frozenset({"Pending", "Delayed"})

# Documents known to exist. Per container: a new container asks again, and a document that
# disappears is noticed by SendCommand's InvalidDocument, which drops it from here.
_documents_seen: set[str] = set()


@dataclass
class Run:
    """One lifecycle action's flow: settings, clients, and its bounded AWS calls."""

    settings: Settings
    clients: Clients
    caller: Caller


def comment_for(token: str) -> str:
    """The SendCommand Comment that marks a command as this lifecycle action's."""
    return COMMENT_PREFIX + fingerprint(token)


def process(run: Run, action: events.LifecycleAction) -> dict[str, Any]:
    """Send the backup command for `action`, once; the result dict the handler returns."""
    log.info("terminate lifecycle action", extra=fields(**action.log_fields()))
    document = run.settings.document
    if not SAFE_NAME.fullmatch(action.hook):
        return _unreachable(
            run, action, f"hook name {action.hook!r} is outside the document's allowed pattern"
        )
    if not _document_exists(run):
        return _unreachable(run, action, f"SSM document {document!r} does not exist")
    ping = _ping_status(run, action.instance_id)
    if ping is None:
        return _unreachable(run, action, "the instance is not managed by SSM")
    if ping != "Online":
        return _unreachable(run, action, f"the instance's SSM agent is {ping}, not Online")
    ids = {"instance_id": action.instance_id, "token_sha256": fingerprint(action.token)}
    existing = _existing_command(run, action)
    if existing is not None:
        log.info("duplicate delivery: the command was sent before", extra=fields(command_id=existing, **ids))
        return {"status": "duplicate", "command_id": existing, **ids}
    try:
        command_id = _send(run, action)
    except ClientError as err:
        if error_code(err) == "InvalidInstanceId":
            return _unreachable(run, action, "SSM refused the instance (InvalidInstanceId)")
        if error_code(err) == "InvalidDocument":
            _documents_seen.discard(document)
            return _unreachable(run, action, f"SSM document {document!r} does not exist")
        raise
    delivery = _confirm(run, command_id, action.instance_id)
    log.info(
        "backup command sent",
        extra=fields(command_id=command_id, delivery=delivery, document=document, **ids),
    )
    return {"status": "sent", "command_id": command_id, "delivery": delivery, **ids}


def _document_exists(run: Run) -> bool:
    name = run.settings.document
    if name in _documents_seen:
        return True
    try:
        run.caller.call("DescribeDocument", run.clients.ssm.describe_document, Name=name)
    except ClientError as err:
        if error_code(err) == "InvalidDocument":
            return False
        raise
    _documents_seen.add(name)
    return True


def _ping_status(run: Run, instance_id: str) -> str | None:
    """The SSM agent's PingStatus (Online, ConnectionLost, Inactive), None if unmanaged."""
    try:
        resp = run.caller.call(
            "DescribeInstanceInformation",
            run.clients.ssm.describe_instance_information,
            Filters=[{"Key": "InstanceIds", "Values": [instance_id]}],
        )
    except ClientError as err:
        # AWS answers InvalidInstanceId when the node is not in a valid state for SSM
        # (docs/aws-behaviour.md, "Systems Manager Run Command").
        if error_code(err) == "InvalidInstanceId":
            return None
        raise
    found = [i for i in resp.get("InstanceInformationList", []) if i.get("InstanceId") == instance_id]
    return str(found[0].get("PingStatus", "Unknown")) if found else None


def _existing_command(run: Run, action: events.LifecycleAction) -> str | None:
    """The id of a command already sent for this lifecycle action, if any."""
    comment = comment_for(action.token)
    kwargs: dict[str, Any] = {
        "InstanceId": action.instance_id,
        "Filters": [{"key": "DocumentName", "value": run.settings.document}],
    }
    while True:
        page = run.caller.call("ListCommands", run.clients.ssm.list_commands, **kwargs)
        found = [c for c in page.get("Commands", []) if c.get("Comment") == comment]
        if found:
            return str(found[0]["CommandId"])
        if not page.get("NextToken"):
            return None
        kwargs["NextToken"] = page["NextToken"]


def _send(run: Run, action: events.LifecycleAction) -> str:
    parameters = {
        "LifecycleActionToken": [action.token],
        "LifecycleHookName": [action.hook],
        "executionTimeout": [str(run.settings.execution_timeout)],
    }
    if SAFE_NAME.fullmatch(action.group):
        parameters["AutoScalingGroupName"] = [action.group]
    else:
        log.info(
            "group name outside the document's pattern; the agent will discover it",
            extra=fields(group=action.group, instance_id=action.instance_id),
        )
    resp = run.caller.call(
        "SendCommand",
        run.clients.ssm.send_command,
        DocumentName=run.settings.document,
        InstanceIds=[action.instance_id],
        Parameters=parameters,
        Comment=comment_for(action.token),
        TimeoutSeconds=DELIVERY_TIMEOUT,
    )
    return str(resp["Command"]["CommandId"])


def _confirm(run: Run, command_id: str, instance_id: str) -> str | None:
    """The invocation's status once it is past Pending, or the last seen (None: not yet
    visible) when CONFIRM_TIMEOUT runs out. Never raises: the command is already sent."""
    if run.settings.confirm_timeout <= 0:
        return None
    caller = run.caller
    end = min(caller.deadline, caller.clock() + run.settings.confirm_timeout)
    status: str | None = None
    while True:
        try:
            resp = caller.call(
                "GetCommandInvocation",
                run.clients.ssm.get_command_invocation,
                CommandId=command_id,
                InstanceId=instance_id,
            )
            status = str(resp.get("Status", ""))
        except AWS_ERRORS as err:
            # Eventually consistent: "does not exist" right after SendCommand is normal.
            if not isinstance(err, ClientError) or error_code(err) != "InvocationDoesNotExist":
                log.warning(
                    "cannot confirm delivery", extra=fields(command_id=command_id, error=describe_error(err))
                )
                return status
        if status is not None and status not in NOT_YET:
            return status
        if caller.clock() + CONFIRM_POLL > end:
            return status
        caller.sleep(CONFIRM_POLL)


def _unreachable(run: Run, action: events.LifecycleAction, reason: str) -> dict[str, Any]:
    mode = run.settings.on_unreachable
    result: dict[str, Any] = {
        "status": "unreachable",
        "reason": reason,
        "instance_id": action.instance_id,
        "group": action.group,
        "hook": action.hook,
        "token_sha256": fingerprint(action.token),
        "on_unreachable": mode,
        "lifecycle_result": None,
        "lifecycle_error": None,
        "agent_version": __version__,
    }
    if mode == COMPLETE:
        try:
            run.caller.call(
                "CompleteLifecycleAction",
                run.clients.autoscaling.complete_lifecycle_action,
                AutoScalingGroupName=action.group,
                LifecycleHookName=action.hook,
                LifecycleActionToken=action.token,
                LifecycleActionResult="ABANDON",
            )
            result["lifecycle_result"] = "ABANDON"
        except AWS_ERRORS as err:
            # Typically "No active Lifecycle Action": expired, or completed by a duplicate.
            # AWS's message names the token; keep only the code and a redacted message.
            result["lifecycle_error"] = describe_error(err).replace(action.token, "<token>")
    if result["lifecycle_result"]:
        outcome = "completed with ABANDON"
    elif mode == LEAVE:
        outcome = "left to the on-instance watcher"
    else:
        outcome = "completion failed"
    log.warning(
        "instance unreachable: %s",
        outcome,
        extra=fields(reason=reason, lifecycle_error=result["lifecycle_error"], **action.log_fields()),
    )
    report_result(
        run.caller,
        run.clients.sns,
        run.settings.topic_arn,
        f"instance-agent: {action.instance_id} unreachable for its backup",
        result,
    )
    return result
