"""The watcher's status file, and `instance-agent status`, which reads it.

The watcher writes `watch-status.json` into its runtime directory (`/run/instance-agent`:
status is volatile and belongs on tmpfs), or into the state directory when the runtime
directory is unusable; `status_path(cfg)` picks it. `write_status(path, **fields)` merges the
given fields into the file and rewrites it atomically, so each caller states only what it
knows. The file is one JSON object:

    format        1
    pid           the watcher's process id (set by write_status)
    agent_version set by write_status
    started_at    the first write by this pid
    updated_at    every write: the heartbeat `status` judges liveness by
    poll_interval seconds between IMDS polls
    last_poll     the last IMDS poll round
    imds_state    the last target-lifecycle-state answer ("none" for a 404)
    stage         what the watcher is doing: "watching", "backing up", …
    last_backup   {status, bucket, key, manifest_key, error, exit_code, trigger, at}

Times are ISO 8601 in UTC. Callers may pass epoch seconds (`time.time()`) or datetimes for
`started_at`, `updated_at`, `last_poll` and `last_backup.at`; they are stored as text.

A receiver's last adoption of a state hand-off (`handoff-adoption.json` in the state
directory: {key, source, adopter, dest, files, bytes, generation, at}) is written by
whichever command adopted (Run Command's `adopt`, the watcher's scan, the launch gate), so
`status` shows it whatever the path (`write_adoption`, `last_adoption`).

`status` also shows the newest exactly-once record (`termination-<instance>.json`, see
once.py), which either trigger path writes, so it tells what happened even when the backup
came through Run Command.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from instance_agent import __version__, statedir
from instance_agent.config import Config
from instance_agent.errors import AgentError
from instance_agent.logs import fields as log_fields

log = logging.getLogger(__name__)

STATUS_FILE = "watch-status.json"
FORMAT = 1
# A live watcher writes at least once a poll round. Rounds can stretch to the poller's 20 s
# error backoff plus three 3 s IMDS timeouts; two minutes leaves room for a loaded host.
STALE_AFTER = 120.0
TIME_KEYS = frozenset({"started_at", "updated_at", "last_poll", "at"})


class WatcherNotRunning(AgentError):
    """`status` found no live watcher."""


_lock = threading.Lock()  # the poller and the job thread may both write
_warned: set[str] = set()


def _iso(value: float | datetime) -> str:
    when = value if isinstance(value, datetime) else datetime.fromtimestamp(value, timezone.utc)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def _normal(key: str, value: Any) -> Any:
    if key in TIME_KEYS and isinstance(value, (int, float, datetime)) and not isinstance(value, bool):
        return _iso(value)
    if isinstance(value, Mapping):
        return {k: _normal(k, v) for k, v in value.items()}
    return value


def status_path(cfg: Config) -> str:
    """Where the watcher writes its status: the runtime dir, else the state dir."""
    for directory in (cfg.runtime_dir, cfg.state_dir):
        try:
            # Ours alone, or another user could plant the file as a symlink (statedir.py).
            statedir.usable(directory, mode=0o755)
        except OSError:
            continue
        if os.access(directory, os.W_OK | os.X_OK):
            return os.path.join(directory, STATUS_FILE)
    return os.path.join(cfg.runtime_dir, STATUS_FILE)


def _read(path: str) -> dict[str, Any] | None:
    try:
        doc = json.loads(statedir.read(os.path.dirname(path), os.path.basename(path)))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def write_status(path: str, **fields: Any) -> bool:
    """Merge `fields` into the status file at `path` and stamp `updated_at`.

    Never raises: status is for operators, and must not stop a backup. A failure is logged
    once per path and returns False."""
    now = time.time()
    with _lock:
        doc = _read(path)
        if doc is None or doc.get("pid") != os.getpid():
            # A new watcher process starts a fresh file; nothing carries over from the last.
            doc = {
                "format": FORMAT,
                "pid": os.getpid(),
                "agent_version": __version__,
                "started_at": _iso(now),
            }
        doc.update({k: _normal(k, v) for k, v in fields.items()})
        doc["updated_at"] = _iso(now)
        try:
            statedir.write_atomic(
                os.path.dirname(path), os.path.basename(path), json.dumps(doc, default=str).encode(), 0o644
            )
        except OSError as err:
            if path not in _warned:
                _warned.add(path)
                log.warning(
                    "cannot write the status file; `instance-agent status` will not see this watcher",
                    extra=log_fields(path=path, error=err.strerror),
                )
            return False
    return True


SHIPPING_OFF = {
    "enabled": False,
    "pending_files": 0,
    "pending_bytes": 0,
    "shipped_files": 0,
    "shipped_bytes": 0,
    "last_error": None,
    "state": None,  # running | restarting (after an unexpected error, with backoff)
    "watch": None,  # inotify | scan (inotify could not start)
    "restarts": 0,
    "stalled_since": None,
}


def shipping_block(doc: Mapping[str, Any] | None) -> dict[str, Any]:
    """`status --json`'s `shipping`: what the watcher's shipper last wrote, else "off"."""
    block = (doc or {}).get("shipping")
    if not isinstance(block, Mapping):
        return dict(SHIPPING_OFF)
    return {k: block.get(k, v) for k, v in SHIPPING_OFF.items()}


def backup_summary(
    result: Mapping[str, Any] | None, exit_code: int | None, trigger: str | None = None
) -> dict[str, Any]:
    """The `last_backup` value for a finished backup's result object."""
    res = result or {}
    return {
        "status": res.get("status", "failed" if exit_code else None),
        "bucket": res.get("bucket"),
        "key": res.get("key"),
        "manifest_key": res.get("manifest_key"),
        "error": res.get("error"),
        "exit_code": exit_code,
        "trigger": trigger,
        "at": time.time(),
    }


