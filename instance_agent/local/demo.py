"""`instance-agent demo`: the whole story on a local emulated AWS, no account needed.

A moto server (S3, SNS, EC2, SSM, Auto Scaling with our lifecycle extension) and an IMDSv2
stub run in this process. The demo creates a bucket, a topic and a group with a terminating
hook, runs `doctor` against them, scales the group in (the instance reaches
Terminating:Wait and IMDS says Terminated) and lets one trigger path answer:

- `direct` (the default, the fastest): detect the termination through IMDSv2 as the watcher
  does, then run the backup pipeline in this process;
- `lambda`, the push path: invoke the Lambda trigger's handler with the terminate lifecycle
  event, then play the SSM agent: render packaging/ssm-document.yaml's runCommand with the
  command's parameters (each checked against its allowedPattern) and run it with bash. It
  runs the installed `instance-agent backup`, configured only by an agent.toml;
- `watch`: start `instance-agent watch` and let it notice the termination itself.

Then it restores the archive, verifies it against its manifest and compares it byte for byte
with the source. `--keep-running` leaves the stand-in up afterwards, with a fresh InService
instance in the group, for trying `list`, `restore`, `doctor` and `status` from another shell;
`--env-file` writes the variables that point a shell at it, and `--detach` does all that in
the background and returns once the stand-in is ready.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import boto3

from instance_agent import config, doctor, listing, termination, verify
from instance_agent.errors import ConfigError
from instance_agent.imds import IMDS
from instance_agent.local import autoscaling, samples
from instance_agent.local.imds import IMDSStub
from instance_agent.local.moto_server import MotoServer
from instance_agent.local.serve import stop_process, tail, wait_until
from instance_agent.restore import restore_s3
from instance_agent.wiring import make_clients, resolve_identity

REGION = "us-east-1"
BUCKET = "demo-backups"
DOCUMENT = "instance-agent-backup"
TRIGGERS = ("direct", "lambda", "watch")
ROOT = Path(__file__).resolve().parents[2]  # the source checkout, for packaging/
WATCH_START_TIMEOUT = 30.0  # the watcher's first IMDS poll, Python start-up included
BACKUP_TIMEOUT = 300.0
WATCH_STOP_TIMEOUT = 30.0  # the backup is done by then: SIGTERM stops an idle watcher at once
DETACH_TIMEOUT = 600.0  # the background demo: install-free, but the source may be large


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _isolate_from_real_aws(moto_endpoint: str, imds_endpoint: str, agent_toml: Path) -> None:
    """Point this process (and what it starts) at the stand-ins with fake credentials,
    whatever the shell had."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "INSTANCE_AGENT_")):
            del os.environ[name]
    os.environ.update(_stand_in_env(moto_endpoint, imds_endpoint, agent_toml))


def _stand_in_env(moto_endpoint: str, imds_endpoint: str, agent_toml: Path) -> dict[str, str]:
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
    return "demo-asg", "demo-backup-hook", _in_service("demo-asg")


def _in_service(group: str) -> str:
    asg = boto3.client("autoscaling", region_name=REGION)
    described = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[group])
    instances = described["AutoScalingGroups"][0]["Instances"]
    return str(next(i["InstanceId"] for i in instances if i["LifecycleState"] == "InService"))


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
        # Auto Scaling puts the instance in Terminating:Wait; IMDS says Terminated.
        autoscaling.begin_termination(self.group, self.instance_id)
        self.imds.target_lifecycle_state = "Terminated"
        say(f"scale-in: {self.instance_id} is Terminating:Wait, held by hook {self.hook}")


def _write_agent_toml(path: Path, topic: str, source: Path, tmp: Path) -> None:
    def q(value: str) -> str:
        return json.dumps(value)  # a JSON string is a valid TOML basic string

    path.write_text(
        f"bucket = {q(BUCKET)}\ntopic_arn = {q(topic)}\nsource = [{q(str(source))}]\n"
        f"state_dir = {q(str(tmp / 'state'))}\nruntime_dir = {q(str(tmp / 'run'))}\n"
        "journal = false\n",
        encoding="utf-8",
    )


# --- the three trigger paths --------------------------------------------------------------


