"""An in-process moto server on 127.0.0.1 with terminate lifecycle hooks installed.

The server runs in a thread of this process, so its backends are this process's moto
backends: tests read published SNS messages and lifecycle calls straight from them.
Starting resets every moto backend (unless `reset=False`), so a server starts empty.
"""

from __future__ import annotations

import io
import logging
import threading
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import BaseWSGIServer, make_server

from instance_agent.local import autoscaling
from instance_agent.local.serve import Background, ServerThread

_log = logging.getLogger(__name__)

DEFAULT_ACCOUNT = "123456789012"
DEFAULT_REGION = "us-east-1"
# The API log only serves test assertions; a bound keeps long demo runs flat.
API_LOG_LIMIT = 10_000
# Query-API bodies (form posts) are small; bigger bodies are S3 objects and are not read.
FORM_PEEK_LIMIT = 1 << 20


@dataclass(frozen=True)
class ApiCall:
    """One request the server answered. `action` is the Query `Action` or the JSON
    `X-Amz-Target` operation; None for REST calls such as S3's."""

    method: str
    path: str
    action: str | None
    status: int


class MotoServer(Background):
    """moto's server on 127.0.0.1 (port 0 by default), quiet.

    moto's backends are per process, shared by every server in it: starting one resets
    them all unless `reset=False` (for a second server next to a running one).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, reset: bool = True) -> None:
        self._serving = ServerThread(self._make_server, name="moto-server", host=host, port=port)
        self._reset_on_start = reset
        self._calls: deque[ApiCall] = deque(maxlen=API_LOG_LIMIT)
        self._calls_lock = threading.Lock()

    def start(self) -> str:
        """Start serving; return the endpoint URL `http://127.0.0.1:PORT`."""
        if self._serving.running:
            return self.endpoint
        autoscaling.install()
        self._serving.start()
        if self._reset_on_start:
            self.reset()
        return self.endpoint

    def _make_server(self, host: str, port: int) -> BaseWSGIServer:
        # moto's own app, plus a recorder of each call it answers.
        app = _Recorder(DomainDispatcherApplication(create_backend_app), self._record)
        return make_server(host, port, app, True, request_handler=_QuietRequestHandler)

    @property
    def endpoint(self) -> str:
        return self._serving.endpoint

    def stop(self) -> None:
        self._serving.stop()

    def reset(self) -> None:
        """Empty every moto backend in this process and the lifecycle records."""
        _post(f"{self.endpoint}/moto-api/reset")
        autoscaling.reset()
        with self._calls_lock:
            self._calls.clear()

    def api_calls(self) -> list[ApiCall]:
        """The requests answered since start (or the last `reset`), oldest first."""
        with self._calls_lock:
            return list(self._calls)

    def _record(self, call: ApiCall) -> None:
        with self._calls_lock:
            self._calls.append(call)

    @staticmethod
    def sns_messages(
        topic_arn: str, account_id: str = DEFAULT_ACCOUNT, region: str = DEFAULT_REGION
    ) -> list[dict[str, Any]]:
        """Messages published to `topic_arn`, oldest first, read from moto's SNS backend.

        Each is {"message_id", "message", "subject", "message_attributes", "group_id"};
        attributes are as moto stores them ({name: {"Type": …, "Value": …}})."""
        from moto.sns.models import sns_backends

        topic = sns_backends[account_id][region].topics[topic_arn]
        return [
            {
                "message_id": message_id,
                "message": message,
                "subject": subject,
                "message_attributes": attributes or {},
                "group_id": group_id,
            }
            for message_id, message, subject, attributes, group_id in topic.sent_notifications
        ]


def _post(url: str) -> None:
    request = urllib.request.Request(url, data=b"", method="POST")  # noqa: S310 (our own http URL)
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310  # nosec B310 - our own moto server's http://127.0.0.1 URL
        response.read()


class _QuietRequestHandler(MotoRequestHandler):
    """No access log on the terminal; other messages go to this module's logger."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass

    def log(self, type: str, message: str, *args: Any) -> None:
        level = logging.DEBUG if type == "info" else logging.WARNING
        _log.log(level, "moto server: " + message.rstrip(), *args)


StartResponse = Callable[..., Any]


class _Recorder:
    """WSGI middleware: note method, path, API action and status of every request."""

    def __init__(self, app: Any, record: Callable[[ApiCall], None]) -> None:
        self._app = app
        self._record = record

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        action = _action_of(environ)
        status = [0]

        def recording_start_response(status_line: str, *args: Any) -> Any:
            status[0] = int(status_line.split(" ", 1)[0])
            return start_response(status_line, *args)

        body = self._app(environ, recording_start_response)
        path = str(environ.get("PATH_INFO", ""))
        if not path.startswith("/moto-api"):
            self._record(ApiCall(str(environ.get("REQUEST_METHOD")), path, action, status[0]))
        return body  # type: ignore[no-any-return]


def _action_of(environ: dict[str, Any]) -> str | None:
    target = environ.get("HTTP_X_AMZ_TARGET")
    if target:
        return str(target).rsplit(".", 1)[-1]
    query = parse_qs(str(environ.get("QUERY_STRING", "")))
    if "Action" in query:
        return query["Action"][0]
    content_type = str(environ.get("CONTENT_TYPE", ""))
    length = str(environ.get("CONTENT_LENGTH") or "0")
    if not content_type.startswith("application/x-www-form-urlencoded") or not length.isdigit():
        return None
    size = int(length)
    if size > FORM_PEEK_LIMIT:
        return None
    body = environ["wsgi.input"].read(size)
    # Put the body back for moto, which reads it again.
    environ["wsgi.input"] = io.BytesIO(body)
    form = parse_qs(body.decode("utf-8", "replace"))
    return form["Action"][0] if "Action" in form else None
