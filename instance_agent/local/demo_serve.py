"""The demo's stand-in kept up after the story (`--keep-running`): a fresh instance, the
variables that point a shell at it, until SIGINT or SIGTERM."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import threading
from pathlib import Path
from types import FrameType

import boto3

from instance_agent.local.demo_stand import REGION, Stand, in_service, say, stand_in_env


def serve(stand: Stand, env_file: str | None) -> None:
    """Give the group a fresh InService instance, tell the shell how to reach the stand-in,
    and wait for SIGINT or SIGTERM."""
    backed_up = stand.instance_id
    boto3.client("autoscaling", region_name=REGION).set_desired_capacity(
        AutoScalingGroupName=stand.group, DesiredCapacity=1
    )
    fresh = in_service(stand.group)
    stand.imds.instance_id, stand.imds.target_lifecycle_state = fresh, "InService"
    env = {
        **stand_in_env(stand.moto.endpoint, stand.imds.endpoint, stand.agent_toml),
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
