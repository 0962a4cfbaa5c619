"""Peak RSS of `instance-agent backup` by source size, against a local SeaweedFS.

    python benchmarks/memory.py --sizes 100MiB,1GiB

Memory must not grow with the data: the streaming upload holds about
(workers + queue + 1) x part size, whatever the size. Prints a Markdown table and the ratio of
the largest to the smallest peak RSS (target: within 1.5x).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from support.seaweed import SeaweedS3  # noqa: E402

from benchmarks.corpus import generate  # noqa: E402
from instance_agent.configvalues import parse_size  # noqa: E402

WORK = ROOT / "benchmarks" / "work"


def run_backup(src: Path, endpoint: str, bucket: str, extra: list[str]) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "INSTANCE_AGENT_"))}
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL_S3=endpoint,
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    args = [
        sys.executable,
        "-m",
        "instance_agent",
        "backup",
        "--no-complete",
        "--no-journal",
        "--instance-id",
        "i-0123456789abcdef0",
        "--region",
        "us-east-1",
        "--bucket",
        bucket,
        "--source",
        str(src),
        "--json",
        *extra,
    ]
    started = time.monotonic()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    result = json.loads(out)
    if os.waitstatus_to_exitcode(status) != 0 or result["status"] != "succeeded":
        raise SystemExit(f"backup failed: {result}")
    return {
        "wall_s": wall,
        "rss_mib": usage.ru_maxrss / 1024,
        "read": result["bytes_read"],
        "uploaded": result["bytes_uploaded"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="100MiB,1GiB")
    ap.add_argument("--rounds", type=int, default=2)
    args, extra = ap.parse_known_args()
    sizes = [(s, parse_size(s)) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="seaweed-") as tmp, SeaweedS3(tmp) as s3:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=s3.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        client.create_bucket(Bucket="bench")
        for label, size in sizes:
            src = generate(WORK / f"corpus-{size}", size)
            runs = [run_backup(src, s3.endpoint, "bench", extra) for _ in range(args.rounds)]
            best = max(runs, key=lambda r: r["rss_mib"])  # report the worst peak
            rows.append((label, best, min(r["wall_s"] for r in runs)))
    print("| source | bytes read | uploaded | ratio | wall (best) | peak RSS (worst) |")
    print("|---|---|---|---|---|---|")
    for label, r, wall in rows:
        print(
            f"| {label} | {r['read']:,} | {r['uploaded']:,} | {r['read'] / r['uploaded']:.2f}x | "
            f"{wall:.2f} s | {r['rss_mib']:.1f} MiB |"
        )
    growth = rows[-1][1]["rss_mib"] / rows[0][1]["rss_mib"]
    print(f"\npeak RSS {rows[-1][0]} / {rows[0][0]} = {growth:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
