"""SNS reports of both functions: one message, and a failure to publish never raises.

A report is about something that already went wrong; failing the invocation because the
report could not be sent would only make Lambda run the whole flow again.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from lambda_trigger.clients import AWS_ERRORS, Caller, describe_error
from lambda_trigger.logs import fields, log

if TYPE_CHECKING:
    from mypy_boto3_sns import SNSClient

# docs/aws-behaviour.md, "SNS, CloudWatch and Lambda".
SUBJECT_LIMIT = 99  # SNS: under 100 characters, no line breaks


def publish(
    caller: Caller, sns: SNSClient, topic: str, subject: str, body: dict[str, Any], attributes: dict[str, str]
) -> str | None:
    """Publish `body` as JSON; None when sent, else the one-line error (also logged)."""
    try:
        resp = caller.call(
            "Publish",
            sns.publish,
            TopicArn=topic,
            Subject=" ".join(subject.split())[:SUBJECT_LIMIT],
            Message=json.dumps(body),
            MessageAttributes={
                name: {"DataType": "String", "StringValue": value}
                for name, value in attributes.items()
                if value
            },
        )
    except AWS_ERRORS as err:
        log.error("report not published", extra=fields(topic_arn=topic, error=describe_error(err)))
        return describe_error(err)
    log.info("report published", extra=fields(topic_arn=topic, message_id=resp.get("MessageId")))
    return None


def report_result(
    caller: Caller, sns: SNSClient, topic: str | None, subject: str, result: dict[str, Any]
) -> None:
    """Publish a flow's `result` when a topic is set (attributes: its status and instance);
    a failure to publish is recorded in it as `notify_error`."""
    if not topic:
        return
    attributes = {
        "status": str(result.get("status") or ""),
        "instance_id": str(result.get("instance_id") or ""),
    }
    error = publish(caller, sns, topic, subject, result, attributes)
    if error:
        result["notify_error"] = error
