"""A local instance metadata service (IMDS) that enforces the IMDSv2 token rules.

Tests and the demo point the agent at it through `AWS_EC2_METADATA_SERVICE_ENDPOINT`. It
answers the handful of paths the agent reads and refuses everything IMDSv2 refuses, so a
client that would fall back to IMDSv1, forget the token, or keep an expired one fails here
the way it would on an instance (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/instance-metadata-v2-how-it-works.html;
docs/aws-behaviour.md, "Instance metadata (IMDS)").

Run it standalone with `python -m instance_agent.local.imds --port 8080`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import secrets
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Generic, NamedTuple, TypeVar, cast, overload
from urllib.parse import unquote, urlsplit

from instance_agent.local.serve import Background, ServerThread

TOKEN_PATH = "/latest/api/token"  # noqa: S105 (a URL path, not a secret)
METADATA_PREFIX = "/latest/meta-data/"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105 (a header name)
MAX_TTL_SECONDS = 21600  # 6 h: the largest TTL IMDS accepts
GROUP_TAG = "aws:autoscaling:groupName"
# Enough for any test's assertions while keeping a long demo run's memory flat.
REQUEST_LOG_LIMIT = 10_000
# Idle keep-alive connections are dropped after this long so handler threads don't pile up.
CONNECTION_IDLE_SECONDS = 30.0

T = TypeVar("T")


class _Guarded(Generic[T]):
    """A public attribute whose reads and writes hold the stub's lock.

    Values are shallow-copied both ways, so a dict can't change under a request that is
    reading it. To change one, assign a new value: `stub.tags = {...}`.
    """

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self._slot = f"_guarded_{name}"

    @overload
    def __get__(self, obj: None, objtype: type[Any] | None = None) -> _Guarded[T]: ...

    @overload
    def __get__(self, obj: IMDSStub, objtype: type[Any] | None = None) -> T: ...

    def __get__(self, obj: IMDSStub | None, objtype: type[Any] | None = None) -> T | _Guarded[T]:
        if obj is None:
            return self
        with obj._lock:
            return cast(T, copy.copy(getattr(obj, self._slot)))

    def __set__(self, obj: IMDSStub, value: T) -> None:
        with obj._lock:
            setattr(obj, self._slot, copy.copy(value))


class _Reply(NamedTuple):
    status: int
    body: str = ""
    content_type: str = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()


class IMDSStub(Background):
    """IMDSv2 on 127.0.0.1: token PUT, token-checked GETs, settable answers and counters.

    Set the public attributes at any time; each request reads them once. `fail_status`
    makes every token-checked GET answer that status; `delay` holds every answer back
    (a slow or black-holed IMDS). Counters: `token_puts` (every PUT), `metadata_gets`
    (every GET), `tokenless_reads` (GETs without a token, i.e. IMDSv1 attempts).
    """

    instance_id = _Guarded[str]()
    region = _Guarded[str]()
    availability_zone = _Guarded[str]()
    target_lifecycle_state = _Guarded[str | None]()
    spot_action = _Guarded[dict[str, Any] | None]()
    rebalance = _Guarded[dict[str, Any] | None]()
    tags = _Guarded[dict[str, str] | None]()
    fail_status = _Guarded[int | None]()
    delay = _Guarded[float]()

    def __init__(
        self,
        *,
        instance_id: str = "i-0123456789abcdef0",
        region: str = "us-east-1",
        availability_zone: str | None = None,
        target_lifecycle_state: str | None = None,
        tags: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.RLock()
        self.instance_id = instance_id
        self.region = region
        self.availability_zone = availability_zone or f"{region}a"
        self.target_lifecycle_state = target_lifecycle_state
        self.spot_action = None
        self.rebalance = None
        self.tags = tags
        self.fail_status = None
        self.delay = 0.0
        self.tokenless_reads = 0
        self.token_puts = 0
        self.metadata_gets = 0
        self._clock = clock
        self._tokens: dict[str, float] = {}
        self._issued: list[str] = []
        self._requests: deque[tuple[str, str, int]] = deque(maxlen=REQUEST_LOG_LIMIT)
        self._connections: set[socket.socket] = set()
        self._serving = ServerThread(self._make_server, name="imds-stub", host=host, port=port)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> str:
        """Start serving in a daemon thread; return the endpoint `http://127.0.0.1:PORT`."""
        return self._serving.start()

    def _make_server(self, host: str, port: int) -> _Server:
        server = _Server((host, port), _Handler)
        server.stub = self
        return server

    @property
    def endpoint(self) -> str:
        return self._serving.endpoint

    def stop(self) -> None:
        """Stop serving and drop every open connection (pooled clients see a reset)."""
        if not self._serving.running:
            return
        self._serving.stop()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    # -- test helpers ------------------------------------------------------------------

    def set_lifecycle_state(self, state: str | None) -> None:
        """What `autoscaling/target-lifecycle-state` answers; None means 404."""
        self.target_lifecycle_state = state

    def expire_tokens(self) -> None:
        """Invalidate every token issued so far: the next read with one gets 401."""
        with self._lock:
            self._tokens.clear()

    @property
    def issued_tokens(self) -> list[str]:
        with self._lock:
            return list(self._issued)

    @property
    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of the latest requests, oldest first."""
        with self._lock:
            return list(self._requests)

    # -- request handling (called from handler threads) --------------------------------

    def _wait_delay(self) -> bool:
        """Sleep for `delay`; False when the stub is stopping meanwhile."""
        delay = self.delay
        if delay > 0:
            return not self._serving.stopping.wait(delay)
        return not self._serving.stopping.is_set()

    def _answer(self, method: str, target: str, headers: Callable[[str], str | None]) -> _Reply:
        path = unquote(urlsplit(target).path)
        if method == "PUT":
            reply = self._put(path, headers)
        elif method == "GET":
            reply = self._get(path, headers)
        else:
            reply = _Reply(405)
        with self._lock:
            self._requests.append((method, target, reply.status))
        return reply

    def _put(self, path: str, headers: Callable[[str], str | None]) -> _Reply:
        with self._lock:
            self.token_puts += 1
        # IMDS refuses a PUT that went through a proxy, and a token PUT on a versioned path.
        if headers("X-Forwarded-For") is not None or path != TOKEN_PATH:
            return _Reply(403)
        ttl = _parse_ttl(headers(TTL_HEADER))
        if ttl is None:
            return _Reply(400)
        token = secrets.token_urlsafe(42)
        with self._lock:
            self._tokens[token] = self._clock() + ttl
            self._issued.append(token)
        return _Reply(200, token, headers=((TTL_HEADER, str(ttl)),))

    def _get(self, path: str, headers: Callable[[str], str | None]) -> _Reply:
        token = headers(TOKEN_HEADER)
        with self._lock:
            self.metadata_gets += 1
            if token is None:
                self.tokenless_reads += 1
                return _Reply(401)
            expiry = self._tokens.get(token)
            if expiry is None or expiry <= self._clock():
                self._tokens.pop(token, None)
                return _Reply(401)
        fail_status = self.fail_status
        if fail_status is not None:
            return _Reply(fail_status)
        if not path.startswith(METADATA_PREFIX):
            return _Reply(404)
        return self._metadata(path[len(METADATA_PREFIX) :].rstrip("/"))

    def _metadata(self, key: str) -> _Reply:
        if key == "instance-id":
            return _Reply(200, self.instance_id)
        if key == "placement/region":
            return _Reply(200, self.region)
        if key == "placement/availability-zone":
            return _Reply(200, self.availability_zone)
        if key == "autoscaling/target-lifecycle-state":
            return _text_or_404(self.target_lifecycle_state)
        if key == "spot/instance-action":
            return _json_or_404(self.spot_action)
        if key == "events/recommendations/rebalance":
            return _json_or_404(self.rebalance)
        tags = self.tags
        if key == "tags/instance" and tags is not None:
            return _Reply(200, "\n".join(tags))
        if key.startswith("tags/instance/") and tags is not None:
            return _text_or_404(tags.get(key[len("tags/instance/") :]))
        return _Reply(404)


