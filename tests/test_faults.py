"""The fault table: each row of issue 6's "Fault injection" table, end to end.

The agent runs as a subprocess (`instance-agent backup`, or the watcher where the fault is in
its polling) against SeaweedFS, moto and the IMDSv2 stub, with the fault proxy in between.
Every test checks the operator's view (exit code, SNS, lifecycle completion, what is in the
bucket through an endpoint the proxy does not touch) and records its figures on the
scoreboard (tests/support/scoreboard.py, docs/reliability.md).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from conftest import ACCOUNT, REGION, Stack
from support import scoreboard
from support.agentproc import WatchProc, watch_argv
from support.faultproxy import (
    FaultProxy,
    Hold,
    HoldUntil,
    LoggedRequest,
    Reset,
    Rule,
    access_denied,
    slow_down,
    upload_part,
)
from support.trees import text_log, walk

from instance_agent import config, wiring
from instance_agent.local import autoscaling

# How long an operator may wait for the verdict of a run that cannot succeed. A 403 is not
# retried, so the run ends as soon as the upload is refused; the rest is interpreter start-up.
FAILURE_BOUND = 20.0
# IMDS requests time out after 1 s (connect) / 2 s (read) and identity reads give up after
# 10 s (instance_agent/imds.py): a black-holed IMDS must end the run well inside this.
IMDS_BOUND = 20.0
# The report must never hold the hook hostage: SNS gets this long, all retries included.
# The shortest HeartbeatTimeout AWS allows is 30 s, and heartbeats have stopped by then.
SNS_BOUND = 30.0


# -- helpers ---------------------------------------------------------------------------


def drop_bucket(stack: Stack) -> None:
    """Delete the test's SeaweedFS bucket and all in it. Each bucket holds volumes of its own
    (1 GiB each by default), and `weed mini` allows free disk / 1 GiB of them per session:
    a suite that keeps every bucket runs out, and later uploads fail with InternalError."""
    s3 = stack.client("s3")
    try:
        for up in s3.list_multipart_uploads(Bucket=stack.bucket).get("Uploads", []):
            s3.abort_multipart_upload(Bucket=stack.bucket, Key=up["Key"], UploadId=up["UploadId"])
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket):
            for obj in page.get("Contents", []):
                s3.delete_object(Bucket=stack.bucket, Key=obj["Key"])
        s3.delete_bucket(Bucket=stack.bucket)
    except ClientError:
        pass  # best effort: a bucket left behind costs volumes, not correctness


@pytest.fixture
def stack(stack: Stack) -> Iterator[Stack]:
    """conftest's stack, whose bucket is dropped afterwards (see `drop_bucket`)."""
    yield stack
    drop_bucket(stack)


def s3_op(req: LoggedRequest) -> str:
    """The S3 operation of a request in the proxy's log."""
    q, m = req.query, req.method
    if m == "PUT" and "partNumber" in q:
        return "UploadPart"
    if m == "POST" and "uploads" in q:
        return "CreateMultipartUpload"
    if m == "POST" and "uploadId" in q:
        return "CompleteMultipartUpload"
    if m == "DELETE" and "uploadId" in q:
        return "AbortMultipartUpload"
    if m == "GET" and "uploads" in q:
        return "ListMultipartUploads"
    if m == "PUT":
        return "PutObject"
    return f"{m} {req.path}"


def retried(log: list[LoggedRequest]) -> int:
    """Requests sent again: attempts beyond the first of each (operation, key, part)."""
    seen = Counter((s3_op(r), r.path, tuple(r.query.get("partNumber", ()))) for r in log)
    return sum(n - 1 for n in seen.values())


def backup(
    stack: Stack, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], float]:
    started = time.monotonic()
    proc, result = stack.backup(*args, env=env or stack.env(), timeout=timeout)
    return proc, result, time.monotonic() - started


def completions(stack: Stack) -> list[tuple[str | None, str]]:
    return [(c.result, c.outcome) for c in stack.lifecycle_calls("CompleteLifecycleAction")]


