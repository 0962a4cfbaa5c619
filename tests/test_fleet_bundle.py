"""The install bundle: built for this Python and machine, installed offline into a fresh
venv by the user data's own install step, and the agent runs from it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

from conftest import Stack

PACKAGING = Path(__file__).resolve().parents[1] / "packaging"


def test_bundle_installs_offline_and_runs(tmp_path: Path) -> None:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    build = subprocess.run(
        [sys.executable, str(PACKAGING / "bundle.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    bundle = Path(build.stdout.strip())
    assert bundle.name == f"instance-agent-py{version}-{platform.machine()}.tar.gz"

    # The user data's install_bundle, run as the instance runs it; pip may reach no index.
    prefix = tmp_path / "opt"
    env = {
        "PATH": "/usr/bin:/bin",
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_NO_INDEX": "1",
        "HOME": str(tmp_path),
    }
    install = subprocess.run(
        [
            "bash",
            "-c",
            f"INSTANCE_AGENT_USER_DATA_LIB=1 source {PACKAGING / 'user-data.sh'} && "
            f"PREFIX={prefix} PYTHON={sys.executable} install_bundle {bundle}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert install.returncode == 0, install.stderr

    agent = subprocess.run(
        [str(prefix / "bin" / "instance-agent"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (agent.returncode, agent.stdout.strip()) == (0, "instance-agent 0.1.0")


def test_bundle_is_fetched_with_the_distributions_boto3_where_no_aws_cli_is(
    stack: Stack, tmp_path: Path
) -> None:
    """Ubuntu has no AWS CLI: fetch_bundle falls back to python3 with boto3 (python3-boto3),
    credentials from the instance role, endpoint and region from the environment."""
    payload = os.urandom(300_000)
    key = "instance-agent/0.1.0/instance-agent-py3.12-x86_64.tar.gz"
    stack.client("s3").put_object(Bucket=stack.bucket, Key=key, Body=payload)
    # A PATH that holds python3 and nothing else, so no `aws` on this machine is found.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    dest = tmp_path / "bundle.tar.gz"
    proc = subprocess.run(
        [
            "/bin/bash",
            "-c",
            f"INSTANCE_AGENT_USER_DATA_LIB=1 source {PACKAGING / 'user-data.sh'} && "
            f"fetch_bundle s3://{stack.bucket}/{key} {dest}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**stack.env(), "PATH": str(bin_dir)},
        check=False,
    )

    assert proc.returncode == 0, proc.stderr
    assert dest.read_bytes() == payload
