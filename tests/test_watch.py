"""`instance-agent watch` end to end: the daemon as a subprocess against the IMDS stub, moto
(SNS, Auto Scaling with lifecycle hooks) and SeaweedFS (S3), all on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import ACCOUNT, REGION, Stack, make_group
from support.agentproc import (
    POLL,
    WatchProc,
    archives,
    completions,
    sns_docs,
    source_tree,
    watch,
    watch_argv,
)
from support.faultproxy import Delay, FaultProxy, HoldUntil, Rule, upload_part
from support.trees import walk
from support.waits import until

from instance_agent.local import autoscaling
from instance_agent.local.imds import IMDSStub

# --- 1. termination ----------------------------------------------------------------------


def test_termination_detected_backed_up_reported_completed(stack: Stack, tmp_path: Path) -> None:
    src = source_tree(tmp_path / "src")
    with watch(
        stack,
        "--source",
        str(src),
        "--pre-command",
        "echo pre-ran",
        "--post-command",
        "echo post-ran; exit 3",
    ) as w:
        w.wait_for("watching")
        flipped = time.monotonic()
        stack.scale_in()  # Terminating:Wait in the group, `Terminated` in IMDS
        started, _ = w.wait_for("starting the backup", trigger="termination")
        archiving, _ = w.wait_for("backup started")
        _, done = w.wait_for("response finished", timeout=60)
        latency = started - flipped
        print(
            f"\ndetection latency: {latency:.3f} s at a {POLL} s poll; archive started "
            f"{archiving - flipped:.3f} s after the flip (boto3 import, hook discovery and "
            "the pre-command in between)"
        )
        assert latency <= POLL + 0.5

        assert done["status"] == "succeeded" and done["lifecycle_result"] == "CONTINUE"
        assert archives(stack) == [done["key"]]
        assert stack.gnu_restore(done["key"], src, tmp_path) == walk(src)
        docs = sns_docs(stack)
        assert len(docs) == 1
        doc = docs[0]
        assert doc["status"] == "succeeded" and doc["trigger"] == "termination"
        assert doc["group"] == stack.group and doc["hook"] == stack.hook
        # Pre- and post-command exit codes and output travel in the report.
        assert [(c["phase"], c["exit_code"], c["output"]) for c in doc["commands"]] == [
            ("pre", 0, "pre-ran\n"),
            ("post", 3, "post-ran\n"),
        ]
        assert completions(stack) == [("CONTINUE", "ok")]
        assert stack.state() is None  # the instance left the group

        # The latch: IMDS keeps saying Terminated, and nothing runs again.
        time.sleep(4 * POLL)
        assert len(w.find("starting the backup")) == 1
        assert len(stack.sns()) == 1 and len(completions(stack)) == 1
        stopped = w.send(signal.SIGTERM)
        assert w.wait(5) == 0
        assert time.monotonic() - stopped < 1.0


# --- 2. Spot ----------------------------------------------------------------------------


def test_spot_terminate_backs_up_at_once_and_completes_nothing(stack: Stack, tmp_path: Path) -> None:
    src = source_tree(tmp_path / "src")
    with watch(stack, "--source", str(src), "--max-duration", "100") as w:
        w.wait_for("watching")
        flipped = time.monotonic()
        stack.imds.spot_action = {"action": "terminate", "time": "2026-11-26T10:02:00Z"}
        started, _ = w.wait_for("starting the backup", trigger="spot-terminate")
        assert started - flipped <= POLL + 0.5
        _, done = w.wait_for("response finished", timeout=60)
    assert done["status"] == "succeeded" and done["lifecycle_result"] == "none"
    assert archives(stack) == [done["key"]]
    assert stack.gnu_restore(done["key"], src, tmp_path) == walk(src)
    assert done["key"].startswith(f"{stack.group}/{stack.instance_id}/")
    # No hook can delay a Spot reclaim: no heartbeat, no completion.
    assert stack.lifecycle_calls() == []
    assert [d["trigger"] for d in sns_docs(stack)] == ["spot-terminate"]
    # It counts as the termination: when Auto Scaling then holds the instance and Run
    # Command arrives with the action's token, that run completes the action with the Spot
    # backup's result instead of archiving a second time.
    stack.scale_in()
    token = autoscaling.active_actions(group=stack.group)[0].token
    proc, result = stack.backup("--source", str(src), "--lifecycle-token", token)
    assert proc.returncode == 0 and result["status"] == "duplicate", proc.stderr[-2000:]
    assert result["key"] == done["key"] and result["lifecycle_result"] == "CONTINUE"
    assert archives(stack) == [done["key"]]
    assert [(c.result, c.outcome) for c in stack.lifecycle_calls("CompleteLifecycleAction")] == [
        ("CONTINUE", "ok")
    ]
    assert token not in proc.stdout + proc.stderr


# --- 3. the race with Run Command --------------------------------------------------------

ROUNDS = 20
PARALLEL = 4


def _race_round(stack: Stack, proxy: FaultProxy, src: Path, n: int) -> dict[str, Any]:
    """One termination seen by both the watcher and a direct `instance-agent backup`.

    Whichever takes the lock first is held at CreateMultipartUpload until the other one
    logs that it waits for the lock: the two runs provably overlap."""
    suffix = uuid.uuid4().hex[:8]
    group, hook = f"race-{suffix}", f"hook-{suffix}"
    instance_id = make_group(stack.moto, group, hook)
    release = threading.Event()
    proxy.add_rule(
        Rule(
            method="POST",
            path=instance_id,
            query=lambda q: "uploads" in q,
            fault=HoldUntil(release, timeout=30),
            times=1,
            name=instance_id,
        )
    )
    stub = IMDSStub(instance_id=instance_id, region=REGION, target_lifecycle_state="InService")
    stub.start()
    try:
        autoscaling.begin_termination(group, instance_id, account_id=ACCOUNT, region=REGION)
        stub.target_lifecycle_state = "Terminated"
        env = stack.env(
            AWS_EC2_METADATA_SERVICE_ENDPOINT=stub.endpoint,
            AWS_ENDPOINT_URL_S3=proxy.endpoint,
            INSTANCE_AGENT_LOG_LEVEL="info",
            INSTANCE_AGENT_STATE_DIR=str(stack.tmp / f"state-{n}"),
            INSTANCE_AGENT_RUNTIME_DIR=str(stack.tmp / f"run-{n}"),
            INSTANCE_AGENT_SOURCE=str(src),
            INSTANCE_AGENT_HEARTBEAT_INTERVAL="0.5",
        )
        backup_argv = stack.backup_argv()
        watch_cmd = watch_argv(stack, heartbeat=None)
        # Alternate who is launched first; both start within milliseconds anyway.
        order = [backup_argv, watch_cmd] if n % 2 else [watch_cmd, backup_argv]
        procs = [WatchProc(argv, env) for argv in order]
        direct, watcher = (procs[0], procs[1]) if n % 2 else (procs[1], procs[0])
        with direct, watcher:
            deadline = time.monotonic() + 30
            waiting = "another run holds the termination lock; waiting"
            while not (direct.find(waiting) or watcher.find(waiting)):
                assert time.monotonic() < deadline, direct.text() + watcher.text()
                time.sleep(0.02)
            release.set()
            assert direct.wait(60) in (0, 1)
            direct_result = json.loads(direct.stdout())
            _, finished = watcher.wait_for("response finished", timeout=60)
            watcher.send(signal.SIGTERM)
            assert watcher.wait(10) in (0, 1)
    finally:
        stub.stop()
    return {
        "instance_id": instance_id,
        "group": group,
        "direct": direct_result["status"],
        "watcher": finished["status"],
    }


def test_race_with_run_command_backs_up_once_per_termination(stack: Stack, tmp_path: Path) -> None:
    src = source_tree(tmp_path / "src", size=64 * 1024)
    with FaultProxy(stack.s3_endpoint) as proxy, ThreadPoolExecutor(PARALLEL) as pool:
        rounds = list(pool.map(lambda n: _race_round(stack, proxy, src, n), range(ROUNDS)))
    keys = archives(stack)
    docs = sns_docs(stack)
    calls = autoscaling.calls(ACCOUNT, REGION)
    rejected = 0
    for r in rounds:
        # Exactly one run did the work; the other reported the first one's outcome.
        assert sorted([r["direct"], r["watcher"]]) == ["duplicate", "succeeded"], r
        assert len([k for k in keys if f"/{r['instance_id']}/" in k]) == 1, r
        assert len([d for d in docs if d["instance_id"] == r["instance_id"]]) == 1, r
        mine = [c for c in calls if c.group == r["group"]]
        completes = [c for c in mine if c.action == "CompleteLifecycleAction"]
        assert [(c.result, c.outcome) for c in completes] == [("CONTINUE", "ok")], r
        rejected += len([c for c in mine if c.outcome != "ok"])
    won = sum(1 for r in rounds if r["watcher"] == "succeeded")
    print(
        f"\nrace: {ROUNDS} rounds, watcher first {won}, Run Command first {ROUNDS - won}, "
        f"rejected lifecycle calls {rejected}"
    )
    # A rejected call here could only be a heartbeat racing the other run's completion.
    assert all(
        c.action != "CompleteLifecycleAction" or c.outcome == "ok"
        for c in calls
        if c.group.startswith("race-")
    )


# --- 4. the drain gate -------------------------------------------------------------------


def test_drain_gate_waits_with_heartbeats_and_opens_on_removal(stack: Stack, tmp_path: Path) -> None:
    src = source_tree(tmp_path / "src")
    marker = tmp_path / "worker.busy"
    marker.write_text("job 42\n")
    inflight = tmp_path / "inflight"
    inflight.mkdir()
    (inflight / "job-43").write_text("running\n")
    with watch(
        stack,
        "--source",
        str(src),
        "--drain-path",
        str(marker),
        "--drain-path",
        str(inflight),
        "--drain-timeout",
        "60",
    ) as w:
        w.wait_for("watching")
        stack.scale_in()
        w.wait_for("waiting for drain paths")
        beats_before = len(stack.lifecycle_calls("RecordLifecycleActionHeartbeat"))
        (inflight / "job-43").unlink()  # an empty in-flight dir counts as drained ...

        def beats() -> int:
            calls = stack.lifecycle_calls("RecordLifecycleActionHeartbeat")
            return len([c for c in calls if c.outcome == "ok"])

        # ... but the marker still holds the backup back, through three more heartbeats.
        until(
            lambda: w.find("backup started") or beats() - beats_before >= 3,
            "heartbeats to continue while draining",
            timeout=30,
        )
        assert not w.find("backup started")
        removed = time.monotonic()
        marker.unlink()
        started, _ = w.wait_for("backup started")
        _, done = w.wait_for("response finished", timeout=60)
    print(f"\ndrain: backup started {started - removed:.3f} s after the marker went")
    assert started - removed <= 1.0
    assert done["status"] == "succeeded" and done["lifecycle_result"] == "CONTINUE"
    doc = sns_docs(stack)[0]
    assert doc["drain"]["drained"] is True and doc["drain"]["busy"] == []
    assert completions(stack) == [("CONTINUE", "ok")]


def test_drain_gate_gives_up_at_timeout_with_a_warning(stack: Stack, tmp_path: Path) -> None:
    src = source_tree(tmp_path / "src")
    marker = tmp_path / "worker.busy"
    marker.write_text("stuck\n")
    with watch(stack, "--source", str(src), "--drain-path", str(marker), "--drain-timeout", "1.5") as w:
        w.wait_for("watching")
        stack.scale_in()
        t_wait, _ = w.wait_for("waiting for drain paths")
        t_warn, warning = w.wait_for("drain timeout reached; backing up anyway")
        _, done = w.wait_for("response finished", timeout=60)
    assert warning["level"] == "warning" and warning["busy"] == [str(marker)]
    assert 1.5 <= warning["waited_s"] < 2.5 and 1.3 <= t_warn - t_wait < 2.5
    assert done["status"] == "succeeded" and done["lifecycle_result"] == "CONTINUE"
    doc = sns_docs(stack)[0]
    assert doc["drain"] == {"drained": False, "waited_s": warning["waited_s"], "busy": [str(marker)]}
    assert marker.exists()


# --- pre-commands, rebalance and SIGHUP --------------------------------------------------


def test_fatal_pre_command_fails_reports_and_abandons(stack: Stack, tmp_path: Path) -> None:
    src = source_tree(tmp_path / "src")
    with watch(
        stack,
        "--source",
        str(src),
        "--pre-command",
        "echo cannot stop app; exit 4",
        "--pre-command-fatal",
        "--post-command",
        "echo post",
    ) as w:
        w.wait_for("watching")
        stack.scale_in()
        _, done = w.wait_for("response finished", timeout=60)
    assert done["status"] == "failed" and done["lifecycle_result"] == "ABANDON"
    doc = sns_docs(stack)[0]
    assert doc["error"] == "pre-command failed (--pre-command-fatal)"
    assert [(c["phase"], c["exit_code"], c["output"]) for c in doc["commands"]] == [
        ("pre", 4, "cannot stop app\n"),
        ("post", 0, "post\n"),
    ]
    assert archives(stack) == [] and stack.incomplete_uploads() == []
    assert completions(stack) == [("ABANDON", "ok")]


def test_sighup_reloads_config_and_keeps_it_when_invalid(stack: Stack, tmp_path: Path) -> None:
    src = source_tree(tmp_path / "src")
    conf = tmp_path / "agent.toml"
    conf.write_text(f'bucket = "{stack.bucket}"\nsource = ["{src}"]\non_rebalance = "log"\n')
    with watch(stack, "--config", str(conf)) as w:
        w.wait_for("watching")
        stack.imds.rebalance = {"noticeTime": "2026-11-26T10:00:00Z"}
        w.wait_for("rebalance recommendation")
        time.sleep(3 * POLL)
        assert not w.find("starting the backup")  # --on-rebalance log: a log line only

        conf.write_text(f'source = ["{src}"]\non_rebalance = "sometimes"\n')
        w.send(signal.SIGHUP)
        _, failed = w.wait_for("config reload failed; keeping the running config")
        assert "expected one of log, backup" in failed["error"] and failed["level"] == "error"
        assert w.proc.poll() is None

        conf.write_text(f'bucket = "{stack.bucket}"\nsource = ["{src}"]\non_rebalance = "backup"\n')
        w.send(signal.SIGHUP)
        _, reloaded = w.wait_for("config reloaded")
        assert reloaded["changed"] == ["on_rebalance"]
        stack.imds.rebalance = {"noticeTime": "2026-11-26T10:05:00Z"}
        _, done = w.wait_for("response finished", timeout=60, trigger="rebalance")
    assert done["status"] == "succeeded" and done["lifecycle_result"] == "none"
    assert archives(stack) == [done["key"]] and stack.lifecycle_calls() == []


# --- 6. signals --------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_while_idle_exits_0_within_1s(stack: Stack, sig: int) -> None:
    with watch(stack) as w:
        w.wait_for("watching")
        sent = w.send(sig)
        assert w.wait(5) == 0
        assert time.monotonic() - sent < 1.0
    assert stack.lifecycle_calls() == [] and stack.objects() == {}


def test_sigterm_mid_backup_past_stop_grace_aborts_reports_completes(stack: Stack, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.bin").write_bytes(os.urandom(40 * 1024 * 1024))  # 5 parts, incompressible
    with FaultProxy(stack.s3_endpoint) as proxy:
        slow = proxy.add_rule(Rule(query=upload_part, fault=Delay(2.0)))
        env = stack.env(AWS_ENDPOINT_URL_S3=proxy.endpoint, INSTANCE_AGENT_LOG_LEVEL="info")
        # --compression none: the pipeline checks the cancel event as it writes into the
        # compressor, and multithreaded zstd would swallow these 40 MiB whole and flush
        # them at close, where nothing checks it (reported to the pipeline's owner).
        with watch(
            stack,
            "--source",
            str(src),
            "--stop-grace",
            "1",
            "--upload-workers",
            "1",
            "--upload-queue",
            "1",
            "--compression",
            "none",
            env=env,
        ) as w:
            w.wait_for("watching")
            stack.scale_in()
            w.wait_for("backup started")
            assert slow.fired.wait(30)
            sent = w.send(signal.SIGTERM)
            t_cancel, _ = w.wait_for("stop grace over: cancelling the backup")
            _, done = w.wait_for("response finished", timeout=60)
            code = w.wait(30)
    # It kept going for the grace first. The grace runs from the signal's arrival, and `sent`
    # is read after kill() returns: on a loaded machine the test thread can be descheduled
    # in between, so the two clocks may differ by a little (0.9997 s seen in CI).
    assert t_cancel - sent >= 0.9
    assert code == 1  # the stop cut a backup short: systemd shows the unit failed
    assert done["status"] == "failed" and done["lifecycle_result"] == "ABANDON"
    assert stack.incomplete_uploads() == []
    assert archives(stack) == []
    docs = sns_docs(stack)
    assert len(docs) == 1 and docs[0]["status"] == "failed"
    assert "cancelled" in docs[0]["error"]
    assert completions(stack) == [("ABANDON", "ok")]


# --- 7. a bad IMDS -----------------------------------------------------------------------

# The CLI refuses polls under 0.5 s; this runs the same daemon with a 10 ms interval so
# 500 polls take seconds, not minutes.
SHORT_POLL_WATCHER = """
import dataclasses, os, sys
from instance_agent import config, logs, watch_cli
cfg = config.load({}, os.environ, command=config.WATCH)
cfg = dataclasses.replace(cfg, poll_interval=float(sys.argv[1]))
logs.setup(cfg.log_level)
sys.exit(watch_cli.run_watcher(cfg))
"""
POLLS = 500


def test_bad_imds_errors_then_404_then_inservice(stack: Stack) -> None:
    imds = stack.imds
    imds.fail_status = 500
    imds.target_lifecycle_state = None
    env = stack.env(INSTANCE_AGENT_LOG_LEVEL="info", INSTANCE_AGENT_BUCKET=stack.bucket)

    def lifecycle_polls(status: int | None = None) -> int:
        return len(
            [
                r
                for r in imds.requests
                if r[0] == "GET"
                and r[1].endswith("target-lifecycle-state")
                and (status is None or r[2] == status)
            ]
        )

    def until(count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while lifecycle_polls() < count:
            assert w.proc.poll() is None, w.text()
            assert time.monotonic() < deadline, f"{lifecycle_polls()} polls"
            time.sleep(0.01)

    with WatchProc([sys.executable, "-c", SHORT_POLL_WATCHER, "0.01"], env) as w:
        time.sleep(3.0)  # 300 intervals of errors: backoff turns them into a handful
        errors = lifecycle_polls(500)
        assert 3 <= errors <= 15, errors
        imds.fail_status = None  # now 404: no lifecycle transition yet
        until(POLLS // 2, 30)
        imds.target_lifecycle_state = "InService"
        until(POLLS, 30)
        assert w.proc.poll() is None, w.text()  # no crash
        w.send(signal.SIGTERM)
        assert w.wait(5) == 0
    polls = lifecycle_polls()
    lines = w.lines()
    print(f"\nbad IMDS: {polls} lifecycle polls ({errors} answered 500), {lines} log lines")
    assert polls >= POLLS
    assert not w.find("starting the backup") and stack.objects() == {}
    assert lines <= 15, w.text()
    assert len(w.find("IMDS request failed; backing off")) == 3  # once per path
    states = [r["state"] for _, r in w.find("target lifecycle state")]
    assert states == ["none (404: no lifecycle transition yet)", "InService"]
