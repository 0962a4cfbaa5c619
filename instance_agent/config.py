"""The resolved configuration (`Config`) and the one `load()` that resolves it.

Precedence, highest first:

1. a command-line flag (`--bucket`),
2. an environment variable `INSTANCE_AGENT_<NAME>` (`INSTANCE_AGENT_BUCKET`),
3. a key of the TOML file (`bucket = "…"`): `--config`, else `$INSTANCE_AGENT_CONFIG`,
   else `/etc/instance-agent/agent.toml` when it exists,
4. the default in the option table (schema.OPTIONS).

A whole value is taken from the highest source that sets it: a `--source` flag replaces
the file's `source` list rather than adding to it, so what you pass is what you get.
The file is one flat table; a key the schema does not know is an error, while a known key
that the running command does not use is ignored, so `backup` and `watch` share one file.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from instance_agent import configfile, namerules
from instance_agent.configchecks import CODEC_LEVELS

# BACKUP and WATCH, load()'s `command` values, stay importable from here (`as` says so): every
# caller of load() names one. Their home is configkey, with the rows that say who reads a key.
from instance_agent.configkey import BACKUP as BACKUP
from instance_agent.configkey import ENV_PREFIX
from instance_agent.configkey import WATCH as WATCH
from instance_agent.configvalues import checked, from_native, from_text
from instance_agent.errors import ConfigError
from instance_agent.schema import OPTION_BY_NAME, OPTIONS

DEFAULT_CONFIG_FILE = "/etc/instance-agent/agent.toml"


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
    ship_final: str
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


# --- which file ---------------------------------------------------------------------------


def config_path(flag_value: str | None, env: Mapping[str, str]) -> str | None:
    """The file to read, by the precedence in the module docstring; None means none."""
    if flag_value:
        return flag_value
    if env.get(ENV_PREFIX + "CONFIG"):
        return env[ENV_PREFIX + "CONFIG"]
    # Moves the default (tests keep it in their tmp dir, away from the host's /etc).
    default = env.get(ENV_PREFIX + "DEFAULT_CONFIG") or DEFAULT_CONFIG_FILE
    return default if os.path.exists(default) else None


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
    file_values = configfile.read_config(path) if path else {}
    resolved: dict[str, Any] = {}
    for opt in OPTIONS:
        value: Any = None
        try:
            if flags.get(opt.name) is not None:
                origin = opt.flag
                value = from_native(opt, flags[opt.name])
            elif env.get(opt.env) is not None and env.get(opt.env) != "":
                origin = f"${opt.env}"
                value = from_text(opt, env[opt.env])
            elif opt.name in file_values:
                origin = f"config file {path}: {opt.name}"
                value = from_native(opt, file_values[opt.name])
            else:
                continue
        except (ValueError, TypeError, OverflowError) as err:  # int([1]), int(inf), …
            raise ConfigError(f"{origin}: {err}") from None
        resolved[opt.name] = checked(opt, value, origin)
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
