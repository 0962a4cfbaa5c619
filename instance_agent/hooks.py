"""Pre- and post-commands: operator shell commands run around the backup, each bounded.

A command runs as `/bin/sh -c CMD` in its own session, so a timeout (or the watcher's stop
grace running out) kills its whole process group, not just the shell. Its stdout and stderr
go to one temporary file rather than a pipe: a chatty command can never block on a full
pipe, and memory stays flat whatever it prints. Only the tail is kept (that is where a
failure explains itself); it goes to the log and into the result object under "commands".

Running a command never raises: a command that cannot start is a failed command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from instance_agent.logs import fields
from instance_agent.sdnotify import child_environment

log = logging.getLogger(__name__)

# Enough for an error message or a stack trace's last lines; 20 commands of this still fit
# easily in SNS's 256 KiB message (docs/aws-behaviour.md, "SNS, CloudWatch and Lambda").
OUTPUT_LIMIT = 2048
KILL_GRACE = 2.0  # SIGTERM, then this long before SIGKILL
CANCEL_CHECK = 0.1  # how often a running command looks at the cancel event
SHELL = "/bin/sh"


@dataclass
class CommandRecord:
    phase: str  # "pre" or "post"
    command: str
    exit_code: int | None  # None: did not start, or was killed
    timed_out: bool
    duration_s: float
    output: str  # the last OUTPUT_LIMIT bytes of stdout+stderr
    output_truncated: bool
    error: str | None = None  # why it did not finish by itself

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run(
    command: str,
    phase: str,
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cancel: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> CommandRecord:
    """Run one command to completion, timeout or cancel; log and return its record.

    `env` adds variables to this process's environment (minus the sd_notify ones)."""
    started = clock()
    if cancel is not None and cancel.is_set():
        record = CommandRecord(
            phase, command, None, False, 0.0, "", False, error="skipped: the agent is stopping"
        )
        _log(record)
        return record
    child_env = child_environment()
    # The SSM document passes the lifecycle token in our environment (never argv); the
    # commands have no business with it.
    child_env.pop("INSTANCE_AGENT_LIFECYCLE_TOKEN", None)
    child_env.update(env or {})
    child_env["INSTANCE_AGENT_PHASE"] = phase
    try:
        with tempfile.TemporaryFile() as out:
            proc = subprocess.Popen(
                [SHELL, "-c", command],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env,
                start_new_session=True,
                close_fds=True,
            )
            ended = _wait(proc, started + timeout, cancel, clock)
            output, truncated = _tail(out)
    except OSError as err:  # no temp file, no /bin/sh, no fork: a failed command
        record = CommandRecord(
            phase,
            command,
            None,
            False,
            round(clock() - started, 3),
            "",
            False,
            error=f"could not run: {err.strerror or err}",
        )
        _log(record)
        return record
    code = proc.returncode if ended == "exited" else None
    error = {
        "exited": None,
        "timeout": f"timed out after {timeout:g} s",
        "cancelled": "cancelled: the agent is stopping",
    }[ended]
    if code is not None and code < 0:
        error = f"killed by {signal.Signals(-code).name}"
    record = CommandRecord(
        phase, command, code, ended == "timeout", round(clock() - started, 3), output, truncated, error=error
    )
    _log(record)
    return record


def run_all(
    commands: Sequence[str],
    phase: str,
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cancel: threading.Event | None = None,
) -> list[CommandRecord]:
    """Each command in order; a failure does not stop the next (the caller decides)."""
    return [run(c, phase, timeout=timeout, env=env, cancel=cancel) for c in commands]


def _wait(
    proc: subprocess.Popen[bytes], deadline: float, cancel: threading.Event | None, clock: Callable[[], float]
) -> str:
    """Wait for the command: "exited", or "timeout"/"cancelled" after killing its group."""
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            _kill_group(proc)
            return "timeout"
        if cancel is not None and cancel.is_set():
            _kill_group(proc)
            return "cancelled"
        step = remaining if cancel is None else min(remaining, CANCEL_CHECK)
        try:
            proc.wait(timeout=step)
            return "exited"
        except subprocess.TimeoutExpired:
            continue


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, grace in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, KILL_GRACE)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(out: Any) -> tuple[str, bool]:
    size = out.seek(0, os.SEEK_END)
    out.seek(max(0, size - OUTPUT_LIMIT))
    data: bytes = out.read()
    return data.decode("utf-8", "replace"), size > OUTPUT_LIMIT


def _log(record: CommandRecord) -> None:
    level = logging.INFO if record.ok else logging.WARNING
    log.log(
        level,
        f"{record.phase}-command " + ("succeeded" if record.ok else "failed"),
        extra=fields(
            command=record.command,
            exit_code=record.exit_code,
            duration_s=record.duration_s,
            error=record.error,
            output=record.output.strip() or None,
            output_truncated=record.output_truncated or None,
        ),
    )
