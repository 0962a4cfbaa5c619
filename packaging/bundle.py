#!/usr/bin/env python3
"""Build the agent's install bundle: its wheel plus a wheelhouse of every dependency.

    python3 packaging/bundle.py --python-version 3.12 --arch x86_64 --out dist/
    python3 packaging/bundle.py --python-version 3.12 --arch aarch64 --out dist/

writes `dist/instance-agent-py3.12-<arch>.tar.gz`, one directory `wheels/` inside, which the
user data (packaging/user-data.sh) fetches from S3 with the instance role and installs
with `pip install --no-index --find-links wheels instance-agent`: the instance needs no
package index, no NAT and no pre-signed URL, only its role and a route to S3 (a gateway
endpoint is enough). The dependencies are binary wheels only (`--only-binary=:all:`) for
manylinux with glibc 2.34 or older, which covers Amazon Linux 2023 (glibc 2.34) and Ubuntu
22.04 and later; a bundle for the running interpreter (no flags) is what the tests build.

Stdlib only: it runs where the source checkout is, before any venv exists.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHES = ("x86_64", "aarch64")
# Wheel platform tags the instances accept, newest first: glibc 2.34 is Amazon Linux 2023's;
# manylinux2014 is the legacy name of 2.17, which many wheels still use alone.
PLATFORMS = ("manylinux_2_34", "manylinux_2_28", "manylinux_2_17", "manylinux2014")


PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
# Left out of the copy the wheel is built from: build output, caches, VCS, venvs, and the
# parts of the checkout that are not in the wheel.
NOT_SOURCE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
              "benchmarks", "tests", "docs")


def bundle_name(python_version: str, arch: str) -> str:
    """The artifact's file name; the user data computes the same from python and `uname -m`."""
    return f"instance-agent-py{python_version}-{arch}.tar.gz"


def build(python_version: str, arch: str, out: Path, *, source: Path = ROOT) -> Path:
    """Build the bundle into `out`; returns its path. Raises CalledProcessError on failure."""
    with tempfile.TemporaryDirectory(prefix="instance-agent-bundle-") as tmp:
        wheels = Path(tmp) / "wheels"
        agent = agent_wheel(source, wheels)
        subprocess.run([*PIP, "download", "--quiet", "--dest", str(wheels),
                        "--only-binary=:all:", "--python-version", python_version,
                        "--implementation", "cp",
                        *(flag for p in PLATFORMS for flag in ("--platform", f"{p}_{arch}")),
                        str(agent)], check=True)
        out.mkdir(parents=True, exist_ok=True)
        target = out / bundle_name(python_version, arch)
        partial = target.with_name(target.name + ".partial")
        with tarfile.open(partial, "w:gz") as tar:
            for wheel in sorted(wheels.glob("*.whl")):
                tar.add(wheel, arcname=f"wheels/{wheel.name}")
        partial.replace(target)  # never a half-written bundle under the real name
    return target


def agent_wheel(source: Path, wheels: Path) -> Path:
    """The agent's own wheel, built from a copy of `source` in a temporary directory.

    pip builds a source directory in place: setuptools leaves build/ and *.egg-info in the
    checkout, and a stale build/lib from an earlier build puts modules deleted since into
    the wheel. Only what the wheel is made of is copied (pyproject.toml names it)."""
    with tempfile.TemporaryDirectory(prefix="instance-agent-wheel-") as tmp:
        copy = Path(tmp) / "src"
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns(*NOT_SOURCE))
        subprocess.run([*PIP, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(copy)],
                       check=True)
    [wheel] = wheels.glob("instance_agent-*.whl")
    return wheel


def main(argv: list[str] | None = None) -> int:
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default=here,
                        help=f"the instances' Python, e.g. 3.12 (default: this one, {here})")
    parser.add_argument("--arch", choices=ARCHES, default=platform.machine(),
                        help="the instances' architecture (default: this machine's)")
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output directory")
    args = parser.parse_args(argv)
    if args.arch not in ARCHES:
        parser.error(f"--arch must be one of {', '.join(ARCHES)}")
    if shutil.which("pip") is None and not _has_pip():
        parser.error("pip is missing for this Python")
    try:
        print(build(args.python_version, args.arch, args.out))
    except subprocess.CalledProcessError as err:
        sys.stderr.write(f"bundle.py: error: {' '.join(map(str, err.cmd[:5]))} … failed "
                         f"(exit {err.returncode})\n")
        return 1
    return 0


def _has_pip() -> bool:
    return subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True,
                          check=False).returncode == 0


if __name__ == "__main__":
    sys.exit(main())
