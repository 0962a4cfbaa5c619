"""Continuous shipping end to end: `watch --ship` as a subprocess against the IMDS stub, moto
and SeaweedFS. Files are shipped as segments while the watcher runs; the termination archive
holds only what is new; restore assembles one tree."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

from conftest import Stack
from support import scoreboard
from support.agentproc import completions, watch
from support.faultproxy import FaultProxy, HoldUntil, Rule, upload_part
from support.trees import walk

from instance_agent import manifest

OLD = time.time() - 3600  # rotated an hour ago: settled at once


def _segments(stack: Stack) -> list[str]:
    return sorted(k for k in stack.objects() if "/segments/" in k and k.endswith(".tar.zst"))


def _restore_latest(stack: Stack, dest: Path) -> dict[str, Any]:
    proc = stack.run(
        "restore",
        "--bucket",
        stack.bucket,
        "--latest",
        "--instance-id",
        stack.instance_id,
        "--verify",
        "--json",
        str(dest),
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def _await_shipped(stack: Stack, count: int, timeout: float = 60) -> dict[str, Any]:
    """The status file's shipping block once it counts `count` shipped files."""
    deadline = time.monotonic() + timeout
    while (state := json.loads(stack.run("status", "--json").stdout)["shipping"])["shipped_files"] != count:
        assert time.monotonic() < deadline, state
        time.sleep(0.3)
    out: dict[str, Any] = state
    return out


def _restored_whole(stack: Stack, src: Path, dest: Path) -> int:
    """restore --latest --verify into `dest`: verified, and `src` back byte for byte. The
    source bytes lost, for the scoreboard (0 once the comparison has passed)."""
    assert _restore_latest(stack, dest)["status"] == "verified"
    restored = walk(dest / str(src).lstrip("/"))
    assert restored == walk(src)
    return scoreboard.lost_bytes(walk(src), walk(src), restored, [])


def _manifest(stack: Stack, key: str) -> dict[str, Any]:
    body = stack.client("s3").get_object(Bucket=stack.bucket, Key=key + ".manifest.json")["Body"]
    doc: dict[str, Any] = json.loads(body.read())
    return doc


