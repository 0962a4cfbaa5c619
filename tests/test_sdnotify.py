"""sd_notify from `instance-agent watch` (a subprocess) to a real unix datagram socket, bound
as a filesystem path and as an abstract `@` socket, the two forms systemd hands out."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Stack
from support.faultproxy import Delay, FaultProxy, Rule, upload_part
from test_watch import watch

from instance_agent.sdnotify import Notifier, socket_address, watchdog_interval

WATCHDOG_USEC = 400_000  # WATCHDOG=1 every 0.2 s


class Receiver:
    """A bound AF_UNIX datagram socket that records every message with its arrival time."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value
        self.messages: list[tuple[float, list[str]]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            with self._lock:
                self.messages.append((time.monotonic(), data.decode().split("\n")))

    def assignments(self, start: float = 0.0, end: float = float("inf")) -> list[str]:
        with self._lock:
            return [a for t, lines in self.messages if start <= t <= end for a in lines]

    def first(self, assignment: str) -> float | None:
        with self._lock:
            return next((t for t, lines in self.messages if assignment in lines), None)

    def wait_for(self, assignment: str, timeout: float = 20.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.first(assignment)
            if found is not None:
                return found
            time.sleep(0.02)
        raise AssertionError(f"no {assignment} within {timeout} s: {self.assignments()}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Receiver]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        sock.bind(path)
        value = path
    else:
        name = f"instance-agent-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)  # the kernel's abstract name; systemd writes it with '@'
        value = "@" + name
    rx = Receiver(sock, value)
    yield rx
    rx.close()


def test_watch_notifies_ready_status_watchdog_stopping(
    stack: Stack, receiver: Receiver, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.bin").write_bytes(os.urandom(24 * 1024 * 1024))  # 3 parts of 8 MiB
    stack.imds.fail_status = 500  # IMDS not answering yet: no READY=1
    with FaultProxy(stack.s3_endpoint) as proxy:
        proxy.add_rule(Rule(query=upload_part, fault=Delay(1.0)))
        env = stack.env(
            NOTIFY_SOCKET=receiver.env_value,
            WATCHDOG_USEC=str(WATCHDOG_USEC),
            AWS_ENDPOINT_URL_S3=proxy.endpoint,
            INSTANCE_AGENT_LOG_LEVEL="info",
        )
        with watch(
            stack, "--source", str(src), "--compression", "none", "--upload-workers", "1", env=env
        ) as w:
            receiver.wait_for("WATCHDOG=1")
            time.sleep(1.0)
            assert receiver.first("READY=1") is None, "READY=1 before IMDS answered"
            stack.imds.fail_status = None
            ready = receiver.wait_for("READY=1")
            assert "STATUS=watching" in receiver.assignments()

            stack.scale_in()
            started, _ = w.wait_for("backup started")
            finished, done = w.wait_for("response finished", timeout=60)
            assert done["status"] == "succeeded"
            assert finished - started >= 2.0  # three parts at 1 s each: a slow backup
            # The main loop kept pinging through the whole backup, not just before it.
            during = receiver.assignments(started, finished)
            assert during.count("WATCHDOG=1") >= int((finished - started) / 0.2) - 3, during

            sent = w.send(signal.SIGTERM)
            assert w.wait(5) == 0
            stopping = receiver.wait_for("STOPPING=1", timeout=2)
    assert ready < started < stopping and stopping >= sent
    statuses = [a[len("STATUS=") :] for a in receiver.assignments() if a.startswith("STATUS=")]
    for expected in ("watching", "backing up (termination)", "backing up", "completing"):
        assert expected in statuses, statuses
    assert statuses.index("backing up (termination)") < statuses.index("completing")
    assert statuses[-1] == "stopping"


def test_notifier_is_a_no_op_without_notify_socket() -> None:
    quiet = Notifier({})
    assert not quiet.enabled
    assert quiet.ready() is False and quiet.watchdog() is False and quiet.stopping() is False


def test_notify_socket_forms_and_watchdog_interval() -> None:
    assert socket_address("@name") == "\0name"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("") is None and socket_address("vsock:2:1234") is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({}) is None
    mine = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": mine}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
