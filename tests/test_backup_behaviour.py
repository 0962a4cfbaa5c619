"""The rest of `backup`'s contract: discovery, tokens, SNS failure, crashes, deadlines, dedupe rules."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
from pathlib import Path

from conftest import AGENT, Stack
from support.faultproxy import FaultProxy, HoldUntil, Rule, upload_part

from instance_agent.local import autoscaling


def _src(tmp: Path, size: int = 1024) -> Path:
    src = tmp / "src"
    src.mkdir(exist_ok=True)
    (src / "app.log").write_bytes(os.urandom(size))
    return src


def test_completion_by_lifecycle_token(stack: Stack) -> None:
    stack.scale_in()
    token = next(a.token for a in autoscaling.active_actions() if a.instance_id == stack.instance_id)
    proc, result = stack.backup(
        "--source",
        str(_src(stack.tmp)),
        "--lifecycle-token",
        token,
        "--hook-name",
        stack.hook,
        "--asg-name",
        stack.group,
    )
    assert proc.returncode == 0 and result["lifecycle_result"] == "CONTINUE"
    calls = stack.lifecycle_calls("CompleteLifecycleAction")
    assert [(c.token, c.instance_id, c.outcome) for c in calls] == [(token, None, "ok")]
    assert token not in proc.stderr  # tokens are never logged


def test_crashed_run_is_backed_up_again(stack: Stack) -> None:
    src = _src(stack.tmp, 2 * 1024 * 1024)
    release = threading.Event()
    stack.scale_in()
    with FaultProxy(stack.s3_endpoint) as proxy:
        held = proxy.add_rule(Rule(query=upload_part, fault=HoldUntil(release, timeout=30), times=1))
        env = stack.env(AWS_ENDPOINT_URL_S3=proxy.endpoint)
        first = subprocess.Popen(
            [*AGENT, "backup", "--bucket", stack.bucket, "--source", str(src)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert held.fired.wait(30)
        first.send_signal(signal.SIGKILL)  # no finally runs: no record, no completion
        first.wait(timeout=30)
        release.set()
    assert len(stack.incomplete_uploads()) == 1  # the killed run's upload is left behind
    proc, result = stack.backup("--source", str(src))
    assert proc.returncode == 0 and result["status"] == "succeeded", proc.stderr[-2000:]
    assert result["key"] in stack.objects()
    assert stack.incomplete_uploads() == []  # ... and the new run aborted it
    assert "aborted a stale multipart upload" in proc.stderr
    calls = stack.lifecycle_calls("CompleteLifecycleAction")
    assert [(c.result, c.outcome) for c in calls] == [("CONTINUE", "ok")]


def test_max_duration_gives_partial_with_omitted_paths(stack: Stack) -> None:
    src = stack.tmp / "src"
    for d in range(5):
        (src / f"d{d}").mkdir(parents=True)
        (src / f"d{d}" / "f.log").write_bytes(os.urandom(64))
    stack.scale_in()
    proc, result = stack.backup("--source", str(src), "--max-duration", "0.000001")
    assert proc.returncode == 0 and result["status"] == "partial"
    assert result["lifecycle_result"] == "CONTINUE"
    man = json.loads(
        stack.client("s3").get_object(Bucket=stack.bucket, Key=result["manifest_key"])["Body"].read()
    )
    assert man["totals"]["omitted"] >= 1
    assert any(o["path"].startswith(str(src)) for o in man["omitted"])


def test_sha256_digests_in_manifest(stack: Stack) -> None:
    src = _src(stack.tmp, 300_000)
    proc, result = stack.backup("--source", str(src), "--hash", "sha256", "--no-complete")
    assert proc.returncode == 0
    man = json.loads(
        stack.client("s3").get_object(Bucket=stack.bucket, Key=result["manifest_key"])["Body"].read()
    )
    files = [e for e in man["entries"] if e["type"] == "file"]
    assert [e["sha256"] for e in files] == [hashlib.sha256((src / "app.log").read_bytes()).hexdigest()]