class Writer:
    """An application logging a numbered line every 20 ms to `app.log`, reopening it for
    each line (so rotation by rename works as it does with logrotate + a reopen)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.n = 0
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(0.02):
            with self.lock:
                with open(self.path, "ab") as fh:
                    fh.write(b"%08d GET /api/v1/orders 200 %s\n" % (self.n, b"x" * 60))
                self.n += 1

    def rotate(self, to: Path) -> None:
        with self.lock:
            os.rename(self.path, to)

    def stop(self) -> int:
        self.stopped.set()
        self.thread.join()
        return self.n


def test_ship_rotations_then_terminate_restores_whole_tree(stack: Stack, tmp_path: Path) -> None:
    src = tmp_path / "logs"
    (src / "nginx").mkdir(parents=True)
    old = src / "nginx" / "access.log.1"
    old.write_bytes(bytes(random.Random(1).getrandbits(8) for _ in range(300_000)))
    os.utime(old, (OLD, OLD))
    live = src / "app.log"
    writer = Writer(live)
    try:
        with watch(stack, "--source", str(src), "--ship", "--ship-settle", "30") as w:
            w.wait_for("watching")
            w.wait_for("segment shipped", path=str(old))
            for i in (1, 2):  # rename plus a new file, while the watcher runs
                time.sleep(1.0)
                writer.rotate(src / f"app.log.{i}")
                w.wait_for("segment shipped", timeout=30, path=str(src / f"app.log.{i}"))
            time.sleep(0.5)
            state = json.loads(stack.run("status", "--json").stdout)
            assert state["shipping"]["enabled"] is True
            assert state["shipping"]["shipped_files"] == 3
            assert state["shipping"]["pending_files"] == 1  # the live app.log
            assert state["shipping"]["last_error"] is None
            assert set(state["shipping"]) == {
                "enabled",
                "pending_files",
                "pending_bytes",
                "shipped_files",
                "shipped_bytes",
                "last_error",
                "state",
                "watch",
                "restarts",
                "stalled_since",
            }
            assert state["shipping"]["state"] == "running" and state["shipping"]["watch"] == "inotify"
            lines = writer.stop()
            stack.scale_in()  # right after the last line: the live file is the tail
            _, done = w.wait_for("response finished", timeout=60)
    finally:
        writer.stopped.set()

    assert done["status"] == "succeeded" and done["lifecycle_result"] == "CONTINUE"
    assert completions(stack) == [("CONTINUE", "ok")]
    # The final archive read only the live file; the rotated ones were left out.
    doc = _manifest(stack, done["key"])
    # Its manifest lists only the live file; the segments say what they hold (format 2).
    # First the guard an older reader refuses (it would restore the archive alone).
    assert doc["entries"][0] == manifest.FORMAT_GUARD
    assert [e["path"] for e in doc["entries"][1:] if e["type"] == "file"] == [str(live).lstrip("/")]
    assert doc["format"] == 2 and not any(e.get("object") for e in doc["entries"][1:])
    assert doc["totals"]["files"] == 1 and doc["totals"]["held_files"] == 3
    assert sorted(s["key"] for s in doc["segments"]) == _segments(stack)
    assert [s["held"] for s in doc["segments"]] == [1, 1, 1]

    restored = _restore_latest(stack, tmp_path / "restored")
    assert restored["status"] == "verified" and restored["differences"] == []
    assert walk(tmp_path / "restored" / str(src).lstrip("/")) == walk(src)
    assert live.read_bytes().splitlines()[-1].startswith(b"%08d " % (lines - 1))

    # `list` shows the termination backup once, its size across the segments.
    proc = stack.run("list", "--bucket", stack.bucket, "--json")
    listed = json.loads(proc.stdout)
    assert [b["key"] for b in listed] == [done["key"]]
    sizes = stack.objects()
    assert listed[0]["compressed_bytes"] == sizes[done["key"]] + sum(sizes[k] for k in _segments(stack))
    assert listed[0]["files"] == 4


def test_kill_9_mid_segment_restart_ships_once_and_aborts_the_upload(stack: Stack, tmp_path: Path) -> None:
    src = tmp_path / "logs"
    src.mkdir()
    big = src / "big.log.1"  # 12 MiB of random bytes: two parts
    big.write_bytes(random.Random(2).randbytes(12 * 2**20))
    os.utime(big, (OLD, OLD))
    release = threading.Event()
    with FaultProxy(stack.s3_endpoint) as proxy:
        held = proxy.add_rule(Rule(query=upload_part, fault=HoldUntil(release, timeout=60), times=1))
        env = stack.env(AWS_ENDPOINT_URL_S3=proxy.endpoint, INSTANCE_AGENT_LOG_LEVEL="info")
        with watch(stack, "--source", str(src), "--ship", env=env) as w:
            assert held.fired.wait(30), w.text()
            w.proc.kill()  # kill -9 in the middle of the segment's UploadPart
            w.wait(10)
        release.set()
    assert len(stack.incomplete_uploads()) == 1
    assert _segments(stack) == []

    with watch(stack, "--source", str(src), "--ship") as w:
        w.wait_for("segment shipped", timeout=60, path=str(big))
        assert stack.incomplete_uploads() == []
        w.proc.kill()
    # A third start remembers the segment: nothing is shipped again.
    with watch(stack, "--source", str(src), "--ship") as w:
        w.wait_for("shipping")
        time.sleep(2.0)
        assert w.find("segment shipped") == []
        stack.scale_in()
        _, done = w.wait_for("response finished", timeout=60)
    assert len(_segments(stack)) == 1
    assert done["status"] == "succeeded" and completions(stack) == [("CONTINUE", "ok")]
    assert _manifest(stack, done["key"])["totals"]["held_files"] == 1
    restored = _restore_latest(stack, tmp_path / "restored")
    assert restored["status"] == "verified"
    assert walk(tmp_path / "restored" / str(src).lstrip("/")) == walk(src)


def test_many_small_files_ship_as_one_segment_and_restore_as_one_tree(stack: Stack, tmp_path: Path) -> None:
    src = tmp_path / "logs"
    rng = random.Random(3)
    for i in range(400):  # a job runner's per-job logs: many tiny files in a few dirs
        d = src / "jobs" / f"{i // 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"job-{i:05d}.log").write_bytes(b"job %d done\n" % i * rng.randrange(1, 20))
    big = src / "nginx" / "access.log.1"
    big.parent.mkdir()
    big.write_bytes(rng.randbytes(2 * 2**20))
    for p in src.rglob("*"):
        os.utime(p, (OLD, OLD))
    with watch(stack, "--source", str(src), "--ship") as w:
        _, shipped = w.wait_for("segment shipped", timeout=60)
        assert shipped["files"] == 401
        state = _await_shipped(stack, 401, timeout=30)  # the status file follows at the next scan
        assert state["pending_files"] == 0
        assert len(_segments(stack)) == 1  # one object for all of them, not 401
        # Rotated after it was shipped: restored under its new name, from the segment.
        os.rename(src / "jobs" / "000" / "job-00000.log", src / "jobs" / "000" / "job-00000.log.1")
        stack.scale_in()
        _, done = w.wait_for("response finished", timeout=60)
    assert done["status"] == "succeeded" and completions(stack) == [("CONTINUE", "ok")]
    doc = _manifest(stack, done["key"])
    assert doc["totals"]["files"] == 0 and doc["totals"]["held_files"] == 401
    assert len(doc["segments"]) == 1

    restored = _restore_latest(stack, tmp_path / "restored")
    assert restored["status"] == "verified" and restored["differences"] == []
    assert walk(tmp_path / "restored" / str(src).lstrip("/")) == walk(src)
    listed = json.loads(stack.run("list", "--bucket", stack.bucket, "--json").stdout)
    assert [(b["key"], b["files"]) for b in listed] == [(done["key"], 401)]


def test_a_lost_state_directory_ships_nothing_again_that_s3_holds(stack: Stack, tmp_path: Path) -> None:
    """A root-volume replacement takes the state directory, and the shipping ledger in it;
    a data volume that stays keeps its files. The agent that starts on the new root (issue
    18 item 5) must not send again what S3 already holds for this instance: it reads the
    segment manifests back, and the termination archive still leaves those files out."""
    import shutil

    src = tmp_path / "data" / "logs"  # on a volume the replacement keeps
    rng = random.Random(5)
    for i in range(30):
        (src / "jobs").mkdir(parents=True, exist_ok=True)
        (src / "jobs" / f"job-{i:03d}.log").write_bytes(b"job %d\n" % i * rng.randrange(1, 50))
    (src / "access.log.1").write_bytes(rng.randbytes(6 * 2**20))
    for p in src.rglob("*"):
        os.utime(p, (OLD, OLD))
    with watch(stack, "--source", str(src), "--ship") as w:
        w.wait_for("segment shipped", timeout=60)
        _await_shipped(stack, 31, timeout=30)
    shipped = _segments(stack)
    assert shipped

    # The new root: no state directory, no runtime directory.
    shutil.rmtree(stack.tmp / "state")
    shutil.rmtree(stack.tmp / "run", ignore_errors=True)
    with FaultProxy(stack.s3_endpoint) as proxy:
        env = stack.env(AWS_ENDPOINT_URL_S3=proxy.endpoint, INSTANCE_AGENT_LOG_LEVEL="info")
        with watch(stack, "--source", str(src), "--ship", env=env) as w:
            _, seeded = w.wait_for("shipping ledger seeded from S3", timeout=60)
            assert seeded["files"] == 31, seeded
            w.wait_for("shipping")
            time.sleep(2.0)
            assert w.find("segment shipped") == []
            stack.scale_in()
            _, done = w.wait_for("response finished", timeout=60)
        writes = [r for r in proxy.requests if r.method in ("PUT", "POST") and "/segments/" in r.path]
    assert writes == [], [(r.method, r.path) for r in writes]
    assert _segments(stack) == shipped
    assert done["status"] == "succeeded" and completions(stack) == [("CONTINUE", "ok")]
    doc = _manifest(stack, done["key"])
    assert doc["totals"]["files"] == 0 and doc["totals"]["held_files"] == 31
    restored = _restore_latest(stack, tmp_path / "restored")
    assert restored["status"] == "verified" and restored["differences"] == []
    assert walk(tmp_path / "restored" / str(src).lstrip("/")) == walk(src)


def test_an_in_place_rewrite_with_its_time_put_back_is_archived(stack: Stack, tmp_path: Path) -> None:
    """Issue 19 item 7: rewritten in place, same size, modification time put back, last
    64 KiB unchanged. Only the inode change time tells, and userland cannot set it back: a
    changed ctime sends the file to a full check against the ledger's SHA-256."""
    with scoreboard.scenario(
        "Shipping: a shipped file rewritten in place, same size, mtime put back, tail unchanged"
    ) as row:
        row.faults = (
            "first 100 KiB of a shipped 512 KiB file rewritten; utime() restored; last 64 KiB as shipped"
        )
        src = tmp_path / "logs"
        src.mkdir()
        path = src / "db.log.1"
        rng = random.Random(7)
        path.write_bytes(rng.randbytes(512 * 1024))
        os.utime(path, (OLD, OLD))
        with watch(stack, "--source", str(src), "--ship") as w:
            w.wait_for("segment shipped", timeout=60, path=str(path))
        before = os.stat(path)
        with open(path, "r+b") as fh:  # the first 100 KiB only: the tail stays as shipped
            fh.write(rng.randbytes(100 * 1024))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(path)
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        assert after.st_ctime_ns != before.st_ctime_ns
        rewritten = path.read_bytes()

        stack.scale_in()
        proc, done = stack.backup("--source", str(src), "--ship")
        assert proc.returncode == 0, proc.stderr[-2000:]
        doc = _manifest(stack, done["key"])
        assert doc["totals"]["files"] == 1 and doc["totals"].get("held_files", 0) == 0
        row.bytes_lost = _restored_whole(stack, src, tmp_path / "restored")
        assert (tmp_path / "restored" / str(path).lstrip("/")).read_bytes() == rewritten
        row.outcome = (
            "changed ctime sent it to the SHA-256 check: archived again; "
            "restore --latest verified, new content"
        )


