"""lambda_trigger.handler against the local AWS: moto over HTTP, with the SSM and Auto
Scaling stand-ins. Every test invokes the handler the way Lambda does, `handler(event,
context)`, and checks what an operator would: commands recorded by SSM, lifecycle
completions, SNS messages, and the JSON log lines.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from conftest import make_group
from support import scoreboard
from support.events import sample
from support.lambda_context import LambdaContext

import lambda_trigger
import lambda_trigger.clients
import lambda_trigger.handler
import lambda_trigger.ssm_flow
from instance_agent.local import autoscaling, ssm
from instance_agent.local.moto_server import MotoServer
from lambda_trigger.exceptions import ConfigurationError

REGION = "us-east-1"
ACCOUNT = "123456789012"
DOCUMENT = Path(__file__).resolve().parents[1] / "packaging" / "ssm-document.yaml"
SHARED_EVENTS = Path(__file__).resolve().parent / "fixtures" / "events"


@dataclass
class Trigger:
    """One test's deployment of the trigger: its document, topic and environment."""

    moto: MotoServer
    document: str
    topic_arn: str
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture[str]

    @property
    def module(self) -> ModuleType:
        return lambda_trigger.handler

    def invoke(self, event: object, context: object | None = None) -> list[dict[str, Any]]:
        ctx = LambdaContext() if context is None else context
        response: dict[str, Any] = self.module.handler(event, ctx)
        return list(response["results"])

    def new_container(self) -> None:
        """What a cold start gives: module state (clients, document cache) from scratch."""
        for module in (lambda_trigger.clients, lambda_trigger.ssm_flow, self.module):
            importlib.reload(module)

    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.capsys.readouterr().out.splitlines() if line]

    def commands(self, instance_id: str | None = None) -> list[ssm.SentCommand]:
        return [
            c
            for c in ssm.sent_commands(ACCOUNT, REGION)
            if c.document == self.document and (instance_id is None or instance_id in c.instance_ids)
        ]

    def sns(self) -> list[dict[str, Any]]:
        return self.moto.sns_messages(self.topic_arn, ACCOUNT, REGION)

    def client(self, service: str) -> Any:
        return boto3.client(service, region_name=REGION, endpoint_url=self.moto.endpoint)

    def env(self, **values: str | None) -> None:
        for name, value in values.items():
            if value is None:
                self.monkeypatch.delenv(name, raising=False)
            else:
                self.monkeypatch.setenv(name, value)


@pytest.fixture(autouse=True)
def fake_aws(monkeypatch: pytest.MonkeyPatch, moto: MotoServer) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)


@pytest.fixture
def trigger(
    moto: MotoServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Trigger]:
    ssm.install()
    ssm.reset()
    suffix = uuid.uuid4().hex[:10]
    document = f"instance-agent-backup-{suffix}"
    create_document(moto, document)
    topic = boto3.client("sns", region_name=REGION, endpoint_url=moto.endpoint).create_topic(
        Name=f"trigger-{suffix}"
    )["TopicArn"]
    for name in ("ON_UNREACHABLE", "EXECUTION_TIMEOUT", "CONFIRM_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DOCUMENT_NAME", document)
    monkeypatch.setenv("TOPIC_ARN", topic)
    t = Trigger(moto, document, topic, monkeypatch, capsys)
    t.new_container()
    yield t
    ssm.reset()


def create_document(moto: MotoServer, name: str) -> None:
    boto3.client("ssm", region_name=REGION, endpoint_url=moto.endpoint).create_document(
        Name=name, Content=DOCUMENT.read_text(), DocumentType="Command", DocumentFormat="YAML"
    )


def terminate_event(token: str, group: str, hook: str, instance_id: str) -> dict[str, Any]:
    """AWS's sample terminate event, for this lifecycle action."""
    event = sample("asg-eb-terminate-lifecycle-action.awsdocs-2023.json")
    event["detail"].update(
        LifecycleActionToken=token,
        AutoScalingGroupName=group,
        LifecycleHookName=hook,
        EC2InstanceId=instance_id,
    )
    return event


