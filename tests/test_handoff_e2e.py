"""State hand-off end to end: a scale-in writes the hand-off, `adopt KEY` moves it once.

The sender is the stack's instance (IMDS stub, moto's Auto Scaling, SeaweedFS). A receiver is
`instance-agent adopt` with another instance's identity passed as --instance-id/--region
(its own inbox), as Run Command would start it on a peer.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import ACCOUNT, AGENT, REGION, Stack
from support.trees import walk

from instance_agent.local import launching

PEER_A, PEER_B = "i-0aaaaaaaaaaaaaaa1", "i-0bbbbbbbbbbbbbbb2"


def spool(root: Path, files: int = 200) -> Path:
    """A queue worker's spool: `files` messages of varied sizes, in two levels."""
    for n in range(files):
        sub = root / f"q{n % 7}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"msg-{n:04d}.json").write_bytes(os.urandom(n * 37 % 5000) + f'{{"n": {n}}}\n'.encode())
    return root


def scale_in_with_handoff(stack: Stack, tmp: Path, *extra: str) -> tuple[Path, dict[str, Any]]:
    state = spool(tmp / "srv" / "spool")
    logs = tmp / "logs"
    logs.mkdir()
    (logs / "app.log").write_text("bye\n")
    stack.scale_in()
    proc, result = stack.backup("--source", str(logs), "--handoff-path", str(state), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return state, result


def adopt_argv(stack: Stack, key: str, peer: str, inbox: Path, command: str | None, *extra: str) -> list[str]:
    argv = [*AGENT, "adopt", f"s3://{stack.bucket}/{key}", "--json", "--topic-arn", stack.topic_arn]
    argv += ["--instance-id", peer, "--region", REGION, "--handoff-inbox", str(inbox)]
    if command:
        argv += ["--handoff-command", command]
    return argv + list(extra)


def adopt(
    stack: Stack, key: str, peer: str, inbox: Path, command: str | None = None, *extra: str, **env: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = subprocess.run(
        adopt_argv(stack, key, peer, inbox, command, *extra),
        env=stack.env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc, json.loads(proc.stdout) if proc.stdout.strip() else {}


def adopted_at_launch(
    stack: Stack, new: str, hook: str, state: Path, inbox: Path, ran: Path, key: str
) -> None:
    """The replacement `new` adopted hand-off `key` of `state` into `inbox` while Auto Scaling
    held it in Pending:Wait, then its launch gate completed `hook` with CONTINUE."""
    [outcome] = [o for o in launching.outcomes(ACCOUNT, REGION) if o.instance_id == new]
    assert (outcome.hook, outcome.result) == (hook, "CONTINUE")
    assert ran.read_text().splitlines() == ["Pending:Wait"]  # adopted before CONTINUE
    assert restored(inbox, stack.instance_id, state) == walk(state)
    body = stack.client("s3").get_object(Bucket=stack.bucket, Key=key + ".adopted")["Body"].read()
    assert json.loads(body)["instance_id"] == new


def restored(inbox: Path, source: str, state: Path) -> dict[bytes, tuple[str, bytes | None]]:
    return walk(inbox / source / str(state).lstrip("/"))


def list_handoffs(stack: Stack) -> list[dict[str, Any]]:
    proc = stack.run("list", "--handoffs", "--bucket", stack.bucket, "--asg-name", stack.group, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    views: list[dict[str, Any]] = json.loads(proc.stdout)
    return views


def markers(stack: Stack, key: str, kind: str) -> list[str]:
    return sorted(k for k in stack.objects() if k.startswith(key + kind))


def test_scale_in_hands_off_before_completing_and_a_peer_adopts_it(stack: Stack, tmp_path: Path) -> None:
    state, result = scale_in_with_handoff(stack, tmp_path)

    # The hand-off object and its manifest are in S3, under the group's handoff/ prefix.
    key = result["handoff_key"]
    assert key.startswith(f"{stack.group}/handoff/{stack.instance_id}/") and key.endswith(".tar.zst")
    objects = stack.objects()
    assert key in objects and key + ".manifest.json" in objects
    man = json.loads(
        stack.client("s3").get_object(Bucket=stack.bucket, Key=key + ".manifest.json")["Body"].read()
    )
    assert man["totals"]["files"] == 200 and man["instance_id"] == stack.instance_id
    # The full backup is there as well, and the hook was completed CONTINUE after both.
    assert result["status"] == "succeeded" and result["key"] != key and result["key"] in objects
    completes = stack.lifecycle_calls("CompleteLifecycleAction")
    assert [(c.result, c.outcome) for c in completes] == [("CONTINUE", "ok")]
    # One SNS report, which names the hand-off key, as --json does.
    messages = stack.sns()
    assert len(messages) == 1 and json.loads(messages[0]["message"])["handoff_key"] == key

    assert [(h["key"], h["state"]) for h in list_handoffs(stack)] == [(key, "unclaimed")]

    # A peer adopts it: the 200 files come back byte for byte, its command runs once.
    inbox = tmp_path / "inbox-a"
    ran = tmp_path / "ran"
    cmd = f'echo "$INSTANCE_AGENT_HANDOFF_SOURCE $INSTANCE_AGENT_HANDOFF_KEY" >> {ran}'
    cmd += '; test -d "$INSTANCE_AGENT_HANDOFF_INBOX"'
    proc, out = adopt(stack, key, PEER_A, inbox, cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out["status"] == "adopted" and out["files"] == 200 and out["generation"] == 1
    assert restored(inbox, stack.instance_id, state) == walk(state)
    assert ran.read_text() == f"{stack.instance_id} {key}\n"
    assert markers(stack, key, ".adopted") == [key + ".adopted"]
    reports = [json.loads(m["message"]) for m in stack.sns()[1:]]
    assert [(r["event"], r["adopter"], r["key"]) for r in reports] == [("handoff_adopted", PEER_A, key)]

    [view] = list_handoffs(stack)
    assert (view["state"], view["by"], view["source"]) == ("adopted", PEER_A, stack.instance_id)

    # A second delivery of the same key does nothing.
    proc, again = adopt(stack, key, PEER_B, tmp_path / "inbox-b", cmd)
    assert proc.returncode == 0 and again["status"] == "already-adopted"
    assert not (tmp_path / "inbox-b").exists() and len(ran.read_text().splitlines()) == 1


def test_list_and_restore_latest_never_take_a_handoff_for_a_backup(stack: Stack, tmp_path: Path) -> None:
    _, result = scale_in_with_handoff(stack, tmp_path)
    proc = stack.run("list", "--bucket", stack.bucket, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [b["key"] for b in json.loads(proc.stdout)] == [result["key"]]
    dest = tmp_path / "restored"
    proc = stack.run(
        "restore", "--bucket", stack.bucket, "--latest", "--instance-id", stack.instance_id, str(dest)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (dest / str(tmp_path / "logs" / "app.log").lstrip("/")).read_text() == "bye\n"


def test_a_failed_handoff_upload_fails_the_job_and_abandons(stack: Stack, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "app.log").write_text("bye\n")
    stack.scale_in()
    # A hand-off path that cannot be read whole: the peer would get half a state.
    missing = tmp_path / "no-such-spool"
    proc, result = stack.backup("--source", str(logs), "--handoff-path", str(missing))
    assert proc.returncode == 1
    assert result["status"] == "failed" and "hand-off failed" in result["error"]
    assert result["lifecycle_result"] == "ABANDON" and "handoff_key" not in result
    assert result["key"] in stack.objects()  # the full backup still ran
    completes = stack.lifecycle_calls("CompleteLifecycleAction")
    assert [(c.result, c.outcome) for c in completes] == [("ABANDON", "ok")]
    assert len(stack.sns()) == 1


def test_two_receivers_racing_adopt_once(stack: Stack, tmp_path: Path) -> None:
    state, result = scale_in_with_handoff(stack, tmp_path)
    key = result["handoff_key"]
    ran = tmp_path / "ran"
    cmd = f'echo "$RECEIVER" >> {ran}'
    procs = {
        peer: subprocess.Popen(
            adopt_argv(stack, key, peer, tmp_path / f"inbox-{peer}", cmd),
            env=stack.env(RECEIVER=peer),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for peer in (PEER_A, PEER_B)
    }
    outs = {}
    for peer, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-3000:]
        outs[peer] = json.loads(stdout)
    statuses = sorted(o["status"] for o in outs.values())
    assert statuses in (["adopted", "claimed-elsewhere"], ["adopted", "already-adopted"])
    (winner,) = [p for p, o in outs.items() if o["status"] == "adopted"]
    assert ran.read_text().splitlines() == [winner]
    assert restored(tmp_path / f"inbox-{winner}", stack.instance_id, state) == walk(state)
    (loser,) = {PEER_A, PEER_B} - {winner}
    assert not (tmp_path / f"inbox-{loser}").exists()
    assert markers(stack, key, ".claim.") == [key + ".claim.000001"]
    assert markers(stack, key, ".adopted") == [key + ".adopted"]


def test_a_receiver_killed_after_its_claim_is_replaced_after_the_lease(stack: Stack, tmp_path: Path) -> None:
    state, result = scale_in_with_handoff(stack, tmp_path)
    key = result["handoff_key"]
    ran, ready = tmp_path / "ran", tmp_path / "ready"
    # Receiver A claims, restores, starts its command, and is killed in it (kill -9).
    held = tmp_path / "held.pid"
    cmd = f'echo "$RECEIVER" >> {ran}; echo $$ > {held}; touch {ready}; exec sleep "${{HOLD:-0}}"'
    lease = ["--handoff-lease", "8", "--handoff-timeout", "3"]
    a = subprocess.Popen(
        adopt_argv(stack, key, PEER_A, tmp_path / "inbox-a", cmd, *lease),
        env=stack.env(RECEIVER="A", HOLD="30"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        while not ready.exists():
            assert a.poll() is None, a.communicate()[1][-3000:]
            time.sleep(0.05)
    finally:
        os.killpg(a.pid, signal.SIGKILL)
        a.communicate()
        # Its command runs in a session of its own (hooks.py): stop that too.
        if held.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(held.read_text()), signal.SIGKILL)
    assert markers(stack, key, ".claim.") == [key + ".claim.000001"] and not markers(stack, key, ".adopted")
    [view] = list_handoffs(stack)
    assert (view["state"], view["by"]) in (("claimed", PEER_A), ("unclaimed", None))  # the lease may be over

    # B, told at once, finds A's claim live until its lease ends; then B claims generation 2.
    proc, out = adopt(stack, key, PEER_B, tmp_path / "inbox-b", cmd, *lease, RECEIVER="B")
    assert proc.returncode == 0, proc.stderr[-3000:]
    while out["status"] == "claimed-elsewhere":
        assert out["holder"] == PEER_A
        time.sleep(out.get("expires_in_s", 0) + 0.5)
        proc, out = adopt(stack, key, PEER_B, tmp_path / "inbox-b", cmd, *lease, RECEIVER="B")
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert out["status"] == "adopted" and out["generation"] == 2
    assert restored(tmp_path / "inbox-b", stack.instance_id, state) == walk(state)
    assert ran.read_text().splitlines() == ["A", "B"]  # A was killed inside its command
    assert markers(stack, key, ".adopted") == [key + ".adopted"]
    body = stack.client("s3").get_object(Bucket=stack.bucket, Key=key + ".adopted")["Body"].read()
    assert json.loads(body)["instance_id"] == PEER_B
    # And A, started again later, finds nothing left to do.
    proc, again = adopt(stack, key, PEER_A, tmp_path / "inbox-a2", cmd, *lease, RECEIVER="A")
    assert proc.returncode == 0 and again["status"] == "already-adopted"
    assert ran.read_text().splitlines() == ["A", "B"]


def test_a_failing_command_leaves_it_claimed_and_the_next_claimant_retries(
    stack: Stack, tmp_path: Path
) -> None:
    state, result = scale_in_with_handoff(stack, tmp_path)
    key = result["handoff_key"]
    ran = tmp_path / "ran"
    cmd = f'echo "$RECEIVER" >> {ran}; test "$RECEIVER" = B'
    lease = ["--handoff-lease", "6", "--handoff-timeout", "2"]
    proc, out = adopt(stack, key, PEER_A, tmp_path / "inbox-a", cmd, *lease, RECEIVER="A")
    assert proc.returncode == 1 and out["status"] == "refused"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("instance-agent: error:")]
    assert len(errors) == 1 and "handoff_command failed (exit 1); left claimed, not adopted" in errors[0]
    assert markers(stack, key, ".failed.") == [key + ".failed.000001"] and not markers(stack, key, ".adopted")

    proc, out = adopt(stack, key, PEER_B, tmp_path / "inbox-b", cmd, *lease, RECEIVER="B")
    while out.get("status") == "claimed-elsewhere":
        time.sleep(out.get("expires_in_s", 0) + 0.5)
        proc, out = adopt(stack, key, PEER_B, tmp_path / "inbox-b", cmd, *lease, RECEIVER="B")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out["status"] == "adopted" and out["generation"] == 2
    assert restored(tmp_path / "inbox-b", stack.instance_id, state) == walk(state)
    assert ran.read_text().splitlines() == ["A", "B"]
    reports = [json.loads(m["message"]) for m in stack.sns()[1:]]
    assert [(r["event"], r["adopter"]) for r in reports] == [
        ("handoff_refused", PEER_A),
        ("handoff_adopted", PEER_B),
    ]


def test_a_replacement_adopts_at_launch_before_it_goes_in_service(stack: Stack, tmp_path: Path) -> None:
    launching.install()
    new = stack.second_instance()
    hook = stack.launch_hook()
    state, result = scale_in_with_handoff(stack, tmp_path)
    key = result["handoff_key"]

    # The replacement boots: its launch gate runs while Auto Scaling holds it in Pending:Wait.
    launching.begin_launch(stack.group, new, hook, account_id=ACCOUNT, region=REGION)
    stack.imds.instance_id = new
    stack.imds.target_lifecycle_state = "Pending"
    boot_id = tmp_path / "boot_id"
    boot_id.write_text(f"{uuid.uuid4()}\n")
    ran, inbox = tmp_path / "ran", tmp_path / "inbox"
    # The command records the instance's state while it runs: still Pending:Wait.
    proc = stack.run(
        "launch-gate", "--boot-id-file", str(boot_id), env=stack.adopter_env(new, state, inbox, ran)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "launching lifecycle action: CONTINUE" in proc.stderr
    adopted_at_launch(stack, new, hook, state, inbox, ran, key)
    reports = [json.loads(m["message"]) for m in stack.sns()[1:]]
    assert [(r["event"], r["adopter"], r["key"]) for r in reports] == [("handoff_adopted", new, key)]


def test_a_claim_too_short_for_its_command_is_never_run_on(stack: Stack, tmp_path: Path) -> None:
    _, result = scale_in_with_handoff(stack, tmp_path)
    key, ran = result["handoff_key"], tmp_path / "ran"
    # 2.9 s of command in a 3 s lease leaves no room for the adopted marker: a second
    # receiver could claim the next generation while it still ran.
    lease = ["--handoff-lease", "3", "--handoff-timeout", "2.9"]
    proc, out = adopt(stack, key, PEER_A, tmp_path / "inbox", f"echo ran >> {ran}", *lease)
    assert proc.returncode == 1 and out["status"] == "refused"
    assert "too little of the claim's lease is left" in out["error"]
    assert not ran.exists() and not markers(stack, key, ".adopted")


def tamper_archive(stack: Stack, key: str) -> None:
    s3 = stack.client("s3")
    data = bytearray(s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    s3.put_object(Bucket=stack.bucket, Key=key, Body=bytes(data))


def tamper_content(stack: Stack, key: str) -> None:
    """A well-formed archive (valid zstd, valid tar, the same length) with one message
    changed: only the manifest's sha256 can tell."""
    s3 = stack.client("s3")
    tar = (
        zstandard.ZstdDecompressor()
        .decompressobj()
        .decompress(s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read())
    )
    assert b'{"n": 5}' in tar
    forged = zstandard.ZstdCompressor(write_checksum=True).compress(tar.replace(b'{"n": 5}', b'{"n": 6}', 1))
    s3.put_object(Bucket=stack.bucket, Key=key, Body=forged)


def tamper_manifest(stack: Stack, key: str) -> None:
    s3 = stack.client("s3")
    mkey = key + ".manifest.json"
    man = json.loads(s3.get_object(Bucket=stack.bucket, Key=mkey)["Body"].read())
    man["entries"][0]["path"] = "../../../root/.ssh/authorized_keys"
    man["entries"][0].pop("path_b64", None)
    s3.put_object(Bucket=stack.bucket, Key=mkey, Body=json.dumps(man).encode())


@pytest.mark.parametrize(
    "tamper", [tamper_archive, tamper_content, tamper_manifest], ids=["archive", "content", "manifest"]
)
def test_a_tampered_handoff_is_refused_and_never_adopted(stack: Stack, tmp_path: Path, tamper: Any) -> None:
    _, result = scale_in_with_handoff(stack, tmp_path)
    key = result["handoff_key"]
    tamper(stack, key)
    inbox, ran = tmp_path / "inbox", tmp_path / "ran"
    proc, out = adopt(stack, key, PEER_A, inbox, f"echo ran >> {ran}")
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("instance-agent: error:")]
    assert len(lines) == 1 and "nothing was restored" in lines[0], proc.stderr[-3000:]
    assert out["status"] == "refused"
    assert not inbox.exists() or list(inbox.iterdir()) == []
    assert not ran.exists() and not markers(stack, key, ".adopted")
    if tamper is tamper_manifest:  # refused on reading the manifest: never even claimed
        assert not markers(stack, key, ".claim.")
    reports = [json.loads(m["message"]) for m in stack.sns()[1:]]
    assert [(r["event"], r["key"]) for r in reports] == [("handoff_refused", key)]