def _direct(stand: Stand) -> dict[str, Any]:
    stand.scale_in()
    client = IMDS()
    t0 = time.monotonic()
    state = client.get("autoscaling/target-lifecycle-state")
    client.close()
    say(
        f"detected via IMDSv2: target-lifecycle-state={state} "
        f"({(time.monotonic() - t0) * 1000:.0f} ms; token-less reads: {stand.imds.tokenless_reads})"
    )
    cfg = config.load({}, os.environ, config_file=str(stand.agent_toml))
    ident = resolve_identity(cfg)
    outcome = termination.run(
        cfg,
        ident,
        make_clients(cfg, ident.region),
        termination.Options(imds_state=state, progress_interval=5.0),
    )
    return outcome.result.to_json()


@dataclass
class _LambdaContext:
    aws_request_id: str

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


def _render_like_the_ssm_agent(document: dict[str, Any], parameters: dict[str, list[str]]) -> str:
    """The shell script the SSM agent would run: defaults filled in, every value checked
    against its allowedPattern (Go semantics), `{{ Name }}` replaced literally."""
    import re

    from instance_agent.local import ssm

    values: dict[str, str] = {}
    for name, spec in document["parameters"].items():
        given = parameters.get(name)
        value = given[0] if given else str(spec.get("default", ""))
        if not ssm.compile_pattern(str(spec["allowedPattern"]), "go").search(value):
            raise ConfigError(f"parameter {name}={value!r} fails its allowedPattern")
        values[name] = value
    [step] = document["mainSteps"]
    lines = step["inputs"]["runCommand"]
    return (
        "\n".join(
            re.sub(r"\{\{\s*([A-Za-z0-9]+)\s*\}\}", lambda m: values[m.group(1)], line) for line in lines
        )
        + "\n"
    )


