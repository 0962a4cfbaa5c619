"""`handler(event, context)`: run the backup document on a terminating instance, once.

The Lambda entry point of the push path, and only that: it reads the settings (`settings`),
sets up the log lines of one invocation (`logs`), splits the event into messages
(`events`), and hands each terminate lifecycle action to the SSM flow (`ssm_flow`), whose
docstring tells the checks and the one-command guarantee, and each complete state hand-off
to `handoff_flow` (send `adopt` to one receiver of the group). Clients and the retry policy are
`clients`'. Failed Run Commands are reported by the other entry point, `command_status`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lambda_trigger import events, handoff_flow, settings, ssm_flow
from lambda_trigger.clients import (
    AWS_ERRORS,
    SAFETY_MARGIN,
    AwsError,
    Caller,
    Clients,
    deadline,
    describe_error,
    get_clients,
    use_clients,
)
from lambda_trigger.logs import fields, invocation, log
from lambda_trigger.settings import EXECUTION_RANGE, Settings
from lambda_trigger.ssm_flow import CONFIRM_POLL, SAFE_NAME, comment_for

# What tests, the demo and the template check read from here.
__all__ = [
    "CONFIRM_POLL",
    "EXECUTION_RANGE",
    "SAFETY_MARGIN",
    "SAFE_NAME",
    "Clients",
    "Settings",
    "comment_for",
    "handle",
    "handler",
    "use_clients",
]


def handler(event: object, context: object) -> dict[str, Any]:
    """Lambda entry point: settings from the environment, clients built on first use."""
    with invocation(context):
        return handle(event, context, settings=settings.load(Settings.from_env))


def handle(
    event: object,
    context: object,
    *,
    settings: Settings,
    clients: Clients | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Handle every message of one invocation; returns {"results": [one dict per message]}.

    An AWS error on one message does not stop the others. From an SQS batch, the failed
    messages are returned as `batchItemFailures`, so that only they become visible again
    (Lambda's partial batch response, with the event source mapping's FunctionResponseTypes
    set to ReportBatchItemFailures:
    https://docs.aws.amazon.com/lambda/latest/dg/services-sqs-errorhandling.html#services-sqs-batchfailurereporting;
    docs/aws-behaviour.md, "SNS, CloudWatch and Lambda").
    From any other source the first such error is raised once every message was tried, for
    Lambda's async retry to run the invocation again; the ListCommands check (`ssm_flow`)
    keeps that retry from sending a second command.
    """
    results: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    first_error: AwsError | None = None
    message_ids = _sqs_message_ids(event)
    for index, item in enumerate(events.parse(event)):
        if isinstance(item, events.Malformed):
            # Retrying cannot fix it: one line, and a normal return. The excerpt is raw
            # input, redacted by `events` before it was cut.
            log.error("malformed event", extra=fields(reason=item.reason, via=item.via, excerpt=item.excerpt))
            results.append({"status": "malformed", "reason": item.reason})
        elif isinstance(item, events.Ignored):
            log.info(
                "event ignored", extra=fields(reason=item.reason, via=item.via, instance_id=item.instance_id)
            )
            results.append({"status": "ignored", "reason": item.reason})
        else:
            caller = Caller(deadline(context, clock), clock, sleep)
            run = ssm_flow.Run(settings, clients or get_clients(), caller)
            try:
                if isinstance(item, events.HandoffObject):
                    results.append(handoff_flow.process(run, item))
                else:
                    results.append(ssm_flow.process(run, item))
            except AWS_ERRORS as err:
                log.error(
                    "lifecycle action failed", extra=fields(error=describe_error(err), **item.log_fields())
                )
                results.append({"status": "error", "error": describe_error(err), **item.log_fields()})
                first_error = first_error or err
                if index < len(message_ids):
                    failures.append({"itemIdentifier": message_ids[index]})
    if message_ids:
        return {"results": results, "batchItemFailures": failures}
    if first_error is not None:
        raise first_error
    return {"results": results}


def _sqs_message_ids(event: object) -> list[str]:
    """The messageId of each record when `event` is an SQS batch (all records from SQS), else []."""
    records = event.get("Records") if isinstance(event, dict) else None
    if not isinstance(records, list) or not records:
        return []
    ids = [
        r.get("messageId") if isinstance(r, dict) and r.get("eventSource") == "aws:sqs" else None
        for r in records
    ]
    return [str(i) for i in ids] if all(isinstance(i, str) for i in ids) else []
