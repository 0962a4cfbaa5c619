"""lambda_trigger.command_status against moto with the SSM stand-in: a Run Command of the
backup document that fails, times out, is cancelled or never arrives is reported on SNS,
once, with a hint; successes and other documents are not.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from support import scoreboard

import lambda_trigger.clients
from instance_agent.local import ssm
from instance_agent.local.moto_server import MotoServer
from lambda_trigger import command_status
from lambda_trigger.exceptions import ConfigurationError

REGION = "us-east-1"
ACCOUNT = "123456789012"
EVENTS = Path(__file__).resolve().parent / "fixtures" / "events"
DOCUMENT = Path(__file__).resolve().parents[1] / "packaging" / "ssm-document.yaml"


@dataclass
class Reporter:
    moto: MotoServer
    document: str
    topic_arn: str
    capsys: pytest.CaptureFixture[str]

    def ssm(self) -> Any:
        return boto3.client("ssm", region_name=REGION, endpoint_url=self.moto.endpoint)

    def failed_command(
        self, status: str = "Failed", response_code: int = 1, stderr: str = "", stdout: str = ""
    ) -> tuple[str, str]:
        """A backup command sent to a managed instance and finished with `status`."""
        instance_id = "i-" + uuid.uuid4().hex[:17]
        ssm.register(instance_id, account_id=ACCOUNT, region=REGION)
        command_id = self.ssm().send_command(
            DocumentName=self.document,
            InstanceIds=[instance_id],
            Parameters={"LifecycleActionToken": [str(uuid.uuid4())], "LifecycleHookName": ["hook"]},
        )["Command"]["CommandId"]
        ssm.finish(
            command_id,
            instance_id,
            status,
            response_code=response_code,
            stderr=stderr,
            stdout=stdout,
            account_id=ACCOUNT,
            region=REGION,
        )
        return command_id, instance_id

    def invoke(self, event: object) -> dict[str, Any]:
        result: dict[str, Any] = command_status.handler(event, None)
        return result

    def sns(self) -> list[dict[str, Any]]:
        return self.moto.sns_messages(self.topic_arn, ACCOUNT, REGION)

    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.capsys.readouterr().out.splitlines() if line]


@pytest.fixture
def reporter(
    moto: MotoServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Reporter]:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)
    ssm.install()
    ssm.reset()
    suffix = uuid.uuid4().hex[:10]
    document = f"instance-agent-backup-{suffix}"
    boto3.client("ssm", region_name=REGION, endpoint_url=moto.endpoint).create_document(
        Name=document, Content=DOCUMENT.read_text(), DocumentType="Command", DocumentFormat="YAML"
    )
    topic = boto3.client("sns", region_name=REGION, endpoint_url=moto.endpoint).create_topic(
        Name=f"status-{suffix}"
    )["TopicArn"]
    monkeypatch.setenv("DOCUMENT_NAME", document)
    monkeypatch.setenv("TOPIC_ARN", topic)
    lambda_trigger.clients.use_clients(None)  # a fresh container: clients for this endpoint
    yield Reporter(moto, document, topic, capsys)
    lambda_trigger.clients.use_clients(None)
    ssm.reset()


def status_event(command_id: str, instance_id: str, document: str, status: str) -> dict[str, Any]:
    """AWS's sample invocation status event, for this invocation."""
    event: dict[str, Any] = json.loads((EVENTS / "ssm-command-invocation-status.awsdocs.json").read_text())
    event["detail"].update(
        {"command-id": command_id, "instance-id": instance_id, "document-name": document, "status": status}
    )
    return event


def test_failed_invocation_is_one_sns_message_naming_instance_status_and_cause(reporter: Reporter) -> None:
    command_id, instance_id = reporter.failed_command(
        "Failed", response_code=127, stderr="sh: instance-agent: command not found\n"
    )

    result = reporter.invoke(status_event(command_id, instance_id, reporter.document, "Failed"))

    assert result["status"] == "reported" and result["notify_error"] is None
    [message] = reporter.sns()
    body = json.loads(message["message"])
    assert (body["instance_id"], body["command_id"], body["status"]) == (instance_id, command_id, "Failed")
    assert body["response_code"] == 127 and "not installed" in body["hint"]
    assert body["stderr_tail"] == "sh: instance-agent: command not found"
    assert instance_id in message["subject"] and "Failed" in message["subject"]
    assert message["message_attributes"]["status"]["Value"] == "Failed"