def sha8(token: str) -> str:
    """The fingerprint an operator can compute to find a token's lines: sha256, 8 hex digits."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


def fake_instance() -> str:
    return "i-" + uuid.uuid4().hex[:17]


def managed_event(group: str = "my-asg", hook: str = "my-lifecycle-hook") -> dict[str, Any]:
    """A terminate event for a made-up instance that SSM manages and sees Online."""
    instance_id = fake_instance()
    ssm.register(instance_id, account_id=ACCOUNT, region=REGION)
    return terminate_event(str(uuid.uuid4()), group, hook, instance_id)


@dataclass
class RealAction:
    """A lifecycle action of a real scale-in on the stand-in: the instance is Terminating:Wait."""

    group: str
    hook: str
    instance_id: str
    token: str

    def event(self) -> dict[str, Any]:
        return terminate_event(self.token, self.group, self.hook, self.instance_id)


def real_action(moto: MotoServer) -> RealAction:
    suffix = uuid.uuid4().hex[:10]
    group, hook = f"asg-{suffix}", f"hook-{suffix}"
    instance_id = make_group(moto, group, hook)
    autoscaling.begin_termination(group, instance_id, account_id=ACCOUNT, region=REGION)
    [action] = [a for a in autoscaling.active_actions(ACCOUNT, REGION) if a.instance_id == instance_id]
    return RealAction(group, hook, instance_id, action.token)


def completions(group: str) -> list[autoscaling.LifecycleCall]:
    return [
        c for c in autoscaling.calls(ACCOUNT, REGION) if c.group == group and c.action == autoscaling.COMPLETE
    ]


# -- the normal path ------------------------------------------------------------------------------


def test_sends_one_command_carrying_the_lifecycle_action(trigger: Trigger, moto: MotoServer) -> None:
    action = real_action(moto)
    ssm.register(action.instance_id, account_id=ACCOUNT, region=REGION)

    [result] = trigger.invoke(action.event())

    [command] = trigger.commands(action.instance_id)
    assert result == {
        "status": "sent",
        "command_id": command.command_id,
        "delivery": "InProgress",
        "instance_id": action.instance_id,
        "token_sha256": sha8(action.token),
    }
    assert command.parameters == {
        "LifecycleActionToken": [action.token],
        "LifecycleHookName": [action.hook],
        "AutoScalingGroupName": [action.group],
        "executionTimeout": ["3600"],
    }
    assert command.instance_ids == (action.instance_id,)
    # The comment marks the command as this action's by the token's fingerprint only.
    assert sha8(action.token) in command.comment and action.token not in command.comment
    assert len(command.comment) <= 100
    # The trigger never completes the action itself on this path: the agent does.
    assert completions(action.group) == []
    assert [
        a.token for a in autoscaling.active_actions(ACCOUNT, REGION) if a.instance_id == action.instance_id
    ] == [action.token]

    logs = trigger.logs()
    assert all(line["version"] == lambda_trigger.__version__ for line in logs)
    assert all(line["logger"] == "lambda_trigger" for line in logs)
    sent = [line for line in logs if line["message"] == "backup command sent"]
    assert len(sent) == 1 and sent[0]["command_id"] == command.command_id
    assert sent[0]["request_id"]


def test_execution_timeout_comes_from_the_environment(trigger: Trigger) -> None:
    trigger.env(EXECUTION_TIMEOUT="7200", CONFIRM_TIMEOUT="0")
    event = managed_event()
    before = ssm.call_count("GetCommandInvocation")

    [result] = trigger.invoke(event)

    assert result["status"] == "sent" and result["delivery"] is None
    assert ssm.call_count("GetCommandInvocation") == before  # CONFIRM_TIMEOUT=0: no wait
    [command] = trigger.commands(event["detail"]["EC2InstanceId"])
    assert command.parameters["executionTimeout"] == ["7200"]


def test_group_name_outside_the_pattern_is_left_for_the_agent_to_discover(trigger: Trigger) -> None:
    event = managed_event(group="web tier (blue)")

    [result] = trigger.invoke(event)

    assert result["status"] == "sent"
    [command] = trigger.commands(event["detail"]["EC2InstanceId"])
    assert "AutoScalingGroupName" not in command.parameters
    assert any("agent will discover" in line["message"] for line in trigger.logs())


def test_injected_clients_are_used(trigger: Trigger, moto: MotoServer) -> None:
    clients = trigger.module.Clients(
        ssm=trigger.client("ssm"), autoscaling=trigger.client("autoscaling"), sns=trigger.client("sns")
    )
    trigger.module.use_clients(clients)
    trigger.env(AWS_ENDPOINT_URL="http://127.0.0.1:9")  # unused: the injected clients are

    [result] = trigger.invoke(managed_event())

    assert result["status"] == "sent"


def test_runs_without_a_lambda_context(trigger: Trigger) -> None:
    [result] = trigger.module.handler(managed_event(), None)["results"]
    assert result["status"] == "sent"


# -- duplicates -------------------------------------------------------------------------------------


def test_duplicate_delivery_sends_one_command_across_containers(trigger: Trigger, moto: MotoServer) -> None:
    action = real_action(moto)
    ssm.register(action.instance_id, account_id=ACCOUNT, region=REGION)

    [first] = trigger.invoke(action.event())
    trigger.new_container()  # the second delivery lands in a fresh container
    [second] = trigger.invoke(action.event())

    assert len(trigger.commands(action.instance_id)) == 1
    assert first["status"] == "sent"
    assert second == {
        "status": "duplicate",
        "command_id": first["command_id"],
        "instance_id": action.instance_id,
        "token_sha256": sha8(action.token),
    }


def test_duplicate_found_on_a_later_page_and_new_token_after_all_pages(trigger: Trigger) -> None:
    instance_id = fake_instance()
    ssm.register(instance_id, account_id=ACCOUNT, region=REGION)
    ssm.set_page_size(1, account_id=ACCOUNT, region=REGION)
    events = [terminate_event(str(uuid.uuid4()), "my-asg", "my-hook", instance_id) for _ in range(3)]
    for event in events:
        assert trigger.invoke(event)[0]["status"] == "sent"

    [again] = trigger.invoke(events[2])  # its command is on the third page
    [fresh] = trigger.invoke(terminate_event(str(uuid.uuid4()), "my-asg", "my-hook", instance_id))

    assert again["status"] == "duplicate"
    assert fresh["status"] == "sent"
    assert len(trigger.commands(instance_id)) == 4


# -- ignored and malformed events ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "asg-test-notification.captured-2015.json",
        "asg-eb-launch-lifecycle-action.awsdocs-current.json",
        "asg-eb-terminate-successful.awsdocs-2023.json",
    ],
)
def test_ignored_events_cost_one_log_line_and_no_aws_call(trigger: Trigger, name: str) -> None:
    event = sample(name)
    calls = ssm.call_count()

    [result] = trigger.invoke(event)

    assert result["status"] == "ignored"
    assert ssm.call_count() == calls and trigger.commands() == []
    [line] = trigger.logs()
    assert line["level"] == "INFO" and line["message"] == "event ignored"
    assert line["reason"] == result["reason"]


def test_malformed_event_logs_one_error_line_and_returns(trigger: Trigger) -> None:
    calls = ssm.call_count()
    event = {"Records": [{"eventSource": "aws:sqs", "body": '{"LifecycleActionToken": '}]}

    [result] = trigger.invoke(event)

    assert result == {"status": "malformed", "reason": "the message is not JSON"}
    assert ssm.call_count() == calls
    [line] = trigger.logs()
    assert line["level"] == "ERROR" and line["message"] == "malformed event"
    assert line["reason"] == "the message is not JSON" and "LifecycleActionToken" in line["excerpt"]
    assert line["version"] == lambda_trigger.__version__


def test_malformed_event_with_a_token_across_the_excerpt_cut_logs_no_part_of_it(trigger: Trigger) -> None:
    with scoreboard.scenario(
        "Trigger Lambda: a malformed message whose token straddles the 500-character excerpt cut"
    ) as row:
        row.faults = "a lifecycle token starting 18 characters before the cut"
        # The excerpt is cut at 500 characters; a token that straddles the cut must be redacted
        # whole, before the cut, or its first characters reach the log.
        token = str(uuid.uuid4())
        record = {"eventSource": "aws:sqs", "messageId": "m-1", "body": '{"LifecycleActionToken": "' + token}
        # Pad the body so that, as the record is excerpted (JSON text), the cut falls mid-token.
        pad = 500 - json.dumps(record, ensure_ascii=False).index(token) - 18
        record["body"] = "x" * pad + record["body"]
        assert json.dumps(record, ensure_ascii=False).index(token) == 500 - 18
        event = {"Records": [record]}

        [result] = trigger.invoke(event)

        assert result["status"] == "malformed"
        logs = trigger.capsys.readouterr().out
        assert "malformed event" in logs
        runs = {token[i : i + 8] for i in range(len(token) - 7)}
        assert not [run for run in runs if run in logs]
        row.outcome = "malformed; the token redacted before the cut: no 8-character run of it in the log"


# -- unreachable instances ----------------------------------------------------------------------------


def test_unreachable_with_complete_abandons_once_and_reports(trigger: Trigger, moto: MotoServer) -> None:
    trigger.env(ON_UNREACHABLE="complete")
    action = real_action(moto)  # never registered with SSM: no agent on it

    [result] = trigger.invoke(action.event())

    assert result["status"] == "unreachable" and result["lifecycle_result"] == "ABANDON"
    assert result["reason"] == "the instance is not managed by SSM"
    [call] = completions(action.group)
    assert (call.result, call.token, call.hook, call.outcome) == ("ABANDON", action.token, action.hook, "ok")
    assert [
        (o.result, o.how)
        for o in autoscaling.outcomes(ACCOUNT, REGION)
        if o.instance_id == action.instance_id
    ] == [("ABANDON", "completed")]
    [message] = trigger.sns()
    body = json.loads(message["message"])
    assert body["status"] == "unreachable" and body["instance_id"] == action.instance_id
    assert body["reason"] == "the instance is not managed by SSM" and body["lifecycle_result"] == "ABANDON"
    assert message["subject"] and "\n" not in message["subject"] and len(message["subject"]) < 100
    assert trigger.commands(action.instance_id) == []


def test_unreachable_with_leave_only_reports(trigger: Trigger, moto: MotoServer) -> None:
    trigger.env(ON_UNREACHABLE="leave")
    action = real_action(moto)

    [result] = trigger.invoke(action.event())

    assert result["status"] == "unreachable" and result["lifecycle_result"] is None
    assert completions(action.group) == []
    assert [
        a.token for a in autoscaling.active_actions(ACCOUNT, REGION) if a.instance_id == action.instance_id
    ] == [action.token]
    [message] = trigger.sns()
    assert json.loads(message["message"])["on_unreachable"] == "leave"
    assert any("left to the on-instance watcher" in line["message"] for line in trigger.logs())


def test_completion_that_fails_is_reported(trigger: Trigger, moto: MotoServer) -> None:
    trigger.env(ON_UNREACHABLE="complete")
    action = real_action(moto)
    trigger.client("autoscaling").complete_lifecycle_action(
        AutoScalingGroupName=action.group,
        LifecycleHookName=action.hook,
        LifecycleActionToken=action.token,
        LifecycleActionResult="CONTINUE",
    )

    [result] = trigger.invoke(action.event())

    assert result["lifecycle_result"] is None
    assert result["lifecycle_error"].startswith("ValidationError: No active Lifecycle Action")
    [message] = trigger.sns()
    assert json.loads(message["message"])["lifecycle_error"] == result["lifecycle_error"]


def test_offline_agent_is_unreachable(trigger: Trigger) -> None:
    event = managed_event()
    ssm.set_online(event["detail"]["EC2InstanceId"], False, account_id=ACCOUNT, region=REGION)

    [result] = trigger.invoke(event)

    assert result["reason"] == "the instance's SSM agent is ConnectionLost, not Online"
    assert len(trigger.sns()) == 1 and trigger.commands() == []


def test_stopped_instance_refused_by_send_command(trigger: Trigger, moto: MotoServer) -> None:
    action = real_action(moto)
    ssm.register(action.instance_id, account_id=ACCOUNT, region=REGION)
    trigger.client("ec2").stop_instances(InstanceIds=[action.instance_id])

    [result] = trigger.invoke(action.event())

    assert result["reason"] == "SSM refused the instance (InvalidInstanceId)"
    assert trigger.commands() == [] and len(trigger.sns()) == 1


def test_invalid_instance_id_from_describe_is_unreachable(trigger: Trigger) -> None:
    ssm.inject_error("DescribeInstanceInformation", "InvalidInstanceId", account_id=ACCOUNT, region=REGION)

    [result] = trigger.invoke(managed_event())

    assert result["reason"] == "the instance is not managed by SSM"


def test_hook_name_the_document_refuses_is_unreachable(trigger: Trigger) -> None:
    # AWS allows a hook name starting with '-'; as an argument it would read as an option.
    [result] = trigger.invoke(managed_event(hook="-rf"))

    assert result["status"] == "unreachable" and "allowed pattern" in result["reason"]
    assert trigger.commands() == []


def test_missing_document_is_unreachable_and_not_cached(trigger: Trigger, moto: MotoServer) -> None:
    trigger.env(DOCUMENT_NAME=f"not-yet-{uuid.uuid4().hex[:8]}")
    [missing] = trigger.invoke(managed_event())
    assert missing["status"] == "unreachable" and "does not exist" in missing["reason"]

    create_document(moto, os.environ["DOCUMENT_NAME"])
    [later] = trigger.invoke(managed_event())
    assert later["status"] == "sent"


def test_document_deleted_after_it_was_cached(trigger: Trigger) -> None:
    assert trigger.invoke(managed_event())[0]["status"] == "sent"  # caches "it exists"
    trigger.client("ssm").delete_document(Name=trigger.document)

    [gone] = trigger.invoke(managed_event())
    describes = ssm.call_count("DescribeDocument")
    [again] = trigger.invoke(managed_event())

    assert gone["reason"] == f"SSM document {trigger.document!r} does not exist"
    assert again["status"] == "unreachable"
    assert ssm.call_count("DescribeDocument") == describes + 1  # asked again, not cached


def test_reports_without_a_topic_only_log(trigger: Trigger) -> None:
    trigger.env(TOPIC_ARN=None)
    [result] = trigger.invoke(managed_event(hook="-x"))
    assert result["status"] == "unreachable" and "notify_error" not in result
    assert trigger.sns() == []


def test_report_that_cannot_be_published_is_logged(trigger: Trigger) -> None:
    trigger.env(TOPIC_ARN=f"arn:aws:sns:{REGION}:{ACCOUNT}:no-such-topic")
    [result] = trigger.invoke(managed_event(hook="-x"))
    assert result["notify_error"].startswith("NotFound")
    assert any(line["message"] == "report not published" for line in trigger.logs())


# -- AWS errors ------------------------------------------------------------------------------------------


def test_throttling_is_retried(trigger: Trigger) -> None:
    ssm.inject_throttling(2, account_id=ACCOUNT, region=REGION)
    event = managed_event()

    [result] = trigger.invoke(event)

    assert result["status"] == "sent"
    assert ssm.throttled_count(ACCOUNT, REGION) >= 2
    assert len(trigger.commands(event["detail"]["EC2InstanceId"])) == 1
    assert any(line["message"] == "throttled; retrying" for line in trigger.logs())


def test_throttling_past_the_deadline_raises_for_lambda_to_retry(trigger: Trigger) -> None:
    ssm.inject_error("DescribeDocument", "ThrottlingException", times=1, account_id=ACCOUNT, region=REGION)
    with pytest.raises(ClientError, match="ThrottlingException"):
        # 3 s left is all safety margin: no time for a retry.
        trigger.invoke(managed_event(), LambdaContext(remaining_ms=3000))
    assert trigger.commands() == []


@pytest.mark.parametrize(
    "action", ["DescribeDocument", "DescribeInstanceInformation", "ListCommands", "SendCommand"]
)
def test_other_errors_raise_for_lambda_to_retry(trigger: Trigger, action: str) -> None:
    ssm.inject_error(action, "AccessDeniedException", "not authorized", account_id=ACCOUNT, region=REGION)
    with pytest.raises(ClientError, match="AccessDeniedException"):
        trigger.invoke(managed_event())
    assert trigger.commands() == []


def test_delivery_confirmation_tolerates_invocation_does_not_exist(trigger: Trigger) -> None:
    ssm.inject_error(
        "GetCommandInvocation", "InvocationDoesNotExist", times=2, account_id=ACCOUNT, region=REGION
    )
    slept: list[float] = []
    settings = trigger.module.Settings.from_env(os.environ)

    [result] = trigger.module.handle(managed_event(), LambdaContext(), settings=settings, sleep=slept.append)[
        "results"
    ]

    assert result["delivery"] == "InProgress"
    assert slept == [trigger.module.CONFIRM_POLL] * 2


def test_delivery_not_confirmed_in_time_is_still_sent(trigger: Trigger) -> None:
    trigger.env(CONFIRM_TIMEOUT="2.5")
    ssm.inject_error(
        "GetCommandInvocation", "InvocationDoesNotExist", times=100, account_id=ACCOUNT, region=REGION
    )
    now = [0.0]
    settings = trigger.module.Settings.from_env(os.environ)

    def sleep(seconds: float) -> None:
        now[0] += seconds

    [result] = trigger.module.handle(
        managed_event(), LambdaContext(), settings=settings, sleep=sleep, clock=lambda: now[0]
    )["results"]

    assert result["status"] == "sent" and result["delivery"] is None
    assert now[0] == 2.0  # polled at 0, 1 and 2 s; a poll at 3 s would pass the 2.5 s bound


def test_delivery_check_failure_is_logged_not_raised(trigger: Trigger) -> None:
    ssm.inject_error("GetCommandInvocation", "AccessDeniedException", account_id=ACCOUNT, region=REGION)
    [result] = trigger.invoke(managed_event())
    assert result["status"] == "sent" and result["delivery"] is None
    assert any(line["message"] == "cannot confirm delivery" for line in trigger.logs())


# -- configuration -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("DOCUMENT_NAME", None, "DOCUMENT_NAME is not set"),
        ("ON_UNREACHABLE", "abandon", "ON_UNREACHABLE must be leave or complete"),
        ("EXECUTION_TIMEOUT", "1h", "EXECUTION_TIMEOUT must be a number"),
        ("EXECUTION_TIMEOUT", "172801", "EXECUTION_TIMEOUT must be within 1-172800"),
        ("CONFIRM_TIMEOUT", "-1", "CONFIRM_TIMEOUT must be within 0-300"),
    ],
)
def test_bad_configuration_raises_with_one_error_line(
    trigger: Trigger, name: str, value: str | None, error: str
) -> None:
    trigger.env(**{name: value})
    with pytest.raises(ConfigurationError, match=error):
        trigger.invoke(managed_event())
    [line] = trigger.logs()
    assert line["level"] == "ERROR" and line["message"] == "configuration error"
    assert line["error"].startswith(error)


# -- burst ---------------------------------------------------------------------------------------------------


def test_burst_of_200_events_with_every_third_call_throttled(trigger: Trigger, record_property: Any) -> None:
    events = [managed_event() for _ in range(200)]
    calls_before = ssm.call_count()
    ssm.inject_throttling(3, account_id=ACCOUNT, region=REGION)
    lock = threading.Lock()
    results: list[dict[str, Any]] = []

    def deliver(event: dict[str, Any]) -> None:
        [result] = trigger.invoke(event)
        with lock:
            results.append(result)

    # Concurrent, as Lambda runs a burst in many containers at once.
    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(deliver, events))

    calls = ssm.call_count() - calls_before
    throttled = ssm.throttled_count(ACCOUNT, REGION)
    ssm.inject_throttling(0, account_id=ACCOUNT, region=REGION)
    record_property("ssm_calls", calls)
    record_property("throttled", throttled)
    print(f"\nburst: 200 events, {calls} SSM calls, {throttled} throttled")

    assert Counter(r["status"] for r in results) == {"sent": 200}
    commands = trigger.commands()
    assert len(commands) == 200
    tokens = [c.parameters["LifecycleActionToken"][0] for c in commands]
    assert sorted(tokens) == sorted(e["detail"]["LifecycleActionToken"] for e in events)
    assert Counter(c.instance_ids for c in commands).most_common(1)[0][1] == 1  # none twice
    assert throttled >= calls // 3 - 1


# -- the lifecycle token is a credential --------------------------------------------------------------


def test_token_is_in_no_log_line_sns_message_or_result(trigger: Trigger, moto: MotoServer) -> None:
    trigger.env(ON_UNREACHABLE="complete")
    sent = real_action(moto)
    ssm.register(sent.instance_id, account_id=ACCOUNT, region=REGION)
    unreachable = real_action(moto)  # never registered: completed with ABANDON and reported
    expired = real_action(moto)
    trigger.client("autoscaling").complete_lifecycle_action(
        AutoScalingGroupName=expired.group,
        LifecycleHookName=expired.hook,
        LifecycleActionToken=expired.token,
        LifecycleActionResult="CONTINUE",
    )
    malformed = {"Records": [{"body": json.dumps({"LifecycleActionToken": sent.token})[:-1]}]}

    results = [
        *trigger.invoke(sent.event()),
        *trigger.invoke(sent.event()),
        *trigger.invoke(unreachable.event()),
        *trigger.invoke(expired.event()),
        *trigger.invoke(malformed),
    ]

    assert [r["status"] for r in results] == ["sent", "duplicate", "unreachable", "unreachable", "malformed"]
    logs = trigger.capsys.readouterr().out
    messages = json.dumps(trigger.sns())
    returned = json.dumps(results)
    for action in (sent, unreachable, expired):
        assert action.token not in logs and action.token not in messages
        assert action.token not in returned
    # What stands for it instead: the fingerprint an operator can compute from the event.
    assert sha8(sent.token) in logs and sha8(unreachable.token) in messages
    assert len(trigger.sns()) == 2  # both unreachable ones, the expired one with its error


# -- errors without an answer (BotoCoreError) -------------------------------------------------------


class Unanswered:
    """A real boto3 client whose `method` raises `error` (no answer from AWS) while `when` holds."""

    def __init__(self, client: Any, method: str, error: Exception, when: Any = None) -> None:
        self._client, self._method, self._error = client, method, error
        self._when = when or (lambda kwargs: True)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name != self._method:
            return attr

        def call(**kwargs: Any) -> Any:
            if self._when(kwargs):
                raise self._error
            return attr(**kwargs)

        return call


def clients_with(trigger: Trigger, service: str, method: str, error: Exception, when: Any = None) -> Any:
    real = {name: trigger.client(name) for name in ("ssm", "autoscaling", "sns")}
    real[service] = Unanswered(real[service], method, error, when)
    return lambda_trigger.clients.Clients(**real)


def read_timeout() -> Exception:
    return ReadTimeoutError(endpoint_url="https://ssm.us-east-1.amazonaws.com/")


def sqs_batch(*events: dict[str, Any]) -> dict[str, Any]:
    """An SQS batch whose bodies are these EventBridge events (Lambda's SQS event shape)."""
    return {
        "Records": [
            {
                "messageId": str(uuid.uuid4()),
                "receiptHandle": "AQEB" + uuid.uuid4().hex,
                "body": json.dumps(event),
                "attributes": {},
                "messageAttributes": {},
                "eventSource": "aws:sqs",
                "eventSourceARN": f"arn:aws:sqs:{REGION}:{ACCOUNT}:trigger",
                "awsRegion": REGION,
            }
            for event in events
        ]
    }


def test_read_timeout_after_send_command_is_still_sent_and_never_raises(trigger: Trigger) -> None:
    with scoreboard.scenario("Trigger Lambda: GetCommandInvocation read timeout after SendCommand") as row:
        row.faults = "ReadTimeoutError on the delivery check"
        event = managed_event()
        clients = clients_with(trigger, "ssm", "get_command_invocation", read_timeout())
        settings = trigger.module.Settings.from_env(os.environ)

        [result] = trigger.module.handle(event, LambdaContext(), settings=settings, clients=clients)[
            "results"
        ]

        assert result["status"] == "sent" and result["delivery"] is None
        assert len(trigger.commands(event["detail"]["EC2InstanceId"])) == 1
        row.outcome = "command sent once, reported as sent; no exception, no retry that could resend"


def test_connection_error_on_abandon_and_publish_never_raises(trigger: Trigger) -> None:
    trigger.env(ON_UNREACHABLE="complete")
    error = EndpointConnectionError(endpoint_url="https://autoscaling.us-east-1.amazonaws.com/")
    real = {name: trigger.client(name) for name in ("ssm", "autoscaling", "sns")}
    clients = lambda_trigger.clients.Clients(
        ssm=real["ssm"],
        autoscaling=Unanswered(real["autoscaling"], "complete_lifecycle_action", error),
        sns=Unanswered(real["sns"], "publish", error),
    )
    settings = trigger.module.Settings.from_env(os.environ)

    [result] = trigger.module.handle(
        managed_event(hook="-x"), LambdaContext(), settings=settings, clients=clients
    )["results"]

    assert result["status"] == "unreachable" and result["lifecycle_result"] is None
    assert result["lifecycle_error"].startswith("EndpointConnectionError")
    assert result["notify_error"].startswith("EndpointConnectionError")


def test_sqs_batch_reports_only_the_failed_record(trigger: Trigger) -> None:
    with scoreboard.scenario("Trigger Lambda: SQS batch of 3, one record's SSM call unanswered") as row:
        good1, bad, good2 = managed_event(), managed_event(), managed_event()
        bad_id = bad["detail"]["EC2InstanceId"]
        row.faults = "EndpointConnectionError on DescribeInstanceInformation for record 2"
        clients = clients_with(
            trigger,
            "ssm",
            "describe_instance_information",
            EndpointConnectionError(endpoint_url="https://ssm.us-east-1.amazonaws.com/"),
            when=lambda kwargs: kwargs["Filters"][0]["Values"] == [bad_id],
        )
        batch = sqs_batch(good1, bad, good2)
        settings = trigger.module.Settings.from_env(os.environ)

        response = trigger.module.handle(batch, LambdaContext(), settings=settings, clients=clients)

        assert response["batchItemFailures"] == [{"itemIdentifier": batch["Records"][1]["messageId"]}]
        assert [r["status"] for r in response["results"]] == ["sent", "error", "sent"]
        for event in (good1, good2):
            assert len(trigger.commands(event["detail"]["EC2InstanceId"])) == 1
        assert trigger.commands(bad_id) == []
        row.outcome = "records 1 and 3 sent once; only record 2 returned in batchItemFailures"


def test_sqs_batch_without_failures_returns_an_empty_list(trigger: Trigger) -> None:
    response = trigger.module.handler(sqs_batch(managed_event()), LambdaContext())
    assert response["batchItemFailures"] == []
    assert [r["status"] for r in response["results"]] == ["sent"]