def sns_docs(stack: Stack) -> list[dict[str, Any]]:
    return [json.loads(m["message"]) for m in stack.sns()]


def source(tmp: Path, *, random_mib: int, text_mb: int = 0) -> Path:
    src = tmp / "src"
    (src / "app").mkdir(parents=True)
    (src / "app" / "blob.bin").write_bytes(random.Random(7).randbytes(random_mib * 2**20))
    if text_mb:
        text_log(src / "app" / "access.log", text_mb * 1000 * 1000, seed=3)
    (src / "syslog").write_text("boot ok\n")
    (src / "empty").mkdir()
    return src


def reported_failure(stack: Stack) -> bool:
    """The operator heard of the failure: on SNS, and through the hook's failure result."""
    docs = sns_docs(stack)
    return (
        bool(docs)
        and all(d["status"] == "failed" for d in docs)
        and completions(stack) == [("ABANDON", "ok")]
    )


def size_of(tree: dict[bytes, tuple[str, bytes | None]]) -> int:
    return sum(len(c or b"") for kind, c in tree.values() if kind == "file")


# -- S3 ----------------------------------------------------------------------------------


def test_s3_503s_and_resets_still_give_a_byte_identical_backup(stack: Stack, tmp_path: Path) -> None:
    src = source(tmp_path, random_mib=72, text_mb=24)  # about 10 parts of 8 MiB
    before = walk(src)
    with (
        scoreboard.scenario(
            "S3: 10 % of UploadPart answer 503 SlowDown, 5 % of all requests reset mid-body"
        ) as row,
        FaultProxy(stack.s3_endpoint, seed=6) as proxy,
    ):
        # One of each for certain (the percentages alone might not fire on ten parts) ...
        proxy.add_rule(Rule(query=upload_part, fault=slow_down(), times=1, name="503"))
        proxy.add_rule(Rule(query=upload_part, fault=Reset(after_bytes=256 * 1024), times=1, name="reset"))
        # ... then the table's rates.
        proxy.add_rule(Rule(query=upload_part, fault=slow_down(), probability=0.10, name="503"))
        proxy.add_rule(Rule(fault=Reset(after_bytes=64 * 1024), probability=0.05, name="reset"))
        stack.scale_in()
        proc, result, took = backup(
            stack, "--source", str(src), env=stack.env(AWS_ENDPOINT_URL_S3=proxy.endpoint)
        )
        log = proxy.requests
        faulted = [r for r in log if r.faulted]
        row.faults = (
            f"{sum(r.rule == '503' for r in faulted)} × 503 SlowDown, "
            f"{sum(r.rule == 'reset' for r in faulted)} × TCP reset "
            f"(of {len(log)} S3 requests)"
        )
        row.retried = str(retried(log))
        row.seconds = took

        assert proc.returncode == 0, proc.stderr[-3000:]
        assert result["status"] == "succeeded" and result["lifecycle_result"] == "CONTINUE"
        assert {r.rule for r in faulted} == {"503", "reset"}
        # Every faulted request was sent again, and each part landed exactly once.
        parts = [r for r in log if s3_op(r) == "UploadPart" and result["key"] in r.path]
        ok_parts = [r.query["partNumber"][0] for r in parts if r.status == 200]
        assert len(ok_parts) == len(set(ok_parts)) >= 9
        assert len(parts) == len(ok_parts) + sum(1 for r in parts if r.faulted)
        assert retried(log) == len(faulted)

        restored = stack.gnu_restore(result["key"], src, tmp_path)
        assert restored == before
        assert stack.incomplete_uploads() == []
        assert [d["status"] for d in sns_docs(stack)] == ["succeeded"]
        assert completions(stack) == [("CONTINUE", "ok")]
        row.bytes_lost = scoreboard.lost_bytes(before, walk(src), restored, [])
        row.outcome = "succeeded; restore byte-identical; 1 SNS, CONTINUE"
        assert row.bytes_lost == 0


