"""Lifecycle action tokens never leave the agent: not in logs, `--json`, SNS or records."""

from __future__ import annotations

import json
import os

import pytest
from conftest import ACCOUNT, REGION, Stack
from support import scoreboard

from instance_agent import config, hooks
from instance_agent.local import autoscaling
from instance_agent.redact import fingerprint, scrub, scrub_tokens


def test_fingerprint_is_short_stable_and_not_the_token() -> None:
    token = "0f8b4c2e-5d1a-4e3b-9c7f-2a6d8e1b3c5f"
    assert fingerprint(token) == fingerprint(token)
    assert len(fingerprint(token)) == 8 and fingerprint(token) not in token
    assert fingerprint(token) != fingerprint(token.replace("0f", "1f"))


def test_scrub_replaces_the_token_by_its_fingerprint() -> None:
    token = "0f8b4c2e-5d1a-4e3b-9c7f-2a6d8e1b3c5f"
    text = f"No active Lifecycle Action found with token {token}"
    for out in (scrub(text, token), scrub_tokens(text)):
        assert token not in out and fingerprint(token) in out
    assert scrub(text, None) == text


def test_token_of_a_gone_action_appears_nowhere(stack: Stack) -> None:
    with scoreboard.scenario(
        "Token: backup with --lifecycle-token after the action was completed elsewhere"
    ) as row:
        row.faults = "action completed before the agent ran; AWS's error text quotes the token"
        stack.scale_in()
        token = next(
            a.token for a in autoscaling.active_actions(ACCOUNT, REGION) if a.instance_id == stack.instance_id
        )
        stack.client("autoscaling").complete_lifecycle_action(
            AutoScalingGroupName=stack.group,
            LifecycleHookName=stack.hook,
            LifecycleActionToken=token,
            LifecycleActionResult="CONTINUE",
        )
        src = stack.tmp / "src"
        src.mkdir()
        (src / "app.log").write_bytes(os.urandom(4096))
        proc, result = stack.backup(
            "--source",
            str(src),
            "--lifecycle-token",
            token,
            "--hook-name",
            stack.hook,
            "--asg-name",
            stack.group,
        )
        assert result["status"] == "succeeded", proc.stderr[-2000:]
        # The run did meet AWS's refusal, and said so (by fingerprint).
        assert result["lifecycle_error"], result
        records = [p.read_text() for d in ("state", "run") for p in (stack.tmp / d).glob("*") if p.is_file()]
        assert records, "the run left no result record"
        messages = [json.dumps(m) for m in stack.sns()]
        assert messages
        for where, text in (
            ("stderr", proc.stderr),
            ("stdout", proc.stdout),
            *(("sns", m) for m in messages),
            *(("record", r) for r in records),
        ):
            assert token not in text, f"token leaked into {where}"
        row.outcome = (
            f"succeeded; token in 0 of {len(messages)} SNS message(s), stdout, "
            f"stderr and {len(records)} record(s)"
        )
        row.bytes_lost = 0


TOKEN_ENV = "INSTANCE_AGENT_LIFECYCLE_TOKEN"


def test_the_token_comes_from_the_environment_and_no_command_inherits_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with scoreboard.scenario("Local user reads the lifecycle token in /proc/PID/cmdline") as row:
        row.faults = "the SSM document's command line"
        token = "0b1e2c3d-4a5b-4c6d-8e7f-901234567890"
        cfg = config.load({}, {TOKEN_ENV: token, "INSTANCE_AGENT_BUCKET": "my-backups"})
        assert cfg.lifecycle_token == token
        # A pre- or post-command must not see it either.
        monkeypatch.setenv(TOKEN_ENV, token)
        record = hooks.run(f'printf "%s" "${{{TOKEN_ENV}:-absent}}"', "pre", timeout=10)
        assert record.output == "absent"
        row.outcome = "token passed in the root-only environment; not inherited by pre/post commands"
