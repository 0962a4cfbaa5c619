"""Checks of one option's value: each returns an error message, or None when it is fine.

The option table (schema.py) names one per key; rules that span several keys are
config.check_consistency's.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from instance_agent import namerules
from instance_agent.partsize import PartSizer

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_ARN_TOPIC_RE = re.compile(r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]{1,256}(\.fifo)?$")
_INSTANCE_RE = re.compile(r"^i-[0-9a-f]{8,17}$")
REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_HOOK_RE = re.compile(r"^[A-Za-z0-9_/-]{1,255}$")
_ACCOUNT_RE = re.compile(r"^\d{12}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def check_bucket(value: str) -> str | None:
    """S3's bucket naming rules (general purpose buckets)."""
    if not _BUCKET_RE.match(value) or ".." in value or ".-" in value or "-." in value:
        return (
            f"invalid bucket name {value!r}: 3-63 lowercase letters, digits, dots and "
            "hyphens, starting and ending with a letter or digit"
        )
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return namerules.reserved_bucket(value)
    return f"invalid bucket name {value!r}: must not look like an IP address"


def _pattern_check(pattern: re.Pattern[str], what: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        # fullmatch, not match: `$` would accept a trailing newline.
        return None if pattern.fullmatch(str(value)) else f"invalid {what} {value!r}"

    return check


# The keys whose whole rule is a pattern (fullmatch, so a trailing newline is refused too).
check_topic_arn = _pattern_check(_ARN_TOPIC_RE, "SNS topic ARN")
check_hook_name = _pattern_check(_HOOK_RE, "lifecycle hook name")
check_instance_id = _pattern_check(_INSTANCE_RE, "instance id")
check_region = _pattern_check(REGION_RE, "region")
check_account_id = _pattern_check(_ACCOUNT_RE, "account id")


def check_asg_name(value: str) -> str | None:
    if not 1 <= len(value) <= 255 or _CONTROL_RE.search(value):
        return f"invalid Auto Scaling group name {value!r}"
    return None


def check_prefix(value: str) -> str | None:
    if value.startswith("/") or ".." in value or _CONTROL_RE.search(value):
        return f"invalid prefix {value!r}: no leading '/', no '..', no control characters"
    if not value:
        return None
    return (
        namerules.prefix_components(value)
        or namerules.segment_component("prefix", value)
        or namerules.segment_component("prefix", value, "handoff")
    )


def check_positive(value: Any) -> str | None:
    return None if value > 0 else f"must be greater than 0, got {value}"


def check_not_negative(value: Any) -> str | None:
    return None if value >= 0 else f"must be 0 or more, got {value}"


def check_level(value: Any) -> str | None:
    return None if value is None or -7 <= value <= 22 else f"level {value} is out of range"


# Each codec's own range, checked against the chosen compression in check_consistency: zlib
# takes 0-9 (compress.py used to clamp anything else silently), zstd up to its maximum 22
# (zstandard.MAX_COMPRESSION_LEVEL) and down to the negative "fast" levels that check_level
# already bounds.
CODEC_LEVELS = {"gzip": (0, 9), "zstd": (-7, 22)}


def check_archive_size(value: Any) -> str | None:
    """PartSizer's own rule, so a size it would refuse at backup time is refused now: S3 caps
    an object at 5 TiB ("Maximum object size", Amazon S3 multipart upload limits,
    https://docs.aws.amazon.com/AmazonS3/latest/userguide/qfacts.html; newer regions document
    more, but 5 TiB holds everywhere; docs/aws-behaviour.md, "S3")."""
    problem = check_positive(value)
    if problem:
        return problem
    try:
        PartSizer.for_max(value)
    except ValueError as err:
        return str(err)
    return None


def check_dir(value: Any) -> str | None:
    # A relative directory would depend on the caller's cwd, which differs between Run
    # Command and systemd: the two trigger paths would not share one lock.
    if not str(value).strip():
        return "must not be blank"
    if not str(value).startswith("/"):
        return f"{value!r} must be an absolute path"
    return None


def check_token(value: Any) -> str | None:
    # The value is a secret (redact.py): say what is wrong without echoing it.
    return (
        None
        if _UUID_RE.fullmatch(str(value))
        else "invalid lifecycle action token: expected a UUID (the value is not shown)"
    )


# systemd's IPAddressAllow= keywords, besides addresses and prefixes (systemd.resource-control(5)).
IP_KEYWORDS = ("any", "localhost", "link-local", "multicast")


def check_ip_allow(value: Any) -> str | None:
    for entry in value:
        if str(entry) in IP_KEYWORDS:
            continue
        try:
            ipaddress.ip_network(str(entry), strict=False)
        except ValueError:
            return (
                f"invalid address or range {entry!r}: an IPv4 or IPv6 address or CIDR prefix "
                f"(10.0.0.0/16), or one of {', '.join(IP_KEYWORDS)}"
            )
    return None


def check_poll(value: Any) -> str | None:
    return None if value >= 0.5 else f"poll interval must be >= 0.5 s, got {value}"


def check_heartbeat(value: Any) -> str | None:
    return None if value is None or value >= 0.1 else "heartbeat interval must be >= 0.1 s"
