"""Render object keys from the key template, safely, whatever the inputs contain.

Group names may hold almost any character (AWS allows 1-255 of most of Unicode), and the
template is operator text. A rendered key must never hold `..`, a leading `/` or control
characters, so every variable is reduced to a safe alphabet before it is substituted, and the
result is checked again.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from datetime import datetime, timezone

VARIABLES = ("prefix", "group", "instance_id", "region", "timestamp", "hostname")
EXTENSIONS = {"zstd": ".tar.zst", "gzip": ".tar.gz", "none": ".tar"}
# S3 keys are at most 1024 bytes; leave room for ".manifest.json" / ".journal.export.zst".
_MAX_KEY_BYTES = 1024 - len(".tar.zst.journal.export.zst")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Segments shipped while the instance runs live in this "directory" under the instance's
# prefix, so `list` can tell them from termination backups by their key alone. No other
# key may have a component of this name (safe_component, namerules.segment_component).
SEGMENT_DIR = "segments"
# State hand-offs (handoff.py) live under "{prefix}{group}/handoff/{instance_id}/": reserved
# the same way, so no backup key can look like one.
HANDOFF_DIR = "handoff"
RESERVED_DIRS = (SEGMENT_DIR, HANDOFF_DIR)


def timestamp(now: datetime | None = None) -> str:
    """UTC, sortable: 20260101T120000Z."""
    return (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def safe_component(value: str) -> str:
    """Map a value to [A-Za-z0-9._=+-] with no `..` and no dot at either end; never empty,
    and never a reserved directory name itself (`segments` becomes `segments_`, `handoff`
    becomes `handoff_`)."""
    cleaned = _UNSAFE.sub("_", value)
    # No leading or trailing dot either: a neighbour in the template (or the extension)
    # could otherwise complete a "..".
    cleaned = re.sub(r"\.{2,}", "_", cleaned).strip(".")
    # A group (or host, region…) named `segments` would give its archives a /segments/
    # component, and `list` would take them for shipped segments and show none of them.
    # Every reader (listing filters, restore checks) goes through this same function.
    if cleaned in RESERVED_DIRS:
        return cleaned + "_"
    return cleaned or "_"


def check_template(template: str, prefix: str = "x") -> str | None:
    """An error message if the template cannot be rendered (with the configured `prefix`),
    else None."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        return f"invalid template {template!r}: {err}"
    for name in fields:
        if name not in VARIABLES:
            return f"unknown variable {{{name}}} in {template!r}; known: {', '.join(VARIABLES)}"
    if "instance_id" not in fields:
        return f"template {template!r} must contain {{instance_id}} so instances never collide"
    sample = {name: "x" for name in VARIABLES}
    sample["prefix"] = prefix  # '' + '/{group}' would start with '/'
    try:
        render(template, sample, "none")
    except ValueError as err:
        return str(err)
    return None


def render(template: str, values: Mapping[str, str], compression: str) -> str:
    """The archive key. `prefix` is kept as given (it was validated as config and may hold
    '/'); every other value is reduced by `safe_component`."""
    safe = {k: safe_component(v) for k, v in values.items() if k != "prefix"}
    safe["prefix"] = values.get("prefix", "")
    key = template.format(**safe) + EXTENSIONS[compression]
    problem = check_key(key)
    if problem:
        raise ValueError(problem)
    return key


def listing_prefix(template: str, values: Mapping[str, str]) -> str:
    """The longest key prefix shared by every run of this instance: the rendered template up
    to the first per-run variable (timestamp, hostname)."""
    probe = dict(values, timestamp="TIMESTAMPMARK", hostname="HOSTNAMEMARK")
    rendered = template.format(**{k: (v if k == "prefix" else safe_component(v)) for k, v in probe.items()})
    cut = min(
        i for i in (rendered.find("TIMESTAMPMARK"), rendered.find("HOSTNAMEMARK"), len(rendered)) if i >= 0
    )
    return rendered[:cut]


def segment_key(template: str, values: Mapping[str, str], name: str, identity: str, compression: str) -> str:
    """The key of the segment holding one file: under the instance's listing prefix (with
    the instance id added when the template puts it after the timestamp), named for the
    file and its identity, so the same file always maps to the same key and a second
    upload of it is refused by S3's create-only write."""
    prefix = listing_prefix(template, values)
    instance = safe_component(values.get("instance_id", ""))
    if instance not in prefix:
        prefix += instance + "-"
    key = f"{prefix}{SEGMENT_DIR}/{safe_component(name)}.{identity}{EXTENSIONS[compression]}"
    problem = check_key(key)
    if problem:
        raise ValueError(problem)
    return key


def segment_prefix(template: str, values: Mapping[str, str]) -> str:
    """The "directory" that holds every segment of this instance (segment_key's)."""
    return segment_key(template, values, "x", "x", "none").rsplit("/", 1)[0] + "/"


def check_key(key: str) -> str | None:
    if key.startswith("/"):
        return f"rendered key {key!r} starts with '/'"
    if ".." in key:
        return f"rendered key {key!r} contains '..'"
    if _CONTROL.search(key):
        return f"rendered key {key!r} contains control characters"
    if len(key.encode()) > _MAX_KEY_BYTES:
        return f"rendered key is longer than {_MAX_KEY_BYTES} bytes"
    return None