def test_segments_no_backup_names_are_listed_incomplete_and_restore_latest(
    stack: Stack, tmp_path: Path
) -> None:
    # The final backup never made it (S3 down, then ABANDON; here the watcher just ends):
    # the shipped segments are the only copy of the shipped files (issue 19 item 4).
    src = tmp_path / "logs"
    (src / "nginx").mkdir(parents=True)
    rng = random.Random(7)
    files = [src / "nginx" / "access.log.1", src / "nginx" / "access.log.2", src / "app.log.1"]
    for i, path in enumerate(files):
        path.write_bytes(rng.randbytes(50_000 * (i + 1)))
        os.utime(path, (OLD, OLD))
    with watch(stack, "--source", str(src), "--ship") as w:
        w.wait_for("watching")
        _await_shipped(stack, 3)
    segments = _segments(stack)
    assert segments and not [k for k in stack.objects() if k.endswith(".tar.zst") and k not in segments]

    listed = json.loads(stack.run("list", "--bucket", stack.bucket, "--json").stdout)
    assert [(b["status"], b["instance_id"], b["files"]) for b in listed] == [
        ("incomplete", stack.instance_id, 3)
    ]
    sizes = stack.objects()
    assert sorted(listed[0]["segments"]) == segments
    assert listed[0]["compressed_bytes"] == sum(sizes[k] for k in segments)
    assert listed[0]["raw_bytes"] == sum(p.stat().st_size for p in files)

    dest = tmp_path / "restored"
    proc = stack.run(
        "restore", "--bucket", stack.bucket, "--latest", "--instance-id", stack.instance_id, str(dest)
    )
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if "segments only" in line]
    assert len(warning) == 1 and "final archive is missing" in warning[0]
    assert walk(dest / str(src).lstrip("/")) == walk(src)


