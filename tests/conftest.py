"""Shared fixtures: real local servers on 127.0.0.1, and a guard so no test reaches AWS.

- `moto`: one in-process moto server per session (SNS, SSM, EC2, Auto Scaling with our
  lifecycle extension); tests use unique names instead of resets, so they stay independent.
- `seaweed`: one SeaweedFS (`weed mini`) per session for S3 fidelity (checksums, part sizes).
- `imds`: an IMDSv2 stub per test.
- `stack`: a bucket, a topic, and a group with a terminating hook whose one instance is the
  IMDS stub's identity — everything `instance-agent backup` needs, per test.

Under pytest-xdist (pyproject.toml's addopts) every worker is a process of its own, so it has
its own session servers (on ports chosen free), its own tmp_path tree, and its own
TOKENLESS_READS and scoreboard rows, which it hands to the controller when it ends
(`pytest_sessionfinish` in the worker, `pytest_testnodedown` in the controller).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest

from instance_agent.local import launching
from instance_agent.local.demo_stand import put_group
from instance_agent.local.imds import IMDSStub

# moto takes seconds to import: only the tests that start it pay for it (tests/unit does not).
if TYPE_CHECKING:
    from instance_agent.local import autoscaling
    from instance_agent.local.moto_server import MotoServer

sys.path.insert(0, str(Path(__file__).parent))
from support import scoreboard
from support.seaweed import SeaweedS3
from support.trees import walk

REGION = "us-east-1"
ACCOUNT = "123456789012"
AGENT = [sys.executable, "-m", "instance_agent"]
# Every token-less IMDS read across the whole suite is an IMDSv1 attempt: there must be none.
TOKENLESS_READS: list[int] = []


@pytest.fixture(autouse=True)
def _no_real_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith(("AWS_", "INSTANCE_AGENT_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    # Nothing may fall through to the real link-local IMDS.
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("INSTANCE_AGENT_LOG_FORMAT", "json")
    # Nor may a host's /etc/instance-agent/agent.toml: the default config file is the test's.
    monkeypatch.setenv("INSTANCE_AGENT_DEFAULT_CONFIG", str(tmp_path / "etc-agent.toml"))


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    from instance_agent.local.moto_server import MotoServer

    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def imds() -> Iterator[IMDSStub]:
    stub = IMDSStub()
    stub.start()
    yield stub
    TOKENLESS_READS.append(stub.tokenless_reads)
    stub.stop()


# pyproject.toml's `-n auto` means this many pytest-xdist workers: on two cores four beat
# three and six, as most tests wait on subprocesses and servers rather than on a core.
WORKERS = 4
# A selection inside these starts no server: worker start-up would double its time.
IN_PROCESS = ("tests/unit", "tests/functional", "tests/test_docs.py", "tests/test_imports.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    root = Path(__file__).resolve().parent.parent
    fast = [(root / p).resolve() for p in IN_PROCESS]
    chosen = [(Path(config.invocation_params.dir) / a.split("::")[0]).resolve() for a in config.args]
    if chosen and all(any(c == f or f in c.parents for f in fast) for c in chosen):
        return 0
    return WORKERS


# The longest tests (15-65 s each, measured with --durations at four workers) start first:
# `--dist load` hands tests out in collection order, so one of them left for the end would
# keep a single worker busy after the others ran out of work. Only the order changes.
SLOW_FIRST = (
    "test_autoscaling_outage_after_the_flip_still_completes",
    "test_bundle_installs_offline_and_runs",
    "test_sustained_completion_throttling_outlasts_the_sdk_retries",
    "test_launch_gate_with_s3_black_holed_fails_within_a_minute",
    "test_watcher_stopped_during_completion_retries_ends_them_within_the_stop_grace",
    "test_sigterm_during_completion_retries_ends_them_within_the_stop_grace",
    "test_an_unexpected_error_restarts_shipping_and_no_inotify_falls_back_to_scans",
    "test_imds_black_hole_at_start_is_exit_2_within_bound",
    "test_list_filters_pages_and_restore_latest",
    "test_ship_rotations_then_terminate_restores_whole_tree",
)
# Each test's place in the files as written: the scoreboard orders its rows by it, so the
# reordering above leaves docs/reliability.md as a serial run in file order writes it.
_WRITTEN_AT: dict[str, int] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    _WRITTEN_AT.update((item.nodeid, n) for n, item in enumerate(items))
    rank = {name: n for n, name in enumerate(SLOW_FIRST)}
    items.sort(
        key=lambda item: rank.get(item.originalname if isinstance(item, pytest.Function) else "", len(rank))
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    scoreboard.position = _WRITTEN_AT.get(item.nodeid, item.session.items.index(item))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller adds up and reports
        workeroutput["tokenless_reads"] = sum(TOKENLESS_READS)
        workeroutput["scoreboard_rows"] = scoreboard.export()
        return
    if sum(TOKENLESS_READS):
        session.exitstatus = 1
        print(f"\nFAILED: {sum(TOKENLESS_READS)} token-less (IMDSv1) reads hit the IMDS stub")


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """The xdist controller, as each worker ends: its IMDSv1 count and scoreboard rows."""
    output = getattr(node, "workeroutput", {})
    TOKENLESS_READS.append(int(output.get("tokenless_reads", 0)))
    scoreboard.merge(output.get("scoreboard_rows", []))


@dataclass
class Stack:
    """One test's slice of the local AWS."""

    moto: MotoServer
    s3_endpoint: str
    imds: IMDSStub
    bucket: str
    topic_arn: str
    group: str
    hook: str
    instance_id: str
    tmp: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    def launch_hook(self) -> str:
        """A launching hook on the stack's group (ABANDON by default, as AWS's default)."""
        hook = f"launch-{uuid.uuid4().hex[:8]}"
        self.client("autoscaling").put_lifecycle_hook(
            AutoScalingGroupName=self.group,
            LifecycleHookName=hook,
            LifecycleTransition=launching.LAUNCHING,
            HeartbeatTimeout=600,
            DefaultResult="ABANDON",
        )
        return hook

    def group_metric(self, name: str, statistics: list[str], period: int = 3600) -> list[dict[str, Any]]:
        """The datapoints of the agent's metric `name` for the stack's group, from an hour ago
        to five minutes ahead."""
        now = datetime.now(timezone.utc)
        points: list[dict[str, Any]] = self.client("cloudwatch").get_metric_statistics(
            Namespace="InstanceAgent",
            MetricName=name,
            Dimensions=[{"Name": "AutoScalingGroupName", "Value": self.group}],
            StartTime=now - timedelta(hours=1),
            EndTime=now + timedelta(minutes=5),
            Period=period,
            Statistics=statistics,
        )["Datapoints"]
        return points

    def second_instance(self) -> str:
        """Scales the stack's group to two: the id of the instance that joins it."""
        asg = self.client("autoscaling")
        asg.set_desired_capacity(AutoScalingGroupName=self.group, DesiredCapacity=2)
        [group] = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[self.group])["AutoScalingGroups"]
        (new,) = {i["InstanceId"] for i in group["Instances"]} - {self.instance_id}
        return str(new)

    def adopter_env(self, new: str, state: Path, inbox: Path, ran: Path, **overrides: str) -> dict[str, str]:
        """The launch gate's environment on the replacement `new`: it adopts hand-offs of
        `state` into `inbox`, and its hand-off command appends the instance's lifecycle state,
        as it is while the command runs, to `ran`."""
        probe = (
            "import boto3, os; print(boto3.client('autoscaling').describe_auto_scaling_instances("
            "InstanceIds=[os.environ['ME']])['AutoScalingInstances'][0]['LifecycleState'])"
        )
        return self.env(
            ME=new,
            **overrides,
            INSTANCE_AGENT_BUCKET=self.bucket,
            INSTANCE_AGENT_TOPIC_ARN=self.topic_arn,
            INSTANCE_AGENT_HANDOFF_PATH=str(state),
            INSTANCE_AGENT_HANDOFF_TO="launching",
            INSTANCE_AGENT_HANDOFF_INBOX=str(inbox),
            INSTANCE_AGENT_HANDOFF_COMMAND=f'{sys.executable} -c "{probe}" >> {ran}',
        )

    def client(self, service: str) -> Any:
        endpoint = self.s3_endpoint if service == "s3" else self.moto.endpoint
        return boto3.client(service, region_name=REGION, endpoint_url=endpoint)

    def env(self, **overrides: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            AWS_ENDPOINT_URL=self.moto.endpoint,
            AWS_ENDPOINT_URL_S3=self.s3_endpoint,
            AWS_EC2_METADATA_SERVICE_ENDPOINT=self.imds.endpoint,
            INSTANCE_AGENT_STATE_DIR=str(self.tmp / "state"),
            INSTANCE_AGENT_RUNTIME_DIR=str(self.tmp / "run"),
            INSTANCE_AGENT_JOURNAL="0",
            INSTANCE_AGENT_LOG_LEVEL="debug",
        )
        env.update(self.extra_env)
        env.update(overrides)
        return env

    def script_env(self, bin_dir: Path, config: Path, **extra: str) -> dict[str, str]:
        """What a Run Command script on the stack's instance runs with: none of the test's own
        INSTANCE_AGENT_ settings, `bin_dir` first on PATH, the stack's endpoints and the
        agent's config file."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("INSTANCE_AGENT_")}
        env.update(
            PATH=f"{bin_dir}:{os.environ['PATH']}",
            AWS_ENDPOINT_URL=self.moto.endpoint,
            AWS_ENDPOINT_URL_S3=self.s3_endpoint,
            AWS_EC2_METADATA_SERVICE_ENDPOINT=self.imds.endpoint,
            INSTANCE_AGENT_CONFIG=str(config),
        )
        env.update(extra)
        return env

    def run(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*(prefix or []), *AGENT, *args],
            env=env or self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def backup_argv(self, *args: str) -> list[str]:
        """`instance-agent backup --json` on the stack's bucket and topic, for a test that
        starts the process itself (to hold it, race it or signal it)."""
        return [*AGENT, "backup", "--bucket", self.bucket, "--topic-arn", self.topic_arn, "--json", *args]

    def backup(self, *args: str, **kw: Any) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
        proc = self.run(
            "backup", "--bucket", self.bucket, "--topic-arn", self.topic_arn, "--json", *args, **kw
        )
        result = json.loads(proc.stdout) if proc.stdout.strip() else {}
        return proc, result

    def sns(self) -> list[dict[str, Any]]:
        return self.moto.sns_messages(self.topic_arn, ACCOUNT, REGION)

    def lifecycle_calls(self, action: str | None = None) -> list[autoscaling.LifecycleCall]:
        from instance_agent.local import autoscaling

        return [
            c
            for c in autoscaling.calls(ACCOUNT, REGION)
            if c.group == self.group and (action is None or c.action == action)
        ]

    def outcomes(self) -> list[autoscaling.LifecycleOutcome]:
        from instance_agent.local import autoscaling

        return [o for o in autoscaling.outcomes(ACCOUNT, REGION) if o.instance_id == self.instance_id]

    def objects(self) -> dict[str, int]:
        resp = self.client("s3").list_objects_v2(Bucket=self.bucket)
        return {o["Key"]: o["Size"] for o in resp.get("Contents", [])}

    def gnu_restore(self, key: str, src: Path, tmp: Path) -> dict[bytes, tuple[str, bytes | None]]:
        """GNU tar extracts the object (with empty stderr); the tree under the source's path."""
        archive = tmp / key.rsplit("/", 1)[-1]
        archive.write_bytes(self.client("s3").get_object(Bucket=self.bucket, Key=key)["Body"].read())
        out = tmp / "restore"
        out.mkdir()
        flags = ["--zstd"] if key.endswith(".zst") else []
        tar = subprocess.run(
            ["tar", *flags, "-xf", str(archive), "-C", str(out)], capture_output=True, text=True, check=False
        )
        assert tar.returncode == 0 and tar.stderr == "", tar.stderr
        archive.unlink()
        return walk(out / str(src).lstrip("/"))

    def incomplete_uploads(self) -> list[dict[str, Any]]:
        return list(self.client("s3").list_multipart_uploads(Bucket=self.bucket).get("Uploads", []))

    def scale_in(self, wait_delay: float = 0.0) -> None:
        from instance_agent.local import autoscaling

        autoscaling.begin_termination(
            self.group, self.instance_id, wait_delay=wait_delay, account_id=ACCOUNT, region=REGION
        )
        self.imds.target_lifecycle_state = "Terminated"

    def state(self) -> str | None:
        resp = self.client("autoscaling").describe_auto_scaling_instances(InstanceIds=[self.instance_id])
        insts = resp.get("AutoScalingInstances", [])
        return insts[0]["LifecycleState"] if insts else None


