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
from support.agentproc import archives, source_tree, watch
from support.faultproxy import FaultProxy, Rule, access_denied

from instance_agent.local import autoscaling, launching

AGENT = str(Path(sys.executable).parent / "instance-agent")
USER_DATA = Path(__file__).resolve().parents[1] / "packaging" / "user-data.sh"


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
    hook = stack.launch_hook()
    launching.begin_launch(
        stack.group, stack.instance_id, hook, warm_pool=warm_pool, account_id=ACCOUNT, region=REGION
    )
    assert stack.state() == ("Warmed:Pending:Wait" if warm_pool else "Pending:Wait")

    proc = run_gate(stack, hook, tmp_path)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "launching lifecycle action: CONTINUE" in proc.stderr
    [outcome] = [o for o in launching.outcomes(ACCOUNT, REGION) if o.instance_id == stack.instance_id]
    assert (outcome.hook, outcome.result) == (hook, "CONTINUE")
    assert stack.state() == ("Warmed:Stopped" if warm_pool else "InService")


@pytest.mark.parametrize("warm_pool", [False, True], ids=["pending", "warmed-pending"])
def test_a_gate_that_runs_before_the_wait_begins_waits_for_it(
    stack: Stack, tmp_path: Path, warm_pool: bool
) -> None:
    """The user data can run while Auto Scaling still shows Pending, before the launching
    action exists (users report "No active Lifecycle Action found" from user data). The gate
    looked once, found no wait, and exited: the action then timed out with the hook's
    default result, and under ABANDON the instance was replaced."""
    hook = stack.launch_hook()
    launching.begin_launch(
        stack.group,
        stack.instance_id,
        hook,
        warm_pool=warm_pool,
        pending_for=2.5,
        account_id=ACCOUNT,
        region=REGION,
    )
    assert stack.state() == ("Warmed:Pending" if warm_pool else "Pending")

    proc = run_gate(stack, hook, tmp_path)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "launching lifecycle action: CONTINUE" in proc.stderr, proc.stderr
    [outcome] = [o for o in launching.outcomes(ACCOUNT, REGION) if o.instance_id == stack.instance_id]
    assert (outcome.hook, outcome.result) == (hook, "CONTINUE")
    assert stack.state() == ("Warmed:Stopped" if warm_pool else "InService")


def test_launch_whose_doctor_fails_completes_abandon(stack: Stack, tmp_path: Path) -> None:
    hook = stack.launch_hook()
    launching.begin_launch(stack.group, stack.instance_id, hook, account_id=ACCOUNT, region=REGION)

    with FaultProxy(stack.s3_endpoint) as proxy:  # the role may not write to the bucket
        proxy.add_rule(Rule(fault=access_denied()))
        proc = run_gate(stack, hook, tmp_path, AWS_ENDPOINT_URL_S3=proxy.endpoint)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "AccessDenied" in proc.stdout  # doctor's report, in the install log
    assert "launching lifecycle action: ABANDON" in proc.stderr
    [outcome] = [o for o in launching.outcomes(ACCOUNT, REGION) if o.instance_id == stack.instance_id]
    assert (outcome.hook, outcome.result) == (hook, "ABANDON")
    assert stack.state() == "Terminating:Proceed"


class Instance:
    """One instance's boots. cloud-init runs user data once per instance, on the first boot
    only (its scripts-user module); on every boot systemd starts instance-agent-launch.service,
    whose command is `instance-agent launch-gate`. Each boot has a new boot id."""

    def __init__(self, stack: Stack, hook: str, tmp_path: Path) -> None:
        self.stack, self.hook, self.tmp, self.boots = stack, hook, tmp_path, 0

        self.root = 0  # which root volume; cloud-init's once-per-instance state lives on it
        self.first_boot = True

    def replace_root(self) -> None:
        """A root-volume replacement: the new root is the AMI's, with no cloud-init state and
        no agent state, so its next boot is a first boot (user data runs again)."""
        self.root += 1
        self.first_boot = True

    def boot(self) -> list[subprocess.CompletedProcess[str]]:
        self.boots += 1
        boot_id = self.tmp / f"boot-id-{self.boots}"
        boot_id.write_text(str(uuid.uuid4()) + "\n")
        state_dir = self.tmp / f"root-{self.root}" / "state"
        state_dir.mkdir(parents=True, exist_ok=True)
        ran = []
        if self.first_boot:
            self.first_boot = False
            ran.append(
                run_gate(
                    self.stack,
                    self.hook,
                    self.tmp / f"user-data-{self.boots}",
                    INSTANCE_AGENT_STATE_DIR=str(state_dir),
                )
            )
        ran.append(
            subprocess.run(
                [
                    str(Path(sys.executable).parent / "instance-agent"),
                    "launch-gate",
                    "--boot-id-file",
                    str(boot_id),
                ],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
                env=self.stack.env(
                    INSTANCE_AGENT_BUCKET=self.stack.bucket,
                    INSTANCE_AGENT_TOPIC_ARN=self.stack.topic_arn,
                    INSTANCE_AGENT_STATE_DIR=str(state_dir),
                ),
            )
        )
        for proc in ran:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return ran