def test_a_forged_segment_manifest_cannot_reach_outside_the_restore(stack: Stack, tmp_path: Path) -> None:
    # The instance writes its segment manifests, so one it controls is hostile input: the
    # incomplete restore keeps restore's checks on every member and object.
    s3 = stack.client("s3")
    key = f"web/{stack.instance_id}/segments/app.log.1.1files-abc.tar.zst"
    s3.put_object(Bucket=stack.bucket, Key=key, Body=b"not read")
    doc = {
        "format": 1,
        "instance_id": stack.instance_id,
        "segment_of": stack.instance_id,
        "group": "web",
        "totals": {"tar_bytes": 10240},
        "entries": [{"path": "var/log/app.log.1", "member": "../../.ssh/id_rsa", "size": 5, "type": "file"}],
    }
    s3.put_object(Bucket=stack.bucket, Key=key + ".manifest.json", Body=json.dumps(doc).encode())
    dest = tmp_path / "restored"
    proc = stack.run(
        "restore", "--bucket", stack.bucket, "--latest", "--instance-id", stack.instance_id, str(dest)
    )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "refusing the manifest" in last and "../../.ssh/id_rsa" in last
    assert not dest.exists()


# --- issue 19 item 2: shipped state counts only where it was shipped -------------------


def _rotated_tree(root: Path, count: int = 3) -> Path:
    root.mkdir()
    rng = random.Random(11)
    for i in range(count):
        path = root / f"app.log.{i + 1}"
        path.write_bytes(rng.randbytes(40_000 * (i + 1)))
        os.utime(path, (OLD, OLD))
    return root


