"""The functions' settings: what each reads from its environment, checked once per event.

Owns every environment variable of both handlers and the limits they are checked against.
A bad value raises `ConfigurationError` (a deployment error: the event goes to the
dead-letter queue and its alarm fires instead of being dropped quietly).

The terminate trigger (`handler`): DOCUMENT_NAME (required); ON_UNREACHABLE
`leave`|`complete`; TOPIC_ARN (optional); EXECUTION_TIMEOUT (seconds, 1-172800, default
3600); CONFIRM_TIMEOUT (seconds to wait for delivery, default 10, 0 = don't wait);
HANDOFF_DOCUMENT_NAME (optional: the adopt document; unset, hand-off events are ignored).

The command-status reporter (`command_status`): DOCUMENT_NAME and TOPIC_ARN, both required:
it has nothing to do without either.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from lambda_trigger.exceptions import ConfigurationError
from lambda_trigger.logs import fields, log

LEAVE, COMPLETE = "leave", "complete"
EXECUTION_RANGE = (1, 172_800)  # SSM's limits for a command's execution timeout
DEFAULT_EXECUTION_TIMEOUT = 3600  # SSM's own default
DEFAULT_CONFIRM_TIMEOUT = 10.0
MAX_CONFIRM_TIMEOUT = 300.0


@dataclass(frozen=True)
class Settings:
    """The terminate trigger's settings."""

    document: str
    on_unreachable: str = LEAVE
    topic_arn: str | None = None
    execution_timeout: int = DEFAULT_EXECUTION_TIMEOUT
    confirm_timeout: float = DEFAULT_CONFIRM_TIMEOUT
    handoff_document: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        document = _required(env, "DOCUMENT_NAME")
        mode = env.get("ON_UNREACHABLE", "").strip() or LEAVE
        if mode not in (LEAVE, COMPLETE):
            raise ConfigurationError(f"ON_UNREACHABLE must be leave or complete, not {mode!r}")
        low, high = EXECUTION_RANGE
        execution = _number(env, "EXECUTION_TIMEOUT", int, DEFAULT_EXECUTION_TIMEOUT, low, high)
        confirm = _number(env, "CONFIRM_TIMEOUT", float, DEFAULT_CONFIRM_TIMEOUT, 0, MAX_CONFIRM_TIMEOUT)
        topic = env.get("TOPIC_ARN", "").strip() or None
        handoff = env.get("HANDOFF_DOCUMENT_NAME", "").strip() or None
        return cls(document, mode, topic, execution, confirm, handoff)


@dataclass(frozen=True)
class StatusSettings:
    """The command-status reporter's settings."""

    document: str
    topic_arn: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> StatusSettings:
        return cls(_required(env, "DOCUMENT_NAME"), _required(env, "TOPIC_ARN"))


S = TypeVar("S")


def load(from_env: Callable[[Mapping[str, str]], S]) -> S:
    """Settings from this process's environment; a bad one is logged as one line and raised."""
    try:
        return from_env(os.environ)
    except ConfigurationError as err:
        log.error("configuration error", extra=fields(error=str(err)))
        raise


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigurationError(f"{name} is not set")
    return value


N = TypeVar("N", int, float)


def _number(env: Mapping[str, str], name: str, kind: type[N], default: N, low: float, high: float) -> N:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number, not {text!r}") from None
    if not low <= value <= high:
        raise ConfigurationError(f"{name} must be within {low:g}-{high:g}, not {text}")
    return value
