"""The push path end to end on the local AWS (issue 4, acceptance 4).

A real scale-in on the moto stand-in puts the instance in Terminating:Wait. Its terminate
lifecycle event invokes the Lambda handler, which sends one command. A test-side "SSM agent"
then does what the real one does with it: fills in defaults, checks every value against its
allowedPattern (Go semantics), substitutes `{{ Name }}` literally, with no extra quoting,
and runs the script with bash. The script runs the installed `instance-agent`, configured
only by an agent.toml, as on an instance: it backs up to S3, reports on SNS and completes
the lifecycle action.
"""

from __future__ import annotations

import importlib
import io
import json
import re
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
import zstandard
from conftest import ACCOUNT, REGION, Stack
from support.events import sample
from support.lambda_context import LambdaContext

import lambda_trigger.handler
from instance_agent.local import autoscaling, ssm

DOCUMENT = Path(__file__).resolve().parents[1] / "packaging" / "ssm-document.yaml"
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9]+)\s*\}\}")
INSTALLED_ELSEWHERE = Path("/opt/instance-agent/bin/instance-agent")  # the document's PATH entry


@pytest.fixture(autouse=True)
def fake_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def render_like_the_ssm_agent(client: Any, command: ssm.SentCommand) -> tuple[str, int]:
    """The script and timeout the SSM agent would run for `command`."""
    content = client.get_document(Name=command.document, DocumentFormat="YAML")["Content"]
    doc = yaml.safe_load(content)
    values: dict[str, str] = {}
    for name, spec in doc["parameters"].items():
        given = command.parameters.get(name)
        value = given[0] if given else str(spec["default"])
        assert ssm.compile_pattern(spec["allowedPattern"], "go").search(value), (name, value)
        values[name] = value
    [step] = doc["mainSteps"]

    def substitute(text: str) -> str:
        return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)

    script = "\n".join(substitute(line) for line in step["inputs"]["runCommand"]) + "\n"
    return script, int(substitute(step["inputs"]["timeoutSeconds"]))


def make_source(root: Path) -> dict[str, bytes]:
    files = {
        "app.log": b"".join(b"%06d request served\n" % i for i in range(20000)),
        "nested/deeper/state.json": json.dumps({"ok": True}).encode(),
        "binary.bin": bytes(range(256)) * 64,
        "empty": b"",
        "ünïcode name.txt": "naïve café\n".encode(),
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def extract(archive: bytes) -> dict[str, bytes]:
    """Regular files of a tar.zst, by archive name, with Python's tarfile and zstandard."""
    out: dict[str, bytes] = {}
    with (
        zstandard.ZstdDecompressor().stream_reader(io.BytesIO(archive)) as raw,
        tarfile.open(fileobj=raw, mode="r|") as tar,
    ):
        for member in tar:
            if member.isfile():
                handle = tar.extractfile(member)
                assert handle is not None
                out[member.name] = handle.read()
    return out


def test_push_path_end_to_end(stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if INSTALLED_ELSEWHERE.exists():
        pytest.skip(f"{INSTALLED_ELSEWHERE} would shadow the agent under test")
    agent = Path(sys.executable).parent / "instance-agent"
    assert agent.exists(), "pip install -e . provides the instance-agent entry point"
    ssm.install()
    ssm_client = stack.client("ssm")
    document = f"instance-agent-backup-{uuid.uuid4().hex[:10]}"
    ssm_client.create_document(
        Name=document, Content=DOCUMENT.read_text(), DocumentType="Command", DocumentFormat="YAML"
    )
    ssm.register(stack.instance_id, account_id=ACCOUNT, region=REGION)

    # A real scale-in: the instance waits in Terminating:Wait for its hook.
    stack.scale_in()
    assert stack.state() == "Terminating:Wait"
    [action] = [a for a in autoscaling.active_actions(ACCOUNT, REGION) if a.instance_id == stack.instance_id]
    event = sample("asg-eb-terminate-lifecycle-action.awsdocs-2023.json")
    event["region"] = REGION
    event["detail"].update(
        LifecycleActionToken=action.token,
        AutoScalingGroupName=stack.group,
        LifecycleHookName=stack.hook,
        EC2InstanceId=stack.instance_id,
    )

    # The Lambda, in a fresh container, against the local AWS.
    monkeypatch.setenv("AWS_ENDPOINT_URL", stack.moto.endpoint)
    monkeypatch.setenv("DOCUMENT_NAME", document)
    monkeypatch.setenv("TOPIC_ARN", stack.topic_arn)
    handler = importlib.reload(lambda_trigger.handler)
    [sent] = handler.handler(event, LambdaContext())["results"]

    assert sent["status"] == "sent"
    [command] = [c for c in ssm.sent_commands(ACCOUNT, REGION) if c.document == document]
    assert command.instance_ids == (stack.instance_id,)
    assert command.command_id == sent["command_id"]

    # The SSM agent's part, on "the instance".
    source = tmp_path / "src"
    files = make_source(source)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'bucket = "{stack.bucket}"\n'
        f'topic_arn = "{stack.topic_arn}"\n'
        f'source = ["{source}"]\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        f'runtime_dir = "{tmp_path / "run"}"\n'
        "journal = false\n"
    )
    script, timeout = render_like_the_ssm_agent(ssm_client, command)
    (tmp_path / "_script.sh").write_text(script)
    env = stack.script_env(agent.parent, config)
    proc = subprocess.run(
        ["bash", str(tmp_path / "_script.sh")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=min(timeout, 300),
        check=False,
    )
    ssm.finish(
        command.command_id,
        stack.instance_id,
        "Success" if proc.returncode == 0 else "Failed",
        response_code=proc.returncode,
        stdout=proc.stdout,
        stderr=proc.stderr,
        account_id=ACCOUNT,
        region=REGION,
    )

    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["status"] == "succeeded"
    assert (result["group"], result["hook"]) == (stack.group, stack.hook)
    assert result["lifecycle_result"] == "CONTINUE"

    # The archive is there and gives back every file byte for byte.
    archive = stack.client("s3").get_object(Bucket=stack.bucket, Key=result["key"])["Body"].read()
    restored = extract(archive)
    prefix = str(source).lstrip("/") + "/"
    assert restored == {prefix + rel: data for rel, data in files.items()}

    # One report, and the hook completed once, with CONTINUE, by this action's token.
    [message] = stack.sns()
    assert json.loads(message["message"])["key"] == result["key"]
    [completion] = stack.lifecycle_calls(autoscaling.COMPLETE)
    assert (completion.result, completion.token, completion.outcome) == ("CONTINUE", action.token, "ok")
    assert [(o.result, o.how) for o in stack.outcomes()] == [("CONTINUE", "completed")]
    assert stack.state() is None  # terminated and gone from the group

    # What an operator sees in SSM afterwards.
    invocation = ssm_client.get_command_invocation(CommandId=command.command_id, InstanceId=stack.instance_id)
    assert invocation["Status"] == "Success"
    assert json.loads(invocation["StandardOutputContent"])["key"] == result["key"]