def test_leaving_a_stopped_warm_pool_is_completed_continue_on_the_second_boot(
    stack: Stack, tmp_path: Path
) -> None:
    """Into the pool (Warmed:Pending:Wait, first boot: user data), stopped, then out of it
    (Pending:Wait, second boot: only the unit). Each launching action gets one CONTINUE;
    neither launch backs anything up or reports on SNS."""
    hook = stack.launch_hook()
    instance = Instance(stack, hook, tmp_path)
    launching.begin_launch(
        stack.group, stack.instance_id, hook, warm_pool=True, account_id=ACCOUNT, region=REGION
    )

    first = instance.boot()
    assert stack.state() == "Warmed:Stopped"
    assert "launching lifecycle action" not in first[-1].stderr  # the unit answered nothing more

    autoscaling.leave_warm_pool(stack.group, stack.instance_id, account_id=ACCOUNT, region=REGION)
    assert stack.state() == "Pending:Wait"  # held by the launching hook on its way out
    [second] = instance.boot()

    assert "launching lifecycle action: CONTINUE" in second.stderr
    mine = [o for o in launching.outcomes(ACCOUNT, REGION) if o.instance_id == stack.instance_id]
    assert [(o.hook, o.result, o.state) for o in mine] == [
        (hook, "CONTINUE", "Warmed:Stopped"),
        (hook, "CONTINUE", "InService"),
    ]
    assert stack.state() == "InService"
    assert archives(stack) == []
    assert stack.sns() == []

    # A third boot with no launching action live: one log line, nothing completed.
    [third] = instance.boot()
    assert "no launching action to answer" in third.stderr
    assert len([o for o in launching.outcomes(ACCOUNT, REGION) if o.instance_id == stack.instance_id]) == 2


def test_root_volume_replacement_backs_up_once_then_the_new_root_answers_the_launch(
    stack: Stack, tmp_path: Path
) -> None:
    """Launched (first boot: user data answers Pending:Wait), then an instance refresh
    replaces the root volume: the terminating hook's ReplacingRootVolume:Wait gets one
    archive and one CONTINUE from Run Command, the launching hook then holds the instance in
    Pending:Wait (replace-root-volume.html), and the new root's first boot answers it."""
    from support.agentproc import completions, sns_docs, source_tree

    from instance_agent.local import rootvolume

    hook = stack.launch_hook()
    instance = Instance(stack, hook, tmp_path)
    launching.begin_launch(stack.group, stack.instance_id, hook, account_id=ACCOUNT, region=REGION)
    instance.boot()
    assert stack.state() == "InService"

    token = rootvolume.replace_root_volume(stack.group, stack.instance_id, account_id=ACCOUNT, region=REGION)
    assert token is not None and stack.state() == "ReplacingRootVolume:Wait"
    src = source_tree(tmp_path / "src")
    proc, rrv = stack.backup("--source", str(src), "--lifecycle-token", token)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (rrv["action"], rrv["lifecycle_result"]) == ("root-volume", "CONTINUE")
    assert completions(stack) == [("CONTINUE", "ok")]
    assert stack.state() == "Pending:Wait"  # the launching hook holds the replaced instance

    instance.replace_root()
    [user_data, unit] = instance.boot()
    assert "launching lifecycle action: CONTINUE" in user_data.stderr
    assert "no launching action to answer" in unit.stderr
    mine = [o for o in launching.outcomes(ACCOUNT, REGION) if o.instance_id == stack.instance_id]
    assert [(o.hook, o.result) for o in mine] == [(hook, "CONTINUE"), (hook, "CONTINUE")]
    assert stack.state() == "InService"
    assert archives(stack) == [rrv["key"]]
    assert [d["action"] for d in sns_docs(stack)] == ["root-volume"]


