"""Typed lifecycle events, from every envelope the trigger can be invoked with.

`parse(event)` turns one Lambda invocation into one entry per message it carries:

- an EventBridge event (`source` aws.autoscaling, `detail-type` "EC2 Instance-terminate
  Lifecycle Action", the lifecycle message in `detail`);
- an SNS batch (`Records[].Sns.Message`, the lifecycle message as JSON text);
- an SQS batch (`Records[].body`: the lifecycle message, an SNS notification wrapping it
  when the subscription does not use raw delivery, or an EventBridge event);
- the bare lifecycle message (a direct invocation, e.g. from the console);
- an S3 "Object Created" event on EventBridge (`source` aws.s3): a hand-off's manifest,
  written last, announces a complete hand-off (`HandoffObject`, for `handoff_flow`).

Each entry is a `LifecycleAction` or a `HandoffObject` to act on, an `Ignored` message (the test notification,
launch transitions, "EC2 Instance Terminate Successful", anything from another source), or
a `Malformed` one. Nothing here raises: a bad message must cost one log line, not a retry.
The optional keys `Origin`, `Destination`, `Action` and `NotificationMetadata` may be absent
or null.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from lambda_trigger.logs import fingerprint, redact_uuids

SOURCE = "aws.autoscaling"
S3_SOURCE = "aws.s3"
OBJECT_CREATED = "Object Created"
MANIFEST_SUFFIX = ".manifest.json"
# A hand-off archive's key (handoff.TEMPLATE): some segments (the prefix, the group), then
# handoff/<instance>/<time>.tar[.zst|.gz]. The adopt document's allowedPattern is this,
# written `^…\z` (tests check both accept the same keys). Only letters, digits and `_ = . -`
# in a segment, never first a `.`: no `..`, nothing sh or URL-encoding would change (so an
# S3 notification's URL-encoded key and EventBridge's plain one read the same).
HANDOFF_KEY = re.compile(
    r"(?:[A-Za-z0-9_][A-Za-z0-9_=.-]{0,254}/){1,16}handoff/i-[0-9a-f]{8,17}/"
    r"[0-9]{8}T[0-9]{6}Z[.]tar(?:[.](?:zst|gz))?"
)
MAX_KEY = 1024 - len(MANIFEST_SUFFIX)  # S3's longest key, less the manifest's suffix
TERMINATE_ACTION = "EC2 Instance-terminate Lifecycle Action"
LAUNCH_ACTION = "EC2 Instance-launch Lifecycle Action"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
TEST_NOTIFICATION = "autoscaling:TEST_NOTIFICATION"

# What AWS sends; anything else is not a genuine lifecycle message.
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,17}")
# C0, DEL and C1 (U+0080-U+009F): every character of Unicode category Cc, which no log
# line or shell text should carry from an event.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_NAME = 255  # AWS's limit for group and hook names
EXCERPT_CHARS = 500  # enough to recognise a message in the log, small enough for any log line


@dataclass(frozen=True)
class LifecycleAction:
    """A terminating lifecycle action: what identifies it, and where it came from."""

    token: str
    group: str
    hook: str
    instance_id: str
    via: str
    origin: str | None = None
    destination: str | None = None
    metadata: str | None = None
    transition: str = TERMINATING
    # "ReplaceRootVolume" when an instance refresh replaces the root volume: the instance
    # stays, and the agent backs up what lives on the root volume (its own kind of action,
    # told apart on the instance by the ReplacingRootVolume:Wait state). AWS:
    # https://docs.aws.amazon.com/autoscaling/ec2/userguide/instance-refresh-eventbridge-events.html
    # (docs/aws-behaviour.md, "Lifecycle hooks")
    action: str | None = None

    def log_fields(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "group": self.group,
            "hook": self.hook,
            # Never the token itself (lambda_trigger.logs).
            "token_sha256": fingerprint(self.token),
            "via": self.via,
            "origin": self.origin,
            "destination": self.destination,
            "action": self.action,
        }


@dataclass(frozen=True)
class HandoffObject:
    """A complete hand-off: its archive's key (the manifest's, less the suffix)."""

    bucket: str
    key: str
    source: str  # the sender's instance id, from the key
    via: str

    def log_fields(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "key": self.key, "source": self.source, "via": self.via}


@dataclass(frozen=True)
class Ignored:
    """A well-formed message the trigger has no business with."""

    reason: str
    via: str
    instance_id: str | None = None


@dataclass(frozen=True)
class Malformed:
    """A message that cannot be understood; `excerpt` is the start of it, UUIDs redacted, for the log."""

    reason: str
    via: str
    excerpt: str


Parsed = LifecycleAction | HandoffObject | Ignored | Malformed


def parse(event: object) -> list[Parsed]:
    """One entry per message in the invocation (module docstring)."""
    if not isinstance(event, dict):
        return [_malformed("the event is not a JSON object", "unknown", event)]
    if "Records" in event:
        records = event["Records"]
        if not isinstance(records, list) or not records:
            return [_malformed("Records is not a non-empty list", "unknown", event)]
        return [_record(record) for record in records]
    return [_message(event, "direct", event)]


def _record(record: object) -> Parsed:
    if not isinstance(record, dict):
        return _malformed("a record is not a JSON object", "unknown", record)
    sns = record.get("Sns")
    if isinstance(sns, dict):
        return _json_message(sns.get("Message"), "sns", record)
    if "body" in record:
        return _json_message(record["body"], "sqs", record)
    return _malformed("a record has neither Sns.Message nor body", "unknown", record)


def _json_message(text: object, via: str, raw: object) -> Parsed:
    if not isinstance(text, str):
        return _malformed("the message is not text", via, raw)
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to be ours
        return _malformed("the message is not JSON", via, raw)
    if not isinstance(body, dict):
        return _malformed("the message is not a JSON object", via, raw)
    if via == "sqs" and body.get("Type") == "Notification" and "Message" in body:
        # An SNS topic subscribed by the queue without raw message delivery.
        return _json_message(body["Message"], "sqs+sns", raw)
    return _message(body, via, raw)


def _message(body: dict[str, Any], via: str, raw: object) -> Parsed:
    if "detail-type" in body:
        return _eventbridge(body, "eventbridge" if via == "direct" else via, raw)
    if "Event" in body:
        # Auto Scaling's own notifications (TEST_NOTIFICATION, EC2_INSTANCE_TERMINATE, …)
        # carry `Event` and never a lifecycle token.
        event = body["Event"]
        reason = "test notification" if event == TEST_NOTIFICATION else f"notification {event!r}"
        return Ignored(reason, via, _text(body.get("EC2InstanceId")))
    if "LifecycleTransition" in body or "LifecycleActionToken" in body:
        return _lifecycle(body, via, raw)
    return _malformed("neither an EventBridge event nor a lifecycle message", via, raw)


def _eventbridge(body: dict[str, Any], via: str, raw: object) -> Parsed:
    source, detail_type = body.get("source"), body.get("detail-type")
    detail = body.get("detail")
    instance_id = _text(detail.get("EC2InstanceId")) if isinstance(detail, dict) else None
    if source == S3_SOURCE:
        return _object_created(detail_type, detail, via, raw)
    if source != SOURCE:
        return Ignored(f"event from {source!r}, not {SOURCE}", via)
    if detail_type == LAUNCH_ACTION:
        return Ignored("launch lifecycle action", via, instance_id)
    if detail_type != TERMINATE_ACTION:
        return Ignored(f"Auto Scaling event {detail_type!r}", via, instance_id)
    if not isinstance(detail, dict):
        return _malformed("detail is not a JSON object", via, raw)
    return _lifecycle(detail, via, raw)


def _object_created(detail_type: object, detail: object, via: str, raw: object) -> Parsed:
    """A hand-off announced by its manifest; any other S3 event or object is not ours."""
    if detail_type != OBJECT_CREATED:
        return Ignored(f"S3 event {detail_type!r}", via)
    if not isinstance(detail, dict):
        return _malformed("detail is not a JSON object", via, raw)
    bucket, obj = detail.get("bucket"), detail.get("object")
    name = bucket.get("name") if isinstance(bucket, dict) else None
    key = obj.get("key") if isinstance(obj, dict) else None
    if not isinstance(name, str) or not name or not isinstance(key, str) or not key:
        return _malformed("detail.bucket.name or detail.object.key is missing", via, raw)
    if not key.endswith(MANIFEST_SUFFIX):
        return Ignored("not a hand-off manifest", via)
    archive = key[: -len(MANIFEST_SUFFIX)]
    if len(archive) > MAX_KEY or not HANDOFF_KEY.fullmatch(archive):
        return Ignored("not a hand-off manifest", via)
    return HandoffObject(bucket=name, key=archive, source=archive.split("/")[-2], via=via)


def _lifecycle(msg: dict[str, Any], via: str, raw: object) -> Parsed:
    transition = msg.get("LifecycleTransition")
    instance_id = _text(msg.get("EC2InstanceId"))
    if transition == LAUNCHING:
        return Ignored("launch transition", via, instance_id)
    if not isinstance(transition, str) or not transition:
        return _malformed("LifecycleTransition is missing", via, raw)
    if transition != TERMINATING:
        return Ignored(f"transition {transition!r} is not a termination", via, instance_id)
    values: dict[str, str] = {}
    for key in ("LifecycleActionToken", "AutoScalingGroupName", "LifecycleHookName", "EC2InstanceId"):
        value = msg.get(key)
        if not isinstance(value, str) or not value:
            return _malformed(f"{key} is missing or not a string", via, raw)
        values[key] = value
    if not _UUID.fullmatch(values["LifecycleActionToken"]):
        return _malformed("LifecycleActionToken is not a UUID", via, raw)
    if not _INSTANCE_ID.fullmatch(values["EC2InstanceId"]):
        return _malformed("EC2InstanceId is not an instance id", via, raw)
    for key in ("AutoScalingGroupName", "LifecycleHookName"):
        if len(values[key]) > MAX_NAME or _CONTROL.search(values[key]):
            return _malformed(f"{key} is not a valid name", via, raw)
    return LifecycleAction(
        token=values["LifecycleActionToken"],
        group=values["AutoScalingGroupName"],
        hook=values["LifecycleHookName"],
        instance_id=values["EC2InstanceId"],
        via=via,
        origin=_text(msg.get("Origin")),
        destination=_text(msg.get("Destination")),
        metadata=_text(msg.get("NotificationMetadata")),
        action=_text(msg.get("Action")),
    )


def _text(value: object) -> str | None:
    """Optional keys are truly optional: absent, null or not text all read as None."""
    return value if isinstance(value, str) else None


def _malformed(reason: str, via: str, raw: object) -> Malformed:
    try:
        text = json.dumps(raw, default=repr, ensure_ascii=False)
    except ValueError:  # a circular structure: only possible in a direct call from Python
        text = repr(raw)
    # Redact before the cut: a token that straddles the cut is no longer UUID-shaped after it,
    # and its first characters would reach the log unredacted.
    return Malformed(reason, via, redact_uuids(text)[:EXCERPT_CHARS])
