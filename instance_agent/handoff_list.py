"""`instance-agent list --handoffs`: each state hand-off and where it stands.

One listing of the hand-off objects (narrowed to `{prefix}{group}/handoff/` with
--asg-name), then one GET for each hand-off's newest claim or adopted marker, to say who:

    unclaimed   complete (manifest there), nobody has claimed it, or the last claim's lease is
                over; `waiting_s` says for how long (HandoffUnclaimedAgeSeconds, as the scan sees it)
    claimed     a receiver holds a live claim (who, which generation, since when)
    adopted     restored and handoff_command succeeded (by whom, when)
    given-up    handoff_command failed handoff.MAX_FAILURES times
    incomplete  no manifest: the sender is still writing it, or died doing so
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from instance_agent import handoff, keys, listing

UNCLAIMED, CLAIMED, ADOPTED, GIVEN_UP, INCOMPLETE = (
    "unclaimed",
    "claimed",
    "adopted",
    "given-up",
    "incomplete",
)


@dataclass
class View:
    key: str
    source: str
    created: str
    state: str
    generation: int = 0  # claims written so far
    failures: int = 0
    by: str | None = None  # the claimant (claimed) or the adopter (adopted)
    since: str | None = None  # when that claim or adoption was written
    waiting_s: float | None = None  # unclaimed: seconds since it was written (the alarm's age)


def summarize(key: str, listed: Mapping[str, float], now: float, lease: float) -> View:
    """Where hand-off `key` stands, from a listing (key -> LastModified, epoch seconds)."""
    claims = [
        handoff.Claim(g, "", listed[k], lease)
        for k in listed
        if (g := handoff.generation_of(key, k)) is not None
    ]
    failures = sum(1 for k in listed if handoff.generation_of(key, k, handoff.FAILED) is not None)
    view = View(key, handoff.source_of(key), _iso(listed[key]), UNCLAIMED, len(claims), failures)
    if key + listing.MANIFEST_SUFFIX not in listed:
        view.state = INCOMPLETE
        return view
    verdict = handoff.decide(claims, failures, handoff.adopted_key(key) in listed, now)
    if verdict.action == handoff.DONE:
        view.state, view.since = ADOPTED, _iso(listed[handoff.adopted_key(key)])
    elif verdict.action == handoff.GIVE_UP:
        view.state = GIVEN_UP
    elif verdict.action == handoff.HELD:
        assert verdict.holder is not None
        view.state, view.since = CLAIMED, _iso(verdict.holder.claimed_at)
    else:
        view.waiting_s = round(max(0.0, now - listed[key]), 1)
    return view


def find(
    s3: Any,
    bucket: str,
    prefix: str,
    *,
    group: str | None,
    source: str | None,
    now: float,
    lease: float,
    extra: Mapping[str, str] | None = None,
) -> list[View]:
    """Every hand-off under `prefix` (of `group`, from `source`, when given), oldest first."""
    where = handoff.group_prefix(prefix, group) if group else prefix
    listed = {
        str(o["Key"]): o["LastModified"].timestamp()
        for o in listing.iter_objects(s3, bucket, where, extra=extra)
        if f"/{keys.HANDOFF_DIR}/" in str(o["Key"])
    }
    views = []
    for key in sorted(listed, key=lambda k: (listed[k], k)):
        if not listing.is_archive(key):
            continue
        try:
            view = summarize(key, listed, now, lease)
        except ValueError:  # a key under handoff/ that is not of the hand-off's form
            continue
        if source and view.source != source:
            continue
        if view.state == CLAIMED:
            view.by = _who(s3, bucket, handoff.claim_key(key, view.generation), extra)
        elif view.state == ADOPTED:
            view.by = _who(s3, bucket, handoff.adopted_key(key), extra)
        views.append(view)
    return views


def render_json(views: list[View]) -> str:
    return json.dumps([asdict(v) for v in views], indent=2) + "\n"


def render_table(views: list[View]) -> str:
    rows = [("CREATED", "SOURCE", "STATE", "BY", "SINCE", "KEY")]
    rows += [(v.created, v.source, v.state, v.by or "-", v.since or "-", v.key) for v in views]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows)
    return "".join(line + "\n" for line in lines)


def _who(s3: Any, bucket: str, key: str, extra: Mapping[str, str] | None) -> str | None:
    try:
        doc = json.loads(s3.get_object(Bucket=bucket, Key=key, **(extra or {}))["Body"].read())
    except (ClientError, BotoCoreError, ValueError):
        return None  # shown as '-': the state itself came from the listing
    return str(doc.get("instance_id")) if isinstance(doc, dict) and doc.get("instance_id") else None


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