# --- reading ----------------------------------------------------------------------------


def _parse_time(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def find_status(dirs: Sequence[str]) -> tuple[str, dict[str, Any]] | None:
    """The freshest status file among `dirs`."""
    found = []
    for directory in dirs:
        path = os.path.join(directory, STATUS_FILE)
        doc = _read(path)
        if doc is not None:
            found.append((_parse_time(doc.get("updated_at")) or 0.0, path, doc))
    if not found:
        return None
    _, path, doc = max(found, key=lambda f: f[0])
    return path, doc


def latest_record(dirs: Sequence[str]) -> dict[str, Any] | None:
    """The newest exactly-once record (`termination-*.json`) in `dirs`."""
    best: dict[str, Any] | None = None
    for directory in dirs:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if not (name.startswith("termination-") and name.endswith(".json")):
                continue
            doc = _read(os.path.join(directory, name))
            if doc is None or not isinstance(doc.get("result"), dict):
                continue
            if best is None or float(doc.get("recorded_at", 0)) > float(best.get("recorded_at", 0)):
                best = doc
    return best


ADOPTION_FILE = "handoff-adoption.json"
_ADOPTION_KEYS = ("key", "source", "adopter", "dest", "files", "bytes", "generation")


def write_adoption(state_dir: str, result: Mapping[str, Any]) -> bool:
    """Record an adoption (the result of handoff_adopt.adopt); never raises."""
    doc = {k: result.get(k) for k in _ADOPTION_KEYS} | {"at": _iso(time.time())}
    try:
        statedir.usable(state_dir)  # the state dir may be new on a receiver that never backed up
        statedir.write_atomic(state_dir, ADOPTION_FILE, json.dumps(doc).encode(), 0o644)
    except OSError as err:
        log.warning("cannot record the adoption for status", extra=log_fields(error=err.strerror))
        return False
    return True


def last_adoption(dirs: Sequence[str]) -> dict[str, Any] | None:
    """The last adoption recorded in any of `dirs` (the state directory holds it)."""
    for directory in dirs:
        doc = _read(os.path.join(directory, ADOPTION_FILE))
        if doc is not None and isinstance(doc.get("key"), str):
            return doc
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, and someone else's
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
    except OSError:
        return True  # no /proc to ask: kill(0) has to do
    # After a crash the pid may be recycled; a zombie has an empty command line.
    return b"instance" in cmdline


@dataclass(frozen=True)
class Assessment:
    running: bool
    reason: str


def assess(doc: Mapping[str, Any], now: float) -> Assessment:
    pid = doc.get("pid")
    updated = _parse_time(doc.get("updated_at"))
    age = f"{_ago(now - updated)} ago" if updated is not None else "at an unknown time"
    if not isinstance(pid, int) or not pid_alive(pid):
        return Assessment(False, f"not running: pid {pid} is gone (last update {age})")
    interval = doc.get("poll_interval")
    stale_after = max(STALE_AFTER, 5 * float(interval)) if isinstance(interval, (int, float)) else STALE_AFTER
    if updated is None or now - updated > stale_after:
        return Assessment(
            False,
            f"not responding: pid {pid} is alive but its last update was {age} (more than {stale_after:g} s)",
        )
    return Assessment(True, f"running (pid {pid}, last update {age})")


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _when(value: Any, now: float) -> str:
    t = _parse_time(value)
    if t is None:
        return "never"
    stamp = datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    return f"{stamp} ({_ago(now - t)} ago)"


def _backup_line(b: Mapping[str, Any], at: Any, now: float) -> str:
    where = f"s3://{b.get('bucket')}/{b.get('key')}" if b.get("key") else "no archive"
    text = f"{b.get('status')} at {_when(at, now)}: {where}"
    if b.get("error"):
        text += f" (error: {b.get('error')})"
    return text


def render(
    path: str | None,
    doc: Mapping[str, Any] | None,
    verdict: Assessment,
    record: Mapping[str, Any] | None,
    now: float,
    adoption: Mapping[str, Any] | None = None,
) -> str:
    lines = [f"watcher: {verdict.reason}"]
    if doc is not None:
        interval = doc.get("poll_interval")
        every = f"; every {interval:g} s" if isinstance(interval, (int, float)) else ""
        lines.append(f"started: {_when(doc.get('started_at'), now)}")
        lines.append(f"last poll: {_when(doc.get('last_poll'), now)}{every}")
        lines.append(f"IMDS target-lifecycle-state: {doc.get('imds_state') or 'not seen yet'}")
        if doc.get("stage"):
            lines.append(f"stage: {doc.get('stage')}")
        last = doc.get("last_backup")
        if isinstance(last, Mapping):
            trigger = f" [{last.get('trigger')}]" if last.get("trigger") else ""
            lines.append(f"last backup by the watcher{trigger}: {_backup_line(last, last.get('at'), now)}")
        else:
            lines.append("last backup by the watcher: none")
        kept = doc.get("retained")
        # retained.py: the instance waits for a backup to land
        if isinstance(kept, Mapping) and kept.get("event", "instance_retained") == "instance_retained":
            lines.append(
                f"retained (Terminating:Retained): {kept.get('attempts', 0)} backup retries, "
                f"last error: {kept.get('last_error') or 'none'}; next retry in "
                f"{kept.get('next_retry_in_s') or 0:g} s; gives up in {kept.get('give_up_in_s') or 0:g} s"
            )
    if record is not None:
        res = record.get("result", {})
        lines.append(
            f"termination backup (either trigger path): {_backup_line(res, record.get('recorded_at'), now)}"
        )
    if adoption is not None:
        lines.append(
            f"last hand-off adopted at {_when(adoption.get('at'), now)}: s3 key {adoption.get('key')} "
            f"from {adoption.get('source')}, {adoption.get('files')} files in {adoption.get('dest')}"
        )
    lines.append(f"status file: {path or 'none found'}")
    return "\n".join(lines) + "\n"
