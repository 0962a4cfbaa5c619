"""SNS adapter: publish the result object, within SNS's limits, and never raise past here.

SNS allows 256 KiB for message plus attributes, and a Subject under 100 characters with no
line breaks. The body is the result object as JSON; if it is too large (only an enormous error
text can make it so), the long strings are cut and `"truncated": true` is added.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from instance_agent.errors import NotifyError
from instance_agent.s3upload import describe_client_error

log = logging.getLogger(__name__)

MAX_BYTES = 256 * 1024
_ATTR_ROOM = 1024  # the two attributes and their names, generously
MAX_SUBJECT = 99


class SNSClient(Protocol):
    def publish(self, **kwargs: Any) -> Mapping[str, Any]: ...


def subject_for(result: Mapping[str, Any]) -> str:
    what = "hand-off" if str(result.get("event", "")).startswith("handoff") else "backup"
    text = f"instance-agent: {what} {result.get('status')} on {result.get('instance_id')}"
    return " ".join(text.split())[:MAX_SUBJECT]


def body_for(result: Mapping[str, Any], limit: int = MAX_BYTES - _ATTR_ROOM) -> str:
    body = json.dumps(result, ensure_ascii=False)
    if len(body.encode()) <= limit:
        return body
    cut = dict(result)
    cut["truncated"] = True
    longest = sorted(
        (k for k, v in cut.items() if isinstance(v, str)), key=lambda k: len(str(cut[k])), reverse=True
    )
    for name in longest:
        over = len(json.dumps(cut, ensure_ascii=False).encode()) - limit
        if over <= 0:
            break
        text = str(cut[name])
        cut[name] = text[: max(0, len(text) - over - 16)] + "…"
    return json.dumps(cut, ensure_ascii=False)


def publish(client: SNSClient, topic_arn: str, result: Mapping[str, Any]) -> str:
    """Publish; returns the MessageId. Raises NotifyError (callers log and carry on)."""
    try:
        resp = client.publish(
            TopicArn=topic_arn,
            Subject=subject_for(result),
            Message=body_for(result),
            MessageAttributes={
                "status": {"DataType": "String", "StringValue": str(result.get("status"))},
                "instance_id": {
                    "DataType": "String",
                    "StringValue": str(result.get("instance_id") or "unknown"),
                },
            },
        )
    except (ClientError, BotoCoreError) as err:
        raise NotifyError(f"SNS publish failed: {describe_client_error(err)}") from None
    return str(resp.get("MessageId", ""))
