"""Keep lifecycle action tokens out of everything the agent writes.

A LifecycleActionToken is a bearer secret: whoever holds it (and the IAM permission) can
complete or heartbeat the action. It reaches the agent as --lifecycle-token and comes back
inside AWS's own error text ("No active Lifecycle Action found with token …"), from where it
would otherwise be copied into logs, `--json`, the SNS report and the result record. Where a
correlation id helps, a short fingerprint stands in for it: the first 8 hex digits of its
SHA-256, enough to match two lines of one run, useless for completing the action.
"""

from __future__ import annotations

import hashlib
import re

# Lifecycle action tokens are UUIDs (the Lambda receives them as such in the EventBridge
# event's `LifecycleActionToken`, and configchecks.py checks --lifecycle-token against this shape).
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def fingerprint(token: str) -> str:
    """The first 8 hex digits of the token's SHA-256: a correlation id, not the secret."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


def _mask(token: str) -> str:
    return f"<token {fingerprint(token)}>"


def scrub(text: str, token: str | None) -> str:
    """`text` with every occurrence of `token` replaced by its fingerprint."""
    if not token:
        return text
    return text.replace(token, _mask(token))


def scrub_tokens(text: str) -> str:
    """`text` with every UUID-shaped substring replaced by its fingerprint: for texts from
    AWS, where the token is not known to the caller."""
    return _UUID.sub(lambda m: _mask(m.group(0)), text)
