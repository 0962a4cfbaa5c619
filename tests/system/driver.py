"""The system test's driver; tests/system/run.sh runs it inside the "aws" network namespace.

It serves the stand-ins (moto with our Auto Scaling model, SeaweedFS for S3, the metadata
service at 169.254.169.254), builds the agent's bundle with packaging/bundle.py, renders
the user data that packaging/template.yaml gives an instance, boots the Debian root under
systemd-nspawn, and checks what a user would check on each step. The first check that
fails ends the run with one line, `system: FAILED: <step>: <what broke>`, and what the
container said about it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from standin import CloudInitIMDS  # noqa: E402
from support.faultproxy import Delay, FaultProxy, Rule, upload_part  # noqa: E402
from support.seaweed import SeaweedS3  # noqa: E402
from test_template import RESOURCES, TPL  # noqa: E402

from instance_agent.local import autoscaling, launching  # noqa: E402
from instance_agent.local.moto_server import MotoServer  # noqa: E402

REGION, ACCOUNT = "us-east-1", "123456789012"
AWS_SIDE = "10.213.0.1"  # the stand-ins' address on the veth (tests/system/run.sh)
STACK = "sys"
GROUP = f"{STACK}-group"  # the template names its group ${AWS::StackName}-group
NAMES = {"Hook": "instance-agent-backup", "LaunchHook": "instance-agent-launch"}
AGENT = "/opt/instance-agent/bin/instance-agent"
UNIT = "instance-agent.service"


class Failed(Exception):
    """One check failed: `step` is where, the message what broke."""

    def __init__(self, step: str, message: str, evidence: str = "") -> None:
        super().__init__(message)
        self.step, self.evidence = step, evidence


def log(text: str) -> None:
    print(f"system: {text}", file=sys.stderr, flush=True)


def until(what: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# -- the instance --------------------------------------------------------------------------


class Container:
    """The Debian root booted by a real systemd; each boot() is one boot of the instance."""

    def __init__(self, root: Path, netns: str, work: Path, name: str = "a") -> None:
        self.root, self.netns, self.work, self.name = root, netns, work, name
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.boots = 0

    def boot(self) -> None:
        self.boots += 1
        console = (self.work / f"console-{self.name}{self.boots}.log").open("wb")
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        # The two settings without which systemd skips IPAddressAllow/Deny silently: the
        # unified cgroup hierarchy, and bpf() allowed to the container.
        self.proc = subprocess.Popen(
            [
                "systemd-nspawn",
                "-D",
                str(self.root),
                "-b",
                "--register=no",
                "--keep-unit",
                "--console=pipe",
                f"--network-namespace-path={self.netns}",
                "--system-call-filter=bpf",
                "--machine=ia-system",
                "--hostname=ip-10-213-0-2",
            ],
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        (self.work / f"nspawn-{self.name}.pid").write_text(str(self.proc.pid))
        self.leader = until(self._find_leader, 30, 0.1) or 0
        if not self.leader:
            raise Failed(f"boot {self.boots}", "systemd-nspawn started no PID 1", self.console())
        state = until(
            lambda: (
                self.run("systemctl", "is-system-running", check=False).stdout.strip()
                in ("running", "degraded")
            ),
            120,
        )
        if not state:
            raise Failed(
                f"boot {self.boots}",
                "systemd did not finish booting in 120 s",
                self.run("systemctl", "list-jobs", check=False).stdout + self.console(),
            )

    def _find_leader(self) -> int:
        """The container's PID 1: the nspawn child whose innermost pid is 1."""
        assert self.proc is not None
        for status in Path("/proc").glob("[0-9]*/status"):
            with contextlib.suppress(OSError):
                text = status.read_text()
                ppid = int(re.search(r"^PPid:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
                nspid = re.search(r"^NSpid:\s+(.*)$", text, re.M).group(1).split()  # type: ignore[union-attr]
                if ppid == self.proc.pid and nspid[-1] == "1":
                    return int(status.parent.name)
        return 0

    def run(self, *argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise Failed(" ".join(argv), f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
        return proc

    def shutdown(self, verb: str = "poweroff") -> None:
        """`systemctl poweroff` (or reboot) and wait for the container to end."""
        if self.proc is None:
            return
        self.run("systemctl", verb, "--no-block", check=False)
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def console(self) -> str:
        path = self.work / f"console-{self.name}{self.boots}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def file(self, path: str) -> str:
        host = self.root / path.lstrip("/")
        return host.read_text(errors="replace") if host.exists() else ""

    def journal(self, *args: str) -> str:
        return self.run("journalctl", "--no-pager", *args, check=False).stdout


# -- the stand-ins --------------------------------------------------------------------------


class Cloud:
    """moto (Auto Scaling, SNS, EC2), SeaweedFS (S3) and the metadata service, for one run."""

    def __init__(self, work: Path, stack: contextlib.ExitStack) -> None:
        launching.install()
        self.moto = stack.enter_context(MotoServer(host=AWS_SIDE))
        self.s3 = SeaweedS3(work / "seaweed", bind=AWS_SIDE)
        stack.enter_context(self.s3)
        self.s3_endpoint = self.s3.endpoint
        # The instances reach S3 through a proxy that can slow it down (the stop test).
        self.s3_proxy = stack.enter_context(FaultProxy(self.s3_endpoint, host=AWS_SIDE))
        self.artifacts, self.bucket = "sys-artifacts", "sys-backups"
        s3 = self.client("s3")
        s3.create_bucket(Bucket=self.artifacts)
        s3.create_bucket(Bucket=self.bucket)
        self.topic = self.client("sns").create_topic(Name="sys-reports")["TopicArn"]
        ec2, asg = self.client("ec2"), self.client("autoscaling")
        template = ec2.create_launch_template(
            LaunchTemplateName="sys-lt",
            LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "t3.micro"},
        )["LaunchTemplate"]["LaunchTemplateId"]
        asg.create_auto_scaling_group(
            AutoScalingGroupName=GROUP,
            MinSize=0,
            MaxSize=3,
            DesiredCapacity=2,  # the second is the replacement that the stop test boots
            LaunchTemplate={"LaunchTemplateId": template},
            AvailabilityZones=[f"{REGION}a"],
        )
        for name, transition, result in (
            (NAMES["Hook"], "autoscaling:EC2_INSTANCE_TERMINATING", "ABANDON"),
            (NAMES["LaunchHook"], launching.LAUNCHING, "ABANDON"),
        ):
            asg.put_lifecycle_hook(
                AutoScalingGroupName=GROUP,
                LifecycleHookName=name,
                LifecycleTransition=transition,
                HeartbeatTimeout=600,
                DefaultResult=result,
            )
        [group] = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])["AutoScalingGroups"]
        self.instance_id, self.second = sorted(i["InstanceId"] for i in group["Instances"])
        self.imds = CloudInitIMDS(
            user_data="",
            instance_id=self.instance_id,
            region=REGION,
            target_lifecycle_state="InService",
            host="169.254.169.254",
            port=80,
        )
        stack.enter_context(self.imds)

    def client(self, service: str) -> Any:
        endpoint = self.s3_endpoint if service == "s3" else self.moto.endpoint
        return boto3.client(
            service,
            region_name=REGION,
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def env(self) -> dict[str, str]:
        """What the instance's role and the AWS endpoints are, here (see prepare_root)."""
        return {
            "AWS_ENDPOINT_URL": self.moto.endpoint,
            "AWS_ENDPOINT_URL_S3": self.s3_proxy.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }

    def state(self) -> str | None:
        found = self.client("autoscaling").describe_auto_scaling_instances(InstanceIds=[self.instance_id])
        return found["AutoScalingInstances"][0]["LifecycleState"] if found["AutoScalingInstances"] else None

    def become(self, instance_id: str) -> None:
        """The metadata service now answers as this instance (the other one is off)."""
        self.instance_id = instance_id
        self.imds.instance_id = instance_id
        self.imds.target_lifecycle_state = "InService"

    def launches(self) -> list[launching.LaunchOutcome]:
        return [o for o in launching.outcomes(ACCOUNT, REGION) if o.instance_id == self.instance_id]

    def terminations(self) -> list[autoscaling.LifecycleOutcome]:
        return [
            o
            for o in autoscaling.outcomes(ACCOUNT, REGION)
            if o.instance_id == self.instance_id and o.hook == NAMES["Hook"]
        ]

    def sns(self) -> list[dict[str, Any]]:
        return self.moto.sns_messages(self.topic, ACCOUNT, REGION)

    def object_keys(self) -> list[str]:
        resp = self.client("s3").list_objects_v2(Bucket=self.bucket)
        return sorted(o["Key"] for o in resp.get("Contents", []))


def upload_bundle(cloud: Cloud, bundle: Path) -> str:
    """packaging/bundle.py's bundle (run.sh builds it), where the template's user data
    fetches it: s3://CodeS3Bucket/AgentBundlePrefix<name>."""
    prefix = "instance-agent/0.1.0/"
    cloud.client("s3").upload_file(str(bundle), cloud.artifacts, prefix + bundle.name)
    return prefix


def render_user_data(cloud: Cloud, bundle_prefix: str) -> str:
    """The user data an instance of packaging/template.yaml receives, with the stand-in's
    values for the stack's parameters and pseudo parameters."""
    data = RESOURCES["LaunchTemplate"]["Properties"]["LaunchTemplateData"]
    _, (settings, body) = data["UserData"]["Fn::Base64"]["Fn::Join"]
    text, _ = settings["Fn::Sub"]
    values = {
        "AWS::StackName": STACK,
        "AWS::Region": REGION,
        "AWS::AccountId": ACCOUNT,
        "CodeS3Bucket": cloud.artifacts,
        "AgentBundlePrefix": bundle_prefix,
        "LaunchHook": NAMES["LaunchHook"],
        "HookName": NAMES["Hook"],
        "BackupBucket": cloud.bucket,
        "BackupPrefix": "",
        "BackupTopic": cloud.topic,
        "Sources": "/var/log",
        "KmsFlags": "",
    }
    # Any other parameter takes the template's default, as a stack created without it would.
    for name, spec in TPL["Parameters"].items():
        if name not in values and "Default" in spec:
            values[name] = str(spec["Default"])

    def value(match: re.Match[str]) -> str:
        if match.group(1) not in values:
            raise Failed(
                "user data", f"the template's user data uses ${{{match.group(1)}}}, which has no value here"
            )
        return values[match.group(1)]

    return str(re.sub(r"\$\{([A-Za-z0-9:]+)\}", value, text) + body)


def prepare_root(root: Path, cloud: Cloud) -> None:
    """What stands for EC2 on the instance's disk: the AWS endpoints and the role's
    credentials (the agent's boto3 and the user data's read them from the environment,
    as they would read the instance role from IMDS and use AWS's own endpoints)."""
    env = "".join(f"{k}={v}\n" for k, v in cloud.env().items())
    default = root / "etc/default/instance-agent"
    default.parent.mkdir(parents=True, exist_ok=True)
    default.write_text(env)
    default.chmod(0o600)
    dropin = root / "etc/systemd/system/cloud-final.service.d/system-test.conf"
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("[Service]\nEnvironmentFile=/etc/default/instance-agent\n")
    (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
    # The application that a pre-command stops (docs/usage.md: --pre-command 'systemctl stop myapp').
    unit = root / "etc/systemd/system/myapp.service"
    unit.write_text(
        "[Unit]\nDescription=the instance's application\n\n[Service]\nExecStart=/bin/sleep infinity\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    # The template's stack backs up through Run Command too (--push-path), so its instances
    # need the SSM agent, which its Amazon Linux image has. Debian ships none: a stand-in.
    (root / "etc/systemd/system/amazon-ssm-agent.service").write_text(
        "[Unit]\nDescription=stand-in for the SSM agent\n\n[Service]\nExecStart=/bin/sleep infinity\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for name in ("myapp.service", "amazon-ssm-agent.service"):
        with contextlib.suppress(FileExistsError):
            (wants / name).symlink_to(f"/etc/systemd/system/{name}")


# -- the steps ------------------------------------------------------------------------------


def first_boot(box: Container, cloud: Cloud) -> None:
    step = "first boot"
    launching.begin_launch(GROUP, cloud.instance_id, NAMES["LaunchHook"], account_id=ACCOUNT, region=REGION)
    box.boot()
    done = until(lambda: cloud.launches() or box.file("/var/lib/cloud/instance/boot-finished"), 300, 1)
    until(cloud.launches, 20, 1)
    install_log = box.file("/var/log/instance-agent-install.log")
    evidence = install_log[-3000:] + box.journal("-u", "cloud-final", "-n", "40")
    if cloud.imds.user_data_reads == 0:
        raise Failed(step, "cloud-init never read the user data from the metadata service", evidence)
    if not done or not cloud.launches():
        raise Failed(step, "the user data completed no launching lifecycle action", evidence)
    [launch] = cloud.launches()
    if launch.result != "CONTINUE":
        # What doctor --launch said, in the install log: the reason for the ABANDON.
        fails = [
            " ".join(line.split()) for line in install_log.splitlines() if line.lstrip().startswith("[FAIL]")
        ]
        if fails:
            raise Failed(
                step,
                f"the launch was completed {launch.result}: doctor --launch: " + "; ".join(fails),
                evidence,
            )
        raise Failed(
            step, f"the launching lifecycle action was completed {launch.result}, not CONTINUE", evidence
        )
    if cloud.state() != "InService":
        raise Failed(step, f"the instance is {cloud.state()}, not InService", evidence)
    asked = [line for line in install_log.splitlines() if "from the package mirror" in line]
    if asked:
        raise Failed(
            step, f"the user data asked for a package index on an image that holds the packages: {asked[0]}"
        )
    log(
        "first boot: cloud-init ran the user data (no package index asked); launching action CONTINUE; "
        f"{cloud.state()}"
    )

    active = until(
        lambda: box.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == "active", 60
    )
    status = box.run("systemctl", "status", "--no-pager", UNIT, check=False).stdout
    if not active:
        raise Failed(step, f"{UNIT} is not active", status + box.journal("-u", UNIT, "-n", "30"))
    status_text = box.run(
        "systemctl", "show", "-p", "StatusText", "--value", UNIT, check=False
    ).stdout.strip()
    if not status_text or f'Status: "{status_text}"' not in status:
        raise Failed(step, "systemctl status shows no STATUS= from the watcher", status)
    log(f'watcher active, systemctl status says: Status: "{status_text}"')


def ssm_agent_only_where_the_push_path_is(box: Container) -> None:
    """Without the SSM agent, doctor fails only where push_path is set (the template sets it)."""
    step = "doctor: ssm agent"
    box.run("systemctl", "stop", "amazon-ssm-agent")
    try:
        results = {}
        for flag in ("--push-path", "--no-push-path"):
            proc = box.run(AGENT, "doctor", "--json", flag, check=False)
            try:
                checks = json.loads(proc.stdout)
                checks = checks.get("checks", checks) if isinstance(checks, dict) else checks
                results[flag] = next(c["result"] for c in checks if c["name"] == "ssm agent")
            except (ValueError, StopIteration, KeyError, TypeError) as err:
                raise Failed(
                    step, f"doctor --json {flag}: no ssm agent check ({err})", proc.stdout + proc.stderr
                )
        if results != {"--push-path": "fail", "--no-push-path": "warn"}:
            raise Failed(
                step, f"with no SSM agent, doctor says {results}: want fail with the push path, warn without"
            )
    finally:
        box.run("systemctl", "start", "amazon-ssm-agent", check=False)
    log("doctor without an SSM agent: fail with --push-path, warn without")


ALLOWED = "10.213.0.0/24"  # the stand-ins' range: the "VPC" that ip_allow names
DENIED = "10.214.0.1"  # an address of the aws namespace outside it (run.sh adds it)


def agent_flags(user_data: str) -> list[str]:
    """The AGENT_FLAGS array of the user data, as bash expands it."""
    proc = subprocess.run(
        ["bash", "-c", "eval \"$(sed -n '/^AGENT_FLAGS=(/,/^)/p')\"; printf '%s\\n' \"${AGENT_FLAGS[@]}\""],
        input=user_data,
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.splitlines()


def reconfigure(box: Container, cloud: Cloud, *extra: str) -> None:
    """An operator narrows the unit to the VPC's range and adds docs/usage.md's pre-command:
    install-service again, with the user data's flags and those, then a restart."""
    step = "install-service --ip-allow --pre-command"
    flags = [
        *agent_flags(cloud.imds.user_data),
        "--ip-allow",
        ALLOWED,
        "--pre-command",
        "systemctl stop myapp",
        *extra,
    ]
    proc = box.run(AGENT, "install-service", *flags, check=False)
    if proc.returncode != 0:
        raise Failed(step, f"exit {proc.returncode}", proc.stdout + proc.stderr)
    box.run("systemctl", "restart", UNIT)
    active = until(
        lambda: box.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == "active", 60
    )
    if not active:
        raise Failed(step, f"{UNIT} is not active after the restart", box.journal("-u", UNIT, "-n", "30"))
    unit = box.run("systemctl", "cat", UNIT).stdout
    if "IPAddressAllow=localhost 169.254.169.254" not in unit or ALLOWED not in unit:
        raise Failed(step, "the unit has no IPAddressAllow= with IMDS and the range", unit)
    log(f"reinstalled with --ip-allow {ALLOWED} --pre-command 'systemctl stop myapp'; watcher active")


PROBE = (
    "import socket,sys\n"
    "s=socket.socket(); s.settimeout(5)\n"
    "try:\n    s.connect((sys.argv[1], int(sys.argv[2]))); print('connected')\n"
    "except TimeoutError:\n    print('dropped (no answer in 5 s)')\n"
    "except OSError as e:\n    print('refused', e.errno, e)\n"
)


def firewall(box: Container, cloud: Cloud) -> None:
    """A process in the unit's cgroup (where systemd's BPF firewall is attached) reaches the
    allowed range but not another address that the instance itself reaches."""
    step = "IPAddressDeny"
    port = cloud.moto.endpoint.rsplit(":", 1)[1]
    cgroup = box.run("systemctl", "show", "-p", "ControlGroup", "--value", UNIT).stdout.strip()

    def probe(address: str, in_unit: bool) -> str:
        enter = f"echo $$ > /sys/fs/cgroup{cgroup}/cgroup.procs && " if in_unit else ""
        return box.run(
            "sh", "-c", f'{enter}exec python3 -c "$0" {address} {port}', PROBE, check=False
        ).stdout.strip()

    # Reached: connected, or refused by the address itself (nothing listens at DENIED: its
    # RST came back). The firewall drops the packet instead: EPERM, at once.
    def reached(answer: str) -> bool:
        return answer == "connected" or answer.startswith(f"refused {errno.ECONNREFUSED} ")

    outside = probe(DENIED, in_unit=False)
    if not reached(outside):
        raise Failed(step, f"the probe cannot reach {DENIED}:{port} even outside the unit: {outside}")
    allowed = probe(AWS_SIDE, in_unit=True)
    denied = probe(DENIED, in_unit=True)
    if not reached(allowed):
        raise Failed(step, f"inside the unit, the allowed {AWS_SIDE}:{port} is unreachable: {allowed}")
    if reached(denied):
        raise Failed(step, f"inside the unit, {DENIED}:{port} (outside ip_allow) was reached: no firewall")
    log(f"inside the unit: {AWS_SIDE} reached, {DENIED} {denied} (reached from outside the unit)")


# The live unit's `systemd-analyze security`, with ip_allow set: 1.8 (1.9 before this test
# existed). Issue 23 asks for 1.5; what is left is the unit running as root (0.4 of the
# listed items: a non-root user cannot run docs/usage.md's `systemctl stop myapp` pre-command
# without polkit), its network (PrivateNetwork, AF_INET), and CAP_DAC_READ_SEARCH. A
# regression above today's figure fails here.
EXPOSURE_TARGET = 1.8
# once.py's warnings when the state directory cannot be written.
STATE_WARNINGS = ("lock directory unusable", "cannot record the result here; trying the next directory")


def exposure(box: Container) -> None:
    """`systemd-analyze security` on the live unit, as systemd on the booted system rates it."""
    step = "exposure"
    proc = box.run("systemd-analyze", "security", "--no-pager", UNIT, check=False)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    if found is None:
        raise Failed(step, "systemd-analyze security printed no exposure level", proc.stdout + proc.stderr)
    open_items = [line.strip() for line in proc.stdout.splitlines() if line.lstrip().startswith("✗")]
    level = float(found.group(1))
    if level > EXPOSURE_TARGET:
        raise Failed(step, f"the live unit rates {level}, above {EXPOSURE_TARGET}", "\n".join(open_items))
    log(f"systemd-analyze security on the live unit: {level} (at most {EXPOSURE_TARGET})")


def scale_in(box: Container, cloud: Cloud, work: Path) -> None:
    step = "scale-in"
    before_hooks, before_sns = len(cloud.terminations()), len(cloud.sns())
    payload = os.urandom(3 << 20)
    target = box.root / "var/log/system-test/payload.bin"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(payload)
    autoscaling.begin_termination(GROUP, cloud.instance_id, account_id=ACCOUNT, region=REGION)
    cloud.imds.target_lifecycle_state = "Terminated"
    until(lambda: cloud.terminations()[before_hooks:], 180, 1)
    journal = box.journal("-u", UNIT, "-n", "40")
    outcomes = cloud.terminations()[before_hooks:]
    if [(o.result, o.how) for o in outcomes] != [("CONTINUE", "completed")]:
        raise Failed(
            step,
            f"the terminating hook ended {[(o.result, o.how) for o in outcomes]}, not one CONTINUE",
            journal,
        )
    messages = until(lambda: cloud.sns()[before_sns:], 10)
    if len(messages) != 1:
        raise Failed(step, f"{len(messages)} SNS reports, not one", journal)
    report = json.loads(messages[0]["message"])
    if (report.get("status"), report.get("lifecycle_result")) != ("succeeded", "CONTINUE"):
        raise Failed(
            step,
            f"the SNS report says {report.get('status')}, {report.get('lifecycle_result')}: "
            f"{report.get('error')}",
            journal,
        )
    archives = [k for k in cloud.object_keys() if k.endswith(".tar.zst")]
    if len(archives) != 1:
        raise Failed(step, f"{len(archives)} archives in the bucket, not one: {cloud.object_keys()}", journal)
    log(f"scale-in: hook CONTINUE, one report ({report.get('status')}), archive {archives[0]}")
    myapp = box.run("systemctl", "is-active", "myapp", check=False).stdout.strip()
    if myapp != "inactive":
        raise Failed(step, f"the pre-command 'systemctl stop myapp' left myapp.service {myapp}", journal)
    ran = [(c.get("command"), c.get("exit_code")) for c in report.get("commands") or []]
    log(f"pre-command from inside the sandbox {ran}: myapp.service {myapp}")

    dest = work / "restored"
    env = {
        **os.environ,
        **cloud.env(),
        "AWS_ENDPOINT_URL_S3": cloud.s3_endpoint,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:9",
    }
    restore = subprocess.run(
        [
            str(Path(sys.executable).parent / "instance-agent"),
            "restore",
            "--bucket",
            cloud.bucket,
            "--latest",
            "--instance-id",
            cloud.instance_id,
            "--verify",
            str(dest),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    if restore.returncode != 0:
        raise Failed(step, f"restore --latest --verify exit {restore.returncode}", restore.stderr[-2000:])
    restored = dest / "var/log/system-test/payload.bin"
    if not restored.exists() or restored.read_bytes() != payload:
        raise Failed(step, "the restored /var/log/system-test/payload.bin differs from the saved one")
    log("restore --latest --verify: byte-identical")

    lines = [json.loads(x) for x in box.journal("-u", UNIT, "-o", "json").splitlines() if x.strip()]
    agent = []
    for entry in lines:
        with contextlib.suppress(ValueError, TypeError):
            message = json.loads(entry.get("MESSAGE", ""))
            if isinstance(message, dict) and {"ts", "level", "msg"} <= message.keys():
                agent.append(message)
    if not any(m.get("key") == archives[0] or archives[0] in json.dumps(m) for m in agent):
        raise Failed(
            step, "journalctl -u instance-agent -o json holds no JSON line naming the archive", journal
        )
    log(f"journal: {len(agent)} JSON lines of the agent, one names the archive")

    # The exactly-once record belongs in the state directory, which outlives a reboot; the
    # agent falls back to /run when it cannot write there, and says so.
    fallback = [m for m in agent if m.get("msg") in STATE_WARNINGS]
    state = box.root / "var/lib/instance-agent"
    records = (
        sorted(p.name for p in state.glob("*.json") if p.name != "launch-gate.json") if state.is_dir() else []
    )
    if fallback or not records:
        why = f"{fallback[0]['msg']}: {fallback[0].get('error')}" if fallback else "no record there"
        raise Failed(
            step,
            f"the watcher could not keep its record in /var/lib/instance-agent ({why}); it went to /run "
            "and is lost at a reboot: has the unit lost StateDirectory=instance-agent?",
        )
    log(f"the termination's record is in /var/lib/instance-agent: {records}")

    # The journal export: under systemd-nspawn the unit's own /proc (ProtectProc= mounts a
    # new one) shows the kernel's boot id, not the container's, so `journalctl -b 0` finds
    # nothing there. On an instance the two are one. What must hold here: it is said.
    journal_key = report.get("journal_key")
    sizes = {o["Key"]: o["Size"] for o in cloud.client("s3").list_objects_v2(Bucket=cloud.bucket)["Contents"]}
    size = sizes.get(journal_key or "", 0)
    said = any("journalctl -b 0 printed nothing" in json.dumps(m) for m in agent)
    if not journal_key or journal_key not in sizes or (size < 1024 and not said):
        raise Failed(
            step, f"the journal export {journal_key} is {sizes.get(journal_key or '')} bytes, unexplained"
        )
    log(f"journal export {journal_key}: {size} bytes" + (" (empty current boot: warned)" if said else ""))


def warm_pool_and_reboot(box: Container, cloud: Cloud) -> None:
    """Into the warm pool (the terminating hook, no backup), stopped, then out of it: the
    second boot waits in Pending:Wait, cloud-init does not run the user data again, and
    instance-agent-launch.service must answer it (issue 23 items 6 and 8)."""
    step = "warm pool"
    before_hooks = len(cloud.terminations())
    autoscaling.return_to_warm_pool(GROUP, cloud.instance_id, account_id=ACCOUNT, region=REGION)
    cloud.imds.target_lifecycle_state = "Warmed:Stopped"
    until(lambda: cloud.terminations()[before_hooks:], 120, 1)
    ended = [(o.result, o.how) for o in cloud.terminations()[before_hooks:]]
    if ended != [("CONTINUE", "completed")] or cloud.state() != "Warmed:Stopped":
        raise Failed(
            step, f"the return to the warm pool ended {ended}, {cloud.state()}", box.journal("-u", UNIT)
        )
    log("into the warm pool: the watcher completed the terminating hook CONTINUE; Warmed:Stopped")
    box.shutdown("poweroff")

    step = "second boot"
    autoscaling.leave_warm_pool(GROUP, cloud.instance_id, account_id=ACCOUNT, region=REGION)
    cloud.imds.target_lifecycle_state = "InService"
    if cloud.state() != "Pending:Wait":
        raise Failed(step, f"leaving the pool, the instance is {cloud.state()}, not Pending:Wait")
    box.boot()
    until(lambda: len(cloud.launches()) >= 2, 180, 1)
    launches = [(o.hook, o.result) for o in cloud.launches()]
    evidence = box.journal("-u", "instance-agent-launch", "-n", "30") + box.journal(
        "-u", "cloud-final", "-n", "10"
    )
    if launches != [(NAMES["LaunchHook"], "CONTINUE")] * 2:
        raise Failed(
            step, f"launching actions {launches}: the second boot's Pending:Wait was not answered", evidence
        )
    installs = box.file("/var/log/instance-agent-install.log").count("instance-agent install: ")
    if installs != 1:
        raise Failed(
            step, f"the user data ran {installs} times, not once (cloud-init runs it on the first boot)"
        )
    if cloud.state() != "InService":
        raise Failed(step, f"the instance is {cloud.state()} after the second boot", evidence)

    def both_active() -> bool:
        return box.run("systemctl", "is-active", UNIT, "myapp", check=False).stdout.split() == ["active"] * 2

    if not until(both_active, 60):
        raise Failed(
            step, "after the reboot instance-agent and myapp are not both active", box.journal("-n", "40")
        )
    log(
        "second boot (out of the pool): user data not run again; instance-agent-launch.service "
        "completed Pending:Wait CONTINUE; watcher and myapp active"
    )


def mount_overlay(lower: Path, work: Path, name: str) -> Path:
    """A second instance's disk: the same image, an empty overlay of its own."""
    dirs = {d: work / f"{d}-{name}" for d in ("upper", "ovl", "merged")}
    for d in dirs.values():
        d.mkdir()
    options = f"lowerdir={lower},upperdir={dirs['upper']},workdir={dirs['ovl']}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(dirs["merged"])], check=True)
    return dirs["merged"]


def stop_during_backup(
    cloud: Cloud, lower: Path, work: Path, netns: str, stack: contextlib.ExitStack
) -> None:
    """The replacement instance: its own first boot, then `systemctl stop` in the middle of an
    archive slowed on purpose (issue 23 item 4)."""
    root = mount_overlay(lower, work, "b")
    stack.callback(subprocess.run, ["umount", "-l", str(root)], check=False)
    prepare_root(root, cloud)
    box = Container(root, netns, work, name="b")
    stack.callback(box.kill)
    cloud.become(cloud.second)
    first_boot(box, cloud)
    reconfigure(box, cloud, "--stop-grace", "5")

    step = "stop during a backup"
    big = box.root / "var/log/system-test/big.bin"
    big.parent.mkdir(parents=True, exist_ok=True)
    big.write_bytes(os.urandom(48 << 20))
    before_sns = len(cloud.sns())
    slow = cloud.s3_proxy.add_rule(
        Rule(fault=Delay(10.0), method="PUT", query=upload_part, name="slow parts")
    )
    autoscaling.begin_termination(GROUP, cloud.instance_id, account_id=ACCOUNT, region=REGION)
    cloud.imds.target_lifecycle_state = "Terminated"
    if not slow.fired.wait(60):
        raise Failed(step, "the backup never uploaded a part", box.journal("-u", UNIT, "-n", "30"))
    timeout_stop = box.run("systemctl", "show", "-p", "TimeoutStopUSec", "--value", UNIT).stdout.strip()
    started = time.monotonic()
    box.run("systemctl", "stop", UNIT, check=False, timeout=600)
    took = time.monotonic() - started
    cloud.s3_proxy.clear()
    shown = box.run("systemctl", "show", "-p", "ActiveState,Result,ExecMainStatus", UNIT).stdout.split()
    show = dict(line.split("=", 1) for line in shown)
    journal = box.journal("-u", UNIT, "-n", "30")
    ended = [(o.result, o.how) for o in cloud.terminations()]
    if ended != [("ABANDON", "completed")]:
        raise Failed(
            step, f"the terminating hook ended {ended}, not one ABANDON completed by the agent", journal
        )
    reports = [json.loads(m["message"]) for m in cloud.sns()[before_sns:]]
    if [r.get("status") for r in reports] != ["failed"]:
        raise Failed(step, f"reports {[r.get('status') for r in reports]}, not one failure", journal)
    mine = [k for k in cloud.object_keys() if f"/{cloud.instance_id}/" in k]
    uploads = cloud.client("s3").list_multipart_uploads(Bucket=cloud.bucket).get("Uploads", [])
    if mine or uploads:
        raise Failed(step, f"the stopped backup left {mine} and {len(uploads)} multipart uploads", journal)
    # Ended by the agent itself, within TimeoutStopSec: not killed. It exits with the cut
    # backup's code (1: failed, reported, ABANDON), so systemd says failed (exit-code).
    if show.get("ActiveState") not in ("inactive", "failed") or show.get("Result") not in (
        "success",
        "exit-code",
    ):
        raise Failed(step, f"after the stop the unit is {show}: killed, not ended by the agent", journal)
    log(
        f"systemctl stop during the archive: {took:.1f} s (TimeoutStopSec {timeout_stop}), upload aborted, "
        f"report '{reports[0].get('status')}', hook ABANDON, unit {show.get('ActiveState')} "
        f"({show.get('Result')}, status {show.get('ExecMainStatus')})"
    )
    box.shutdown()


def check_tokens(cloud: Cloud) -> None:
    if cloud.imds.tokenless_reads:
        raise Failed(
            "imds",
            f"{cloud.imds.tokenless_reads} token-less (IMDSv1) reads of /latest/ hit the "
            "metadata service: the agent and the user data must use IMDSv2",
        )
    log(f"imds: cloud-init's {cloud.imds.cloudinit_reads} reads answered; no IMDSv1 read from the agent")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--netns", required=True)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--lower", type=Path, required=True, help="the cached root, read-only")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    box = Container(args.root, args.netns, args.work)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        stack.callback(box.kill)
        try:
            cloud = Cloud(args.work, stack)
            prefix = upload_bundle(cloud, args.bundle)
            cloud.imds.user_data = render_user_data(cloud, prefix)
            prepare_root(args.root, cloud)
            log(f"stand-ins up, bundle uploaded, in {time.monotonic() - started:.0f} s")
            first_boot(box, cloud)
            ssm_agent_only_where_the_push_path_is(box)
            reconfigure(box, cloud)
            firewall(box, cloud)
            exposure(box)
            warm_pool_and_reboot(box, cloud)
            scale_in(box, cloud, args.work)
            box.shutdown()
            stop_during_backup(cloud, args.lower, args.work, args.netns, stack)
            check_tokens(cloud)
        except Failed as failed:
            log(f"FAILED: {failed.step}: {failed}")
            if failed.evidence:
                print(failed.evidence.rstrip()[-4000:], file=sys.stderr)
                log(f"FAILED: {failed.step}: {failed}")
            if os.environ.get("SYSTEM_TEST_KEEP"):
                # To look around: nsenter -t <leader> -a bash (Ctrl-C run.sh to end it).
                log(f"SYSTEM_TEST_KEEP: the container runs on, leader pid {box.leader}")
                with contextlib.suppress(KeyboardInterrupt):
                    time.sleep(3600)
            return 1
        except Exception as err:  # a bug of the driver or a stand-in: one line, then the trace
            log(f"FAILED: driver: {type(err).__name__}: {err}")
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
