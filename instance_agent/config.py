"""One configuration schema for every command, and the one `load()` that resolves it.

Precedence, highest first:

1. a command-line flag (`--bucket`),
2. an environment variable `INSTANCE_AGENT_<NAME>` (`INSTANCE_AGENT_BUCKET`),
3. a key of the TOML file (`bucket = "…"`): `--config`, else `$INSTANCE_AGENT_CONFIG`,
   else `/etc/instance-agent/agent.toml` when it exists,
4. the default in `OPTIONS`.

A whole value is taken from the highest source that sets it: a `--source` flag replaces
the file's `source` list rather than adding to it, so what you pass is what you get.
The file is one flat table; a key the schema does not know is an error, while a known key
that the running command does not use is ignored, so `backup` and `watch` share one file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from instance_agent import configfile, namerules
from instance_agent.errors import ConfigError
from instance_agent.partsize import PartSizer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_CONFIG_FILE = "/etc/instance-agent/agent.toml"
ENV_PREFIX = "INSTANCE_AGENT_"

BACKUP = "backup"
WATCH = "watch"
BOTH = frozenset({BACKUP, WATCH})

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


@dataclass(frozen=True)
class Option:
    """One configuration key: its flag, env variable and TOML key all derive from `name`."""

    name: str
    kind: str  # str | int | float | bool | size | list | pathlist | choice
    default: Any
    help: str
    commands: frozenset[str] = BOTH
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    check: Callable[[Any], str | None] | None = None
    negative_flag: bool = False  # bool options get --no-<name> as well

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


# --- value checks: each returns an error message or None --------------------------------

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_ARN_TOPIC_RE = re.compile(r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]{1,256}(\.fifo)?$")
_INSTANCE_RE = re.compile(r"^i-[0-9a-f]{8,17}$")
REGION_RE = _REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
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
    more, but 5 TiB holds everywhere)."""
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


# --- the schema ----------------------------------------------------------------------------