def test_a_new_bucket_gets_a_whole_backup_not_one_that_names_the_old_bucket(
    stack: Stack, tmp_path: Path
) -> None:
    """Shipped to one bucket, then the config names another (a restart with a new bucket):
    the ledger did not say where it shipped, so the final archive in the new bucket left
    out every shipped file, reported succeeded, and restore --latest there failed."""
    with scoreboard.scenario("Shipping: the bucket changes after 3 files were shipped to the old one") as row:
        row.faults = "3 files shipped to one bucket; the termination backup configured with another"
        src = _rotated_tree(tmp_path / "logs")
        with watch(stack, "--source", str(src), "--ship") as w:
            w.wait_for("watching")
            _await_shipped(stack, 3)
        assert _segments(stack)
        other = "other-bucket"
        stack.client("s3").create_bucket(Bucket=other)

        stack.scale_in()
        proc, done = stack.backup("--source", str(src), "--ship", "--bucket", other)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert done["status"] == "succeeded" and completions(stack) == [("CONTINUE", "ok")]
        body = stack.client("s3").get_object(Bucket=other, Key=done["key"] + ".manifest.json")["Body"]
        doc = json.loads(body.read())
        assert doc["totals"]["files"] == 3 and doc["totals"].get("held_files", 0) == 0
        dest = tmp_path / "restored"
        proc = stack.run(
            "restore",
            "--bucket",
            other,
            "--latest",
            "--instance-id",
            stack.instance_id,
            "--verify",
            "--json",
            str(dest),
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout)["status"] == "verified"
        assert walk(dest / str(src).lstrip("/")) == walk(src)
        row.bytes_lost = scoreboard.lost_bytes(walk(src), walk(src), walk(dest / str(src).lstrip("/")), [])
        row.outcome = (
            "succeeded; the new bucket's final archive holds all 3 files, names no old segment; "
            "restore --latest there verified"
        )


