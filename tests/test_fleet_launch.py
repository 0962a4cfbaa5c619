"""The launching hook's gate, as the user data runs it on the local stand-in: the instance
goes in service (or into the warm pool) only when `instance-agent doctor --launch` passes.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import ACCOUNT, REGION, Stack
from support.faultproxy import FaultProxy, Rule, access_denied

from instance_agent.local import launching

USER_DATA = Path(__file__).resolve().parents[1] / "packaging" / "user-data.sh"


def launch_hook(stack: Stack) -> str:
    hook = f"launch-{uuid.uuid4().hex[:8]}"
    stack.client("autoscaling").put_lifecycle_hook(
        AutoScalingGroupName=stack.group,
        LifecycleHookName=hook,
        LifecycleTransition=launching.LAUNCHING,
        HeartbeatTimeout=600,
        DefaultResult="ABANDON",
    )
    return hook


def run_gate(stack: Stack, hook: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The user data's launch_gate, with /opt/instance-agent standing for this checkout's agent."""
    prefix = tmp_path / "opt"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "python").symlink_to(sys.executable)
    (prefix / "bin" / "instance-agent").symlink_to(Path(sys.executable).parent / "instance-agent")
    script = (
        f"INSTANCE_AGENT_USER_DATA_LIB=1 source {USER_DATA} && PREFIX={prefix} LAUNCH_HOOK={hook} launch_gate"
    )
    return subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=stack.env(INSTANCE_AGENT_BUCKET=stack.bucket, INSTANCE_AGENT_TOPIC_ARN=stack.topic_arn, **env),
    )


@pytest.fixture(autouse=True)
def _launching() -> None:
    launching.install()


@pytest.mark.parametrize("warm_pool", [False, True], ids=["pending-wait", "warmed-pending-wait"])
def test_launch_whose_doctor_passes_completes_continue(stack: Stack, tmp_path: Path, warm_pool: bool) -> None:
    hook = launch_hook(stack)
    launching.begin_launch(
        stack.group, stack.instance_id, hook, warm_pool=warm_pool, account_id=ACCOUNT, region=REGION
    )
    assert stack.state() == ("Warmed:Pending:Wait" if warm_pool else "Pending:Wait")

    proc = run_gate(stack, hook, tmp_path)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "launching lifecycle action: CONTINUE" in proc.stdout
    [outcome] = [o for o in launching.outcomes(ACCOUNT, REGION) if o.instance_id == stack.instance_id]
    assert (outcome.hook, outcome.result) == (hook, "CONTINUE")
    assert stack.state() == ("Warmed:Stopped" if warm_pool else "InService")


def test_launch_whose_doctor_fails_completes_abandon(stack: Stack, tmp_path: Path) -> None:
    hook = launch_hook(stack)
    launching.begin_launch(stack.group, stack.instance_id, hook, account_id=ACCOUNT, region=REGION)

    with FaultProxy(stack.s3_endpoint) as proxy:  # the role may not write to the bucket
        proxy.add_rule(Rule(fault=access_denied()))
        proc = run_gate(stack, hook, tmp_path, AWS_ENDPOINT_URL_S3=proxy.endpoint)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "AccessDenied" in proc.stdout  # doctor's report, in the install log
    assert "launching lifecycle action: ABANDON" in proc.stdout
    [outcome] = [o for o in launching.outcomes(ACCOUNT, REGION) if o.instance_id == stack.instance_id]
    assert (outcome.hook, outcome.result) == (hook, "ABANDON")
    assert stack.state() == "Terminating:Proceed"