OPTIONS: tuple[Option, ...] = (
    Option(
        "source",
        "pathlist",
        ("/var/log",),
        "directory or file to archive; repeatable, order is priority",
        metavar="PATH",
    ),
    Option(
        "exclude",
        "list",
        ("/var/log/journal/**",),
        "glob to leave out; repeatable. Setting "
        "it replaces the default, which skips live binary journal files (they tear when "
        "copied; --journal exports them instead)",
        metavar="GLOB",
    ),
    Option(
        "journal",
        "bool",
        None,
        "also stream `journalctl -o export` (current and previous "
        "boot) as a second object; default on where journalctl exists",
        negative_flag=True,
    ),
    Option("bucket", "str", None, "S3 bucket for the archive (required)", check=check_bucket),
    Option("prefix", "str", "", "key prefix, e.g. 'backups/'", check=check_prefix),
    Option(
        "key_template",
        "str",
        "{prefix}{group}/{instance_id}/{timestamp}",
        "object key "
        "template; variables: prefix group instance_id region timestamp hostname; the "
        "extension is appended",
    ),
    Option("compression", "choice", "zstd", "archive compression", choices=("zstd", "gzip", "none")),
    Option("level", "int", None, "compression level (zstd default 3, gzip default 6)", check=check_level),
    Option(
        "max_archive_size",
        "size",
        1024**4,
        "largest archive the upload can hold; part sizes grow so that 10,000 parts reach it",
        check=check_archive_size,
    ),
    Option(
        "max_file_size",
        "size",
        None,
        "skip (with a warning) files larger than this; sparse "
        "files are read by extent, so their holes cost no reads",
        check=check_positive,
    ),
    Option(
        "one_file_system",
        "bool",
        False,
        "do not descend into directories on other file "
        "systems than their source (e.g. a /proc-like mount under a source)",
        negative_flag=True,
    ),
    Option(
        "max_duration",
        "float",
        None,
        "deadline in seconds: stop adding files then, close the archive and upload it as 'partial'",
        check=check_positive,
    ),
    Option(
        "topic_arn",
        "str",
        None,
        "SNS topic for the report; none, no report",
        check=_pattern_check(_ARN_TOPIC_RE, "SNS topic ARN"),
    ),
    Option("asg_name", "str", None, "Auto Scaling group; discovered when absent", check=check_asg_name),
    Option(
        "hook_name",
        "str",
        None,
        "terminating lifecycle hook; discovered when absent",
        check=_pattern_check(_HOOK_RE, "lifecycle hook name"),
    ),
    Option(
        "lifecycle_token",
        "str",
        None,
        "LifecycleActionToken to complete by (else by instance id)",
        commands=frozenset({BACKUP}),
        check=check_token,
    ),
    Option(
        "instance_id",
        "str",
        None,
        "instance id; from IMDS when absent",
        check=_pattern_check(_INSTANCE_RE, "instance id"),
    ),
    Option(
        "region", "str", None, "region; from IMDS when absent", check=_pattern_check(_REGION_RE, "region")
    ),
    Option(
        "on_success",
        "choice",
        "CONTINUE",
        "lifecycle result after a successful or partial backup",
        choices=("CONTINUE", "ABANDON"),
    ),
    Option(
        "on_failure",
        "choice",
        "ABANDON",
        "lifecycle result after a failed backup",
        choices=("CONTINUE", "ABANDON"),
    ),
    Option(
        "complete",
        "bool",
        True,
        "complete the lifecycle action (--no-complete: back up only; such runs are never deduplicated)",
        negative_flag=True,
    ),
    Option("sse", "choice", None, "server-side encryption", choices=("AES256", "aws:kms")),
    Option("kms_key_id", "str", None, "KMS key for --sse aws:kms"),
    Option(
        "expected_bucket_owner",
        "str",
        None,
        "account id that must own the bucket",
        check=_pattern_check(_ACCOUNT_RE, "account id"),
    ),
    Option(
        "storage_class",
        "choice",
        None,
        "S3 storage class",
        choices=(
            "STANDARD",
            "STANDARD_IA",
            "ONEZONE_IA",
            "INTELLIGENT_TIERING",
            "GLACIER_IR",
            "GLACIER",
            "DEEP_ARCHIVE",
            "REDUCED_REDUNDANCY",
        ),
    ),
    Option("hash", "choice", "none", "per-file digest in the manifest", choices=("none", "sha256")),
    Option("upload_workers", "int", 3, "concurrent part uploads", check=check_positive),
    Option("upload_queue", "int", 1, "finished parts waiting for a worker", check=check_positive),
    Option("state_dir", "str", "/var/lib/instance-agent", "lock and result records", check=check_dir),
    Option(
        "runtime_dir",
        "str",
        "/run/instance-agent",
        "fallback for the lock when state_dir is unusable",
        check=check_dir,
    ),
    Option(
        "lock_timeout", "float", 3600.0, "how long a second run waits for the first", check=check_positive
    ),
    # 3600 s is the longest deregistration delay an ELBv2 target group allows
    # (deregistration_delay.timeout_seconds, 0-3600); the rest is margin for Auto Scaling.
    Option(
        "wait_timeout",
        "float",
        3900.0,
        "how long to wait for Auto Scaling to hold the "
        "instance in Terminating:Wait once it is known to be leaving (covers a load "
        "balancer's deregistration delay, up to 3600 s)",
        check=check_positive,
    ),
    Option(
        "complete_timeout",
        "float",
        60.0,
        "deadline for CompleteLifecycleAction with its retries",
        check=check_positive,
    ),
    # A retained instance (instance lifecycle policy TerminateHookAbandon: retain,
    # https://docs.aws.amazon.com/autoscaling/ec2/userguide/instance-lifecycle-policy.html):
    # how long to keep retrying the backup, and the first retry's delay (then doubling, at
    # most 15 minutes apart; retained.py).
    Option(
        "retain_retry_for",
        "float",
        86400.0,
        "when the instance is retained after ABANDON, keep retrying the backup this long",
        check=check_positive,
    ),
    Option(
        "retain_first_retry",
        "float",
        30.0,
        "seconds before the first retry of a retained instance's backup (then doubling, capped at 900)",
        check=check_positive,
    ),
    Option(
        "heartbeat_interval",
        "float",
        None,
        "seconds between heartbeats; default HeartbeatTimeout/3, at most 600",
        check=check_heartbeat,
    ),
    Option("log_level", "choice", "info", "log verbosity", choices=("debug", "info", "warning", "error")),
    Option(
        "metrics",
        "bool",
        True,
        "publish the run's CloudWatch metrics (namespace InstanceAgent) when it ends; --no-metrics: don't",
        negative_flag=True,
    ),
    # --- watch only -------------------------------------------------------------------
    Option(
        "poll_interval",
        "float",
        2.0,
        "seconds between IMDS polls (minimum 0.5)",
        commands=frozenset({WATCH}),
        check=check_poll,
    ),
    Option(
        "spot",
        "bool",
        True,
        "watch Spot interruption notices (--no-spot to ignore them)",
        commands=frozenset({WATCH}),
        negative_flag=True,
    ),
    Option(
        "on_rebalance",
        "choice",
        "log",
        "on a rebalance recommendation: log it, or back up",
        commands=frozenset({WATCH}),
        choices=("log", "backup"),
    ),
    # --- the termination job's gate and commands: both commands read them (one agent.toml),
    # so Run Command waits behind the same drain gate as the watcher ------------------------
    Option(
        "drain_path",
        "pathlist",
        (),
        "before the backup, wait until this path is gone or an empty directory; repeatable",
        metavar="PATH",
    ),
    Option("drain_timeout", "float", 600.0, "longest wait for the drain paths", check=check_positive),
    Option("pre_command", "list", (), "shell command run before the archive; repeatable", metavar="CMD"),
    Option("post_command", "list", (), "shell command run after the backup; repeatable", metavar="CMD"),
    Option("command_timeout", "float", 60.0, "timeout of each pre/post command", check=check_positive),
    Option("pre_command_fatal", "bool", False, "a failing pre-command fails the backup", negative_flag=True),
    Option(
        "warm_pool_backup",
        "bool",
        False,
        "also back up when the instance returns to a "
        "warm pool (the instance and its disks are kept, so by default only the commands "
        "run and the hook is completed with CONTINUE)",
        negative_flag=True,
    ),
    Option(
        "push_path",
        "bool",
        False,
        "Run Command (the push path: EventBridge, the trigger Lambda, the SSM document) also "
        "backs this instance up, so doctor requires an active amazon-ssm-agent; off, a missing "
        "SSM agent is only a warning (the watcher needs none)",
        negative_flag=True,
    ),
    Option(
        "ip_allow",
        "list",
        (),
        "install-service: the addresses and CIDR ranges the service may reach besides IMDS, "
        "the Amazon DNS server and loopback (the VPC, its interface endpoints, the S3 prefix "
        "list's ranges); given, every other address is denied (IPAddressDeny=any); empty: no "
        "IP firewall; repeatable",
        metavar="CIDR",
        check=check_ip_allow,
    ),
    Option(
        "stop_grace",
        "float",
        90.0,
        "on SIGTERM during a backup, let it run this long before aborting",
        commands=frozenset({WATCH}),
        check=check_positive,
    ),
    # --- state hand-off (docs/handoff.md, "Moving state on scale-in"): the sender and the receiver
    # read the same agent.toml ------------------------------------------------------------
    Option(
        "handoff_path",
        "pathlist",
        (),
        "state that moves to one other instance of the group on scale-in, written before "
        "the full backup; repeatable",
        metavar="PATH",
    ),
    Option(
        "handoff_command",
        "str",
        None,
        "shell command the receiver runs once the state is in its inbox "
        "(INSTANCE_AGENT_HANDOFF_INBOX, _SOURCE, _KEY)",
        metavar="CMD",
    ),
    Option(
        "handoff_to",
        "choice",
        "any",
        "which instances may receive a hand-off",
        choices=("running", "launching", "any"),
    ),
    Option(
        "handoff_inbox",
        "str",
        None,
        "where a received hand-off is restored, one directory per source instance; unset: "
        "STATE_DIR/handoff-inbox",
        check=check_dir,
    ),
    Option(
        "handoff_lease",
        "float",
        600.0,
        "seconds a receiver's claim holds; after it another receiver may claim",
        check=check_positive,
    ),
    Option(
        "handoff_timeout",
        "float",
        300.0,
        "timeout of handoff_command (below handoff_lease)",
        check=check_positive,
    ),
    # Delivery without the Lambda (issue 22): the watcher's scan and the launch gate's wait.
    Option(
        "handoff_scan_interval",
        "float",
        300.0,
        "watch: look for unclaimed hand-offs of the group about this often (one listing, "
        "jittered), for when no trigger Lambda delivers them; 0: never",
        commands=frozenset({WATCH}),
        check=check_not_negative,
    ),
    Option(
        "handoff_wait",
        "float",
        0.0,
        "launch gate: wait up to this long for a hand-off from an instance still in "
        "Terminating:Wait (handoff_to = launching or any); 0: adopt only what is there",
        check=check_not_negative,
    ),
    # --- continuous shipping (docs/shipping.md) ---------------------------------------------
    Option(
        "ship",
        "bool",
        False,
        "the watcher ships each complete file as a segment while "
        "the instance runs, and the termination archive holds only what was not shipped",
        negative_flag=True,
    ),
    Option(
        "ship_settle",
        "float",
        60.0,
        "a file not modified for this many seconds is "
        "complete and shipped (a renamed or closed file is at once)",
        commands=frozenset({WATCH}),
        check=check_positive,
    ),
    Option(
        "retention_days",
        "int",
        0,
        "days the bucket's lifecycle rule keeps backups (the template's RetentionDays; 0: "
        "kept until deleted); a file whose segment is half that old is shipped again, so "
        "no backup names a segment the rule is about to expire",
        check=check_not_negative,
    ),
    Option(
        "ship_bandwidth",
        "size",
        None,
        "cap on the shipping upload rate, in bytes per second; unset: no cap",
        commands=frozenset({WATCH}),
        check=check_positive,
    ),
)

