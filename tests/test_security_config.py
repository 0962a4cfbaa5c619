"""Every configuration error is found at load (and by `doctor`), never at termination time."""

from __future__ import annotations

import json
import math
import os
import string
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import Stack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import scoreboard

from instance_agent import config, keys
from instance_agent.archive import Excluder
from instance_agent.compress import open_compressor
from instance_agent.errors import ConfigError
from instance_agent.partsize import PartSizer

# (TOML lines, the key the one-line error must name)
BAD = [
    ('max_archive_size = "6TiB"', "max_archive_size"),
    ('key_template = "{prefix}{group}/{instance_id:.2}/{timestamp}"', "key_template"),
    ('key_template = "{prefix}{group}/{group}/{group}/{group}/{instance_id}/{timestamp}"', "key_template"),
    ("poll_interval = inf", "poll_interval"),
    ("poll_interval = nan", "poll_interval"),
    ("lock_timeout = inf", "lock_timeout"),
    ("level = 3.9", "level"),
    ('state_dir = "  "', "state_dir"),
    ('state_dir = "relative/dir"', "state_dir"),
    ('compression = "gzip"\nlevel = 12', "level"),
    ('compression = "gzip"\nlevel = -3', "level"),
]


@pytest.mark.parametrize(("toml", "key"), BAD)
def test_each_config_error_is_exit_2_with_one_line_naming_the_key(
    stack: Stack, tmp_path: Path, toml: str, key: str
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(toml + "\n")
    src = tmp_path / "src"
    src.mkdir()
    env = stack.env()
    env.pop("INSTANCE_AGENT_STATE_DIR")  # the file's state_dir must count
    # --no-complete: a config wrongly accepted fails this test at once instead of waiting for
    # Terminating:Wait.
    proc = stack.run(
        "backup",
        "--bucket",
        stack.bucket,
        "--config",
        str(path),
        "--source",
        str(src),
        "--json",
        "--no-complete",
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], lines
    # Refused before anything was done: no object, no lifecycle call.
    assert stack.objects() == {} and stack.lifecycle_calls() == []


def test_doctor_reports_the_same_error(stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('compression = "gzip"\nlevel = 12\n')
    proc = stack.run("doctor", "--json", "--bucket", stack.bucket, "--config", str(path), timeout=120)
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert proc.returncode == 1
    assert checks["config"]["result"] == "fail"
    assert checks["config"]["message"].startswith("level: 12 is outside gzip's range")


def test_an_invalid_token_is_refused_without_being_echoed() -> None:
    secret = "not-a-uuid-but-still-a-secret"
    with pytest.raises(ConfigError) as info:
        config.load({"bucket": "ok-bucket", "lifecycle_token": secret}, {})
    assert "lifecycle action token" in str(info.value) and secret not in str(info.value)


# -- property: what load accepts, a backup can use --------------------------------------

_PIECES = [
    "{prefix}",
    "{group}",
    "{instance_id}",
    "{instance_id:.2}",
    "{instance_id:.40}",
    "{instance_id!r}",
    "{instance_id:>30}",
    "{region}",
    "{timestamp}",
    "{hostname}",
    "{hostname:.3}",
    "/",
    "-",
    "x",
    ".",
    "..",
    "{{",
    "}}",
    "{bad}",
    "{",
]
_NUMBERS = st.one_of(
    st.integers(-10, 10**14),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(string.digits + ".eE+-infa", max_size=6),
)

_OVERRIDES = st.fixed_dictionaries(
    {},
    optional={
        "key_template": st.lists(st.sampled_from(_PIECES), max_size=8).map("".join),
        "prefix": st.text(string.ascii_letters + "/._-", max_size=20),
        "compression": st.sampled_from(["zstd", "gzip", "none"]),
        "level": _NUMBERS,
        "max_archive_size": st.one_of(
            st.integers(-1, 2**44), st.sampled_from(["5TiB", "6TiB", "1.5GiB", "100MiB", "0"])
        ),
        "max_duration": _NUMBERS,
        "lock_timeout": _NUMBERS,
        "wait_timeout": _NUMBERS,
        "complete_timeout": _NUMBERS,
        "heartbeat_interval": _NUMBERS,
        "poll_interval": _NUMBERS,
        "stop_grace": _NUMBERS,
        "upload_workers": st.integers(-2, 64),
        "exclude": st.lists(st.text(string.printable, max_size=12), max_size=3),
        "state_dir": st.sampled_from(["", " ", "/var/lib/x", "rel", "/"]),
    },
)
_GROUPS = st.text(min_size=1, max_size=255).filter(lambda s: not any(ord(c) < 32 for c in s))
_HOSTS = st.text(string.ascii_lowercase + string.digits + ".-", min_size=1, max_size=253)
_IDS = st.from_regex(r"i-[0-9a-f]{8}|i-[0-9a-f]{17}", fullmatch=True)
_TIMEOUTS = (
    "max_duration",
    "lock_timeout",
    "wait_timeout",
    "complete_timeout",
    "heartbeat_interval",
    "poll_interval",
    "stop_grace",
    "drain_timeout",
    "command_timeout",
)


class _Null:
    def write(self, data: Any, /) -> int:
        return len(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_OVERRIDES, _GROUPS, _HOSTS, _IDS, _IDS)
def test_a_config_accepted_by_load_never_fails_a_backup_by_itself(
    flags: dict[str, Any], group: str, host: str, one: str, two: str
) -> None:
    try:
        cfg = config.load({"bucket": "ok-bucket", **flags}, {}, config_file="/dev/null")
    except ConfigError as err:
        assert "\n" not in str(err)  # refused in one line: fine
        return
    # Keys: every instance, group and host name renders a valid key, and distinct instances
    # never share one.
    values = {
        "prefix": cfg.prefix,
        "group": group,
        "instance_id": one,
        "region": "eu-west-1",
        "timestamp": keys.timestamp(),
        "hostname": host,
    }
    key = keys.render(cfg.key_template, values, cfg.compression)
    assert keys.check_key(key + ".manifest.json") is None
    keys.listing_prefix(cfg.key_template, values)
    if one != two:
        assert key != keys.render(cfg.key_template, {**values, "instance_id": two}, cfg.compression)
    # The compressor takes the level, the part sizes reach the maximum, globs compile.
    comp = open_compressor(cfg.compression, _Null(), cfg.level, threads=1)
    comp.write(b"instance-agent\n" * 64)
    comp.close()
    sizer = PartSizer.for_max(cfg.max_archive_size)
    assert sizer.capacity() >= cfg.max_archive_size
    Excluder(cfg.exclude)
    # Every timeout can be waited on: no inf/nan for Event.wait() and time.sleep() to choke on.
    probe = threading.Lock()
    for name in _TIMEOUTS:
        value = getattr(cfg, name)
        if value is not None:
            assert math.isfinite(value) and value > 0
            assert probe.acquire(timeout=value)  # free: returns at once, but checks the range
            probe.release()
    assert cfg.state_dir.startswith("/") and cfg.runtime_dir.startswith("/")


def _refused_config(stack: Stack, tmp_path: Path, path: str, command: str) -> str:
    """`command` with `--config path` exits promptly with 2 and one line; the timeout makes a
    hang fail the test instead of blocking it."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    args = ["--config", path, "--bucket", stack.bucket, "--json", "--source", str(src), "--no-complete"]
    proc = stack.run(command, *args, timeout=30)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "config file" in lines[0], lines
    assert stack.objects() == {} and stack.lifecycle_calls() == []
    return lines[0]


def test_a_fifo_as_the_config_file_is_refused_at_once(stack: Stack, tmp_path: Path) -> None:
    with scoreboard.scenario(
        "Config: the config file is a FIFO (or /dev/zero, or writable by others)"
    ) as row:
        row.faults = "--config names a FIFO with no writer; /dev/zero; a 0664 file; a file in a 0777 dir"
        row.retried = "0"
        fifo = tmp_path / "agent.toml"
        os.mkfifo(fifo, 0o600)
        line = _refused_config(stack, tmp_path, str(fifo), "backup")
        assert "regular file" in line
        row.outcome = (
            "exit 2 at once, one line ('not a regular file' / 'writable by group or others'); nothing done"
        )
        row.bytes_lost = 0


def test_doctor_reports_a_fifo_config_file_at_once(stack: Stack, tmp_path: Path) -> None:
    fifo = tmp_path / "agent.toml"
    os.mkfifo(fifo, 0o600)
    proc = stack.run("doctor", "--json", "--bucket", stack.bucket, "--config", str(fifo), timeout=60)
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert proc.returncode == 1
    assert checks["config"]["result"] == "fail"
    assert "not a regular file" in checks["config"]["message"]


def test_dev_zero_as_the_config_file_is_refused(stack: Stack, tmp_path: Path) -> None:
    assert "regular file" in _refused_config(stack, tmp_path, "/dev/zero", "backup")


def test_a_group_writable_config_file_is_refused(stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('pre_command = ["true"]\n')
    path.chmod(0o664)
    assert "writable" in _refused_config(stack, tmp_path, str(path), "backup")


def test_a_config_file_in_a_world_writable_directory_is_refused(stack: Stack, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # not sticky: anyone may swap the file for their own
    path = shared / "agent.toml"
    path.write_text('pre_command = ["true"]\n')
    path.chmod(0o600)
    assert "writable" in _refused_config(stack, tmp_path, str(path), "backup")


# (a value, the key its one-line error must name): issue 19 item 15.
ODD_VALUES = [
    ({"prefix": "./"}, "prefix"),
    ({"prefix": "a/./b/"}, "prefix"),
    ({"prefix": "a//b/"}, "prefix"),
    ({"key_template": "{prefix}{group!r}/{instance_id}/{timestamp}"}, "key_template"),
    ({"key_template": "{prefix}{group:/>30}/{instance_id}/{timestamp}"}, "key_template"),
    ({"bucket": "xn--backups"}, "bucket"),
    ({"bucket": "backups--ol-s3"}, "bucket"),
]


def test_odd_prefixes_templates_and_reserved_bucket_names_are_refused_at_load() -> None:
    with scoreboard.scenario("Config: prefix './', template '{group:/>30}', bucket 'xn--…'") as row:
        row.faults = (
            f"{len(ODD_VALUES)} values: ./ and a//b prefixes, format spec and conversion, "
            "reserved bucket names"
        )
        row.retried = "0"
        for flags, key in ODD_VALUES:
            with pytest.raises(ConfigError) as info:
                config.load({"bucket": "ok-bucket", **flags}, {})
            message = str(info.value)
            assert key in message and "\n" not in message, message
        row.outcome = "each refused at load in one line naming the key; exit 2"
        row.bytes_lost = 0