@pytest.mark.parametrize("scope", ["every request", "every UploadPart"])
def test_s3_403_fails_fast_reports_abandons_and_leaves_no_upload(
    stack: Stack, tmp_path: Path, scope: str
) -> None:
    src = source(tmp_path, random_mib=20)  # three parts: some are in flight when refused
    total = size_of(walk(src))
    label = (
        "S3: every request answers 403 AccessDenied"
        if scope == "every request"
        else "S3: every UploadPart answers 403 (write access revoked after the upload began)"
    )
    with scoreboard.scenario(label) as row, FaultProxy(stack.s3_endpoint) as proxy:
        rule = (
            Rule(fault=access_denied())
            if scope == "every request"
            else Rule(query=upload_part, fault=access_denied())
        )
        proxy.add_rule(rule)
        stack.scale_in()
        proc, result, took = backup(
            stack, "--source", str(src), env=stack.env(AWS_ENDPOINT_URL_S3=proxy.endpoint)
        )
        log = proxy.requests
        row.faults = f"{rule.hits} × 403 (of {len(log)} S3 requests)"
        row.retried = str(retried(log))
        row.seconds = took

        assert proc.returncode == 1, proc.stderr[-3000:]
        assert took < FAILURE_BOUND
        assert result["status"] == "failed" and "AccessDenied" in result["error"]
        assert result["lifecycle_result"] == "ABANDON"
        # Checked through the second, unfaulted endpoint: nothing half-written is left.
        assert stack.objects() == {}
        assert stack.incomplete_uploads() == []
        docs = sns_docs(stack)
        assert len(docs) == 1 and docs[0]["status"] == "failed"
        assert "AccessDenied" in docs[0]["error"]
        assert completions(stack) == [("ABANDON", "ok")]
        assert retried(log) == 0  # a 403 is final: no retry storm against a denying bucket
        if scope == "every UploadPart":
            aborts = [r for r in log if s3_op(r) == "AbortMultipartUpload"]
            assert [r.status for r in aborts] == [204]
        row.bytes_lost = 0 if reported_failure(stack) else total
        row.outcome = "exit 1; failure on SNS; ABANDON; no incomplete upload"
        assert row.bytes_lost == 0


# -- SNS ---------------------------------------------------------------------------------


def test_sns_black_hole_never_holds_the_hook(stack: Stack, tmp_path: Path) -> None:
    src = source(tmp_path, random_mib=1)
    before = walk(src)
    # Publish is never answered; after 1 s the proxy drops the connection unanswered (the
    # pure no-answer variant is bounded by the client's read timeout: see the next test).
    with (
        scoreboard.scenario("SNS: Publish black-holed (no answer, connection dropped after 1 s)") as row,
        FaultProxy(stack.moto.endpoint) as proxy,
    ):
        hole = proxy.add_rule(Rule(api_action="Publish", fault=Hold(timeout=1.0)))
        stack.scale_in()
        proc, result, took = backup(
            stack, "--source", str(src), env=stack.env(AWS_ENDPOINT_URL_SNS=proxy.endpoint)
        )
        row.faults = f"{hole.hits} × Publish unanswered"
        row.retried = str(hole.hits - 1)
        row.seconds = took

        assert proc.returncode == 0, proc.stderr[-3000:]
        assert result["status"] == "succeeded"
        assert result["notify_error"].startswith("SNS publish failed")
        assert any(
            json.loads(line).get("msg") == "report not published"
            for line in proc.stderr.splitlines()
            if line.startswith("{")
        )
        assert hole.hits >= 2  # retried, then given up
        assert stack.sns() == []
        assert completions(stack) == [("CONTINUE", "ok")]
        assert took < SNS_BOUND
        restored = stack.gnu_restore(result["key"], src, tmp_path)
        row.bytes_lost = scoreboard.lost_bytes(before, walk(src), restored, [])
        row.outcome = "succeeded; notify_error in result and log; CONTINUE"
        assert row.bytes_lost == 0


