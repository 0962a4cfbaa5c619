"""`instance-agent doctor` against the local stand-in (issue 7, acceptance 2), and the demo
that runs it: real subprocesses against SeaweedFS, moto and the IMDS stub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Stack
from support import scoreboard
from support.agentproc import watch
from support.faultproxy import FaultProxy, Hold, Rule, access_denied, query_error

ALWAYS_OK = (
    "config",
    "compression",
    "imds",
    "identity",
    "lifecycle hook",
    "lifecycle permission",
    "bucket",
    "s3 permissions",
    "topic",
)


def human(stack: Stack, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`doctor` with the stack's bucket and topic, never the host's agent.toml."""
    empty = stack.tmp / "agent.toml"
    empty.touch()
    return stack.run(
        "doctor",
        "--bucket",
        stack.bucket,
        "--topic-arn",
        stack.topic_arn,
        *args,
        env=stack.env(INSTANCE_AGENT_CONFIG=str(empty), **env),
        timeout=120,
    )


def doctor(stack: Stack, *args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`doctor --json`; (process, {check name: check})."""
    proc = human(stack, "--json", *args, **env)
    doc = json.loads(proc.stdout)
    assert doc["ok"] == (proc.returncode == 0)
    return proc, {c["name"]: c for c in doc["checks"]}


def line_and_fix(output: str, name: str) -> tuple[str, str]:
    lines = output.splitlines()
    [i] = [n for n, line in enumerate(lines) if line[2:].startswith(name + " ")]
    fix = lines[i + 1].strip() if i + 1 < len(lines) and lines[i + 1].strip().startswith("fix:") else ""
    return lines[i], fix


def test_all_checks_pass_on_a_correct_setup(stack: Stack) -> None:
    proc, checks = doctor(stack, "--publish-test")

    assert proc.returncode == 0, proc.stdout
    assert {name: checks[name]["result"] for name in ALWAYS_OK} == dict.fromkeys(ALWAYS_OK, "ok")
    # Not applicable off EC2, and it says why.
    for name in ("ssm agent", "systemd unit"):
        assert checks[name]["result"] == "skip"
        assert checks[name]["message"] == (
            f"not an EC2 instance: IMDS at {stack.imds.endpoint} is a stand-in"
        )
    assert (
        f"group {stack.group}, hook {stack.hook}, heartbeat timeout 300 s"
        in checks["lifecycle hook"]["message"]
    )
    assert checks["identity"]["message"].startswith(f"instance {stack.instance_id}, region us-east-1")

    # Harmless: the upload probe left nothing behind, the hook was not touched, and the one
    # message is the test message that was asked for.
    assert stack.objects() == {} and stack.incomplete_uploads() == []
    assert stack.state() == "InService" and stack.outcomes() == []
    assert [m["subject"] for m in stack.sns()] == [
        f"instance-agent doctor: test message from {stack.instance_id}"
    ]

    # The same, as a person reads it.
    out = human(stack).stdout
    assert line_and_fix(out, "s3 permissions")[0].startswith("✓ s3 permissions")
    assert line_and_fix(out, "topic")[0].startswith("– topic")
    assert "`instance-agent doctor --publish-test` sends one" in out
    assert out.rstrip().endswith("nothing is broken")


def test_bucket_missing(stack: Stack) -> None:
    # SeaweedFS creates a bucket on first write, so this check runs against moto's S3.
    proc, checks = doctor(stack, "--bucket", "no-such-bucket-here", AWS_ENDPOINT_URL_S3=stack.moto.endpoint)
    assert proc.returncode == 1
    assert checks["bucket"]["result"] == "fail"
    assert checks["bucket"]["message"] == "bucket no-such-bucket-here does not exist"
    assert checks["bucket"]["fix"].startswith("create it")
    assert checks["s3 permissions"]["result"] == "skip"
    out = human(stack, "--bucket", "no-such-bucket-here", AWS_ENDPOINT_URL_S3=stack.moto.endpoint)
    line, fix = line_and_fix(out.stdout, "bucket")
    assert line.startswith("✗ bucket") and fix.startswith("fix: create it")
    assert out.returncode == 1


def test_hook_missing(stack: Stack) -> None:
    stack.client("autoscaling").delete_lifecycle_hook(
        AutoScalingGroupName=stack.group, LifecycleHookName=stack.hook
    )
    proc, checks = doctor(stack)
    assert proc.returncode == 1
    hook = checks["lifecycle hook"]
    assert hook["result"] == "fail"
    assert hook["message"].startswith(f"group {stack.group} has no terminating lifecycle hook")
    assert hook["fix"].startswith(
        f"aws autoscaling put-lifecycle-hook --auto-scaling-group-name {stack.group}"
    )
    assert checks["lifecycle permission"]["result"] == "skip"
    line, fix = line_and_fix(human(stack).stdout, "lifecycle hook")
    assert line.startswith("✗ lifecycle hook") and "put-lifecycle-hook" in fix


def test_launch_gate_with_s3_black_holed_fails_within_a_minute(stack: Stack) -> None:
    with (
        scoreboard.scenario("doctor --launch: S3 black-holed (no answer at all)") as row,
        FaultProxy(stack.s3_endpoint) as proxy,
    ):
        hole = proxy.add_rule(Rule(fault=Hold()))
        started = time.monotonic()
        proc, checks = doctor(stack, "--launch", AWS_ENDPOINT_URL_S3=proxy.endpoint)
        took = time.monotonic() - started
        row.faults = f"{hole.hits} × S3 request unanswered"
        assert proc.returncode == 1
        assert checks["bucket"]["result"] == "fail"
        # A correctness bound, not a speed target: the launching hook waits at most 900 s,
        # and a slow boot has already spent part of it.
        assert took < 60, f"doctor --launch took {took:.0f} s"
        row.outcome = "bucket check fails (launch ABANDONed by the gate) within the bound, not after ~6 min"


def test_s3_write_denied(stack: Stack) -> None:
    with FaultProxy(stack.s3_endpoint) as proxy:
        proxy.add_rule(Rule(method="POST", query=lambda q: "uploads" in q, fault=access_denied()))
        proc, checks = doctor(stack, AWS_ENDPOINT_URL_S3=proxy.endpoint)
        out = human(stack, AWS_ENDPOINT_URL_S3=proxy.endpoint)
    assert proc.returncode == 1
    s3 = checks["s3 permissions"]
    assert s3["result"] == "fail" and "was denied (AccessDenied: Access Denied)" in s3["message"]
    assert s3["fix"].startswith(
        f"allow s3:PutObject and s3:AbortMultipartUpload on "
        f"arn:aws:s3:::{stack.bucket}/* in the instance role"
    )
    assert checks["bucket"]["result"] == "skip"
    line, fix = line_and_fix(out.stdout, "s3 permissions")
    assert line.startswith("✗ s3 permissions") and fix.startswith("fix: allow s3:PutObject")


def test_listing_uploads_denied(stack: Stack) -> None:
    with FaultProxy(stack.s3_endpoint) as proxy:
        proxy.add_rule(Rule(method="GET", query=lambda q: "uploads" in q, fault=access_denied()))
        proc, checks = doctor(stack, AWS_ENDPOINT_URL_S3=proxy.endpoint)
    assert proc.returncode == 1
    s3 = checks["s3 permissions"]
    assert s3["result"] == "fail" and "ListMultipartUploads was refused" in s3["message"]
    assert s3["fix"].startswith(f"allow s3:ListBucketMultipartUploads on arn:aws:s3:::{stack.bucket}")
    assert checks["bucket"]["result"] == "ok"
    assert stack.incomplete_uploads() == []  # the probe's upload was still aborted


def test_lifecycle_heartbeat_denied(stack: Stack) -> None:
    with FaultProxy(stack.moto.endpoint) as proxy:
        proxy.add_rule(
            Rule(
                api_action="RecordLifecycleActionHeartbeat",
                fault=query_error(
                    "AccessDenied",
                    "User is not authorized to perform: autoscaling:RecordLifecycleActionHeartbeat",
                    403,
                ),
            )
        )
        proc, checks = doctor(stack, AWS_ENDPOINT_URL=proxy.endpoint)
    assert proc.returncode == 1
    check = checks["lifecycle permission"]
    assert check["result"] == "fail" and "AccessDenied" in check["message"]
    assert check["fix"].startswith("allow autoscaling:RecordLifecycleActionHeartbeat")
    assert checks["lifecycle hook"]["result"] == "ok"


def test_imds_unreachable(stack: Stack) -> None:
    started = time.monotonic()
    proc, checks = doctor(stack, AWS_EC2_METADATA_SERVICE_ENDPOINT="http://127.0.0.1:9")
    assert time.monotonic() - started < 60
    assert proc.returncode == 1
    assert checks["imds"]["result"] == "fail"
    assert checks["imds"]["message"] == "IMDS at http://127.0.0.1:9 is unreachable (ConnectionError)"
    assert "modify-instance-metadata-options" in checks["imds"]["fix"]
    assert checks["identity"]["result"] == "fail"
    assert checks["lifecycle hook"]["result"] == "skip"
    line, fix = line_and_fix(
        human(stack, AWS_EC2_METADATA_SERVICE_ENDPOINT="http://127.0.0.1:9").stdout, "imds"
    )
    assert line.startswith("✗ imds") and "--http-endpoint enabled" in fix


def test_imds_answer_lost_points_at_the_hop_limit(stack: Stack) -> None:
    stack.imds.delay = 5.0  # connected, but no answer: what a hop limit of 1 does in a container
    proc, checks = doctor(stack, "--instance-id", stack.instance_id, "--region", "us-east-1")
    assert proc.returncode == 1
    assert "the response hop limit is too low" in checks["imds"]["message"]
    assert "--http-put-response-hop-limit 2" in checks["imds"]["fix"]
    # Identity from the config lets every other check run.
    assert checks["identity"]["result"] == "ok" and checks["s3 permissions"]["result"] == "ok"


def test_bad_config_is_a_failed_check(stack: Stack) -> None:
    empty = stack.tmp / "agent.toml"
    empty.touch()
    proc = stack.run("doctor", "--json", env=stack.env(INSTANCE_AGENT_CONFIG=str(empty)))
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert proc.returncode == 1
    assert checks["config"]["result"] == "fail"
    assert checks["config"]["message"].startswith("no bucket: pass --bucket")
    assert checks["bucket"]["result"] == "skip"
    assert checks["imds"]["result"] == "ok"  # the rest still runs


@pytest.mark.parametrize("trigger", ["lambda", "watch"])
def test_the_demo_runs_doctor_and_each_trigger_path(trigger: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "instance_agent", "demo", "--size-mib", "4", "--trigger", trigger],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "doctor, against the stand-in:" in out and "  nothing is broken" in out
    assert "✓ s3 permissions" in out and "✓ lifecycle hook" in out
    assert f"trigger path: {trigger}" in out
    if trigger == "lambda":
        assert "Lambda trigger: sent command" in out
        assert "running the document's runCommand with bash" in out
    else:
        assert "watcher stopped (exit 0)" in out
    assert "lifecycle action completed with CONTINUE" in out
    assert "identical to the source" in out
    assert out.count("SNS message (instance-agent: backup succeeded") == 1
    assert out.rstrip().splitlines()[-1].startswith("demo passed")


def test_demo_detach_keeps_a_stand_in_for_the_operator_commands(tmp_path: Path) -> None:
    env_file = tmp_path / "demo.env"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "instance_agent",
            "demo",
            "--size-mib",
            "2",
            "--detach",
            "--env-file",
            str(env_file),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    env: dict[str, str] = {}
    for line in env_file.read_text().splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = value.strip("'")
    pid = int(env["DEMO_PID"])
    try:
        run_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "INSTANCE_AGENT_"))}
        run_env.update(env)
        agent = [sys.executable, "-m", "instance_agent"]
        listed = subprocess.run(
            [*agent, "list"], env=run_env, capture_output=True, text=True, timeout=60, check=False
        )
        assert listed.returncode == 0, listed.stderr
        [row] = json.loads(listed.stdout)
        assert row["instance_id"] == env["DEMO_INSTANCE_ID"] and row["group"] == "demo-asg"
        checked = subprocess.run(
            [*agent, "doctor", "--publish-test"],
            env=run_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert checked.returncode == 0, checked.stdout
        assert "✗" not in checked.stdout and "✓ topic" in checked.stdout
    finally:
        os.kill(pid, 15)
    deadline = time.monotonic() + 30
    while env_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not env_file.exists()  # the stand-in removed it as it stopped


def _status_file(stack: Stack) -> Path:
    [path] = [
        p
        for p in (stack.tmp / "run" / "watch-status.json", stack.tmp / "state" / "watch-status.json")
        if p.exists()
    ]
    return path


def _shipping_state(stack: Stack) -> dict[str, Any]:
    block: dict[str, Any] = json.loads(stack.run("status", "--json").stdout)["shipping"]
    return block


def _wait_shipping(stack: Stack, **want: Any) -> None:
    deadline = time.monotonic() + 30
    while any(_shipping_state(stack).get(k) != v for k, v in want.items()):
        assert time.monotonic() < deadline, _shipping_state(stack)
        time.sleep(0.3)


def test_shipping_keeps_up(stack: Stack, tmp_path: Path) -> None:
    src = tmp_path / "logs"
    src.mkdir()
    rotated = src / "app.log.1"
    rotated.write_bytes(b"GET /health 200\n" * 65536)  # 1 MiB
    os.utime(rotated, (time.time() - 3600,) * 2)
    with watch(stack, "--source", str(src), "--ship") as w:
        w.wait_for("segment shipped", timeout=30, path=str(rotated))
        _wait_shipping(stack, shipped_files=1)
        _, checks = doctor(stack, "--ship", "--source", str(src))
    assert checks["shipping"]["result"] == "ok"
    assert checks["shipping"]["message"] == (
        "keeping up: 1 files (1.0 MiB) shipped; 0 not shipped yet (0.0 MiB, live files included)"
    )
    _, checks = doctor(stack, "--no-ship")
    assert checks["shipping"]["result"] == "skip"
    assert checks["shipping"]["message"].startswith("off (--ship ships files as they complete")


def test_shipping_not_keeping_up(stack: Stack, tmp_path: Path) -> None:
    src = tmp_path / "logs"
    src.mkdir()
    rotated = src / "app.log.1"
    rotated.write_bytes(b"GET /health 200\n" * 65536)
    os.utime(rotated, (time.time() - 3600,) * 2)
    with FaultProxy(stack.s3_endpoint) as proxy:
        # The instance role lost s3:PutObject: every segment is refused.
        proxy.add_rule(Rule(method="POST", query=lambda q: "uploads" in q, fault=access_denied()))
        env = stack.env(AWS_ENDPOINT_URL_S3=proxy.endpoint, INSTANCE_AGENT_LOG_LEVEL="info")
        with watch(stack, "--source", str(src), "--ship", env=env) as w:
            w.wait_for("segment failed; retrying later", timeout=30)
            _wait_shipping(stack, pending_files=1)
            assert "AccessDenied" in (_shipping_state(stack)["last_error"] or "")
            # Behind for seconds only: still keeping up, and the error is shown.
            _, checks = doctor(stack, "--ship", "--source", str(src))
            w.proc.kill()
            w.wait(10)
    assert checks["shipping"]["result"] == "ok"
    assert checks["shipping"]["message"].startswith(
        "keeping up: 0 files (0.0 MiB) shipped; "
        "1 not shipped yet (1.0 MiB, live files "
        "included); last error: "
    )
    # The same watcher's status a quarter of an hour on: the complete file still waits.
    path = _status_file(stack)
    doc = json.loads(path.read_text())
    doc["shipping_backlog"]["behind_since"] -= 15 * 60
    path.write_text(json.dumps(doc))
    proc, checks = doctor(stack, "--ship", "--source", str(src))
    out = human(stack, "--ship", "--source", str(src))
    assert proc.returncode == 1
    ship = checks["shipping"]
    assert ship["result"] == "fail"
    assert ship["message"].startswith(
        "not keeping up: 1 complete files waiting for 15 min; 0 files (0.0 MiB) shipped; 1 not shipped yet"
    )
    assert "AccessDenied" in ship["message"]
    assert ship["fix"].startswith("check the last error (S3 access?), or raise --ship-bandwidth")
    line, fix = line_and_fix(out.stdout, "shipping")
    assert line.startswith("✗ shipping") and fix.startswith("fix: check the last error")
