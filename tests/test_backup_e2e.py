"""`instance-agent backup` end to end: a subprocess against SeaweedFS, moto and the IMDS stub."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Stack
from support.agentproc import WatchProc
from support.faultproxy import FaultProxy, HoldUntil, Rule, internal_error, upload_part
from support.trees import build_odd_tree, walk

from instance_agent.local import autoscaling

NO_DAC = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
    "--",
]


def download(stack: Stack, key: str, dest: Path) -> Path:
    body = stack.client("s3").get_object(Bucket=stack.bucket, Key=key)["Body"].read()
    dest.write_bytes(body)
    return dest


def gnu_extract(archive: Path, out: Path) -> subprocess.CompletedProcess[str]:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        ["tar", "--zstd", "-xf", str(archive), "-C", str(out)], capture_output=True, text=True, check=False
    )


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """TMPDIR on a 1 MiB tmpfs: a temp file of the archive could not fit."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_success_path_odd_tree(stack: Stack, tiny_tmpfs: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    skipped = build_odd_tree(src, text_bytes=200 * 1000 * 1000, random_bytes=40 * 1000 * 1000)
    stack.scale_in()
    proc, result = stack.backup("--source", str(src), prefix=NO_DAC, env=stack.env(TMPDIR=str(tiny_tmpfs)))

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result["status"] == "succeeded"
    assert result["lifecycle_result"] == "CONTINUE" and result["lifecycle_error"] is None
    assert result["group"] == stack.group and result["hook"] == stack.hook

    # GNU tar and the zstd CLI accept the archive; every readable file comes back identical.
    archive = download(stack, result["key"], tmp_path / "a.tar.zst")
    assert subprocess.run(["zstd", "-t", "-q", str(archive)], check=False).returncode == 0
    out = tmp_path / "out"
    tar = gnu_extract(archive, out)
    assert tar.returncode == 0 and tar.stderr == "", tar.stderr
    restored = walk(out / str(src).lstrip("/"))
    original = walk(src)
    unreadable = set(skipped["unreadable"])
    specials = set(skipped["fifo"] + skipped["socket"])
    for rel, (kind, content) in original.items():
        if rel in unreadable or rel in specials:
            assert rel not in restored, rel
            continue
        assert restored.get(rel) == (kind, content), rel
    assert set(restored) == set(original) - unreadable - specials

    # The skipped entries are warnings, in the result and in the manifest.
    man = json.loads(
        stack.client("s3").get_object(Bucket=stack.bucket, Key=result["manifest_key"])["Body"].read()
    )
    reasons = {w.get("path", ""): w["reason"] for w in man["warnings"]}
    assert result["warnings"] == len(man["warnings"]) == 3
    assert reasons[f"{src}/a-fifo"] == "skipped fifo"
    assert reasons[f"{src}/a-socket"] == "skipped socket"
    assert reasons[f"{src}/mode-000.log"].startswith("cannot open: Permission denied")

    # The manifest matches the tree: every archived entry, with its type and size.
    prefix = str(src).lstrip("/").encode()
    entries = {}
    for e in man["entries"]:
        path = e["path"].encode() if "path" in e else __import__("base64").b64decode(e["path_b64"])
        if path.startswith(prefix + b"/"):
            entries[path[len(prefix) + 1 :]] = e
    assert set(entries) == set(restored)
    for rel, (kind, content) in restored.items():
        assert entries[rel]["type"] == kind
        if kind == "file":
            assert entries[rel]["size"] == len(content or b"")
    assert man["totals"]["files"] == result["files"]
    assert any("path_b64" in e for e in man["entries"])  # the non-UTF-8 name

    # Exactly one SNS message, whose body is the --json object; one completion, CONTINUE.
    messages = stack.sns()
    assert len(messages) == 1
    assert json.loads(messages[0]["message"]) == result
    assert messages[0]["message_attributes"]["status"]["Value"] == "succeeded"
    completes = stack.lifecycle_calls("CompleteLifecycleAction")
    assert [(c.result, c.outcome) for c in completes] == [("CONTINUE", "ok")]
    assert stack.state() is None  # the instance left the group


