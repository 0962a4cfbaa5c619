"""`instance-agent doctor`: check, before it is needed, everything a backup will need here.

One line per check: ✓ it works, ✗ it is broken (with the fix), ! it works but lacks
something worth knowing (with what to do; not a failure), – skipped (with the reason: not
applicable here, or it depends on a check that failed). Exit 0 only when nothing is ✗.

The permission probes are harmless and ask for nothing the backup does not need itself:
- S3: CreateMultipartUpload under the prefix, with the backup's encryption, storage class
  and expected owner, then AbortMultipartUpload of it. That proves s3:PutObject (which every
  part and the manifest need) and the abort a failed backup needs. Nothing is stored. Then
  ListMultipartUploads under the prefix, which a run after a crash uses to find the killed
  run's upload.
- Auto Scaling: the two describe calls hook discovery makes, and RecordLifecycleActionHeartbeat.
  While the instance is not terminating AWS authorises that call, then answers "No active
  Lifecycle Action": the permission is proven and nothing changes. CompleteLifecycleAction is
  never probed: on a terminating instance it would end the real action.
- SNS: the instance role grants only sns:Publish (no GetTopicAttributes), so only a message
  proves the topic; doctor sends one only with --publish-test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from instance_agent.config import Config
from instance_agent.doctor_check import FAIL as FAIL
from instance_agent.doctor_check import OK as OK
from instance_agent.doctor_check import SKIP as SKIP
from instance_agent.doctor_check import SYMBOLS as SYMBOLS
from instance_agent.doctor_check import WARN as WARN
from instance_agent.doctor_check import Check as Check
from instance_agent.doctor_check import Context, Facts, Found
from instance_agent.doctor_checks_aws import check_bucket_and_upload, check_topic
from instance_agent.doctor_checks_config import check_compression, check_config, check_identity, check_imds
from instance_agent.doctor_checks_host import (
    check_retained,
    check_shipping,
    check_ssm_agent,
    check_systemd_unit,
)
from instance_agent.doctor_checks_lifecycle import check_hook, check_lifecycle_permission

WORDS = {OK: "ok", FAIL: "FAIL", SKIP: "skip", WARN: "warn"}  # for terminals that cannot show the symbols

Step = Callable[[Context, Facts], Found]

# In order: each check is given the facts the checks before it found.
STEPS: tuple[Step, ...] = (
    check_config,
    check_compression,
    check_imds,
    check_identity,
    check_hook,
    check_lifecycle_permission,
    check_bucket_and_upload,
    check_topic,
    check_ssm_agent,
    check_systemd_unit,
    check_shipping,
    check_retained,
)


def run_step(step: Step, ctx: Context, facts: Facts) -> tuple[Check, ...]:
    """The lines of one check; a check that raises is one failed line, so that one broken
    check does not hide the others."""
    try:
        found = step(ctx, facts)
    except Exception as err:
        return (
            Check(
                step.__name__.removeprefix("check_").replace("_", " "),
                FAIL,
                f"the check itself failed: {type(err).__name__}: {err}",
                "report this as a bug, with the output of --json",
            ),
        )
    if found is None:
        return ()
    return found if isinstance(found, tuple) else (found,)


@dataclass
class Doctor:
    """The runner: the checks in order, each given what the earlier ones found. The report
    and the facts are the runner's own; a check only returns its lines."""

    cfg: Config
    config_error: str | None
    make_clients: Callable[[Config, str], Any]
    publish_test: bool = False
    launch: bool = False  # --launch: the launching hook's gate (check_lifecycle_permission)
    checks: list[Check] = field(default_factory=list)
    facts: Facts = field(default_factory=Facts)

    def __post_init__(self) -> None:
        make, cfg = self.make_clients, self.cfg
        self.context = Context(
            cfg,
            cache(lambda region: make(cfg, region)),  # one set of clients, made when first needed
            config_error=self.config_error,
            publish_test=self.publish_test,
            launch=self.launch,
        )

    def step(self, check: Step) -> None:
        for line in run_step(check, self.context, self.facts):
            self.checks.append(line)
            self.facts = self.facts.merged(line.facts)

    def run(self) -> list[Check]:
        for check in STEPS:
            self.step(check)
        return self.checks

    def check_shipping(self) -> None:
        """The shipping check alone (what tests/test_shipping_supervised.py asks of a live shipper)."""
        self.step(check_shipping)


def run(
    cfg: Config,
    config_error: str | None,
    make_clients: Callable[[Config, str], Any],
    *,
    publish_test: bool = False,
    launch: bool = False,
) -> list[Check]:
    return Doctor(cfg, config_error, make_clients, publish_test=publish_test, launch=launch).run()


def failed(checks: Sequence[Check]) -> bool:
    return any(c.result == FAIL for c in checks)


def render(checks: Sequence[Check], *, symbols: bool = True) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        mark = SYMBOLS[c.result] if symbols else f"[{WORDS[c.result]}]"
        lines.append(f"{mark} {c.name.ljust(width)}  {c.message}")
        if c.result in (FAIL, WARN) and c.fix:
            lines.append(f"  {' ' * width}  fix: {c.fix}")
    verdict = (
        "nothing is broken"
        if not failed(checks)
        else f"{sum(c.result == FAIL for c in checks)} check(s) failed"
    )
    return "\n".join(lines) + f"\n{verdict}\n"