def make_group(moto: MotoServer, name: str, hook: str, heartbeat_timeout: int = 300) -> str:
    put_group(moto.endpoint, name, hook, template=f"lt-{name}", heartbeat_timeout=heartbeat_timeout)
    asg = boto3.client("autoscaling", region_name=REGION, endpoint_url=moto.endpoint)
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
    return str(group["Instances"][0]["InstanceId"])


@pytest.fixture
def in_process(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """The stack, with boto3 in this process pointed at its stand-ins: for tests that run
    the Shipper in process rather than the agent as a subprocess."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(name, stack.env()[name])
    return stack


@pytest.fixture
def stack(moto: MotoServer, seaweed: SeaweedS3, imds: IMDSStub, tmp_path: Path) -> Stack:
    suffix = uuid.uuid4().hex[:10]
    bucket, group, hook = f"bk-{suffix}", f"asg-{suffix}", f"hook-{suffix}"
    boto3.client("s3", region_name=REGION, endpoint_url=seaweed.endpoint).create_bucket(Bucket=bucket)
    topic = boto3.client("sns", region_name=REGION, endpoint_url=moto.endpoint).create_topic(
        Name=f"topic-{suffix}"
    )["TopicArn"]
    instance_id = make_group(moto, group, hook)
    imds.instance_id = instance_id
    imds.region = REGION
    imds.target_lifecycle_state = "InService"
    return Stack(
        moto=moto,
        s3_endpoint=seaweed.endpoint,
        imds=imds,
        bucket=bucket,
        topic_arn=topic,
        group=group,
        hook=hook,
        instance_id=instance_id,
        tmp=tmp_path,
    )
