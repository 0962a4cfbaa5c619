"""`instance-agent launch-gate`: answer a live launching lifecycle action, once, on any boot.

A launching hook holds an instance twice in a warm-pooled group: in `Warmed:Pending:Wait`
on its way into the pool, and in `Pending:Wait` when it leaves the pool for the group
(https://docs.aws.amazon.com/autoscaling/ec2/userguide/warm-pool-instance-lifecycle.html).
"By default, cloud-init runs user data only on the first boot" (the same page; cloud-init's
scripts-user module runs once per instance), so the instance's later boots need this command, run by the
oneshot unit instance-agent-launch.service: it asks Auto Scaling for the instance's
LifecycleState (DescribeAutoScalingInstances), and while it is a launching wait it runs
`doctor --launch` and completes the action by InstanceId with CONTINUE or ABANDON
(https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_CompleteLifecycleAction.html).
Both pages in our words: docs/aws-behaviour.md, "Lifecycle hooks".

Each answer is recorded in the state directory under (boot id, lifecycle state): the user
data's first-boot run and the unit's run of the same boot answer once between them, and the
next boot's action (a new boot id) is answered again.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from instance_agent import awserror, config, handoff_adopt, logs, statedir, wiring
from instance_agent.clients import Clients
from instance_agent.errors import EXIT_OK, AgentError, ConfigError
from instance_agent.identity import Identity
from instance_agent.retained import settle_wait

log = logging.getLogger("instance_agent.launch_gate")

LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
# The states a launching hook holds an instance in (warm-pool-instance-lifecycle.html).
LAUNCH_WAITS = ("Pending:Wait", "Warmed:Pending:Wait")
# Before them: the boot, and the user data, can run while the group still shows Pending and
# has no action yet (no page says when the wait begins; users report CompleteLifecycleAction
# from user data failing with "No active Lifecycle Action found",
# https://github.com/kubernetes/kops/issues/16582). The gate looks again while the state is
# one of these, for up to PENDING_FOR seconds (1, 2, 4 ... s apart, at most 15).
PENDING = ("Pending", "Warmed:Pending")
PENDING_FOR = 300.0
RECORD = "launch-gate.json"
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"
KEEP = 16  # answered keys kept: enough for any number of retries within a few boots


@dataclass(frozen=True)
class Decision:
    answer: bool
    reason: str


def decide(state: str | None, key: str, answered: list[str]) -> Decision:
    """Whether this run answers: only a launching wait, and only one not answered yet."""
    if state not in LAUNCH_WAITS:
        return Decision(False, f"lifecycle state {state or 'unknown'}: no launching action to answer")
    if key in answered:
        return Decision(False, f"{state} on this boot was answered already")
    return Decision(True, f"{state}: a launching action waits for its answer")


def action_key(boot_id: str, state: str | None) -> str:
    return f"{boot_id.strip()}:{state}"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "launch-gate",
        help="complete a live launching lifecycle action after doctor --launch (every boot)",
    )
    wiring.add_config_option(p)
    p.add_argument(
        "--hook",
        default=None,
        help="the group's launching hook (default: the one DescribeLifecycleHooks lists for "
        "autoscaling:EC2_INSTANCE_LAUNCHING)",
    )
    p.add_argument(
        "--boot-id-file",
        default=BOOT_ID_FILE,
        help=f"where this boot's id is read (default {BOOT_ID_FILE})",
    )
    wiring.add_schema_options(p, config.BACKUP)
    p.set_defaults(func=cmd_launch_gate)


def _answered(state_dir: str) -> list[str]:
    try:
        data = json.loads(statedir.read(state_dir, RECORD))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        raise AgentError(f"{state_dir}/{RECORD} is unreadable: {err}") from None
    return [str(k) for k in data.get("answered", [])] if isinstance(data, dict) else []


def _find_hook(client: Any, group: str) -> str:
    hooks = client.describe_lifecycle_hooks(AutoScalingGroupName=group)["LifecycleHooks"]
    names = [h["LifecycleHookName"] for h in hooks if h.get("LifecycleTransition") == LAUNCHING]
    if len(names) != 1:
        raise ConfigError(f"group {group} has {len(names)} launching hooks; pass --hook")
    return str(names[0])


def _settled(
    client: Any,
    instance_id: str,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[dict[str, Any]]:
    """The instance as DescribeAutoScalingInstances lists it, once it is past PENDING (or
    PENDING_FOR has passed)."""
    started, looks = clock(), 0
    while True:
        try:
            found = client.describe_auto_scaling_instances(InstanceIds=[instance_id])
        except (ClientError, BotoCoreError) as err:
            raise AgentError(
                f"DescribeAutoScalingInstances failed: {awserror.describe(err)}", code=awserror.code_of(err)
            ) from None
        instances: list[dict[str, Any]] = found["AutoScalingInstances"]
        state = instances[0]["LifecycleState"] if instances else None
        pause = settle_wait(looks, clock() - started, PENDING_FOR) if state in PENDING else None
        if pause is None:
            return instances
        log.info("launch gate: the instance is still pending; waiting for its launching action")
        sleep(pause)
        looks += 1


def _boot_id(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError as err:
        raise ConfigError(f"cannot read the boot id from {path}: {err}") from None


def cmd_launch_gate(args: argparse.Namespace) -> int:
    from instance_agent.imds import IMDS

    problem = None
    try:
        cfg = wiring.load(args, config.BACKUP)
    except ConfigError as err:
        cfg, problem = config.Config.defaults(), str(err)
    logs.setup(cfg.log_level if problem is None else "info")
    boot_id = _boot_id(args.boot_id_file)
    imds = IMDS()
    try:
        identity = wiring.resolve_identity(cfg, imds)
    finally:
        imds.close()
    clients = wiring.make_clients(cfg, identity.region)

    def report(text: str) -> None:
        sys.stdout.write(text)  # doctor's report, into the install log
        sys.stdout.flush()

    answer(cfg, problem, identity, clients, boot_id=boot_id, hook=args.hook, report=report)
    # ABANDON is an answer delivered, not a failure of the gate: exit 0 either way.
    return EXIT_OK


def answer_from_watcher(cfg: config.Config, identity: Identity) -> None:
    """The watcher saw IMDS's target state go from Warmed:* to InService with no boot in
    between: an instance leaving a warm pool whose pool state is Running or Hibernated,
    which no unit runs the gate for (warm-pool-instance-lifecycle.html: the launching hook
    holds it in Pending:Wait on its way out)."""
    clients = wiring.make_clients(cfg, identity.region)

    def report(text: str) -> None:
        log.info("doctor --launch", extra=logs.fields(report=text))

    answer(cfg, None, identity, clients, boot_id=_boot_id(BOOT_ID_FILE), hook=None, report=report)


def answer(
    cfg: config.Config,
    problem: str | None,
    identity: Identity,
    clients: Clients,
    *,
    boot_id: str,
    hook: str | None,
    report: Callable[[str], None],
) -> None:
    """Answer the instance's launching wait once per (boot, state): doctor --launch, the
    hand-off adopted at launch, then CompleteLifecycleAction CONTINUE or ABANDON."""
    from instance_agent import doctor

    client = clients.autoscaling
    if client is None:
        raise ConfigError("launch-gate completes a lifecycle action: drop --no-complete")
    statedir.usable(cfg.state_dir)
    # One run at a time: the user data's and the unit's run of the first boot may overlap.
    fd = statedir.open_or_create(cfg.state_dir, RECORD + ".lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        instances = _settled(client, identity.instance_id)
        state = instances[0]["LifecycleState"] if instances else None
        key = action_key(boot_id, state)
        answered = _answered(cfg.state_dir)
        decision = decide(state, key, answered)
        log.info("launch gate: " + decision.reason, extra=logs.fields(answer=decision.answer))
        if not decision.answer:
            return
        group = instances[0]["AutoScalingGroupName"]
        hook = hook or _find_hook(client, group)
        checks = doctor.run(cfg, problem, wiring.make_probe_clients, launch=True)
        report(doctor.render(checks, symbols=False))
        result = "ABANDON" if doctor.failed(checks) else "CONTINUE"
        if result == "CONTINUE" and problem is None:
            # Before the instance goes in service: a replacement takes over the state of
            # the instance it replaces (docs/handoff.md, "Moving state on scale-in").
            handoff_adopt.at_launch(cfg, identity, clients, group)
        try:
            client.complete_lifecycle_action(
                AutoScalingGroupName=group,
                LifecycleHookName=hook,
                InstanceId=identity.instance_id,
                LifecycleActionResult=result,
            )
        except (ClientError, BotoCoreError) as err:
            raise AgentError(
                f"CompleteLifecycleAction {result} failed: {awserror.describe(err)}",
                code=awserror.code_of(err),
            ) from None
        record = {"answered": ([*answered, key])[-KEEP:], "last": {"key": key, "result": result}}
        statedir.write_atomic(cfg.state_dir, RECORD, json.dumps(record).encode())
        log.info(f"launching lifecycle action: {result}", extra=logs.fields(hook=hook, state=state))
    finally:
        os.close(fd)
