"""lambda_trigger.events: every envelope the trigger can receive, parsed or set aside.

The samples are AWS's own (tests/fixtures/events/); the SNS and SQS forms wrap them the way those
services deliver them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.events import sample

import instance_agent
import lambda_trigger
from lambda_trigger import events

SHARED_EVENTS = Path(__file__).resolve().parent / "fixtures" / "events"
TOKEN = "87654321-4321-4321-4321-210987654321"


def terminate_event() -> dict[str, Any]:
    return sample("asg-eb-terminate-lifecycle-action.awsdocs-2023.json")


def notification_body(**overrides: Any) -> dict[str, Any]:
    """The lifecycle message as Auto Scaling publishes it to SNS or SQS; `...` drops a key."""
    body: dict[str, Any] = {
        "Origin": "AutoScalingGroup",
        "LifecycleHookName": "my-lifecycle-hook",
        "Destination": "EC2",
        "AccountId": "123456789012",
        "RequestId": "f20fbb34-77f8-11e5-9842-63a2c2b9270f",
        "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
        "AutoScalingGroupName": "my-asg",
        "Service": "AWS Auto Scaling",
        "Time": "2026-01-01T12:00:00.000Z",
        "EC2InstanceId": "i-1234567890abcdef0",
        "LifecycleActionToken": TOKEN,
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


def via_sns(message: dict[str, Any] | str) -> dict[str, Any]:
    text = message if isinstance(message, str) else json.dumps(message)
    return {
        "Records": [
            {
                "EventSource": "aws:sns",
                "EventVersion": "1.0",
                "EventSubscriptionArn": "arn:aws:sns:us-east-1:123456789012:asg:1f2e",
                "Sns": {
                    "Type": "Notification",
                    "MessageId": "95df01b4-ee98-5cb9-9903-4c221d41eb5e",
                    "TopicArn": "arn:aws:sns:us-east-1:123456789012:asg",
                    "Subject": "Auto Scaling:  Lifecycle action 'TERMINATING'",
                    "Message": text,
                    "Timestamp": "2026-01-01T12:00:00.000Z",
                },
            }
        ]
    }


def via_sqs(body: dict[str, Any] | str) -> dict[str, Any]:
    text = body if isinstance(body, str) else json.dumps(body)
    return {
        "Records": [
            {
                "messageId": "059f36b4-87a3-44ab-83d2-661975830a7d",
                "receiptHandle": "AQEBwJnKyrHigUMZj6r",
                "body": text,
                "attributes": {"ApproximateReceiveCount": "1"},
                "messageAttributes": {},
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:asg",
                "awsRegion": "us-east-1",
            }
        ]
    }


def sns_envelope(message: dict[str, Any]) -> dict[str, Any]:
    """An SNS notification as an SQS queue receives it without raw message delivery."""
    return {
        "Type": "Notification",
        "MessageId": "95df01b4",
        "Message": json.dumps(message),
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:asg",
        "Timestamp": "2026-01-01T12:00:00Z",
    }


def only(parsed: list[events.Parsed]) -> events.Parsed:
    assert len(parsed) == 1, parsed
    return parsed[0]


# -- what is acted on ------------------------------------------------------------------------


def test_eventbridge_terminate_sample_is_a_lifecycle_action() -> None:
    action = only(events.parse(terminate_event()))
    assert action == events.LifecycleAction(
        token=TOKEN,
        group="my-asg",
        hook="my-lifecycle-hook",
        instance_id="i-1234567890abcdef0",
        via="eventbridge",
        metadata="additional-info",
    )
    assert action.origin is None and action.destination is None


@pytest.mark.parametrize(
    ("event", "via"),
    [
        (via_sns(notification_body()), "sns"),
        (via_sqs(notification_body()), "sqs"),
        (via_sqs(sns_envelope(notification_body())), "sqs+sns"),
        (via_sqs(terminate_event()), "sqs"),
        (notification_body(), "direct"),
    ],
    ids=["sns", "sqs-raw", "sqs-sns-wrapped", "sqs-eventbridge", "direct"],
)
def test_every_envelope_yields_the_same_action(event: dict[str, Any], via: str) -> None:
    action = only(events.parse(event))
    assert isinstance(action, events.LifecycleAction)
    assert (action.token, action.group, action.hook, action.instance_id, action.via) == (
        TOKEN,
        "my-asg",
        "my-lifecycle-hook",
        "i-1234567890abcdef0",
        via,
    )


def test_a_root_volume_replacement_is_a_lifecycle_action_that_says_so() -> None:
    """An instance refresh with the ReplaceRootVolume strategy: the terminate lifecycle
    action event carries Origin and Destination AutoScalingGroup and Action
    ReplaceRootVolume (instance-refresh-eventbridge-events.html, "Instance refresh replace
    root volume lifecycle events"; this event is the terminate sample with those keys)."""
    event = terminate_event()
    event["detail"].update(
        Origin="AutoScalingGroup", Destination="AutoScalingGroup", Action="ReplaceRootVolume"
    )
    action = only(events.parse(event))
    assert isinstance(action, events.LifecycleAction)
    assert (action.token, action.instance_id) == (TOKEN, "i-1234567890abcdef0")
    assert (action.origin, action.destination, action.action) == (
        "AutoScalingGroup",
        "AutoScalingGroup",
        "ReplaceRootVolume",
    )
    assert action.log_fields()["action"] == "ReplaceRootVolume"
    # A plain termination says nothing of the kind.
    assert only(events.parse(terminate_event())).action is None  # type: ignore[union-attr]


def test_optional_keys_may_be_present_null_or_absent() -> None:
    present = only(events.parse(notification_body(NotificationMetadata="m")))
    assert isinstance(present, events.LifecycleAction)
    assert (present.origin, present.destination, present.metadata) == ("AutoScalingGroup", "EC2", "m")

    nulls = only(events.parse(notification_body(Origin=None, Destination=None, NotificationMetadata=None)))
    absent = only(events.parse(notification_body(Origin=..., Destination=...)))
    for action in (nulls, absent):
        assert isinstance(action, events.LifecycleAction)
        assert (action.origin, action.destination, action.metadata) == (None, None, None)


def test_a_batch_gives_one_entry_per_record_in_order() -> None:
    batch = {
        "Records": [
            via_sqs(notification_body())["Records"][0],
            via_sqs(sample("asg-test-notification.captured-2015.json"))["Records"][0],
            via_sqs("not json")["Records"][0],
        ]
    }
    kinds = [type(p) for p in events.parse(batch)]
    assert kinds == [events.LifecycleAction, events.Ignored, events.Malformed]


# -- what is ignored ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (sample("asg-test-notification.captured-2015.json"), "test notification"),
        (via_sns(sample("asg-test-notification.captured-2015.json")), "test notification"),
        (via_sqs(sample("asg-test-notification.captured-2015.json")), "test notification"),
        (sample("asg-eb-launch-lifecycle-action.awsdocs-current.json"), "launch lifecycle action"),
        (
            sample("asg-eb-terminate-successful.awsdocs-2023.json"),
            "Auto Scaling event 'EC2 Instance Terminate Successful'",
        ),
        (
            {
                **terminate_event(),
                "source": "aws.ec2",
                "detail-type": "EC2 Instance State-change Notification",
            },
            "event from 'aws.ec2', not aws.autoscaling",
        ),
        (
            via_sns(notification_body(LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING")),
            "launch transition",
        ),
        (
            notification_body(LifecycleTransition="autoscaling:EC2_INSTANCE_SOMETHING"),
            "transition 'autoscaling:EC2_INSTANCE_SOMETHING' is not a termination",
        ),
        (
            via_sqs({"Event": "autoscaling:EC2_INSTANCE_TERMINATE", "EC2InstanceId": "i-1234567890abcdef0"}),
            "notification 'autoscaling:EC2_INSTANCE_TERMINATE'",
        ),
    ],
    ids=[
        "test-notification",
        "test-notification-sns",
        "test-notification-sqs",
        "launch",
        "terminate-successful",
        "other-source",
        "launch-transition-sns",
        "unknown-transition",
        "asg-notification",
    ],
)
def test_ignorable_events(event: dict[str, Any], reason: str) -> None:
    ignored = only(events.parse(event))
    assert isinstance(ignored, events.Ignored)
    assert ignored.reason == reason


def test_ignored_launch_names_its_instance_for_the_log() -> None:
    ignored = only(events.parse(sample("asg-eb-launch-lifecycle-action.awsdocs-current.json")))
    assert isinstance(ignored, events.Ignored) and ignored.instance_id == "i-1234567890abcdef0"


# -- what is malformed --------------------------------------------------------------------------


def _detail(**changes: Any) -> dict[str, Any]:
    event = terminate_event()
    event["detail"] = {k: v for k, v in {**event["detail"], **changes}.items() if v is not ...}
    return event


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ("a string", "the event is not a JSON object"),
        ({"Records": []}, "Records is not a non-empty list"),
        ({"Records": {"body": "{}"}}, "Records is not a non-empty list"),
        ({"Records": ["x"]}, "a record is not a JSON object"),
        ({"Records": [{"eventSource": "aws:s3"}]}, "a record has neither Sns.Message nor body"),
        (via_sqs("{not json"), "the message is not JSON"),
        (via_sqs("[1, 2]"), "the message is not a JSON object"),
        ({"Records": [{"Sns": {"Message": 42}}]}, "the message is not text"),
        ({"hello": "world"}, "neither an EventBridge event nor a lifecycle message"),
        ({**terminate_event(), "detail": "x"}, "detail is not a JSON object"),
        (_detail(LifecycleTransition=...), "LifecycleTransition is missing"),
        (_detail(LifecycleActionToken=...), "LifecycleActionToken is missing or not a string"),
        (_detail(EC2InstanceId=7), "EC2InstanceId is missing or not a string"),
        (_detail(LifecycleHookName=""), "LifecycleHookName is missing or not a string"),
        (_detail(LifecycleActionToken="not-a-uuid"), "LifecycleActionToken is not a UUID"),
        (_detail(LifecycleActionToken=TOKEN + "\n"), "LifecycleActionToken is not a UUID"),
        (_detail(EC2InstanceId="i-xyz"), "EC2InstanceId is not an instance id"),
        (_detail(AutoScalingGroupName="my\nasg"), "AutoScalingGroupName is not a valid name"),
        (_detail(LifecycleHookName="h" * 256), "LifecycleHookName is not a valid name"),
    ],
)
def test_malformed_events_are_named_not_raised(event: object, reason: str) -> None:
    malformed = only(events.parse(event))
    assert isinstance(malformed, events.Malformed)
    assert malformed.reason == reason
    assert 0 < len(malformed.excerpt) <= events.EXCERPT_CHARS


def test_excerpt_of_an_unserialisable_event_falls_back_to_repr() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    malformed = only(events.parse(loop))
    assert isinstance(malformed, events.Malformed)
    assert malformed.excerpt.startswith("{'self'")


# -- packaging -----------------------------------------------------------------------------------


def test_version_matches_the_agent() -> None:
    assert lambda_trigger.__version__ == instance_agent.__version__


def test_lambda_package_imports_without_the_agent() -> None:
    """It is deployed alone: importing the handler must not pull in instance_agent."""
    code = (
        "import sys, lambda_trigger.handler; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('instance_agent', 'moto')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
