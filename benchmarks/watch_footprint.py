"""Idle footprint of `instance-agent watch`: resident memory and CPU over a stretch of
polling, against the local IMDS stub (nothing to back up, so boto3 is never imported).

    python benchmarks/watch_footprint.py                 # 300 s at a 2 s poll
    python benchmarks/watch_footprint.py --duration 60   # a quick look

Memory is VmRSS from /proc/PID/status, sampled every second (peak and mean); CPU is
utime+stime from /proc/PID/stat over the measured window, as a percentage of one core.
The targets are < 35 MB and < 0.5 % of one core (issue 3).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from instance_agent.local.imds import IMDSStub

RSS_TARGET_MB = 35.0
CPU_TARGET_PCT = 0.5


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    stat = Path(f"/proc/{pid}/stat").read_text()
    rest = stat[stat.rindex(")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def agent_command() -> list[str]:
    beside = Path(sys.executable).parent / "instance-agent"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "instance_agent"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300.0, help="measured seconds")
    parser.add_argument("--poll-interval", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    with IMDSStub(target_lifecycle_state="InService") as stub, tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "INSTANCE_AGENT_"))}
        env.update(
            AWS_EC2_METADATA_SERVICE_ENDPOINT=stub.endpoint,
            INSTANCE_AGENT_STATE_DIR=f"{tmp}/state",
            INSTANCE_AGENT_RUNTIME_DIR=f"{tmp}/run",
            INSTANCE_AGENT_LOG_FORMAT="json",
        )
        log = open(f"{tmp}/watch.log", "w+")  # noqa: SIM115 - read back at the end
        proc = subprocess.Popen(
            [
                *agent_command(),
                "watch",
                "--bucket",
                "footprint-bench",
                "--poll-interval",
                str(args.poll_interval),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            time.sleep(args.warmup)
            if proc.poll() is not None:
                log.seek(0)
                raise SystemExit(f"watch exited early: {log.read()}")
            gets0, t0, cpu0 = stub.metadata_gets, time.monotonic(), cpu_seconds(proc.pid)
            samples: list[int] = []
            while time.monotonic() - t0 < args.duration:
                samples.append(rss_kib(proc.pid))
                time.sleep(1.0)
            wall = time.monotonic() - t0
            cpu = cpu_seconds(proc.pid) - cpu0
            gets = stub.metadata_gets - gets0
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=10)
            stop_s = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
        log.seek(0)
        log_lines = len(log.read().splitlines())
        log.close()

    figures = {
        "duration_s": round(wall, 1),
        "poll_interval_s": args.poll_interval,
        "rss_peak_mb": round(max(samples) / 1024, 1),
        "rss_mean_mb": round(sum(samples) / len(samples) / 1024, 1),
        "cpu_pct_of_one_core": round(100 * cpu / wall, 3),
        "imds_gets_per_poll": round(gets / (wall / args.poll_interval), 2),
        "log_lines": log_lines,
        "stop_exit_code": code,
        "stop_s": round(stop_s, 3),
    }
    if args.json:
        print(json.dumps(figures))
    else:
        for name, value in figures.items():
            print(f"{name:22} {value}")
        ok = figures["rss_peak_mb"] < RSS_TARGET_MB and figures["cpu_pct_of_one_core"] < CPU_TARGET_PCT
        print(
            f"{'targets':22} {'met' if ok else 'MISSED'} (< {RSS_TARGET_MB:g} MB RSS, "
            f"< {CPU_TARGET_PCT:g} % CPU)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