def test_failure_path_aborts_and_reports(stack: Stack, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.bin").write_bytes(os.urandom(12 * 1024 * 1024))  # two parts
    with FaultProxy(stack.s3_endpoint) as proxy:
        proxy.add_rule(Rule(query=upload_part, fault=internal_error()))
        stack.scale_in()
        proc, result = stack.backup("--source", str(src), env=stack.env(AWS_ENDPOINT_URL_S3=proxy.endpoint))
        assert any(r.faulted for r in proxy.requests)
    assert proc.returncode == 1
    assert result["status"] == "failed" and "UploadPart" in result["error"]
    assert stack.objects() == {}
    assert stack.incomplete_uploads() == []
    messages = stack.sns()
    assert len(messages) == 1 and json.loads(messages[0]["message"])["status"] == "failed"
    completes = stack.lifecycle_calls("CompleteLifecycleAction")
    assert [(c.result, c.outcome) for c in completes] == [("ABANDON", "ok")]


def test_two_overlapping_runs_back_up_once(stack: Stack, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "app.log").write_bytes(os.urandom(3 * 1024 * 1024))
    release = threading.Event()
    with FaultProxy(stack.s3_endpoint) as proxy:
        held = proxy.add_rule(Rule(query=upload_part, fault=HoldUntil(release), times=1))
        env = stack.env(AWS_ENDPOINT_URL_S3=proxy.endpoint)
        stack.scale_in()
        args = stack.backup_argv("--source", str(src))
        first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert held.fired.wait(30), "first run never reached the upload"
        with WatchProc(args, env) as second:
            second.wait_for("another run holds the termination lock; waiting", timeout=30)
            assert second.proc.poll() is None
            release.set()
            out1, err1 = first.communicate(timeout=120)
            second.wait(timeout=120)
            out2, err2 = second.stdout(), second.text()
    r1, r2 = json.loads(out1), json.loads(out2)
    assert first.returncode == 0 and r1["status"] == "succeeded", err1[-2000:]
    assert second.proc.returncode == 0 and r2["status"] == "duplicate", err2[-2000:]
    assert r2["key"] == r1["key"] and r2["first_exit_code"] == 0
    assert [k for k in stack.objects() if not k.endswith(".manifest.json")] == [r1["key"]]
    assert len(stack.sns()) == 1
    assert len(stack.lifecycle_calls("CompleteLifecycleAction")) == 1
    # A third run, after the record, is a duplicate too.
    proc, r3 = stack.backup("--source", str(src))
    assert proc.returncode == 0 and r3["status"] == "duplicate" and r3["key"] == r1["key"]
    assert len(stack.sns()) == 1


def test_heartbeats_keep_a_slow_backup_alive_and_stop_after(stack: Stack, tmp_path: Path) -> None:
    # The hook times out after 30 s of the stand-in's clock, which runs 10x fast: without
    # heartbeats it would expire 3 s into this ~8 s upload.
    autoscaling.set_clock(autoscaling.scaled_clock(10))
    try:
        asg = stack.client("autoscaling")
        asg.put_lifecycle_hook(
            AutoScalingGroupName=stack.group,
            LifecycleHookName=stack.hook,
            LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
            HeartbeatTimeout=30,
            DefaultResult="ABANDON",
        )
        src = tmp_path / "src"
        src.mkdir()
        (src / "data.bin").write_bytes(os.urandom(40 * 1024 * 1024))
        from support.faultproxy import Delay

        with FaultProxy(stack.s3_endpoint) as proxy:
            proxy.add_rule(Rule(query=upload_part, fault=Delay(1.5)))
            stack.scale_in()
            proc, _ = stack.backup(
                "--source",
                str(src),
                "--heartbeat-interval",
                "0.5",
                "--upload-workers",
                "1",
                "--compression",
                "none",
                env=stack.env(AWS_ENDPOINT_URL_S3=proxy.endpoint),
            )
        assert proc.returncode == 0, proc.stderr[-2000:]
        beats = [c for c in stack.lifecycle_calls("RecordLifecycleActionHeartbeat") if c.outcome == "ok"]
        assert len(beats) >= 5
        assert [(o.result, o.how) for o in stack.outcomes()] == [("CONTINUE", "completed")]
        count = len(stack.lifecycle_calls("RecordLifecycleActionHeartbeat"))
        time.sleep(1.5)
        assert len(stack.lifecycle_calls("RecordLifecycleActionHeartbeat")) == count
    finally:
        autoscaling.set_clock(time.monotonic)


@pytest.mark.parametrize(
    ("args", "toml", "message"),
    [
        ([], None, "no bucket"),
        (["--bucket", "Bad_Bucket"], None, "invalid bucket name"),
        (["--bucket", "good-bucket", "--frobnicate"], None, "unrecognized arguments: --frobnicate"),
        (["--bucket", "good-bucket"], 'bucket = "b"\nfrobnicate = 1\n', "unknown key 'frobnicate'"),
        ([], "bucket = [unclosed\n", "invalid TOML"),
        (["--bucket", "good-bucket", "--compression", "lz4"], None, "expected one of zstd, gzip, none"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_2(
    stack: Stack, args: list[str], toml: str | None, message: str
) -> None:
    env = stack.env()
    if toml is not None:
        path = stack.tmp / "agent.toml"
        path.write_text(toml)
        env["INSTANCE_AGENT_CONFIG"] = str(path)
    before_aws = len(stack.moto.api_calls())
    before_imds = len(stack.imds.requests)
    proc = stack.run("backup", *args, env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert proc.stdout == ""
    assert len(stack.moto.api_calls()) == before_aws
    assert len(stack.imds.requests) == before_imds


def test_imds_unreachable_without_instance_id_is_exit_2(stack: Stack) -> None:
    proc = stack.run(
        "backup",
        "--bucket",
        "good-bucket",
        env=stack.env(
            AWS_EC2_METADATA_SERVICE_ENDPOINT="http://127.0.0.1:9", INSTANCE_AGENT_LOG_LEVEL="info"
        ),
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot get the instance identity from IMDS" in lines[0]