OPTION_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class Config:
    """The resolved configuration; field names are the option names. Defaults are written
    once, in OPTIONS: `Config.defaults()` is every option at its default."""

    source: tuple[str, ...]
    exclude: tuple[str, ...]
    journal: bool | None
    bucket: str | None
    prefix: str
    key_template: str
    compression: str
    level: int | None
    max_archive_size: int
    max_file_size: int | None
    one_file_system: bool
    max_duration: float | None
    topic_arn: str | None
    asg_name: str | None
    hook_name: str | None
    lifecycle_token: str | None
    instance_id: str | None
    region: str | None
    on_success: str
    on_failure: str
    complete: bool
    sse: str | None
    kms_key_id: str | None
    expected_bucket_owner: str | None
    storage_class: str | None
    hash: str
    upload_workers: int
    upload_queue: int
    state_dir: str
    runtime_dir: str
    lock_timeout: float
    wait_timeout: float
    complete_timeout: float
    retain_retry_for: float
    retain_first_retry: float
    heartbeat_interval: float | None
    log_level: str
    metrics: bool
    poll_interval: float
    spot: bool
    on_rebalance: str
    drain_path: tuple[str, ...]
    drain_timeout: float
    pre_command: tuple[str, ...]
    post_command: tuple[str, ...]
    command_timeout: float
    pre_command_fatal: bool
    warm_pool_backup: bool
    push_path: bool
    ip_allow: tuple[str, ...]
    stop_grace: float
    handoff_path: tuple[str, ...]
    handoff_command: str | None
    handoff_to: str
    handoff_inbox: str | None
    handoff_lease: float
    handoff_timeout: float
    handoff_scan_interval: float
    handoff_wait: float
    ship: bool
    ship_settle: float
    retention_days: int
    ship_bandwidth: int | None
    config_file: str | None = field(default=None, compare=False)

    @classmethod
    def defaults(cls, **overrides: Any) -> Config:
        """Every option at its schema default, except `overrides`."""
        values: dict[str, Any] = {o.name: o.default for o in OPTIONS}
        values.update(overrides)
        return cls(**values)

    def inbox(self) -> str:
        """Where received hand-offs go: handoff_inbox, else under the state directory."""
        return self.handoff_inbox or self.state_dir.rstrip("/") + "/handoff-inbox"

    def journal_enabled(self) -> bool:
        if self.journal is None:
            return shutil.which("journalctl") is not None
        return self.journal


