"""One backup and one honest completion per lifecycle action, in the timings AWS really
produces: a deregistration delay before Terminating:Wait, several actions on one instance
(warm-pool reuse), Run Command and the watcher in either order behind one drain gate, brief
outages, permanent refusals, and a stop signal at every stage.

Everything runs against the local stand-in: moto with the lifecycle-hook model, SeaweedFS,
and the IMDSv2 stub; the agent runs as a subprocess, as on an instance.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from conftest import ACCOUNT, REGION, Stack
from support import scoreboard
from support.agentproc import WatchProc, archives, completions, sns_docs, source_tree, watch
from support.trees import walk
from support.waits import next_second

from instance_agent.local import autoscaling, launching

DENIED = (
    "User: arn:aws:sts::123456789012:assumed-role/agent/i-0 is not authorized to perform: "
    "autoscaling:CompleteLifecycleAction on resource: arn:aws:autoscaling:us-east-1:"
    "123456789012:autoScalingGroup:*"
)


def token_of(stack: Stack) -> str:
    actions = autoscaling.active_actions(ACCOUNT, REGION, group=stack.group)
    assert len(actions) == 1, actions
    return actions[0].token


def restored_text(stack: Stack, key: str, src: Path, tmp: Path, rel: bytes) -> bytes:
    tree = stack.gnu_restore(key, src, tmp)
    assert rel in tree, sorted(tree)
    content = tree[rel][1]
    assert content is not None
    return content


def agent(stack: Stack, *args: str, env: dict[str, str] | None = None) -> WatchProc:
    """`instance-agent backup` as a background process whose log lines we can wait for."""
    argv = stack.backup_argv(*args)
    return WatchProc(argv, env or stack.env(INSTANCE_AGENT_LOG_LEVEL="info"))


def one_json_line(stdout: str) -> dict[str, Any]:
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout
    doc = json.loads(lines[0])
    assert isinstance(doc, dict)
    return doc


# --- 1. one action, one backup; a completed action is never the current one --------------


def test_two_actions_on_one_instance_two_archives_two_continues(stack: Stack, tmp_path: Path) -> None:
    src = source_tree(tmp_path / "src")
    # First action: a return to the warm pool, with a backup asked for.
    autoscaling.return_to_warm_pool(stack.group, stack.instance_id, account_id=ACCOUNT, region=REGION)
    stack.imds.target_lifecycle_state = "Warmed:Stopped"
    token = token_of(stack)
    proc, first = stack.backup("--source", str(src), "--lifecycle-token", token, "--warm-pool-backup")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert first["action"] == "warm-pool-return" and first["lifecycle_result"] == "CONTINUE"
    assert stack.state() == "Warmed:Stopped"
    assert token not in proc.stdout + proc.stderr

    # Back in service, then a real scale-in: a new action, with no token (the watcher's
    # way) — the completed first action must not make it a duplicate.
    autoscaling.leave_warm_pool(stack.group, stack.instance_id, account_id=ACCOUNT, region=REGION)
    next_second()  # keeps the two keys' second-resolution timestamps apart
    stack.scale_in()
    proc, second = stack.backup("--source", str(src))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert second["status"] == "succeeded" and second["lifecycle_result"] == "CONTINUE"
    assert archives(stack) == sorted([first["key"], second["key"]])
    assert completions(stack) == [("CONTINUE", "ok"), ("CONTINUE", "ok")]


def test_warm_pool_return_runs_commands_completes_and_is_not_the_termination(
    stack: Stack, tmp_path: Path
) -> None:
    src = source_tree(tmp_path / "src")
    marker = tmp_path / "pre-ran"
    with watch(stack, "--source", str(src), "--pre-command", f"echo x >> {marker}") as w:
        w.wait_for("watching")
        autoscaling.return_to_warm_pool(stack.group, stack.instance_id, account_id=ACCOUNT, region=REGION)
        stack.imds.target_lifecycle_state = "Warmed:Stopped"
        _, warm = w.wait_for("response finished", timeout=60, trigger="warm-pool")
        assert warm["status"] == "skipped" and warm["lifecycle_result"] == "CONTINUE"
        assert archives(stack) == []
        assert stack.state() == "Warmed:Stopped"
        assert marker.read_text() == "x\n"

        # Later the instance serves again, and is really terminated: that gets its backup.
        autoscaling.leave_warm_pool(stack.group, stack.instance_id, account_id=ACCOUNT, region=REGION)
        stack.imds.target_lifecycle_state = "InService"
        time.sleep(1.5)
        stack.scale_in()
        _, done = w.wait_for("response finished", timeout=60, trigger="termination")
    assert done["status"] == "succeeded" and done["lifecycle_result"] == "CONTINUE"
    assert archives(stack) == [done["key"]]
    assert completions(stack) == [("CONTINUE", "ok"), ("CONTINUE", "ok")]
    assert marker.read_text() == "x\nx\n"
    assert [d["action"] for d in sns_docs(stack)] == ["warm-pool-return", "termination"]


# --- 2. behind a load balancer: archive only once Auto Scaling holds the instance ---------


def test_deregistration_delay_logs_are_archived_and_completion_follows_wait(
    stack: Stack, tmp_path: Path
) -> None:
    src = source_tree(tmp_path / "src")
    log = src / "app" / "app.log"
    with watch(stack, "--source", str(src)) as w:
        w.wait_for("watching")
        flipped = time.monotonic()
        stack.scale_in(wait_delay=8.0)  # IMDS says Terminated now; Wait comes in 8 s
        w.wait_for("starting the backup", trigger="termination")
        time.sleep(3.0)
        with log.open("a") as fh:
            fh.write("connection drained at +3 s\n")  # written while the target deregisters
        archiving, _ = w.wait_for("backup started", timeout=30)
        _, done = w.wait_for("response finished", timeout=60)
    assert archiving - flipped >= 7.5  # nothing archived before Terminating:Wait
    assert done["status"] == "succeeded" and done["lifecycle_result"] == "CONTINUE"
    content = restored_text(stack, done["key"], src, tmp_path, b"app/app.log")
    assert content.endswith(b"connection drained at +3 s\n")
    assert completions(stack) == [("CONTINUE", "ok")]  # no early, refused completion
    assert [o.how for o in stack.outcomes()] == ["completed"]


# --- 3. one gate for both paths --------------------------------------------------------------


def test_run_command_waits_behind_the_watchers_drain_gate(stack: Stack, tmp_path: Path) -> None:
    src = source_tree(tmp_path / "src")
    busy = tmp_path / "busy"
    busy.write_text("job 42\n")
    # One configuration for both paths, as the instance's agent.toml gives it.
    stack.extra_env.update(
        INSTANCE_AGENT_DRAIN_PATH=str(busy),
        INSTANCE_AGENT_PRE_COMMAND=f"echo stopped > {src}/app/pre-command.txt",
        INSTANCE_AGENT_SOURCE=str(src),
    )
    with watch(stack) as w:
        w.wait_for("watching")
        stack.scale_in()
        w.wait_for("drain gate: waiting for the paths to clear", timeout=30)
        # Run Command arrives while the watcher waits for the worker.
        with agent(stack, "--lifecycle-token", token_of(stack)) as ssm:
            ssm.wait_for("another run holds the termination lock; waiting", timeout=30)
            time.sleep(1.0)
            released = time.monotonic()
            busy.unlink()
            _, done = w.wait_for("response finished", timeout=60)
            assert ssm.wait(timeout=60) == 0, ssm.text()
            dup = one_json_line(ssm.stdout())
    assert done["status"] == "succeeded" and done["lifecycle_result"] == "CONTINUE"
    assert dup["status"] == "duplicate" and dup["key"] == done["key"]
    calls = stack.lifecycle_calls("CompleteLifecycleAction")
    assert [(c.result, c.outcome) for c in calls] == [("CONTINUE", "ok")]
    assert calls[0].at > released
    content = restored_text(stack, done["key"], src, tmp_path, b"app/pre-command.txt")
    assert content == b"stopped\n"
    assert len(stack.sns()) == 1


def test_run_command_first_drains_and_runs_the_pre_command_itself(stack: Stack, tmp_path: Path) -> None:
    src = source_tree(tmp_path / "src")
    busy = tmp_path / "busy"
    busy.write_text("job 7\n")
    stack.extra_env.update(
        INSTANCE_AGENT_DRAIN_PATH=str(busy),
        INSTANCE_AGENT_PRE_COMMAND=f"echo stopped > {src}/app/pre-command.txt",
    )
    stack.scale_in()
    with agent(stack, "--source", str(src), "--lifecycle-token", token_of(stack)) as ssm:
        ssm.wait_for("drain gate: waiting for the paths to clear", timeout=30)
        time.sleep(1.0)
        assert completions(stack) == []  # nothing completed while the worker is busy
        released = time.monotonic()
        busy.unlink()
        assert ssm.wait(timeout=60) == 0, ssm.text()
        result = one_json_line(ssm.stdout())
    assert result["status"] == "succeeded" and result["lifecycle_result"] == "CONTINUE"
    calls = stack.lifecycle_calls("CompleteLifecycleAction")
    assert [(c.result, c.outcome) for c in calls] == [("CONTINUE", "ok")]
    assert calls[0].at > released
    content = restored_text(stack, result["key"], src, tmp_path, b"app/pre-command.txt")
    assert content == b"stopped\n"
    assert [c["phase"] for c in result["commands"]] == ["pre"]


# --- 5. brief outages right after the flip ------------------------------------------------


def test_autoscaling_outage_after_the_flip_still_completes(stack: Stack, tmp_path: Path) -> None:
    src = source_tree(tmp_path / "src")
    with watch(stack, "--source", str(src)) as w:
        w.wait_for("watching")
        time.sleep(1.0)  # the watcher has resolved its identity while IMDS answers
        autoscaling.inject_error(
            "DescribeAutoScalingInstances",
            "ServiceUnavailable",
            "Service is unavailable",
            times=6,
            account_id=ACCOUNT,
            region=REGION,
        )
        stack.scale_in()
        w.wait_for("starting the backup", trigger="termination")
        stack.imds.fail_status = 500  # and IMDS fails too, for 10 s
        time.sleep(10.0)
        stack.imds.fail_status = None
        _, done = w.wait_for("response finished", timeout=90)
    assert done["status"] == "succeeded" and done["lifecycle_result"] == "CONTINUE", w.text()
    assert completions(stack) == [("CONTINUE", "ok")]
    assert archives(stack) == [done["key"]]


# --- 6. completion that fails ---------------------------------------------------------------


# --- 7. deadlines are upper bounds ------------------------------------------------------------


def test_silent_journalctl_cannot_carry_the_run_past_max_duration(stack: Stack, tmp_path: Path) -> None:
    src = source_tree(tmp_path / "src")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "journalctl"
    fake.write_text("#!/bin/sh\nexec sleep 6001\n")  # prints nothing, never ends
    fake.chmod(0o755)
    env = stack.env(PATH=f"{bin_dir}:{os.environ['PATH']}", INSTANCE_AGENT_JOURNAL="1")
    started = time.monotonic()
    proc, result = stack.backup("--source", str(src), "--max-duration", "3", "--no-complete", env=env)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert elapsed < 3 + 8, elapsed
    assert result["journal_key"] is not None
    leftover = subprocess.run(["pgrep", "-f", "sleep 6001"], capture_output=True, text=True, check=False)
    assert leftover.stdout == "", "journalctl left running"


# --- 8. signals and odd answers at every stage ----------------------------------------------


def _stopped_cleanly(proc: WatchProc) -> dict[str, Any]:
    code = proc.wait(timeout=40)
    text = proc.text()
    assert "Traceback" not in text, text
    result = one_json_line(proc.stdout())
    assert code == 1 and result["status"] == "failed", result
    return result


def test_sigterm_while_waiting_for_the_lock(stack: Stack, tmp_path: Path) -> None:
    src = source_tree(tmp_path / "src")
    stack.scale_in()
    state = stack.tmp / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    with open(state / f"termination-{stack.instance_id}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another run holds it
        with agent(stack, "--source", str(src)) as run:
            run.wait_for("another run holds the termination lock; waiting", timeout=30)
            sent = run.send(signal.SIGTERM)
            result = _stopped_cleanly(run)
            assert time.monotonic() - sent < 10
    assert "lock" in result["error"]
    assert completions(stack) == [] and archives(stack) == []


def test_sigterm_while_waiting_for_terminating_wait(stack: Stack, tmp_path: Path) -> None:
    src = source_tree(tmp_path / "src")
    stack.scale_in(wait_delay=120.0)
    with agent(stack, "--source", str(src)) as run:
        run.wait_for("waiting for Auto Scaling to hold the instance in a wait state", timeout=30)
        sent = run.send(signal.SIGTERM)
        result = _stopped_cleanly(run)
        assert time.monotonic() - sent < 10
    assert "wait state" in result["error"]
    assert completions(stack) == [] and archives(stack) == []


def test_sigterm_during_the_drain_completes_with_on_failure(stack: Stack, tmp_path: Path) -> None:
    src = source_tree(tmp_path / "src")
    busy = tmp_path / "busy"
    busy.write_text("job\n")
    stack.scale_in()
    with agent(
        stack, "--source", str(src), "--drain-path", str(busy), "--lifecycle-token", token_of(stack)
    ) as run:
        run.wait_for("drain gate: waiting for the paths to clear", timeout=30)
        run.send(signal.SIGTERM)
        result = _stopped_cleanly(run)
    assert result["lifecycle_result"] == "ABANDON"
    assert completions(stack) == [("ABANDON", "ok")]
    assert archives(stack) == [] and stack.incomplete_uploads() == []
    assert [d["status"] for d in sns_docs(stack)] == ["failed"]


def test_imds_region_that_is_an_html_page_is_one_line_exit_2(stack: Stack, tmp_path: Path) -> None:
    stack.imds.region = "<html><body>502 Bad Gateway</body></html>"
    proc = stack.run("backup", "--bucket", stack.bucket, "--source", str(tmp_path))
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("{")]
    assert len(lines) == 1 and "not a region name" in lines[0], proc.stderr
    assert completions(stack) == []


def test_lifecycle_token_never_leaves_the_agent(stack: Stack, tmp_path: Path) -> None:
    src = source_tree(tmp_path / "src")
    # A token whose action is already gone: AWS's answer quotes it back.
    token = "c3f1a2b4-5d6e-4f70-8a9b-0c1d2e3f4a5b"
    proc, result = stack.backup("--source", str(src), "--lifecycle-token", token)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["lifecycle_result"] == "none"  # what happened: this run completed nothing
    assert any(
        c.token == token and c.outcome.startswith("No active Lifecycle Action")
        for c in stack.lifecycle_calls()
    )
    records = "".join(p.read_text() for p in (stack.tmp / "state").glob("*.json"))
    everything = proc.stdout + proc.stderr + json.dumps(sns_docs(stack)) + records
    assert token not in everything
    assert result["lifecycle_action"] and result["lifecycle_action"] in proc.stderr


def test_a_huge_sparse_file_cannot_carry_the_run_past_max_duration(stack: Stack, tmp_path: Path) -> None:
    src = source_tree(tmp_path / "src")
    with (src / "sparse.img").open("wb") as fh:
        fh.truncate(6 * 1024**3)  # 6 GiB of hole: nothing on disk, all of it in the tar
    started = time.monotonic()
    proc, result = stack.backup("--source", str(src), "--max-duration", "2", "--no-complete")
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["status"] in ("succeeded", "partial")
    assert elapsed < 2 + 8, elapsed


def test_max_duration_cuts_a_file_whose_read_outlasts_it(stack: Stack, tmp_path: Path) -> None:
    """Issue 19 item 9: the deadline was looked at only between files, so one large file
    carried the run past it (4 GiB and 1 s took 18 s). Here S3 takes each part slowly, so
    the read of one 96 MiB file follows the upload: about 12 s in all, with a 2 s deadline."""
    with scoreboard.scenario(
        "Deadline: --max-duration 2 against one 96 MiB file read at S3's pace (1 s per part)"
    ) as row:
        row.faults = "every UploadPart delayed 1 s (the whole file needs 12 parts)"
        from support.faultproxy import Delay, FaultProxy, Rule, upload_part

        src = tmp_path / "src"
        src.mkdir()
        data = os.urandom(96 * 1024 * 1024)  # incompressible: the upload paces the read
        (src / "big.log").write_bytes(data)
        with FaultProxy(stack.s3_endpoint) as s3:
            s3.add_rule(Rule(query=upload_part, fault=Delay(1.0)))
            started = time.monotonic()
            proc, result = stack.backup(
                "--source",
                str(src),
                "--max-duration",
                "2",
                "--upload-workers",
                "1",
                "--no-complete",
                env=stack.env(AWS_ENDPOINT_URL_S3=s3.endpoint),
            )
            elapsed = time.monotonic() - started
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert result["status"] == "partial"
        assert elapsed < 10, elapsed  # the whole file would take at least 12 parts of 1 s
        body = stack.client("s3").get_object(Bucket=stack.bucket, Key=result["key"] + ".manifest.json")[
            "Body"
        ]
        doc = json.loads(body.read())
        assert doc["totals"]["cut_short"] == 1
        [cut] = doc["cut_short"]
        kept = cut["kept"]
        assert cut["path"].endswith("big.log") and cut["size"] == len(data) and 0 < kept < len(data)
        [entry] = [e for e in doc["entries"] if e["type"] == "file"]
        assert entry["cut_at"] == kept and "sha256" not in entry

        listed = json.loads(stack.run("list", "--bucket", stack.bucket, "--json").stdout)
        assert [b["status"] for b in listed if b["key"] == result["key"]] == ["partial"]
        dest = tmp_path / "restored"
        proc = stack.run("restore", f"s3://{stack.bucket}/{result['key']}", str(dest))
        assert proc.returncode == 0, proc.stderr[-2000:]
        restored = (dest / str(src).lstrip("/") / "big.log").read_bytes()
        assert restored[:kept] == data[:kept] and restored[kept:] == bytes(len(data) - kept)
        row.bytes_lost = scoreboard.lost_bytes(
            walk(src), walk(src), walk(dest / str(src).lstrip("/")), [b"big.log"]
        )
        row.seconds = elapsed
        row.outcome = (
            f"partial after {elapsed:.1f} s; "
            f"manifest: cut_short (kept {kept:,} bytes), no digest of half a file; "
            f"the rest restored as zeros"
        )


def test_two_runs_within_one_second_both_keep_their_backup(stack: Stack, tmp_path: Path) -> None:
    src = source_tree(tmp_path / "src", size=4096)
    keys = []
    for _ in range(3):
        proc, result = stack.backup("--source", str(src), "--no-complete")
        assert proc.returncode == 0, proc.stderr[-2000:]
        keys.append(result["key"])
    assert len(set(keys)) == 3
    assert archives(stack) == sorted(keys)


# --- a fresh launch into the warm pool is not a termination ------------------------------
# A launching hook holds a new instance in Warmed:Pending:Wait on its way into the pool, and
# IMDS already says the target, Warmed:Stopped ("Use lifecycle hooks with a warm pool",
# https://docs.aws.amazon.com/autoscaling/ec2/userguide/warm-pool-instance-lifecycle.html).


def test_launch_into_the_warm_pool_backs_up_nothing_and_leaves_the_launch_alone(
    stack: Stack, tmp_path: Path
) -> None:
    launching.install()
    hook = stack.launch_hook()
    src = source_tree(tmp_path / "src")
    marker = tmp_path / "pre-ran"
    with watch(stack, "--source", str(src), "--pre-command", f"echo x >> {marker}") as w:
        w.wait_for("watching")
        launching.begin_launch(
            stack.group, stack.instance_id, hook, warm_pool=True, account_id=ACCOUNT, region=REGION
        )
        stack.imds.target_lifecycle_state = "Warmed:Stopped"
        _, done = w.wait_for("response finished", timeout=60, trigger="warm-pool")
    assert done["status"] == "skipped" and done["lifecycle_result"] == "none"
    assert archives(stack) == []
    assert sns_docs(stack) == []
    assert not marker.exists()
    # The launch is still held for whoever answers it, not completed by the watcher.
    assert stack.state() == "Warmed:Pending:Wait"
    assert [o for o in launching.outcomes(ACCOUNT, REGION) if o.instance_id == stack.instance_id] == []


# --- retained and root-volume states: never an ad-hoc run of the watcher -----------------
# A retained instance's terminating action ended in ABANDON; the group keeps the instance
# until TerminateInstanceInAutoScalingGroup
# (https://docs.aws.amazon.com/autoscaling/ec2/userguide/instance-lifecycle-policy.html).


# A root-volume replacement keeps the instance and discards its root volume; the group's
# terminating hooks hold it in ReplacingRootVolume:Wait, and its launching hooks hold it in
# Pending:Wait after (https://docs.aws.amazon.com/autoscaling/ec2/userguide/replace-root-volume.html,
# "Use lifecycle hooks with replace root volume"). It is its own kind of action, never the
# instance's termination.


def _replace_root_volume(stack: Stack) -> str:
    from instance_agent.local import rootvolume

    token = rootvolume.replace_root_volume(stack.group, stack.instance_id, account_id=ACCOUNT, region=REGION)
    assert token is not None
    assert stack.state() == "ReplacingRootVolume:Wait"
    return token


def test_root_volume_replacement_one_archive_one_continue_then_the_termination_its_own(
    stack: Stack, tmp_path: Path
) -> None:
    src = source_tree(tmp_path / "src")
    token = _replace_root_volume(stack)
    # The push path: Run Command carries the action's token.
    proc, rrv = stack.backup("--source", str(src), "--lifecycle-token", token)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert rrv["action"] == "root-volume" and rrv["status"] == "succeeded"
    assert rrv["lifecycle_result"] == "CONTINUE"
    assert token not in proc.stdout + proc.stderr
    assert completions(stack) == [("CONTINUE", "ok")]
    assert stack.state() == "InService"  # replaced; this group has no launching hook
    assert archives(stack) == [rrv["key"]]
    assert stack.gnu_restore(rrv["key"], src, tmp_path) == walk(src)

    # Later the same instance is really terminated: a second archive and a second CONTINUE.
    next_second()  # keeps the two keys' second-resolution timestamps apart
    stack.scale_in()
    proc, real = stack.backup("--source", str(src))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert real["action"] == "termination" and real["lifecycle_result"] == "CONTINUE"
    assert archives(stack) == sorted([rrv["key"], real["key"]])
    assert completions(stack) == [("CONTINUE", "ok"), ("CONTINUE", "ok")]
    assert [d["action"] for d in sns_docs(stack)] == ["root-volume", "termination"]
    assert stack.state() is None


def test_sigterm_during_completion_retries_ends_them_within_the_stop_grace(
    stack: Stack, tmp_path: Path
) -> None:
    """Issue 19 item 10: a stop during CompleteLifecycleAction's retries leaves them at most
    lifecycle.STOP_GRACE (20 s, as docs/architecture.md says), never --complete-timeout."""
    with scoreboard.scenario(
        "Deadline: SIGTERM while CompleteLifecycleAction is retried (Auto Scaling answers 503)"
    ) as row:
        row.faults = "every CompleteLifecycleAction 503 ServiceUnavailable; SIGTERM during the retries"
        from support.faultproxy import FaultProxy, Rule, query_error

        from instance_agent.lifecycle import STOP_GRACE

        src = source_tree(tmp_path / "src")
        stack.scale_in()
        unavailable = query_error("ServiceUnavailable", "Service is unavailable", status=503, kind="Receiver")
        with FaultProxy(stack.moto.endpoint) as asg:
            asg.add_rule(Rule(api_action="CompleteLifecycleAction", fault=unavailable))
            env = stack.env(INSTANCE_AGENT_LOG_LEVEL="info", AWS_ENDPOINT_URL_AUTO_SCALING=asg.endpoint)
            argv = stack.backup_argv("--source", str(src), "--complete-timeout", "300")
            with WatchProc(argv, env) as run:
                run.wait_for("completion failed; retrying", timeout=60)
                sent = run.send(signal.SIGTERM)
                code = run.wait(timeout=STOP_GRACE + 60)
                took = time.monotonic() - sent
        assert took <= STOP_GRACE + 5, took
        result = one_json_line(run.stdout())
        assert code == 1 and result["lifecycle_result"] == "none", result
        assert "gave up" in (result.get("lifecycle_error") or ""), result
        row.seconds = took
        row.outcome = (
            f"retries given up {took:.1f} s after the signal "
            f"(STOP_GRACE {STOP_GRACE:.0f} s, not --complete-timeout 300); exit 1, lifecycle_result none"
        )


def test_watcher_stopped_during_completion_retries_ends_them_within_the_stop_grace(
    stack: Stack, tmp_path: Path
) -> None:
    """Issue 19 item 10, the watcher: its --stop-grace (90 s) is for a backup still running;
    once only the completion's retries are left, a SIGTERM gives them STOP_GRACE at most."""
    from support.faultproxy import FaultProxy, Rule, query_error

    from instance_agent.lifecycle import STOP_GRACE

    src = source_tree(tmp_path / "src")
    unavailable = query_error("ServiceUnavailable", "Service is unavailable", status=503, kind="Receiver")
    with FaultProxy(stack.moto.endpoint) as asg:
        asg.add_rule(Rule(api_action="CompleteLifecycleAction", fault=unavailable))
        env = stack.env(INSTANCE_AGENT_LOG_LEVEL="info", AWS_ENDPOINT_URL_AUTO_SCALING=asg.endpoint)
        with watch(stack, "--source", str(src), "--complete-timeout", "300", env=env) as w:
            w.wait_for("watching")
            stack.scale_in()
            w.wait_for("completion failed; retrying", timeout=60)
            sent = w.send(signal.SIGTERM)
            _, done = w.wait_for("response finished", timeout=STOP_GRACE + 60)
            code = w.wait(timeout=30)
            took = time.monotonic() - sent
    assert took <= STOP_GRACE + 5, took
    # The backup landed; the action could not be completed, and the exit code says so.
    assert code == 1 and done["lifecycle_result"] == "none", done
    assert archives(stack) == [done["key"]]