def test_sns_black_hole_worst_case_fits_the_bound() -> None:
    # The worst case of a never-answered Publish is what the CLI's SNS client allows: every
    # attempt waits out connect and read timeouts, plus botocore's largest backoffs
    # (50 ms x 2^i for non-throttling errors, botocore.retries.standard).
    cfg = config.load({"bucket": "ok-bucket", "topic_arn": f"arn:aws:sns:{REGION}:{ACCOUNT}:t"}, {})
    sns = wiring.make_clients(cfg, REGION).sns
    meta = sns.meta.config
    attempts = int(meta.retries["total_max_attempts"])
    worst = attempts * (meta.connect_timeout + meta.read_timeout) + sum(
        min(0.05 * 2**i, 20) for i in range(attempts - 1)
    )
    assert worst <= SNS_BOUND, (
        f"{attempts} attempts x ({meta.connect_timeout} + {meta.read_timeout}) s = {worst:.0f} s"
    )


# -- Auto Scaling ---------------------------------------------------------------------


def _throttled(stack: Stack, action: str) -> int:
    return sum(1 for c in stack.lifecycle_calls(action) if c.outcome == "Rate exceeded")


def _throttling_run(
    stack: Stack, tmp_path: Path, heartbeats: int, completes: int, row: scoreboard.Row
) -> list[dict[str, Any]]:
    """One backup under injected throttling; returns the agent's log records."""
    src = source(tmp_path, random_mib=10)
    release = threading.Event()
    with FaultProxy(stack.s3_endpoint) as proxy:
        # The upload waits until a heartbeat got through, so the throttled ones are retried
        # while the backup runs (heartbeats stop with it).
        proxy.add_rule(Rule(query=upload_part, fault=HoldUntil(release, timeout=60)))
        stack.scale_in()
        autoscaling.inject_error(
            "RecordLifecycleActionHeartbeat",
            "Throttling",
            "Rate exceeded",
            times=heartbeats,
            account_id=ACCOUNT,
            region=REGION,
        )
        autoscaling.inject_error(
            "CompleteLifecycleAction",
            "Throttling",
            "Rate exceeded",
            times=completes,
            account_id=ACCOUNT,
            region=REGION,
        )
        args = [
            *stack.backup_argv("--source", str(src)),
            "--heartbeat-interval",
            "0.5",
        ]
        started = time.monotonic()
        with WatchProc(args, stack.env(AWS_ENDPOINT_URL_S3=proxy.endpoint)) as agent:
            deadline = time.monotonic() + 60
            while not any(c.outcome == "ok" for c in stack.lifecycle_calls("RecordLifecycleActionHeartbeat")):
                assert time.monotonic() < deadline and agent.proc.poll() is None, agent.text()
                time.sleep(0.05)
            release.set()
            code = agent.wait(120)
            out = agent.stdout()
            row.seconds = time.monotonic() - started
            text = agent.text()
            records = [r for _, r in agent.records]
    row.faults = (
        f"{heartbeats} × Throttling on RecordLifecycleActionHeartbeat, "
        f"{completes} × on CompleteLifecycleAction"
    )
    row.retried = str(
        _throttled(stack, "RecordLifecycleActionHeartbeat") + _throttled(stack, "CompleteLifecycleAction")
    )
    result = json.loads(out)
    assert code == 0, text
    assert result["status"] == "succeeded" and result["lifecycle_result"] == "CONTINUE"
    assert result["lifecycle_error"] is None
    # Every injected error was met by a retry, and the action ended by our completion, not
    # by expiry.
    assert _throttled(stack, "RecordLifecycleActionHeartbeat") == heartbeats
    assert _throttled(stack, "CompleteLifecycleAction") == completes
    assert completions(stack)[-1] == ("CONTINUE", "ok")
    assert [(o.result, o.how) for o in stack.outcomes()] == [("CONTINUE", "completed")]
    assert [d["status"] for d in sns_docs(stack)] == ["succeeded"]
    row.bytes_lost = 0 if stack.objects().get(result["key"]) else size_of(walk(src))
    row.outcome = "succeeded; completion landed (CONTINUE), not expired"
    return records


