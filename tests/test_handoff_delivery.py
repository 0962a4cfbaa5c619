"""State hand-off delivery end to end (issue 22): the trigger Lambda tells a running peer.

A group of three instances on the stand-in, each peer running its watcher: the stack's
instance scales in and writes its hand-off (200 spool files) while Auto Scaling holds it in
Terminating:Wait (a post-command holds it there until the test has delivered, as the full
backup would on AWS); S3's "Object Created" event for the manifest, in AWS's own shape,
invokes the Lambda handler; the handler sends the adopt document to one peer, and that
peer's SSM agent (local.ssm_agent) runs the rendered script: the installed `instance-agent
adopt`, configured only by the peer's agent.toml, as on an instance. Then the fallbacks: a
watcher's scan with no Lambda, and a replacement's launch gate waiting (--handoff-wait).
What test_handoff_e2e covers (racing `adopt` processes, a receiver killed after its claim,
tampering) is not repeated.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import ACCOUNT, AGENT, REGION, Stack
from support.agentproc import WatchProc, watch_argv
from support.events import sample
from support.lambda_context import LambdaContext
from support.trees import walk
from test_handoff_e2e import adopted_at_launch, markers, restored, scale_in_with_handoff, spool

import lambda_trigger.handler
from instance_agent.local import launching, ssm, ssm_agent
from instance_agent.local.imds import IMDSStub

ADOPT_DOCUMENT = Path(__file__).resolve().parents[1] / "packaging" / "ssm-adopt-document.yaml"
INSTALLED_ELSEWHERE = Path("/opt/instance-agent/bin/instance-agent")  # the document's PATH entry
AGENT_BIN = Path(sys.executable).parent


@dataclass
class Fleet:
    stack: Stack
    peers: list[str]
    document: str
    ran: Path  # every handoff_command run appends its instance id here
    envs: dict[str, dict[str, str]]  # each peer's environment, as its agent runs commands

    def agent(self, peer: str, *args: str) -> subprocess.CompletedProcess[str]:
        """`instance-agent ARGS` on `peer`, as an operator there would run it."""
        return subprocess.run(
            ["instance-agent", *args],
            env=self.envs[peer],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def metric(self, name: str) -> float:
        """The sum of `name` for the group over the last hour (0 when absent)."""
        now = datetime.now(timezone.utc)
        points = self.stack.client("cloudwatch").get_metric_statistics(
            Namespace="InstanceAgent",
            MetricName=name,
            Dimensions=[{"Name": "AutoScalingGroupName", "Value": self.stack.group}],
            StartTime=now - timedelta(hours=1),
            EndTime=now + timedelta(minutes=5),
            Period=3600,
            Statistics=["Sum"],
        )["Datapoints"]
        return float(sum(p["Sum"] for p in points))

    def inbox(self, peer: str) -> Path:
        return self.stack.tmp / "peers" / peer / "inbox"

    def deliver(self, key: str) -> dict[str, Any]:
        """S3's event for the hand-off's manifest, through the Lambda handler."""
        event = sample("s3-eb-object-created.awsdocs-2021.json")
        event.update(region=REGION, resources=[f"arn:aws:s3:::{self.stack.bucket}"])
        event["detail"]["bucket"]["name"] = self.stack.bucket
        event["detail"]["object"]["key"] = key + ".manifest.json"
        [result] = lambda_trigger.handler.handler(event, LambdaContext())["results"]
        assert isinstance(result, dict)
        return result

    def online(self, peer: str, online: bool) -> None:
        ssm.set_online(peer, online, account_id=ACCOUNT, region=REGION)

    def invocation(self, command_id: str, peer: str) -> dict[str, Any]:
        found: dict[str, Any] = self.stack.client("ssm").get_command_invocation(
            CommandId=command_id, InstanceId=peer
        )
        return found


def agent_of(
    stack: Stack, peer: str, ran: Path, envs: dict[str, dict[str, str]]
) -> Callable[[str, int], tuple[int, str, str]]:
    """How `peer` runs a script: its own identity, agent.toml and inbox; the agent under test
    on PATH where the document expects /opt/instance-agent/bin."""
    home = stack.tmp / "peers" / peer
    home.mkdir(parents=True)
    config = home / "agent.toml"
    command = f'echo {peer} >> {ran}; test -d "$INSTANCE_AGENT_HANDOFF_INBOX"'
    config.write_text(
        f'bucket = "{stack.bucket}"\n'
        f'topic_arn = "{stack.topic_arn}"\n'
        f'state_dir = "{home / "state"}"\n'
        f'runtime_dir = "{home / "run"}"\n'
        f'handoff_inbox = "{home / "inbox"}"\n'
        f"handoff_command = {json.dumps(command)}\n"
        f'instance_id = "{peer}"\n'
        f'region = "{REGION}"\n'
        f'handoff_path = ["{stack.tmp / "srv" / "spool"}"]\n'
        # The watcher's scan is on, but slower than a test: here the push path delivers.
        "handoff_scan_interval = 3600\n"
        "journal = false\n"
    )
    env = stack.script_env(AGENT_BIN, config, INSTANCE_AGENT_LOG_FORMAT="json")
    envs[peer] = env

    def run(script: str, timeout: int) -> tuple[int, str, str]:
        proc = subprocess.run(
            ["bash", "-c", script],
            env=env,
            cwd=home,
            capture_output=True,
            text=True,
            timeout=min(timeout, 120),
            check=False,
        )
        return proc.returncode, proc.stdout, proc.stderr

    return run


@pytest.fixture
def fleet(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    if INSTALLED_ELSEWHERE.exists():
        pytest.skip(f"{INSTALLED_ELSEWHERE} would shadow the agent under test")
    ssm.install()
    asg = stack.client("autoscaling")
    asg.update_auto_scaling_group(AutoScalingGroupName=stack.group, MaxSize=3, DesiredCapacity=3)
    [group] = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[stack.group])["AutoScalingGroups"]
    peers = sorted(i["InstanceId"] for i in group["Instances"] if i["InstanceId"] != stack.instance_id)
    assert len(peers) == 2
    document = f"instance-agent-adopt-{uuid.uuid4().hex[:10]}"
    stack.client("ssm").create_document(
        Name=document, Content=ADOPT_DOCUMENT.read_text(), DocumentType="Command", DocumentFormat="YAML"
    )
    ran, envs = stack.tmp / "ran", {}
    for instance in (stack.instance_id, *peers):
        ssm.register(instance, account_id=ACCOUNT, region=REGION)
    for peer in peers:
        ssm_agent.attach(peer, agent_of(stack, peer, ran, envs))
    with contextlib.ExitStack() as running:
        # Each peer runs its watcher, with an IMDS of its own that says InService.
        watchers = []
        for peer in peers:
            imds = IMDSStub()
            imds.start()
            running.callback(imds.stop)
            imds.instance_id, imds.region, imds.target_lifecycle_state = peer, REGION, "InService"
            envs[peer]["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = imds.endpoint
            watcher = running.enter_context(
                WatchProc([*AGENT, "watch", "--poll-interval", "0.5"], envs[peer])
            )
            running.callback(_stop, watcher)
            watchers.append(watcher)
        for watcher in watchers:
            watcher.wait_for("watching")
        yield from _with_lambda(stack, peers, document, ran, envs, monkeypatch)


def _stop(watcher: WatchProc) -> None:
    watcher.send(signal.SIGTERM)
    assert watcher.wait(30) == 0, watcher.text()


def _with_lambda(
    stack: Stack,
    peers: list[str],
    document: str,
    ran: Path,
    envs: dict[str, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Fleet]:
    # The Lambda, in a fresh container, against the local AWS.
    monkeypatch.setenv("AWS_ENDPOINT_URL", stack.moto.endpoint)
    monkeypatch.setenv("DOCUMENT_NAME", "instance-agent-backup-unused")
    monkeypatch.setenv("HANDOFF_DOCUMENT_NAME", document)
    monkeypatch.setenv("TOPIC_ARN", stack.topic_arn)
    importlib.reload(lambda_trigger.handler).use_clients(None)
    yield Fleet(stack, peers, document, ran, envs)
    for peer in peers:
        ssm_agent.detach(peer)
    assert ssm_agent.wait_idle(120)


def scale_in_held(fleet: Fleet) -> tuple[subprocess.Popen[str], Path, str, Path]:
    """The sender's termination job, held in its post-command (so in Terminating:Wait)
    until the test touches the release file; the spool, the hand-off key, the release file."""
    stack = fleet.stack
    state = spool(stack.tmp / "srv" / "spool")
    logs = stack.tmp / "logs"
    logs.mkdir()
    (logs / "app.log").write_text("bye\n")
    release = stack.tmp / "release"
    hold = f"while [ ! -e {release} ]; do sleep 0.05; done"
    stack.scale_in()
    sender = subprocess.Popen(
        stack.backup_argv(
            "--source",
            str(logs),
            "--handoff-path",
            str(state),
            "--post-command",
            hold,
            "--command-timeout",
            "120",
        ),
        env=stack.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    prefix = f"{stack.group}/handoff/{stack.instance_id}/"
    deadline = time.monotonic() + 120
    while True:
        done = [k for k in stack.objects() if k.startswith(prefix) and k.endswith(".tar.zst.manifest.json")]
        if done:
            break
        assert sender.poll() is None, sender.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no hand-off manifest"
        time.sleep(0.05)
    assert stack.state() == "Terminating:Wait"
    return sender, state, done[0].removesuffix(".manifest.json"), release


def finish_sender(sender: subprocess.Popen[str], release: Path) -> dict[str, Any]:
    release.touch()
    stdout, stderr = sender.communicate(timeout=120)
    assert sender.returncode == 0, stderr[-3000:]
    result: dict[str, Any] = json.loads(stdout)
    return result


def adoptions(fleet: Fleet) -> list[dict[str, Any]]:
    reports = [json.loads(m["message"]) for m in fleet.stack.sns()]
    return [r for r in reports if r.get("event") == "handoff_adopted"]


def test_a_peer_told_by_the_lambda_adopts_the_spool_once(fleet: Fleet) -> None:
    stack = fleet.stack
    sender, state, key, release = scale_in_held(fleet)
    sent = fleet.deliver(key)
    assert sent["status"] == "sent" and sent["key"] == key and sent["group"] == stack.group
    receiver = sent["receiver"]
    assert receiver in fleet.peers  # an InService peer, never the sender
    assert ssm_agent.wait_idle(120)
    result = finish_sender(sender, release)
    assert result["handoff_key"] == key and result["lifecycle_result"] == "CONTINUE"

    invocation = fleet.invocation(sent["command_id"], receiver)
    assert invocation["Status"] == "Success", invocation["StandardErrorContent"][-3000:]
    out = json.loads(invocation["StandardOutputContent"])
    assert (out["status"], out["files"], out["adopter"]) == ("adopted", 200, receiver)
    # The 200 files, byte for byte, in the receiver's inbox only; its command ran once.
    assert restored(fleet.inbox(receiver), stack.instance_id, state) == walk(state)
    [other] = set(fleet.peers) - {receiver}
    assert not fleet.inbox(other).exists()
    assert fleet.ran.read_text().splitlines() == [receiver]
    assert markers(stack, key, ".adopted") == [key + ".adopted"]
    # The SNS report names the key and the adopter.
    [report] = adoptions(fleet)
    assert (report["key"], report["adopter"], report["source"]) == (key, receiver, stack.instance_id)

    # What the operator sees: the receiver's `status` names its last adoption; the group's
    # metrics count one hand-off sent and one adopted.
    proc = fleet.agent(receiver, "status", "--json")
    assert json.loads(proc.stdout)["running"] is True  # its watcher ran all along
    adoption = json.loads(proc.stdout)["last_adoption"]
    assert (adoption["key"], adoption["source"], adoption["files"]) == (key, stack.instance_id, 200)
    assert "last hand-off adopted at " in fleet.agent(receiver, "status").stdout
    assert json.loads(fleet.agent(other, "status", "--json").stdout)["last_adoption"] is None
    assert (fleet.metric("HandoffsSent"), fleet.metric("HandoffsAdopted")) == (1, 1)


def test_both_peers_told_at_once_adopt_once(fleet: Fleet) -> None:
    stack = fleet.stack
    sender, state, key, release = scale_in_held(fleet)
    first, second = fleet.peers
    # The Lambda delivers twice (EventBridge is at least once), and each time SSM saw a
    # different peer Online: both are told, within milliseconds of each other.
    fleet.online(second, False)
    one = fleet.deliver(key)
    fleet.online(second, True)
    fleet.online(first, False)
    two = fleet.deliver(key)
    fleet.online(first, True)
    assert (one["receiver"], two["receiver"]) == (first, second)
    assert ssm_agent.wait_idle(120)
    finish_sender(sender, release)

    outs = {}
    for sent in (one, two):
        invocation = fleet.invocation(sent["command_id"], sent["receiver"])
        assert invocation["Status"] == "Success", invocation["StandardErrorContent"][-3000:]
        outs[sent["receiver"]] = json.loads(invocation["StandardOutputContent"])["status"]
    assert sorted(outs.values()) in (["adopted", "claimed-elsewhere"], ["adopted", "already-adopted"])
    (winner,) = [p for p, status in outs.items() if status == "adopted"]
    assert fleet.ran.read_text().splitlines() == [winner]  # one handoff_command
    assert restored(fleet.inbox(winner), stack.instance_id, state) == walk(state)
    [loser] = set(fleet.peers) - {winner}
    assert not fleet.inbox(loser).exists()
    assert markers(stack, key, ".claim.") == [key + ".claim.000001"]
    assert [(r["key"], r["adopter"]) for r in adoptions(fleet)] == [(key, winner)]


def test_without_the_lambda_a_running_watchers_scan_adopts_it(stack: Stack, tmp_path: Path) -> None:
    peer = stack.second_instance()
    state, result = scale_in_with_handoff(stack, tmp_path)  # no Lambda: nobody is told
    key = result["handoff_key"]

    # The peer's watcher: its own IMDS (it stays InService), a scan every second.
    peer_imds = IMDSStub()
    peer_imds.start()
    try:
        peer_imds.instance_id, peer_imds.region = peer, REGION
        peer_imds.target_lifecycle_state = "InService"
        home, ran = tmp_path / "peer", tmp_path / "ran"
        env = stack.env(
            AWS_EC2_METADATA_SERVICE_ENDPOINT=peer_imds.endpoint,
            INSTANCE_AGENT_STATE_DIR=str(home / "state"),
            INSTANCE_AGENT_RUNTIME_DIR=str(home / "run"),
            INSTANCE_AGENT_HANDOFF_PATH=str(state),
            INSTANCE_AGENT_HANDOFF_INBOX=str(home / "inbox"),
            INSTANCE_AGENT_HANDOFF_COMMAND=f'echo "$INSTANCE_AGENT_HANDOFF_KEY" >> {ran}',
            INSTANCE_AGENT_HANDOFF_SCAN_INTERVAL="1",
            INSTANCE_AGENT_LOG_LEVEL="info",
        )
        with WatchProc(watch_argv(stack), env) as watcher:
            _, line = watcher.wait_for("hand-off scan", timeout=60, status="adopted")
            watcher.send(signal.SIGTERM)
            assert watcher.wait(30) == 0
    finally:
        peer_imds.stop()
    assert line["key"] == key
    assert restored(home / "inbox", stack.instance_id, state) == walk(state)
    assert ran.read_text().splitlines() == [key]
    reports = [json.loads(m["message"]) for m in stack.sns()]
    assert [(r["key"], r["adopter"]) for r in reports if r.get("event") == "handoff_adopted"] == [(key, peer)]
    # The scan saw it waiting first: the unclaimed age went out for the alarm.
    points = stack.group_metric("HandoffUnclaimedAgeSeconds", ["Maximum"])
    assert [p["Maximum"] > 0 for p in points] == [True]


def test_a_replacement_launched_before_the_handoff_waits_for_it_and_adopts_before_continue(
    stack: Stack, tmp_path: Path
) -> None:
    launching.install()
    new = stack.second_instance()
    hook = stack.launch_hook()
    # The sender is in Terminating:Wait and has not written its hand-off yet, as when Auto
    # Scaling launches the replacement at once.
    state = spool(tmp_path / "srv" / "spool")
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "app.log").write_text("bye\n")
    stack.scale_in()
    launching.begin_launch(stack.group, new, hook, account_id=ACCOUNT, region=REGION)

    new_imds = IMDSStub()
    new_imds.start()
    try:
        new_imds.instance_id, new_imds.region = new, REGION
        new_imds.target_lifecycle_state = "Pending"
        boot_id, ran, inbox = tmp_path / "boot_id", tmp_path / "ran", tmp_path / "inbox"
        boot_id.write_text(f"{uuid.uuid4()}\n")
        env = stack.adopter_env(
            new,
            state,
            inbox,
            ran,
            AWS_EC2_METADATA_SERVICE_ENDPOINT=new_imds.endpoint,
            INSTANCE_AGENT_STATE_DIR=str(tmp_path / "new-state"),
            INSTANCE_AGENT_RUNTIME_DIR=str(tmp_path / "new-run"),
        )
        argv = [*AGENT, "launch-gate", "--boot-id-file", str(boot_id), "--handoff-wait", "90"]
        with WatchProc(argv, env) as gate:
            # The gate finds nothing yet, and waits, since a peer is still terminating.
            gate.wait_for("waiting for a hand-off from a terminating instance", timeout=60)
            proc, result = stack.backup("--source", str(logs), "--handoff-path", str(state))
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert gate.wait(120) == 0, gate.text()
            gate.wait_for("launching lifecycle action: CONTINUE", timeout=5)
    finally:
        new_imds.stop()
    key = result["handoff_key"]
    adopted_at_launch(stack, new, hook, state, inbox, ran, key)
