"""The demo's three trigger paths: the watcher's detection in this process, the Lambda with
the SSM agent played by the demo, and `instance-agent watch` itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3

from instance_agent import config, termination
from instance_agent.errors import ConfigError
from instance_agent.imds import IMDS
from instance_agent.local import autoscaling
from instance_agent.local.demo_stand import REGION, Stand, say
from instance_agent.local.serve import stop_process, tail, wait_until
from instance_agent.wiring import make_clients, resolve_identity

DOCUMENT = "instance-agent-backup"
ROOT = Path(__file__).resolve().parents[2]  # the source checkout, for packaging/
WATCH_START_TIMEOUT = 30.0  # the watcher's first IMDS poll, Python start-up included
BACKUP_TIMEOUT = 300.0
WATCH_STOP_TIMEOUT = 30.0  # the backup is done by then: SIGTERM stops an idle watcher at once


def direct(stand: Stand) -> dict[str, Any]:
    stand.scale_in()
    client = IMDS()
    t0 = time.monotonic()
    state = client.get("autoscaling/target-lifecycle-state")
    client.close()
    say(
        f"detected via IMDSv2: target-lifecycle-state={state} "
        f"({(time.monotonic() - t0) * 1000:.0f} ms; token-less reads: {stand.imds.tokenless_reads})"
    )
    cfg = config.load({}, os.environ, config_file=str(stand.agent_toml))
    ident = resolve_identity(cfg)
    outcome = termination.run(
        cfg,
        ident,
        make_clients(cfg, ident.region),
        termination.Options(imds_state=state, progress_interval=5.0),
    )
    return outcome.result.to_json()


@dataclass
class _LambdaContext:
    aws_request_id: str

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


def _render_like_the_ssm_agent(document: dict[str, Any], parameters: dict[str, list[str]]) -> str:
    """The shell script the SSM agent would run: defaults filled in, every value checked
    against its allowedPattern (Go semantics), `{{ Name }}` replaced literally."""
    import re

    from instance_agent.local import ssm

    values: dict[str, str] = {}
    for name, spec in document["parameters"].items():
        given = parameters.get(name)
        value = given[0] if given else str(spec.get("default", ""))
        if not ssm.compile_pattern(str(spec["allowedPattern"]), "go").search(value):
            raise ConfigError(f"parameter {name}={value!r} fails its allowedPattern")
        values[name] = value
    [step] = document["mainSteps"]
    lines = step["inputs"]["runCommand"]
    return (
        "\n".join(
            re.sub(r"\{\{\s*([A-Za-z0-9]+)\s*\}\}", lambda m: values[m.group(1)], line) for line in lines
        )
        + "\n"
    )


def via_lambda(stand: Stand) -> dict[str, Any]:
    import lambda_trigger.handler as trigger
    from instance_agent.local import ssm

    doc_path = ROOT / "packaging" / "ssm-document.yaml"
    if not doc_path.is_file():
        raise ConfigError(f"--trigger lambda needs the source checkout ({doc_path} is missing)")
    ssm.install()
    ssm_client = boto3.client("ssm", region_name=REGION)
    ssm_client.create_document(
        Name=DOCUMENT,
        Content=doc_path.read_text(encoding="utf-8"),
        DocumentType="Command",
        DocumentFormat="YAML",
    )
    ssm.register(stand.instance_id)
    stand.scale_in()
    [action] = [a for a in autoscaling.active_actions() if a.instance_id == stand.instance_id]
    event = {
        "version": "0",
        "id": str(uuid.uuid4()),
        "source": "aws.autoscaling",
        "detail-type": "EC2 Instance-terminate Lifecycle Action",
        "account": "123456789012",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "region": REGION,
        "resources": [],
        "detail": {
            "LifecycleActionToken": action.token,
            "AutoScalingGroupName": stand.group,
            "LifecycleHookName": stand.hook,
            "EC2InstanceId": stand.instance_id,
            "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
        },
    }
    os.environ.update(DOCUMENT_NAME=DOCUMENT, TOPIC_ARN=stand.topic)
    [sent] = trigger.handler(event, _LambdaContext(str(uuid.uuid4())))["results"]
    say(
        f"Lambda trigger: {sent['status']} command {sent.get('command_id')} to "
        f"{stand.instance_id} (delivery {sent.get('delivery')})"
    )
    if sent["status"] != "sent":
        raise ConfigError(f"the Lambda trigger did not send the command: {sent}")
    [command] = [c for c in ssm.sent_commands() if c.command_id == sent["command_id"]]
    # As JSON: SSM converts the YAML it was given, and json needs no third-party parser.
    content = ssm_client.get_document(Name=DOCUMENT, DocumentFormat="JSON")["Content"]
    script = _render_like_the_ssm_agent(json.loads(content), command.parameters)
    # The document puts /opt/instance-agent/bin first; this Python's scripts come next, so
    # the agent under demonstration runs unless one is installed there.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    say("SSM agent (played by the demo): running the document's runCommand with bash")
    proc = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=BACKUP_TIMEOUT, check=False
    )
    ssm.finish(
        command.command_id,
        stand.instance_id,
        "Success" if proc.returncode == 0 else "Failed",
        response_code=proc.returncode,
        stdout=proc.stdout,
        stderr=proc.stderr,
    )
    if not proc.stdout.strip():
        raise ConfigError(f"`instance-agent backup` printed no result: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def via_watch(stand: Stand) -> dict[str, Any]:
    log_path = stand.tmp / "watch.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "instance_agent", "watch", "--poll-interval", "0.5"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        if (
            not wait_until(
                lambda: (
                    any(p.endswith("target-lifecycle-state") for _, p, _ in stand.imds.requests)
                    or proc.poll() is not None
                ),
                WATCH_START_TIMEOUT,
            )
            or proc.poll() is not None
        ):
            raise ConfigError(f"the watcher did not start polling: {tail(log_path)}")
        say(f"watcher (pid {proc.pid}) polls IMDSv2 every 0.5 s")
        stand.scale_in()
        if not wait_until(
            lambda: bool(backup_messages(stand)) or proc.poll() is not None, BACKUP_TIMEOUT
        ) or not backup_messages(stand):
            raise ConfigError(f"the watcher reported no backup: {tail(log_path)}")
    finally:
        stop_process(proc, WATCH_STOP_TIMEOUT)
    say(f"watcher stopped (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(backup_messages(stand)[0]["message"])
    return result


def backup_messages(stand: Stand) -> list[dict[str, Any]]:
    return [
        m
        for m in stand.moto.sns_messages(stand.topic)
        if str(m["subject"]).startswith("instance-agent: backup")
    ]