def _via_lambda(stand: Stand) -> dict[str, Any]:
    import lambda_trigger.handler as trigger
    from instance_agent.local import ssm

    doc_path = ROOT / "packaging" / "ssm-document.yaml"
    if not doc_path.is_file():
        raise ConfigError(f"--trigger lambda needs the source checkout ({doc_path} is missing)")
    ssm.install()
    ssm_client = boto3.client("ssm", region_name=REGION)
    ssm_client.create_document(
        Name=DOCUMENT,
        Content=doc_path.read_text(encoding="utf-8"),
        DocumentType="Command",
        DocumentFormat="YAML",
    )
    ssm.register(stand.instance_id)
    stand.scale_in()
    [action] = [a for a in autoscaling.active_actions() if a.instance_id == stand.instance_id]
    event = {
        "version": "0",
        "id": str(uuid.uuid4()),
        "source": "aws.autoscaling",
        "detail-type": "EC2 Instance-terminate Lifecycle Action",
        "account": "123456789012",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "region": REGION,
        "resources": [],
        "detail": {
            "LifecycleActionToken": action.token,
            "AutoScalingGroupName": stand.group,
            "LifecycleHookName": stand.hook,
            "EC2InstanceId": stand.instance_id,
            "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
        },
    }
    os.environ.update(DOCUMENT_NAME=DOCUMENT, TOPIC_ARN=stand.topic)
    [sent] = trigger.handler(event, _LambdaContext(str(uuid.uuid4())))["results"]
    say(
        f"Lambda trigger: {sent['status']} command {sent.get('command_id')} to "
        f"{stand.instance_id} (delivery {sent.get('delivery')})"
    )
    if sent["status"] != "sent":
        raise ConfigError(f"the Lambda trigger did not send the command: {sent}")
    [command] = [c for c in ssm.sent_commands() if c.command_id == sent["command_id"]]
    # As JSON: SSM converts the YAML it was given, and json needs no third-party parser.
    content = ssm_client.get_document(Name=DOCUMENT, DocumentFormat="JSON")["Content"]
    script = _render_like_the_ssm_agent(json.loads(content), command.parameters)
    # The document puts /opt/instance-agent/bin first; this Python's scripts come next, so
    # the agent under demonstration runs unless one is installed there.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    say("SSM agent (played by the demo): running the document's runCommand with bash")
    proc = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=BACKUP_TIMEOUT, check=False
    )
    ssm.finish(
        command.command_id,
        stand.instance_id,
        "Success" if proc.returncode == 0 else "Failed",
        response_code=proc.returncode,
        stdout=proc.stdout,
        stderr=proc.stderr,
    )
    if not proc.stdout.strip():
        raise ConfigError(f"`instance-agent backup` printed no result: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _via_watch(stand: Stand) -> dict[str, Any]:
    log_path = stand.tmp / "watch.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "instance_agent", "watch", "--poll-interval", "0.5"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        if (
            not wait_until(
                lambda: (
                    any(p.endswith("target-lifecycle-state") for _, p, _ in stand.imds.requests)
                    or proc.poll() is not None
                ),
                WATCH_START_TIMEOUT,
            )
            or proc.poll() is not None
        ):
            raise ConfigError(f"the watcher did not start polling: {tail(log_path)}")
        say(f"watcher (pid {proc.pid}) polls IMDSv2 every 0.5 s")
        stand.scale_in()
        if not wait_until(
            lambda: bool(_backup_messages(stand)) or proc.poll() is not None, BACKUP_TIMEOUT
        ) or not _backup_messages(stand):
            raise ConfigError(f"the watcher reported no backup: {tail(log_path)}")
    finally:
        stop_process(proc, WATCH_STOP_TIMEOUT)
    say(f"watcher stopped (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(_backup_messages(stand)[0]["message"])
    return result


def _backup_messages(stand: Stand) -> list[dict[str, Any]]:
    return [
        m
        for m in stand.moto.sns_messages(stand.topic)
        if str(m["subject"]).startswith("instance-agent: backup")
    ]


# --- the story ----------------------------------------------------------------------------


def _run_doctor(stand: Stand) -> bool:
    cfg = config.load({}, os.environ, config_file=str(stand.agent_toml))
    checks = doctor.run(cfg, None, make_clients, publish_test=True)
    say("doctor, against the stand-in:")
    for line in doctor.render(checks).splitlines():
        say("  " + line)
    return not doctor.failed(checks)


def run(
    source: str | None = None,
    size_mib: int = 64,
    trigger: str = "direct",
    *,
    keep_running: bool = False,
    env_file: str | None = None,
) -> int:
    if trigger not in TRIGGERS:
        raise ConfigError(f"unknown trigger {trigger!r}; one of {', '.join(TRIGGERS)}")
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="instance-agent-demo-") as tmp_name,
        MotoServer() as moto,
        IMDSStub() as imds,
    ):
        tmp = Path(tmp_name)
        agent_toml = tmp / "agent.toml"
        _isolate_from_real_aws(moto.endpoint, imds.endpoint, agent_toml)
        say(f"local AWS (moto) at {moto.endpoint}; IMDSv2 stub at {imds.endpoint}")
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET)
        topic = boto3.client("sns", region_name=REGION).create_topic(Name="demo-reports")["TopicArn"]
        group, hook, instance_id = _create_group(moto.endpoint)
        imds.instance_id, imds.region = instance_id, REGION
        imds.target_lifecycle_state = "InService"
        say(f"group {group} with terminating hook {hook}; instance {instance_id} is InService")

        src = Path(source).resolve() if source else samples.generate(tmp / "var-log", size_mib)
        say(f"source: {src}" + ("" if source else f" (generated, about {size_mib} MiB of sample logs)"))
        _write_agent_toml(agent_toml, topic, src, tmp)
        stand = Stand(moto, imds, tmp, agent_toml, topic, group, hook, instance_id)
        doctor_ok = _run_doctor(stand)

        say(f"trigger path: {trigger}")
        r = {"direct": _direct, "lambda": _via_lambda, "watch": _via_watch}[trigger](stand)
        ratio = r["bytes_read"] / max(r["bytes_uploaded"], 1)
        rate = r["bytes_read"] / 2**20 / max(r["duration_s"], 1e-3)
        say(
            f"backup {r['status']}: {r['files']} files, {r['bytes_read']:,} bytes read, "
            f"{r['bytes_uploaded']:,} uploaded (ratio {ratio:.1f}x), {rate:.0f} MiB/s, "
            f"{r['warnings']} warnings"
        )
        say(f"archive:  s3://{r['bucket']}/{r['key']}")
        say(f"manifest: s3://{r['bucket']}/{r['manifest_key']}")
        messages = _backup_messages(stand)
        for m in messages:
            say(f"SNS message ({m['subject']}): {m['message']}")
        outcomes = [o for o in autoscaling.outcomes() if o.instance_id == instance_id]
        for o in outcomes:
            say(f"lifecycle action {o.how} with {o.result}; instance leaves the group")

        diffs = _restore_and_compare(s3, r, src, tmp / "restored")
        ok = (
            r["status"] == "succeeded"
            and doctor_ok
            and not diffs
            and len(messages) == 1
            and [(o.result, o.how) for o in outcomes] == [("CONTINUE", "completed")]
            and imds.tokenless_reads == 0
        )
        say(("demo passed" if ok else "demo FAILED") + f" in {time.monotonic() - started:.1f} s")
        if not ok:
            say(json.dumps(r, indent=2))
            return 1
        if keep_running:
            _serve(stand, env_file)
        return 0


