"""`handler(event, context)`: run the backup document on a terminating instance, once.

For each terminate lifecycle action in the event (see `events` for the envelopes):

1. The SSM document exists (DescribeDocument). A "yes" is cached per container.
2. The instance is managed and online (DescribeInstanceInformation).
3. No command for this lifecycle token exists yet: ListCommands for the instance, matching
   the Comment, which carries the token. The check asks SSM, not this process, so it holds
   across Lambda containers. Two deliveries racing past it both send; the agent's
   exactly-once lock on the instance is the backstop.
4. SendCommand with the token, the hook name, the group name when the document's pattern
   admits it (otherwise the agent discovers the group), and the execution timeout.
5. Optionally, a bounded wait until the invocation shows up (`InProgress`). It never waits
   for the backup: the agent completes the lifecycle action itself.

An unreachable instance (not managed, not online, InvalidInstanceId, no document, or a hook
name the document refuses) is left to the on-instance watcher (ON_UNREACHABLE=leave, the
default: completing early would kill the instance mid-backup) or completed with ABANDON at
once (complete, for deployments without the watcher). Either way the reason is published
to TOPIC_ARN.

Only throttling is retried here, with exponential backoff and full jitter inside the
invocation's remaining time: a throttled call was certainly not executed, so retrying even
SendCommand cannot send twice. botocore's own retries are off so that there is one policy
and it knows the deadline. Any other AWS error raises; Lambda's async retry runs the whole
flow again, and step 3 keeps that from sending a second command.

Environment: DOCUMENT_NAME (required); ON_UNREACHABLE `leave`|`complete`; TOPIC_ARN (this
function's own reports; optional); EXECUTION_TIMEOUT (seconds, 1-172800, default 3600);
CONFIRM_TIMEOUT (seconds to wait for delivery, default 10, 0 = don't wait). boto3's own
settings (AWS_ENDPOINT_URL, AWS_REGION, …) apply, so it runs against a local stand-in
unchanged.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar

from botocore.exceptions import ClientError

from lambda_trigger import __version__, events
from lambda_trigger.exceptions import ConfigurationError

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient
    from mypy_boto3_sns import SNSClient
    from mypy_boto3_ssm import SSMClient

T = TypeVar("T")

LEAVE, COMPLETE = "leave", "complete"
COMMENT_PREFIX = "instance-agent lifecycle "  # + the 36-character token: within SSM's 100
# The hook and group names the document admits (its allowedPattern, in Python form, for
# fullmatch); tests check that both accept exactly the same strings.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_/-]{0,254}")
EXECUTION_RANGE = (1, 172_800)  # SSM's limits for a command's execution timeout
DEFAULT_EXECUTION_TIMEOUT = 3600  # SSM's own default
DEFAULT_CONFIRM_TIMEOUT = 10.0
MAX_CONFIRM_TIMEOUT = 300.0
# SendCommand's delivery timeout. The instance answered as Online a moment ago; if the
# agent has not picked the command up in 10 minutes, the watcher owns the termination.
DELIVERY_TIMEOUT = 600
THROTTLING = frozenset({
    "ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded",
    "Throttled",
})
BACKOFF_BASE = 0.05  # seconds; doubles per attempt
BACKOFF_CAP = 5.0
# Kept back from Lambda's remaining time so the final log line and return always happen.
SAFETY_MARGIN = 3.0
DEFAULT_BUDGET = 60.0  # without a Lambda context (a direct call from Python)
CONFIRM_POLL = 1.0
NOT_YET = frozenset({"Pending", "Delayed"})
SUBJECT_LIMIT = 99  # SNS: under 100 characters

log = logging.getLogger("lambda_trigger")
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


# -- configuration and clients -------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    document: str
    on_unreachable: str = LEAVE
    topic_arn: str | None = None
    execution_timeout: int = DEFAULT_EXECUTION_TIMEOUT
    confirm_timeout: float = DEFAULT_CONFIRM_TIMEOUT

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        document = env.get("DOCUMENT_NAME", "").strip()
        if not document:
            raise ConfigurationError("DOCUMENT_NAME is not set")
        mode = env.get("ON_UNREACHABLE", "").strip() or LEAVE
        if mode not in (LEAVE, COMPLETE):
            raise ConfigurationError(f"ON_UNREACHABLE must be leave or complete, not {mode!r}")
        low, high = EXECUTION_RANGE
        execution = _number(env, "EXECUTION_TIMEOUT", int, DEFAULT_EXECUTION_TIMEOUT, low, high)
        confirm = _number(env, "CONFIRM_TIMEOUT", float, DEFAULT_CONFIRM_TIMEOUT, 0,
                          MAX_CONFIRM_TIMEOUT)
        return cls(document, mode, env.get("TOPIC_ARN", "").strip() or None, execution, confirm)


N = TypeVar("N", int, float)


def _number(env: Mapping[str, str], name: str, kind: type[N], default: N, low: float,
            high: float) -> N:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number, not {text!r}") from None
    if not low <= value <= high:
        raise ConfigurationError(f"{name} must be within {low:g}-{high:g}, not {text}")
    return value


@dataclass(frozen=True)
class Clients:
    ssm: SSMClient
    autoscaling: AutoScalingClient
    sns: SNSClient


_clients: Clients | None = None
_clients_lock = threading.Lock()
# Documents known to exist. Per container: a new container asks again, and a document that
# disappears is noticed by SendCommand's InvalidDocument, which drops it from here.
_documents_seen: set[str] = set()


def use_clients(clients: Clients | None) -> None:
    """Use these clients from now on; None builds them again from boto3 on next use."""
    global _clients
    with _clients_lock:
        _clients = clients


def _get_clients() -> Clients:
    global _clients
    with _clients_lock:
        if _clients is None:
            _clients = _boto3_clients()
        return _clients


def _boto3_clients() -> Clients:
    import boto3
    from botocore.config import Config

    # One attempt per call: the retry policy is ours (module docstring).
    config = Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=5,
                    read_timeout=15, user_agent_extra=f"instance-agent-trigger/{__version__}")
    session = boto3.session.Session()
    return Clients(ssm=session.client("ssm", config=config),
                   autoscaling=session.client("autoscaling", config=config),
                   sns=session.client("sns", config=config))


# -- logging ---------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the version and request id; None fields dropped."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "message": record.getMessage(),
            "logger": record.name,
            "version": __version__,
            "request_id": _request_id.get(),
        }
        payload.update(getattr(record, "fields", {}))
        return json.dumps({k: v for k, v in payload.items() if v is not None}, default=str)


class _StdoutHandler(logging.Handler):
    """Writes to whatever sys.stdout is at the time: Lambda sends each line to CloudWatch."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stdout.write(self.format(record) + "\n")
        sys.stdout.flush()


