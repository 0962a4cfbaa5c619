"""The demo's stand-in: this process pointed at it, the group it creates, and what it made."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import boto3

from instance_agent.local import autoscaling
from instance_agent.local.imds import IMDSStub
from instance_agent.local.moto_server import MotoServer

REGION = "us-east-1"
BUCKET = "demo-backups"


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def isolate_from_real_aws(moto_endpoint: str, imds_endpoint: str, agent_toml: Path) -> None:
    """Point this process (and what it starts) at the stand-ins with fake credentials,
    whatever the shell had."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "INSTANCE_AGENT_")):
            del os.environ[name]
    os.environ.update(stand_in_env(moto_endpoint, imds_endpoint, agent_toml))


def stand_in_env(moto_endpoint: str, imds_endpoint: str, agent_toml: Path) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "demo",
        "AWS_SECRET_ACCESS_KEY": "demo",  # fake, local only
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds_endpoint,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        # What /etc/instance-agent/agent.toml is on an instance; never the host's own.
        "INSTANCE_AGENT_CONFIG": str(agent_toml),
    }


def put_group(endpoint: str, name: str, hook: str, *, template: str, heartbeat_timeout: int) -> None:
    """On the stand-in at `endpoint`: a launch template, a group of one instance made from it,
    and a terminating lifecycle hook on the group (ABANDON by default)."""
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint)
    asg = boto3.client("autoscaling", region_name=REGION, endpoint_url=endpoint)
    lt = ec2.create_launch_template(
        LaunchTemplateName=template,
        LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "t3.micro"},
    )
    asg.create_auto_scaling_group(
        AutoScalingGroupName=name,
        MinSize=0,
        MaxSize=2,
        DesiredCapacity=1,
        LaunchTemplate={"LaunchTemplateId": lt["LaunchTemplate"]["LaunchTemplateId"]},
        AvailabilityZones=[f"{REGION}a"],
    )
    asg.put_lifecycle_hook(
        AutoScalingGroupName=name,
        LifecycleHookName=hook,
        LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
        HeartbeatTimeout=heartbeat_timeout,
        DefaultResult="ABANDON",
    )


def create_group(endpoint: str) -> tuple[str, str, str]:
    put_group(endpoint, "demo-asg", "demo-backup-hook", template="demo-lt", heartbeat_timeout=120)
    return "demo-asg", "demo-backup-hook", in_service("demo-asg")


def in_service(group: str) -> str:
    asg = boto3.client("autoscaling", region_name=REGION)
    described = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[group])
    instances = described["AutoScalingGroups"][0]["Instances"]
    return str(next(i["InstanceId"] for i in instances if i["LifecycleState"] == "InService"))


@dataclass
class Stand:
    """The stand-in and what the demo created on it."""

    moto: MotoServer
    imds: IMDSStub
    tmp: Path
    agent_toml: Path
    topic: str
    group: str
    hook: str
    instance_id: str

    def scale_in(self) -> None:
        # Auto Scaling puts the instance in Terminating:Wait; IMDS says Terminated
        # (docs/aws-behaviour.md, "Instance metadata (IMDS)").
        autoscaling.begin_termination(self.group, self.instance_id)
        self.imds.target_lifecycle_state = "Terminated"
        say(f"scale-in: {self.instance_id} is Terminating:Wait, held by hook {self.hook}")


def write_agent_toml(path: Path, topic: str, source: Path, tmp: Path) -> None:
    def q(value: str) -> str:
        return json.dumps(value)  # a JSON string is a valid TOML basic string

    path.write_text(
        f"bucket = {q(BUCKET)}\ntopic_arn = {q(topic)}\nsource = [{q(str(source))}]\n"
        f"state_dir = {q(str(tmp / 'state'))}\nruntime_dir = {q(str(tmp / 'run'))}\n"
        "journal = false\n",
        encoding="utf-8",
    )
