"""Keep lifecycle action tokens out of everything the agent writes.

A token completes somebody's lifecycle action: it must not appear in logs, `--json`, SNS
bodies, records or error texts. AWS echoes it back ("No active Lifecycle Action found with
token …"), so every text that may carry it passes through `scrub`. Where a correlation id
helps, `fingerprint` gives a short, one-way stand-in.
"""

from __future__ import annotations

import hashlib
import re

# Lifecycle action tokens are UUIDs; AWS's messages quote them whole.
_UUID = re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b")


def fingerprint(token: str | None) -> str | None:
    """The first 8 hex digits of the token's SHA-256: enough to match two log lines, not
    enough to complete anything."""
    if not token:
        return None
    return hashlib.sha256(token.encode()).hexdigest()[:8]


def scrub(text: str, token: str | None = None) -> str:
    """`text` with the token, and anything shaped like one, replaced by its fingerprint."""
    if token:
        text = text.replace(token, f"<token {fingerprint(token)}>")
    return _UUID.sub(lambda m: f"<token {fingerprint(m.group(0))}>", text)
