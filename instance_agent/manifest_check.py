"""Whether an assembled backup's manifest names only what its restore may touch.

The manifest is written by the instance, so a compromised instance controls it and, with
it, what the operator's restore reads and moves. Every field that names a path or an
object is checked here before anything is downloaded: a `member` (joined to a segment's
staging directory) must be relative and stay inside it, else a rename would pull the
restoring host's own files (~/.ssh, ~/.aws/credentials) into DEST; an `object` must be a
segment key of the same instance, of the form keys.segment_key writes, else the restore
could be pointed at any archive in the bucket, another instance's included.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from instance_agent import keys
from instance_agent.errors import AgentError
from instance_agent.manifest import path_from_fields

# keys.segment_key: "{name}.{identity}{extension}", name and identity safe_component text.
_SEGMENT_NAME = re.compile(
    r"[A-Za-z0-9._=+-]+(" + "|".join(re.escape(e) for e in keys.EXTENSIONS.values()) + r")"
)


class UnsafeManifest(AgentError):
    """The manifest names a path outside the tree or an object that is not this backup's."""


def relative_inside(value: bytes) -> bool:
    """Whether a manifest path, joined to a directory, stays below it."""
    if not value or b"\0" in value or value.startswith(b"/"):
        return False
    # No ".." anywhere (nearly every path) means no ".." component: one C-level search
    # first, the split only when it finds one. verify runs this on every manifest entry.
    return b".." not in value or b".." not in value.split(b"/")


def segment_key_problem(final_key: str, instance_id: str, key: str) -> str | None:
    """Why `key` is not a segment of the backup `final_key` of `instance_id`, or None.

    keys.segment_key puts segments at "{P}segments/{name}": P is the instance's listing
    prefix (a prefix of every archive key of that instance, holding its id), or, when the
    template puts the id after the timestamp, that prefix followed by "{id}-"."""
    if keys.check_key(key):
        return "it is not a safe key"
    instance = keys.safe_component(instance_id) if instance_id else ""
    head, sep, name = key.rpartition(f"{keys.SEGMENT_DIR}/")
    if not sep or not _SEGMENT_NAME.fullmatch(name):
        return "it is not of the form of a segment key"
    if not instance or instance not in final_key:
        return "the manifest's instance is not the backup's"
    if final_key.startswith(head) and instance in head:
        return None
    tail = f"{instance}-"
    if head.endswith(tail) and final_key.startswith(head[: -len(tail)]):
        return None
    return "it is not under this instance's prefix"


def check(final_key: str, manifest: Mapping[str, Any]) -> None:
    """Raise UnsafeManifest, in one line naming the entry, for the first field that could
    reach outside the staged tree or outside this backup's objects."""
    instance = str(manifest.get("instance_id") or "")
    # Tens of thousands of entries name the same few segments: each key is checked once.
    problems: dict[str, str | None] = {}
    for entry in manifest.get("entries") or []:
        if not isinstance(entry, dict):
            continue
        try:
            path = path_from_fields(entry)
        except (KeyError, ValueError) as err:
            raise UnsafeManifest(f"refusing the manifest: an entry has no valid path ({err})") from None
        label = repr(os.fsdecode(path))
        if not relative_inside(path):
            raise UnsafeManifest(f"refusing the manifest: entry {label} has an unsafe path")
        # Link targets are not checked here: links come from the archives themselves,
        # whose extraction refuses one that leaves the tree (restore.py).
        if "member" in entry or "member_b64" in entry:
            try:
                member = path_from_fields(entry, "member")
            except ValueError:
                raise UnsafeManifest(f"refusing the manifest: entry {label} has an invalid member") from None
            if not relative_inside(member):
                raise UnsafeManifest(
                    f"refusing the manifest: entry {label} has member {os.fsdecode(member)!r} "
                    "outside the segment's tree"
                )
        obj = entry.get("object")
        if obj:
            key = str(obj)
            if key not in problems:
                problems[key] = segment_key_problem(final_key, instance, key)
            problem = problems[key]
            if problem:
                raise UnsafeManifest(f"refusing the manifest: entry {label} names object {obj!r}: {problem}")