def _schema_matches_dataclass() -> None:
    names = {f.name for f in dataclasses.fields(Config)} - {"config_file"}
    assert names == set(OPTION_BY_NAME), names ^ set(OPTION_BY_NAME)


_schema_matches_dataclass()


# --- parsing one value from text (env) or from TOML ----------------------------------------


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 1073741824, 500MiB, 1TiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def _from_text(opt: Option, text: str) -> Any:
    """Convert an env value (always text) to the option's type."""
    if opt.kind == "bool":
        low = text.strip().lower()
        if low in ("1", "true"):
            return True
        if low in ("0", "false"):
            return False
        raise ValueError(f"expected 1/0/true/false, got {text!r}")
    if opt.kind == "pathlist":
        return tuple(p for p in text.split(":") if p)
    if opt.kind == "list":
        return tuple(p.strip() for p in text.split(",") if p.strip())
    return _from_native(opt, text)


def _from_native(opt: Option, value: Any) -> Any:
    """Convert a TOML (or already-typed) value to the option's type, strictly."""
    kind = opt.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if kind in ("list", "pathlist"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected a list of strings, got {value!r}")
        return tuple(value)
    if kind == "int":
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, float):  # int() would truncate TOML's `level = 3.9` to 3
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, str):
            value = value.strip()
        return int(value)
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        number = float(value)
        # inf and nan pass every comparison-based check (or fail it obscurely) and then break
        # time.sleep()/Event.wait() at the worst moment.
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {value!r}")
        # Event.wait() and Lock.acquire() refuse timeouts above this with OverflowError.
        if number > threading.TIMEOUT_MAX:
            raise ValueError(f"expected at most {threading.TIMEOUT_MAX:g}, got {value!r}")
        return number
    if kind == "size":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected a size, got {value!r}")
        return int(value) if isinstance(value, (int, float)) else parse_size(str(value))
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    if kind == "choice" and value not in opt.choices:
        raise ValueError(f"expected one of {', '.join(opt.choices)}, got {value!r}")
    return value


