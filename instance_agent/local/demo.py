"""`instance-agent demo`: the whole story on a local emulated AWS, no account needed.

A moto server (S3, SNS, EC2, Auto Scaling with our lifecycle extension) and an IMDSv2 stub
run in this process. The demo creates a bucket, a topic and a group with a terminating hook,
scales the group in (the instance reaches Terminating:Wait and IMDS says Terminated), detects
that through IMDSv2 as the watcher does, runs the real backup pipeline, then restores the
archive and compares it byte for byte with the source.
"""

from __future__ import annotations

import filecmp
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import boto3

from instance_agent import backup, config
from instance_agent.cli import make_clients, resolve_identity
from instance_agent.imds import IMDS
from instance_agent.local import autoscaling, samples
from instance_agent.local.imds import IMDSStub
from instance_agent.local.moto_server import MotoServer
from instance_agent.restore import restore_s3

REGION = "us-east-1"


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _isolate_from_real_aws(moto_endpoint: str, imds_endpoint: str) -> None:
    """Point this process at the stand-ins with fake credentials, whatever the shell had."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "INSTANCE_AGENT_")):
            del os.environ[name]
    os.environ.update(
        AWS_ACCESS_KEY_ID="demo",
        AWS_SECRET_ACCESS_KEY="demo",  # noqa: S106 - fake, local only
        AWS_DEFAULT_REGION=REGION,
        AWS_ENDPOINT_URL=moto_endpoint,
        AWS_EC2_METADATA_SERVICE_ENDPOINT=imds_endpoint,
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )


def _create_group(endpoint: str) -> tuple[str, str, str]:
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint)
    asg = boto3.client("autoscaling", region_name=REGION, endpoint_url=endpoint)
    lt = ec2.create_launch_template(
        LaunchTemplateName="demo-lt",
        LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "t3.micro"},
    )
    asg.create_auto_scaling_group(
        AutoScalingGroupName="demo-asg",
        MinSize=0,
        MaxSize=2,
        DesiredCapacity=1,
        LaunchTemplate={"LaunchTemplateId": lt["LaunchTemplate"]["LaunchTemplateId"]},
        AvailabilityZones=[f"{REGION}a"],
    )
    asg.put_lifecycle_hook(
        AutoScalingGroupName="demo-asg",
        LifecycleHookName="demo-backup-hook",
        LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
        HeartbeatTimeout=120,
        DefaultResult="ABANDON",
    )
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=["demo-asg"])["AutoScalingGroups"][0]
    return "demo-asg", "demo-backup-hook", str(group["Instances"][0]["InstanceId"])


def _same_tree(a: Path, b: Path) -> list[str]:
    """Relative paths that differ between two trees (files by content, links by target)."""
    diffs: list[str] = []
    for dirpath, _dirs, files in os.walk(a):
        for name in files:
            left = Path(dirpath) / name
            rel = left.relative_to(a)
            right = b / rel
            if left.is_symlink():
                if not right.is_symlink() or os.readlink(left) != os.readlink(right):
                    diffs.append(str(rel))
            elif not right.is_file() or not filecmp.cmp(left, right, shallow=False):
                diffs.append(str(rel))
    return diffs


def run(source: str | None = None, size_mib: int = 64) -> int:
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="instance-agent-demo-") as tmp,
        MotoServer() as moto,
        IMDSStub() as imds,
    ):
        _isolate_from_real_aws(moto.endpoint, imds.endpoint)
        say(f"local AWS (moto) at {moto.endpoint}; IMDSv2 stub at {imds.endpoint}")
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket="demo-backups")
        topic = boto3.client("sns", region_name=REGION).create_topic(Name="demo-reports")["TopicArn"]
        group, hook, instance_id = _create_group(moto.endpoint)
        imds.instance_id, imds.region = instance_id, REGION
        imds.target_lifecycle_state = "InService"
        say(f"group {group} with terminating hook {hook}; instance {instance_id} is InService")

        src = Path(source) if source else samples.generate(Path(tmp) / "var-log", size_mib)
        say(f"source: {src}" + ("" if source else f" (generated, about {size_mib} MiB of sample logs)"))

        # Scale in: Auto Scaling puts the instance in Terminating:Wait, IMDS says Terminated.
        autoscaling.begin_termination(group, instance_id)
        imds.target_lifecycle_state = "Terminated"
        client = IMDS()
        t0 = time.monotonic()
        state = client.get("autoscaling/target-lifecycle-state")
        say(
            f"detected via IMDSv2: target-lifecycle-state={state} "
            f"({(time.monotonic() - t0) * 1000:.0f} ms; token-less reads: {imds.tokenless_reads})"
        )

        empty = Path(tmp) / "agent.toml"
        empty.write_text("")
        cfg = config.load(
            {
                "bucket": "demo-backups",
                "topic_arn": topic,
                "source": [str(src)],
                "state_dir": str(Path(tmp) / "state"),
                "runtime_dir": str(Path(tmp) / "run"),
                "journal": False,
            },
            {},
            config_file=str(empty),
        )
        ident = resolve_identity(cfg)
        outcome = backup.run(cfg, ident, make_clients(cfg, ident.region), progress_interval=5.0)
        r = outcome.result
        ratio = r["bytes_read"] / max(r["bytes_uploaded"], 1)
        rate = r["bytes_read"] / 2**20 / max(r["duration_s"], 1e-3)
        say(
            f"backup {r['status']}: {r['files']} files, {r['bytes_read']:,} bytes read, "
            f"{r['bytes_uploaded']:,} uploaded (ratio {ratio:.1f}x), {rate:.0f} MiB/s, "
            f"{r['warnings']} warnings"
        )
        say(f"archive:  s3://{r['bucket']}/{r['key']}")
        say(f"manifest: s3://{r['bucket']}/{r['manifest_key']}")
        messages = moto.sns_messages(topic)
        for m in messages:
            say(f"SNS message ({m['subject']}): {m['message']}")
        outcomes = [o for o in autoscaling.outcomes() if o.instance_id == instance_id]
        for o in outcomes:
            say(f"lifecycle action {o.how} with {o.result}; instance leaves the group")

        dest = Path(tmp) / "restored"
        report = restore_s3(s3, r["bucket"], r["key"], str(dest))
        diffs = _same_tree(src, dest / str(src).lstrip("/"))
        say(
            f"restored {report.files} files ({report.bytes:,} bytes): "
            + ("identical to the source" if not diffs else f"{len(diffs)} differ: {diffs[:5]}")
        )
        ok = (
            outcome.exit_code == 0
            and not diffs
            and len(messages) == 1
            and [(o.result, o.how) for o in outcomes] == [("CONTINUE", "completed")]
            and imds.tokenless_reads == 0
        )
        say(("demo passed" if ok else "demo FAILED") + f" in {time.monotonic() - started:.1f} s")
        if not ok:
            say(json.dumps(r, indent=2))
        return 0 if ok else 1
