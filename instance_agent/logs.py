"""Logging: JSON lines to stderr (journald keeps them), a human format on a TTY.

stdout is reserved for the `--json` result. Structured fields travel in `extra={"fields": {…}}`;
fields whose value is None are dropped. botocore's wire logging stays off unless asked for by
INSTANCE_AGENT_BOTOCORE_DEBUG=1, because it prints request headers, which carry tokens.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, TextIO

from instance_agent import __version__


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if v is not None})
        if record.exc_info and record.exc_info[0] is not None:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} "
        text += f"{record.levelname.lower():7} {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            extra = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
            if extra:
                text += f"  [{extra}]"
        if record.exc_info and record.exc_info[0] is not None:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup(level: str = "info", stream: TextIO | None = None, human: bool | None = None) -> None:
    """Configure the root logger once per process (the CLI calls this)."""
    stream = stream or sys.stderr
    if human is None:
        human = stream.isatty() and os.environ.get("INSTANCE_AGENT_LOG_FORMAT") != "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(HumanFormatter() if human else JSONFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    if os.environ.get("INSTANCE_AGENT_BOTOCORE_DEBUG") != "1":
        # Header dumps at DEBUG carry the IMDS token, credentials and lifecycle tokens.
        for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("instance_agent").debug(
        "logging ready", extra={"fields": {"agent_version": __version__}}
    )


def fields(**kw: Any) -> dict[str, Any]:
    """`log.info("…", extra=fields(key=value))`, shorter at call sites."""
    return {"fields": kw}
