"""Instance retention end to end (issue 18 item 3): with the group's instance lifecycle policy
`TerminateHookAbandon: retain` and a bucket that denies writes, the watcher's backup ends in
ABANDON and the instance is `Terminating:Retained`; once writes are allowed again, one archive
lands and the agent calls TerminateInstanceInAutoScalingGroup once. Without the policy, ABANDON
terminates as before. The retry timing is shortened with the real `--retain-first-retry`."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from conftest import ACCOUNT, REGION, Stack
from support.agentproc import WatchProc, archives, completions, sns_docs, source_tree, watch
from support.faultproxy import FaultProxy, HoldUntil, Rule, access_denied
from support.trees import walk

from instance_agent.local import autoscaling
from instance_agent.local.serve import wait_until

RETAIN = {"RetentionTriggers": {"TerminateHookAbandon": "retain"}}


def _terminate_calls(proxy: FaultProxy) -> int:
    return sum(r.api_action == "TerminateInstanceInAutoScalingGroup" for r in proxy.requests)


def _denied_watcher(stack: Stack, src: Path, s3: FaultProxy, asg: FaultProxy) -> WatchProc:
    """The watcher, with every S3 request answered 403 and Auto Scaling behind a logging proxy."""
    s3.add_rule(Rule(fault=access_denied()))
    env = stack.env(
        INSTANCE_AGENT_LOG_LEVEL="info",
        AWS_ENDPOINT_URL_S3=s3.endpoint,
        AWS_ENDPOINT_URL_AUTO_SCALING=asg.endpoint,
    )
    return watch(stack, "--source", str(src), "--retain-first-retry", "2", env=env)


def _retained(stack: Stack, timeout: float = 10.0) -> bool:
    """The instance reaches Terminating:Retained, through the wait's Proceed step (on AWS
    as on the stand-in: local/retention.py)."""
    return wait_until(lambda: stack.state() == "Terminating:Retained", timeout)


def _gone(stack: Stack, timeout: float = 10.0) -> bool:
    return wait_until(lambda: stack.state() is None, timeout)


def test_retained_instance_retries_until_the_backup_lands_then_terminates(
    stack: Stack, tmp_path: Path
) -> None:
    stack.client("autoscaling").update_auto_scaling_group(
        AutoScalingGroupName=stack.group, InstanceLifecyclePolicy=RETAIN
    )
    src = source_tree(tmp_path / "src")
    with FaultProxy(stack.s3_endpoint) as s3, FaultProxy(stack.moto.endpoint) as asg:
        with _denied_watcher(stack, src, s3, asg) as w:
            w.wait_for("watching")
            stack.scale_in()
            w.wait_for("instance retained after ABANDON; retrying the backup", timeout=60)
            assert stack.state() == "Terminating:Retained"
            assert completions(stack) == [("ABANDON", "ok")]
            assert archives(stack) == []
            s3.clear()  # writes are allowed again
            _, done = w.wait_for("retained instance recovered", timeout=60)
            w.wait_for("response finished", timeout=30)
        assert _terminate_calls(asg) == 1
    assert archives(stack) == [done["key"]]
    assert stack.gnu_restore(done["key"], src, tmp_path) == walk(src)
    assert _gone(stack)
    docs = sns_docs(stack)
    assert [(d.get("event"), d["status"]) for d in docs] == [
        (None, "failed"),
        ("instance_retained", "retained"),
        ("retained_recovered", "succeeded"),
    ]
    assert docs[0]["lifecycle_result"] == "ABANDON" and "AccessDenied" in docs[0]["error"]
    assert docs[1]["instance_id"] == stack.instance_id and docs[1]["attempts"] == 0
    assert docs[2]["key"] == done["key"] and docs[2]["attempts"] >= 1


def test_without_the_policy_abandon_terminates_as_before(stack: Stack, tmp_path: Path) -> None:
    src = source_tree(tmp_path / "src")
    with FaultProxy(stack.s3_endpoint) as s3, FaultProxy(stack.moto.endpoint) as asg:
        with _denied_watcher(stack, src, s3, asg) as w:
            w.wait_for("watching")
            stack.scale_in()
            _, done = w.wait_for("response finished", timeout=60)
        assert _terminate_calls(asg) == 0
    assert done["status"] == "failed" and done["lifecycle_result"] == "ABANDON"
    assert _gone(stack)
    assert [d["status"] for d in sns_docs(stack)] == ["failed"]
    assert w.find("instance retained after ABANDON; retrying the backup") == []


def _doctor_retained(stack: Stack) -> dict[str, Any]:
    """`doctor --json`'s "retained" check, with the stack's bucket and topic, no agent.toml."""
    empty = stack.tmp / "agent.toml"
    empty.touch()
    proc = stack.run(
        "doctor",
        "--bucket",
        stack.bucket,
        "--topic-arn",
        stack.topic_arn,
        "--json",
        env=stack.env(INSTANCE_AGENT_CONFIG=str(empty)),
        timeout=120,
    )
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert proc.returncode == 1, proc.stdout  # a retained instance is a failed check
    return dict(checks["retained"])


def test_after_run_commands_abandon_the_watcher_retries(stack: Stack, tmp_path: Path) -> None:
    """The push path (issue 18 item 3): Run Command's backup fails and ends in ABANDON; the
    instance is retained. The watcher, which outlives any Run Command execution timeout,
    finds the record of that failure under the lock and is the one that retries."""
    stack.client("autoscaling").update_auto_scaling_group(
        AutoScalingGroupName=stack.group, InstanceLifecyclePolicy=RETAIN
    )
    src = source_tree(tmp_path / "src")
    stack.scale_in()
    token = autoscaling.active_actions(ACCOUNT, REGION, group=stack.group)[0].token
    with FaultProxy(stack.s3_endpoint) as s3, FaultProxy(stack.moto.endpoint) as asg:
        s3.add_rule(Rule(fault=access_denied()))
        env = stack.env(AWS_ENDPOINT_URL_S3=s3.endpoint, AWS_ENDPOINT_URL_AUTO_SCALING=asg.endpoint)
        proc, first = stack.backup("--source", str(src), "--lifecycle-token", token, env=env)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert (first["status"], first["lifecycle_result"]) == ("failed", "ABANDON")
        assert _retained(stack)
        assert _terminate_calls(asg) == 0  # Run Command itself does not retry
        check = _doctor_retained(stack)
        assert check["result"] == "fail" and "no watcher is retrying it" in check["message"], check
        with watch(
            stack,
            "--source",
            str(src),
            "--retain-first-retry",
            "1",
            env=stack.env(
                INSTANCE_AGENT_LOG_LEVEL="info",
                AWS_ENDPOINT_URL_S3=s3.endpoint,
                AWS_ENDPOINT_URL_AUTO_SCALING=asg.endpoint,
            ),
        ) as w:
            w.wait_for("retry of the backup failed", timeout=60)
            check = _doctor_retained(stack)
            assert "the watcher retries the backup" in check["message"], check
            assert "AccessDenied" in check["message"] and "next retry in" in check["message"], check
            assert "terminate-instance-in-auto-scaling-group" in check["fix"], check
            s3.clear()  # writes are allowed again
            w.wait_for("retained after the other path's ABANDON; the watcher retries the backup", timeout=60)
            _, done = w.wait_for("retained instance recovered", timeout=60)
            _, finished = w.wait_for("response finished", timeout=30)
        assert _terminate_calls(asg) == 1
    assert finished["status"] == "succeeded"
    assert archives(stack) == [done["key"]]
    assert stack.gnu_restore(done["key"], src, tmp_path) == walk(src)
    assert _gone(stack)
    assert [(d.get("event"), d["status"]) for d in sns_docs(stack)] == [
        (None, "failed"),
        ("instance_retained", "retained"),
        ("retained_recovered", "succeeded"),
    ]
    assert completions(stack) == [("ABANDON", "ok")]


def test_a_backup_that_lands_after_its_action_expired_lets_the_retained_instance_go(
    stack: Stack, tmp_path: Path
) -> None:
    """The hook times out while the archive's completion is held: DefaultResult ABANDON
    retains the instance as an explicit ABANDON does ("Configure instance retention"). The
    backup then lands, so the watcher lets the instance go once; before, it stayed retained
    and billed with its backup in S3, and nothing would release it."""
    stack.client("autoscaling").update_auto_scaling_group(
        AutoScalingGroupName=stack.group, InstanceLifecyclePolicy=RETAIN
    )
    src = source_tree(tmp_path / "src")
    release = threading.Event()
    offset = [0.0]
    autoscaling.set_clock(lambda: time.monotonic() + offset[0])
    try:
        with FaultProxy(stack.s3_endpoint) as s3, FaultProxy(stack.moto.endpoint) as asg:
            held = s3.add_rule(Rule(fault=HoldUntil(release, timeout=60), method="POST", path="uploadId="))
            env = stack.env(
                INSTANCE_AGENT_LOG_LEVEL="info",
                AWS_ENDPOINT_URL_S3=s3.endpoint,
                AWS_ENDPOINT_URL_AUTO_SCALING=asg.endpoint,
            )
            with watch(stack, "--source", str(src), env=env) as w:
                w.wait_for("watching")
                stack.scale_in()
                assert held.fired.wait(30), "the archive's CompleteMultipartUpload never came"
                offset[0] = 10 * 86400.0  # past the hook's heartbeat and global timeouts
                assert _retained(stack)  # expired with ABANDON, through Terminating:Proceed
                release.set()
                w.wait_for(
                    "instance retained although its backup landed (the action had expired); letting it go"
                )
                _, finished = w.wait_for("response finished", timeout=60)
            assert _terminate_calls(asg) == 1
    finally:
        autoscaling.set_clock(time.monotonic)
    assert [(o.result, o.how) for o in stack.outcomes()] == [("ABANDON", "expired")]
    assert finished["status"] == "succeeded"
    [key] = archives(stack)
    assert stack.gnu_restore(key, src, tmp_path) == walk(src)
    docs = sns_docs(stack)
    assert [(d.get("event"), d["status"]) for d in docs] == [
        (None, "succeeded"),
        ("retained_recovered", "succeeded"),
    ]
    assert docs[1]["key"] == key
    assert _gone(stack)