def test_a_reload_that_turns_ship_on_starts_shipping(stack: Stack, tmp_path: Path) -> None:
    """A SIGHUP that turned `ship` on logged the change and never shipped anything."""
    src = _rotated_tree(tmp_path / "logs")
    conf = tmp_path / "agent.toml"
    conf.write_text(f'source = ["{src}"]\nship = false\n')
    with watch(stack, "--config", str(conf)) as w:
        w.wait_for("watching")
        conf.write_text(f'source = ["{src}"]\nship = true\n')
        w.send(signal.SIGHUP)
        _, reloaded = w.wait_for("config reloaded")
        assert "ship" in reloaded["changed"]
        w.wait_for("segment shipped", timeout=60)
        _await_shipped(stack, 3)
    assert _segments(stack)


def _age_ledger(stack: Stack, hours: float) -> None:
    """Date every shipped segment in the ledger `hours` earlier: the instance has run that
    much longer since it shipped them (the ledger is the agent's only memory of when)."""
    path = stack.tmp / "state" / "ship-ledger.jsonl"
    lines = path.read_bytes().splitlines()
    out = [lines[0]]
    for line in lines[1:]:
        obj = json.loads(line)
        if "key" in obj:
            obj["at"] = float(obj.get("at", 0.0)) - hours * 3600
        out.append(json.dumps(obj).encode())
    path.write_bytes(b"\n".join(out) + b"\n")


def _expire(stack: Stack, keys: list[str]) -> None:
    """What the bucket's expiration rule does once those objects are older than its days
    (S3 deletes them itself; moto and SeaweedFS keep no such clock)."""
    s3 = stack.client("s3")
    for key in keys:
        s3.delete_object(Bucket=stack.bucket, Key=key)
        s3.delete_object(Bucket=stack.bucket, Key=key + ".manifest.json")


def test_a_final_backup_never_names_a_segment_the_retention_is_about_to_expire(
    stack: Stack, tmp_path: Path
) -> None:
    """Issue 19 item 3. With a 1-day rule, files shipped 20 hours ago are unchanged at
    termination. The final backup named their segments; 5 hours later the rule expired them,
    and restore --latest of that backup failed. Now a segment half the retention old holds
    nothing: the final archive carries those files, and the backup outlives the segments."""
    with scoreboard.scenario(
        "Shipping: a 1-day retention rule; segments 20 h old at termination, expired 5 h later"
    ) as row:
        row.faults = (
            "ledger dated 20 h back under --retention-days 1; "
            "every old segment deleted (the rule) after the backup"
        )
        src = _rotated_tree(tmp_path / "logs")
        with watch(stack, "--source", str(src), "--ship", "--retention-days", "1") as w:
            w.wait_for("watching")
            _await_shipped(stack, 3)
        old_segments = _segments(stack)
        assert old_segments
        _age_ledger(stack, 20)

        stack.scale_in()
        proc, done = stack.backup("--source", str(src), "--ship", "--retention-days", "1")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert done["status"] == "succeeded" and completions(stack) == [("CONTINUE", "ok")]
        doc = _manifest(stack, done["key"])
        assert doc["totals"]["files"] == 3 and doc["totals"].get("held_files", 0) == 0
        assert not doc.get("segments")

        _expire(stack, old_segments)  # 25 hours after they were shipped
        row.bytes_lost = _restored_whole(stack, src, tmp_path / "restored")
        row.outcome = (
            "succeeded; the final archive carries the 3 files and names no segment; "
            "restore --latest verified after the expiry"
        )


