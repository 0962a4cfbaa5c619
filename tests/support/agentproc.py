"""An agent subprocess whose JSON log lines are collected, and the helpers the watcher and
lifecycle tests share."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from conftest import AGENT, Stack

POLL = 0.5  # the shortest interval the CLI accepts: fast tests, same code path


class WatchProc:
    """`instance-agent watch` (or any agent command) as a subprocess whose JSON log lines
    on stderr are collected, with the time each arrived, by a reader thread."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.records: list[tuple[float, dict[str, Any]]] = []
        self.eof = False
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            now = time.monotonic()
            try:
                rec = json.loads(line)
            except ValueError:
                rec = {"msg": line.rstrip("\n"), "level": "raw"}
            with self._cond:
                self.records.append((now, rec))
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    def find(self, msg: str, **match: Any) -> list[tuple[float, dict[str, Any]]]:
        with self._cond:
            return [
                (t, r)
                for t, r in self.records
                if r.get("msg") == msg and all(r.get(k) == v for k, v in match.items())
            ]

    def wait_for(self, msg: str, timeout: float = 20.0, **match: Any) -> tuple[float, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, rec in self.records:
                    if rec.get("msg") == msg and all(rec.get(k) == v for k, v in match.items()):
                        return t, rec
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.eof:
                    break
                self._cond.wait(remaining)
        raise AssertionError(f"no log line {msg!r} {match} within {timeout} s:\n{self.text()}")

    def text(self) -> str:
        with self._cond:
            return "\n".join(json.dumps(r) for _, r in self.records)[-6000:]

    def lines(self) -> int:
        with self._cond:
            return len(self.records)

    def send(self, sig: int) -> float:
        self.proc.send_signal(sig)
        return time.monotonic()

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def stdout(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.read()

    def __enter__(self) -> WatchProc:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reader.join(timeout=5)


def watch_argv(stack: Stack, *args: str, poll: float = POLL, heartbeat: float | None = 0.5) -> list[str]:
    """`instance-agent watch` on the stack's bucket and topic, polling fast; heartbeats every
    `heartbeat` s (None: the config's)."""
    beat = ["--heartbeat-interval", str(heartbeat)] if heartbeat is not None else []
    return [
        *AGENT,
        "watch",
        "--bucket",
        stack.bucket,
        "--topic-arn",
        stack.topic_arn,
        "--poll-interval",
        str(poll),
        *beat,
        *args,
    ]


def watch(stack: Stack, *args: str, env: dict[str, str] | None = None, poll: float = POLL) -> WatchProc:
    return WatchProc(watch_argv(stack, *args, poll=poll), env or stack.env(INSTANCE_AGENT_LOG_LEVEL="info"))


def source_tree(root: Path, size: int = 256 * 1024) -> Path:
    (root / "app").mkdir(parents=True)
    (root / "app" / "app.log").write_bytes(b"GET /health 200\n" * (size // 16))
    (root / "app" / "random.bin").write_bytes(os.urandom(size))
    (root / "empty").mkdir()
    (root / "syslog").write_text("boot ok\n")
    return root


def archives(stack: Stack) -> list[str]:
    return sorted(k for k in stack.objects() if k.endswith(".tar.zst"))


def completions(stack: Stack) -> list[tuple[str | None, str]]:
    return [(c.result, c.outcome) for c in stack.lifecycle_calls("CompleteLifecycleAction")]


def sns_docs(stack: Stack) -> list[dict[str, Any]]:
    return [json.loads(m["message"]) for m in stack.sns()]
