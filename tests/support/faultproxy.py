"""A reverse proxy that injects faults between a client and one local upstream server.

Put it in front of SeaweedFS or moto and point the client at it. Requests are forwarded
byte for byte (the Host header too, so SigV4 signatures stay valid) unless a rule matches;
then the rule's fault applies instead: an error answer, a connection reset, latency, a
black hole, or a pause until the test sets an Event. Every request is logged.

Each connection serves one request and is closed ("Connection: close"); clients reconnect.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import random
import re
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

from instance_agent.local.serve import Background, ServerThread

Query = Mapping[str, list[str]]

CHUNK = 64 * 1024
# Query-API requests are small form posts; bodies up to this size are read to find Action.
FORM_PEEK_LIMIT = 1 << 20
LOG_LIMIT = 10_000
UPSTREAM_TIMEOUT = 60.0
LOGGED_HEADERS = (
    "content-length",
    "content-type",
    "content-encoding",
    "transfer-encoding",
    "x-amz-target",
    "x-amz-content-sha256",
    "x-amz-decoded-content-length",
    "x-amz-sdk-checksum-algorithm",
    "x-amz-expected-bucket-owner",
)
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding"}


# -- faults ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Respond:
    """Answer with this status and body; the upstream never sees the request."""

    status: int
    body: bytes = b""
    content_type: str = "application/xml"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Reset:
    """Read `after_bytes` of the request body, then reset the connection (TCP RST)."""

    after_bytes: int = 0


@dataclass(frozen=True)
class Delay:
    """Wait `seconds`, then forward as usual."""

    seconds: float


@dataclass(frozen=True)
class Hold:
    """Black hole: never answer; close the connection after `timeout` s or at stop."""

    timeout: float | None = None


@dataclass(frozen=True)
class HoldUntil:
    """Pause the request (body unread) until `event` is set, then forward it.

    After `timeout` s without the event the connection is closed unanswered."""

    event: threading.Event
    timeout: float | None = None


Fault = Respond | Reset | Delay | Hold | HoldUntil


def s3_error(status: int, code: str, message: str) -> Respond:
    """An S3 REST error document."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>faultproxy</RequestId></Error>"
    )
    return Respond(status, body.encode())


def internal_error() -> Respond:
    return s3_error(500, "InternalError", "We encountered an internal error. Please try again.")


def slow_down() -> Respond:
    return s3_error(503, "SlowDown", "Please reduce your request rate.")


def access_denied() -> Respond:
    return s3_error(403, "AccessDenied", "Access Denied")


def query_error(
    code: str = "Throttling", message: str = "Rate exceeded", status: int = 400, kind: str = "Sender"
) -> Respond:
    """A Query-API (Auto Scaling, SNS, EC2-style XML) error response."""
    body = (
        f"<ErrorResponse><Error><Type>{kind}</Type><Code>{code}</Code>"
        f"<Message>{message}</Message></Error><RequestId>x</RequestId></ErrorResponse>"
    )
    return Respond(status, body.encode(), content_type="text/xml")


def throttling() -> Respond:
    return query_error()


def upload_part(query: Query) -> bool:
    """Query predicate: the request is an S3 UploadPart (with PUT)."""
    return "partNumber" in query and "uploadId" in query


# -- rules -----------------------------------------------------------------------------


@dataclass(kw_only=True)
class Rule:
    """When a request matches every given criterion, apply `fault`.

    `path` is a substring of, or a compiled regex searched in, the path with its query
    string. `api_action` matches the Query-API `Action` (query or form body) or the JSON
    `X-Amz-Target` operation. The rule fires with `probability` (the proxy's seeded RNG),
    at most `times` times (None: always). `hits` counts firings; `fired` is set on the first.
    """

    fault: Fault
    method: str | None = None
    path: str | re.Pattern[str] | None = None
    query: Callable[[Query], bool] | None = None
    api_action: str | None = None
    probability: float = 1.0
    times: int | None = None
    name: str = ""
    hits: int = 0
    fired: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    def matches(self, method: str, target: str, query: Query, api_action: str | None) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        if isinstance(self.path, str) and self.path not in target:
            return False
        if isinstance(self.path, re.Pattern) and not self.path.search(target):
            return False
        if self.api_action is not None and self.api_action != api_action:
            return False
        return self.query is None or self.query(query)


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    api_action: str | None
    status: int | None  # None when no answer was sent (reset, hold, upstream failure)
    fault: str | None  # the fault's class name, e.g. "Respond"; None when forwarded as is
    rule: str | None

    @property
    def faulted(self) -> bool:
        return self.fault is not None