def test_a_segment_half_the_retention_old_is_shipped_again_as_a_new_object(
    stack: Stack, tmp_path: Path
) -> None:
    """The watcher, not only the final archive: files whose segment is 13 hours old under a
    1-day rule are shipped again, to new keys (the old key would be refused by the
    create-only write and keep its old date), and the final backup names only those."""
    src = _rotated_tree(tmp_path / "logs")
    args = ("--source", str(src), "--ship", "--retention-days", "1")
    with watch(stack, *args) as w:
        w.wait_for("watching")
        _await_shipped(stack, 3)
    old_segments = _segments(stack)
    _age_ledger(stack, 13)
    with watch(stack, *args) as w:
        w.wait_for("watching")
        deadline = time.monotonic() + 60
        while len(_segments(stack)) <= len(old_segments):
            assert time.monotonic() < deadline, _segments(stack)
            time.sleep(0.3)
        _await_shipped(stack, 3)
    new_segments = sorted(set(_segments(stack)) - set(old_segments))
    assert new_segments

    stack.scale_in()
    proc, done = stack.backup(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = _manifest(stack, done["key"])
    assert doc["totals"].get("held_files") == 3
    named = {s["key"] for s in doc.get("segments", [])}
    assert named and named <= set(new_segments)

    _expire(stack, old_segments)
    _restored_whole(stack, src, tmp_path / "restored")


def _list_verify(stack: Stack) -> tuple[int, list[dict[str, Any]], str]:
    proc = stack.run("list", "--bucket", stack.bucket, "--verify", "--json")
    return (
        proc.returncode,
        [json.loads(line) for line in proc.stdout.splitlines() if line.strip("[],\n ")],
        proc.stderr,
    )


def test_list_verify_says_which_backup_names_a_segment_s3_no_longer_holds(
    stack: Stack, tmp_path: Path
) -> None:
    """Issue 19 item 3: once a rule expired a segment that a backup names, `list` still said
    succeeded and nothing said the backup could no longer be restored whole."""
    src = _rotated_tree(tmp_path / "logs")
    with watch(stack, "--source", str(src), "--ship") as w:
        w.wait_for("watching")
        _await_shipped(stack, 3)
    stack.scale_in()
    proc, done = stack.backup("--source", str(src), "--ship")
    assert proc.returncode == 0 and done["status"] == "succeeded", proc.stderr[-2000:]
    named = [s["key"] for s in _manifest(stack, done["key"])["segments"]]
    assert named

    rc, listed, _ = _list_verify(stack)
    final = [b for b in listed if b["key"] == done["key"]]
    assert rc == 0 and final and final[0]["status"] == "succeeded"

    _expire(stack, named[:1])
    rc, listed, err = _list_verify(stack)
    final = [b for b in listed if b["key"] == done["key"]]
    assert rc == 1 and final[0]["status"] == "missing segments"
    assert final[0]["missing"] == named[:1]
    said = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and done["key"] in said[0] and named[0] in said[0]


def test_a_ledger_line_nested_deep_does_not_stop_shipping(stack: Stack, tmp_path: Path) -> None:
    """Issue 19 item 8, end to end: json's parser is recursive, and one ledger line nested
    100,000 levels deep stopped shipping for good. Now it is skipped with a warning: what
    was shipped stays shipped, a new file is shipped, and the final backup is whole."""
    src = _rotated_tree(tmp_path / "logs")
    args = ("--source", str(src), "--ship")
    with watch(stack, *args) as w:
        w.wait_for("watching")
        _await_shipped(stack, 3)
    with scoreboard.scenario("Shipping: a ledger line nested 100,000 levels deep") as row:
        row.faults = "one line of 100,000 '[' and ']' appended to ship-ledger.jsonl; then a 4th file"
        with open(stack.tmp / "state" / "ship-ledger.jsonl", "ab") as fh:
            fh.write(b"[" * 100_000 + b"]" * 100_000 + b"\n")
        fourth = src / "app.log.4"
        fourth.write_bytes(random.Random(4).randbytes(30_000))
        os.utime(fourth, (OLD, OLD))
        before = len(_segments(stack))
        with watch(stack, *args) as w:
            w.wait_for("watching")
            _await_shipped(stack, 4)
        assert len(_segments(stack)) == before + 1  # only the new file: the 3 stayed shipped

        stack.scale_in()
        proc, done = stack.backup(*args)
        assert proc.returncode == 0 and done["status"] == "succeeded", proc.stderr[-2000:]
        assert _manifest(stack, done["key"])["totals"].get("held_files") == 4
        row.bytes_lost = _restored_whole(stack, src, tmp_path / "restored")
        row.outcome = (
            "line skipped with a warning; shipping went on (1 new segment, the 3 kept); final backup verified"
        )
