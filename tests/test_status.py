"""`instance-agent status` reads the watcher's status file (instance_agent/status.py).

A stand-in watcher process writes the file with the real `write_status`, as the daemon does;
`status` runs as a subprocess and is judged by its output and exit code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import AGENT, Stack

from instance_agent import config, status

WATCHER = textwrap.dedent("""
    import sys, time
    from instance_agent import status
    path = sys.argv[1]
    status.write_status(path, poll_interval=2.0, stage="watching")
    status.write_status(path, last_poll=time.time(), imds_state="InService")
    status.write_status(path, last_backup=status.backup_summary(
        {"status": "succeeded", "bucket": "my-backups", "key": "web/i-0abc/20260131T120000Z.tar.zst"},
        0, "termination"))
    print("ready", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "run", tmp_path / "state"


def run_status(dirs: tuple[Path, Path], *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSTANCE_AGENT_")}
    env["INSTANCE_AGENT_CONFIG"] = os.devnull
    return subprocess.run(
        [*AGENT, "status", "--runtime-dir", str(dirs[0]), "--state-dir", str(dirs[1]), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def watcher(dirs: tuple[Path, Path]) -> Iterator[subprocess.Popen[str]]:
    dirs[0].mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", WATCHER, str(dirs[0] / status.STATUS_FILE)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_a_running_watcher(dirs: tuple[Path, Path], watcher: subprocess.Popen[str]) -> None:
    proc = run_status(dirs)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"watcher: running (pid {watcher.pid}, last update ")
    [poll] = [line for line in lines if line.startswith("last poll: ")]
    assert poll.endswith(" s ago); every 2 s")
    assert "IMDS target-lifecycle-state: InService" in lines
    assert "stage: watching" in lines
    [backup] = [line for line in lines if line.startswith("last backup by the watcher")]
    assert backup.startswith("last backup by the watcher [termination]: succeeded at ")
    assert backup.endswith(": s3://my-backups/web/i-0abc/20260131T120000Z.tar.zst")
    assert lines[-1] == f"status file: {dirs[0] / status.STATUS_FILE}"

    doc = json.loads(run_status(dirs, "--json").stdout)
    assert doc["running"] is True
    assert doc["status"]["pid"] == watcher.pid and doc["status"]["imds_state"] == "InService"
    assert doc["status"]["last_backup"]["exit_code"] == 0


def test_a_dead_watcher(dirs: tuple[Path, Path], watcher: subprocess.Popen[str]) -> None:
    watcher.send_signal(signal.SIGKILL)
    watcher.wait()
    proc = run_status(dirs)
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"watcher: not running: pid {watcher.pid} is gone")
    assert "IMDS target-lifecycle-state: InService" in proc.stdout  # what it saw last
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"instance-agent: error: the watcher is not running: pid {watcher.pid} is gone")
    )


def test_a_hung_watcher(dirs: tuple[Path, Path], watcher: subprocess.Popen[str]) -> None:
    path = dirs[0] / status.STATUS_FILE
    doc = json.loads(path.read_text())
    doc["updated_at"] = "2026-01-01T00:00:00.000+00:00"  # alive, but silent for ages
    path.write_text(json.dumps(doc))
    proc = run_status(dirs)
    assert proc.returncode == 1
    assert f"not responding: pid {watcher.pid} is alive but its last update was" in proc.stdout


def test_no_watcher_ever_ran(dirs: tuple[Path, Path]) -> None:
    proc = run_status(dirs)
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"watcher: not running: no {status.STATUS_FILE} in {dirs[0]} or {dirs[1]}")
    assert "systemctl status instance-agent" in proc.stderr


def test_status_shows_the_termination_record_of_either_path(stack: Stack, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "app.log").write_text("hello\n")
    stack.scale_in()
    proc, result = stack.backup("--source", str(src))  # the SSM path's command
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = run_status((stack.tmp / "run", stack.tmp / "state"))
    assert out.returncode == 1  # no watcher here
    assert "termination backup (either trigger path): succeeded at " in out.stdout
    assert f": s3://{stack.bucket}/{result['key']}" in out.stdout


def test_write_status_merges_and_falls_back(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the runtime dir should be")
    cfg = config.Config.defaults(runtime_dir=str(blocked), state_dir=str(tmp_path / "state"))
    path = status.status_path(cfg)
    assert path == str(tmp_path / "state" / status.STATUS_FILE)

    assert status.write_status(path, imds_state="InService", last_poll=0.0)
    assert status.write_status(path, stage="backing up")
    doc = json.loads(Path(path).read_text())
    assert (doc["imds_state"], doc["stage"], doc["pid"]) == ("InService", "backing up", os.getpid())
    assert doc["last_poll"] == "1970-01-01T00:00:00.000+00:00"
    assert time.time() - status._parse_time(doc["updated_at"]) < 60  # type: ignore[operator]

    # A status file that cannot be written is a warning, never an exception.
    assert status.write_status(str(blocked / "x" / status.STATUS_FILE), stage="watching") is False


@pytest.mark.skipif(not os.path.exists("/proc/self/cmdline"), reason="needs /proc")
def test_the_real_watcher_reports_its_status(stack: Stack) -> None:
    proc = subprocess.Popen(
        [*AGENT, "watch", "--bucket", stack.bucket, "--poll-interval", "0.5"],
        env=stack.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        dirs = (stack.tmp / "run", stack.tmp / "state")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and status.find_status(dirs) is None:
            time.sleep(0.2)
        if status.find_status(dirs) is None:
            pytest.skip(
                "the watcher does not write its status file yet (watch.py should call status.write_status)"
            )
        out = run_status(dirs)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"watcher: running (pid {proc.pid}" in out.stdout
        assert "IMDS target-lifecycle-state: InService" in out.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=30)