# A stand-in for the AWS CLI: the two calls the user data's fallback makes, through boto3 to
# the local stand-in, each refusing any other form (so a changed flag fails the test).
FAKE_AWS = """#!{python}
import sys

import boto3

args = sys.argv[1:]
opts = dict(zip(args[2::2], args[3::2]))
client = boto3.client("autoscaling", region_name=opts["--region"])
if args[:2] == ["autoscaling", "describe-auto-scaling-instances"]:
    assert opts["--query"] == "AutoScalingInstances[0].AutoScalingGroupName", opts
    assert opts["--output"] == "text", opts
    found = client.describe_auto_scaling_instances(InstanceIds=[opts["--instance-ids"]])
    print(found["AutoScalingInstances"][0]["AutoScalingGroupName"])
elif args[:2] == ["autoscaling", "complete-lifecycle-action"]:
    client.complete_lifecycle_action(
        AutoScalingGroupName=opts["--auto-scaling-group-name"],
        LifecycleHookName=opts["--lifecycle-hook-name"],
        InstanceId=opts["--instance-id"],
        LifecycleActionResult=opts["--lifecycle-action-result"],
    )
else:
    sys.exit(f"fake aws: unexpected {{args}}")
"""


def test_failed_install_gives_the_launch_back_through_the_aws_cli(stack: Stack, tmp_path: Path) -> None:
    """The install died before the agent existed (no venv under the prefix): the exit trap
    completes the launching action ABANDON at once, with the AWS CLI and IMDSv2 through curl,
    instead of leaving the instance in Pending:Wait until the hook times out."""
    hook = stack.launch_hook()
    launching.begin_launch(stack.group, stack.instance_id, hook, account_id=ACCOUNT, region=REGION)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "aws").write_text(FAKE_AWS.format(python=sys.executable))
    (bin_dir / "aws").chmod(0o755)
    env = stack.env()
    script = (
        f"INSTANCE_AGENT_USER_DATA_LIB=1 source {USER_DATA} && "
        f"IMDS={env['AWS_EC2_METADATA_SERVICE_ENDPOINT']} PREFIX={tmp_path / 'missing'} "
        f"LAUNCH_HOOK={hook} on_exit"
    )
    proc = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**env, "PATH": f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"},
    )

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "install failed: launching lifecycle action ABANDON" in proc.stderr
    assert "attempt" not in proc.stderr  # the first try went through
    [outcome] = [o for o in launching.outcomes(ACCOUNT, REGION) if o.instance_id == stack.instance_id]
    assert (outcome.hook, outcome.result) == (hook, "ABANDON")
    assert stack.state() == "Terminating:Proceed"
    # The instance id and region came from IMDS, with a session token and never without.
    assert stack.imds.token_puts >= 2 and stack.imds.metadata_gets >= 2
    assert stack.imds.tokenless_reads == 0


def test_leaving_a_running_warm_pool_is_answered_by_the_watcher(stack: Stack, tmp_path: Path) -> None:
    """An instance of a Running (or Hibernated) pool leaves it with no boot, so neither the
    user data nor the launch unit runs: the watcher sees IMDS's target state go from
    Warmed:Running to InService and answers the launching hook's Pending:Wait. Before, nothing
    did, the action timed out with ABANDON, and every scale-out from the pool was replaced."""
    hook = stack.launch_hook()
    autoscaling.hold_in_state(
        stack.group, stack.instance_id, "Warmed:Running", account_id=ACCOUNT, region=REGION
    )
    stack.imds.target_lifecycle_state = "Warmed:Running"
    env = stack.env(
        INSTANCE_AGENT_LOG_LEVEL="info",
        INSTANCE_AGENT_BUCKET=stack.bucket,
        INSTANCE_AGENT_TOPIC_ARN=stack.topic_arn,
    )
    with watch(stack, "--source", str(source_tree(tmp_path / "src")), env=env) as w:
        w.wait_for("no terminating action of ours is live; nothing to do", timeout=60)  # the warm-pool notice
        launching.begin_launch(stack.group, stack.instance_id, hook, account_id=ACCOUNT, region=REGION)
        stack.imds.target_lifecycle_state = "InService"
        w.wait_for("left the warm pool with no boot: answering the launching action", timeout=30)
        w.wait_for("launching lifecycle action: CONTINUE", timeout=60)
    [outcome] = [o for o in launching.outcomes(ACCOUNT, REGION) if o.instance_id == stack.instance_id]
    assert (outcome.hook, outcome.result) == (hook, "CONTINUE")
    assert stack.state() == "InService"
    assert archives(stack) == []
