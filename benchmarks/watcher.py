"""The watcher as the latency benchmarks start it: one instance of the local stand-in, its
own IMDS stub, S3 behind the fault proxy (whose rules mark or slow the uploads)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def env(moto_endpoint: str, s3_endpoint: str, imds_endpoint: str) -> dict[str, str]:
    return dict(
        os.environ,
        AWS_ENDPOINT_URL=moto_endpoint,
        AWS_ENDPOINT_URL_S3=s3_endpoint,
        AWS_EC2_METADATA_SERVICE_ENDPOINT=imds_endpoint,
    )


def argv(
    src: Path, *, state: Path, run_dir: Path, poll: float, log_level: str, extra: tuple[str, ...] = ()
) -> list[str]:
    """`instance-agent watch` of `src` into bucket `bench`, without the journal, with its own
    state and runtime directories."""
    return [
        sys.executable,
        "-m",
        "instance_agent",
        "watch",
        "--bucket",
        "bench",
        "--source",
        str(src),
        "--no-journal",
        "--poll-interval",
        str(poll),
        "--state-dir",
        str(state),
        "--runtime-dir",
        str(run_dir),
        "--log-level",
        log_level,
        *extra,
    ]