def _parse_ttl(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    ttl = int(value)
    return ttl if 1 <= ttl <= MAX_TTL_SECONDS else None


def _text_or_404(value: str | None) -> _Reply:
    return _Reply(404) if value is None else _Reply(200, value)


def _json_or_404(value: dict[str, Any] | None) -> _Reply:
    if value is None:
        return _Reply(404)
    return _Reply(200, json.dumps(value), content_type="application/json")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    stub: IMDSStub


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Without TCP_NODELAY each keep-alive answer waits ~40 ms for a delayed ACK.
    disable_nagle_algorithm = True
    server_version = "EC2ws"
    sys_version = ""
    timeout = CONNECTION_IDLE_SECONDS

    @property
    def _stub(self) -> IMDSStub:
        return cast(_Server, self.server).stub

    def setup(self) -> None:
        super().setup()
        with self._stub._lock:
            self._stub._connections.add(self.connection)

    def finish(self) -> None:
        with self._stub._lock:
            self._stub._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the stub must never write to the terminal."""

    def _handle(self) -> None:
        length = self.headers.get("Content-Length")
        if length and length.isdigit():
            self.rfile.read(int(length))
        stub = self._stub
        if not stub._wait_delay():
            self.close_connection = True
            return
        reply = stub._answer(self.command, self.path, self.headers.get)
        body = reply.body.encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _handle


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m instance_agent.local.imds",
        description="Serve a local IMDSv2 stand-in until interrupted.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--instance-id", default="i-0123456789abcdef0")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--availability-zone")
    parser.add_argument("--target-lifecycle-state")
    parser.add_argument("--group", help="value of the aws:autoscaling:groupName tag")
    args = parser.parse_args(argv)

    stub = IMDSStub(
        instance_id=args.instance_id,
        region=args.region,
        availability_zone=args.availability_zone,
        target_lifecycle_state=args.target_lifecycle_state,
        tags={GROUP_TAG: args.group} if args.group else None,
        host=args.host,
        port=args.port,
    )
    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    with stub:
        # The endpoint is the command's one line of output, for scripts to read.
        print(stub.endpoint, flush=True)
        done.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
