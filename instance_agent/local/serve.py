"""Starting and stopping the local stand-ins, written once.

- `ServerThread`: a socketserver (http.server's or werkzeug's) on 127.0.0.1, port 0 by
  default, served by a daemon thread; the IMDS stub, the moto server and the tests' fault
  proxy run on it.
- `stop_process`, `wait_until`, `tail`: a server (or daemon) in a child process, such as
  SeaweedFS in the tests or the watcher in the demo: wait for it to be ready, read the end of
  its log when it is not, and stop it without leaving it behind.
- `Background`: the `with` statement for anything with `start()` and `stop()`.
"""

from __future__ import annotations

import os
import signal
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

B = TypeVar("B", bound="Background")

# How often serve_forever checks for stop(): short, so that tests don't wait on teardown.
POLL_SECONDS = 0.05
LOG_TAIL_CHARS = 2000


class Background:
    """`with server:` starts it and always stops it. Subclasses define start() and stop()."""

    def start(self) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self: B) -> B:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class ServerThread(Background):
    """`make(host, port)` returns a bound, unstarted socketserver; a daemon thread serves it.

    `stopping` is set when stop() begins, so request handlers that hold a request (a
    simulated slow service) can give up at once instead of delaying the shutdown."""

    def __init__(
        self,
        make: Callable[[str, int], socketserver.BaseServer],
        *,
        name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        poll_interval: float = POLL_SECONDS,
    ) -> None:
        self._make = make
        self._name = name
        self._host = host
        self._port = port
        self._poll_interval = poll_interval
        self._server: socketserver.BaseServer | None = None
        self._thread: threading.Thread | None = None
        self.stopping = threading.Event()

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> str:
        """Bind, serve in the background, and return the endpoint `http://HOST:PORT`.
        The socket is listening on return, so the endpoint answers at once."""
        if self._server is not None:
            return self.endpoint
        self.stopping.clear()
        server = self._make(self._host, self._port)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(self._poll_interval,), name=self._name, daemon=True
        )
        self._thread.start()
        return self.endpoint

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError(f"{self._name} is not started")
        address = self._server.server_address
        if not isinstance(address, tuple):  # only AF_UNIX servers have a str address
            raise RuntimeError(f"{self._name} does not listen on TCP")
        return f"http://{address[0]!s}:{address[1]}"

    def stop(self) -> None:
        """Stop accepting, wait for the serving loop to end, and close the listening socket."""
        server, self._server = self._server, None
        if server is None:
            return
        self.stopping.set()
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def tail(path: str | os.PathLike[str], chars: int | None = LOG_TAIL_CHARS) -> str:
    """The end of a log file (all of it with chars=None) for a message; "" if unreadable."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return text if chars is None else text[-chars:]


def stop_process(process: subprocess.Popen[Any], timeout: float, *, group: bool = False) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `timeout` s. With `group`, signal
    its whole process group (started with start_new_session=True), so its children go too."""

    def send(sig: signal.Signals) -> None:
        try:
            if group:
                os.killpg(process.pid, sig)
            else:
                process.send_signal(sig)
        except ProcessLookupError:
            pass  # already gone

    if process.poll() is None:
        send(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
    process.wait(timeout=timeout)