def test_autoscaling_throttling_is_retried_and_completion_lands(stack: Stack, tmp_path: Path) -> None:
    with scoreboard.scenario(
        "Auto Scaling: Throttling on heartbeat and completion (the SDK's retries absorb it)"
    ) as row:
        _throttling_run(stack, tmp_path, heartbeats=2, completes=3, row=row)
        assert row.bytes_lost == 0


@pytest.mark.slow
def test_sustained_completion_throttling_outlasts_the_sdk_retries(stack: Stack, tmp_path: Path) -> None:
    # botocore makes 6 attempts with throttling backoff (up to 1, 2, 4, 8, 16 s); the 7th
    # error reaches the agent, which backs off 2 s and calls again.
    with scoreboard.scenario(
        "Auto Scaling: Throttling on 7 completion calls in a row (beyond the SDK's 6 attempts)"
    ) as row:
        records = _throttling_run(stack, tmp_path, heartbeats=1, completes=7, row=row)
        failed = [r for r in records if r.get("msg") == "completion failed; retrying"]
        done = [r for r in records if r.get("msg") == "lifecycle action completed"]
        assert len(failed) == 1 and "Throttling" in failed[0]["error"] and len(done) == 1
        gap = _seconds(done[0]["ts"]) - _seconds(failed[0]["ts"])
        assert gap >= 2.0  # the agent's own backoff, before botocore's next attempt
        assert row.bytes_lost == 0