@pytest.mark.parametrize(
    ("status", "details", "words"),
    [
        # StatusDetails as GetCommandInvocation returns them (no spaces); an undeliverable
        # invocation's Status is Failed, as CommandInvocationStatus has no Undeliverable.
        ("TimedOut", "ExecutionTimedOut", "executionTimeout"),
        ("TimedOut", "DeliveryTimedOut", "did not pick the command up"),
        ("Cancelled", "Cancelled", "cancelled"),
        ("Failed", "Undeliverable", "could not be delivered"),
    ],
)
def test_each_unsuccessful_status_is_reported_with_its_hint(
    reporter: Reporter, status: str, details: str, words: str
) -> None:
    command_id, instance_id = reporter.failed_command(status, response_code=-1)
    ssm.finish(
        command_id,
        instance_id,
        status,
        response_code=-1,
        status_details=details,
        account_id=ACCOUNT,
        region=REGION,
    )

    reporter.invoke(status_event(command_id, instance_id, reporter.document, status))

    [message] = reporter.sns()
    body = json.loads(message["message"])
    assert body["status"] == status and body["status_details"] == details
    assert words in body["hint"] and body["response_code"] is None


def test_without_invocation_details_the_status_alone_gives_the_hint(reporter: Reporter) -> None:
    command_id, instance_id = reporter.failed_command("Failed", response_code=2)
    ssm.inject_error(
        "GetCommandInvocation", "AccessDeniedException", "not authorized", account_id=ACCOUNT, region=REGION
    )

    reporter.invoke(status_event(command_id, instance_id, reporter.document, "Failed"))

    [message] = reporter.sns()
    body = json.loads(message["message"])
    assert body["hint"] == "the command failed" and body["response_code"] is None
    assert body["details_error"].startswith("AccessDeniedException")


def test_success_is_not_reported(reporter: Reporter) -> None:
    command_id, instance_id = reporter.failed_command("Success", response_code=0)

    result = reporter.invoke(status_event(command_id, instance_id, reporter.document, "Success"))

    assert result == {"status": "ignored", "reason": "status Success"}
    assert reporter.sns() == []
    [line] = reporter.logs()
    assert line["message"] == "event ignored"


def test_another_documents_failure_is_not_reported(reporter: Reporter) -> None:
    command_id, instance_id = reporter.failed_command("Failed", response_code=1)

    result = reporter.invoke(status_event(command_id, instance_id, "AWS-RunShellScript", "Failed"))

    assert result == {"status": "ignored", "reason": "another document"}
    assert reporter.sns() == []


@pytest.mark.parametrize(
    "event",
    [
        "not an object",
        {"source": "aws.autoscaling", "detail-type": "EC2 Command Invocation Status-change Notification"},
        {
            "source": "aws.ssm",
            "detail-type": "EC2 Command Invocation Status-change Notification",
            "detail": {
                "command-id": "x",
                "instance-id": "i-0123456789abcdef0",
                "document-name": "d",
                "status": "Failed",
            },
        },
    ],
)
def test_malformed_events_cost_one_error_line_and_no_message(reporter: Reporter, event: object) -> None:
    result = reporter.invoke(event)

    assert result["status"] == "malformed"
    assert reporter.sns() == []
    [line] = reporter.logs()
    assert line["level"] == "ERROR" and line["reason"] == result["reason"]


def test_missing_topic_is_a_configuration_error(reporter: Reporter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOPIC_ARN")
    with pytest.raises(ConfigurationError, match="TOPIC_ARN is not set"):
        reporter.invoke(status_event(str(uuid.uuid4()), "i-0123456789abcdef0", reporter.document, "Failed"))


def agent_result(status: str, lifecycle_result: str) -> str:
    """What `instance-agent backup --json` prints: its one result object, after any log noise."""
    return "starting\n" + json.dumps(
        {
            "status": status,
            "instance_id": "i-0123456789abcdef0",
            "bucket": "logs",
            "key": "backups/x.tar.zst",
            "manifest_key": "backups/x.tar.zst.manifest.json",
            "lifecycle_result": lifecycle_result,
            "error": None,
        }
    )


@pytest.mark.parametrize("status", ["Failed", "TimedOut", "Cancelled"])
def test_instance_gone_after_a_successful_backup_is_no_failure_report(
    reporter: Reporter, status: str
) -> None:
    with scoreboard.scenario(
        f"Command status Lambda: instance gone after CONTINUE, invocation {status}"
    ) as row:
        row.faults = f"invocation ends {status} after the agent printed succeeded + CONTINUE"
        command_id, instance_id = reporter.failed_command(
            status, response_code=-1, stdout=agent_result("succeeded", "CONTINUE")
        )

        result = reporter.invoke(status_event(command_id, instance_id, reporter.document, status))

        assert result["status"] == "ignored"
        assert result["checked"]["agent_result"] == "succeeded"
        assert result["checked"]["lifecycle_result"] == "CONTINUE"
        assert result["checked"]["manifest_key"] == "backups/x.tar.zst.manifest.json"
        assert reporter.sns() == []
        row.outcome = (
            "no SNS failure report; the log line says what was checked (recorded result, manifest key)"
        )


def test_a_recorded_failed_backup_is_still_reported(reporter: Reporter) -> None:
    command_id, instance_id = reporter.failed_command(
        "Failed", response_code=1, stdout=agent_result("failed", "ABANDON")
    )
    result = reporter.invoke(status_event(command_id, instance_id, reporter.document, "Failed"))
    assert result["status"] == "reported"
    assert len(reporter.sns()) == 1