def _restore_and_compare(s3: Any, r: dict[str, Any], src: Path, dest: Path) -> list[str]:
    """Restore the archive into `dest`, check it against its manifest and the source; the
    paths that differ."""
    manifest = listing.read_manifest(s3, r["bucket"], r["manifest_key"])
    report = restore_s3(
        s3, r["bucket"], r["key"], str(dest), expected_tar_bytes=manifest["totals"]["tar_bytes"]
    )
    checked = verify.compare(str(dest), manifest)
    diffs = _same_tree(src, dest / str(src).lstrip("/"))
    diffs += [d.display() for d in checked.differences]
    say(
        f"restored {report.files} files ({report.bytes:,} bytes): "
        + ("identical to the source" if not diffs else f"{len(diffs)} differ: {diffs[:5]}")
        + f"; {checked.checked} entries verified against the manifest"
    )
    return diffs


# --- keeping the stand-in up ---------------------------------------------------------------


def _serve(stand: Stand, env_file: str | None) -> None:
    """Give the group a fresh InService instance, tell the shell how to reach the stand-in,
    and wait for SIGINT or SIGTERM."""
    backed_up = stand.instance_id
    boto3.client("autoscaling", region_name=REGION).set_desired_capacity(
        AutoScalingGroupName=stand.group, DesiredCapacity=1
    )
    fresh = _in_service(stand.group)
    stand.imds.instance_id, stand.imds.target_lifecycle_state = fresh, "InService"
    env = {
        **_stand_in_env(stand.moto.endpoint, stand.imds.endpoint, stand.agent_toml),
        "DEMO_INSTANCE_ID": backed_up,
        "DEMO_PID": str(os.getpid()),
    }
    text = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    say(
        f"stand-in kept running (pid {os.getpid()}); this machine now plays {fresh}, a fresh "
        f"InService instance of {stand.group}; the backup above is {backed_up}'s"
    )
    if env_file:
        tmp = f"{env_file}.tmp"
        Path(tmp).write_text(text, encoding="utf-8")
        os.replace(tmp, env_file)  # appears whole: a waiting shell never reads half of it
        say(f"point a shell at it: . {env_file}")
    else:
        say("point a shell at it:\n" + text.rstrip())
    say(
        "then: instance-agent list; instance-agent restore --latest --instance-id "
        '"$DEMO_INSTANCE_ID" --verify restored/; instance-agent doctor'
    )
    stop = threading.Event()

    def handler(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    say("stop it with Ctrl-C or: kill " + str(os.getpid()))
    while not stop.wait(1.0):
        pass
    if env_file:
        with contextlib.suppress(OSError):
            os.unlink(env_file)  # its endpoints are gone with us
    say("stand-in stopped")


def detach(*, source: str | None, size_mib: int, trigger: str, env_file: str) -> int:
    """Run the demo with --keep-running in the background; return once its stand-in is
    ready (the env file exists) or it failed. Its output goes to ENV_FILE.log."""
    env_path = Path(env_file).resolve()
    with contextlib.suppress(FileNotFoundError):
        env_path.unlink()
    log_path = env_path.with_name(env_path.name + ".log")
    args = [
        sys.executable,
        "-m",
        "instance_agent",
        "demo",
        "--keep-running",
        "--env-file",
        str(env_path),
        "--size-mib",
        str(size_mib),
        "--trigger",
        trigger,
    ]
    if source:
        args += ["--source", str(Path(source).resolve())]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    ready = wait_until(lambda: env_path.exists() or proc.poll() is not None, DETACH_TIMEOUT)
    story = [line for line in tail(log_path, chars=None).splitlines() if not line.startswith("{")]
    sys.stdout.write("".join(line + "\n" for line in story))
    if not ready or not env_path.exists():
        if proc.poll() is None:
            proc.terminate()
        sys.stderr.write(f"instance-agent: error: the demo did not get ready; see {log_path}\n")
        return proc.returncode or 1
    say(f"stand-in running in the background (pid {proc.pid}); its log: {log_path}")
    return 0
