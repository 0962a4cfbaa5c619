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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3

from instance_agent import config, doctor, listing, verify
from instance_agent.errors import ConfigError
from instance_agent.local import autoscaling, samples
from instance_agent.local.demo_serve import serve
from instance_agent.local.demo_stand import (
    BUCKET,
    REGION,
    Stand,
    create_group,
    isolate_from_real_aws,
    say,
    write_agent_toml,
)
from instance_agent.local.demo_triggers import backup_messages, direct, via_lambda, via_watch
from instance_agent.local.imds import IMDSStub
from instance_agent.local.moto_server import MotoServer
from instance_agent.local.serve import tail, wait_until
from instance_agent.restore import restore_s3
from instance_agent.wiring import make_clients

TRIGGERS = ("direct", "lambda", "watch")
DETACH_TIMEOUT = 600.0  # the background demo: install-free, but the source may be large


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
        isolate_from_real_aws(moto.endpoint, imds.endpoint, agent_toml)
        say(f"local AWS (moto) at {moto.endpoint}; IMDSv2 stub at {imds.endpoint}")
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET)
        topic = boto3.client("sns", region_name=REGION).create_topic(Name="demo-reports")["TopicArn"]
        group, hook, instance_id = create_group(moto.endpoint)
        imds.instance_id, imds.region = instance_id, REGION
        imds.target_lifecycle_state = "InService"
        say(f"group {group} with terminating hook {hook}; instance {instance_id} is InService")

        src = Path(source).resolve() if source else samples.generate(tmp / "var-log", size_mib)
        say(f"source: {src}" + ("" if source else f" (generated, about {size_mib} MiB of sample logs)"))
        write_agent_toml(agent_toml, topic, src, tmp)
        stand = Stand(moto, imds, tmp, agent_toml, topic, group, hook, instance_id)
        doctor_ok = _run_doctor(stand)

        say(f"trigger path: {trigger}")
        r = {"direct": direct, "lambda": via_lambda, "watch": via_watch}[trigger](stand)
        ratio = r["bytes_read"] / max(r["bytes_uploaded"], 1)
        rate = r["bytes_read"] / 2**20 / max(r["duration_s"], 1e-3)
        say(
            f"backup {r['status']}: {r['files']} files, {r['bytes_read']:,} bytes read, "
            f"{r['bytes_uploaded']:,} uploaded (ratio {ratio:.1f}x), {rate:.0f} MiB/s, "
            f"{r['warnings']} warnings"
        )
        say(f"archive:  s3://{r['bucket']}/{r['key']}")
        say(f"manifest: s3://{r['bucket']}/{r['manifest_key']}")
        messages = backup_messages(stand)
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
            serve(stand, env_file)
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