def _seconds(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


# -- IMDS --------------------------------------------------------------------------------


def test_imds_token_expiring_between_identity_reads_is_refreshed(stack: Stack, tmp_path: Path) -> None:
    src = source(tmp_path, random_mib=1)
    between = threading.Event()
    with (
        scoreboard.scenario("IMDS: the session token expires between the two identity reads (401)") as row,
        FaultProxy(stack.imds.endpoint) as proxy,
    ):
        # The region read waits at the proxy while the stub forgets every token, then goes
        # on with the stale token and meets a real 401.
        held = proxy.add_rule(Rule(path="placement/region", fault=HoldUntil(between, timeout=30), times=1))
        stack.scale_in()

        def expire_then_release() -> None:
            if held.fired.wait(30):
                stack.imds.expire_tokens()
                between.set()

        threading.Thread(target=expire_then_release, daemon=True).start()
        proc, result, took = backup(
            stack, "--source", str(src), env=stack.env(AWS_EC2_METADATA_SERVICE_ENDPOINT=proxy.endpoint)
        )
        imds = stack.imds
        rejected = [r for r in imds.requests if r[2] == 401]
        row.faults = f"token expired once; {len(rejected)} × 401"
        row.retried = str(len(rejected))
        row.seconds = took

        assert proc.returncode == 0, proc.stderr[-3000:]
        assert result["status"] == "succeeded" and result["instance_id"] == stack.instance_id
        assert [(m, p.rsplit("/", 1)[-1]) for m, p, s in rejected] == [("GET", "region")]
        assert imds.token_puts == 2  # one fresh token after the 401, never a token-less read
        assert imds.tokenless_reads == 0
        assert completions(stack) == [("CONTINUE", "ok")]
        restored = stack.gnu_restore(result["key"], src, tmp_path)
        row.bytes_lost = scoreboard.lost_bytes(walk(src), walk(src), restored, [])
        row.outcome = "succeeded; new token after the 401; 0 token-less reads"
        assert row.bytes_lost == 0


@pytest.fixture
def expiring_tokens(stack: Stack) -> Iterator[threading.Event]:
    """Forget every IMDS token every 0.2 s until the test ends: most polls meet a 401."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(0.2):
            stack.imds.expire_tokens()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield stop
    stop.set()
    thread.join(5)


def test_watcher_survives_tokens_expiring_all_the_time(
    stack: Stack, tmp_path: Path, expiring_tokens: threading.Event
) -> None:
    src = source(tmp_path, random_mib=1)
    with scoreboard.scenario(
        "IMDS: every token expires within 0.2 s, while the watcher polls and backs up"
    ) as row:
        argv = watch_argv(stack, "--source", str(src), heartbeat=None)
        with WatchProc(argv, stack.env(INSTANCE_AGENT_LOG_LEVEL="info")) as w:
            w.wait_for("watching")
            time.sleep(2.0)  # several poll rounds across expiries before anything happens
            flipped = time.monotonic()
            stack.scale_in()
            _, done = w.wait_for("response finished", timeout=60)
            row.seconds = time.monotonic() - flipped
            w.send(signal.SIGTERM)
            assert w.wait(10) == 0
        expiring_tokens.set()
        imds = stack.imds
        rejected = sum(1 for r in imds.requests if r[2] == 401)
        row.faults = f"tokens expired every 0.2 s; {rejected} × 401"
        row.retried = str(rejected)

        assert done["status"] == "succeeded" and done["lifecycle_result"] == "CONTINUE"
        assert rejected >= 3 and imds.token_puts >= 3
        assert imds.tokenless_reads == 0
        assert completions(stack) == [("CONTINUE", "ok")]
        restored = stack.gnu_restore(done["key"], src, tmp_path)
        row.bytes_lost = scoreboard.lost_bytes(walk(src), walk(src), restored, [])
        row.outcome = "detected, succeeded, CONTINUE; 0 token-less reads"
        assert row.bytes_lost == 0


def test_imds_black_hole_at_start_is_exit_2_within_bound(stack: Stack, tmp_path: Path) -> None:
    src = source(tmp_path, random_mib=1)
    with (
        scoreboard.scenario("IMDS: black hole at start, no --instance-id") as row,
        FaultProxy(stack.imds.endpoint) as proxy,
    ):
        proxy.add_rule(Rule(fault=Hold()))
        stack.scale_in()
        before_aws = len(stack.moto.api_calls())
        proc, _, took = backup(
            stack,
            "--source",
            str(src),
            env=stack.env(AWS_EC2_METADATA_SERVICE_ENDPOINT=proxy.endpoint, INSTANCE_AGENT_LOG_LEVEL="info"),
        )
        row.seconds = took
        proxy.stop()  # releases the held requests, which then appear in the log
        time.sleep(0.3)
        attempts = len(proxy.requests)
        row.faults = f"{attempts} × IMDS request unanswered"
        row.retried = str(max(attempts - 1, 0))

        assert proc.returncode == 2
        assert took < IMDS_BOUND
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert "cannot get the instance identity from IMDS" in lines[0]
        assert "pass --instance-id and --region" in lines[0]
        assert proc.stdout == ""
        assert attempts >= 2  # retried with backoff until the deadline, not once
        # Nothing was done: no AWS call, nothing in the bucket, the hook untouched.
        assert len(stack.moto.api_calls()) == before_aws
        assert stack.objects() == {} and stack.lifecycle_calls() == []
        # Nothing was backed up, and the caller (Run Command, systemd) was told so at once.
        row.bytes_lost = 0 if proc.returncode == 2 and lines else size_of(walk(src))
        row.outcome = "exit 2, one-line error naming IMDS and --instance-id; nothing done"

    # The way out the message names works with IMDS still black-holed.
    with FaultProxy(stack.imds.endpoint) as proxy:
        proxy.add_rule(Rule(fault=Hold()))
        proc, result, _ = backup(
            stack,
            "--source",
            str(src),
            "--instance-id",
            stack.instance_id,
            "--region",
            REGION,
            env=stack.env(AWS_EC2_METADATA_SERVICE_ENDPOINT=proxy.endpoint),
        )
    assert proc.returncode == 0 and result["status"] == "succeeded", proc.stderr[-2000:]
    assert completions(stack) == [("CONTINUE", "ok")]