def _validated(opt: Option, value: Any, origin: str) -> Any:
    if value is None or opt.check is None:
        return value
    problem = opt.check(value)
    if problem:
        raise ConfigError(f"{origin}: {problem}")
    return value


# --- the file ------------------------------------------------------------------------------


def config_path(flag_value: str | None, env: Mapping[str, str]) -> str | None:
    """The file to read, by the precedence in the module docstring; None means none."""
    if flag_value:
        return flag_value
    if env.get(ENV_PREFIX + "CONFIG"):
        return env[ENV_PREFIX + "CONFIG"]
    # Moves the default (tests keep it in their tmp dir, away from the host's /etc).
    default = env.get(ENV_PREFIX + "DEFAULT_CONFIG") or DEFAULT_CONFIG_FILE
    return default if os.path.exists(default) else None


def read_file(path: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = tomllib.loads(configfile.read_trusted(path).decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    except configfile.Refused as err:
        raise ConfigError(f"config file {path}: {err}") from None
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as err:
        raise ConfigError(f"config file {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path}: invalid TOML: {err}") from None
    for key, value in data.items():
        if key not in OPTION_BY_NAME:
            raise ConfigError(f"config file {path}: unknown key {key!r}")
        if isinstance(value, dict):
            raise ConfigError(f"config file {path}: {key!r} must be a value, not a table")
    return data


# --- resolution ----------------------------------------------------------------------------


def load(
    flags: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    *,
    config_file: str | None = None,
    command: str = BACKUP,
) -> Config:
    """Resolve every option by precedence flag > env > file > default (module docstring).

    `flags` maps option names to values from argparse; None means "not given".
    Raises ConfigError (exit 2) with one line naming the source of a bad value.
    """
    env = os.environ if env is None else env
    path = config_path(config_file, env)
    file_values = read_file(path) if path else {}
    resolved: dict[str, Any] = {}
    for opt in OPTIONS:
        value: Any = None
        try:
            if flags.get(opt.name) is not None:
                origin = opt.flag
                value = _from_native(opt, flags[opt.name])
            elif env.get(opt.env) is not None and env.get(opt.env) != "":
                origin = f"${opt.env}"
                value = _from_text(opt, env[opt.env])
            elif opt.name in file_values:
                origin = f"config file {path}: {opt.name}"
                value = _from_native(opt, file_values[opt.name])
            else:
                continue
        except (ValueError, TypeError, OverflowError) as err:  # int([1]), int(inf), …
            raise ConfigError(f"{origin}: {err}") from None
        resolved[opt.name] = _validated(opt, value, origin)
    cfg = Config.defaults(config_file=path, **resolved)
    return check_consistency(cfg, command)


def check_consistency(cfg: Config, command: str) -> Config:
    """Rules that span several options."""
    if command in (BACKUP, WATCH) and not cfg.bucket:
        raise ConfigError(
            "no bucket: pass --bucket, set INSTANCE_AGENT_BUCKET or `bucket` in the config file"
        )
    if cfg.kms_key_id and cfg.sse != "aws:kms":
        raise ConfigError("--kms-key-id needs --sse aws:kms")
    if not cfg.source:
        raise ConfigError("no source to back up")
    for src in cfg.source:
        if not src.startswith("/"):
            raise ConfigError(f"source {src!r} must be an absolute path")
    for src in cfg.handoff_path:
        if not src.startswith("/"):
            raise ConfigError(f"handoff_path {src!r} must be an absolute path")
    if cfg.handoff_timeout >= cfg.handoff_lease:
        # A claim must outlive the command it covers, else a second receiver could claim
        # while the first one's command still runs.
        raise ConfigError(
            f"handoff_timeout ({cfg.handoff_timeout:g} s) must be below "
            f"handoff_lease ({cfg.handoff_lease:g} s)"
        )
    from instance_agent.keys import check_template

    problem = (
        check_template(cfg.key_template, prefix=cfg.prefix)
        or namerules.template_format_spec(cfg.key_template)
        or namerules.segment_component("key template", cfg.key_template)
        or namerules.segment_component("key template", cfg.key_template, "handoff")
        or _template_collision(cfg.key_template, cfg.prefix)
    )
    if problem:
        raise ConfigError(f"key_template: {problem}")
    if cfg.level is not None and cfg.compression in CODEC_LEVELS:
        low, high = CODEC_LEVELS[cfg.compression]
        if not low <= cfg.level <= high:
            raise ConfigError(f"level: {cfg.level} is outside {cfg.compression}'s range {low}..{high}")
    return cfg


# Instance ids that differ only in their last character, long and short form: a template
# that truncates or otherwise drops part of {instance_id} renders them alike.
_DISTINCT_IDS = (("i-0123456789abcdef0", "i-0123456789abcdef1"), ("i-0123abc0", "i-0123abc1"))
# The longest values AWS and DNS allow (a group name is 1-255 characters, a host name at most
# 253): a template whose key fits S3's limit with these fits it for every instance.
_LONGEST = {
    "group": "g" * 255,
    "region": "ap-southeast-5",
    "timestamp": "20260101T000000Z",
    "hostname": "h" * 253,
    "instance_id": "i-0123456789abcdef0",
}


def _template_collision(template: str, prefix: str) -> str | None:
    from instance_agent.keys import render

    sample = {"prefix": prefix, "group": "g", "region": "r", "timestamp": "t", "hostname": "h"}
    try:
        render(template, {**_LONGEST, "prefix": prefix}, "zstd")
        for first, second in _DISTINCT_IDS:
            one = render(template, {**sample, "instance_id": first}, "none")
            if one == render(template, {**sample, "instance_id": second}, "none"):
                return (
                    f"{template!r} renders the same key ({one!r}) for instances {first} "
                    f"and {second}: their backups would collide"
                )
    except ValueError as err:
        return f"{err} with the longest group and host names"
    return None


def describe(options: Sequence[Option] = OPTIONS) -> list[dict[str, str]]:
    """Rows for the configuration table in docs/configuration.md (generated, tested against it)."""
    rows = []
    for opt in options:
        default = opt.default
        if isinstance(default, tuple):
            default = ", ".join(default)
        rows.append(
            {
                "flag": opt.flag + (f" / --no-{opt.name.replace('_', '-')}" if opt.negative_flag else ""),
                "env": opt.env,
                "key": opt.name,
                "default": "" if default is None else str(default),
                "help": opt.help,
            }
        )
    return rows
