"""`handler(event, context)`: run the backup document on a terminating instance, once.

The Lambda entry point of the push path, and only that: it reads the settings (`settings`),
sets up the log lines of one invocation (`logs`), splits the event into messages
(`events`), and hands each terminate lifecycle action to the SSM flow (`ssm_flow`), whose
docstring tells the checks and the one-command guarantee. Clients and the retry policy are
`clients`'. Failed Run Commands are reported by the other entry point, `command_status`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lambda_trigger import events, settings, ssm_flow
from lambda_trigger.clients import SAFETY_MARGIN, Caller, Clients, deadline, get_clients, use_clients
from lambda_trigger.logs import fields, invocation, log
from lambda_trigger.settings import EXECUTION_RANGE, Settings
from lambda_trigger.ssm_flow import CONFIRM_POLL, SAFE_NAME, comment_for

# What tests, the demo and the template check read from here.
__all__ = [
    "CONFIRM_POLL",
    "EXECUTION_RANGE",
    "SAFETY_MARGIN",
    "SAFE_NAME",
    "Clients",
    "Settings",
    "comment_for",
    "handle",
    "handler",
    "use_clients",
]


def handler(event: object, context: object) -> dict[str, Any]:
    """Lambda entry point: settings from the environment, clients built on first use."""
    with invocation(context):
        return handle(event, context, settings=settings.load(Settings.from_env))


def handle(
    event: object,
    context: object,
    *,
    settings: Settings,
    clients: Clients | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Handle every message of one invocation; returns {"results": [one dict per message]}."""
    results: list[dict[str, Any]] = []
    for item in events.parse(event):
        if isinstance(item, events.Malformed):
            # Retrying cannot fix it: one line, and a normal return. The excerpt is raw
            # input, redacted by `events` before it was cut.
            log.error("malformed event", extra=fields(reason=item.reason, via=item.via, excerpt=item.excerpt))
            results.append({"status": "malformed", "reason": item.reason})
        elif isinstance(item, events.Ignored):
            log.info(
                "event ignored", extra=fields(reason=item.reason, via=item.via, instance_id=item.instance_id)
            )
            results.append({"status": "ignored", "reason": item.reason})
        else:
            caller = Caller(deadline(context, clock), clock, sleep)
            run = ssm_flow.Run(settings, clients or get_clients(), caller)
            results.append(ssm_flow.process(run, item))
    return {"results": results}
