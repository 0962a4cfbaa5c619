"""Errors of the Lambda trigger."""

from __future__ import annotations


class TriggerError(Exception):
    """Base of the trigger's own errors."""


class ConfigurationError(TriggerError):
    """The function's environment is wrong (a deployment error): raised, so the event goes
    to the dead-letter queue and its alarm fires instead of being dropped quietly."""
