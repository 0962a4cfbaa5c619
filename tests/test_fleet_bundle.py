"""The install bundle: built for this Python and machine, installed offline into a fresh
venv by the user data's own install step, and the agent runs from it.
"""

from __future__ import annotations

import importlib.util
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
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


def _bundle_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bundle", PACKAGING / "bundle.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_wheel_is_built_outside_the_source_tree(tmp_path: Path) -> None:
    """A build inside the checkout leaves build/ and egg-info there, and a stale build/lib
    (a module deleted since) went into the next wheel."""
    repo = PACKAGING.parent
    checkout = tmp_path / "checkout"
    for name in ("pyproject.toml", "README.md"):
        checkout.mkdir(exist_ok=True)
        shutil.copy2(repo / name, checkout / name)
    for name in ("instance_agent", "lambda_trigger", "systemd"):
        shutil.copytree(repo / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    stale = checkout / "build" / "lib" / "instance_agent" / "deleted_since.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("raise SystemExit('a module deleted from the source')\n")
    before = sorted(p.relative_to(checkout) for p in checkout.rglob("*"))

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    bundle = _bundle_module().build(version, platform.machine(), tmp_path / "out", source=checkout)

    assert sorted(p.relative_to(checkout) for p in checkout.rglob("*")) == before
    with tarfile.open(bundle) as tar:
        [member] = [m for m in tar.getmembers() if m.name.startswith("wheels/instance_agent-")]
        wheel = tar.extractfile(member)
        assert wheel is not None
        with zipfile.ZipFile(io.BytesIO(wheel.read())) as zf:
            names = zf.namelist()
    assert "instance_agent/cli.py" in names
    assert "instance_agent/deleted_since.py" not in names


def _debian_like() -> bool:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return False
    return any(line in ("ID=debian", "ID=ubuntu") for line in text.splitlines())


def _install_python(tmp_path: Path, installed: bool) -> subprocess.CompletedProcess[str]:
    """The user data's install_python on this Debian or Ubuntu host, with a dpkg-query that
    says what the image holds and an apt-get whose mirror answers nothing (apt-get update
    exits 0 all the same, as it does offline)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "grep").symlink_to(shutil.which("grep") or "/bin/grep")
    status = "install ok installed" if installed else "unknown ok not-installed"
    (bin_dir / "dpkg-query").write_text(f"#!/bin/sh\nprintf '%s' '{status}'\n")
    (bin_dir / "apt-get").write_text(
        f'#!/bin/sh\necho "$*" >> {tmp_path / "apt-calls"}\n'
        'case "$*" in *update*) exit 0;; esac\necho "E: Unable to locate package" >&2\nexit 100\n'
    )
    for tool in ("dpkg-query", "apt-get"):
        (bin_dir / tool).chmod(0o755)
    return subprocess.run(
        [
            "/bin/bash",
            "-c",
            f"INSTANCE_AGENT_USER_DATA_LIB=1 source {PACKAGING / 'user-data.sh'} && sleep() {{ :; }} && "
            'install_python && echo "PYTHON=$PYTHON"',
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
        check=False,
    )


@pytest.mark.skipif(
    not _debian_like(), reason="install_python's Debian and Ubuntu branch needs their os-release"
)
def test_user_data_on_debian_needs_no_package_index_when_the_image_has_the_packages(tmp_path: Path) -> None:
    proc = _install_python(tmp_path, installed=True)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("PYTHON=/usr/bin/python3")
    assert not (tmp_path / "apt-calls").exists()  # no package index was asked


@pytest.mark.skipif(
    not _debian_like(), reason="install_python's Debian and Ubuntu branch needs their os-release"
)
def test_user_data_on_debian_fails_clearly_when_the_image_lacks_them_and_no_mirror_answers(
    tmp_path: Path,
) -> None:
    proc = _install_python(tmp_path, installed=False)

    assert proc.returncode == 1
    assert (
        "cannot install python3 python3-venv python3-boto3: this image lacks them and no package "
        "mirror answers; bake them into the image, or give the instance a route to its mirror"
    ) in proc.stderr
