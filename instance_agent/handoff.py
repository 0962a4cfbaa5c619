"""State hand-off, the pure part: where its objects live, and who may claim it.

A terminating instance writes its `handoff_path` state as one archive with a manifest
under `{prefix}{group}/handoff/{instance_id}/{timestamp}.tar.zst` (handoff_send.py). One
receiver adopts it (handoff_adopt.py) by writing, beside the archive, create-only objects:

    KEY.claim.000001   the first claim: {"instance_id", "generation", "claimed_at", "lease_s"}
    KEY.claim.000002   the next claim, once the first one's lease is over
    KEY.failed.000001  the claim of that generation ran handoff_command and it failed
    KEY.adopted        restored, handoff_command succeeded: the hand-off is done

Every one of them is written with `IfNoneMatch: "*"`, so of two receivers writing the same
generation's claim S3 lets exactly one succeed: the other gets 412 PreconditionFailed (or
409 ConditionalRequestConflict while the first write is still in flight). "How to prevent
object overwrites with conditional writes", Amazon S3 user guide,
https://docs.aws.amazon.com/AmazonS3/latest/userguide/conditional-writes.html
(in our words: docs/aws-behaviour.md, "S3").

Everything here is a decision on data already read, with the time passed in, so the unit
tests reach every branch in milliseconds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from instance_agent import keys

HANDOFF_DIR = keys.HANDOFF_DIR
TEMPLATE = "{prefix}{group}/" + HANDOFF_DIR + "/{instance_id}/{timestamp}"
CLAIM = ".claim."
FAILED = ".failed."
ADOPTED = ".adopted"
GENERATION_DIGITS = 6
# A handoff_command that fails is retried once, by the next claimant after the lease
# (issue 22): after this many failed generations the hand-off is given up and reported.
MAX_FAILURES = 2

_INSTANCE = re.compile(r"i-[0-9a-f]{8,17}")
_ARCHIVE = re.compile(r"\d{8}T\d{6}Z(" + "|".join(re.escape(e) for e in keys.EXTENSIONS.values()) + r")")

# Verdicts of decide()
CLAIM_NOW = "claim"  # write the claim of `generation`
HELD = "held"  # a live claim of another receiver (or of this one, still running)
DONE = "adopted"  # nothing to do: it is adopted
GIVE_UP = "give-up"  # handoff_command failed MAX_FAILURES times


@dataclass(frozen=True)
class Claim:
    generation: int
    instance_id: str
    claimed_at: float  # epoch seconds: the claim object's LastModified (S3's clock)
    lease_s: float


@dataclass(frozen=True)
class Verdict:
    action: str
    generation: int = 0  # CLAIM_NOW: the generation to write
    holder: Claim | None = None  # HELD: the live claim
    expires_in: float = 0.0  # HELD: seconds until its lease ends


def source_of(key: str) -> str:
    """The source instance of a hand-off archive key, or ValueError: the key must be
    `…/handoff/<instance>/<timestamp>.tar.*`, since the receiver restores into
    inbox/<instance> and must never take a directory name from anything looser."""
    if keys.check_key(key):
        raise ValueError(f"{key!r} is not a safe key")
    parts = key.split("/")
    if len(parts) < 3 or parts[-3] != HANDOFF_DIR:
        raise ValueError(f"{key!r} is not a hand-off key (…/{HANDOFF_DIR}/<instance>/<time>.tar.zst)")
    if not _INSTANCE.fullmatch(parts[-2]) or not _ARCHIVE.fullmatch(parts[-1]):
        raise ValueError(f"{key!r} is not a hand-off key (…/{HANDOFF_DIR}/<instance>/<time>.tar.zst)")
    return parts[-2]


def group_of(key: str) -> str | None:
    """The group as the key names it (the segment before handoff/, keys.safe_component of
    the group's name): the dimension of the hand-off metrics."""
    parts = key.split("/")
    return parts[-4] if len(parts) >= 4 and parts[-3] == HANDOFF_DIR else None


def claim_key(key: str, generation: int) -> str:
    return f"{key}{CLAIM}{generation:0{GENERATION_DIGITS}d}"


def failed_key(key: str, generation: int) -> str:
    return f"{key}{FAILED}{generation:0{GENERATION_DIGITS}d}"


def adopted_key(key: str) -> str:
    return key + ADOPTED


def generation_of(key: str, object_key: str, marker: str = CLAIM) -> int | None:
    """The generation of a claim (or failed) object of hand-off `key`, None for anything else."""
    head = key + marker
    if not object_key.startswith(head):
        return None
    tail = object_key[len(head) :]
    return int(tail) if len(tail) == GENERATION_DIGITS and tail.isdigit() else None


def expired(claim: Claim, now: float) -> bool:
    """A claim's lease is over: its holder is presumed dead (or too slow to be trusted)."""
    return now >= claim.claimed_at + claim.lease_s


def decide(claims: Sequence[Claim], failures: int, adopted: bool, now: float) -> Verdict:
    """What a receiver does with a hand-off, given every claim written so far, how many
    generations' commands failed, and whether it is adopted.

    Only the newest claim counts: an older one was superseded by a create-only write of a
    later generation, which its writer could make only after that older lease ran out."""
    if adopted:
        return Verdict(DONE)
    if failures >= MAX_FAILURES:
        return Verdict(GIVE_UP)
    if not claims:
        return Verdict(CLAIM_NOW, generation=1)
    newest = max(claims, key=lambda c: c.generation)
    if not expired(newest, now):
        return Verdict(HELD, holder=newest, expires_in=newest.claimed_at + newest.lease_s - now)
    return Verdict(CLAIM_NOW, generation=newest.generation + 1)


def group_prefix(prefix: str, group: str) -> str:
    """The "directory" holding every hand-off of a group (TEMPLATE up to the instance)."""
    return f"{prefix}{keys.safe_component(group)}/{HANDOFF_DIR}/"


def unclaimed(listed: Mapping[str, float], now: float, lease: float) -> list[str]:
    """The hand-offs in a listing of group_prefix (key -> LastModified, epoch seconds) that
    a receiver may claim now, oldest first: complete (the manifest is there), not adopted,
    not given up, and with no claim or only one whose lease is over. `lease` stands for
    every claim's own (the claim is read again, exactly, by the adoption itself)."""
    out = []
    for key in sorted(listed, key=lambda k: (listed[k], k)):
        if not key.endswith(tuple(keys.EXTENSIONS.values())) or key + ".manifest.json" not in listed:
            continue
        try:
            source_of(key)
        except ValueError:
            continue
        claims = [Claim(g, "", listed[k], lease) for k in listed if (g := generation_of(key, k)) is not None]
        failures = sum(1 for k in listed if generation_of(key, k, FAILED) is not None)
        if decide(claims, failures, adopted_key(key) in listed, now).action == CLAIM_NOW:
            out.append(key)
    return out


def may_receive(handoff_to: str, role: str) -> bool:
    """Whether an instance in `role` (running or launching) may adopt under `handoff_to`."""
    return handoff_to in ("any", role)
