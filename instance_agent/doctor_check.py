"""What every `doctor` check shares: what it may use (`Context`), what it returns (`Check`,
with the `Facts` it found for the checks after it), and the four results.

A check is a function `(Context, Facts) -> Check | tuple[Check, ...] | None`: it reads the
facts the earlier checks found and returns its lines, each carrying the facts it found;
doctor.py's runner composes them. No check sees the report or another check's lines.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Protocol

from instance_agent.imds import DEFAULT_ENDPOINT, IMDS, ProbeAnswer

if TYPE_CHECKING:
    from instance_agent.config import Config
    from instance_agent.lifecycle import HookTarget

# WARN: works here, but something worth knowing is missing; it does not fail doctor.
OK, FAIL, SKIP, WARN = "ok", "fail", "skip", "warn"
SYMBOLS = {OK: "✓", FAIL: "✗", SKIP: "–", WARN: "!"}


@dataclass(frozen=True)
class Facts:
    """What the checks found, for the checks after them; None: not found (yet)."""

    imds_endpoint: str | None = None
    imds_ok: bool | None = None
    instance_id: str | None = None
    region: str | None = None
    target: HookTarget | None = None  # the terminating hook, once found
    state: str | None = None  # the instance's lifecycle state

    def merged(self, found: Facts) -> Facts:
        """These facts, with what `found` found (each fact is found by one check)."""
        new = {f.name: getattr(found, f.name) for f in fields(found) if getattr(found, f.name) is not None}
        return replace(self, **new) if new else self

    @property
    def on_ec2(self) -> bool:
        return bool(self.imds_ok) and self.imds_endpoint == DEFAULT_ENDPOINT

    def not_ec2(self) -> str:
        """Why a check that needs an EC2 instance is skipped."""
        if self.imds_ok:
            return f"not an EC2 instance: IMDS at {self.imds_endpoint} is a stand-in"
        return "not on an EC2 instance, as far as IMDS can tell (see imds)"


@dataclass(frozen=True)
class Check:
    """One line of the report, and the facts its check found."""

    name: str
    result: str  # ok | fail | skip | warn
    message: str
    fix: str | None = None
    facts: Facts = Facts()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "result": self.result,
            "symbol": SYMBOLS[self.result],
            "message": self.message,
            "fix": self.fix,
        }


class MetadataClient(Protocol):
    """The part of imds.IMDS that doctor uses."""

    endpoint: str

    def probe(self, *, ttl: int = ..., path: str = ...) -> ProbeAnswer: ...
    def instance_id(self, timeout: float = ...) -> str: ...
    def region(self, timeout: float = ...) -> str: ...
    def close(self) -> None: ...


def run_systemctl(args: list[str]) -> tuple[int, str]:
    try:
        proc = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return 1, str(err)
    return proc.returncode, proc.stdout.strip()


def systemd_booted() -> bool:
    """sd_booted(): systemd is PID 1 exactly when this directory exists."""
    return os.path.isdir("/run/systemd/system")


@dataclass(frozen=True)
class Context:
    """What the checks may use: the config and flags, and the seams to the world."""

    cfg: Config
    clients: Callable[[str], Any]  # the AWS clients for a region (made once by the runner)
    config_error: str | None = None  # why the config did not load (then cfg is the defaults)
    publish_test: bool = False
    launch: bool = False  # --launch: the launching hook's gate
    imds: Callable[[str], MetadataClient] = IMDS  # a client of the IMDS at an endpoint
    systemctl: Callable[[list[str]], tuple[int, str]] = run_systemctl
    booted: Callable[[], bool] = systemd_booted
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    now: Callable[[], float] = time.time  # wall clock, for the status file's times
    monotonic: Callable[[], float] = time.monotonic


# What a check returns: one line, several, or none (a check said only when it matters).
Found = Check | tuple[Check, ...] | None