_HANDLER_NAME = "lambda_trigger.json"


def _setup_logging() -> None:
    # By name, not class: a re-imported module must not add a second handler.
    if any(h.get_name() == _HANDLER_NAME for h in log.handlers):
        return
    handler = _StdoutHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # the runtime's root handler would print every line again


def _fields(**values: Any) -> dict[str, Any]:
    return {"fields": values}


# -- the entry point ---------------------------------------------------------------------------


def handler(event: object, context: object) -> dict[str, Any]:
    """Lambda entry point: settings from the environment, clients built on first use."""
    _setup_logging()
    request = _request_id.set(getattr(context, "aws_request_id", None))
    try:
        try:
            settings = Settings.from_env(os.environ)
        except ConfigurationError as err:
            log.error("configuration error", extra=_fields(error=str(err)))
            raise
        return handle(event, context, settings=settings)
    finally:
        _request_id.reset(request)


def handle(event: object, context: object, *, settings: Settings, clients: Clients | None = None,
           sleep: Callable[[float], None] = time.sleep,
           clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Handle every message of one invocation; returns {"results": [one dict per message]}."""
    results: list[dict[str, Any]] = []
    for item in events.parse(event):
        if isinstance(item, events.Malformed):
            # Retrying cannot fix it: one line, and a normal return.
            log.error("malformed event", extra=_fields(reason=item.reason, via=item.via,
                                                       excerpt=item.excerpt))
            results.append({"status": "malformed", "reason": item.reason})
        elif isinstance(item, events.Ignored):
            log.info("event ignored", extra=_fields(reason=item.reason, via=item.via,
                                                    instance_id=item.instance_id))
            results.append({"status": "ignored", "reason": item.reason})
        else:
            run = _Run(settings, clients or _get_clients(), _deadline(context, clock), clock, sleep)
            results.append(_process(run, item))
    return {"results": results}


def _deadline(context: object, clock: Callable[[], float]) -> float:
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    budget = remaining() / 1000.0 - SAFETY_MARGIN if callable(remaining) else DEFAULT_BUDGET
    return clock() + max(budget, 0.0)


# -- one lifecycle action -----------------------------------------------------------------------


@dataclass
class _Run:
    settings: Settings
    clients: Clients
    deadline: float
    clock: Callable[[], float]
    sleep: Callable[[float], None]

    def call(self, name: str, fn: Callable[..., T], **kwargs: Any) -> T:
        """`fn(**kwargs)`, retrying throttling with backoff until the deadline."""
        attempt = 0
        while True:
            try:
                return fn(**kwargs)
            except ClientError as err:
                if _code(err) not in THROTTLING:
                    raise
                attempt += 1
                # Full jitter: a burst of invocations must not retry in lockstep.
                delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))  # noqa: S311
                if self.clock() + delay > self.deadline:
                    raise
                log.info("throttled; retrying", extra=_fields(call=name, attempt=attempt,
                                                              wait_s=round(delay, 3)))
                self.sleep(delay)


def _code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _describe(err: ClientError) -> str:
    error = err.response.get("Error", {})
    return f"{error.get('Code', '')}: {error.get('Message', '')}"


def comment_for(token: str) -> str:
    """The SendCommand Comment that marks a command as this lifecycle action's."""
    return COMMENT_PREFIX + token


def _process(run: _Run, action: events.LifecycleAction) -> dict[str, Any]:
    log.info("terminate lifecycle action", extra=_fields(**action.log_fields()))
    document = run.settings.document
    if not SAFE_NAME.fullmatch(action.hook):
        return _unreachable(run, action, f"hook name {action.hook!r} is outside the document's "
                            "allowed pattern")
    if not _document_exists(run):
        return _unreachable(run, action, f"SSM document {document!r} does not exist")
    ping = _ping_status(run, action.instance_id)
    if ping is None:
        return _unreachable(run, action, "the instance is not managed by SSM")
    if ping != "Online":
        return _unreachable(run, action, f"the instance's SSM agent is {ping}, not Online")
    ids = {"instance_id": action.instance_id, "token": action.token}
    existing = _existing_command(run, action)
    if existing is not None:
        log.info("duplicate delivery: the command was sent before",
                 extra=_fields(command_id=existing, **ids))
        return {"status": "duplicate", "command_id": existing, **ids}
    try:
        command_id = _send(run, action)
    except ClientError as err:
        if _code(err) == "InvalidInstanceId":
            return _unreachable(run, action, "SSM refused the instance (InvalidInstanceId)")
        if _code(err) == "InvalidDocument":
            _documents_seen.discard(document)
            return _unreachable(run, action, f"SSM document {document!r} does not exist")
        raise
    delivery = _confirm(run, command_id, action.instance_id)
    log.info("backup command sent", extra=_fields(command_id=command_id, delivery=delivery,
                                                  document=document, **ids))
    return {"status": "sent", "command_id": command_id, "delivery": delivery, **ids}


def _document_exists(run: _Run) -> bool:
    name = run.settings.document
    if name in _documents_seen:
        return True
    try:
        run.call("DescribeDocument", run.clients.ssm.describe_document, Name=name)
    except ClientError as err:
        if _code(err) == "InvalidDocument":
            return False
        raise
    _documents_seen.add(name)
    return True


def _ping_status(run: _Run, instance_id: str) -> str | None:
    """The SSM agent's PingStatus (Online, ConnectionLost, Inactive), None if unmanaged."""
    try:
        resp = run.call("DescribeInstanceInformation",
                        run.clients.ssm.describe_instance_information,
                        Filters=[{"Key": "InstanceIds", "Values": [instance_id]}])
    except ClientError as err:
        # AWS answers InvalidInstanceId when the node is not in a valid state for SSM.
        if _code(err) == "InvalidInstanceId":
            return None
        raise
    found = [i for i in resp.get("InstanceInformationList", []) if i.get("InstanceId") == instance_id]
    return str(found[0].get("PingStatus", "Unknown")) if found else None


def _existing_command(run: _Run, action: events.LifecycleAction) -> str | None:
    """The id of a command already sent for this lifecycle token, if any."""
    comment = comment_for(action.token)
    kwargs: dict[str, Any] = {
        "InstanceId": action.instance_id,
        "Filters": [{"key": "DocumentName", "value": run.settings.document}],
    }
    while True:
        page = run.call("ListCommands", run.clients.ssm.list_commands, **kwargs)
        found = [c for c in page.get("Commands", []) if c.get("Comment") == comment]
        if found:
            return str(found[0]["CommandId"])
        if not page.get("NextToken"):
            return None
        kwargs["NextToken"] = page["NextToken"]


def _send(run: _Run, action: events.LifecycleAction) -> str:
    parameters = {
        "LifecycleActionToken": [action.token],
        "LifecycleHookName": [action.hook],
        "executionTimeout": [str(run.settings.execution_timeout)],
    }
    if SAFE_NAME.fullmatch(action.group):
        parameters["AutoScalingGroupName"] = [action.group]
    else:
        log.info("group name outside the document's pattern; the agent will discover it",
                 extra=_fields(group=action.group, instance_id=action.instance_id))
    resp = run.call("SendCommand", run.clients.ssm.send_command,
                    DocumentName=run.settings.document, InstanceIds=[action.instance_id],
                    Parameters=parameters, Comment=comment_for(action.token),
                    TimeoutSeconds=DELIVERY_TIMEOUT)
    return str(resp["Command"]["CommandId"])


def _confirm(run: _Run, command_id: str, instance_id: str) -> str | None:
    """The invocation's status once it is past Pending, or the last seen (None: not yet
    visible) when CONFIRM_TIMEOUT runs out. Never raises: the command is already sent."""
    if run.settings.confirm_timeout <= 0:
        return None
    end = min(run.deadline, run.clock() + run.settings.confirm_timeout)
    status: str | None = None
    while True:
        try:
            resp = run.call("GetCommandInvocation", run.clients.ssm.get_command_invocation,
                            CommandId=command_id, InstanceId=instance_id)
            status = str(resp.get("Status", ""))
        except ClientError as err:
            # Eventually consistent: "does not exist" right after SendCommand is normal.
            if _code(err) != "InvocationDoesNotExist":
                log.warning("cannot confirm delivery", extra=_fields(
                    command_id=command_id, error=_describe(err)))
                return status
        if status is not None and status not in NOT_YET:
            return status
        if run.clock() + CONFIRM_POLL > end:
            return status
        run.sleep(CONFIRM_POLL)


# -- unreachable instances ------------------------------------------------------------------------


def _unreachable(run: _Run, action: events.LifecycleAction, reason: str) -> dict[str, Any]:
    mode = run.settings.on_unreachable
    result: dict[str, Any] = {
        "status": "unreachable",
        "reason": reason,
        "instance_id": action.instance_id,
        "group": action.group,
        "hook": action.hook,
        "on_unreachable": mode,
        "lifecycle_result": None,
        "lifecycle_error": None,
        "agent_version": __version__,
    }
    if mode == COMPLETE:
        try:
            run.call("CompleteLifecycleAction", run.clients.autoscaling.complete_lifecycle_action,
                     AutoScalingGroupName=action.group, LifecycleHookName=action.hook,
                     LifecycleActionToken=action.token, LifecycleActionResult="ABANDON")
            result["lifecycle_result"] = "ABANDON"
        except ClientError as err:
            # Typically "No active Lifecycle Action": expired, or completed by a duplicate.
            result["lifecycle_error"] = _describe(err)
    if result["lifecycle_result"]:
        outcome = "completed with ABANDON"
    elif mode == LEAVE:
        outcome = "left to the on-instance watcher"
    else:
        outcome = "completion failed"
    log.warning("instance unreachable: %s", outcome, extra=_fields(
        reason=reason, lifecycle_error=result["lifecycle_error"], **action.log_fields()))
    _publish(run, result)
    return result


def _publish(run: _Run, result: dict[str, Any]) -> None:
    topic = run.settings.topic_arn
    if not topic:
        return
    subject = f"instance-agent: {result['instance_id']} unreachable for its backup"
    try:
        resp = run.call("Publish", run.clients.sns.publish, TopicArn=topic,
                        Subject=subject[:SUBJECT_LIMIT], Message=json.dumps(result),
                        MessageAttributes={
                            "status": {"DataType": "String", "StringValue": result["status"]},
                            "instance_id": {"DataType": "String",
                                            "StringValue": result["instance_id"]},
                        })
    except ClientError as err:
        result["notify_error"] = _describe(err)
        log.error("report not published", extra=_fields(topic_arn=topic, error=_describe(err)))
        return
    log.info("report published", extra=_fields(topic_arn=topic, message_id=resp.get("MessageId")))
