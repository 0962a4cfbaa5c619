"""Termination latency with and without continuous shipping, on the same instance.

    python benchmarks/termination_latency.py                    # 1 GiB rotated + 32 MiB live
    python benchmarks/termination_latency.py --size 256MiB      # a quick look
    python benchmarks/termination_latency.py --corpus /tmp/c    # keep the corpus for reruns
    python benchmarks/termination_latency.py --files 1000,10000,100000 --rounds 3 --label after

The instance has `--size` of rotated logs (benchmarks/corpus.py, their times an hour old)
and one live file of 32 MiB that an application keeps appending to. Two runs, each with a
fresh Auto Scaling group and state directory:

- `ship`: `watch --ship`; once everything but the live file is shipped, the IMDS stub flips
  to `Terminated`;
- `full`: `watch --no-ship` (today's behaviour); flipped once the watcher polls.

Shipping settings: `--ship-settle 60` (the default: the rotated files are an hour old, so
they are complete at once, and the live file, appended to every 0.2 s, never settles) and
`--ship-bandwidth 64MiB` (compressed bytes per second: a cap an instance would use, above
what one nice-19 zstd thread produces from log text here, so the phase before the flip ends
in well under a minute rather than hours). Both can be changed on the command line.
`--rounds` (2) repeats both runs; the ratios are of the medians.

`--files N[,N…]` (issue 21 item 1) measures how the tail grows with history instead: a tree
of N small rotated files (1–4 KiB, an hour old, 1,000 a directory) and no live file, all
shipped before the flip, so there is nothing new to archive. Only the `ship` mode runs, the
sizes interleaved in each round. Targets: the median at the largest N at most 1.2x the
median at the smallest, and under 1 MiB uploaded after the flip at the largest. `--label`
names the run (`before`, `after`): each label's runs are kept in
benchmarks/results/termination_latency-files.json, and the markdown beside it shows them all.

Reported per run: seconds from the flip to CompleteLifecycleAction reaching Auto Scaling
(moto), and the bytes uploaded to S3 after the flip (request bodies counted by the test
fault proxy in front of SeaweedFS). Targets (issue 13): with shipping at most 0.2x the time
and 0.1x the bytes of the full archive. Results go to benchmarks/results/termination_latency.*
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

import boto3  # noqa: E402
from conftest import make_group  # noqa: E402
from support.faultproxy import FaultProxy  # noqa: E402
from support.seaweed import SeaweedS3  # noqa: E402

from benchmarks import corpus  # noqa: E402
from benchmarks.watcher import argv as watcher_argv  # noqa: E402
from benchmarks.watcher import env as watcher_env  # noqa: E402
from instance_agent.configvalues import parse_size  # noqa: E402
from instance_agent.local import autoscaling  # noqa: E402
from instance_agent.local.imds import IMDSStub  # noqa: E402
from instance_agent.local.moto_server import MotoServer  # noqa: E402

LIVE = 32 * 2**20
RESULTS = ROOT / "benchmarks" / "results"
TIME_TARGET, BYTES_TARGET = 0.2, 0.1


def _uploaded(proxy: FaultProxy) -> int:
    total = 0
    for req in proxy.requests:
        if req.method == "PUT" or (req.method == "POST" and "uploads" not in req.query):
            length = (
                req.headers.get("x-amz-decoded-content-length") or req.headers.get("content-length") or "0"
            )
            total += int(length)
    return total


def _append(path: Path, stop: threading.Event) -> None:
    n = 0
    while not stop.wait(0.2):
        with open(path, "ab") as fh:
            fh.write(b"%09d live line of the application that is still running\n" % n)
        n += 1


def _shipped_all_but_live(run_dir: Path, live: int = 1) -> bool:
    try:
        doc = json.loads((run_dir / "watch-status.json").read_text())
    except (OSError, ValueError):
        return False
    block = doc.get("shipping") or {}
    return bool(block.get("shipped_files")) and block.get("pending_files") == live


def one_run(
    mode: str,
    src: Path,
    tmp: Path,
    moto: MotoServer,
    proxy: FaultProxy,
    args: argparse.Namespace,
    round_no: int,
    live: int = 1,
) -> dict[str, Any]:
    group = f"lat-{mode}-{round_no}" + (f"-{src.name}" if not live else "")
    instance = make_group(moto, group, "hook", heartbeat_timeout=600)
    run_dir, state = tmp / f"run-{group}", tmp / f"state-{group}"
    with IMDSStub(instance_id=instance, target_lifecycle_state="InService") as imds:
        env = watcher_env(moto.endpoint, proxy.endpoint, imds.endpoint)
        argv = watcher_argv(
            src,
            state=state,
            run_dir=run_dir,
            poll=0.5,
            log_level=args.log_level,
            extra=(
                ("--ship", "--ship-settle", str(args.ship_settle), "--ship-bandwidth", args.ship_bandwidth)
                if mode == "ship"
                else ("--no-ship",)
            ),
        )
        log = open(tmp / f"watch-{group}.log", "w")  # noqa: SIM115  (closed below)
        watcher = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            started = time.monotonic()
            while imds.metadata_gets < 2:
                time.sleep(0.05)
            if mode == "ship":
                while not _shipped_all_but_live(run_dir, live):
                    if watcher.poll() is not None:
                        raise SystemExit("the watcher died; see " + log.name)
                    time.sleep(0.5)
            shipping_s = time.monotonic() - started
            before = _uploaded(proxy)
            autoscaling.begin_termination(group, instance)
            flipped = time.monotonic()
            imds.target_lifecycle_state = "Terminated"
            while True:
                done = [
                    c
                    for c in autoscaling.calls()
                    if c.group == group and c.action == "CompleteLifecycleAction"
                ]
                if done:
                    break
                if time.monotonic() - flipped > 900:
                    raise SystemExit(f"{mode}: no completion within 900 s")
                time.sleep(0.02)
            latency = done[0].at - flipped
            time.sleep(0.5)
            after = _uploaded(proxy) - before
        finally:
            watcher.terminate()
            watcher.wait(timeout=60)
            log.close()
    print(
        (f"{src.name}: " if not live else "") + f"{mode}: {latency:.2f} s flip -> CompleteLifecycleAction, "
        f"{after / 2**20:.1f} MiB uploaded after the flip"
        + (f" (shipping took {shipping_s:.0f} s before)" if mode == "ship" else ""),
        flush=True,
    )
    segments = (tmp / f"watch-{group}.log").read_text().count('"segment shipped"')
    if args.keep_logs:
        args.keep_logs.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp / f"watch-{group}.log", args.keep_logs)
    return {
        "mode": mode,
        "round": round_no,
        "latency_s": round(latency, 3),
        "bytes_after_flip": after,
        "result": done[0].result,
        "shipping_before_s": round(shipping_s, 1),
        "segments": segments,
    }


def _median(values: list[float]) -> float:
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def chart(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.4))
    for ax, field, scale, label in (
        (a, "latency_s", 1, "s, IMDS flip -> CompleteLifecycleAction"),
        (b, "bytes_after_flip", 2**20, "MiB uploaded after the flip"),
    ):
        for x, mode, color in ((0, "ship", "tab:green"), (1, "full", "tab:gray")):
            vals = [r[field] / scale for r in runs if r["mode"] == mode]
            ax.bar(x, _median(vals), color=color, width=0.6)
            ax.scatter([x] * len(vals), vals, color="black", s=12, zorder=3)
        ax.set_xticks([0, 1], ["with shipping", "--no-ship (full)"])
        ax.set_ylabel(label)
    fig.suptitle(
        f"termination, {summary['size']} rotated + 32 MiB live: time ratio "
        f"{summary['time_ratio']:.3f}, bytes ratio {summary['bytes_ratio']:.4f}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def markdown(summary: dict[str, Any]) -> str:
    out = [
        f"# Termination latency: continuous shipping vs the full archive ({summary['size']})",
        "",
        f"`python benchmarks/termination_latency.py --size {summary['size']}` on "
        f"{summary['cpus']} CPUs; {summary['size']} of rotated logs (benchmarks/corpus.py, "
        f"{summary['corpus_files']:,} files) and one 32 MiB live file appended to every "
        "0.2 s. Local SeaweedFS, moto and the IMDS stub. Shipping settings: "
        f"`--ship-settle {summary['ship_settle']:g} --ship-bandwidth "
        f"{summary['ship_bandwidth']}`.",
        "",
        "| round | mode | flip → CompleteLifecycleAction (s) | uploaded after the flip (MiB) "
        "| shipping before the flip (s) | segments |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary["runs"]:
        out.append(
            f"| {r['round']} | {r['mode']} | {r['latency_s']:.2f} | "
            f"{r['bytes_after_flip'] / 2**20:.2f} | "
            f"{r['shipping_before_s'] if r['mode'] == 'ship' else '-'} | "
            f"{r['segments'] if r['mode'] == 'ship' else '-'} |"
        )
    out += [
        "",
        f"Medians: with shipping {summary['ship_latency_s']:.2f} s and "
        f"{summary['ship_bytes'] / 2**20:.2f} MiB; full archive "
        f"{summary['full_latency_s']:.2f} s and {summary['full_bytes'] / 2**20:.1f} MiB.",
        "",
        f"- time ratio **{summary['time_ratio']:.3f}** (target ≤ {TIME_TARGET})",
        f"- bytes ratio **{summary['bytes_ratio']:.4f}** (target ≤ {BYTES_TARGET})",
        f"- targets {'met' if summary['met'] else 'NOT met'}",
        "",
        "![chart](" + summary["chart"] + ")",
        "",
    ]
    return "\n".join(out)


PER_DIR = 1000
GROWTH_TARGET, FLIP_BYTES_TARGET = 1.2, 2**20


def small_tree(root: Path, n: int) -> Path:
    """`n` rotated files of 1-4 KiB, an hour old, 1,000 a directory (kept for reruns)."""
    tree = root / f"files-{n}"
    marker = tree / ".complete"
    if marker.exists():
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    old = time.time() - 3600
    line = b"2026-01-31T12:00:00Z host app[812]: request served in 12 ms, status 200, id "
    for i in range(n):
        d = tree / f"d{i // PER_DIR:04d}"
        if i % PER_DIR == 0:
            d.mkdir(parents=True)
        path = d / f"app.log.{i:06d}"
        path.write_bytes((line + b"%08d\n" % i) * (12 + (i * 7919) % 36))
        os.utime(path, (old, old))
    marker.write_text("")
    os.utime(marker, (old, old))
    return tree


def files_markdown(doc: dict[str, Any]) -> str:
    out = [
        "# Termination tail against shipped history (issue 21 item 1)",
        "",
        "`python benchmarks/termination_latency.py --files 1000,10000,100000 --rounds 3 --label L` "
        f"on {doc['cpus']} CPUs: a tree of N rotated files of 1-4 KiB (1,000 a directory), all "
        "shipped before the flip, nothing new to archive. Local SeaweedFS behind the fault proxy, "
        "moto and the IMDS stub; the watcher polls IMDS every 0.5 s, so each time includes up to "
        "0.5 s of detection. Time: IMDS flip to CompleteLifecycleAction reaching Auto Scaling; "
        "bytes: request bodies sent to S3 after the flip.",
        "",
        f"Targets: median at the largest N at most {GROWTH_TARGET}x the median at the smallest; "
        "under 1 MiB after the flip at the largest.",
        "",
    ]
    for label, runs in doc["labels"].items():
        sizes = sorted({r["files"] for r in runs})
        out += [
            f"## {label}",
            "",
            doc.get("notes", {}).get(label, ""),
            "",
            "| files | median s (min-max) | rounds (s) | MiB after the flip (median) | segments |",
            "|---:|---|---|---:|---:|",
        ]
        med = {}
        for n in sizes:
            rs = [r for r in runs if r["files"] == n]
            lat = [r["latency_s"] for r in rs]
            med[n] = _median(lat)
            out.append(
                f"| {n:,} | {med[n]:.2f} ({min(lat):.2f}-{max(lat):.2f}) | "
                + ", ".join(f"{x:.2f}" for x in lat)
                + f" | {_median([r['bytes_after_flip'] for r in rs]) / 2**20:.3f} | "
                + f"{_median([r['segments'] for r in rs]):g} |"
            )
        lo, hi = sizes[0], sizes[-1]
        growth = med[hi] / med[lo]
        hi_bytes = _median([r["bytes_after_flip"] for r in runs if r["files"] == hi])
        out += [
            "",
            f"- growth {hi:,} / {lo:,} files: **{growth:.2f}x** (target <= {GROWTH_TARGET}): "
            + ("met" if growth <= GROWTH_TARGET else "NOT met"),
            f"- after the flip at {hi:,} files: **{hi_bytes / 2**20:.3f} MiB** (target < 1 MiB): "
            + ("met" if hi_bytes < FLIP_BYTES_TARGET else "NOT met"),
            "",
        ]
    return "\n".join(out)


def files_main(args: argparse.Namespace) -> None:
    sizes = [int(x) for x in args.files.split(",")]
    keep = args.corpus
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        trees = {n: small_tree(keep or tmp, n) for n in sizes}
        results = []
        with MotoServer() as moto, SeaweedS3(tmp / "weed") as s3, FaultProxy(s3.endpoint) as proxy:
            boto3.client("s3", endpoint_url=s3.endpoint).create_bucket(Bucket="bench")
            for round_no in range(1, args.rounds + 1):
                for n in sizes:
                    r = one_run("ship", trees[n], tmp, moto, proxy, args, round_no, live=0)
                    results.append({**r, "files": n})
                    proxy.clear_log()
    path = RESULTS / "termination_latency-files.json"
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"labels": {}}
    doc["cpus"] = os.cpu_count()
    doc["labels"][args.label] = results
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    path.with_suffix(".md").write_text(files_markdown(doc))
    print(files_markdown(doc))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB", help="rotated logs (default 1GiB)")
    ap.add_argument("--corpus", type=Path, help="where to keep the generated corpus")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each mode (default 2)")
    ap.add_argument("--ship-settle", type=float, default=60.0)
    ap.add_argument("--ship-bandwidth", default="64MiB")
    ap.add_argument("--log-level", default="info", help="the watchers' (default info)")
    ap.add_argument("--keep-logs", type=Path, help="copy the watchers' logs here")
    ap.add_argument("--files", help="N[,N...]: small shipped files, nothing new (issue 21 item 1)")
    ap.add_argument("--label", default="run", help="with --files: the name of this run's results")
    args = ap.parse_args()
    size = parse_size(args.size)
    for name in list(os.environ):
        if name.startswith(("AWS_", "INSTANCE_AGENT_")):
            del os.environ[name]
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    if args.files:
        files_main(args)
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        src = corpus.generate(args.corpus or tmp / "src", size)
        old = time.time() - 3600
        files = 0
        for dirpath, _, names in os.walk(src):
            for f in names:
                os.utime(os.path.join(dirpath, f), (old, old))
                files += 1
        live = src / "app" / "live.log"
        with open(live, "wb") as fh:
            line = b"live line of the application that is still running, padded...\n"
            fh.write(line * (LIVE // len(line)))
        stop = threading.Event()
        appender = threading.Thread(target=_append, args=(live, stop), daemon=True)
        appender.start()
        results = []
        try:
            with MotoServer() as moto, SeaweedS3(tmp / "weed") as s3, FaultProxy(s3.endpoint) as proxy:
                boto3.client("s3", endpoint_url=s3.endpoint).create_bucket(Bucket="bench")
                for round_no in range(1, args.rounds + 1):
                    for mode in ("ship", "full"):
                        results.append(one_run(mode, src, tmp, moto, proxy, args, round_no))
                        proxy.clear_log()
        finally:
            stop.set()
            live.unlink(missing_ok=True)

    def med(mode: str, field: str) -> float:
        return _median([r[field] for r in results if r["mode"] == mode])

    time_ratio = med("ship", "latency_s") / med("full", "latency_s")
    bytes_ratio = med("ship", "bytes_after_flip") / max(med("full", "bytes_after_flip"), 1)
    stem = RESULTS / f"termination_latency-{args.size}"
    summary = {
        "size": args.size,
        "rotated_bytes": size,
        "live_bytes": LIVE,
        "corpus_files": files,
        "ship_settle": args.ship_settle,
        "ship_bandwidth": args.ship_bandwidth,
        "runs": results,
        "ship_latency_s": med("ship", "latency_s"),
        "full_latency_s": med("full", "latency_s"),
        "ship_bytes": med("ship", "bytes_after_flip"),
        "full_bytes": med("full", "bytes_after_flip"),
        "time_ratio": round(time_ratio, 3),
        "bytes_ratio": round(bytes_ratio, 4),
        "time_target": TIME_TARGET,
        "bytes_target": BYTES_TARGET,
        "met": time_ratio <= TIME_TARGET and bytes_ratio <= BYTES_TARGET,
        "cpus": os.cpu_count(),
        "chart": stem.with_suffix(".png").name,
    }
    RESULTS.mkdir(exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(summary))
    chart(summary, stem.with_suffix(".png"))
    print(
        f"time ratio {time_ratio:.3f} (target <= {TIME_TARGET}), bytes ratio "
        f"{bytes_ratio:.4f} (target <= {BYTES_TARGET}): "
        f"{'met' if summary['met'] else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