# -- the proxy -------------------------------------------------------------------------


class FaultProxy(Background):
    """A threaded HTTP/1.1 proxy on 127.0.0.1 in front of `upstream` (`http://host:port`)."""

    def __init__(self, upstream: str, *, seed: int = 0, host: str = "127.0.0.1", port: int = 0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream = (parts.hostname, parts.port)
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._log: deque[LoggedRequest] = deque(maxlen=LOG_LIMIT)
        self._serving = ServerThread(self._make_server, name="faultproxy", host=host, port=port)

    def add_rule(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule (the request log stays; see `clear_log`)."""
        with self._lock:
            self._rules.clear()

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    @property
    def requests(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._log)

    def start(self) -> str:
        """Start serving; return the proxy's endpoint `http://127.0.0.1:PORT`."""
        return self._serving.start()

    def _make_server(self, host: str, port: int) -> _Server:
        server = _Server((host, port), _Handler)
        server.proxy = self
        return server

    @property
    def endpoint(self) -> str:
        return self._serving.endpoint

    def stop(self) -> None:
        """Stop accepting; held requests are released and their connections closed."""
        self._serving.stop()

    def _choose(self, method: str, target: str, query: Query, api_action: str | None) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if not rule.matches(method, target, query, api_action):
                    continue
                if rule.probability < 1.0 and self._random.random() >= rule.probability:
                    continue
                rule.hits += 1
                rule.fired.set()
                return rule
        return None

    def _record(self, entry: LoggedRequest) -> None:
        with self._lock:
            self._log.append(entry)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: FaultProxy


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: tests read `FaultProxy.requests` instead."""

    def _serve(self) -> None:
        proxy = cast(_Server, self.server).proxy
        self.close_connection = True
        target = self.path
        query = parse_qs(urlsplit(target).query, keep_blank_values=True)
        length = _content_length(self.headers.get("Content-Length"))
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        body: bytes | None = None
        content_type = self.headers.get("Content-Type", "")
        if (
            content_type.startswith("application/x-www-form-urlencoded")
            and length is not None
            and length <= FORM_PEEK_LIMIT
        ):
            body = self.rfile.read(length)
        api_action = _api_action(self.headers.get("X-Amz-Target"), query, body)
        rule = proxy._choose(self.command, target, query, api_action)
        fault = rule.fault if rule is not None else None
        entry = LoggedRequest(
            method=self.command,
            path=urlsplit(target).path,
            query=query,
            headers={name: value for name in LOGGED_HEADERS if (value := self.headers.get(name)) is not None},
            api_action=api_action,
            status=None,
            fault=type(fault).__name__ if fault is not None else None,
            rule=(rule.name or None) if rule is not None else None,
        )
        self._logged = False

        def log(status: int | None) -> None:
            # Called before an answer leaves, so a client that has its answer finds it logged.
            if not self._logged:
                self._logged = True
                proxy._record(dataclasses.replace(entry, status=status))

        self._log_status = log
        try:
            self._apply(proxy, fault, target, body, length, chunked)
        except OSError:
            pass  # the client hung up; there is no one to answer
        finally:
            log(None)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _serve

    def _apply(
        self,
        proxy: FaultProxy,
        fault: Fault | None,
        target: str,
        body: bytes | None,
        length: int | None,
        chunked: bool,
    ) -> None:
        stopping = proxy._serving.stopping
        if isinstance(fault, Respond):
            if body is None:
                self._drain(length, chunked)
            self._answer(fault)
            return
        if isinstance(fault, Reset):
            if body is None and length and fault.after_bytes:
                self.rfile.read(min(length, fault.after_bytes))
            self._reset()
            return
        if isinstance(fault, Hold):
            stopping.wait(fault.timeout)
            return
        if isinstance(fault, HoldUntil) and not _wait_any(fault.event, stopping, fault.timeout):
            return
        if isinstance(fault, Delay):
            stopping.wait(fault.seconds)
        if not stopping.is_set():
            self._forward(proxy, target, body, length, chunked)

    def _forward(
        self,
        proxy: FaultProxy,
        target: str,
        body: bytes | None,
        length: int | None,
        chunked: bool,
    ) -> None:
        host, port = proxy.upstream
        upstream = http.client.HTTPConnection(host, port, timeout=UPSTREAM_TIMEOUT)
        try:
            try:
                upstream.putrequest(self.command, target, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    upstream.putheader(name, value)
                upstream.endheaders()
                if body is not None:
                    upstream.send(body)
                elif length:
                    self._copy_body(upstream.send, length)
                elif chunked:
                    self._copy_chunked(upstream.send)
                response = upstream.getresponse()
            except _ClientGone:
                return
            except OSError as err:
                self._answer(Respond(502, f"upstream failed: {err}".encode(), "text/plain"))
                return
            self._relay(response)
        finally:
            upstream.close()

    def _copy_body(self, send: Callable[[bytes], None], length: int) -> None:
        remaining = length
        while remaining:
            chunk = self.rfile.read(min(CHUNK, remaining))
            if not chunk:
                raise _ClientGone("client closed mid-body")
            send(chunk)
            remaining -= len(chunk)

    def _copy_chunked(self, send: Callable[[bytes], None]) -> None:
        """Relay a chunked body with its framing as received."""
        while True:
            size_line = self.rfile.readline()
            if not size_line:
                raise _ClientGone("client closed mid-body")
            send(size_line)
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                break
            self._copy_body(send, size + 2)  # data and its CRLF
        while True:  # trailers, then the empty line
            line = self.rfile.readline()
            send(line)
            if line in (b"\r\n", b"\n", b""):
                return

    def _relay(self, response: http.client.HTTPResponse) -> None:
        self.send_response_only(response.status, response.reason)
        rechunk = False
        for name, value in response.getheaders():
            lowered = name.lower()
            if lowered == "transfer-encoding" and "chunked" in value.lower():
                rechunk = True
            if lowered in _HOP_BY_HOP:
                continue
            self.send_header(name, value)
        if rechunk:
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self._log_status(response.status)
        self.end_headers()
        if self.command == "HEAD" or response.status in (204, 304):
            return
        while chunk := response.read1(CHUNK):
            if rechunk:
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            else:
                self.wfile.write(chunk)
        if rechunk:
            self.wfile.write(b"0\r\n\r\n")

    def _answer(self, fault: Respond) -> None:
        self.send_response(fault.status)
        self.send_header("Content-Type", fault.content_type)
        self.send_header("Content-Length", str(len(fault.body)))
        for name, value in fault.headers:
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self._log_status(fault.status)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(fault.body)

    def _drain(self, length: int | None, chunked: bool) -> None:
        """Read the request body so the client can read our answer."""
        with contextlib.suppress(OSError, ValueError):
            if length:
                self._copy_body(_discard, length)
            elif chunked:
                self._copy_chunked(_discard)

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout turns close() into a TCP RST.
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        for stream in (self.rfile, self.wfile):
            with contextlib.suppress(OSError):
                stream.close()
        with contextlib.suppress(OSError):
            self.connection.close()


class _ClientGone(ConnectionAbortedError):
    """The client closed its connection before sending the whole body."""


def _discard(data: bytes) -> None:
    pass


def _content_length(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def _api_action(target_header: str | None, query: Query, body: bytes | None) -> str | None:
    if target_header:
        return target_header.rsplit(".", 1)[-1]
    if "Action" in query:
        return query["Action"][0]
    if body:
        form = parse_qs(body.decode("utf-8", "replace"))
        if "Action" in form:
            return form["Action"][0]
    return None


def _wait_any(event: threading.Event, stopping: threading.Event, timeout: float | None) -> bool:
    """Wait until `event` or `stopping` is set; False when `timeout` passed first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not (event.is_set() or stopping.is_set()):
        if deadline is not None and time.monotonic() >= deadline:
            return False
        event.wait(0.05)
    return True
