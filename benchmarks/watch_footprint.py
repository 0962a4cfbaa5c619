"""Footprint of `instance-agent watch`: CPU and resident memory while it waits.

Scale mode (the default, issue 19 item 6): N small files already shipped, then idle, then
one shell-style `>>` writer.

    python benchmarks/watch_footprint.py                          # 100,000 files
    python benchmarks/watch_footprint.py --files 50000 --label before
    python benchmarks/watch_footprint.py --poll-only --duration 60  # polling alone (issue 3)

Scale mode creates `--files` small files (about 200 bytes of log text each, 1,000 to a
directory, their times an hour old so they are complete at once) in a temp directory, starts
local SeaweedFS (S3), moto (Auto Scaling, CloudWatch) and the IMDS stub on 127.0.0.1, runs
`watch --ship` over the files and waits until its status file says every one is shipped.
Then, over `--window` seconds each (after `--warmup`):

- **idle**: nothing changes;
- **busy**: one writer opens the live file with O_APPEND, writes one line and closes it,
  every 100 ms (what `echo line >> app.log` in a shell loop does).

Memory is VmRSS from /proc/PID/status, sampled every second (peak and mean); CPU is
utime+stime of the whole process (every thread) from /proc/PID/stat over the window, as a
percentage of one core. Targets at 100,000 files: idle < 1 % and < 60 MiB, busy < 5 %.
Each run is stored under its `--label` in results/watch_footprint-N.json, and
results/watch_footprint.md is written again from every such file.

`--poll-only` is the earlier benchmark: no shipping, nothing to back up (boto3 is never
imported), only the IMDS poll; targets < 35 MB and < 0.5 % (issue 3); its results are in
results/watch_footprint-poll.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from instance_agent.local.imds import IMDSStub  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RSS_TARGET_MB = 35.0  # --poll-only
CPU_TARGET_PCT = 0.5  # --poll-only
SCALE_IDLE_CPU, SCALE_IDLE_RSS_MIB, SCALE_BUSY_CPU = 1.0, 60.0, 5.0
PER_DIR = 1000
LINE = b"2026-01-31T12:00:00Z GET /api/v1/items?page=%d 200 1834 0.012 curl/8.5 10.0.0.%d\n"


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


def smaps_summary(pid: int) -> str:
    """Resident KiB by kind of mapping: heap, anonymous, files (where the memory is)."""
    kinds: dict[str, int] = {}
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if "-" in parts[0] and len(parts) >= 5:
            path = parts[5] if len(parts) > 5 else ""
            name = path if path.startswith("[") else ("file" if path else "anonymous")
        elif parts[0] == "Rss:":
            kinds[name] = kinds.get(name, 0) + int(parts[1])
    return ", ".join(f"{k} {v // 1024} MiB" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))


def measure(pid: int, seconds: float) -> dict[str, float]:
    """CPU % of one core and RSS (MiB, peak and mean) of `pid` over `seconds`."""
    t0, cpu0 = time.monotonic(), cpu_seconds(pid)
    samples: list[int] = []
    while time.monotonic() - t0 < seconds:
        samples.append(rss_kib(pid))
        time.sleep(1.0)
    wall = time.monotonic() - t0
    return {
        "window_s": round(wall, 1),
        "cpu_pct": round(100 * (cpu_seconds(pid) - cpu0) / wall, 2),
        "rss_peak_mib": round(max(samples) / 1024, 1),
        "rss_mean_mib": round(sum(samples) / len(samples) / 1024, 1),
    }


# -- scale mode ---------------------------------------------------------------------------


def make_files(src: Path, count: int) -> None:
    old = time.time() - 3600
    for i in range(count):
        d = src / f"d{i // PER_DIR:04d}"
        if i % PER_DIR == 0:
            d.mkdir(parents=True)
        p = d / f"app-{i:07d}.log.1"
        p.write_bytes(LINE % (i, i % 250) * 2)
        os.utime(p, (old, old))


def shipping_block(run_dir: Path) -> dict[str, Any]:
    try:
        doc = json.loads((run_dir / "watch-status.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc.get("shipping") or {}


def writer(path: Path, stop: threading.Event) -> None:
    """`while :; do echo line >> app.log; sleep 0.1; done`"""
    n = 0
    while not stop.wait(0.1):
        with open(path, "ab") as fh:
            fh.write(b"%09d live line of the application that is still running\n" % n)
        n += 1


def scale(args: argparse.Namespace) -> dict[str, Any]:
    import boto3
    from conftest import make_group
    from support.seaweed import SeaweedS3

    from instance_agent.local.moto_server import MotoServer

    for name in list(os.environ):
        if name.startswith(("AWS_", "INSTANCE_AGENT_")):
            del os.environ[name]
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        src = tmp / "src"
        t = time.monotonic()
        make_files(src, args.files)
        print(f"{args.files} files made in {time.monotonic() - t:.1f} s", flush=True)
        with MotoServer() as moto, SeaweedS3(tmp / "weed") as s3:
            boto3.client("s3", endpoint_url=s3.endpoint).create_bucket(Bucket="bench")
            instance = make_group(moto, "footprint", "hook", heartbeat_timeout=600)
            with IMDSStub(instance_id=instance, target_lifecycle_state="InService") as imds:
                env = dict(
                    os.environ,
                    AWS_ENDPOINT_URL=moto.endpoint,
                    AWS_ENDPOINT_URL_S3=s3.endpoint,
                    AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.endpoint,
                )
                run_dir, state = tmp / "run", tmp / "state"
                argv = [
                    *agent_command(),
                    "watch",
                    "--bucket",
                    "bench",
                    "--source",
                    str(src),
                    "--no-journal",
                    "--ship",
                    "--poll-interval",
                    "2",
                    "--state-dir",
                    str(state),
                    "--runtime-dir",
                    str(run_dir),
                ]
                with open(tmp / "watch.log", "w+") as log:
                    proc = subprocess.Popen(
                        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log
                    )
                    try:
                        return run_phases(args, proc, log, src, run_dir, state)
                    finally:
                        if proc.poll() is None:
                            proc.send_signal(signal.SIGTERM)
                            try:
                                proc.wait(timeout=30)
                            except subprocess.TimeoutExpired:
                                proc.kill()
                                proc.wait()


def run_phases(
    args: argparse.Namespace, proc: subprocess.Popen[bytes], log: Any, src: Path, run_dir: Path, state: Path
) -> dict[str, Any]:
    started = time.monotonic()
    peak_ship = 0
    while shipping_block(run_dir).get("shipped_files", 0) < args.files:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"watch exited early: {log.read()[-4000:]}")
        if time.monotonic() - started > args.ship_timeout:
            raise SystemExit(f"not shipped within {args.ship_timeout} s: {shipping_block(run_dir)}")
        peak_ship = max(peak_ship, rss_kib(proc.pid))
        time.sleep(0.5)
    shipped_s = time.monotonic() - started
    print(f"shipped in {shipped_s:.0f} s; measuring idle", flush=True)
    time.sleep(args.warmup)
    idle = measure(proc.pid, args.window)
    if args.smaps:
        print(smaps_summary(proc.pid), flush=True)
    print(f"idle: {idle}; measuring busy", flush=True)
    stop = threading.Event()
    live = src / "live.log"
    thread = threading.Thread(target=writer, args=(live, stop), daemon=True)
    thread.start()
    try:
        time.sleep(args.warmup)
        busy = measure(proc.pid, args.window)
    finally:
        stop.set()
        thread.join()
    print(f"busy: {busy}", flush=True)
    log.seek(0)
    text = log.read()
    ledger = state / "ship-ledger.jsonl"
    return {
        "files": args.files,
        "shipped_s": round(shipped_s, 1),
        "segments": text.count('"segment shipped"'),
        "rss_peak_while_shipping_mib": round(peak_ship / 1024, 1),
        "ledger_bytes": ledger.stat().st_size if ledger.exists() else 0,
        "idle": idle,
        "busy": busy,
        "cpus": os.cpu_count(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def met(run: dict[str, Any]) -> bool:
    return (
        run["idle"]["cpu_pct"] < SCALE_IDLE_CPU
        and run["idle"]["rss_peak_mib"] < SCALE_IDLE_RSS_MIB
        and run["busy"]["cpu_pct"] < SCALE_BUSY_CPU
    )


def markdown(results: Path) -> str:
    out = [
        "# Watcher footprint at scale (issue 19 item 6)",
        "",
        "`python benchmarks/watch_footprint.py --files N --label L`: N small files already "
        "shipped by `watch --ship` (local SeaweedFS, moto, IMDS stub), then "
        "idle, then one `>>` writer appending to one file every 100 ms. CPU is % of one core "
        "over the window (all threads); RSS in MiB (peak / mean, sampled every second). "
        f"Targets at 100,000 files: idle < {SCALE_IDLE_CPU:g} % and < {SCALE_IDLE_RSS_MIB:g} MiB, "
        f"busy < {SCALE_BUSY_CPU:g} %. The polling-only figures (no shipping) are in "
        "[watch_footprint-poll.md](watch_footprint-poll.md).",
        "",
        "| files | run | idle CPU % | idle RSS peak / mean | busy CPU % | busy RSS peak / mean "
        "| RSS peak while shipping | shipping took | segments | ledger | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(results.glob("watch_footprint-*.json"), key=lambda p: -int(p.stem.split("-")[1])):
        for label, r in json.loads(path.read_text()).items():
            out.append(
                f"| {r['files']:,} | {label} | {r['idle']['cpu_pct']} | "
                f"{r['idle']['rss_peak_mib']} / {r['idle']['rss_mean_mib']} | {r['busy']['cpu_pct']} | "
                f"{r['busy']['rss_peak_mib']} / {r['busy']['rss_mean_mib']} | "
                f"{r['rss_peak_while_shipping_mib']} | {r['shipped_s']} s | {r['segments']} | "
                f"{r['ledger_bytes'] / 2**20:.1f} MiB | "
                f"{'met' if met(r) else 'missed'} |"
            )
    out += [
        "",
        "Notes:",
        "",
        "- *before* is the code this benchmark was added to (bc46591, run from a `git archive` "
        "of it), *after* the event-driven shipper with the packed ledger (rebased on main at "
        "3442956); both on the same 2-CPU machine, which other sessions' tests shared at times.",
        "- The RSS target is missed. `watch --ship` with 10 files already idles at 63.5 MiB "
        "(boto3/botocore and their S3, Auto Scaling and CloudWatch models: about 30 MB of it; "
        "`watch` without shipping idles at 31 MiB, see the polling figures): above 60 MiB "
        "before any file is counted. At 100,000 files the packed ledger itself is about "
        "17 MB (170 bytes a file with its 45-byte path); the rest above the baseline is "
        "what the first start's backlog leaves in "
        "CPython's small-object arenas (malloc_trim cannot return those; MALLOC_ARENA_MAX=1 "
        "changed nothing: 122.9 MiB).",
        "- `--smaps` prints the idle RSS by kind of mapping (anonymous, heap, files).",
        "",
    ]
    return "\n".join(out)


# -- poll-only mode -----------------------------------------------------------------------


def poll_only(args: argparse.Namespace) -> int:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--poll-only", action="store_true", help="the polling-only benchmark (issue 3)")
    parser.add_argument("--files", type=int, default=100_000, help="small files shipped first")
    parser.add_argument("--label", default="after", help="the run's name in the results (before, after)")
    parser.add_argument("--window", type=float, default=60.0, help="measured seconds per phase")
    parser.add_argument("--ship-timeout", type=float, default=1800.0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--duration", type=float, default=300.0, help="--poll-only: measured seconds")
    parser.add_argument("--poll-interval", type=float, default=2.0, help="--poll-only")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--smaps", action="store_true", help="where the idle RSS is, by mapping kind")
    args = parser.parse_args()
    if args.poll_only:
        return poll_only(args)
    run = scale(args)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"watch_footprint-{args.files}.json"
    runs = json.loads(path.read_text()) if path.exists() else {}
    runs[args.label] = run
    path.write_text(json.dumps(runs, indent=2) + "\n")
    (args.results / "watch_footprint.md").write_text(markdown(args.results))
    print(json.dumps(run) if args.json else f"targets {'met' if met(run) else 'MISSED'}; see {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
