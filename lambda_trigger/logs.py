"""The functions' log lines, and the one rule about secrets in them.

Owns: the JSON formatter (one object per line on stdout, which Lambda sends to CloudWatch
Logs, with the version and request id; None fields dropped), its idempotent setup, the
request-id scope of one invocation, and `fingerprint()`.

A LifecycleActionToken is a bearer credential for its lifecycle action: whoever holds it
(and autoscaling:CompleteLifecycleAction on the group) can end it. So no log line, SNS
message, return value or SendCommand comment carries it; they carry its fingerprint, the
first 8 hex digits of its SHA-256, which is enough to match a line to the event and gives
nothing back. Only the SSM parameter the agent needs carries the token itself.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from lambda_trigger import __version__

FINGERPRINT_DIGITS = 8
# Any UUID-shaped text: a token can only be told from another UUID by where it sits, and a
# malformed message is logged exactly because we could not tell where things sit.
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")

log = logging.getLogger("lambda_trigger")
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_HANDLER_NAME = "lambda_trigger.json"


def fingerprint(token: str) -> str:
    """What stands for a token wherever it would be shown (module docstring)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:FINGERPRINT_DIGITS]


def redact_uuids(text: str) -> str:
    """`text` with every UUID replaced by its fingerprint, for excerpts of unknown shape."""
    return _UUID.sub(lambda m: f"<sha256:{fingerprint(m.group(0))}>", text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the version and request id; None fields dropped."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "message": record.getMessage(),
            "logger": record.name,
            "version": __version__,
            "request_id": _request_id.get(),
        }
        payload.update(getattr(record, "fields", {}))
        return json.dumps({k: v for k, v in payload.items() if v is not None}, default=str)


class _StdoutHandler(logging.Handler):
    """Writes to whatever sys.stdout is at the time: Lambda sends each line to CloudWatch."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stdout.write(self.format(record) + "\n")
        sys.stdout.flush()


def setup() -> None:
    # By name, not class: a re-imported module must not add a second handler.
    if any(h.get_name() == _HANDLER_NAME for h in log.handlers):
        return
    handler = _StdoutHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # the runtime's root handler would print every line again


@contextmanager
def invocation(context: object) -> Iterator[None]:
    """Logging set up, and every line inside carrying this invocation's request id."""
    setup()
    request = _request_id.set(getattr(context, "aws_request_id", None))
    try:
        yield
    finally:
        _request_id.reset(request)


def fields(**values: Any) -> dict[str, Any]:
    return {"fields": values}
